"""Evaluate the learned cost model on this machine's records (CPU), against the anchors.

    .venv/bin/python benchmarks/costmodel_eval.py [--log autotune_logs/<device>/] [--skip noise,table,ms,lomo,whole]

Writes ``benchmarks/results/costmodel_cpu_<device>.json`` (``--log``: the device log, default this
host's ``autotune_logs/<device>/``).  What is measured (see costmodel/evaluate.py for
the metric definitions):

1. Timing noise floor: the spread of the repeats inside each tuning record, re-measurement of a
   sample of recorded configs (test-retest |delta| / t), run-to-run spread of the profiled kernels,
   and qc bench repeated on the profiled libraries; and, for a log timed twice
   (``costmodel_search.py remeasure --sessions 2``), the second timing of every config scored as a
   prediction of the first (computed from the log, so also with ``--skip noise``).
2. Group 5-fold by workload (no workload in both train and test), ablation of the feature
   families (structural / text / both), with the baselines in the same table: MetaSchedule's
   XGBModel (PerStoreFeature, its own training) fed the same training folds, the roofline
   estimate, the untuned default config.
3. Leave-one-model-out: every tuning workload and profiled kernel of one zoo model held out (the
   synthetic models of costmodel.synth_models stay in training).
4. Whole-model latency: predicted (sum over the kernels of the lowered model + fitted per-call
   overhead) vs measured with qc bench's timer, with the model trained on everything and with the
   model trained without that zoo model.
5. Search (simulated on the measured pools of held-out workloads): trials until a config within
   5% of the pool's best is found, random order vs the ranker's order vs the tuner's order
   (default first, then random).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodel import FEATURE_SCHEMA, MODEL_SCHEMA  # noqa: E402
from costmodel import data as D  # noqa: E402
from costmodel import evaluate as E  # noqa: E402
from costmodel import features as F  # noqa: E402
from costmodel import train as T  # noqa: E402
from costmodel.predict import roofline_samples  # noqa: E402
from costmodel.synth_models import PREFIX  # noqa: E402 - synthetic model names (LOMO runs on the real ones)

FAMS = {"structural": ["target", "cfg", "tir", "ms"], "text": ["text"], "both": T.ALL}
DEPLOYED = T.STRUCTURAL  # the families `qc costmodel train` uses by default (the ablation's best)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- 1. noise floor ---------------------------------------------------------------------------------
def noise_floor(samples, mrecs, prev: dict | None = None, n_workloads: int = 8, max_configs: int = 16) -> dict:
    """``prev``: the previous run's noise floor (its re-timing parts are kept when this host is not
    the records' machine)."""
    tune = [s for s in samples if s["source"] == "tune" and len(s.get("latencies_s") or []) >= 3]
    within = [np.std(s["latencies_s"]) / np.median(s["latencies_s"]) for s in tune]
    spread = [(np.percentile(s["latencies_s"], 90) - np.percentile(s["latencies_s"], 10)) / np.median(s["latencies_s"])
              for s in tune]
    out = {"tuning_record_repeats": {"records": len(tune), "median_cv": float(np.median(within)),
                                     "median_p90_p10_over_median": float(np.median(spread))}}
    # noise ceiling of the ranking metrics: the medians of two halves of each record's repeats
    # (repeats 0,2,4 vs 1,3) ranked against each other, as a perfect predictor measured once would be
    q = np.asarray([s["query"] for s in tune])
    a = np.log([np.median(s["latencies_s"][0::2]) for s in tune])
    b = np.log([np.median(s["latencies_s"][1::2]) for s in tune])
    half = E.query_metrics(q, a, -b)
    out["split_half_ceiling"] = {**half, "mape": float(np.mean(np.abs(np.exp(b) - np.exp(a)) / np.exp(a))),
                                 "note": "half of the repeats predicting the other half: the best any model can "
                                         "score against these labels"}
    # test-retest: whole workloads (every recorded config of a few randomly drawn ones) measured again
    # with the tuner's measurer, one workload's configs together as the tuner measures them.  The
    # second timing, used as a "prediction" of the labels, is the ceiling of the ranking metrics and
    # the floor of the latency error that any model trained on one timing per config can reach here
    # (the split-half ceiling above shares the record's moment, so it misses the drift between runs)
    host, recorded = _host_device(), D.target_of(samples)["device"]
    here = host == recorded  # timings on another machine are not of the records' one
    if here:
        try:
            out["retest"] = retest(tune, n_workloads, max_configs)
            # earlier re-timings of the same log are kept (their summaries): the noise varies by the hour
            if prev and "retest" in prev and "error" not in prev["retest"]:
                old = {k: v for k, v in prev["retest"].items() if k != "pairs"}
                out["retest_earlier_runs"] = prev.get("retest_earlier_runs", []) + [old]
        except Exception as e:  # noqa: BLE001
            out["retest"] = {"error": f"{type(e).__name__}: {e}"}
    prof = [s for s in samples if s["source"] == "profile"]
    if prof:
        kern, _, _ = D.read_profiles(D.log_paths(ARGS.log)[1])
        cv = [np.std(k["latencies_s"]) / np.median(k["latencies_s"]) for k in kern if len(k["latencies_s"]) >= 3]
        out["profiled_kernel_runs"] = {"kernel_calls": len(cv), "median_cv": float(np.median(cv))}
    # whole model: the library benchmarked again vs the profile's bench
    rel = []
    for m in mrecs if here else []:
        lib = m.get("library")
        if lib and Path(lib).is_file():
            from qcompiler.runtime import Library

            b = Library(lib).bench(repeats=30)
            rel.append(abs(b["median_ms"] - m["bench"]["median_ms"]) / m["bench"]["median_ms"])
    if rel:
        out["whole_model_rebench"] = {"models": len(rel), "mean_abs_rel_diff": float(np.mean(rel)),
                                      "max_abs_rel_diff": float(np.max(rel))}
    if not here:
        out.update({k: v for k, v in (prev or {}).items() if k in ("retest", "whole_model_rebench")})
        out["measured_elsewhere"] = (f"this host is {host}, the records are of {recorded}: retest and rebench "
                                     "kept from the previous run on that machine")
    return out


