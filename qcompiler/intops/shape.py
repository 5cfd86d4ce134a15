"""Data movement: the integers move, the scale passes through unchanged; rules and integer ops.

Integer ops: reshape, transpose, concat, slice, gather, pad (classes below).  Quantization rules:

Reshape, Transpose, Slice, Gather (constant indices), Pad (value -> round(value / S)) keep the
input's QParams.  Concat needs one scale for all inputs: when they already agree the inputs are
concatenated as they are; otherwise each input is requantized to the output's calibrated scale
(y_i = rq(x_i; S_i / S_y)) first.  Constant inputs (a ViT class token) are quantized at the
output's scale at compile time: q = clip(round(c / S_y)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax

from qcompiler.graph import Node
from qcompiler.lowering import layout as L
from qcompiler.lowering.relax_lower import Value, const
from qcompiler.qtypes import dyadic
from qcompiler.symbolic import AffineMap

from .registry import Example, IntOp, register, rule

if TYPE_CHECKING:
    from passes.quantize import Quantizer


def _passthrough(qz: Quantizer, n, op: str, attrs: dict):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x) if qz.iname(x) in qz.ig.qparams else None
    dtype = qx.dtype if qx else qz.ig.dtypes[qz.iname(x)]
    qz.emit(op, [qz.iname(x)], out, attrs, dtype, qz.fg.shape(out), qx, out, node_name=n.name)


@rule("Reshape")
def reshape(qz, n):
    _passthrough(qz, n, "reshape", {"shape": tuple(qz.fg.shape(n.outputs[0]))})


@rule("Transpose")
def transpose(qz, n):
    _passthrough(qz, n, "transpose", {"perm": tuple(n.attrs["perm"])})


@rule("Slice")
def slice_(qz, n):
    _passthrough(qz, n, "slice", {k: list(n.attrs[k]) for k in ("starts", "ends", "axes", "steps")})


def _gather_check(g, n):
    if "indices" not in n.attrs and (len(n.inputs) < 2 or n.inputs[0] in g.consts):
        return "non-constant indices into a non-embedding tensor"
    return None


@rule("Gather", check=_gather_check)
def gather(qz, n):
    if "indices" not in n.attrs:  # indices computed at run time (intops/indexed.py)
        from .indexed import take_rule

        take_rule(qz, n)
        return
    _passthrough(qz, n, "gather", {"indices": np.asarray(n.attrs["indices"], np.int64), "axis": int(n.attrs["axis"])})


@rule("Pad")
def pad(qz, n):
    qx = qz.qp(n.inputs[0])
    v = int(np.clip(np.round(n.attrs["value"] / qx.scale), qx.qmin, qx.qmax))
    _passthrough(qz, n, "pad", {"pads": list(n.attrs["pads"]), "value": v})


@rule("Concat")
def concat(qz, n):
    out = n.outputs[0]
    ins = [i for i in n.inputs if 0 not in tuple(qz.fg.shape(i))]  # empty pieces add nothing (and an
    if len(ins) == 1:                                               # empty constant cannot be serialized)
        _passthrough(qz, Node(n.op, n.name, ins, n.outputs, {}), "reshape", {"shape": tuple(qz.fg.shape(out))})
        return
    consts = [i for i in ins if i in qz.fg.consts]
    if consts:  # constant pieces (a class token): quantized at the output's calibrated scale
        qy = qz.out_qparams(out)
        for c in consts:
            qz.int_name[c] = qz.quantized_const(c, qy)
    qps = [qz.qp(i) for i in ins]
    if all(q == qps[0] for q in qps):
        qy = qps[0]
        srcs = [qz.iname(i) for i in ins]
    else:
        qy = qz.out_qparams(out)
        srcs = []
        for i, q in zip(ins, qps):
            if q == qy:
                srcs.append(qz.iname(i))
                continue
            dy = dyadic(np.asarray(q.scale / qy.scale), f"node '{n.name}'")
            srcs.append(qz.emit("requant", [qz.iname(i)], qz.fresh(f"{out}/in_{i}"),
                                {"mult": dy.mult, "shift": dy.shift, "lo": qy.qmin, "hi": qy.qmax, "dtype": qy.dtype},
                                qy.dtype, qz.fg.shape(i), qy, node_name=f"{n.name}/requant_{i}"))
    qz.emit("concat", srcs, out, {"axis": int(n.attrs["axis"])}, qy.dtype, qz.fg.shape(out), qy, out,
            node_name=n.name)


# ---- integer ops (pure data movement: the output interval is the input's) ---------------------------
class _Move(IntOp):
    @staticmethod
    def bound(ctx, n, *ins):
        return (min(i[0] for i in ins), max(i[1] for i in ins))


@register
class ReshapeOp(_Move):
    """y = x.reshape(shape) (row-major, logical order)."""
    name = "reshape"
    attrs = {"shape": "output shape"}

    @staticmethod
    def reference(x, a):
        return x.reshape(a["shape"])

    @staticmethod
    def lower(lw, n, x):
        shape = tuple(n.attrs["shape"])
        if tuple(shape) == tuple(x.shape):
            return x
        x = lw.logical(x)
        return Value(lw.emit(relax.op.reshape(x.expr, shape)), L.identity(len(shape)), shape, x.dtype)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 3, 4))], {"shape": (6, 4)}, "int8"),
                Example([("int16", (2, 12))], {"shape": (2, 3, 2, 2)}, "int16")]


@register
class TransposeOp(_Move):
    """y = transpose(x, perm); free in the lowering (the layout tracks the permutation)."""
    name = "transpose"
    attrs = {"perm": "axis permutation"}

    @staticmethod
    def reference(x, a):
        return np.transpose(x, a["perm"])

    @staticmethod
    def lower(lw, n, x):
        perm = tuple(n.attrs["perm"])
        shape = tuple(x.shape[p] for p in perm)
        return Value(x.expr, L.after_transpose(x.perm, perm), shape, x.dtype)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 3, 4, 5))], {"perm": (0, 2, 3, 1)}, "int8"),
                Example([("uint8", (3, 4))], {"perm": (1, 0)}, "uint8")]


@register
class ConcatOp(_Move):
    """y = concatenate(inputs, axis); the inputs share one scale and dtype (the rule requantizes)."""
    name = "concat"
    attrs = {"axis": "concatenation axis (logical)"}

    @staticmethod
    def reference(*xs):
        *xs, a = xs
        return np.concatenate(xs, axis=a["axis"])

    @staticmethod
    def lower(lw, n, *xs):
        perm = xs[0].perm
        xs = [lw.to_perm(v, perm) for v in xs]
        ax = L.inverse(perm)[n.attrs["axis"]]
        e = lw.emit(relax.op.concat([v.expr for v in xs], axis=ax))
        return Value(e, perm, lw.ig.shapes[n.outputs[0]], xs[0].dtype)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 3, 4)), ("int8", (2, 5, 4)), ("int8", (2, 1, 4))], {"axis": 1}, "int8")]


SPLIT_MIN = 8
"""A tensor cut into at least this many unit-step slices along one axis (a Split, the time steps of
an unrolled recurrence) is cut by one kernel with one output per slice, opaque to FuseOps: fused
into their consumers, the slices would make each consumer a kernel of its own (one per time step,
where the steps are otherwise identical and share their kernels)."""


def _split_piece(lw, n, x):
    """This slice's output from the one multi-output kernel of its group, or None (not in a group)."""
    groups = lw.__dict__.setdefault("_split_groups", {})
    key = (n.inputs[0], tuple(x.perm))
    if key not in groups:
        groups[key] = _split_group(lw, n.inputs[0], x)
    g = groups[key]
    if g is None or n.name not in g["index"]:
        return None
    if g["tuple"] is None:
        g["tuple"] = lw.emit(g["call"], "split")
    return lw.emit(relax.TupleGetItem(g["tuple"], g["index"][n.name]))


