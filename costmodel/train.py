"""XGBoost models on log latency: regressor (point), quantile regressor (band), pairwise ranker
(search), and a config-only regressor (compile-time picking without building TIR).  The point and
band boosters learn the residual over a baseline: log t = log base(x) + f(x, log base), with base
the GEMM roofline of the TIR for GEMM kernels with a workload (tuning candidates, tagged compiled
kernels) and, for every other kernel, a linear model c0 + c1 vnni/core + c2 alu/core + c3 rw +
c4 rw/core (rw: bytes read + written by the stores) fitted by NNLS on relative error over those
kernels.  Saved as one JSON document with XGBoost's own JSON
model format embedded (no pickle)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np

from . import FEATURE_SCHEMA, MODEL_SCHEMA
from . import features as F

ALL = ["target", "cfg", "tir", "ms", "text"]
STRUCTURAL = ["target", "cfg", "tir", "ms"]  # the default: text n-grams added nothing in the ablation
CFG = ["target", "cfg"]
PARAMS = dict(n_estimators=200, max_depth=6, learning_rate=0.08, subsample=0.85, colsample_bytree=0.4,
              min_child_weight=1.0, tree_method="hist", max_bin=128, n_jobs=2, random_state=0)
BAND = [0.1, 0.9]


def _xgb():
    import xgboost as xgb

    return xgb


def fit_regressor(X, y, params=None):
    xgb = _xgb()
    return xgb.XGBRegressor(objective="reg:squarederror", **(params or PARAMS)).fit(X, y).get_booster()


def fit_quantile(X, y, params=None):
    xgb = _xgb()
    p = dict(params or PARAMS)
    return xgb.XGBRegressor(objective="reg:quantileerror", quantile_alpha=np.asarray(BAND), **p).fit(X, y).get_booster()


def fit_ranker(X, y, qids, params=None):
    """Pairwise ranker; relevance = how much faster than the query's slowest candidate (log)."""
    xgb = _xgb()
    qids = np.asarray(qids)
    _, q = np.unique(qids, return_inverse=True)
    order = np.argsort(q, kind="stable")
    Xs, ys, qs = X[order], y[order], q[order]
    rel = np.empty_like(ys)
    for g in np.unique(qs):
        m = qs == g
        rel[m] = ys[m].max() - ys[m]
    p = dict(params or PARAMS)
    return xgb.XGBRanker(objective="rank:pairwise", **p).fit(Xs, rel, qid=qs).get_booster()


MAX_HALF_WIDTH = 3.0  # log units: a quantile booster's band is capped at x/÷ 20 around the point


# ---- the point model: a calibrated roofline baseline + a booster on the residual -------------------
BASE_TERMS = ["1", "vnni_per_core", "alu_ops_per_core", "rw_bytes", "rw_bytes_per_core"]


def base_terms(X: np.ndarray) -> np.ndarray:
    """Columns of the baseline's linear model, from the full feature vector: a constant (launch),
    VNNI instructions and other ALU ops per busy core, bytes read + written by the stores (the
    traffic; not the parameters' sizes: a gather reads a few rows of its table) in all and per busy
    core."""
    N = F.NAMES
    c = lambda n: X[:, N.index(n)]  # noqa: E731
    ex = lambda n: np.expm1(np.nan_to_num(c(n)))  # noqa: E731 - the TIR family holds log1p counts
    busy = np.clip(np.nan_to_num(c("x_par_extent")), 1.0, np.maximum(1.0, np.nan_to_num(c("t_units"))))
    alu = sum(ex(f"x_log_dyn_{k}") for k in ("mul", "add", "shift", "cast", "minmax", "select", "div", "cmp"))
    rw = ex("x_log_bytes_written") + ex("x_log_bytes_read")
    return np.stack([np.ones(len(X)), ex("x_log_dyn_vnni") / busy, alu / busy, rw, rw / busy], 1)


def _is_gemm(X: np.ndarray) -> np.ndarray:
    return ~np.isnan(X[:, F.NAMES.index("c_roof_log_s")])


def fit_base(X: np.ndarray, y: np.ndarray) -> list[float]:
    """Non-negative seconds per term (SciPy NNLS on relative error: rows weighted by 1/latency),
    fitted on the kernels the linear model serves (those without a GEMM workload; all when none)."""
    from scipy.optimize import nnls

    other = ~_is_gemm(X)
    if other.any():
        X, y = X[other], y[other]
    A, t = base_terms(X), np.exp(y)
    w = 1.0 / t
    coef, _ = nnls(A * w[:, None], t * w)
    return [float(v) for v in coef]


def base_log(X: np.ndarray, coef) -> np.ndarray:
    """log seconds of the baseline: the GEMM roofline read from the TIR (``x_roof_log_s``) for a
    GEMM kernel with a workload (a tuning candidate or a tagged compiled kernel), the fitted linear
    model for any other kernel."""
    lin = np.log(base_terms(X) @ np.asarray(coef, dtype=np.float64) + 1e-9)
    return np.where(_is_gemm(X), X[:, F.NAMES.index("x_roof_log_s")], lin)


def _with_base(X, cols, b):
    return np.concatenate([X[:, cols], b[:, None]], axis=1)


