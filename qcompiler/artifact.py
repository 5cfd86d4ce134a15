"""The deployable artifact: ``model.so`` (TVM library) + ``model.json`` (metadata), written atomically.

model.json holds: format version, target, precision and I/O mode, every input/output with its
name, shape, dtype and scale, the precision of every layer, versions, and the scheduled TIR of
the library (gzip + base64) so ``qc inspect`` can prove integer-only-ness from the code itself.

Verified pairs (format 2): ``library`` holds the SHA-256 and size of ``model.so`` and ``isa`` the
vector-ISA features the CPU code was generated for (the LLVM features of ``target.arch``).
``read_metadata`` (``qc inspect``, ``qc run``, ``qc bench``, ``qcompiler.load``) refuses, in one
line, a library whose bytes do not match (truncated, corrupt, or the model.so of another compile
beside this model.json), a library of another TVM release (major.minor) than the runtime's, and
``check_host`` (before anything is loaded to run) one built for CPU features or a GPU arch this
host lacks: such code would die of an illegal instruction instead.

Reproducible: the same model, calibration data, options, tuning log and cost model give the same
model.so bytes and the same model.json, except the fields whose names say they hold a time, a date,
a host or a path (``created_time``, ``timings_s``, ``model.source_path``); the stored TIR is
gzipped with a zero header timestamp (``tests/test_reliability.py``).

Nothing is published until both files are complete: each is written to a temporary name in the
destination folder and renamed into place (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

from . import interrupt_guard
from .errors import ArtifactError

FORMAT = "qcompiler-library"
FORMAT_VERSION = 2
READABLE_VERSIONS = (2,)

# LLVM x86 feature name -> /proc/cpuinfo flag, for the features code generation may use (vector
# ISA extensions); features outside this table are not checked.
_X86_FLAGS = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "ssse3": "ssse3", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "avx512f": "avx512f", "avx512dq": "avx512dq",
    "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16",
    "avx512vp2intersect": "avx512_vp2intersect", "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni",
    "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "amx-tile": "amx_tile",
    "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
}


def metadata_path(lib_path: str | os.PathLike) -> Path:
    p = Path(lib_path)
    return p.with_suffix(".json") if p.suffix == ".so" else Path(str(p) + ".json")


def encode_text(text: str) -> dict:
    raw = text.encode()
    return {"encoding": "gzip+base64", "sha256": hashlib.sha256(raw).hexdigest(),
            "data": base64.b64encode(gzip.compress(raw, 6, mtime=0)).decode()}  # mtime 0: reproducible


def decode_text(blob: dict) -> str:
    if blob.get("encoding") != "gzip+base64":
        raise ArtifactError("metadata: unknown TIR encoding")
    raw = gzip.decompress(base64.b64decode(blob["data"]))
    if hashlib.sha256(raw).hexdigest() != blob.get("sha256"):
        raise ArtifactError("metadata: the stored TIR is corrupt (checksum mismatch)")
    return raw.decode()


def check_writable(out: str | os.PathLike) -> Path:
    p = Path(out)
    d = p.parent if str(p.parent) else Path(".")
    if p.exists() and p.is_dir():
        raise ArtifactError(f"{p}: is a directory; give a file name such as model.so")
    if not d.exists():
        raise ArtifactError(f"{d}: output folder does not exist; create it first")
    if not os.access(d, os.W_OK):
        raise ArtifactError(f"{d}: output folder is not writable")
    return p


def check_library_path(out: str | os.PathLike) -> Path:
    """``check_writable`` for a library: the TVM runtime picks a module's loader by its file suffix
    (``tvm.runtime.load_module``), so a library written as ``model`` or ``model.bin`` could not be
    loaded back; refused before any work."""
    p = check_writable(out)
    if p.suffix != ".so":
        raise ArtifactError(f"{p}: a library path must end in .so (e.g. {p.with_suffix('.so')}); "
                            "the TVM runtime loads a shared library by its suffix")
    return p


@contextlib.contextmanager
def atomic_paths(*finals: Path):
    """Yields temporary paths beside ``finals``; renames them into place only if the block succeeds."""
    tmps = []
    all_tmps = tmps
    try:
        for f in finals:
            fd, t = tempfile.mkstemp(prefix=f".{f.name}.", suffix=f.suffix or ".tmp", dir=f.parent or ".")
            os.close(fd)
            tmps.append(Path(t))
            interrupt_guard.register(t)  # removed even if an interruption cannot unwind (its module doc)
        try:
            yield tmps
            for t, f in zip(tmps, finals):
                os.replace(t, f)
        except OSError as e:  # disk full, quota, a folder made read-only meanwhile: one line, nothing published
            raise ArtifactError(f"{finals[0]}: cannot be written ({e.strerror or type(e).__name__}); nothing was "
                                "written: free some space or choose another folder") from None
        tmps = []
    finally:
        for t in tmps:
            with contextlib.suppress(OSError):
                t.unlink()
        for t in all_tmps:
            interrupt_guard.unregister(t)


def write_json(path: Path, obj: dict) -> None:
    try:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # disk full, quota: one line (atomic_paths removes the temporary files)
        raise ArtifactError(f"{path.parent}: cannot write the metadata ({e.strerror or type(e).__name__}); "
                            "nothing was published: free some space or choose another folder") from None


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_features(arch: str | None, mattr=()) -> list[str]:
    """The checked vector-ISA features (LLVM names) of code generated for LLVM CPU ``arch`` with the
    feature changes ``mattr`` (``targets.host_mattr``)."""
    if not arch:
        return []
    try:
        import tvm
        from tvm.target import codegen

        t = {"kind": "llvm", "mcpu": arch, **({"mattr": list(mattr)} if mattr else {})}
        feats = codegen.llvm_get_cpu_features(tvm.target.Target(t))
    except Exception:  # noqa: BLE001 - an LLVM without this CPU (or no LLVM): nothing to check
        return []
    return sorted(f for f in feats if f in _X86_FLAGS)


def seal(meta: dict, lib_file: str | os.PathLike) -> dict:
    """Record in ``meta`` what identifies the built library: SHA-256 and size of ``lib_file`` (the
    model.so about to be published) and, for CPU targets, the vector-ISA features its code assumes."""
    meta["library"] = {"sha256": file_sha256(lib_file), "size": os.path.getsize(lib_file)}
    t = meta.get("target", {})
    if t.get("kind") in ("cpu", "llvm"):
        t["isa"] = cpu_features(t.get("arch"), t.get("mattr", ()))
    return meta


def _release(version: str | None) -> str:
    """major.minor of a version string ("0.27.0.post1" -> "0.27")."""
    return ".".join(str(version or "?").split(".")[:2])


def read_metadata(lib_path: str | os.PathLike, verify: bool = True) -> dict:
    """model.json of ``lib_path``, checked: format, and (``verify``) that ``lib_path`` is the library
    it describes (size and SHA-256) and that this TVM release can load it."""
    lib = Path(lib_path)
    if not lib.exists():
        raise ArtifactError(f"{lib}: no such library (compile one with `qc compile`)")
    if lib.is_dir():
        raise ArtifactError(f"{lib}: is a directory; give the model.so file")
    meta = metadata_path(lib)
    if not meta.exists():
        raise ArtifactError(f"{meta}: metadata file missing beside {lib.name} (copy it along with the library)")
    try:
        with open(meta) as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{meta}: unreadable metadata ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            "copy it again from the compile's output or recompile") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"{meta}: not a qcompiler library metadata file")
    if m.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"{meta}: metadata format {m.get('format_version')} is not supported by this "
                            f"version (expects {FORMAT_VERSION}); recompile the model")
    if verify:
        verify_pair(lib, m, meta)
    return m


def verify_pair(lib: Path, m: dict, meta: Path | None = None) -> None:
    """Refuse (ArtifactError) a library whose bytes are not the ones ``m`` was written for, or one
    built by another TVM release than the installed runtime."""
    meta = meta or metadata_path(lib)
    want = m.get("library") if isinstance(m.get("library"), dict) else {}
    if not want.get("sha256"):
        raise ArtifactError(f"{meta}: records no checksum of {lib.name}; recompile the model with this version")
    size = os.path.getsize(lib)
    if want.get("size") is not None and size != want["size"]:
        what = "truncated" if size < want["size"] else "larger than the one compiled"
        raise ArtifactError(f"{lib}: {size} bytes, but {meta.name} describes a library of {want['size']} bytes "
                            f"({what}, or the model.so of another compile); copy model.so and model.json of one "
                            "compile together, or recompile")
    if file_sha256(lib) != want["sha256"]:
        raise ArtifactError(f"{lib}: its SHA-256 does not match the one recorded in {meta.name} (corrupt, or the "
                            "model.so of another compile beside this model.json); copy model.so and model.json "
                            "of one compile together, or recompile")
    try:
        import tvm

        have = tvm.__version__
    except Exception:  # noqa: BLE001 - no TVM: nothing will load it anyway
        return
    if _release(m.get("tvm_version")) != _release(have):
        raise ArtifactError(f"{lib}: built with TVM {m.get('tvm_version')}, but this runtime is TVM {have}; "
                            f"recompile the model with this TVM (or run it where TVM {_release(m.get('tvm_version'))} "
                            "is installed)")


def host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def missing_cpu_features(features, host_flags: set[str] | None = None) -> list[str]:
    """Which of the LLVM ``features`` the host lacks (only the mapped x86 ones; nothing on a host
    whose flags cannot be read, e.g. not Linux or not x86)."""
    flags = host_cpu_flags() if host_flags is None else host_flags
    if not flags:
        return []
    return [f for f in features if f in _X86_FLAGS and _X86_FLAGS[f] not in flags]


def cuda_arch_runs_on(lib_arch: str, dev_arch: str) -> bool:
    """Whether cubins for ``lib_arch`` (sm_XY) run on a GPU of ``dev_arch``: same major version and a
    minor version at least the library's (sm_80 code runs on sm_86, not on sm_90 or sm_75)."""
    try:
        lv, dv = int(lib_arch.split("_")[1]), int(dev_arch.split("_")[1])
    except (IndexError, ValueError, AttributeError):
        return lib_arch == dev_arch
    return lv // 10 == dv // 10 and dv % 10 >= lv % 10