def _split_group(lw, src: str, x):
    from tvm import te, tirx

    from .boundary import OPAQUE

    def unit(m):
        a = m.attrs
        return m.op == "slice" and m.inputs[0] == src and len(a["axes"]) == 1 and list(a["steps"]) == [1]

    sibs = [m for m in lw.ig.nodes if unit(m)]
    by_axis: dict[int, list] = {}
    for m in sibs:
        by_axis.setdefault(int(m.attrs["axes"][0]), []).append(m)
    if not by_axis:
        return None
    axis, members = max(by_axis.items(), key=lambda kv: len(kv[1]))
    if len(members) < SPLIT_MIN:
        return None
    phys = L.physical_shape(x.shape, x.perm)
    if not all(isinstance(d, (int, np.integer)) for d in phys):
        return None  # a symbolic extent: each slice is its own kernel
    phys = [int(d) for d in phys]
    pax = L.inverse(x.perm)[axis]
    X = te.placeholder([tirx.IntImm("int64", d) for d in phys], x.dtype, "x")
    outs, types, index = [], [], {}
    for k, m in enumerate(members):
        st = int(m.attrs["starts"][0])
        en = m.attrs["ends"][0]
        en = phys[pax] if en is None else min(int(en), phys[pax])
        oshape = list(phys)
        oshape[pax] = max(en - st, 0)

        def shifted(st):
            def f(*i):
                j = list(i)
                j[pax] = i[pax] + tirx.IntImm("int64", st)
                return X(*j)
            return f
        outs.append(te.compute([tirx.IntImm("int64", d) for d in oshape], shifted(st), name=f"piece{k}"))
        types.append(relax.TensorType(shape=tuple(oshape), dtype=x.dtype))
        index[m.name] = k
    func = te.create_prim_func([X, *outs]).without_attr("global_symbol").with_attr("op_pattern", OPAQUE)
    gv = lw.bb.add_func(func, "qc_split")
    return {"call": relax.call_tir(gv, [x.expr], types), "tuple": None, "index": index}


