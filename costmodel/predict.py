"""Load a cost model file, predict kernel latency with a band, roofline fallback.

``CostModel`` keeps MetaSchedule's small cost-model interface (``load``, ``save``, ``update``,
``predict``) so a tuner can call it without knowing which model is behind it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from . import FEATURE_SCHEMA, MODEL_SCHEMA
from . import features as F

try:  # the CLI turns QCError into one line and exit code 2
    from qcompiler.errors import QCError
except ImportError:  # costmodel used without qcompiler
    class QCError(Exception):  # type: ignore[no-redef]
        exit_code = 2


class CostModelError(QCError):
    """A cost model file that is missing, unreadable, of another schema version or another target."""


REPO_ROOT = Path(__file__).resolve().parents[1]
UNLEARNED_LEGACY = {"cpu_amx"}  # backends no model without a "trained.backends" list has seen


def analytic_seconds(workload: dict, config: dict | None, target: dict) -> float | None:
    """A kernel model's estimate for a GEMM backend the cost model never learned (None: no model for
    it): AMX, ``cpu_amx.block_cycles`` of its config at the target's nominal clock."""
    if workload.get("backend") != "cpu_amx":
        return None
    from qcompiler.kernels import cpu_amx

    M, N, K = F.gemm_mnk(workload)
    cfg = cpu_amx.AmxConfig(**{k: v for k, v in (config or {}).items() if k in cpu_amx.AmxConfig.__dataclass_fields__}) \
        if config else cpu_amx.default_config(M, N, K)
    t = F.target_info(target)
    units = t["units"] if cfg.parallel else 1
    cycles = cpu_amx.block_cycles(M, N, K, cfg.mr, cfg.nr, units=units)
    shape = workload.get("shape") or []
    if workload.get("kind") == "conv2d" and len(shape) == 7 and shape[5] * shape[6] > 1:
        cycles += M * shape[5] * shape[6] * 10 / units   # the im2col copy: ~10 cycles per row and tap
    return cycles / (t["clock_ghz"] * 1e9) + t["launch_s"]


def same_target(a: dict, b: dict) -> bool:
    """Same kind and arch, and for a CPU the same device key (LLVM CPU, ISA class, cores:
    qcompiler/tune/device.py) when both name one (a CPU target other than the compiling host's has
    none: any machine of that arch)."""
    if a.get("kind") == "cpu" and a.get("device") and b.get("device"):
        from qcompiler.tune.records import target_matches

        return target_matches(a, b)
    return all(a.get(k) == b.get(k) for k in ("kind", "arch"))


def find_model(device: str) -> Path | None:
    """``costmodels/<device>.json`` under the current directory or the repository root."""
    for root in (Path.cwd() / "costmodels", REPO_ROOT / "costmodels"):
        p = root / f"{device}.json"
        if p.is_file():
            return p
    return None


def _model_of_arch(arch: str | None) -> Path | None:
    """A CPU other than the compiling host's: the first ``costmodels/*.json`` trained for that arch."""
    for root in (Path.cwd() / "costmodels", REPO_ROOT / "costmodels"):
        for p in sorted(root.glob("*.json")) if root.is_dir() else []:
            try:
                t = json.loads(p.read_text()).get("target", {})
            except (OSError, ValueError, AttributeError):
                continue
            if t.get("kind") == "cpu" and t.get("arch") == arch:
                return p
    return None


