"""The tuning log: ``<log dir>/records.jsonl``, one JSON object per line.

Record (schema ``qc-tune/1``)::

  {"schema": "qc-tune/1",
   "workload_key": "cpu_vnni.conv2d/1x16x16x8x16x3x3/s1,1/p1,1,1,1/d1,1/int8->uint8[0,255]/cpu:rocketlake",
   "workload": {backend, kind, shape, a_dtype, out_dtype, lo, hi, target, strides, pads, dilations},
   "target": {"kind": "cpu", "arch": "rocketlake", "device": "rocketlake-avx512vnni-2c", "cores": 2,
              "isa": "avx512vnni"}   (device key: qcompiler/tune/device.py)
             (cuda: {"kind": "cuda", "arch": "sm_90", "device": "sm_90-nvidia-h100-80gb-hbm3-132sm", "sm_count": 132}),
   "config": {"mr": 3, "nr": 1, "kc": 0, "n_outer": true, "parallel": true},  (the kernel's config
                                                                  dataclass; fields added later are
                                                                  absent from older records and read
                                                                  at their legacy value)
   "is_default": false,                                           (the config default_config picks)
   "latencies_s": [...], "median_s": 1.2e-05,                     (every repeat; null when it failed)
   "error": null | "one line",                                    (build or run failure)
   "measured_by": "local" | "rpc:<key>@host:port" | "offline:<dir>",
   "timestamp": "2026-11-20T10:00:00+00:00", "tvm_version": "...", "qcompiler_version": "...",
   "tir_sha256": "16 hex digits of the scheduled PrimFunc's text"}

Writing: one ``os.write`` of the whole line on an ``O_APPEND`` descriptor, then ``fsync``, so a
kill (SIGKILL included) leaves every earlier record intact and at most a partial last line.  Each
append holds an exclusive ``fcntl.flock`` on the log file, so two ``qc tune`` processes appending to
one log never interleave (a line is written whole, after a newline that ends any partial line a
killed writer left); ``tests/test_reliability_tune.py`` runs two writer processes at once.
A timing whose repeats say the machine was disturbed (:func:`disturbed`) is re-run by the measurer
(up to twice, keeping the steadiest); the cost model trains on a config's undisturbed records only.
Reading: lines that are not a JSON object of this schema (a partial last line, garbage, another
tool's lines) are skipped and counted; records of another target (kind, arch, and for CPUs the
device) or another TVM version are skipped, counted and warned about; nothing is fatal.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "qc-tune/1"
FILENAME = "records.jsonl"
REQUIRED = ("schema", "workload_key", "workload", "target", "config", "latencies_s", "median_s", "error",
            "timestamp", "tvm_version", "qcompiler_version")


DISTURBED_RATIO = 1.10


def _timings(latencies) -> list[float]:
    return [v for v in (float(x) for x in (latencies if latencies is not None else [])) if v > 0]


def spread(latencies) -> float:
    """Median of the repeats over their fastest (1.0 = steady; inf without a positive timing)."""
    lat = _timings(latencies)
    return statistics.median(lat) / min(lat) if lat else float("inf")


def disturbed(latencies) -> bool:
    """A timing the machine disturbed (another process's burst on a shared host): the median of the
    repeats more than ``DISTURBED_RATIO`` above their fastest (:func:`spread`), i.e. at least half of
    them >= 10% slow.  A steady kernel's repeats sit within ~1% here (median/min 1.006, p95 1.06 over
    3600 records); a burst only slows repeats down, so the fastest is the closest to the true time."""
    return len(_timings(latencies)) >= 3 and spread(latencies) > DISTURBED_RATIO


def log_file(log_dir: str | os.PathLike) -> Path:
    p = Path(log_dir)
    return p if p.suffix == ".jsonl" else p / FILENAME


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    import tvm

    from qcompiler import __version__

    return {"tvm_version": tvm.__version__, "qcompiler_version": __version__}


def make_record(workload, target: dict, config: dict, latencies, error: str | None, measured_by: str,
                is_default: bool = False, tir_sha256: str | None = None, vers: dict | None = None) -> dict:
    lat = [float(x) for x in latencies] if latencies else []
    ok = error is None and bool(lat)
    return {"schema": SCHEMA, "workload_key": workload.key, "workload": workload.fields(), "target": target,
            "config": config, "is_default": bool(is_default), "latencies_s": lat,
            "median_s": statistics.median(lat) if ok else None,
            "error": None if ok else (error or "no measurement").strip().splitlines()[-1][:500],
            "measured_by": measured_by, "timestamp": now(), **(vers or versions()),
            "tir_sha256": tir_sha256}


class RecordWriter:
    """Appends records one line at a time (one os.write + fsync each)."""

    def __init__(self, log_dir: str | os.PathLike):
        self.path = log_file(log_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_RDWR: the last byte is read back under the lock (a writer killed mid-line left no newline)
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def _locked(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # released by the kernel too if this process dies
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._locked():
            size = os.fstat(self.fd).st_size
            if size and os.pread(self.fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # start on a fresh line after another writer's partial one
            n = os.write(self.fd, line)
            if n != len(line):  # pragma: no cover - regular files take whole writes
                raise OSError(f"short write to {self.path}")
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class ReadResult:
    records: list = field(default_factory=list)
    corrupt: int = 0             # unparsable lines (partial last line, garbage, other schemas)
    foreign_target: int = 0      # records of another target / device
    foreign_tvm: int = 0         # records of another TVM version
    foreign_devices: set = field(default_factory=set)  # the devices (or archs) of the foreign ones
    files: list = field(default_factory=list)

    def skipped_message(self) -> str | None:
        parts = []
        if self.corrupt:
            parts.append(f"{self.corrupt} corrupt or foreign line(s)")
        if self.foreign_target:
            parts.append(f"{self.foreign_target} record(s) of another target/device")
        if self.foreign_tvm:
            parts.append(f"{self.foreign_tvm} record(s) of another TVM version")
        return ("skipped " + ", ".join(parts)) if parts else None


def _valid(obj) -> bool:
    return (isinstance(obj, dict) and obj.get("schema") == SCHEMA and all(k in obj for k in REQUIRED)
            and isinstance(obj["workload"], dict) and isinstance(obj["config"], dict)
            and isinstance(obj["target"], dict) and isinstance(obj["latencies_s"], list))


def is_device_key(arch, device) -> bool:
    """Whether ``device`` is a CPU device key of ``qcompiler/tune/device.py`` (``<arch>-<isa>[-<n>c]``)
    rather than a marketing name of records written before it (``amd-epyc``)."""
    from .device import ISA_CLASSES

    if not arch or not isinstance(device, str) or not device.startswith(f"{arch}-"):
        return False
    rest = device[len(arch) + 1:].split("-")
    return rest[0] in ISA_CLASSES and (len(rest) == 1 or (len(rest) == 2 and rest[1][:-1].isdigit()
                                                           and rest[1].endswith("c")))


def target_matches(rec_target: dict, want: dict | None) -> bool:
    if want is None:
        return True
    if rec_target.get("kind") != want.get("kind") or rec_target.get("arch") != want.get("arch"):
        return False
    # CPU logs are per device key (LLVM CPU, ISA class, cores: qcompiler/tune/device.py); a record of
    # the older marketing-name scheme ("amd-epyc") names no ISA class, so it matches no device key
    # (migrate such a log as autotune_logs/README.md says)
    if want.get("kind") == "cpu" and want.get("device") and rec_target.get("device") != want.get("device"):
        return False
    # CUDA logs per arch when the compiling host has no GPU to name
    if want.get("kind") == "cuda" and want.get("device", "").count("-") and rec_target.get("device") != want["device"]:
        return False
    return True


def read(log_dir: str | os.PathLike, target: dict | None = None, tvm_version: str | None = None) -> ReadResult:
    """All valid records of ``log_dir`` (a folder or a .jsonl file) for ``target`` and ``tvm_version``."""
    res = ReadResult()
    path = log_file(log_dir)
    if not path.is_file():
        return res
    res.files.append(str(path))
    with open(path, "rb") as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                res.corrupt += 1
                continue
            if not _valid(obj):
                res.corrupt += 1
                continue
            if not target_matches(obj["target"], target):
                res.foreign_target += 1
                res.foreign_devices.add(obj["target"].get("device") or obj["target"].get("arch"))
                continue
            if tvm_version is not None and obj["tvm_version"] != tvm_version:
                res.foreign_tvm += 1
                continue
            res.records.append(obj)
    return res


def refuse_foreign(rr: ReadResult, log_dir, target: dict | None) -> None:
    """A log none of whose records is of ``target`` (another device's log: a Zen 2's records for a
    Zen 5, a 2-core VM's for a 16-core host) is refused in one line instead of being used or
    appended to; a log mixing devices keeps working (the other devices' records are skipped)."""
    if target is None or rr.records or not rr.foreign_target:
        return
    from qcompiler.errors import TargetError

    devices = sorted({str(d) for d in rr.foreign_devices}) or ["another target"]
    want = target.get("device") or f"{target.get('kind')} {target.get('arch')}"
    raise TargetError(f"{log_file(log_dir)}: its {rr.foreign_target} record(s) are of {', '.join(devices[:3])}, "
                      f"not of this target ({want}); use this device's log (autotune_logs/{target.get('device') or '<device>'}/"
                      "), a new folder, or QC_TUNE_LOG=off")


def best_by_workload(records) -> dict[str, dict]:
    """workload key -> the successful record with the lowest median."""
    best: dict[str, dict] = {}
    for r in records:
        if r.get("error") is None and r.get("median_s") is not None:
            b = best.get(r["workload_key"])
            if b is None or r["median_s"] < b["median_s"]:
                best[r["workload_key"]] = r
    return best