@register
class SliceOp(_Move):
    """y = x[starts:ends:steps] along ``axes`` (normalised: starts/ends in range, None = to the end)."""
    name = "slice"
    attrs = {"starts": "per axis", "ends": "per axis (None: past the end for a negative step)",
             "axes": "sliced axes (logical)", "steps": "per axis, may be negative"}

    @staticmethod
    def reference(x, a):
        idx = [slice(None)] * x.ndim
        for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
            idx[ax] = slice(st, en, sp)
        return x[tuple(idx)]

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        inv = L.inverse(x.perm)
        shape = lw.ig.shapes[n.outputs[0]]
        piece = _split_piece(lw, n, x)
        if piece is not None:
            return Value(piece, x.perm, shape, x.dtype)
        if not all(isinstance(v, (int, np.integer)) for v in list(a["starts"]) + [e for e in a["ends"] if e is not None]):
            return _symbolic_slice(lw, n, x, shape)  # (an end at a symbolic size: x[:, :S] of a longer mask)
        axes, begins, ends, strides = [], [], [], []
        for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
            axes.append(inv[ax])
            begins.append(int(st))
            strides.append(int(sp))
            ends.append(int(en) if en is not None else (-(2**31) if sp < 0 else 2**31 - 1))
        e = lw.emit(relax.op.strided_slice(x.expr, axes, begins, ends, strides))
        return Value(e, x.perm, shape, x.dtype)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 7, 9))], {"starts": [1, 8], "ends": [6, None], "axes": [1, 2],
                                                "steps": [2, -3]}, "int8")]