def check_host(lib: str | os.PathLike, m: dict, dev=None, host_flags: set[str] | None = None) -> None:
    """Refuse (ArtifactError), before it is loaded to run, a library whose code this host cannot
    execute: CPU code using vector-ISA features the host's CPU lacks (AVX-512 VNNI code on an AVX2
    CPU), or GPU code for another arch than the GPU's (``dev``: the TVM device, for its compute
    version)."""
    t = m.get("target", {})
    if t.get("kind") in ("cpu", "llvm"):
        feats = t.get("isa")
        if feats is None:
            feats = cpu_features(t.get("arch"), t.get("mattr", ()))
        miss = missing_cpu_features(feats, host_flags)
        if miss:
            raise ArtifactError(f"{lib}: built for CPU '{t.get('arch')}', whose instructions this CPU lacks "
                                f"({', '.join(miss[:6])}{' ...' if len(miss) > 6 else ''}); it would crash with an "
                                "illegal instruction: recompile it here (qc compile --target cpu, no --arch) or run "
                                "it on a CPU with those features")
    elif t.get("kind") == "cuda" and dev is not None:
        try:
            dev_arch = "sm_" + str(dev.compute_version).replace(".", "")
        except Exception:  # noqa: BLE001 - no compute version to compare
            return
        if not cuda_arch_runs_on(str(t.get("arch")), dev_arch):
            raise ArtifactError(f"{lib}: built for CUDA {t.get('arch')}, but this GPU is {dev_arch}; recompile it "
                                f"with --target cuda --arch {dev_arch}")
