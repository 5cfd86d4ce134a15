"""Command line of mixed precision: the ``qc compile`` flags and ``qc mixed-precision pareto``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .plan import MixedOptions, PlanError


def add_compile_flags(c) -> None:
    c.add_argument("--pin", action="append", default=[], metavar="NODE=8|4|a16",
                   help="fix a conv/dense layer: 8 (W8A8), 4 (W4A8) or a16 (W8A16); repeatable")
    c.add_argument("--latency-budget", type=float, default=None, metavar="FRACTION",
                   help="--precision mixed: predicted latency <= FRACTION x all-INT8 (default 1.0)")
    c.add_argument("--latency-budget-ms", type=float, default=None, metavar="MS",
                   help="--precision mixed: predicted latency <= MS milliseconds")
    c.add_argument("--size-budget", default=None, metavar="MB|FRACTION",
                   help="--precision mixed: conv/dense weight bytes <= this (12MB, 800KB, or a fraction of all-INT8)")
    c.add_argument("--bops-budget", type=float, default=None, metavar="FRACTION",
                   help="--precision mixed: bit operations <= FRACTION x all-INT8")
    c.add_argument("--rounding", default="auto", choices=["auto", "gptq", "rtn"],
                   help="weight rounding: auto (default: GPTQ, error feedback with the layer Hessian, for 4-bit "
                        "weights; round to nearest for 8-bit), gptq (GPTQ for 8-bit weights too), rtn (round to nearest)")
    c.add_argument("--mp-samples", type=int, default=16, metavar="N",
                   help="calibration samples for the Hessians and the sensitivity (default 16)")


def mixed_options(a) -> MixedOptions | None:
    budgets = {"--latency-budget": a.latency_budget, "--latency-budget-ms": a.latency_budget_ms,
               "--size-budget": a.size_budget, "--bops-budget": a.bops_budget}
    given = [k for k, v in budgets.items() if v is not None]
    if given and getattr(a, "precision", "mixed") != "mixed":
        raise PlanError(f"{given[0]} applies to --precision mixed (this compile is --precision {a.precision})")
    if a.latency_budget is not None and a.latency_budget_ms is not None:
        raise PlanError("give --latency-budget (a fraction of all-INT8) or --latency-budget-ms, not both")
    for k in ("--latency-budget", "--latency-budget-ms", "--bops-budget"):
        v = budgets[k]
        if v is not None and not (math.isfinite(v) and v > 0):
            raise PlanError(f"{k} {v}: give a positive number")
    if a.mp_samples < 1:
        raise PlanError(f"--mp-samples {a.mp_samples}: give a positive number of samples")
    return MixedOptions(pins=tuple(a.pin), latency_budget=a.latency_budget, latency_budget_ms=a.latency_budget_ms,
                        size_budget=a.size_budget, bops_budget=a.bops_budget, rounding=a.rounding,
                        samples=a.mp_samples)


def precision_summary(meta: dict) -> str:
    """', 3 W4A8 + 2 W8A16 layers, 1.2 MB weights' style text for the compile line."""
    layers = meta.get("layers", [])
    w4 = sum(1 for r in layers if r.get("weight_bits") == 4)
    a16 = sum(1 for r in layers if r.get("act_bits") == 16 and r.get("weight_bits"))
    parts = []
    if w4:
        parts.append(f"{w4} W4A8")
    if a16:
        parts.append(f"{a16} W8A16")
    mp = meta.get("mixed_precision") or {}
    pred = f", predicted {mp['predicted_ms']:.3g} ms of INT8 {mp['int8_predicted_ms']:.3g}" if "predicted_ms" in mp else ""
    txt = f"precision {meta.get('precision')}" + (f" ({' + '.join(parts)})" if parts else "")
    return f"{txt}, {meta.get('weight_bytes', 0) / 1e6:.3g} MB weights{pred}, "


def add_parsers(sub) -> None:
    mp = sub.add_parser("mixed-precision", help="mixed-precision analysis (sensitivity / latency frontier)")
    ms = mp.add_subparsers(dest="mp_cmd", required=True)
    p = ms.add_parser("pareto", help="the frontier of sensitivity / FP32 agreement vs predicted latency and size")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--calib", required=True, help="as in qc compile")
    p.add_argument("--eval", default=None, help="held-out samples to score the points on (default: the calibration samples)")
    p.add_argument("--target", default="cpu")
    p.add_argument("--arch", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--points", type=int, default=8, help="ILP budgets on the frontier (default 8)")
    p.add_argument("--axis", default="latency", choices=["latency", "size"],
                   help="the budget swept: predicted latency (default) or weight bytes")
    p.add_argument("--random", type=int, default=5, help="random configurations per budget (baseline, default 5)")
    p.add_argument("--rounding", default="auto", choices=["auto", "gptq", "rtn"])
    p.add_argument("--mp-samples", type=int, default=16)
    p.add_argument("--measure", action="store_true", help="also compile and time every frontier point")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    p.add_argument("--json", action="store_true")


def run(a) -> int:
    import numpy as np

    from qcompiler.driver import CompileOptions
    from qcompiler.errors import InputError
    from qcompiler.targets import parse_target

    from . import pareto as P

    if a.plot and not str(a.plot).endswith(".png"):
        raise InputError(f"{a.plot}: --plot writes a .png file")
    if a.points < 2 or a.random < 0 or a.mp_samples < 1:
        raise InputError("--points >= 2, --random >= 0 and --mp-samples >= 1, please")
    spec = parse_target(a.target, a.arch)
    mo = MixedOptions(rounding=a.rounding, samples=a.mp_samples)
    opts = CompileOptions(target=spec, batch=a.batch, mixed=mo)
    ctx = P.setup(a.model, a.calib, opts, a.eval, mo)
    pts = [P.evaluate(ctx, P.uniform(ctx, P.W8), "all-int8", None),
           P.evaluate(ctx, P.uniform(ctx, P.W4), "all-w4a8", None)]
    front = P.frontier(ctx, a.points, axis=a.axis)
    pts += front
    rng = np.random.default_rng(0)
    for f in front:
        b = f["budget"]
        rv = P.greedy(ctx, b, reverse=True, axis=a.axis)
        if rv is not None:
            pts.append(P.evaluate(ctx, rv, "reversed-sensitivity", b))
        for ch in P.random_configs(ctx, b, a.random, rng, axis=a.axis):
            pts.append(P.evaluate(ctx, ch, "random", b))
    if a.measure:
        _measure(a, ctx, [p for p in pts if p["kind"] in ("ilp", "all-int8", "all-w4a8") and not p.get("duplicate")],
                 opts)
    res = {"model": str(a.model), "target": spec.describe(), "axis": a.axis, "latency_source": ctx.lat.source,
           "int8_predicted_ms": ctx.lat.int8_total_ms, "sensitivity_samples": ctx.sens.samples,
           "evaluated_on": "eval samples" if a.eval else "calibration samples",
           "evaluator": ctx.sens.evaluator, "points": pts}
    if a.plot:
        plot(res, a.plot)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{a.model}: all-INT8 predicted {ctx.lat.int8_total_ms:.4g} ms ({ctx.lat.source}); "
          f"D = divergence from FP32 on the {res['evaluated_on']}")
    print(f"  {'kind':<22} {'budget':>8} {'pred ms':>9} {'frac':>6} {'MB':>8} {'sum Omega':>11} {'D fp32':>10} "
          f"{'top-1':>6}  W4A8/W8A16/W16A8")
    for p in pts:
        t1 = "-" if p["top1_agreement"] is None else f"{p['top1_agreement']:.3f}"
        b = "-" if p["budget"] is None else f"{p['budget']:.4g}"
        print(f"  {p['kind']:<22} {b:>8} {p['predicted_ms']:>9.4g} {p['predicted_fraction']:>6.3f} "
              f"{p['weight_bytes'] / 1e6:>8.4g} {p['omega_sum']:>11.4g} {p['d_fp32']:>10.4g} {t1:>6}  "
              f"{p['counts']['w4a8']}/{p['counts']['w8a16']}/{p['counts'].get('w16a8', 0)}" + (f"  measured {p['measured_ms']:.4g} ms"
                                                                 if "measured_ms" in p else ""))
    return 0


def _measure(a, ctx, pts, opts) -> None:
    import tempfile
    from dataclasses import replace

    from qcompiler.driver import compile_model
    from qcompiler.runtime import Library

    with tempfile.TemporaryDirectory() as d:
        for i, p in enumerate(pts):
            pin = {"w4a8": "4", "w8a16": "a16", "w16a8": "16"}
            pins = tuple(f"{m}={pin[c]}" for m, c in zip(ctx.names, p["choice"]) if c != "w8a8")
            o = replace(opts, precision="int8", mixed=replace(ctx.mo, pins=pins))
            out = Path(d) / f"p{i}.so"
            compile_model(a.model, out, a.calib, o)
            r = Library(str(out)).bench(None, repeats=30)
            p["measured_ms"] = r["median_ms"]


def plot(res: dict, path: str) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qcompiler.artifact import atomic_paths, check_writable

    out = check_writable(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"ilp": ("C0", "o", "ILP (HAWQ-V3)"), "random": ("0.6", ".", "random, same budget"),
             "reversed-sensitivity": ("C3", "v", "reversed sensitivity"), "all-int8": ("k", "s", "all-INT8"),
             "all-w4a8": ("C2", "D", "all-W4A8")}
    for ax, xkey, xl in ((axes[0], "predicted_ms", "predicted latency (ms)"), (axes[1], "weight_bytes", "weight bytes")):
        for kind, (col, mk, lab) in style.items():
            ps = [p for p in res["points"] if p["kind"] == kind]
            if not ps:
                continue
            xs = [p[xkey] for p in ps]
            ys = [max(p["d_fp32"], 1e-9) for p in ps]
            ax.scatter(xs, ys, c=col, marker=mk, label=lab, s=28 if kind != "random" else 10, zorder=3)
            if kind == "ilp":
                order = np.argsort(xs)
                ax.plot(np.array(xs)[order], np.array(ys)[order], c=col, lw=1)
        ms = [p for p in res["points"] if "measured_ms" in p]
        if ms and xkey == "predicted_ms":
            ax.scatter([p["measured_ms"] for p in ms], [max(p["d_fp32"], 1e-9) for p in ms], c="C1", marker="x",
                       label="measured latency")
        ax.set_xlabel(xl)
        ax.set_ylabel("divergence from FP32")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{Path(res['model']).name}: mixed precision frontier ({res['latency_source']})", fontsize=9)
    fig.tight_layout()
    with atomic_paths(out) as (tmp,):
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)

