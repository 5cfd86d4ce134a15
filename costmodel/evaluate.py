"""Metrics and splits (by workload, never by record).

* top-k score (TenSet): per query (the candidates of one workload), true best latency / the best
  true latency among the k candidates ranked first; averaged over queries (1.0 = perfect).
* pairwise accuracy: share of candidate pairs of one query (latencies differing by more than 1%)
  ordered correctly; pooled over queries.
* Spearman: rank correlation within each query, averaged.
* MAPE: mean |predicted - measured| / measured of the latency in seconds (never of normalised
  throughput), over every test sample; also the median APE and the time-weighted WAPE
  (sum |error| / sum latency), which is what a whole-model sum feels.
"""

from __future__ import annotations

import numpy as np

from . import features as F
from . import train as T


def query_metrics(q: np.ndarray, y_true: np.ndarray, score: np.ndarray) -> dict:
    """``y_true`` log seconds, ``score`` higher = predicted faster."""
    from scipy.stats import spearmanr

    top1, top5, sp, n_ok, n_pairs, nq = [], [], [], 0, 0, 0
    for g in np.unique(q):
        m = q == g
        if m.sum() < 2:
            continue
        yt, sc = np.exp(y_true[m]), score[m]
        order = np.argsort(-sc, kind="stable")
        best = yt.min()
        top1.append(best / yt[order[0]])
        top5.append(best / yt[order[:5]].min())
        if np.ptp(yt) > 0 and np.ptp(sc) > 0:
            sp.append(spearmanr(-yt, sc).statistic)
        i, j = np.triu_indices(len(yt), 1)
        diff = np.abs(yt[i] - yt[j]) > 0.01 * np.minimum(yt[i], yt[j])
        n_pairs += int(diff.sum())
        n_ok += int(((yt[i] < yt[j]) == (sc[i] > sc[j]))[diff].sum())
        nq += 1
    return {"queries": nq, "top1": float(np.mean(top1)) if top1 else None,
            "top5": float(np.mean(top5)) if top5 else None,
            "pairwise": n_ok / n_pairs if n_pairs else None,
            "spearman": float(np.mean(sp)) if sp else None}


def mape(y_true_log: np.ndarray, pred_s: np.ndarray) -> float:
    t = np.exp(y_true_log)
    return float(np.mean(np.abs(pred_s - t) / t))


def group_folds(groups: list[str], k: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Test-index arrays of k folds, whole groups per fold (shuffled, size-balanced)."""
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    sizes = {g: int((groups == g).sum()) for g in uniq}
    bins = [[] for _ in range(k)]
    load = np.zeros(k)
    for g in sorted(uniq, key=lambda g: -sizes[g]):
        b = int(np.argmin(load))
        bins[b].append(g)
        load[b] += sizes[g]
    return [np.flatnonzero(np.isin(groups, b)) for b in bins if b]


def record_folds(n: int, k: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Test-index arrays of k folds of single records (TenSet's within-task split: the other configs
    of a test workload are in training; the easy split, for comparing with its published scores)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[i::k]) for i in range(k)]


def oof(samples, X, y, folds: list[np.ndarray], families: list[str], rank: bool = True, params=None,
        band: bool = True) -> dict:
    """Out-of-fold predictions: regression (seconds), quantile band, ranker score."""
    n = len(y)
    pred = np.full(n, np.nan)
    lo, hi, score = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    cols = F.columns(families)
    import xgboost as xgb

    tune = np.asarray([s["source"] == "tune" for s in samples])
    qids = np.asarray([s["query"] for s in samples])
    for test in folds:
        tr = np.setdiff1d(np.arange(n), test)
        d = xgb.DMatrix(X[test][:, cols])
        mu, qlo, qhi = T.predict_point(T.fit_point(X[tr], y[tr], cols, params), X[test], cols)
        pred[test] = np.exp(mu)
        sc = T.band_scale(X[tr], y[tr], [samples[i]["group"] for i in tr], cols, params) if band else 0.0
        a, b = T.widen(mu, qlo, qhi, sc)
        lo[test], hi[test] = np.exp(a), np.exp(b)
        trt = tr[tune[tr]]
        if rank and len(trt) >= 4:
            rk = T.fit_ranker(X[trt][:, cols], y[trt], qids[trt], params)
            score[test] = rk.predict(d)
        else:
            score[test] = -np.log(pred[test])
    return {"pred_s": pred, "lo_s": lo, "hi_s": hi, "score": score}


def report(samples, y, out: dict, idx: np.ndarray | None = None) -> dict:
    """Metrics of out-of-fold predictions (on the tuning samples for ranking; MAPE per source)."""
    idx = np.arange(len(y)) if idx is None else idx
    src = np.asarray([s["source"] for s in samples])
    q = np.asarray([s["query"] for s in samples])
    t = idx[src[idx] == "tune"]
    r = {"rank_by_ranker": query_metrics(q[t], y[t], out["score"][t]) if len(t) else None,
         "rank_by_regressor": query_metrics(q[t], y[t], -out["pred_s"][t]) if len(t) else None}
    for s_ in ("tune", "profile"):
        ii = idx[src[idx] == s_]
        if len(ii):
            yt = np.exp(y[ii])
            r[f"mape_{s_}"] = mape(y[ii], out["pred_s"][ii])
            r[f"median_ape_{s_}"] = float(np.median(np.abs(out["pred_s"][ii] - yt) / yt))
            # time-weighted: sum |error| / sum time (what a whole-model sum feels)
            r[f"wape_{s_}"] = float(np.sum(np.abs(out["pred_s"][ii] - yt)) / np.sum(yt))
            r[f"band_coverage_{s_}"] = float(np.mean((out["lo_s"][ii] <= yt * 1.0001) & (yt <= out["hi_s"][ii] * 1.0001)))
            r[f"n_{s_}"] = int(len(ii))
    r["mape_all"] = mape(y[idx], out["pred_s"][idx])
    return r
