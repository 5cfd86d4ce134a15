"""Which device the records belong to: the log folder name and the target description of a record.

Device names (the folder under ``autotune_logs/``):
  cpu   the CPU model name of /proc/cpuinfo ("model name"), sanitized: lower case, "(R)"/"(TM)",
        "CPU" and the "@ x.xxGHz" suffix dropped, every other run of non-alphanumerics -> "-"
        (e.g. "Intel(R) Xeon(R) Processor" -> "intel-xeon-processor");
  cuda  ``sm_XX`` plus the sanitized GPU name when known (``sm_90-nvidia-h100-80gb-hbm3``); a
        cross-compiling host (no GPU) only knows ``sm_XX``.
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


def device_name(spec: TargetSpec, probe_gpu: bool = True) -> str:
    if spec.kind == "cpu":
        return sanitize(cpu_model_name())
    info = gpu_info() if probe_gpu else None
    if info and info["arch"] == spec.arch:
        return f"{spec.arch}-{sanitize(info['name'])}"
    return spec.arch


def describe(spec: TargetSpec, probe_gpu: bool = True) -> dict:
    """The ``target`` object of a record: kind, arch, device name, core count or SM count."""
    if spec.kind == "cpu":
        if spec.arch != host_cpu():  # compiling for another CPU: its records / model are found by arch
            return {"kind": "cpu", "arch": spec.arch, "device": None, "cores": None}
        return {"kind": "cpu", "arch": spec.arch, "device": device_name(spec), "cores": host_cores()}
    info = gpu_info() if probe_gpu else None
    d = {"kind": "cuda", "arch": spec.arch, "device": device_name(spec, probe_gpu), "sm_count": None}
    if info and info["arch"] == spec.arch:
        d["sm_count"] = info["sm_count"]
    return d


def default_log_dir(spec: TargetSpec, root: str | os.PathLike = "autotune_logs") -> str:
    return os.path.join(str(root), device_name(spec))
