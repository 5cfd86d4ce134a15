"""Our pretrained latency model as a MetaSchedule cost model (``ms.cost_model.PyCostModel``).

``ms_cost_model(path)`` returns an object MetaSchedule's search accepts wherever it takes a cost
model (``ms.tune_tir(..., cost_model=...)``, ``TuneContext``-driven search strategies), so a
MetaSchedule search over any kernel starts warm: its first candidates are ordered by what the model
learned on other workloads instead of at random (MetaSchedule's own ``XGBModel`` predicts at random
until it has ``num_warmup_samples`` = 100 measurements).

Score of a candidate (higher = faster, as MetaSchedule expects):

    score = -(log t_model(x) + r(x))

with ``t_model`` the pretrained point estimate from the candidate's scheduled TIR (features of
``features.featurize``: TIR structure, MetaSchedule per-store features, TIR text) and ``r`` an online
correction: once ``refit_after`` candidates of this search are measured, a small XGBoost regressor
fitted on their residuals ``log t_measured - log t_model`` (same features), refitted on every update.
The pretrained part carries knowledge of other workloads, the online part what this one shows.
"""

from __future__ import annotations

import numpy as np

from . import features as F
from .predict import CostModel

ONLINE = dict(n_estimators=40, max_depth=3, learning_rate=0.2, subsample=1.0, colsample_bytree=0.5,
              tree_method="hist", n_jobs=2, random_state=0)


class WarmCostModel:
    """The plain-Python half (no TVM registration): featurize, predict, learn residuals."""

    def __init__(self, model: CostModel, refit_after: int = 8):
        self.model = model
        self.refit_after = refit_after
        self.X: list[np.ndarray] = []
        self.r: list[float] = []
        self.online = None

    def _features(self, funcs) -> np.ndarray:
        samples = [{"target": self.model.target, "text": str(f), "func": f, "workload": None, "config": None}
                   for f in funcs]
        return F.featurize(samples)

    def predict_log(self, funcs) -> np.ndarray:
        X = self._features(funcs)
        mu = np.log(self.model.predict(X)[0])
        if self.online is not None:
            import xgboost as xgb

            mu = mu + self.online.predict(xgb.DMatrix(X[:, self.model.cols]))
        return mu

    def add(self, funcs, seconds) -> None:
        """Fold measured candidates in (failed ones: ``None`` / non-finite seconds are skipped)."""
        keep = [(f, s) for f, s in zip(funcs, seconds) if s is not None and np.isfinite(s) and s > 0]
        if not keep:
            return
        X = self._features([f for f, _ in keep])
        mu = np.log(self.model.predict(X)[0])
        self.X.extend(X)
        self.r.extend(np.log([s for _, s in keep]) - mu)
        if len(self.r) >= self.refit_after:
            import xgboost as xgb

            Xa = np.asarray(self.X)[:, self.model.cols]
            self.online = xgb.XGBRegressor(objective="reg:squarederror", **ONLINE).fit(Xa, np.asarray(self.r)).get_booster()


def _func_of(candidate):
    mod = candidate.sch.mod
    names = [g.name_hint for g in mod.functions.keys()]
    return mod["main" if "main" in names else names[0]]


def ms_cost_model(model, refit_after: int = 8):
    """A ``ms.cost_model.PyCostModel`` backed by ``model``: a loaded :class:`CostModel` or the path
    of a model file (checked as ``CostModel.load`` checks it).  Each call starts a fresh online part."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.cost_model import PyCostModel

    warm = WarmCostModel(model if isinstance(model, CostModel) else CostModel.load(model), refit_after)

    @derived_object
    class QcCostModel(PyCostModel):
        def load(self, p: str) -> None:
            warm.model = CostModel.load(p)

        def save(self, p: str) -> None:
            warm.model.save(p)

        def update(self, context, candidates, results) -> None:
            secs = []
            for res in results:
                run = [float(x) for x in (res.run_secs or [])] if res.error_msg is None else []
                secs.append(float(np.median(run)) if run else None)
            warm.add([_func_of(c) for c in candidates], secs)

        def predict(self, context, candidates) -> np.ndarray:
            if not candidates:
                return np.zeros(0, dtype="float64")
            return (-warm.predict_log([_func_of(c) for c in candidates])).astype("float64")

    out = QcCostModel()
    out.warm = warm  # for inspection (tests, benchmarks)
    return out