def _within_workload(r: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, dict]:
    """Log ratios ``r`` of two timings less their workload's median (a drift of the whole machine
    between the timings slows every config of a workload alike: what is left is the ranking-relevant
    noise), and their robust spread."""
    dev = np.concatenate([r[q == g] - np.median(r[q == g]) for g in np.unique(q)])
    return dev, {"mad_sigma": float(1.4826 * np.median(np.abs(dev))), "p90_abs": float(np.percentile(np.abs(dev), 90))}


def two_sessions(tune: list[dict]) -> dict | None:
    """Every config timed in two sessions (``costmodel_search.py remeasure --sessions 2``: the whole
    log again, hours later): the second session's timing scored as a prediction of the first (the
    test-retest ceiling of a label timed once, at full scale), how far the two drift apart, and how
    far each lies from the label training uses (the faster of the two)."""
    rows = [s for s in tune if len(s.get("sessions_s") or []) >= 2]
    if len(rows) < 20:
        return None
    q = np.asarray([s["query"] for s in rows])
    a = np.log([s["sessions_s"][0] for s in rows])
    b = np.log([s["sessions_s"][1] for s in rows])
    lab = np.log([s["latency_s"] for s in rows])  # the label: the fastest timing
    r = b - a
    dev, dev_summary = _within_workload(r, q)
    rel = np.abs(np.expm1(r))
    return {"configs": len(rows), "workloads": len(set(q)),
            "second_predicting_first": {**E.query_metrics(q, a, -b), "mape": float(np.mean(rel)),
                                        "median_ape": float(np.median(rel))},
            "median_log_drift": float(np.median(r)),
            "within_workload_log_dev": dev_summary,
            "share_apart_over_10pct": float(np.mean(rel > 0.10)),
            "label_vs_sessions_mape": [float(np.mean(np.expm1(a - lab))), float(np.mean(np.expm1(b - lab)))],
            "perfect_model_single_timing": perfect_model_ceiling(rows, dev / np.sqrt(2)),
            "note": "the first timing of each config (the tuner's) vs a second timing of the whole log hours "
                    "later, a workload's configs together; the label training uses is the faster of the two "
                    "(a burst that outlasts one record's repeats only slows it); perfect_model_single_timing: the "
                    "expected score of a noise-free model against labels timed once, the noise drawn from these "
                    "within-workload deviations / sqrt 2"}


