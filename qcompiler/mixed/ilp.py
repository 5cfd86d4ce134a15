"""The bit-allocation ILP of HAWQ-V3 (Eq. 1-4), solved with ``scipy.optimize.milp`` (HiGHS).

TVM-free on purpose (NumPy + SciPy only), so the brute-force equivalence test runs in seconds.

Variables: x[l, c] in {0, 1} for layer l and choice c (e.g. W8A8, W4A8, W8A16); x[l, c] = 0 where
the choice is not available for the layer (no int16 input possible, overflow, ...).

    minimise    sum_{l,c} omega[l, c] x[l, c]                         (sensitivity, Eq. 1)
    subject to  sum_c x[l, c] = 1                               for every layer l
                sum_{l,c} latency[l, c] x[l, c] <= latency budget  (Eq. 2, learned cost model)
                sum_{l,c} size[l, c]    x[l, c] <= size budget     (Eq. 3, weight bytes)
                sum_{l,c} bops[l, c]    x[l, c] <= BOPS budget     (Eq. 4, bit operations)
                x[l, pin(l)] = 1                                   (pins: --pin NODE=8|4|a16)
                sum_{c: key(c) = v} x[l, c] = sum_{c: key(c) = v} x[m, c]
                                                for tied layers l, m and every value v of the key

A tie joins layers that read one tensor: the tensor has one dtype, so their activation bits
(``tie_key``) must be equal.  Budgets are for the variable part only: the caller subtracts what
does not depend on the choice (non-GEMM kernels, per-call overhead).

An infeasible instance raises ``Infeasible`` naming the resource that cannot be met and the
smallest value of it any configuration reaches under the pins and ties (``smallest`` is None when
the pins and ties alone contradict each other).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

RESOURCES = ("latency", "size", "bops")


class Infeasible(Exception):
    """No configuration meets the constraints; ``resource`` is the budget to relax (None: the pins /
    ties alone contradict) and ``smallest`` the least value of it that any configuration reaches."""

    def __init__(self, resource: str | None, smallest: float | None, budget: float | None):
        self.resource, self.smallest, self.budget = resource, smallest, budget
        if resource is None:
            msg = "the pins and ties contradict each other (no configuration satisfies them)"
        else:
            msg = f"{resource} budget {budget:.6g} is below the smallest achievable {smallest:.6g}"
        super().__init__(msg)


@dataclass
class Problem:
    """Arrays are [layers, choices]; ``allowed`` masks the choices a layer can take."""
    omega: np.ndarray
    latency: np.ndarray
    size: np.ndarray
    bops: np.ndarray
    allowed: np.ndarray
    budgets: dict = field(default_factory=dict)      # resource -> budget (absent / None: unconstrained)
    pins: dict = field(default_factory=dict)         # layer index -> choice index
    ties: list = field(default_factory=list)         # tuples of layer indices
    tie_key: tuple = ()                              # per choice: the value that tied layers share

    def __post_init__(self):
        L, C = np.shape(self.omega)
        for a in ("omega", "latency", "size", "bops"):
            v = np.asarray(getattr(self, a), dtype=np.float64)
            if v.shape != (L, C) or not np.all(np.isfinite(v)):
                raise ValueError(f"{a} must be a finite [{L}, {C}] array")
            setattr(self, a, v)
        self.allowed = np.asarray(self.allowed, dtype=bool)
        if self.allowed.shape != (L, C):
            raise ValueError("allowed must be [layers, choices]")
        if not self.tie_key:
            self.tie_key = tuple(range(C))
        if len(self.tie_key) != C:
            raise ValueError("tie_key needs one value per choice")
        for r in self.budgets:
            if r not in RESOURCES:
                raise ValueError(f"unknown resource {r}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.omega.shape

    def resource(self, r: str) -> np.ndarray:
        return getattr(self, r)

    def evaluate(self, choice) -> dict:
        """Objective and resource totals of a choice vector."""
        idx = (np.arange(len(choice)), np.asarray(choice))
        return {"objective": float(self.omega[idx].sum()),
                **{r: float(self.resource(r)[idx].sum()) for r in RESOURCES}}


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]          # per layer: the chosen choice index
    objective: float
    totals: dict                     # resource -> total of the variable part


def _fixed(p: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Variable bounds: 0 where not allowed or another choice is pinned, 1 for the pin."""
    L, C = p.shape
    lb = np.zeros((L, C))
    ub = p.allowed.astype(np.float64).copy()
    for l_, c in p.pins.items():
        ub[l_, :] = 0.0
        ub[l_, c] = 1.0 if p.allowed[l_, c] else 0.0
        lb[l_, c] = ub[l_, c]
        if not p.allowed[l_, c]:
            ub[l_, :] = 0.0  # infeasible: the pinned choice is not available
    return lb.ravel(), ub.ravel()


