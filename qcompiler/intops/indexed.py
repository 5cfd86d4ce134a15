"""Gathers and scatters at indices computed at run time (graph networks' message passing, detection
post-processing), and IsNaN.

Integer ops:

  take_rt       y = take(x, idx, axis)                                   (ONNX Gather)
  gather_el     y[j] = x[j with axis coordinate idx[j]]                  (ONNX GatherElements)
  gather_nd     y[i, ...] = x[idx[i, 0], ..., idx[i, k-1], ...]          (ONNX GatherND, batch_dims 0)
  scatter       y = d;  y[j with axis coordinate idx[j]] (op)= u[j]      (ONNX ScatterElements; ``axis``)
                y = d;  y[idx[p, 0], ..., idx[p, k-1], ...] (op)= u[p, ...]   (ONNX ScatterND; ``axis`` None)
                op: update (the last write wins, as a serial loop), max, min on d and u requantized
                to y's QParams; add: acc = sum of u's codes per position (int32), then
                y = clip(rq(acc; S_u / S_y) + rq(d; S_d / S_y))

``idx`` is integer data (scale 1, ``intdata.py``), ``x``, ``d``, ``u`` integer activations.  A gather
moves codes: y keeps x's QParams.  A scatter's y takes its calibrated range; ``update`` / ``max`` /
``min`` requantize d and u to it first (one dyadic step each, exact comparisons after), ``add`` sums
u's codes first and rounds once (a node receiving many messages is not rounded once per message).
Negative indices count from the end (ONNX); out-of-range indices are an error in ONNX (onnxruntime
raises) and are clamped here (memory safety), in the reference and the kernels alike.

Bound: ``add`` sums at most ``u.shape[axis]`` codes into one position: that many times |u| must
stay below 2^31 (int32 accumulator), and the requantization products below 2^63.

IsNaN of an integer activation is false everywhere (integers hold no NaN): ``compare(x, x, lt)``.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from qcompiler.lowering import layout as L
from qcompiler.lowering.relax_lower import Value, const
from qcompiler.qtypes import dyadic, requant_ref

from .registry import I32, I64, Example, IntOp, float_ref, mag, register, rule

REDUCTIONS = ("none", "add", "max", "min")


def _norm_idx(idx: np.ndarray, dims) -> np.ndarray:
    """Negative indices from the end, then clamped into [0, dim - 1] (``dims`` broadcast on idx)."""
    d = np.asarray(dims, np.int64)
    i = idx.astype(np.int64)
    return np.clip(np.where(i < 0, i + d, i), 0, d - 1)


def _norm_idx_expr(lw, idx: Value, dims) -> relax.Expr:
    d = const(np.asarray(dims, np.int64), "int64")
    i = lw.cast(lw.logical(idx).expr, "int64")
    i = lw.emit(relax.op.where(relax.op.less(i, const(np.int64(0), "int64")), relax.op.add(i, d), i))
    return lw.emit(relax.op.clip(i, 0, int(np.max(dims)) - 1)) if np.ndim(dims) == 0 else \
        lw.emit(relax.op.minimum(relax.op.maximum(i, const(np.int64(0), "int64")),
                                 relax.op.subtract(d, const(np.int64(1), "int64"))))


def _int_index(qz, idx: str) -> str:
    """The integer tensor of index operand ``idx`` (a constant one added to the integer graph)."""
    if idx in qz.fg.consts:
        name = qz.fresh(f"{idx}/i")
        qz.ig.add_const(name, np.asarray(qz.fg.consts[idx], np.int64))
        qz.int_name[idx] = name
    return qz.iname(idx)


def _axis_gather(qz, n, op: str) -> None:
    """``op`` (take_rt / gather_el) of x at computed indices along the node's axis: x's QParams."""
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    axis = int(n.attrs.get("axis", 0)) % len(qz.fg.shape(x))
    qz.emit(op, [qz.iname(x), _int_index(qz, n.inputs[1])], out,
            {"axis": axis, "dim": int(qz.fg.shape(x)[axis])}, qx.dtype, qz.fg.shape(out), qx, out, node_name=n.name)


def take_rule(qz, n):
    """Gather with computed indices (called by the Gather rule of ``shape.py``)."""
    _axis_gather(qz, n, "take_rt")


class _Gathered(IntOp):
    """A gather: the codes move unchanged (the bound is the input's)."""

    @staticmethod
    def bound(ctx, n, x, idx):
        return x


def _out(lw, n, e, dtype: str) -> Value:
    shape = lw.ig.shapes[n.outputs[0]]
    return Value(e, L.identity(len(shape)), shape, dtype)


@register
class TakeOp(_Gathered):
    """y = take(x, idx, axis) at run-time indices, normalised as the module docstring says (``dim``
    = x.shape[axis]).  Bound: the codes move unchanged."""
    name = "take_rt"
    attrs = {"axis": "gathered axis (logical)", "dim": "x.shape[axis]"}

    @staticmethod
    def reference(x, idx, a):
        return np.take(x, _norm_idx(idx, a["dim"]), axis=a["axis"])

    @staticmethod
    def lower(lw, n, x, idx):
        i = lw.cast(_norm_idx_expr(lw, idx, int(n.attrs["dim"])), "int32")
        x = lw.logical(x)
        return _out(lw, n, lw.take(x.expr, i, int(n.attrs["axis"])), x.dtype)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (5, 3)), ("int64", (4,))], {"axis": 0, "dim": 5}, "int8", ranges={1: (-5, 6)}),
                Example([("uint8", (2, 6, 3)), ("int64", (2, 2))], {"axis": 1, "dim": 6}, "uint8", ranges={1: (-6, 5)})]


