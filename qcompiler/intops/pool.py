"""Pooling and reductions: integers only; rules and integer ops.

Integer ops: maxpool, sumpool, reduce_sum, reduce_max, mean_requant (classes below).  Quantization rules:

MaxPool / ReduceMax   max of integers on the input's own scale (padding = the dtype's minimum)
AveragePool           s = window sum (int32);  y = rq(s; S_x / (S_y * count[p]))  with the ONNX
                      divisor count[p] of every output position p folded into per-position
                      dyadic constants at compile time (count_include_pad, ceil_mode handled)
ReduceSum             s = sum over axes (int32);  y = rq(s; S_x / S_y)
ReduceMean            s = sum over n elements (int32);  y = round(rq(s; S_x / S_y) / n)  (``mean_requant``:
                      the count n is an attribute of its own, not folded into the dyadic multiplier,
                      so that it stays a polynomial of the dims -- H * W of a GlobalAveragePool --
                      when they are symbolic; folded, the multiplier follows 1 / n in no polynomial way)
                      (GlobalAveragePool is ReduceMean over the spatial axes)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from qcompiler.lowering.relax_lower import Value
from qcompiler.qtypes import dyadic, requant_ref

from .registry import I32, Example, IntOp, dyadic_bound, float_ref, mag, register, rule

if TYPE_CHECKING:
    from passes.quantize import Quantizer


@rule("MaxPool")
def maxpool(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    a = {k: n.attrs[k] for k in ("kernel", "strides", "pads", "dilations")}
    qz.emit("maxpool", [qz.iname(x)], out, a, qx.dtype, qz.fg.shape(out), qx, out, node_name=n.name)


@rule("AveragePool")
def avgpool(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    shape = qz.fg.shape(out)
    a = {k: n.attrs[k] for k in ("kernel", "strides", "pads")}
    s = qz.emit("sumpool", [qz.iname(x)], qz.fresh(out + "/sum"), a, "int32", shape, None, node_name=n.name + "/sum")
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    count = np.asarray(n.attrs["count"], np.float64)
    dy = dyadic((qx.scale / qy.scale) / count[None, None], f"node '{n.name}'")
    qz.emit("requant", [s], out, {"mult": dy.mult, "shift": dy.shift, "lo": lo, "hi": hi, "dtype": qy.dtype,
                                  "acc_scale": qx.scale},
            qy.dtype, shape, qy, out, node_name=n.name)


MEAN_MULT_BITS = 16


def _reduce(qz: Quantizer, n, mean: bool):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    shape_in = qz.fg.shape(x)
    axes, keep = tuple(n.attrs["axes"]), bool(n.attrs["keepdims"])
    count = int(np.prod([shape_in[a] for a in axes]))
    s = qz.emit("reduce_sum", [qz.iname(x)], qz.fresh(out + "/sum"), {"axes": axes, "keepdims": keep}, "int64",
                qz.fg.shape(out), None, node_name=n.name + "/sum")
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    dy = dyadic(np.asarray(qx.scale / qy.scale), f"node '{n.name}'")
    a = {"mult": dy.mult, "shift": dy.shift, "lo": lo, "hi": hi, "dtype": qy.dtype, "acc_scale": qx.scale}
    if mean and count > 1 and dy.mult.size == 1:  # (a per-channel input scale keeps the count in its multipliers)
        # a 16-bit multiplier (error <= 2^-16 of the mean, under 0.002 of an 8-bit step): the int64
        # product s * mult then holds sums of up to 2^46, an int16 mean over 2048 x 2048 pixels and
        # more (the sum is over a size that may be symbolic: its bound must not depend on the size)
        from .nonlinear import dyadic_limited

        dm = dyadic_limited(float(np.asarray(qx.scale / qy.scale).reshape(-1)[0]), MEAN_MULT_BITS, f"node '{n.name}'")
        a.update(mult=dm.mult, shift=dm.shift)
        qz.emit("mean_requant", [s], out, {**a, "count": count}, qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)
    else:
        if mean:
            dy = dyadic(np.asarray(qx.scale / qy.scale / count), f"node '{n.name}'")
            a.update(mult=dy.mult, shift=dy.shift)
        qz.emit("requant", [s], out, a, qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@rule("ReduceMean")
def reduce_mean(qz: Quantizer, n):
    _reduce(qz, n, mean=True)


@rule("ReduceSum")
def reduce_sum(qz: Quantizer, n):
    _reduce(qz, n, mean=False)


@rule("ReduceMax")
def reduce_max(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    qz.emit("reduce_max", [qz.iname(x)], out, {"axes": tuple(n.attrs["axes"]), "keepdims": bool(n.attrs["keepdims"])},
            qx.dtype, qz.fg.shape(out), qx, out, node_name=n.name)


# ---- integer ops -------------------------------------------------------------------------------
def windows(x, kernel, strides, pads, dilations, fill):
    """The kernel-tap views of a 2-D pooling window over NCHW ``x`` padded with ``fill``."""
    n, c, h, w = x.shape
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilations
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]


_POOL_ATTRS = {"kernel": "(kh, kw)", "strides": "(sh, sw)", "pads": "(top, left, bottom, right)",
               "dilations": "(dh, dw)"}


def _pool_examples(rng, dtype):
    return [Example([(dtype, (1, 5, 9, 10))], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1),
                                              "dilations": (1, 1)}, dtype),
            Example([(dtype, (2, 3, 7, 7))], {"kernel": (2, 3), "strides": (1, 2), "pads": (0, 1, 1, 2),
                                              "dilations": (1, 1)}, dtype)]


@register
class MaxPoolOp(IntOp):
    """y = max over each window (padding = the dtype's minimum, never selected over a real value);
    the input's scale and dtype pass through."""
    name = "maxpool"
    attrs = _POOL_ATTRS

    @staticmethod
    def reference(x, a):
        fill = np.iinfo(x.dtype).min
        out = None
        for win in windows(x, a["kernel"], a["strides"], a["pads"], a["dilations"], fill):
            out = win.copy() if out is None else np.maximum(out, win)
        return out

    @staticmethod
    def lower(lw, n, x):
        return lw.pool(n, x, "max")

    @staticmethod
    def bound(ctx, n, x):
        return x

    @staticmethod
    def examples(rng):
        return _pool_examples(rng, "int8") + _pool_examples(rng, "uint8")[:1]


@register
class SumPoolOp(IntOp):
    """s = sum over each window (zero padding) in int32.  Bound: taps * max|x| < 2^31."""
    name = "sumpool"
    attrs = _POOL_ATTRS

    @staticmethod
    def reference(x, a):
        out = None
        for win in windows(x.astype(np.int64), a["kernel"], a["strides"], a["pads"], (1, 1), 0):
            out = win.copy() if out is None else out + win
        return out.astype(np.int32)

    @staticmethod
    def lower(lw, n, x):
        return lw.pool(n, x, "sum")

    @staticmethod
    def bound(ctx, n, x):
        m = float(np.prod(n.attrs["kernel"])) * mag(x)
        if m > I32:
            ctx.fail(n, "the int32 sum", m, I32)
        return (int(-m), int(m))

    @staticmethod
    def examples(rng):
        return [dataclasses.replace(e, out_dtype="int32") for e in _pool_examples(rng, "int8")]


def _reduce_examples(dtype):
    return [Example([(dtype, (2, 6, 5, 4))], {"axes": (2, 3), "keepdims": True}, dtype),
            Example([(dtype, (3, 7, 5))], {"axes": (1,), "keepdims": False}, dtype),
            Example([(dtype, (3, 7, 5))], {"axes": (0, 2), "keepdims": True}, dtype)]


@register
class ReduceSumOp(IntOp):
    """s = sum over ``axes`` in int64 (exact for any count a model has: a sum over a symbolic extent,
    a squeeze-excite mean over a 2048 x 2048 image's int16 features, outgrows int32).
    Bound: count * max|x| < 2^62."""
    name = "reduce_sum"
    attrs = {"axes": "reduced axes (logical)", "keepdims": "keep reduced axes as 1"}

    @staticmethod
    def reference(x, a):
        return np.sum(x.astype(np.int64), axis=tuple(a["axes"]), keepdims=a["keepdims"])

    @staticmethod
    def lower(lw, n, x):
        return lw.reduce(n, x, "sum")

    @staticmethod
    def bound(ctx, n, x):
        shp = ctx.shapes[n.inputs[0]]
        m = float(np.prod([shp[ax] for ax in n.attrs["axes"]])) * mag(x)
        if m > 2.0**62:
            ctx.fail(n, "the int64 sum", m, 2.0**62)
        return (int(-m), int(m))

    @staticmethod
    def examples(rng):
        return [dataclasses.replace(e, out_dtype="int64") for e in _reduce_examples("int16")]


@register
class MeanRequantOp(IntOp):
    """y = clip(floor((2t + n) / (2n)), lo, hi), t = (int64(s) * mult + 2^(shift-1)) >> shift: the sum
    ``s`` of n elements rescaled by the dyadic (mult, shift) of S_x / S_y, then divided by the count
    n with round half up (the mean; n an attribute, a polynomial of symbolic dims).  Two roundings:
    |y - s S_x / (n S_y)| <= 1/2 + 1/(2n) before the clip.
    Bound: |s| * |mult| + 2^(shift-1) < 2^62 (2t + n in int64)."""
    name = "mean_requant"
    attrs = {"mult": "int64 multiplier of S_x / S_y, |mult| < 2^16 (MEAN_MULT_BITS)", "shift": "int64 shift in 1..62",
             "count": "n, the number of elements summed (>= 1)", "lo": "clamp minimum", "hi": "clamp maximum",
             "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, a):
        t = requant_ref(x, np.asarray(a["mult"]), np.asarray(a["shift"]))
        c = np.int64(a["count"])
        return np.clip(np.floor_divide(2 * t + c, 2 * c), a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        from tvm import te, tirx

        a = n.attrs
        m, sh, c = int(a["mult"]), int(a["shift"]), a["count"]
        lo, hi, dt = int(a["lo"]), int(a["hi"]), a["dtype"]

        def f(xt, *cn):
            cnt = cn[0].astype("int64") if cn else tirx.const(int(c), "int64")

            def body(*p):
                t = (xt(*p).astype("int64") * m + (1 << (sh - 1))) >> sh
                return tirx.max(tirx.min(tirx.floordiv(t * 2 + cnt, cnt * 2), hi), lo).astype(dt)

            return te.compute(xt.shape, body, name="mean_requant")

        args = [x.expr] + ([] if isinstance(c, (int, np.integer)) else [c])  # (a symbolic count: a scalar argument)
        y = lw.bb.emit_te(f, *args, primfunc_name_hint="mean_requant")
        return Value(y, x.perm, x.shape, dt)

    @staticmethod
    def bound(ctx, n, x):
        b = dyadic_bound(float(mag(x)), n.attrs)
        if b > 2.0 ** 62:
            ctx.fail(n, "the int64 rescaled sum of the mean", b, 2 ** 62)

    @staticmethod
    def examples(rng):
        return [Example([("int32", (2, 6, 1, 1))], {"mult": np.int64(1518500250), "shift": np.int64(31), "count": 49,
                                                    "lo": -128, "hi": 127, "dtype": "int8"}, "int8"),
                Example([("int32", (1, 3, 5))], {"mult": np.int64(2 ** 30 + 12345), "shift": np.int64(40), "count": 7,
                                                 "lo": 0, "hi": 255, "dtype": "uint8"}, "uint8")]


@register
class ReduceMaxOp(IntOp):
    """y = max over ``axes`` (GlobalMaxPool, ReduceMax); scale and dtype pass through."""
    name = "reduce_max"
    attrs = {"axes": "reduced axes (logical)", "keepdims": "keep reduced axes as 1"}

    @staticmethod
    def reference(x, a):
        return np.max(x, axis=tuple(a["axes"]), keepdims=a["keepdims"])

    @staticmethod
    def lower(lw, n, x):
        return lw.reduce(n, x, "max")

    @staticmethod
    def bound(ctx, n, x):
        return x

    @staticmethod
    def examples(rng):
        return _reduce_examples("int8")


# ---- ArgMax / ArgMin ------------------------------------------------------------------------------
@rule("ArgMax", "ArgMin")
def argmax(qz: Quantizer, n):
    """The index of the largest (smallest) element: quantization is monotone, so the integers'
    arg max is the float one's, except between values that round to one integer (ties go to
    the first index, or the last with select_last_index, as ONNX says).  Output: int64 indices
    (integer data, no scale)."""
    x, out = n.inputs[0], n.outputs[0]
    a = {"mode": "max" if n.op == "ArgMax" else "min", "axis": int(n.attrs["axis"]),
         "keepdims": bool(n.attrs["keepdims"]), "last": bool(n.attrs.get("select_last_index", 0))}
    qz.emit("argmax", [qz.iname(x)], out, a, "int64", qz.fg.shape(out), None, out, node_name=n.name)


@float_ref("ArgMax", "ArgMin")
def _argmax_f(x, n):
    a = {"mode": "max" if n.op == "ArgMax" else "min", "axis": int(n.attrs["axis"]),
         "keepdims": bool(n.attrs["keepdims"]), "last": bool(n.attrs.get("select_last_index", 0))}
    return ArgMaxOp.reference(np.asarray(x[0]), a)


@register
class ArgMaxOp(IntOp):
    """y = int64 index of the max (mode max) or min along ``axis``; ties: the first index, or the
    last with ``last``.  No arithmetic to bound."""
    name = "argmax"
    attrs = {"mode": "max | min", "axis": "reduced axis (logical)", "keepdims": "keep the axis as 1",
             "last": "ties go to the last index"}

    @staticmethod
    def reference(x, a):
        ax = a["axis"]
        v = -x.astype(np.int64) if a["mode"] == "min" and x.dtype.kind in "iu" else (-x if a["mode"] == "min" else x)
        if a["last"]:
            v = np.flip(v, axis=ax)
        i = np.argmax(v, axis=ax)
        if a["last"]:
            i = x.shape[ax] - 1 - i
        return np.expand_dims(i, ax).astype(np.int64) if a["keepdims"] else i.astype(np.int64)

    @staticmethod
    def lower(lw, n, x):
        from tvm import relax

        from qcompiler.lowering.relax_lower import Value

        a = n.attrs
        x = lw.logical(x)
        e = lw.cast(x.expr, "int64")  # TVM's argmax starts from the dtype's minimum: a row of int8 -128 gave -1
        if a["mode"] == "min":
            e = lw.emit(relax.op.negative(e))
        ax = a["axis"]
        if a["last"]:
            e = lw.emit(relax.op.flip(e, axis=ax))
        i = lw.emit(relax.op.argmax(e, axis=ax, keepdims=bool(a["keepdims"])))
        i = lw.cast(i, "int64")
        if a["last"]:
            from qcompiler.lowering.relax_lower import const
            i = lw.emit(relax.op.subtract(const(x.shape[ax] - 1, "int64"), i))
        shape = lw.ig.shapes[n.outputs[0]]
        return Value(i, tuple(range(len(shape))), shape, "int64")

    @staticmethod
    def bound(ctx, n, x):
        return (0, ctx.shapes[n.inputs[0]][n.attrs["axis"]] - 1)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 7, 5))], {"mode": "max", "axis": 1, "keepdims": False, "last": False}, "int64"),
                Example([("int16", (3, 6))], {"mode": "min", "axis": 1, "keepdims": True, "last": True}, "int64"),
                Example([("uint8", (4, 9))], {"mode": "max", "axis": 0, "keepdims": True, "last": True}, "int64",
                        ranges={0: (0, 3)})]


