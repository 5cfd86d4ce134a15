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
CONV_GAIN = 0.25


def _gemm_users(g: Graph, x: str, users: list[Node], chan_axis: int):
    """The consumers of ``x`` that can absorb a per-channel factor of their input in their weights,
    with those weights as one [K * taps, N] matrix (rows: input channel, then tap):
    Dense (K = the last axis) when the recorded channels are the last axis, group-1 Conv with a
    constant weight (K = axis 1, taps = kh * kw) when they are axis 1."""
    rank = len(g.shape(x))
    if chan_axis in (-1, rank - 1):
        ds = [u for u in users if u.op == "Dense" and u.inputs[0] == x and u.attrs.get("weight") is not None]
        return ds, (np.concatenate([u.attrs["weight"].astype(np.float64) for u in ds], axis=1) if ds else None), 1
    if chan_axis == 1 and rank >= 3:
        cs = [u for u in users if u.op == "Conv" and u.inputs[0] == x and u.inputs[1] in g.consts
              and int(u.attrs.get("group", 1)) == 1]
        if not cs:
            return [], None, 1
        ws = [g.consts[u.inputs[1]].astype(np.float64) for u in cs]          # [OC, C, *k]
        taps = int(np.prod(ws[0].shape[2:]))
        if any(int(np.prod(w.shape[2:])) != taps for w in ws):
            return [], None, 1
        return cs, np.concatenate([np.moveaxis(w, 0, -1).reshape(-1, w.shape[0]) for w in ws], axis=1), taps
    return [], None, 1


def smooth(fg: Graph, stats: dict[str, TensorStats], alpha: float = 0.5,
           hessians=None) -> tuple[Graph, dict[str, TensorStats]]:
    """``hessians`` (``qcompiler/mixed/gptq.py`` HessianStore of the layers' float inputs): each
    smoothed layer's Hessian follows its input (x / f: D H D with D = 1 / f per input column)."""
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
        st = stats[x]
        if st.chan_lo is None or st.sample_chan is None:
            continue
        chan_axis = getattr(st, "chan_axis", -1)
        users, W, taps = _gemm_users(g, x, users, chan_axis)
        if not users:
            continue
        K = W.shape[0] // taps
        if st.chan_lo.shape != (K,):
            continue
        # per input channel and output: the L2 norm over the taps (a conv's c reaches n through them all)
        W = np.sqrt((W.reshape(K, taps, -1) ** 2).sum(axis=1))
        amax = np.maximum(np.abs(st.chan_lo), np.abs(st.chan_hi)).astype(np.float64)
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

        # a smoothed conv input costs a requantization pass over the activation (its producer is not a
        # LayerNorm): taken only where the expected error drops 4x; a Dense's, where it drops 10%
        gain = 0.9 if users[0].op == "Dense" else CONV_GAIN
        best_f, best_e = None, err(np.ones(K))
        for a in (0.25, 0.5, 0.75):
            if a > alpha + 1e-9:
                break
            f = np.ones(K)
            f[ok] = amax[ok] ** a / wmax[ok] ** (1 - a)
            f[ok] /= np.exp(np.mean(np.log(f[ok])))
            f = np.clip(f, 2.0**-8, 2.0**8)
            e = err(f)
            if e < gain * best_e:
                best_f, best_e = f, e
        if best_f is None:
            continue
        f = best_f
        rank = len(g.shape(x))
        along = (-1,) if chan_axis in (-1, rank - 1) else (K,) + (1,) * (rank - 2)  # f laid along the channel axis
        p = prod.get(x)
        if (p is not None and p.op in LN_OPS and len(all_users) == len(users) and p.attrs.get("act") is None
                and along == (-1,)):
            p.attrs = {**p.attrs, "gamma": np.asarray(p.attrs["gamma"], np.float64) / f,
                       "beta": np.asarray(p.attrs["beta"], np.float64) / f}
            xs = x
        else:
            xs = g.fresh(x + "/smooth")
            g.shapes[xs] = g.shape(x)
            g.dtypes[xs] = g.dtypes[x]
            node = Node("Affine", (p.name if p is not None else x) + "/smooth", [x], [xs],
                        {"scale": (1.0 / f).reshape(along).astype(np.float32),
                         "offset": np.zeros(K, np.float32).reshape(along)})
            new_nodes.setdefault(id(p) if p is not None else -1, node)
            for u in users:
                u.inputs = [xs] + list(u.inputs[1:])
        stats[xs] = st.scaled(f)
        for u in users:
            if hessians is not None:
                hessians.set_input_scale(u.name, np.repeat(1.0 / f, taps))  # columns (c, tap), c-major
            if u.op == "Dense":
                u.attrs = {**u.attrs, "weight": (u.attrs["weight"].astype(np.float64) * f[:, None]).astype(np.float32)}
            else:  # Conv [OC, C, *k]: input channel c scaled by f_c
                w = g.consts[u.inputs[1]].astype(np.float64)
                wn = g.add_const(g.fresh(u.inputs[1] + "/smooth"), (w * f.reshape((1, K) + (1,) * (w.ndim - 2)))
                                 .astype(np.float32))
                u.inputs = [u.inputs[0], wn] + list(u.inputs[2:])
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