@rule("GatherElements")
def _gather_elements(qz, n):
    _axis_gather(qz, n, "gather_el")


@register
class GatherElementsOp(_Gathered):
    """y = take_along_axis(x, idx, axis) at run-time indices (``dim`` = x.shape[axis]).  Bound: the
    codes move unchanged."""
    name = "gather_el"
    attrs = {"axis": "gathered axis (logical)", "dim": "x.shape[axis]"}

    @staticmethod
    def reference(x, idx, a):
        return np.take_along_axis(x, _norm_idx(idx, a["dim"]), axis=a["axis"])

    @staticmethod
    def lower(lw, n, x, idx):
        i = _norm_idx_expr(lw, idx, int(n.attrs["dim"]))
        x = lw.logical(x)
        return _out(lw, n, lw.emit(relax.op.gather_elements(x.expr, i, int(n.attrs["axis"]))), x.dtype)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (5, 3)), ("int64", (2, 3))], {"axis": 0, "dim": 5}, "int8", ranges={1: (-5, 6)}),
                Example([("int16", (2, 6, 3)), ("int64", (2, 4, 3))], {"axis": 1, "dim": 6}, "int16",
                        ranges={1: (-6, 5)})]


def _gather_nd_check(g, n):
    if int(n.attrs.get("batch_dims", 0)) != 0:
        return "GatherND with batch_dims > 0"
    return None if len(n.inputs) >= 2 else "GatherND without indices"


@rule("GatherND", check=_gather_nd_check)
def gather_nd_rule(qz, n):
    x, idx, out = n.inputs[0], n.inputs[1], n.outputs[0]
    qx = qz.qp(x)
    k = int(qz.fg.shape(idx)[-1])
    qz.emit("gather_nd", [qz.iname(x), _int_index(qz, idx)], out, {"dims": tuple(int(d) for d in qz.fg.shape(x)[:k])},
            qx.dtype, qz.fg.shape(out), qx, out, node_name=n.name)


@register
class GatherNDOp(_Gathered):
    """y = x[idx[..., 0], ..., idx[..., k-1]] (module docstring); ``dims`` = x.shape[:k] for the
    index normalisation.  Bound: the codes move unchanged."""
    name = "gather_nd"
    attrs = {"dims": "the sizes of x's first k axes (k = idx.shape[-1])"}

    @staticmethod
    def reference(x, idx, a):
        i = _norm_idx(idx, a["dims"])
        return x[tuple(i[..., j] for j in range(i.shape[-1]))]

    @staticmethod
    def lower(lw, n, x, idx):
        i = _norm_idx_expr(lw, idx, np.asarray(n.attrs["dims"], np.int64))
        x = lw.logical(x)
        return _out(lw, n, lw.emit(relax.op.gather_nd(x.expr, i, 0)), x.dtype)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (5, 3, 4)), ("int64", (6, 2))], {"dims": (5, 3)}, "int8", ranges={1: (-3, 4)}),
                Example([("int16", (4, 7)), ("int64", (2, 3, 1))], {"dims": (4,)}, "int16", ranges={1: (-4, 5)})]


def _reduction(n) -> str:
    red = n.attrs.get("reduction", "none")
    return red.decode() if isinstance(red, bytes) else str(red)


def _scatter_check(g, n):
    return None if _reduction(n) in REDUCTIONS else f"{n.op} with reduction '{_reduction(n)}'"