# ---- TopK -------------------------------------------------------------------------------------------
@rule("TopK")
def topk(qz: Quantizer, n):
    """The k largest (smallest) integers along ``axis`` and their indices: quantization is monotone,
    so they are the float op's up to values that round to one integer (ties: the lower index first,
    as ONNX).  Values keep the input's scale; indices are int64 integer data."""
    x = n.inputs[0]
    qx = qz.qp(x)
    a = {"k": n.attrs["k"], "axis": n.attrs["axis"], "largest": bool(n.attrs["largest"])}
    for part, out in zip(("values", "indices"), n.outputs):
        if not out:
            continue
        dt = qx.dtype if part == "values" else "int64"
        qz.emit("topk", [qz.iname(x)], out, {**a, "output": part}, dt, qz.fg.shape(out),
                qx if part == "values" else None, out, node_name=f"{n.name}/{part}")


@float_ref("TopK")
def _topk_f(x, n):
    v = np.asarray(x[0], np.float64)
    ax, k = n.attrs["axis"], n.attrs["k"]
    order = np.argsort(-v if n.attrs["largest"] else v, axis=ax, kind="stable")
    idx = np.take(order, np.arange(k), axis=ax)
    return np.take_along_axis(v, idx, axis=ax), idx.astype(np.int64)


