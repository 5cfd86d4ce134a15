"""Compile-time use of the tuning log: the best measured config of each workload.

``qcompiler.driver.compile_model`` activates a :class:`TunedConfigs` for the build (a context
variable, so the lowering adapters need no new arguments); ``CpuGemm`` / ``CudaGemm`` call
:func:`generate` for every conv/dense kernel, which uses the best record's config when the log has
one (falling back to ``default_config`` if the generator rejects it) and notes the layer, so the
metadata can say which layers run a tuned config.

Which log: ``CompileOptions.tune_log`` if given (a folder or a records.jsonl; "off" disables), else
``$QC_TUNE_LOG``, else ``autotune_logs/<device-name>/`` under the current directory or the
repository root, if it exists (for a CUDA target without a GPU to name, the first
``autotune_logs/sm_XX*`` folder of the target's arch).  Records of another target/device or TVM
version are skipped with a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path

from qcompiler import progress

from . import records as R
from .workload import config_dict, config_key

_active: contextvars.ContextVar = contextvars.ContextVar("qc_tuned_configs", default=None)
OFF = ("off", "none", "0", "")
REPO_ROOT = Path(__file__).resolve().parents[2]


class TunedConfigs:
    def __init__(self, log: str | None, target: dict):
        import tvm

        self.log = log
        self.target = target
        self.best: dict[str, dict] = {}
        self.used: list[dict] = []
        self.skipped: dict = {}
        if log:
            rr = R.read(log, target, tvm.__version__)
            self.best = R.best_by_workload(rr.records)
            self.skipped = {"corrupt": rr.corrupt, "foreign_target": rr.foreign_target, "foreign_tvm": rr.foreign_tvm}
            msg = rr.skipped_message()
            if msg:
                progress.get().warn(f"tuning log {R.log_file(log)}: {msg}")

    def lookup(self, workload):
        rec = self.best.get(workload.key)
        if rec is None:
            return None, None
        try:
            return workload.config_from_dict(rec["config"]), rec
        except (TypeError, ValueError):
            return None, None

    def summary(self) -> dict:
        return {"log": str(R.log_file(self.log)) if self.log else None, "workloads_in_log": len(self.best),
                "tuned_layers": self.used, "skipped_records": self.skipped}


def find_log(spec, tune_log: str | None = None) -> str | None:
    if tune_log is not None:
        return None if str(tune_log).lower() in OFF else str(tune_log)
    env = os.environ.get("QC_TUNE_LOG")
    if env is not None:
        return None if env.lower() in OFF else env
    from .device import device_name

    name = device_name(spec)
    for root in (Path.cwd() / "autotune_logs", REPO_ROOT / "autotune_logs"):
        if (root / name / R.FILENAME).is_file():
            return str(root / name)
        if spec.kind == "cuda" and root.is_dir():
            cands = sorted(p for p in root.glob(f"{spec.arch}*") if (p / R.FILENAME).is_file())
            if cands:
                if len(cands) > 1:
                    progress.get().warn(f"several tuning logs for {spec.arch}: using {cands[0]} "
                                        f"(pass the one for your GPU with QC_TUNE_LOG)")
                return str(cands[0])
    return None


@contextlib.contextmanager
def activate(spec, tune_log: str | None = None):
    """Make the best configs of the log visible to the lowering adapters during a build."""
    from .device import describe

    log = find_log(spec, tune_log)
    tc = TunedConfigs(log, describe(spec, probe_gpu=False) if spec.kind == "cuda" else describe(spec))
    token = _active.set(tc)
    try:
        yield tc
    finally:
        _active.reset(token)


def generate(workload, layer: str, make):
    """``make(config_or_None)`` with the tuned config of ``workload`` if the active log has one.

    A tuned config the generator now rejects falls back to the default config (with a warning);
    errors of the default config propagate as before."""
    tc = _active.get()
    if tc is None:
        return make(None)
    cfg, rec = tc.lookup(workload)
    if cfg is None:
        return make(None)
    try:
        func = make(cfg)
    except Exception as e:  # noqa: BLE001 - ValueError / KernelUnsupported
        progress.get().warn(f"layer '{layer}': tuned config {config_key(rec['config'])} rejected ({e}); "
                            "using the default config")
        return make(None)
    tc.used.append({"layer": layer, "workload_key": workload.key, "config": config_dict(rec["config"]),
                    "median_s": rec["median_s"], "is_default": bool(rec.get("is_default"))})
    return func
