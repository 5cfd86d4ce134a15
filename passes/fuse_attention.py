"""Attention-specific rewrites of the float graph (exact in float).

0. Dense epilogue:  Affine(Dense(x; W, b); k, o)  ->  Dense(x; W * k, b * k + o)
   when k and o vary only along the last axis (a bias Add exported as Add(bias, MatMul), which the
   canonicalizer leaves as a separate Affine) and the Dense output has no other consumer.

1. Scale folding:  Affine(MatMul(a, b); k, 0)  ->  MatMul(a, b; alpha = k)
   when k is a scalar, the offset is 0 and the MatMul output has no other consumer.  The product
   of two activations then gets one requantization with the factor alpha * S_a * S_b / S_y (the
   1/sqrt(d) of attention scores folded into it) instead of two.  The MatMul takes the Affine's
   output name, so calibration ranges stay those of the scaled scores.

2. Attention mask:  Add(x, Affine(Cast(m); a, b))  ->  MaskAdd(x, m; a, b)
   where m is integer data (a 0/1 mask), the Add feeds only a Softmax, and the added term is 0
   where m = 1 and large negative (<= -1000) where m = 0 (HF exports: (1 - m) * finfo.min or
   (1 - m) * -10000).  Float semantics: y = x + a*m + b.  Calibrating y directly would stretch its
   range to -3.4e38 and destroy the scores' resolution; the quantizer instead keeps the scores'
   own scale and adds a large negative integer (see qcompiler/intops/transformer.py).
"""

from __future__ import annotations

import numpy as np

from qcompiler.graph import Graph


def _scalar(v) -> float | None:
    v = np.asarray(v)
    if v.size != 1:
        return None
    return float(v.reshape(()))


def fuse_attention(g: Graph) -> Graph:
    g = g.copy()
    prod = g.producers()
    cons = g.consumers()
    dead: set[int] = set()
    for n in g.nodes:
        if id(n) in dead:
            continue
        # 0. bias / per-column scale after a Dense
        if n.op == "Affine" and n.attrs.get("act") is None and g.shape(n.outputs[0]):
            d = prod.get(n.inputs[0])
            N = g.shape(n.outputs[0])[-1]
            k, o = np.asarray(n.attrs["scale"], np.float64), np.asarray(n.attrs["offset"], np.float64)
            if (d is not None and d.op == "Dense" and d.attrs.get("act") is None
                    and len(cons.get(d.outputs[0], [])) == 1 and d.outputs[0] not in g.outputs
                    and all(int(np.prod(v.shape[:-1])) == 1 and v.shape[-1:] in ((1,), (N,)) for v in (k, o) if v.ndim)):
                kv = np.broadcast_to(k.reshape(-1), (N,))
                ov = np.broadcast_to(o.reshape(-1), (N,))
                W = d.attrs["weight"].astype(np.float64) * kv[None, :]
                b = d.attrs.get("bias")
                b = (np.zeros(N) if b is None else b.astype(np.float64)) * kv + ov
                d.attrs = {**d.attrs, "weight": W.astype(np.float32), "bias": b.astype(np.float32)}
                d.outputs = list(n.outputs)
                dead.add(id(n))
                continue
        # 1. MatMul(act, act) followed by a scalar scale
        if n.op == "Affine" and n.attrs.get("act") is None:
            k, o = _scalar(n.attrs["scale"]), _scalar(n.attrs["offset"])
            mm = prod.get(n.inputs[0])
            if (k is not None and o == 0.0 and mm is not None and mm.op == "MatMul"
                    and mm.attrs.get("act") is None and len(cons.get(mm.outputs[0], [])) == 1
                    and mm.outputs[0] not in g.outputs and all(i not in g.consts for i in mm.inputs)):
                mm.attrs = {**mm.attrs, "alpha": float(mm.attrs.get("alpha", 1.0)) * k}
                mm.outputs = list(n.outputs)
                dead.add(id(n))
                continue
        # 2. additive attention mask
        if n.op == "Add" and len(n.inputs) == 2:
            users = cons.get(n.outputs[0], [])
            if len(users) != 1 or users[0].op != "Softmax" or n.outputs[0] in g.outputs:
                continue
            for xi, ti in ((0, 1), (1, 0)):
                # a chain of scalar Affines back to a Cast of integer data: term = a*m + b
                a, b, t = 1.0, 0.0, n.inputs[ti]
                aff = prod.get(t)
                while aff is not None and aff.op == "Affine" and aff.attrs.get("act") is None:
                    k, o = _scalar(aff.attrs["scale"]), _scalar(aff.attrs["offset"])
                    if k is None or o is None:
                        break
                    a, b = a * k, a * o + b  # a*(k*v + o) + b
                    t = aff.inputs[0]
                    aff = prod.get(t)
                cast = prod.get(t)
                if cast is None or cast.op != "Cast" or t == n.inputs[ti]:
                    continue
                if abs(a + b) > 1e-6 * max(1.0, abs(b)) or b > -1000.0:
                    continue
                n.op = "MaskAdd"
                n.inputs = [n.inputs[xi], cast.inputs[0]]
                n.attrs = {"a": a, "b": b}
                break
    g.nodes = [n for n in g.nodes if id(n) not in dead]
    g.prune()
    return g