def retest(tune: list[dict], n_workloads: int, max_configs: int, seed: int = 0) -> dict:
    """Re-time up to ``max_configs`` recorded configs of each of ``n_workloads`` workloads drawn at
    random (those with >= 6 configs); report the per-config relative difference and the ranking
    metrics / MAPE of the new timings against the labels."""
    from qcompiler.targets import parse_target
    from qcompiler.tune.measure import Candidate, Measurer
    from qcompiler.tune.workload import Workload

    by_q: dict[str, list] = {}
    for s in tune:
        by_q.setdefault(s["query"], []).append(s)
    rng = np.random.default_rng(seed)
    qs = sorted(q for q, v in by_q.items() if len(v) >= 6)
    qs = [qs[i] for i in rng.choice(len(qs), min(n_workloads, len(qs)), replace=False)]
    meas = Measurer(parse_target("cpu", None), repeats=5, min_repeat_ms=10)
    qid, lab, new = [], [], []
    for q in qs:
        picked = [by_q[q][i] for i in sorted(rng.choice(len(by_q[q]), min(max_configs, len(by_q[q])), replace=False))]
        cands = []
        for s in picked:
            w = Workload.from_fields(s["workload"])
            c = w.config_from_dict(s["config"])
            cands.append(Candidate(w, c, w.make_func(c)))
        again = {id(m.candidate): m for m in meas.measure(cands)}
        for s, c in zip(picked, cands):
            m = again.get(id(c))
            if m is not None and m.latencies:
                qid.append(q), lab.append(np.log(s["latency_s"])), new.append(float(np.median(m.latencies)))
        log(f"retest {len(set(qid))}/{len(qs)} workloads, {len(new)} configs")
    new_a, lab_a, qid_a = np.asarray(new), np.asarray(lab), np.asarray(qid)
    rows = np.abs(new_a - np.exp(lab_a)) / np.exp(lab_a)
    ceiling = E.query_metrics(qid_a, lab_a, -np.log(new_a))
    r = np.log(new_a) - lab_a  # log ratio second / first timing
    dev, dev_summary = _within_workload(r, qid_a)
    return {"workloads": len(set(qid)), "configs": len(rows), "mean_abs_rel_diff": float(np.mean(rows)),
            "median_abs_rel_diff": float(np.median(rows)), "p90_abs_rel_diff": float(np.percentile(rows, 90)),
            "median_log_drift": float(np.median(r)),
            "within_workload_log_dev": dev_summary,
            "ceiling": {**ceiling, "mape": float(np.mean(rows))},
            "perfect_model": perfect_model_ceiling(tune, dev / np.sqrt(2)),
            "pairs": [[q, float(np.exp(a)), float(b)] for q, a, b in zip(qid, lab, new)],
            "note": "ceiling: a second timing of the recorded configs (minutes to hours later) scored as a "
                    "prediction of the labels (a predictor as noisy as the labels); perfect_model: the expected "
                    "score of a model that knows each config's noise-free latency, simulated by adding to the "
                    "labels noise drawn from the measured within-workload log deviations / sqrt 2 (heavy tails "
                    "kept); pairs: [workload, label s, second timing s]"}


def perfect_model_ceiling(tune: list[dict], noise: np.ndarray, draws: int = 20, seed: int = 1) -> dict:
    """Ranking metrics of the true latencies against labels carrying timing noise drawn from the
    empirical log deviations ``noise`` (the recorded labels taken as the truth, noise added to make
    the labels): what a perfect model would score on labels as noisy as these."""
    rng = np.random.default_rng(seed)
    q = np.asarray([s["query"] for s in tune])
    y = np.log([s["latency_s"] for s in tune])
    runs = [E.query_metrics(q, y + rng.choice(noise, len(y)), -y) for _ in range(draws)]
    return {**{k: float(np.mean([m[k] for m in runs])) for k in ("top1", "top5", "pairwise", "spearman")},
            "mape": float(np.mean(np.abs(np.expm1(rng.choice(noise, len(y))))))}


