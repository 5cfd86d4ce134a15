"""The sensitivity / latency / size frontier of a model and its baselines (``qc mixed-precision
pareto``, ``benchmarks/mixed_precision.py``).

Points are per-layer choice vectors (indices into ``plan.CHOICES``).  Each is scored with the
predicted latency (``latency.py``), the weight bytes, sum Omega (``sensitivity.py``) and, measured
by the integer reference executor on the evaluation samples, the divergence from FP32 and the top-1
agreement with FP32.  Baselines: all-INT8, all-W4A8, random configurations meeting the same latency
budget, and the reversed-sensitivity order (the most sensitive layers go to 4 bits first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import ilp
from .plan import CHOICES, TIE_KEY, MixedOptions, build_problem, find_ties, fp32_outputs, gemm_layers, \
    sensitivity_for

W8, W4, A16 = 0, 1, 2


@dataclass
class Context:
    state: object
    names: list
    ties: list
    sens: object
    lat: object
    mo: MixedOptions
    ev: object            # calibration evaluator (Hessians, sensitivity)
    ev_eval: object       # evaluation evaluator (the points' measured divergence / agreement)
    cache: dict = field(default_factory=dict)

    def problem(self, **budgets) -> ilp.Problem:
        p = build_problem(self.ev.ig8, self.names, self.sens, self.lat, self.ties, {}, self.mo)
        p.budgets = {k: v for k, v in budgets.items() if v is not None}
        return p


def setup(model_path, calib, opts, eval_data=None, mo: MixedOptions | None = None, use_cache: bool = True) -> Context:
    """Prepare the model (all-INT8), measure (or load) the sensitivities, predict the latencies."""
    from dataclasses import replace

    from qcompiler import calibrate, frontend
    from qcompiler.driver import prepare

    from .latency import predict_layers
    from .sensitivity import Evaluator

    mo = mo or opts.mixed or MixedOptions()
    prep = prepare(model_path, calib, replace(opts, precision="int8", mixed=MixedOptions(rounding=mo.rounding)))
    st = prep.state
    layers = gemm_layers(st.fg)
    names = [n.name for n in layers]
    ties = find_ties(st.fg, layers)
    n_s = max(1, min(mo.samples, st.data.n))
    feeds = [st.data.feeds(s) for s in range(0, n_s, st.data.batch)]
    cfg = replace(st.cfg, rounding=mo.rounding)
    ev = Evaluator(st.fg, st.stats, st.nonneg, cfg, st.fr.model, feeds,
                   fp32_outputs(st.fr.model, feeds, list(st.fg.outputs)), hessians=cfg.hessians)
    sens, _ = sensitivity_for(ev, names, ties, model_path, feeds, cfg, mo, use_cache)
    if eval_data is not None:
        specs = frontend.input_specs(frontend.upgrade(frontend.read_model(model_path), str(model_path)))
        ed = calibrate.calibration_set(calibrate.load_calibration(eval_data) if not isinstance(eval_data, dict)
                                       else eval_data, specs, st.data.batch)
        efeeds = [ed.feeds(s) for s in range(0, ed.n - ed.n % ed.batch or ed.n, ed.batch)]
        ev_eval = Evaluator(st.fg, st.stats, st.nonneg, cfg, st.fr.model, efeeds,
                            fp32_outputs(st.fr.model, efeeds, list(st.fg.outputs)), hessians=ev.hessians)
    else:
        ev_eval = ev
    lat = predict_layers(ev.ig8, opts.target, opts.tune_log, mo.cost_model, src=ev, fuse=opts.fuse_epilogue)
    return Context(st, names, ties, sens, lat, mo, ev, ev_eval)


def plan_of(ctx: Context, choice) -> tuple:
    keys = list(CHOICES)
    return tuple((m, *CHOICES[keys[c]]) for m, c in zip(ctx.names, choice) if c != W8)


def evaluate(ctx: Context, choice, kind: str, budget: float | None = None, ev=None) -> dict:
    """One point: predicted latency, weight bytes, sum Omega, measured divergence / agreement."""
    ev = ev or ctx.ev_eval
    choice = tuple(int(c) for c in choice)
    key = (id(ev), choice)
    if key not in ctx.cache:
        outs = ev.run(ev.quantize(plan_of(ctx, choice)))
        ctx.cache[key] = {"d_fp32": ev.d_fp32(outs), "d_int8": ev.d_int8(outs), "agreement": ev.agreement(outs)}
    m = ctx.cache[key]
    p = ctx.problem()
    ev_tot = p.evaluate(choice)
    keys = list(CHOICES)
    return {"kind": kind, "budget": budget, "predicted_ms": ctx.lat.total(choice),
            "predicted_fraction": ctx.lat.total(choice) / ctx.lat.int8_total_ms,
            "weight_bytes": ev_tot["size"], "bops": ev_tot["bops"],
            "omega_sum": ev_tot["objective"],
            "omega_int8_sum": float(ctx.sens.omega_int8[np.arange(len(choice)), list(choice)].sum()),
            "d_fp32": m["d_fp32"], "d_fp32_int8": ev.d8_fp32, "d_int8": m["d_int8"], "top1_agreement": m["agreement"],
            "counts": {k: int(sum(1 for c in choice if c == i)) for i, k in enumerate(keys)},
            "choice": [keys[c] for c in choice]}


def uniform(ctx: Context, c: int) -> tuple | None:
    """Every layer at choice ``c`` where available (else W8A8); ties respected."""
    ch = [c if ctx.sens.available[i, c] else W8 for i in range(len(ctx.names))]
    return _fix_ties(ctx, ch)


def _fix_ties(ctx: Context, ch: list) -> tuple:
    for g in ctx.ties:
        keys = {TIE_KEY[ch[i]] for i in g}
        if len(keys) > 1:  # mixed activation bits in a group: drop the 16-bit ones
            for i in g:
                if TIE_KEY[ch[i]] > 8:
                    ch[i] = W8
    return tuple(ch)


def ilp_point(ctx: Context, latency_ms: float | None = None, size: float | None = None) -> tuple | None:
    p = ctx.problem(latency=None if latency_ms is None else latency_ms - ctx.lat.const_ms, size=size)
    try:
        return ilp.solve(p).choice
    except ilp.Infeasible:
        return None


def total(ctx: Context, ch, axis: str = "latency") -> float:
    """Predicted ms (``latency``) or weight bytes (``size``) of a configuration."""
    if axis == "latency":
        return ctx.lat.total(ch)
    return ctx.problem().evaluate(ch)["size"]


def greedy(ctx: Context, budget: float, reverse: bool, axis: str = "latency") -> tuple | None:
    """Layers to W4A8 in order of Omega (``reverse``: most sensitive first) until the budget holds."""
    om = ctx.sens.omega_int8[:, W4]
    order = np.argsort(-om if reverse else om, kind="stable")
    ch = [W8] * len(ctx.names)
    cost = ctx.lat.ms if axis == "latency" else ctx.problem().size
    for i in order:
        if total(ctx, ch, axis) <= budget:
            break
        if ctx.sens.available[i, W4] and cost[i, W4] < cost[i, W8]:
            ch[i] = W4
    return tuple(ch) if total(ctx, ch, axis) <= budget * (1 + 1e-9) else None


def random_configs(ctx: Context, budget: float, k: int, rng: np.random.Generator,
                   a16: float = 0.1, tries: int = 4000, axis: str = "latency") -> list[tuple]:
    """``k`` random configurations within the budget (W4A8 with a random per-config rate, W8A16
    with probability ``a16`` where available), ties respected."""
    out = []
    L = len(ctx.names)
    for _ in range(tries):
        if len(out) >= k:
            break
        p4 = rng.uniform(0, 1)
        ch = []
        for i in range(L):
            u = rng.random()
            if u < a16 and ctx.sens.available[i, A16]:
                ch.append(A16)
            elif rng.random() < p4 and ctx.sens.available[i, W4]:
                ch.append(W4)
            else:
                ch.append(W8)
        ch = _fix_ties(ctx, ch)
        if total(ctx, ch, axis) <= budget:
            out.append(ch)
    return out


def frontier(ctx: Context, points: int = 8, hi: float = 1.1, axis: str = "latency") -> list[dict]:
    """ILP optimum at ``points`` budgets from the smallest achievable to ``hi`` x all-INT8, of the
    predicted latency (``axis`` latency) or the weight bytes (``size``, no latency budget)."""
    p = ctx.problem()
    if axis == "latency":
        lo = (ilp.smallest(p, "latency") or 0.0) + ctx.lat.const_ms
        top = hi * ctx.lat.int8_total_ms
    else:
        lo, top = ilp.smallest(p, "size") or 0.0, float(p.size[:, 0].sum())
    out, seen = [], set()
    for b in np.linspace(lo, max(top, lo), points):
        ch = ilp_point(ctx, float(b)) if axis == "latency" else ilp_point(ctx, None, float(b))
        if ch is None:
            continue
        pt = evaluate(ctx, ch, "ilp", float(b))
        pt["duplicate"] = ch in seen
        seen.add(ch)
        out.append(pt)
    return out
