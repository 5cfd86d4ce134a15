"""Fold BatchNormalization (inference form) into the preceding convolution.

BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta = s * y + t with
    s = gamma / sqrt(var + eps),  t = beta - s * mean      (per channel).
After Conv(x; W, b):  W'[oc] = s[oc] * W[oc],  b' = s * b + t  (computed in float64), and the
Conv now produces the BN's output tensor (so the calibrated range of that name still applies).
A BN whose input is not a single-consumer Conv becomes Affine(x; s, t) = x * s + t with [C, 1, ...]
broadcast constants: a per-channel affine the quantizer turns into one dyadic requantization.
"""

from __future__ import annotations

import numpy as np

from qcompiler.graph import Graph, Node


def fold_batchnorm(g: Graph) -> Graph:
    g = g.copy()
    prod = g.producers()
    cons = g.consumers()
    out: list[Node] = []
    for n in g.nodes:
        if n.op != "BatchNormalization":
            out.append(n)
            continue
        x = n.inputs[0]
        gamma, beta, mean, var = (g.consts.get(i) for i in n.inputs[1:5])
        if any(v is None for v in (gamma, beta, mean, var)):
            out.append(n)  # training-mode statistics: left for the support check to report
            continue
        eps = float(n.attrs.get("epsilon", 1e-5))
        s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        t = beta.astype(np.float64) - s * mean.astype(np.float64)
        p = prod.get(x)
        if p is not None and p.op == "Conv" and len(cons.get(x, [])) == 1 and x not in g.outputs \
                and p.inputs[1] in g.consts:
            W = g.consts[p.inputs[1]].astype(np.float64)
            b = g.consts[p.inputs[2]].astype(np.float64) if len(p.inputs) > 2 and p.inputs[2] else 0.0
            wname = g.add_const(g.fresh(p.inputs[1] + "_bn"), (W * s.reshape(-1, *[1] * (W.ndim - 1))).astype(np.float32))
            bname = g.add_const(g.fresh(p.name + "_bn_bias"), (s * b + t).astype(np.float32))
            p.inputs = [p.inputs[0], wname, bname]
            p.outputs = [n.outputs[0]]
            continue
        rank = len(g.shape(x))
        shape = (-1,) + (1,) * (rank - 2)
        out.append(Node("Affine", n.name, [x], [n.outputs[0]],
                        {"scale": s.reshape(shape), "offset": t.reshape(shape)}))
    g.nodes = out
    g.prune()
    return g
