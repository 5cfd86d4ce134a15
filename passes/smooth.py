"""Per-channel smoothing of Dense inputs (SmoothQuant), exact in float, after calibration.

Transformer activations carry a few outlier channels (MiniLM's first FFN: one GELU channel
reaches 23 while the rest stay below 2), and one per-tensor int8 scale for them leaves the other
channels a handful of levels.  For the Dense layers  y = x W  reading an activation x (other consumers keep reading x):

    f_c = max|x_c|^alpha / max_n |W[c, n]|^(1 - alpha)       (alpha = 0.5; f_c > 0)
    x' = x / f   (per channel c of the last axis),   W'[c, :] = f_c * W[c, :],   x' W' = x W

so the activation range is flattened and the weights (quantized per output channel n) absorb it.
Where the division goes:
  * x = LayerNorm(...)  : into gamma and beta (gamma' = gamma / f, beta' = beta / f): free;
  * any other producer  : a new Affine(x; 1/f, 0) node, whose input x then has no 8-bit
    consumer left and is kept in 16 bits (passes/quantize.py ``wide_ok``), so the division
    happens on the fine grid before the int8 rounding.
Calibration ranges of x' are computed from the recorded per-channel ranges and the channel of
every sampled value (``TensorStats.scaled``), so no second calibration run is needed.
f is normalised to geometric mean 1 and clipped to [2^-8, 2^8].

alpha is chosen per tensor from {off, 0.25, 0.5, 0.75} (the given alpha caps it) by the expected
output error of the int8 GEMM, summed over output channels n:
    E(f) = sum_n [ D_x^2/12 * sum_c f_c^2 W[c,n]^2  +  D_w,n^2/12 * sum_c E[x_c^2] / f_c^2 ]
with D_x = max_c max|x_c| / f_c / 127 (activation step) and D_w,n = max_c |f_c W[c,n]| / 127
(per-output-channel weight step); E[x_c^2] over all calibration values (TensorStats.chan_ms).
"""

from __future__ import annotations

import numpy as np

from qcompiler.calibrate import TensorStats
from qcompiler.graph import Graph, Node

LN_OPS = ("LayerNorm",)


def smooth(fg: Graph, stats: dict[str, TensorStats], alpha: float = 0.5) -> tuple[Graph, dict[str, TensorStats]]:
    if alpha <= 0:
        return fg, stats
    g = fg.copy()
    stats = dict(stats)
    prod = g.producers()
    cons = g.consumers()
    new_nodes: dict[int, Node] = {}  # id(producer) -> Affine to insert after it
    for x, users in list(cons.items()):
        if x in g.consts or x in g.outputs or x not in stats or not users:
            continue
        all_users = users
        users = [u for u in users if u.op == "Dense" and u.inputs[0] == x and u.attrs.get("weight") is not None]
        if not users:
            continue
        st = stats[x]
        if st.chan_lo is None or st.sample_chan is None:
            continue
        K = users[0].attrs["weight"].shape[0]
        if st.chan_lo.shape != (K,):
            continue
        amax = np.maximum(np.abs(st.chan_lo), np.abs(st.chan_hi)).astype(np.float64)
        W = np.concatenate([u.attrs["weight"].astype(np.float64) for u in users], axis=1)  # [K, sum N]
        wmax = np.abs(W).max(axis=1)
        ok = (amax > 0) & (wmax > 0)
        if not ok.any():
            continue
        if st.chan_ms is not None:
            ex2 = np.asarray(st.chan_ms, np.float64)
        else:
            cnt = np.bincount(st.sample_chan, minlength=K)[:K]
            ms = np.bincount(st.sample_chan, weights=st.sample.astype(np.float64) ** 2, minlength=K)[:K]
            ex2 = np.where(cnt > 0, ms / np.maximum(cnt, 1), amax**2 / 3)

        def err(f):
            dx = (amax / f).max() / 127
            dw = np.abs(f[:, None] * W).max(axis=0) / 127
            return float(dx**2 / 12 * ((f[:, None] * W) ** 2).sum() + (dw**2 / 12).sum() * (ex2 / f**2).sum())

        best_f, best_e = None, err(np.ones(K))
        for a in (0.25, 0.5, 0.75):
            if a > alpha + 1e-9:
                break
            f = np.ones(K)
            f[ok] = amax[ok] ** a / wmax[ok] ** (1 - a)
            f[ok] /= np.exp(np.mean(np.log(f[ok])))
            f = np.clip(f, 2.0**-8, 2.0**8)
            e = err(f)
            if e < 0.9 * best_e:
                best_f, best_e = f, e
        if best_f is None:
            continue
        f = best_f
        p = prod.get(x)
        if p is not None and p.op in LN_OPS and len(all_users) == len(users) and p.attrs.get("act") is None:
            p.attrs = {**p.attrs, "gamma": np.asarray(p.attrs["gamma"], np.float64) / f,
                       "beta": np.asarray(p.attrs["beta"], np.float64) / f}
            xs = x
        else:
            xs = g.fresh(x + "/smooth")
            g.shapes[xs] = g.shape(x)
            g.dtypes[xs] = g.dtypes[x]
            node = Node("Affine", (p.name if p is not None else x) + "/smooth", [x], [xs],
                        {"scale": (1.0 / f).astype(np.float32), "offset": np.zeros(K, np.float32)})
            new_nodes.setdefault(id(p) if p is not None else -1, node)
            for u in users:
                u.inputs = [xs] + list(u.inputs[1:])
        stats[xs] = st.scaled(f)
        for u in users:
            u.attrs = {**u.attrs, "weight": (u.attrs["weight"].astype(np.float64) * f[:, None]).astype(np.float32)}
    if new_nodes:
        out = []
        pending = new_nodes.pop(-1, None)
        if pending is not None:
            out.append(pending)
        for n in g.nodes:
            out.append(n)
            if id(n) in new_nodes:
                out.append(new_nodes[id(n)])
        g.nodes = out
        g.toposort()
    return g, stats
