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
version are skipped with a warning; a log with no record of this device is refused (TargetError).

Without a record for a kernel, and with a cost model for the device (``costmodels/<device>.json``,
or the file ``$QC_COSTMODEL`` names; ``QC_COSTMODEL=off`` disables it), :func:`generate` predicts
the latency of every config of the workload's space (a sample of ``PICK_MAX`` if larger; the
default config included) with the model's config-only booster (no TIR is built for them), and builds
the one predicted fastest (the default unless another is predicted >3% faster; the next candidate when the
generator rejects it).  No measurement; the metadata lists those layers under ``predicted_layers``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

from qcompiler import progress

from . import records as R
from .workload import config_dict, config_key, distinct_configs, normalize_config

_active: contextvars.ContextVar = contextvars.ContextVar("qc_tuned_configs", default=None)
OFF = ("off", "none", "0", "")
REPO_ROOT = Path(__file__).resolve().parents[2]


def parallel_as_default(workload, cfg):
    """``cfg`` with ``parallel`` as the workload's default config has it (serial only below
    ``cpu_vnni.SERIAL_CYCLES``), not as the record has it; ``QC_TUNED_PARALLEL=record`` keeps the
    record's.  Why: the tuner times each kernel alone, and alone a parallel kernel pays the thread
    pool's wake-up and cold caches that it does not pay between the model's kernels (``qc bench
    --profile``: conv + add kernels 1.7-2.9x slower alone than in the model), so the records favour
    serial kernels the model runs faster in parallel.  Measured 2026-12-06 on the 2-core Zen 5,
    open-nsfw, the libraries alternating in one process: the records' choices (59 of 237 workloads
    >= 40 us serial after ``benchmarks/costmodel_search.py twins``) 2.33 / 2.99 ms at 2 threads,
    every kernel parallel 1.61 / 2.39 ms (two runs), equal at 1 thread."""
    if os.environ.get("QC_TUNED_PARALLEL") == "record" or getattr(cfg, "parallel", True):
        return cfg
    try:
        want = bool(getattr(workload.default_config(), "parallel", False))
    except Exception:  # noqa: BLE001 - no default for this workload: keep the record's
        return cfg
    if not want:
        return cfg
    import dataclasses

    return dataclasses.replace(cfg, parallel=True)


class TunedConfigs:
    def __init__(self, log: str | None, target: dict):
        import tvm

        self.log = log
        self.target = target
        self.best: dict[str, dict] = {}
        self.used: list[dict] = []
        self.predicted: list[dict] = []
        self.skipped: dict = {}
        self._cost_model = False  # not looked up yet
        if log:
            rr = R.read(log, target, tvm.__version__)
            R.refuse_foreign(rr, log, target)  # another device's log: one line, not a silent no-op
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
            cfg = workload.config_from_dict(rec["config"])
        except (TypeError, ValueError):
            return None, None
        return parallel_as_default(workload, cfg), rec

    def summary(self) -> dict:
        return {"log": str(R.log_file(self.log)) if self.log else None, "workloads_in_log": len(self.best),
                "tuned_layers": self.used, "skipped_records": self.skipped,
                "predicted_layers": self.predicted}

    def cost_model(self):
        """The device's cost model, or None (none, disabled, or unusable: warned once)."""
        if self._cost_model is False:
            self._cost_model = None
            try:
                from costmodel.predict import load_for

                cm, _ = load_for(self.target)
                if cm is not None and "cfg" in cm.boosters:
                    self._cost_model = cm
            except Exception as e:  # noqa: BLE001 - a bad model file must not break compilation
                progress.get().warn(f"cost model not used for untuned kernels: {str(e).splitlines()[0]}")
        return self._cost_model


def find_log(spec, tune_log: str | None = None) -> str | None:
    if tune_log is not None:
        return None if str(tune_log).lower() in OFF else str(tune_log)
    env = os.environ.get("QC_TUNE_LOG")
    if env is not None:
        return None if env.lower() in OFF else env
    from .device import describe, device_name

    if spec.kind == "cpu" and describe(spec)["device"] is None:
        return _log_of_arch(spec.arch)
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


def _log_of_arch(arch: str) -> str | None:
    """Compiling for a CPU other than this host's: the first ``autotune_logs/<device>/`` whose
    records are of that LLVM CPU (another machine's tuning of the same core)."""
    import json

    for root in (Path.cwd() / "autotune_logs", REPO_ROOT / "autotune_logs"):
        for p in sorted(root.glob(f"*/{R.FILENAME}")) if root.is_dir() else []:
            try:
                with open(p) as f:
                    t = json.loads(f.readline()).get("target", {})
            except (OSError, ValueError, AttributeError):
                continue
            if t.get("kind") == "cpu" and t.get("arch") == arch:
                return str(p.parent)
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