def _symbolic_slice(lw, n, x, shape) -> Value:
    """A slice whose start follows a symbolic dim (the last step of a loop's output, x[T-1:T]): one
    TE copy, y[i] = x[start + step * i] along the sliced axes (the starts are passed to emit_te as
    arguments, so their size variables become the kernel's own)."""
    from tvm import te

    from tvm.sym import Analyzer
    from tvm import tirx

    a = n.attrs
    inv = L.inverse(x.perm)
    phys = L.physical_shape(shape, x.perm)
    in_shape = lw.ig.shapes[n.inputs[0]]
    # a start at a fixed distance from the end of its axis (x[T-1:T]) is read from the input's
    # extent inside the kernel: an expression passed as an argument would stop FuseTIR from fusing
    # the copy (it takes single variables only)
    from_end, args = {}, []
    for st, ax in zip(a["starts"], a["axes"]):
        if isinstance(st, (int, np.integer)):
            continue
        d = Analyzer().simplify(st - in_shape[ax])
        if isinstance(d, tirx.IntImm):
            from_end[ax] = int(d)
        else:
            args.append(st)

    def f(xt, *ex):
        it = iter(ex)
        begin = {}
        for st, ax, sp in zip(a["starts"], a["axes"], a["steps"]):
            k = inv[ax]
            b = (xt.shape[k] + from_end[ax] if ax in from_end
                 else (st if isinstance(st, (int, np.integer)) else next(it)))
            begin[k] = (b, int(sp))

        def body(*i):
            return xt[tuple(begin[k][0] + begin[k][1] * v if k in begin else v for k, v in enumerate(i))]
        return te.compute(phys, body, name="sym_slice")

    return Value(lw.bb.emit_te(f, x.expr, *args, primfunc_name_hint="sym_slice"), x.perm, shape, x.dtype)


@register
class GatherOp(_Move):
    """y = take(x, indices, axis) with constant indices (Resize-nearest, Tile, DepthToSpace, ...
    become a gather over a flat index map, ``passes/index_map.py``)."""
    name = "gather"
    attrs = {"indices": "int64 constant indices (any shape)", "axis": "gathered axis (logical)"}

    @staticmethod
    def reference(x, a):
        return np.take(x, a["indices"], axis=a["axis"])

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        shape = lw.ig.shapes[n.outputs[0]]
        if isinstance(a["indices"], AffineMap):  # a symbolic dim's index map (qcompiler/symbolic.py)
            x = lw.logical(x)
            e = lw.affine_take(x.expr, a["indices"], a["axis"])
            return Value(e, L.identity(len(shape)), shape, x.dtype)
        idx = np.asarray(a["indices"], np.int64)
        if idx.ndim == 1:
            ax = L.inverse(x.perm)[a["axis"]]
            e = lw.take(x.expr, const(idx.astype(np.int32), "int32"), ax)
            return Value(e, x.perm, shape, x.dtype)
        x = lw.logical(x)
        e = lw.take(x.expr, const(idx.astype(np.int32), "int32"), a["axis"])
        return Value(e, L.identity(len(shape)), shape, x.dtype)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 6, 3))], {"indices": np.array([5, 0, 0, 2], np.int64), "axis": 1}, "int8"),
                Example([("int16", (24,))], {"indices": rng.integers(0, 24, (3, 4)).astype(np.int64), "axis": 0},
                        "int16")]


@register
class PadOp(_Move):
    """y = pad(x, pads, value) with a constant integer value (ONNX pads: all begins, then all ends)."""
    name = "pad"
    attrs = {"pads": "begins of every axis, then ends", "value": "integer fill value"}

    @staticmethod
    def reference(x, a):
        p = a["pads"]
        r = x.ndim
        return np.pad(x, [(p[i], p[i + r]) for i in range(r)], constant_values=a["value"])

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        r = x.rank
        p = a["pads"]
        width = []
        for i in range(r):
            lg = x.perm[i]
            width += [int(p[lg]), int(p[lg + r])]
        e = lw.emit(relax.op.nn.pad(x.expr, width, pad_value=float(a["value"])))
        return Value(e, x.perm, lw.ig.shapes[n.outputs[0]], x.dtype)

    @staticmethod
    def bound(ctx, n, x):
        v = n.attrs["value"]
        return (min(x[0], v), max(x[1], v))

    @staticmethod
    def examples(rng):
        return [Example([("int8", (1, 3, 4, 5))], {"pads": [0, 0, 1, 2, 0, 1, 3, 0], "value": -7}, "int8")]