class CostModel:
    def __init__(self, doc: dict, path: str | None = None):
        from .train import booster_from_json

        self.doc = doc
        self.path = path
        self.target = doc["target"]
        self.families = doc["families"]
        self.cols = F.columns(self.families)
        self.boosters = {k: booster_from_json(v) for k, v in doc["boosters"].items()}
        self.per_call_ms = float(doc.get("calibration", {}).get("per_call_ms", 0.0))
        # the GEMM backends whose kernels the model learned (models trained before the list was
        # recorded never saw the AMX kernels, which came later)
        self.backends = set(doc.get("trained", {}).get("backends") or ()) or None
        self.band_margin = float(doc.get("band", {}).get("margin_log", 0.0))

    def knows(self, backend: str | None) -> bool:
        """Whether the model learned kernels of this GEMM backend (None: a non-GEMM kernel, always)."""
        if backend is None:
            return True
        return backend in self.backends if self.backends is not None else backend not in UNLEARNED_LEGACY

    # ---- MetaSchedule-style interface ---------------------------------------------------------
    @classmethod
    def load(cls, path, target: dict | None = None) -> CostModel:
        p = Path(path)
        if not p.is_file():
            raise CostModelError(f"{p}: no such cost model file (train one with `qc costmodel train LOG -o {p}`)")
        try:
            doc = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CostModelError(f"{p}: not a cost model file (invalid JSON: {e.__class__.__name__})") from None
        if not isinstance(doc, dict) or "schema" not in doc:
            raise CostModelError(f"{p}: not a cost model file (no 'schema' key)")
        if doc["schema"] != MODEL_SCHEMA:
            raise CostModelError(f"{p}: cost model schema '{doc['schema']}' is not the supported '{MODEL_SCHEMA}'; "
                                 "retrain it with `qc costmodel train`")
        if doc.get("feature_schema") != FEATURE_SCHEMA:
            raise CostModelError(f"{p}: feature schema '{doc.get('feature_schema')}' is not this version's "
                                 f"'{FEATURE_SCHEMA}'; retrain it with `qc costmodel train`")
        if target is not None and not same_target(doc.get("target", {}), target):
            t = doc.get("target", {})
            raise CostModelError(f"{p}: trained for {t.get('kind')} {t.get('arch')} ({t.get('device')}), not for "
                                 f"{target.get('kind')} {target.get('arch')} ({target.get('device')}); use the "
                                 "model of this device or none (roofline estimate)")
        try:
            return cls(doc, str(p))
        except Exception as e:  # noqa: BLE001 - a corrupt booster
            raise CostModelError(f"{p}: the model's boosters cannot be loaded ({e.__class__.__name__})") from None

    def save(self, path) -> None:
        from .train import save

        save(self.doc, path)

    def update(self, samples: list[dict]) -> None:
        """Retrain on ``samples`` (data.samples_from format) with the same families."""
        from . import data as D
        from .train import train

        X, y = D.matrix(samples)
        self.__init__(train(samples, X, y, self.families, self.target, self.doc.get("calibration")), self.path)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seconds, band low, band high) for rows of the full feature vector."""
        from .train import predict_point, widen

        pm = {"base": self.doc["baseline"]["coef_s"], "reg": self.boosters["reg"], "q": self.boosters["q"]}
        mu, qlo, qhi = predict_point(pm, np.asarray(X, dtype=np.float64), self.cols)
        lo, hi = widen(mu, qlo, qhi, self.band_margin)
        return np.exp(mu), np.exp(lo), np.exp(hi)

    def score(self, X: np.ndarray) -> np.ndarray:
        """Ranking score (higher = faster) of candidates of one workload."""
        import xgboost as xgb

        if "rank" in self.boosters:
            return self.boosters["rank"].predict(xgb.DMatrix(np.asarray(X, dtype=np.float64)[:, self.cols]))
        return -np.log(self.predict(X)[0])

    def predict_configs(self, workload: dict, configs: list[dict], target: dict | None = None) -> np.ndarray:
        """Seconds of ``configs`` (dicts of a config's fields) of one GEMM workload (its record
        fields) on ``target`` (default: the model's), from the config-only booster: no TIR is built."""
        X = np.stack([F.cfg_only(workload, c, target or self.target) for c in configs])
        return self.predict_cfg(X)

    def predict_cfg(self, Xcfg: np.ndarray) -> np.ndarray:
        """Seconds from the target + cfg features only (no TIR needed)."""
        import xgboost as xgb

        b = self.boosters.get("cfg")
        if b is None:
            raise CostModelError(f"{self.path}: this model has no config-only booster")
        return np.exp(b.predict(xgb.DMatrix(np.asarray(Xcfg, dtype=np.float64))))


def roofline_samples(samples: list[dict]) -> np.ndarray:
    """Roofline seconds per sample: the GEMM formula for tuning samples, the TIR analysis otherwise."""
    out = []
    for s in samples:
        if s.get("workload") is not None:
            out.append(F.roofline_gemm(s["workload"], s["target"])[0])
        else:
            out.append(F.roofline_text(F.analyze_text(s["text"]), s["target"]))
    return np.asarray(out)


def load_for(target: dict, path=None) -> tuple[CostModel | None, str]:
    """The model for a target: an explicit path (checked: another target is an error), else
    ``costmodels/<device>.json`` if present (None + a reason otherwise)."""
    if path is not None:
        return CostModel.load(path, target), str(path)
    env = os.environ.get("QC_COSTMODEL")
    if env is not None and env.lower() in ("off", "none", "0", ""):
        return None, "disabled by QC_COSTMODEL"
    if env:
        return CostModel.load(env, target), env
    p = find_model(target.get("device") or target.get("arch") or "")
    if p is None and target.get("kind") == "cpu" and not target.get("device"):
        p = _model_of_arch(target.get("arch"))
    if p is None:
        return None, f"no cost model for {target.get('kind')} {target.get('arch')} ({target.get('device')})"
    return CostModel.load(p, target), str(p)


def finite_or_none(v):
    return None if v is None or not math.isfinite(v) else float(v)