WORKLOAD_ATTR, CONFIG_ATTR = "qc.workload", "qc.config"


def tag(func, workload, config):
    """The kernel with its workload (record fields) and config as JSON string attributes, so the
    lowered module and the library's TIR say which tuning workload each kernel runs (the cost model
    gives such kernels the config features and the GEMM roofline; see costmodel.data.kernel_tags)."""
    try:
        if config is None:
            config = normalize_config(workload, workload.default_config())
        return func.with_attr(WORKLOAD_ATTR, json.dumps(workload.fields(), sort_keys=True)).with_attr(
            CONFIG_ATTR, config_key(config))
    except Exception:  # noqa: BLE001 - an untaggable kernel is still the right kernel
        return func


def tuned_config(workload):
    """The active log's best config of ``workload``, or None (no log, no record): the row-count
    buckets of a kernel over a symbolic row count take their tile from here
    (``cpu_vnni.dense`` ``bucket_config``), each bucket's workload keyed by its representative rows."""
    tc = _active.get()
    return tc.lookup(workload)[0] if tc is not None else None


def generate(workload, layer: str, make):
    """``make(config_or_None)`` with the tuned config of ``workload`` if the active log has one,
    tagged with the workload and the config it was built with (:func:`tag`).

    A tuned config the generator now rejects falls back to the default config (with a warning);
    errors of the default config propagate as before."""
    tc = _active.get()
    if tc is None:
        return tag(make(None), workload, None)
    cfg, rec = tc.lookup(workload)
    if cfg is None:
        picked = _pick_by_model(tc, workload, layer, make)
        return picked if picked is not None else tag(make(None), workload, None)
    try:
        func = make(cfg)
    except Exception as e:  # noqa: BLE001 - ValueError / KernelUnsupported
        progress.get().warn(f"layer '{layer}': tuned config {config_key(rec['config'])} rejected ({e}); "
                            "using the default config")
        return tag(make(None), workload, None)
    tc.used.append({"layer": layer, "workload_key": workload.key, "config": config_dict(rec["config"]),
                    "median_s": rec["median_s"], "is_default": bool(rec.get("is_default"))})
    return tag(func, workload, cfg)


PICK_MAX = 4096  # configs ranked per kernel (the whole space unless larger; ~1 ms per 100 here)


def candidate_pool(workload, limit: int = PICK_MAX) -> list:
    """The default config, then the rest of the workload's config space (normalized, each kernel
    once); a sample of ``limit - 1`` of the rest, seeded by the workload key, when it is larger."""
    import random
    import zlib

    default = normalize_config(workload, workload.default_config())
    rest = [c for c in distinct_configs(workload, workload.config_space()) if config_key(c) != config_key(default)]
    if len(rest) >= limit:
        rest = random.Random(zlib.crc32(workload.key.encode())).sample(rest, limit - 1)
    return [default] + rest


def pick_order(pred) -> list[int]:
    """Candidates by predicted time, the default (index 0) first unless another is predicted >3% faster."""
    import numpy as np

    order = [int(i) for i in np.argsort(pred, kind="stable")]
    if pred[0] <= pred[order[0]] * 1.03:
        order.remove(0)
        order.insert(0, 0)
    return order


def _pick_by_model(tc: TunedConfigs, workload, layer: str, make):
    """The candidate the cost model predicts fastest, built; None to fall back to the default."""
    cm = tc.cost_model()
    if cm is None:
        return None
    import dataclasses

    try:
        cands = candidate_pool(workload)
    except Exception:  # noqa: BLE001 - no config space: the generator decides
        return None
    pred = cm.predict_configs(workload.fields(), [dataclasses.asdict(c) for c in cands], tc.target)
    order = pick_order(pred)
    for i in order[:4]:
        try:
            func = make(cands[i])
        except Exception:  # noqa: BLE001 - ValueError / KernelUnsupported: next candidate
            continue
        tc.predicted.append({"layer": layer, "workload_key": workload.key, "config": config_dict(cands[i]),
                             "predicted_s": float(pred[i]), "default_predicted_s": float(pred[0]),
                             "is_default": bool(i == 0), "model": cm.path})
        return tag(func, workload, cands[i])
    return None