@rule("ScatterElements", "ScatterND", check=_scatter_check)
def scatter_rule(qz, n):
    from qcompiler.qtypes import activation_qparams

    d, idx, u = n.inputs[:3]
    out = n.outputs[0]
    red = _reduction(n)
    axis = int(n.attrs.get("axis", 0)) % len(qz.fg.shape(d)) if n.op == "ScatterElements" else None
    qy = qz.out_qparams(out)
    qd = qz.ig.qparams[qz.iname(d)] if d not in qz.fg.consts else None
    qu = qz.ig.qparams[qz.iname(u)] if u not in qz.fg.consts else None
    if qu is None:  # constant updates (ones to count neighbours with): on a grid that holds them exactly
        v = np.asarray(qz.fg.consts[u], np.float64)
        amax = float(np.max(np.abs(v))) or 1.0
        qu = activation_qparams(-amax, amax, False, 8)
    qd = qd or qy
    ins = [qz.quantized_const(d, qd) if d in qz.fg.consts else qz.iname(d), _int_index(qz, idx),
           qz.quantized_const(u, qu) if u in qz.fg.consts else qz.iname(u)]
    dd, du = dyadic(np.asarray(qd.scale / qy.scale), f"node '{n.name}'"), dyadic(np.asarray(qu.scale / qy.scale),
                                                                                 f"node '{n.name}'")
    qz.emit("scatter", ins, out, {"axis": axis, "reduction": red, "mult_d": dd.mult, "shift_d": dd.shift,
                                     "mult_u": du.mult, "shift_u": du.shift, "lo": qy.qmin, "hi": qy.qmax,
                                     "dtype": qy.dtype}, qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


def _positions(idx: np.ndarray, axis: int | None, shape) -> tuple:
    """Index arrays of the positions a scatter writes: ScatterElements (``axis``): idx along it, the
    update's own coordinates on the other axes; ScatterND (``axis`` None): the rows of idx address
    the leading dims (an update's trailing dims follow through numpy's indexing)."""
    if axis is None:
        i = _norm_idx(idx, shape[:idx.shape[-1]])
        return tuple(i[..., t] for t in range(i.shape[-1]))
    i = _norm_idx(idx, shape[axis])
    grid = list(np.indices(i.shape, sparse=False))
    grid[axis] = i
    return tuple(grid)


@register
class ScatterOp(IntOp):
    """ScatterElements / ScatterND with a reduction (module docstring).  Bound: ``add`` sums at most
    (ScatterElements: u.shape[axis]; ScatterND: the rows of idx) codes into an int32 accumulator;
    each requantization product below 2^63."""
    name = "scatter"
    attrs = {"axis": "ScatterElements' scattered axis (logical); None: ScatterND", "reduction": "none | add | max | min",
             "mult_d": "multiplier S_d / S_y", "shift_d": "its shift", "mult_u": "multiplier S_u / S_y",
             "shift_u": "its shift", "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "output dtype"}

    @staticmethod
    def reference(d, idx, u, a):
        red = a["reduction"]
        pos = _positions(idx, a["axis"], d.shape)
        rd = requant_ref(d, a["mult_d"], a["shift_d"])
        if red == "add":
            acc = np.zeros(d.shape, np.int64)
            np.add.at(acc, pos, u.astype(np.int64))
            y = requant_ref(acc, a["mult_u"], a["shift_u"]) + rd
        else:
            y = np.clip(rd, a["lo"], a["hi"])
            ru = np.clip(requant_ref(u, a["mult_u"], a["shift_u"]), a["lo"], a["hi"])
            if red == "none":
                y[pos] = ru   # in order: the last write to a position wins
            else:
                (np.maximum if red == "max" else np.minimum).at(y, pos, ru)
        return np.clip(y, a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, d, idx, u):
        a = n.attrs
        ax, red = a["axis"], a["reduction"]
        d, u = lw.logical(d), lw.logical(u)
        if ax is None:  # ScatterND (ONNX's index layout, as Relax takes it)
            k = int(lw.ig.shapes[n.inputs[1]][-1])
            i = _norm_idx_expr(lw, idx, np.asarray(d.shape[:k], np.int64))

            def scatter(data, upd, how):
                return relax.op.scatter_nd(data, i, upd, how)
        else:
            i = _norm_idx_expr(lw, idx, int(d.shape[ax]))

            def scatter(data, upd, how):
                return relax.op.scatter_elements(data, i, upd, int(ax), how)

        def rq(v, m, s, lo=None, hi=None):
            t = lw.cast(v.expr if isinstance(v, Value) else v, "int64")
            return lw.requant_expr(t, d, m, s, None, lo if lo is not None else -(1 << 62),
                                   hi if hi is not None else (1 << 62), "int64")

        if red == "add":
            zeros = lw.emit(relax.op.zeros(relax.ShapeExpr(list(d.shape)), "int32"))
            acc = lw.emit(scatter(zeros, lw.cast(u.expr, "int32"), "add"))
            e = lw.emit(relax.op.add(rq(acc, a["mult_u"], a["shift_u"]), rq(d, a["mult_d"], a["shift_d"])))
            e = lw.cast(lw.emit(relax.op.clip(e, int(a["lo"]), int(a["hi"]))), a["dtype"])
        else:
            dy = lw.cast(rq(d, a["mult_d"], a["shift_d"], a["lo"], a["hi"]), a["dtype"])
            uy = lw.cast(rq(u, a["mult_u"], a["shift_u"], a["lo"], a["hi"]), a["dtype"])
            e = lw.emit(scatter(dy, uy, "update" if red == "none" else red))
        return _out(lw, n, e, a["dtype"])

    @staticmethod
    def bound(ctx, n, d, idx, u):
        a = n.attrs
        ishape = ctx.shapes[n.inputs[1]]
        count = 1 if a["reduction"] != "add" else \
            int(np.prod(ishape[:-1])) if a["axis"] is None else int(ctx.shapes[n.inputs[2]][int(a["axis"])])
        if count * mag(u) > I32:
            ctx.fail(n, "the int32 sum of the scattered codes", count * mag(u), I32)
        for v, m, what in ((count * mag(u), a["mult_u"], "updates"), (mag(d), a["mult_d"], "data")):
            if v * float(np.abs(m).max()) > I64:
                ctx.fail(n, f"the requantization of the {what}", v * float(np.abs(m).max()), I64)
        return (int(a["lo"]), int(a["hi"]))

    @staticmethod
    def examples(rng):
        one = dyadic(np.asarray(1.0), "example")
        half = dyadic(np.asarray(0.37), "example")
        base = {"mult_d": one.mult, "shift_d": one.shift, "mult_u": half.mult, "shift_u": half.shift,
                "lo": -128, "hi": 127, "dtype": "int8"}
        return [Example([("int8", (4, 5)), ("int64", (6, 5)), ("int8", (6, 5))], {**base, "axis": 0, "reduction": r},
                        "int8", ranges={1: (-4, 3)}) for r in REDUCTIONS] + \
               [Example([("int8", (3, 6)), ("int64", (3, 2)), ("int8", (3, 2))], {**base, "axis": 1, "reduction": "add"},
                        "int8", ranges={1: (0, 5)})] + \
               [Example([("int8", (5, 3, 4)), ("int64", (4, 2)), ("int8", (4, 4))], {**base, "axis": None, "reduction": r},
                        "int8", ranges={1: (-3, 3)}) for r in ("none", "add")] + \
               [Example([("int8", (6, 4)), ("int64", (3, 1)), ("int8", (3, 4))], {**base, "axis": None, "reduction": "max"},
                        "int8", ranges={1: (-6, 5)})]


# ---- float semantics (qcompiler/float_reference.py), indices normalised as the integer ops do ------
def _f(v):
    return np.asarray(v, np.float64)


@float_ref("Gather")
def _gather_f(x, n):
    axis = int(n.attrs.get("axis", 0)) % np.ndim(x[0])
    if "indices" in n.attrs:
        return np.take(_f(x[0]), np.asarray(n.attrs["indices"], np.int64), axis=axis)
    return np.take(_f(x[0]), _norm_idx(np.asarray(x[1]), np.shape(x[0])[axis]), axis=axis)


@float_ref("GatherElements")
def _gather_elements_f(x, n):
    axis = int(n.attrs.get("axis", 0)) % np.ndim(x[0])
    return np.take_along_axis(_f(x[0]), _norm_idx(np.asarray(x[1]), np.shape(x[0])[axis]), axis=axis)


@float_ref("GatherND")
def _gather_nd_f(x, n):
    d, idx = _f(x[0]), np.asarray(x[1])
    i = _norm_idx(idx, d.shape[:idx.shape[-1]])
    return d[tuple(i[..., j] for j in range(i.shape[-1]))]


@float_ref("ScatterElements", "ScatterND")
def _scatter_f(x, n):
    d, idx, u = _f(x[0]).copy(), np.asarray(x[1]), _f(x[2])
    axis = int(n.attrs.get("axis", 0)) % d.ndim if n.op == "ScatterElements" else None
    red = _reduction(n)
    pos = _positions(idx, axis, d.shape)
    if red == "none":
        d[pos] = u
    else:
        {"add": np.add, "max": np.maximum, "min": np.minimum}[red].at(d, pos, u)
    return d


@float_ref("IsNaN")
def _isnan_f(x, n):
    return np.isnan(_f(x[0]))


@rule("IsNaN")
def isnan_rule(qz, n):
    x, out = n.inputs[0], n.outputs[0]
    xi = qz.iname(x)
    qz.emit("compare", [xi, xi], out, {"mode": "lt", "mult_a": np.int64(1), "mult_b": np.int64(1)}, "uint8",
            qz.fg.shape(out), None, out, node_name=n.name)