@register
class TopKOp(IntOp):
    """One output of TopK (``output``: values or indices), computed on distinct int64 keys so that
    ties are resolved as ONNX does whatever the sort: key = x * L + (L - 1 - i) for the largest
    (x * L + i for the smallest), L the axis length; the k largest (smallest) keys give
    x = key // L and i = L - 1 - key % L (i = key % L).  Bound: |x| * L < 2^62."""
    name = "topk"
    attrs = {"k": "how many", "axis": "axis (logical)", "largest": "largest (else smallest)",
             "output": "values | indices"}

    @staticmethod
    def reference(x, a):
        ax, k, L = a["axis"], a["k"], x.shape[a["axis"]]
        i = np.arange(L).reshape([-1 if d == ax else 1 for d in range(x.ndim)])
        xv = x.astype(np.int64)
        key = xv * L + ((L - 1 - i) if a["largest"] else i)
        srt = -np.sort(-key, axis=ax) if a["largest"] else np.sort(key, axis=ax)
        top = np.take(srt, np.arange(k), axis=ax)
        if a["output"] == "values":
            return (top // L).astype(x.dtype)
        r = top % L
        return (L - 1 - r if a["largest"] else r).astype(np.int64)

    @staticmethod
    def lower(lw, n, x):
        from tvm import relax

        from qcompiler.lowering.relax_lower import Value, const

        a = n.attrs
        x = lw.logical(x)
        ax, k, L = a["axis"], a["k"], x.shape[a["axis"]]
        i = np.arange(L, dtype=np.int64).reshape([-1 if d == ax else 1 for d in range(x.rank)])
        key = lw.emit(relax.op.multiply(lw.cast(x.expr, "int64"), const(L, "int64")))
        key = lw.emit(relax.op.add(key, const((L - 1 - i) if a["largest"] else i, "int64")))
        top = lw.emit(relax.op.topk(key, k=k, axis=ax, ret_type="values", largest=bool(a["largest"]),
                                    dtype="int64"))
        shape = lw.ig.shapes[n.outputs[0]]
        if a["output"] == "values":
            e = lw.cast(lw.emit(relax.op.floor_divide(top, const(L, "int64"))), x.dtype)
            return Value(e, tuple(range(len(shape))), shape, x.dtype)
        r = lw.emit(relax.op.floor_mod(top, const(L, "int64")))
        if a["largest"]:
            r = lw.emit(relax.op.subtract(const(L - 1, "int64"), r))
        return Value(r, tuple(range(len(shape))), shape, "int64")

    @staticmethod
    def bound(ctx, n, x):
        L = ctx.shapes[n.inputs[0]][n.attrs["axis"]]
        if mag(x) * L >= 2.0**62:
            ctx.fail(n, "the int64 sort keys", mag(x) * L, 2.0**62)
        if n.attrs["output"] == "indices":
            return (0, L - 1)
        return x

    @staticmethod
    def examples(rng):
        ex = []
        for out, dt in (("values", "int8"), ("indices", "int64")):
            ex.append(Example([("int8", (3, 9))], {"k": 4, "axis": 1, "largest": True, "output": out}, dt,
                              ranges={0: (-3, 3)}))
            ex.append(Example([("int16", (5, 2, 3))], {"k": 2, "axis": 0, "largest": False, "output": out},
                              "int16" if out == "values" else "int64"))
        return ex
