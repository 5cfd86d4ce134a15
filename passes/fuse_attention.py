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
   own scale and adds a large negative integer (see qcompiler/intops/transformer.py).  The mask
   may pass through data movement after its Cast (a Slice to the key length: replayed on the
   integer mask, ``MASK_MOVES``), and may reach the scores added to a bias first, as T5 adds it to
   its relative position bias: Add(x, Add(p, mask)) -> MaskAdd(Add(x, p), m).  The new sum takes
   the calibrated range of the Add's output (``passes/quantize.py`` ``permuted_stats``), which the
   calibration keeps clear of the mask's fill values (``qcompiler/calibrate.py`` FILL_MAGNITUDE).
"""

from __future__ import annotations

import numpy as np

from qcompiler.graph import Graph, Node


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
    before: dict[int, list] = {}  # nodes to insert before a node (a mask's Add / data movement)
    moved: dict = {}              # (a mask's move, integer input) -> its integer output
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
                x, term, bias = n.inputs[xi], _mask_term(g, prod, n.inputs[ti]), None
                if term is None:  # (scores + (bias + mask)): the bias added first, then the mask
                    inner = prod.get(n.inputs[ti])
                    if inner is None or inner.op != "Add" or len(inner.inputs) != 2 or x in g.consts:
                        continue
                    for pi, mi in ((0, 1), (1, 0)):
                        term, bias = _mask_term(g, prod, inner.inputs[mi]), inner.inputs[pi]
                        if term is not None and term[2] is None and bias not in g.consts:
                            break
                    else:
                        continue
                a, b, offset, m, moves = term
                if bias is not None or offset is not None:
                    # x + bias (a position bias, an activation or the constant offset the mask's
                    # Affine carries), then the mask: the sum must have the Add's shape
                    shapes = [g.shape(x), g.shape(bias) if bias is not None else np.shape(offset)]
                    if not _broadcasts_to(shapes, g.shape(n.outputs[0])):
                        continue
                    t = g.fresh(n.outputs[0] + "/unmasked")
                    g.shapes[t], g.dtypes[t] = tuple(g.shape(n.outputs[0])), g.dtypes[n.outputs[0]]
                    add = (Node("Add", n.name + "/unmasked", [x, bias], [t], {}) if bias is not None else
                           Node("Affine", n.name + "/unmasked", [x], [t],
                                {"scale": np.ones((1,) * np.ndim(offset), np.float32),
                                 "offset": np.asarray(offset, np.float32)}))
                    before.setdefault(id(n), []).append(add)
                    x = t
                for mv in moves:  # the mask's data movement, on the integer mask (once per move)
                    if (id(mv), m) not in moved:
                        mi_ = g.fresh(mv.outputs[0] + "/int")
                        g.shapes[mi_], g.dtypes[mi_] = tuple(g.shape(mv.outputs[0])), g.dtypes[m]
                        before.setdefault(id(n), []).append(Node(mv.op, mv.name + "/int",
                                                                 [m] + list(mv.inputs[1:]), [mi_], dict(mv.attrs)))
                        moved[(id(mv), m)] = mi_
                    m = moved[(id(mv), m)]
                n.op = "MaskAdd"
                n.inputs = [x, m]
                n.attrs = {"a": a, "b": b}
                break
    g.nodes = [k for n in g.nodes if id(n) not in dead for k in before.get(id(n), []) + [n]]
    g.prune()
    return g


# data movement a mask may pass between its Cast and its Add (it commutes with the affines);
# Gather: a constant index map (a broadcast, passes/canonicalize.py op_index)
MASK_MOVES = {"Slice", "Reshape", "Transpose", "Gather"}


def _uniform(v) -> float | None:
    """The value of a constant whose elements are all equal (a broadcast scalar), else None."""
    v = np.asarray(v, np.float64)
    return float(v.reshape(-1)[0]) if v.size and np.all(v == v.reshape(-1)[0]) else None


def _mask_term(g: Graph, prod: dict, t: str):
    """(a, b, offset, m, moves) where tensor ``t`` = a * moves(Cast(m)) + b + offset: m integer data (a
    0/1 mask), ``moves`` the data-movement nodes in order (``MASK_MOVES``, one data input), a + b = 0
    and b <= -1000 (a kept position adds 0, a masked one a large negative), ``offset`` None or a
    constant tensor an Affine on the way adds (T5's relative position bias, folded at fixed
    shapes); else None."""
    a, b, offset, moves, cur = 1.0, 0.0, None, [], t
    while True:
        p = prod.get(cur)
        if p is None:
            return None
        if p.op == "Affine" and p.attrs.get("act") is None:
            k, o = _uniform(p.attrs["scale"]), _scalar(p.attrs["offset"])
            if k is None:
                return None
            if o is None:  # a constant added after the moves: kept apart from the mask's own b
                if moves:
                    return None  # (one added before a move would have to move with it)
                add = a * np.asarray(p.attrs["offset"], np.float64)
                offset = add if offset is None else offset + add
                o = 0.0
            a, b = a * k, a * o + b  # a*(k*v + o) + b
        elif p.op in MASK_MOVES and all(i in g.consts for i in p.inputs[1:]):
            moves.append(p)
        elif p.op == "Cast" and cur != t:
            if abs(a + b) > 1e-6 * max(1.0, abs(b)) or b > -1000.0:
                return None
            return a, b, offset, p.inputs[0], moves[::-1]
        else:
            return None
        cur = p.inputs[0]


def _broadcasts_to(shapes: list, out) -> bool:
    """Whether ``shapes`` broadcast to ``out`` (their sum can stand for the Add's output)."""
    try:
        return tuple(np.broadcast_shapes(*(tuple(int(d) for d in sh) for sh in shapes))) == tuple(out)
    except ValueError:
        return False