def _host_device() -> str:
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import describe

    return describe(parse_target("cpu", None))["device"]


# ---- 2. baselines ----------------------------------------------------------------------------------
def ms_xgb_oof(samples, folds) -> dict:
    """MetaSchedule's XGBModel trained on the training folds' tuning records (its own PerStoreFeature
    extraction and normalised-throughput target), ranking the test folds' candidates."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBModel

    from qcompiler.tune.workload import Workload

    n = len(samples)
    score = np.full(n, np.nan)
    tune = [i for i, s in enumerate(samples) if s["source"] == "tune"]
    by_q: dict[str, list[int]] = {}
    for i in tune:
        by_q.setdefault(samples[i]["query"], []).append(i)
    ctxs = {}
    tgt = tvm.target.Target({"kind": "llvm", "mcpu": samples[tune[0]]["target"]["arch"], "num-cores": 2})
    stub = "tvm.s_tir.tensor_intrin" not in sys.modules
    import types

    if stub:
        sys.modules["tvm.s_tir.tensor_intrin"] = types.ModuleType("tvm.s_tir.tensor_intrin")
    try:
        for q, idx in by_q.items():
            w = Workload.from_fields(samples[idx[0]]["workload"])
            ctxs[q] = ms.TuneContext(mod=tvm.IRModule({"main": w.make_func(None)}), target=tgt)
    finally:
        if stub:
            del sys.modules["tvm.s_tir.tensor_intrin"]

    def cand(i):
        f = samples[i]["func"]
        return ms.MeasureCandidate(tvm.s_tir.Schedule(f.with_attr("global_symbol", "main")), [])

    for test in folds:
        test_q = {samples[i]["query"] for i in test if samples[i]["source"] == "tune"}
        model = XGBModel(num_warmup_samples=0, adaptive_training=True)
        for q, idx in by_q.items():
            if q in test_q:
                continue
            model.update(ctxs[q], [cand(i) for i in idx],
                         [ms.runner.RunnerResult([samples[i]["latency_s"]], None) for i in idx])
        from itertools import chain

        model._train(xs=list(chain.from_iterable(g.features for g in model.data.values())),  # the final fit
                     ys=np.concatenate([g.min_cost / g.costs for g in model.data.values()]))
        for q in test_q:
            idx = by_q[q]
            score[idx] = np.asarray(model.predict(ctxs[q], [cand(i) for i in idx]))
    return {"score": score}


def baselines(samples, y, folds) -> dict:
    src = np.asarray([s["source"] for s in samples])
    q = np.asarray([s["query"] for s in samples])
    t = np.flatnonzero(src == "tune")
    out = {}
    roof = roofline_samples(samples)
    roof_tir = np.asarray([F.roofline_text(F.analyze_text(s["text"]), s["target"]) for s in samples])
    out["roofline"] = {**E.query_metrics(q[t], y[t], -roof_tir[t]),
                       "mape_tune": E.mape(y[t], roof[t]),
                       "mape_profile": E.mape(y[src == "profile"], roof[src == "profile"]) if (src == "profile").any() else None,
                       "note": "nominal peaks; GEMM formula for tuning samples (MAPE), TIR-analysis roofline for ranking "
                               "(the GEMM formula ignores the config) and for the other kernels"}
    # untuned default: the config the compiler ships without a record (top-1 = best / default)
    sc = []
    for g in np.unique(q[t]):
        ii = t[q[t] == g]
        d = [i for i in ii if samples[i].get("is_default")]
        if len(ii) >= 2 and d:
            sc.append(np.exp(y[ii]).min() / np.exp(y[d[0]]))
    out["untuned_default"] = {"top1": float(np.mean(sc)), "queries": len(sc),
                              "note": "default_config's true latency vs the best measured (what qc compile runs "
                                      "without a record); no latency prediction"}
    try:
        ms_out = ms_xgb_oof(samples, folds)
        out["metaschedule_xgbmodel"] = {**E.query_metrics(q[t], y[t], ms_out["score"][t]), "mape_tune": None,
                                        "note": "TVM's XGBModel (PerStoreFeature, rank objective on normalised "
                                                "throughput min_cost/cost per workload) on the same folds; it predicts "
                                                "relative throughput, not seconds, so it has no latency MAPE"}
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        out["metaschedule_xgbmodel"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# ---- 3. leave one model out -----------------------------------------------------------------------
def lomo(samples, X, y, models: list[str]) -> dict:
    res = {}
    allidx = np.arange(len(samples))
    pooled = {"pred_s": np.full(len(y), np.nan), "lo_s": np.full(len(y), np.nan), "hi_s": np.full(len(y), np.nan),
              "score": np.full(len(y), np.nan)}
    for m in models:
        test = np.asarray([i for i, s in enumerate(samples) if m in s["models"]])
        if len(test) == 0:
            continue
        groups = {samples[i]["group"] for i in test}
        tr = np.asarray([i for i in allidx if samples[i]["group"] not in groups])
        # train on what this model does not run: a kernel TIR or workload it shares with others is out too
        o = _oof_explicit(samples, X, y, tr, test)
        res[m] = E.report(samples, y, o, test)
        for k in pooled:
            pooled[k][test] = o[k][test]
        log(f"LOMO {m}: {res[m].get('rank_by_ranker')} mape_tune={res[m].get('mape_tune')} "
            f"mape_profile={res[m].get('mape_profile')}")
    return res


def _oof_explicit(samples, X, y, tr, test):
    import xgboost as xgb

    n = len(y)
    o = {k: np.full(n, np.nan) for k in ("pred_s", "lo_s", "hi_s", "score")}
    cols = F.columns(DEPLOYED)
    d = xgb.DMatrix(X[test][:, cols])
    mu, qlo, qhi = T.predict_point(T.fit_point(X[tr], y[tr], cols), X[test], cols)
    o["pred_s"][test] = np.exp(mu)
    a, b = T.widen(mu, qlo, qhi, T.band_scale(X[tr], y[tr], [samples[i]["group"] for i in tr], cols))
    o["lo_s"][test], o["hi_s"][test] = np.exp(a), np.exp(b)
    tune = np.asarray([samples[i]["source"] == "tune" for i in tr])
    rk = T.fit_ranker(X[tr][tune][:, cols], y[tr][tune], np.asarray([samples[i]["query"] for i in tr])[tune])
    o["score"][test] = rk.predict(d)
    return o


# ---- 4. whole model ---------------------------------------------------------------------------------
def whole_models(samples, X, y, mrecs) -> dict:
    import tempfile

    from qcompiler.targets import parse_target
    from qcompiler.tune.workload import text_hash

    from costmodel.predict import CostModel
    from costmodel.profile import model_source
    from costmodel.whole import lower_kernels, predict_kernels

    target = D.target_of(samples)  # the records' CPU (lowering for it needs no such CPU here)
    spec = parse_target("cpu", target["arch"])
    cal_all = D.fit_overhead(mrecs)
    full = CostModel(T.train(samples, X, y, DEPLOYED, calibration=cal_all))
    # the kernels the lowering gives now should be the profiled library's: same records, same
    # compile-time picks (QC_COSTMODEL: the cost model the profiled libraries were compiled with)
    profiled = {}
    for s in samples:
        if s["source"] == "profile":
            profiled.setdefault(s["models"][0], set()).add(s["query"].removeprefix("tir:"))
    out = {}
    for m in mrecs:
        name = m["model"]
        path, calib = model_source(name, tempfile.mkdtemp(prefix="qc_eval_"))
        kernels = lower_kernels(path, spec, calib)
        same = float(np.mean([text_hash(k["text"]) in profiled.get(name, ())
                              for k in kernels])) if kernels else 0.0
        p_full = predict_kernels(kernels, target, full)
        keep = [i for i, s in enumerate(samples) if name not in s["models"]]
        groups = {samples[i]["group"] for i in range(len(samples)) if name in samples[i]["models"]}
        keep = [i for i in keep if samples[i]["group"] not in groups]
        cal = D.fit_overhead([r for r in mrecs if r["model"] != name])
        held = CostModel(T.train([samples[i] for i in keep], X[keep], y[keep], DEPLOYED, calibration=cal))
        p_held = predict_kernels(kernels, target, held)
        p_roof = predict_kernels(kernels, target, None)
        meas = m["bench"]["median_ms"]
        out[name] = {"measured_ms": meas, "measured_p10_p90_ms": [m["bench"]["p10_ms"], m["bench"]["p90_ms"]],
                     "profiled_kernel_sum_ms": m["kernel_sum_ms"], "kernels_lowered": len(kernels),
                     "kernel_calls_profiled": m["n_kernel_calls"], "kernels_as_profiled": same,
                     "predicted_all_data_ms": p_full["total_ms"], "band_all_data_ms": p_full["band_ms"],
                     "err_all_data": (p_full["total_ms"] - meas) / meas,
                     "predicted_model_held_out_ms": p_held["total_ms"], "band_held_out_ms": p_held["band_ms"],
                     "err_held_out": (p_held["total_ms"] - meas) / meas,
                     "roofline_ms": p_roof["total_ms"], "err_roofline": (p_roof["total_ms"] - meas) / meas}
        log(f"whole {name}: measured {meas:.3f} ms, predicted {p_full['total_ms']:.3f} (held out "
            f"{p_held['total_ms']:.3f}), roofline {p_roof['total_ms']:.3f}; {same:.0%} of the kernels as profiled")
    summary = {}
    for part, names in (("zoo", [n for n in out if not n.startswith(PREFIX)]),
                        ("synthetic", [n for n in out if n.startswith(PREFIX)])):
        if names:
            summary[part] = {f"mean_abs_err_{k}": float(np.mean([abs(out[n][f"err_{k}"]) for n in names]))
                             for k in ("all_data", "held_out", "roofline")}
            summary[part]["models"] = len(names)
    out["_summary"] = summary
    return out


# ---- 5. search -----------------------------------------------------------------------------------------
def search_sim(samples, y, score, folds) -> dict:
    """Trials to reach <= best/0.95 in each held-out workload's measured pool."""
    q = np.asarray([s["query"] for s in samples])
    src = np.asarray([s["source"] for s in samples])
    rng = np.random.default_rng(0)
    rows = []
    for test in folds:
        for g in np.unique(q[test][src[test] == "tune"]):
            ii = np.flatnonzero((q == g) & (src == "tune"))
            if len(ii) < 4:
                continue
            lat = np.exp(y[ii])
            good = lat <= lat.min() / 0.95

            def first(order):
                return int(np.flatnonzero(good[order])[0]) + 1

            rand = np.mean([first(rng.permutation(len(ii))) for _ in range(200)])
            model = first(np.argsort(-score[ii], kind="stable"))
            d = [k for k, i in enumerate(ii) if samples[i].get("is_default")]
            tuner = np.mean([first(np.asarray(d + [k for k in rng.permutation(len(ii)) if k not in d]))
                             for _ in range(200)]) if d else None
            rows.append({"workload": g, "pool": len(ii), "random": float(rand), "model": model, "default_first": tuner})
    r = np.asarray([x["random"] for x in rows])
    m = np.asarray([x["model"] for x in rows])
    dft = np.asarray([x["default_first"] for x in rows if x["default_first"] is not None])
    return {"workloads": len(rows), "mean_pool": float(np.mean([x["pool"] for x in rows])),
            "mean_trials_random": float(r.mean()), "mean_trials_model": float(m.mean()),
            "mean_trials_default_first": float(dft.mean()) if len(dft) else None,
            "ratio_random_over_model": float(r.mean() / m.mean()),
            "model_first_try_hits": float(np.mean(m == 1)),
            "note": "simulated on the measured pools (6-40 configs per workload, not the full space): "
                    "the order in which each strategy would have measured them"}


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=None, help="device log (default: this host's, autotune_logs/<device>/)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/costmodel_cpu_<log's folder name>.json")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma list of: noise,table,ms,lomo,whole (a skipped part is kept from the previous "
                    "results file; table still recomputes the deployed row)")
    ARGS = ap.parse_args()
    if ARGS.log is None:
        from qcompiler.targets import parse_target
        from qcompiler.tune.device import default_log_dir

        ARGS.log = default_log_dir(parse_target("cpu", None), ROOT / "autotune_logs")
    ARGS.out = ARGS.out or str(ROOT / "benchmarks" / "results" / f"costmodel_cpu_{Path(ARGS.log).name}.json")
    skip = set(ARGS.skip.split(","))
    t0 = time.time()
    from qcompiler import progress

    progress.set_reporter(progress.Reporter() if hasattr(progress, "Reporter") else progress.get())
    samples, mrecs = D.samples_from(ARGS.log)
    log(f"{len(samples)} samples ({sum(s['source'] == 'tune' for s in samples)} tuning), {len(mrecs)} models")
    X, y = D.matrix(samples)
    log(f"features {X.shape} in {time.time() - t0:.0f}s")
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
           "log": os.path.relpath(ARGS.log, ROOT), "feature_schema": FEATURE_SCHEMA, "model_schema": MODEL_SCHEMA,
           "samples": {"total": len(samples), "tuning": int(sum(s["source"] == "tune" for s in samples)),
                       "profiled_kernels": int(sum(s["source"] == "profile" for s in samples)),
                       "workloads": len({s["group"] for s in samples if s["source"] == "tune"}),
                       "models": [m["model"] for m in mrecs]}}
    prev = json.loads(Path(ARGS.out).read_text()) if Path(ARGS.out).is_file() else {}
    if "noise" not in skip:
        res["noise_floor"] = noise_floor(samples, mrecs, prev.get("noise_floor"))
        log(f"noise {res['noise_floor']}")
    folds = E.group_folds([s["group"] for s in samples], ARGS.folds)
    table = {}
    for name, fam in FAMS.items():
        if "table" in skip and name != "structural":
            continue
        o = E.oof(samples, X, y, folds, fam)
        table[f"ours_{name}"] = E.report(samples, y, o)
        if name == "structural":
            deployed = o
        log(f"{name}: {table[f'ours_{name}']['rank_by_ranker']} mape_tune={table[f'ours_{name}'].get('mape_tune'):.3f} "
            f"mape_profile={table[f'ours_{name}'].get('mape_profile')}")
    # TenSet's within-task split (records, not workloads, in folds): the published anchors' setting
    o = E.oof(samples, X, y, E.record_folds(len(y), ARGS.folds), DEPLOYED, band=False)
    table["ours_structural_within_task_split"] = E.report(samples, y, o)
    log(f"within-task split: {table['ours_structural_within_task_split']['rank_by_ranker']}")
    if "table" in skip and "group_kfold" in prev:  # the rest of the table from the previous run
        table = {**prev["group_kfold"]["table"], **table}
    elif "ms" not in skip:
        table.update(baselines(samples, y, folds))
    res["group_kfold"] = {"folds": len(folds), "split": "by workload (tuning) / by kernel TIR (profiled)",
                          "deployed_families": "structural", "table": table}
    res["search"] = search_sim(samples, y, deployed["score"], folds)
    log(f"search {res['search']}")
    if "lomo" not in skip:
        models = sorted({m for s in samples for m in s["models"] if not m.startswith(PREFIX)})
        res["leave_one_model_out"] = lomo(samples, X, y, models)
    if "whole" not in skip and mrecs:
        res["whole_model"] = whole_models(samples, X, y, mrecs)
    for k in ("noise_floor", "leave_one_model_out", "whole_model"):  # skipped parts: the previous run's
        if k not in res and k in prev:
            res[k] = prev[k]
    two = two_sessions([s for s in samples if s["source"] == "tune"])  # no timing: computed even when skipped
    if two:
        res.setdefault("noise_floor", {})["two_sessions"] = two
        log(f"two sessions {two['second_predicting_first']}")
    res["seconds"] = round(time.time() - t0, 1)
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
    log(f"wrote {ARGS.out} in {res['seconds']} s")


def _cpu():
    try:
        from qcompiler.tune.device import cpu_model_name

        return cpu_model_name()
    except Exception:  # noqa: BLE001
        return platform.processor()


ARGS = None

if __name__ == "__main__":
    main()
