"""Resampling: Resize in linear / cubic modes (any coordinate_transformation_mode, antialias) and
the zero insertion of ConvTranspose; quantization rules and integer ops.

Resample(x; axes, maps)  (from Resize, ``passes/canonicalize.py``).  Resize of those modes is
      separable and linear along each resized axis: out[..., o, ...] = sum_t w[t, o] x[..., idx[t, o], ...].
      The per-axis maps are onnxruntime's own: canonicalize runs the node's Resize on an identity
      batch and keeps the nonzero taps (so every attribute combination is ONNX's exact rule).
      Integer form: weights to F = 12 fraction bits, wq = round(w * 2^F); the axes are applied one
      after the other with exact int64 sums (no rounding between them), then one dyadic step:
        acc = sum_t wq_1[t] x[idx_1[t]] ... (per axis),   y = clip(rq(acc; S_x / (S_y 2^(F n))), lo, hi)
      Error: the weight rounding (<= 2^-13 per tap, 0 for the power-of-two scales' 1/4, 3/4, ...)
      and the output rounding.  Bound: max|x| * prod_axes max_o sum_t |wq| < 2^62 / |mult|, the
      multiplier keeps only the bits that allow (>= 16).
GatherFill(x; axis, indices)  (from ConvTranspose) y = take(x, idx, axis) with idx = -1 -> 0: the
      zero-inserted and padded input of ConvTranspose, which canonicalize rewrites as
        ConvTranspose(x, W; s, pads, d, output_padding, group)
          = Conv(U, W'; stride 1, dilation d, group)   with U = x spread to every s-th position and
            padded by d(k-1) - pad_begin before and d(k-1) - pad_end + output_padding after
            (negative: cropped), W'[g, o, c] = W[g, c, o] flipped in space.
      Data movement: the scale passes through (0 is exact at any scale).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax

from qcompiler.lowering import layout as L
from qcompiler.lowering.relax_lower import Value, const
from qcompiler.symbolic import SymArray

from .registry import I64, Example, IntOp, float_ref, mag, register, rule

if TYPE_CHECKING:
    from passes.quantize import Quantizer

WEIGHT_BITS = 12


def _take_axis(x: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    return np.take(x, idx, axis=axis)


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def apply_maps(x: np.ndarray, axes, idx, w) -> np.ndarray:
    """sum_t w[t] * take(x, idx[t], axis) along each axis in turn (float or int64 arithmetic)."""
    acc = x
    for ax, ii, ww in zip(axes, idx, w):
        acc = sum(_take_axis(acc, ii[t], ax) * _along(ww[t], ax, acc.ndim) for t in range(ii.shape[0]))
    return acc


# ---- Resample (Resize linear / cubic) -----------------------------------------------------------------
@float_ref("Resample")
def _resample_f(x, n):
    a = n.attrs
    return apply_maps(np.asarray(x[0], np.float64), a["axes"], a["idx"], a["w"])


@rule("Resample")
def resample(qz: Quantizer, n):
    from .nonlinear import dyadic_limited

    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    a = n.attrs
    wq = [np.round(np.asarray(w, np.float64) * 2**WEIGHT_BITS).astype(np.int64) for w in a["w"]]
    gain = float(np.prod([np.abs(w).sum(axis=0).max() for w in wq]))
    accmax = max(abs(qx.qmin), abs(qx.qmax)) * gain
    bits = min(31, 61 - int(accmax).bit_length())
    d = dyadic_limited(qx.scale / (qy.scale * 2.0 ** (WEIGHT_BITS * len(wq))), bits, f"node '{n.name}'")
    qz.emit("resample", [qz.iname(x)], out,
            {"axes": tuple(a["axes"]), "idx": [np.asarray(i, np.int64) for i in a["idx"]], "w": wq,
             "mult": d.mult, "shift": d.shift, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@register
class ResampleOp(IntOp):
    """acc = the per-axis weighted gathers of ``apply_maps`` in int64 (exact), then
    y = clip(rq(acc; mult, shift), lo, hi).  Bound: max|x| * prod_axes max_o sum_t |w[t, o]| *
    |mult| + 2^(shift-1) < 2^63."""
    name = "resample"
    attrs = {"axes": "resampled axes (logical)", "idx": "per axis: int64 [T, out] source positions",
             "w": "per axis: int64 [T, out] weights (2^-12 units)", "mult": "output multiplier",
             "shift": "output shift", "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, a):
        acc = apply_maps(x.astype(np.int64), a["axes"], a["idx"], a["w"])
        s = np.int64(a["shift"])
        return np.clip((acc * np.int64(a["mult"]) + (np.int64(1) << (s - 1))) >> s, a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        inv = L.inverse(x.perm)
        rank = x.rank
        acc = lw.cast(x.expr, "int64")
        for ax, ii, ww in zip(a["axes"], a["idx"], a["w"]):
            pax = inv[ax]
            terms = []
            for t in range(ii.shape[0]):
                g = lw.take(acc, const(ii[t].astype(np.int32), "int32"), pax)
                terms.append(lw.emit(relax.op.multiply(g, const(_along(ww[t], pax, rank), "int64"))))
            acc = terms[0]
            for t in terms[1:]:
                acc = lw.emit(relax.op.add(acc, t))
        shift = int(a["shift"])
        t = lw.emit(relax.op.multiply(acc, const(int(a["mult"]), "int64")))
        t = lw.emit(relax.op.add(t, const(1 << (shift - 1), "int64")))
        t = lw.emit(relax.op.right_shift(t, const(shift, "int64")))
        t = lw.emit(relax.op.clip(t, int(a["lo"]), int(a["hi"])))
        return Value(lw.cast(t, a["dtype"]), x.perm, lw.ig.shapes[n.outputs[0]], a["dtype"])

    @staticmethod
    def bound(ctx, n, x):
        a = n.attrs
        gain = float(np.prod([np.abs(w).sum(axis=0).max() for w in a["w"]]))
        b = mag(x) * gain * abs(float(a["mult"])) + 2.0 ** (int(a["shift"]) - 1)
        if b > I64:
            ctx.fail(n, "the int64 interpolation sum", b, I64)

    @staticmethod
    def examples(rng):
        def lin(n_in, n_out):  # half-pixel bilinear taps
            o = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
            i0 = np.clip(np.floor(o), 0, n_in - 1).astype(np.int64)
            i1 = np.clip(i0 + 1, 0, n_in - 1)
            f = np.clip(o - np.floor(o), 0, 1)
            return np.stack([i0, i1]), np.round(np.stack([1 - f, f]) * 2**WEIGHT_BITS).astype(np.int64)
        (ih, wh), (iw, ww) = lin(5, 10), lin(4, 7)
        a = {"axes": (2, 3), "idx": [ih, iw], "w": [wh, ww], "mult": np.int64(1 << 20), "shift": np.int64(44),
             "lo": -128, "hi": 127, "dtype": "int8"}
        return [Example([("int8", (1, 3, 5, 4))], a, "int8"),
                Example([("int16", (2, 5, 3))], {**a, "axes": (1,), "idx": [ih], "w": [wh], "shift": np.int64(32),
                                                 "lo": -32768, "hi": 32767, "dtype": "int16"}, "int16")]


# ---- GatherFill (ConvTranspose's zero insertion) ------------------------------------------------------
@float_ref("GatherFill")
def _gather_fill_f(x, n):
    return GatherFillOp.reference(np.asarray(x[0], np.float64), n.attrs).astype(np.float64)


@rule("GatherFill")
def gather_fill(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    qz.emit("gather_fill", [qz.iname(x)], out, {"axis": int(n.attrs["axis"]), "indices": n.attrs["indices"]},
            qx.dtype, qz.fg.shape(out), qx, out, node_name=n.name)


@register
class GatherFillOp(IntOp):
    """y = take(x, indices, axis) where indices >= 0, else 0 (1-D indices along one axis)."""
    name = "gather_fill"
    attrs = {"axis": "gathered axis (logical)", "indices": "int64 [out] source positions, -1 = zero"}

    @staticmethod
    def reference(x, a):
        ax, idx = a["axis"], np.asarray(a["indices"], np.int64)
        pad_shape = list(x.shape)
        pad_shape[ax] = 1
        xp = np.concatenate([x, np.zeros(pad_shape, x.dtype)], axis=ax)
        return np.take(xp, np.where(idx < 0, x.shape[ax], idx), axis=ax)

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        ax = L.inverse(x.perm)[a["axis"]]
        if isinstance(a["indices"], SymArray):  # over a symbolic dim: stored at its largest size, read as a prefix
            return GatherFillOp._lower_symbolic(lw, n, x, ax)
        phys = list(L.physical_shape(x.shape, x.perm))
        size = phys[ax]
        phys[ax] = 1
        xp = lw.emit(relax.op.concat([x.expr, const(np.zeros(phys), x.dtype)], axis=ax))
        idx = np.asarray(a["indices"], np.int64)
        e = lw.take(xp, const(np.where(idx < 0, size, idx).astype(np.int32), "int32"), ax)
        return Value(e, x.perm, lw.ig.shapes[n.outputs[0]], x.dtype)

    @staticmethod
    def _lower_symbolic(lw, n, x, ax: int):
        """The indices of a symbolic extent (``symbolic.SymArray``: ConvTranspose's spread over an image
        width, every size's map a prefix of the largest one's): one TE kernel reads idx[o] and selects
        x or 0."""
        from tvm import te, tirx

        idx = np.asarray(n.attrs["indices"].data, np.int64).reshape(-1)
        shape = lw.ig.shapes[n.outputs[0]]
        out_phys = tuple(L.physical_shape(shape, x.perm))

        def f(xt, it):
            def body(*p):
                j = it[p[ax]].astype("int64")
                src = (*p[:ax], tirx.max(j, tirx.const(0, "int64")), *p[ax + 1:])
                return tirx.Select(j >= 0, xt[src], tirx.const(0, x.dtype))
            return te.compute(out_phys, body, name="gather_fill")

        y = lw.bb.emit_te(f, x.expr, const(idx.astype(np.int32), "int32"), primfunc_name_hint="gather_fill")
        return Value(y, x.perm, shape, x.dtype)

    @staticmethod
    def bound(ctx, n, x):
        return (min(x[0], 0), max(x[1], 0))

    @staticmethod
    def examples(rng):
        return [Example([("int8", (1, 3, 4, 5))], {"axis": 2, "indices": np.array([-1, 0, -1, 1, -1, 2, -1, 3])},
                        "int8"),
                Example([("uint8", (2, 6))], {"axis": 1, "indices": np.array([5, -1, 0, 0, -1])}, "uint8")]