def fit_point(X, y, cols, params=None, quantile: bool = True) -> dict:
    """{"base": coef, "reg": booster, "q": booster | None} on the full feature matrix ``X``: the
    boosters learn log(latency) - baseline from the ``cols`` features plus the baseline itself (a
    tree cannot extrapolate; the baseline carries the scale to shapes larger than any seen)."""
    coef = fit_base(X, y)
    b = base_log(X, coef)
    Xb = _with_base(X, cols, b)
    return {"base": coef, "reg": fit_regressor(Xb, y - b, params),
            "q": fit_quantile(Xb, y - b, params) if quantile else None}


def predict_point(pm: dict, X, cols) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(mu, q_lo, q_hi) in log seconds (quantiles None without a quantile booster)."""
    import xgboost as xgb

    b = base_log(X, pm["base"])
    d = xgb.DMatrix(_with_base(X, cols, b))
    mu = pm["reg"].predict(d) + b
    if pm.get("q") is None:
        return mu, None, None
    q = pm["q"].predict(d).reshape(len(mu), -1)
    return mu, q[:, 0] + b, q[:, -1] + b


def band_scale(X, y, groups, cols, params=None, k: int = 3, coverage: float = BAND[1] - BAND[0]) -> float:
    """Conformal margin of the quantile band (log units): the ``c`` such that ``coverage`` of the
    out-of-fold samples (group k-fold on the training data) fall in the band widened by ``c`` on
    each side.  Quantile boosters are over-confident on unseen workloads; this makes the band honest."""
    from .evaluate import group_folds

    need = []
    folds = group_folds(list(groups), k)
    if len(folds) < 2:
        return 0.0
    for test in folds:
        tr = np.setdiff1d(np.arange(len(y)), test)
        mu, qlo, qhi = predict_point(fit_point(X[tr], y[tr], cols, params), X[test], cols)
        lo, hi = widen(mu, qlo, qhi, 0.0)
        yt = y[test]
        need.extend(np.maximum(np.maximum(lo - yt, yt - hi), 0.0))
    return float(np.quantile(need, coverage))


def widen(mu, lo, hi, margin: float):
    """The band in log units: the quantiles around the point (capped at MAX_HALF_WIDTH) widened by
    :func:`band_scale`'s margin on each side."""
    lo = np.clip(np.minimum(lo, mu), mu - MAX_HALF_WIDTH, mu)
    hi = np.clip(np.maximum(hi, mu), mu, mu + MAX_HALF_WIDTH)
    return lo - margin, hi + margin


def booster_json(b) -> dict:
    return json.loads(bytes(b.save_raw(raw_format="json")).decode())


def booster_from_json(obj: dict):
    xgb = _xgb()
    b = xgb.Booster()
    b.load_model(bytearray(json.dumps(obj).encode()))
    return b


def train(samples: list[dict], X: np.ndarray, y: np.ndarray, families=None, target: dict | None = None,
          calibration: dict | None = None, params=None, calibrate_band: bool = True) -> dict:
    """Fit every booster; returns the model document (see the package docstring)."""
    from .data import target_of

    families = list(families or STRUCTURAL)
    cols = F.columns(families)
    Xc = X[:, cols]
    tune = np.asarray([s["source"] == "tune" for s in samples])
    qids = [s["query"] for s in samples]
    pm = fit_point(X, y, cols, params)
    boosters = {"reg": booster_json(pm["reg"]), "q": booster_json(pm["q"])}
    if tune.sum() >= 4:
        boosters["rank"] = booster_json(fit_ranker(Xc[tune], y[tune], np.asarray(qids)[tune], params))
        cc = F.columns(CFG)
        boosters["cfg"] = booster_json(fit_regressor(X[tune][:, cc], y[tune], params))
    import xgboost

    return {"schema": MODEL_SCHEMA, "feature_schema": FEATURE_SCHEMA, "features": F.schema(), "families": families,
            "target": target or target_of(samples),
            "trained": {"samples": len(samples), "tuning_samples": int(tune.sum()),
                        "backends": sorted({s_["workload"]["backend"] for s_ in samples
                                            if isinstance(s_.get("workload"), dict) and s_["workload"].get("backend")}),
                        "profile_samples": int((~tune).sum()), "workloads": len({s["group"] for s in samples}),
                        "xgboost": xgboost.__version__, "params": {k: v for k, v in (params or PARAMS).items()},
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
            "baseline": {"terms": BASE_TERMS, "coef_s": pm["base"]},
            "band": {"quantiles": BAND, "margin_log": band_scale(X, y, [s_["group"] for s_ in samples], cols, params)
                     if calibrate_band else 0.0}, "calibration": calibration or {"per_call_ms": 0.0},
            "boosters": boosters}


def save(doc: dict, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, p)
    except BaseException:  # an error or Ctrl-C / SIGTERM (qcompiler/cli.py) mid-write: no partial file
        tmp.unlink(missing_ok=True)
        raise
    return p


def train_from_logs(src, out, families=None, with_ms: bool = True) -> dict:
    from . import data as D

    samples, mrecs = D.samples_from(src)
    if len(samples) < 8:
        raise D.DataError(f"{src}: {len(samples)} usable sample(s); need at least 8 measured kernels to train")
    X, y = D.matrix(samples, with_ms=with_ms)
    doc = train(samples, X, y, families, calibration=D.fit_overhead(mrecs))
    save(doc, out)
    return doc
