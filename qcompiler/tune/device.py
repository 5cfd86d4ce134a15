"""Which device the records belong to: the log folder name and the target description of a record.

A device is keyed by what determines the speed of its kernels, never by its marketing name (this
project's machines include two different CPUs that both call themselves "AMD EPYC": a Zen 2 with
AVX2 only and a Zen 5 with AVX-512 VNNI):

  cpu   ``<LLVM CPU>-<ISA class>-<cores>c``, e.g. ``znver2-avx2-2c``, ``rocketlake-avx512vnni-2c``,
        ``znver5-avx512vnni-2c``: the LLVM CPU name the code is generated for (``targets.host_cpu``),
        the vector-ISA class of that CPU's features that this host really has (``avx512vnni``,
        ``avx512``, ``avx2``, ``generic``: the class picks the GEMM kernels) and the machine's core
        count (``machine_cores``: cgroup cpuset / quota, not a thread's affinity).  A CPU other than this host's (``--arch``) has no core count:
        ``<LLVM CPU>-<ISA class>``, and its logs / cost models are found by arch.
  cuda  ``sm_XX``, the sanitized GPU name and the SM count when a GPU is there
        (``sm_90-nvidia-h100-80gb-hbm3-132sm``: an H100 PCIe has 114 SMs, a MIG slice of either
        fewer under the same name); a cross-compiling host (no GPU) only knows ``sm_XX``.

Records written before this key (``"device": "amd-epyc"``, the /proc/cpuinfo model name) match no
device key (they do not say which ISA class measured them); the committed logs were migrated
(``autotune_logs/README.md`` says how).
"""

from __future__ import annotations

import os
import platform
import re

from ..targets import TargetSpec, host_cores, host_cpu


def sanitize(name: str) -> str:
    s = re.sub(r"\((r|tm|c)\)", " ", name.lower())
    s = re.sub(r"@.*$", " ", s)
    s = re.sub(r"\bcpu\b", " ", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def gpu_info() -> dict | None:
    """Name and SM count of CUDA device 0 through the TVM runtime, or None (no GPU / no CUDA runtime)."""
    if os.environ.get("QC_TUNE_NO_GPU_PROBE"):
        return None
    try:
        import tvm

        dev = tvm.cuda(0)
        if not dev.exist:
            return None
        return {"name": str(dev.device_name), "sm_count": int(dev.multi_processor_count),
                "arch": "sm_" + str(dev.compute_version).replace(".", "")}
    except Exception:  # noqa: BLE001 - no CUDA runtime in this wheel / no driver
        return None


ISA_CLASSES = ("avx512vnni", "avx512", "avx2", "generic")
# the LLVM features each class implies (what a CPU must have to run code of that class)
ISA_FEATURES = {"avx512vnni": ["avx2", "avx512f", "avx512bw", "avx512vnni"], "avx512": ["avx2", "avx512f", "avx512bw"],
                "avx2": ["avx2"], "generic": []}


def isa_class(features) -> str:
    """The vector-ISA class of a set of LLVM CPU features (what picks and bounds the GEMM kernels)."""
    f = set(features)
    if "avx512vnni" in f:
        return "avx512vnni"
    if "avx512f" in f and "avx512bw" in f:
        return "avx512"
    if "avx2" in f:
        return "avx2"
    return "generic"


def cpu_isa(arch: str, host: bool) -> str:
    """ISA class of LLVM CPU ``arch``; on this host only the features its CPU really reports (a VM
    may hide AVX-512 from a CPU model that has it)."""
    from ..artifact import cpu_features, missing_cpu_features

    feats = cpu_features(arch)
    if host:
        miss = set(missing_cpu_features(feats))
        feats = [f for f in feats if f not in miss]
    return isa_class(feats)


def host_llvm_features(arch: str | None = None) -> set[str]:
    """LLVM names of the vector-ISA features this host's CPU reports (/proc/cpuinfo flags); with
    ``arch`` (and an LLVM to ask) only those the code for that CPU may use.  Works with the TVM
    runtime alone (``qc measure``)."""
    from ..artifact import _X86_FLAGS, cpu_features, host_cpu_flags

    flags = host_cpu_flags()
    have = {llvm for llvm, flag in _X86_FLAGS.items() if flag in flags}
    if arch:
        feats = cpu_features(arch)
        if feats:
            have &= set(feats)
    return have


def _cpu_list_count(text: str) -> int:
    n = 0
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            n += int(hi) - int(lo) + 1
        elif part.strip():
            n += 1
    return n


def machine_cores() -> int:
    """The CPUs this machine (container) gives its processes: the cgroup's cpuset and CPU quota,
    else ``os.cpu_count()``.  Not the calling thread's affinity: a process started from a thread the
    TVM runtime pinned to one core inherits that one core (``targets.host_cores``), and would file its
    records under another device than its parent's."""
    n = os.cpu_count() or 1
    for f in ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/fs/cgroup/cpuset/cpuset.effective_cpus"):
        try:
            with open(f) as fh:
                c = _cpu_list_count(fh.read())
            if c:
                n = min(n, c)
                break
        except (OSError, ValueError):
            continue
    try:  # cgroup v2 "max 100000" / "200000 100000"; v1 cfs quota / period
        with open("/sys/fs/cgroup/cpu.max") as fh:
            q, per = fh.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as fq, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as fp:
                q, per = fq.read().strip(), fp.read().strip()
        except OSError:
            q, per = "max", "1"
    try:
        if q not in ("max", "-1") and int(q) > 0 and int(per) > 0:
            n = min(n, max(1, -(-int(q) // int(per))))
    except ValueError:
        pass
    return n


def cpu_key(arch: str, isa: str, cores: int | None) -> str:
    return f"{arch}-{isa}" + (f"-{int(cores)}c" if cores else "")


def device_name(spec: TargetSpec, probe_gpu: bool = True) -> str:
    if spec.kind == "cpu":
        host = spec.arch == host_cpu()
        return cpu_key(spec.arch, cpu_isa(spec.arch, host), machine_cores() if host else None)
    info = gpu_info() if probe_gpu else None
    if info and info["arch"] == spec.arch:
        return f"{spec.arch}-{sanitize(info['name'])}-{int(info['sm_count'])}sm"
    return spec.arch


def describe(spec: TargetSpec, probe_gpu: bool = True) -> dict:
    """The ``target`` object of a record: kind, arch, device name, core count or SM count."""
    if spec.kind == "cpu":
        if spec.arch != host_cpu():  # compiling for another CPU: its records / model are found by arch
            return {"kind": "cpu", "arch": spec.arch, "device": None, "cores": None}
        return {"kind": "cpu", "arch": spec.arch, "device": device_name(spec), "cores": host_cores(),
                "isa": cpu_isa(spec.arch, True)}
    info = gpu_info() if probe_gpu else None
    d = {"kind": "cuda", "arch": spec.arch, "device": device_name(spec, probe_gpu), "sm_count": None}
    if info and info["arch"] == spec.arch:
        d["sm_count"] = info["sm_count"]
    return d


def default_log_dir(spec: TargetSpec, root: str | os.PathLike = "autotune_logs") -> str:
    return os.path.join(str(root), device_name(spec))
