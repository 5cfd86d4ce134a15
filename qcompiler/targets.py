"""Targets the compiler accepts: ``cpu`` (LLVM for this host) and ``cuda`` with an sm_XX arch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .errors import TargetError

CUDA_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")

# Properties MetaSchedule and the cost model need for CUDA targets (per arch; H100 SXM for sm_90).
_CUDA_PROPS = {
    "sm_75": dict(max_shared_memory_per_block=65536, registers_per_block=65536),
    "sm_80": dict(max_shared_memory_per_block=166912, registers_per_block=65536),
    "sm_86": dict(max_shared_memory_per_block=101376, registers_per_block=65536),
    "sm_89": dict(max_shared_memory_per_block=101376, registers_per_block=65536),
    "sm_90": dict(max_shared_memory_per_block=232448, registers_per_block=65536),
}


@dataclass(frozen=True)
class TargetSpec:
    kind: str          # "cpu" | "cuda"
    arch: str | None   # sm_XX for cuda; the LLVM CPU name for cpu

    def tvm_target(self):
        import tvm

        if self.kind == "cpu":
            t = {"kind": "llvm", "mcpu": self.arch, "num-cores": host_cores()}
            if self.mattr:
                t["mattr"] = list(self.mattr)
            return tvm.target.Target(t)
        props = _CUDA_PROPS[self.arch]
        return tvm.target.Target({"kind": "cuda", "arch": self.arch, "max_threads_per_block": 1024,
                                  "thread_warp_size": 32, **props})

    @property
    def mattr(self) -> tuple[str, ...]:
        """LLVM feature changes for the host CPU (``host_mattr``); none for another CPU named by --arch."""
        return host_mattr() if self.kind == "cpu" and self.arch == host_cpu() else ()

    def describe(self) -> dict:
        return {"kind": self.kind, "arch": self.arch, **({"mattr": list(self.mattr)} if self.mattr else {})}


def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def _affinity_cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# Read once, when this module is imported: the TVM runtime's thread pool pins the calling thread to
# one core the first time it runs a parallel kernel, after which sched_getaffinity says 1 (found
# when a profiling run compiled its later models for a 1-core target, and labelled its records so).
_HOST_CORES = _affinity_cores()


def host_cores() -> int:
    """CPUs this process may run on (as at import: not the one core TVM later pins its thread to)."""
    return _HOST_CORES


@functools.lru_cache(maxsize=None)
def _host_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def host_has_vnni() -> bool:
    return _host_flag("avx512_vnni")


def host_has_avx2() -> bool:
    return _host_flag("avx2")


@functools.lru_cache(maxsize=None)
def host_mattr() -> tuple[str, ...]:
    """The host's LLVM CPU name is read from its model number, but a VM may hide features that model
    has (an Emerald Rapids guest without the AMX tile state): turn off each checked vector-ISA feature
    of the CPU name that /proc/cpuinfo lacks (else the library would claim, and check_host refuse, an
    ISA the host does not run), and turn AMX on where the host has it but LLVM does not know the CPU
    as an AMX one (``host_amx_usable``)."""
    from .artifact import cpu_features, missing_cpu_features

    feats = cpu_features(host_cpu())  # the checked features of the CPU name (none without LLVM)
    off = [f"-{f}" for f in missing_cpu_features(feats)]
    on = [f"+{f}" for f in ("amx-tile", "amx-int8") if f not in feats] if host_amx_usable() else []
    return tuple(on + off)


# arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux's grant of the AMX tile state (x86-64)
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.lru_cache(maxsize=None)
def host_amx_usable() -> bool:
    """This CPU has AMX-INT8 tiles and Linux lets this process use them (``arch_prctl(
    ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, what every AMX kernel asks on entry,
    qcompiler/kernels/_amx_intrin.py).  ``QC_AMX=0`` turns the AMX kernels off (the VNNI ones run)."""
    import ctypes
    import os

    if os.environ.get("QC_AMX", "1") == "0" or not (_host_flag("amx_int8") and _host_flag("amx_tile")):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def parse_target(kind: str, arch: str | None = None) -> TargetSpec:
    kind = (kind or "").lower()
    if kind in ("cpu", "llvm"):
        if arch and arch != host_cpu():
            from tvm.target import Target, codegen

            known = list(codegen.llvm_get_cpu_archlist(Target({"kind": "llvm"})))
            if known and arch not in known:
                raise TargetError(f"unknown CPU '{arch}' for --target cpu; use an LLVM CPU name such as "
                                  f"{', '.join(c for c in ('skylake-avx512', 'cascadelake', 'icelake-server', 'znver4') if c in known)} "
                                  "(or leave --arch out for this host's)")
        return TargetSpec("cpu", arch or host_cpu())
    if kind == "cuda":
        arch = arch or "sm_90"
        if arch not in CUDA_ARCHS:
            raise TargetError(f"unsupported CUDA arch '{arch}'; choose one of {', '.join(CUDA_ARCHS)}")
        return TargetSpec("cuda", arch)
    raise TargetError(f"unknown target '{kind}'; use --target cpu or --target cuda --arch sm_XX")
