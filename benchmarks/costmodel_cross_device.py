"""Cross-device check of the cost model: two CPUs with different GEMM instruction sets.

    .venv/bin/python benchmarks/costmodel_cross_device.py [--a autotune_logs/rocketlake-avx512vnni-2c]
                                                           [--b autotune_logs/znver2-avx2-2c]

The tuning records of device A (the Xeon: AVX-512 VNNI kernels, backend ``cpu_vnni``) and of
device B (an AMD Zen 2: AVX2 kernels, backend ``cpu_avx2``) are featurized with the same schema
(target features carry the CPU's nominal peaks; the config and TIR features the ISA's lanes, depth
and MAC intrinsics).  On B's records, group 5-fold by workload (no workload in train and test):

* ``b_only``        trained on B's training folds (the per-device model ``qc costmodel train`` makes);
* ``a_zero_shot``   trained on all of A, nothing of B (does a model of another CPU transfer?);
* ``a_plus_b``      trained on all of A + B's training folds (does A's data help B?).

Prints the table and writes ``benchmarks/results/costmodel_cross_device.json``.  Only tuning
records (kernels timed alone); no timing happens here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodel import FEATURE_SCHEMA  # noqa: E402
from costmodel import data as D  # noqa: E402
from costmodel import evaluate as E  # noqa: E402
from costmodel import features as F  # noqa: E402
from costmodel import train as T  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(path: str):
    samples, _ = D.samples_from(path, profiles=False)
    X, y = D.matrix(samples)
    return samples, X, y


def metrics(samples, y, pred_s, score) -> dict:
    out = {"pred_s": pred_s, "lo_s": pred_s, "hi_s": pred_s, "score": score}
    r = E.report(samples, y, out)
    return {"top1": r["rank_by_ranker"]["top1"], "top5": r["rank_by_ranker"]["top5"],
            "pairwise": r["rank_by_ranker"]["pairwise"], "spearman": r["rank_by_ranker"]["spearman"],
            "mape": r["mape_tune"], "median_ape": r["median_ape_tune"]}


def fit_predict(Xtr, ytr, qtr, Xte, cols):
    pm = T.fit_point(Xtr, ytr, cols, quantile=False)
    mu, _, _ = T.predict_point(pm, Xte, cols)
    rk = T.fit_ranker(Xtr[:, cols], ytr, qtr)
    import xgboost as xgb

    return np.exp(mu), rk.predict(xgb.DMatrix(Xte[:, cols]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", default=str(ROOT / "autotune_logs" / "rocketlake-avx512vnni-2c"))
    ap.add_argument("--b", default=str(ROOT / "autotune_logs" / "znver2-avx2-2c"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "costmodel_cross_device.json"))
    args = ap.parse_args()
    t0 = time.time()
    log(f"featurizing {args.a}")
    sa, Xa, ya = load(args.a)
    log(f"featurizing {args.b}")
    sb, Xb, yb = load(args.b)
    cols = F.columns(T.STRUCTURAL)
    qa = np.asarray([s["query"] for s in sa])
    qb = np.asarray([s["query"] for s in sb])
    folds = E.group_folds([s["group"] for s in sb], args.folds)
    rows = {}
    for name in ("b_only", "a_zero_shot", "a_plus_b"):
        pred, score = np.full(len(yb), np.nan), np.full(len(yb), np.nan)
        if name == "a_zero_shot":
            pred, score = fit_predict(Xa, ya, qa, Xb, cols)
        else:
            for test in folds:
                tr = np.setdiff1d(np.arange(len(yb)), test)
                Xtr, ytr, qtr = Xb[tr], yb[tr], qb[tr]
                if name == "a_plus_b":
                    Xtr, ytr, qtr = np.vstack([Xa, Xtr]), np.concatenate([ya, ytr]), np.concatenate([qa, qtr])
                pred[test], score[test] = fit_predict(Xtr, ytr, qtr, Xb[test], cols)
        rows[name] = metrics(sb, yb, pred, score)
        log(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()))
    dev = lambda s: f"{s[0]['target'].get('device')} ({s[0]['target'].get('arch')})"  # noqa: E731
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "feature_schema": FEATURE_SCHEMA, "families": "structural",
           "device_a": dev(sa), "device_b": dev(sb),
           "samples": {"a": len(ya), "b": len(yb), "b_workloads": len({s["group"] for s in sb})},
           "split": f"group {args.folds}-fold by workload on device B's records", "table": rows,
           "seconds": round(time.time() - t0, 1)}
    print(f"\ntest set: {dev(sb)}, {len(yb)} records of {res['samples']['b_workloads']} workloads; "
          f"other device: {dev(sa)}, {len(ya)} records")
    print(f"{'trained on':<14}{'top1':>7}{'top5':>7}{'pairwise':>10}{'spearman':>10}{'MAPE':>8}{'median APE':>12}")
    for k, r in rows.items():
        print(f"{k:<14}{r['top1']:>7.3f}{r['top5']:>7.3f}{r['pairwise']:>10.3f}{r['spearman']:>10.3f}"
              f"{r['mape']:>8.1%}{r['median_ape']:>12.1%}")
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