def _milp(p: Problem, cost: np.ndarray, budgets: dict):
    from scipy.optimize import Bounds, LinearConstraint, milp

    L, C = p.shape
    n = L * C
    rows, lo, hi = [], [], []
    for l_ in range(L):  # one choice per layer
        r = np.zeros(n)
        r[l_ * C:(l_ + 1) * C] = 1.0
        rows.append(r)
        lo.append(1.0)
        hi.append(1.0)
    values = sorted(set(p.tie_key), key=str)
    for group in p.ties:
        g = list(group)
        for m in g[1:]:
            for v in values:
                r = np.zeros(n)
                for c in range(C):
                    if p.tie_key[c] == v:
                        r[g[0] * C + c] += 1.0
                        r[m * C + c] -= 1.0
                rows.append(r)
                lo.append(0.0)
                hi.append(0.0)
    for res, b in budgets.items():
        if b is None:
            continue
        rows.append(p.resource(res).ravel())
        lo.append(-np.inf)
        hi.append(float(b) + 1e-9 * max(1.0, abs(float(b))))
    lb, ub = _fixed(p)
    cons = LinearConstraint(np.array(rows), np.array(lo), np.array(hi))
    return milp(c=cost.ravel(), constraints=cons, integrality=np.ones(n), bounds=Bounds(lb, ub),
                options={"presolve": True, "mip_rel_gap": 0.0})


def _choice(x: np.ndarray, C: int) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argmax(np.asarray(x).reshape(-1, C), axis=1))


def solve(p: Problem) -> Solution:
    """The optimal configuration, or ``Infeasible`` (the budget to relax and its smallest value)."""
    L, C = p.shape
    budgets = {r: b for r, b in p.budgets.items() if b is not None}
    res = _milp(p, p.omega, budgets)
    if res.status == 0 and res.x is not None:
        ch = _choice(res.x, C)
        ev = p.evaluate(ch)
        return Solution(ch, ev["objective"], {r: ev[r] for r in RESOURCES})
    raise _why_infeasible(p, budgets)


def smallest(p: Problem, resource: str, budgets: dict | None = None) -> float | None:
    """The least total of ``resource`` under the pins, ties and ``budgets`` (None: none reaches it)."""
    res = _milp(p, p.resource(resource), budgets or {})
    if res.status != 0 or res.x is None:
        return None
    return p.evaluate(_choice(res.x, p.shape[1]))[resource]


def _why_infeasible(p: Problem, budgets: dict) -> Infeasible:
    if smallest(p, "latency") is None:  # pins / ties alone
        return Infeasible(None, None, None)
    # the first budget that cannot be met even alone, else the last one given the others
    for r, b in budgets.items():
        s = smallest(p, r)
        if s is not None and s > b + 1e-9 * max(1.0, abs(b)):
            return Infeasible(r, s, b)
    names = list(budgets)
    r = names[-1]
    s = smallest(p, r, {k: v for k, v in budgets.items() if k != r})
    return Infeasible(r, s if s is not None else math.nan, budgets[r])


def brute_force(p: Problem) -> Solution | None:
    """Exhaustive search (small instances only): the reference the ILP is tested against."""
    L, C = p.shape
    lb, ub = _fixed(p)
    ub = ub.reshape(L, C)
    options = [[c for c in range(C) if ub[l_, c] > 0] for l_ in range(L)]
    best = None
    budgets = {r: b for r, b in p.budgets.items() if b is not None}
    for ch in itertools.product(*options):
        if any(len({p.tie_key[ch[i]] for i in g}) > 1 for g in p.ties):
            continue
        ev = p.evaluate(ch)
        if any(ev[r] > b + 1e-9 * max(1.0, abs(b)) for r, b in budgets.items()):
            continue
        if best is None or ev["objective"] < best.objective - 1e-12:
            best = Solution(tuple(ch), ev["objective"], {r: ev[r] for r in RESOURCES})
    return best
