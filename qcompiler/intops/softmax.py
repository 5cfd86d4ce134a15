"""Integer softmax: I-BERT i-exp (default) or I-ViT Shiftmax, one integer division per row.

Input x (scale S) along ``axis``:
  d  = (x - max(x)) << u                 u >= 0 refines the grid: S' = S / 2^u, so that
                                         q_ln2 = floor(ln2 / S') >= 2^10 (u < 0: a grid too fine
                                         for the int32 bound is coarsened, d = (x - max) >> -u)
i-exp (I-BERT, Kim et al. 2021), exp(t) for t = d*S' <= 0, t = -z*ln2 + p, p in (-ln2, 0]:
  z  = floor(-d / q_ln2),  p = d + z*q_ln2
  L  = (p + q_b)^2 + q_c                 q_b = floor(b/S'), q_c = floor(c/(a*S'^2)),
                                         (a, b, c) = (0.3585, 1.353, 0.344): exp(p) ~ a(p+b)^2 + c
  e  = L >> min(z, 31)                   e ~ exp(t) / (a*S'^2)
Shiftmax (I-ViT, Li & Gu 2023), base-2 with shifts only:
  v  = d + (d >> 1) - (d >> 4)           v*S' ~ t*log2(e)
  z  = floor(-v / q_1), r = v + z*q_1    q_1 = floor(1/S'): t*log2(e) = -z + r*S', r*S' in (-1, 0]
  e  = (((r >> 1) + q_1) << N) >> min(z, 62)  2^(r S') ~ 1 + r S'/2;  N = 15 (0 once z >= 31)
Normalisation (both):
  s  = sum(e)  (int64; s >= e_max > 0)   k = floor(2^R / s)  (the one division per row, R = 60)
  y  = clip((e * k) >> (R - ob), 0, qmax)   output scale 2^-ob (ob = 8 inside the graph: uint8;
                                         a graph output gets int16 with ob = 15)
Bounds (checked here at compile time, and again by ``SoftmaxOp.bound``): e < 2^30, e*k <= 2^(R+1) < 2^63.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from tvm import relax

from qcompiler.errors import QuantizationError
from qcompiler.lowering import layout as L
from qcompiler.lowering.relax_lower import Value, const
from qcompiler.qtypes import QParams

from .registry import Example, IntOp, float_ref, mag, register, rule

if TYPE_CHECKING:
    from passes.quantize import Quantizer

A, B, C = 0.3585, 1.353, 0.344
R_SHIFT = 60
SHIFT_N = 15


def _exp_constants(s: float, variant: str) -> tuple[dict, int]:
    if variant == "iexp":
        c = {"q_ln2": math.floor(math.log(2) / s), "q_b": math.floor(B / s), "q_c": math.floor(C / (A * s * s))}
        return c, c["q_b"] ** 2 + c["q_c"]
    c = {"q_1": math.floor(1.0 / s)}
    return c, c["q_1"] << SHIFT_N


def softmax_constants(scale: float, variant: str) -> dict:
    """u = max(0, ceil(log2(2^10 S / ln2))); when the input grid is so fine that the exp bound
    breaks int32 there (a near-constant calibrated input, e.g. random data), the grid is coarsened
    instead: u < 0, d = (x - max) >> -u (floor), which puts q_ln2 in [2^10, 2^11)."""
    u_fit = math.ceil(math.log2(2**10 * scale / math.log(2)))
    for u in dict.fromkeys((max(0, u_fit), u_fit)):
        c, emax = _exp_constants(scale / 2.0**u, variant)
        if emax < 2**30:
            break
    else:
        raise QuantizationError(f"integer softmax: exp bound {emax} >= 2^30 for input scale {scale:g}")
    c.update({"u": u, "variant": variant, "R": R_SHIFT, "N": SHIFT_N})
    return c


LOG_OB = 15  # LogSoftmax: the softmax at 2^-15 steps, then a log table over its 2^15 + 1 codes


@rule("LogSoftmax")
def log_softmax(qz: Quantizer, n):
    """log(softmax(x)) = a table of log over the integer softmax at 2^-15 steps: p = softmax(x)
    (int16, p * 2^-15), y = T[p], T[i] = clip(round(log(max(i, 1/2) * 2^-15) / S_y)).  Exact up to
    the softmax's 2^-15 resolution: a probability below 2^-16 reads as log(2^-16) ~ -11.1 (the
    arg max, what CTC decoding and classifiers read, is kept)."""
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    qp = QParams(2.0 ** -LOG_OB, "int16")
    attrs = softmax_constants(qx.scale, qz.cfg.softmax)
    attrs.update({"axis": int(n.attrs["axis"]), "ob": LOG_OB, "lo": 0, "hi": qp.qmax, "dtype": "int16"})
    p = qz.emit("softmax", [qz.iname(x)], qz.fresh(out + "/softmax"), attrs, "int16", qz.fg.shape(out), qp,
                node_name=n.name + "/softmax")
    qy = qz.out_qparams(out)
    codes = np.arange(qp.qmin, qp.qmax + 1, dtype=np.float64)
    f = np.log(np.maximum(codes, 0.5) * qp.scale)
    table = np.clip(np.round(f / qy.scale), qy.qmin, qy.qmax).astype(qy.dtype)
    qz.emit("lut", [p], out, {"table": table, "offset": -qp.qmin, "dtype": qy.dtype}, qy.dtype, qz.fg.shape(out), qy,
            out, node_name=n.name)


@float_ref("LogSoftmax")
def _log_softmax_f(x, n):
    z = x[0] - x[0].max(axis=n.attrs["axis"], keepdims=True)
    return z - np.log(np.exp(z).sum(axis=n.attrs["axis"], keepdims=True))


@rule("Softmax")
def softmax(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    is_output = out in qz.fg.outputs
    ob = 15 if is_output else qz.cfg.softmax_out_bits
    dtype = "int16" if is_output else ("uint8" if ob <= 8 else "int16")
    qy = QParams(2.0 ** -ob, dtype)
    attrs = softmax_constants(qx.scale, qz.cfg.softmax)
    attrs.update({"axis": int(n.attrs["axis"]), "ob": ob, "lo": 0, "hi": qy.qmax, "dtype": dtype})
    qz.emit("softmax", [qz.iname(x)], out, attrs, dtype, qz.fg.shape(out), qy, out, node_name=n.name)


def _emax(a: dict) -> int:
    """The largest e of the exp step (at d = 0) for the node's constants."""
    return a["q_b"] ** 2 + a["q_c"] if a["variant"] == "iexp" else a["q_1"] << a["N"]


@register
class SoftmaxOp(IntOp):
    """The integer softmax of the module docstring, step for step in int64, along ``axis``.
    Bound: |x - max| << u < 2^62, e <= e_max < 2^30, row sums < L * 2^30, e * k <= 2^(R+1) < 2^63."""
    name = "softmax"
    attrs = {"axis": "softmax axis (logical)", "variant": "iexp | shift", "u": "input grid refinement (shift)",
             "q_ln2": "iexp: floor(ln2 / S')", "q_b": "iexp: floor(b / S')", "q_c": "iexp: floor(c / (a S'^2))",
             "q_1": "shift: floor(1 / S')", "N": "shift: mantissa bits", "R": "normalisation shift (60)",
             "ob": "output fraction bits", "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "output dtype"}

    @staticmethod
    def reference(x, a):
        ax = a["axis"]
        xi = x.astype(np.int64)
        diff = xi - xi.max(axis=ax, keepdims=True)
        d = diff << a["u"] if a["u"] >= 0 else diff >> -a["u"]
        if a["variant"] == "iexp":
            z = (-d) // a["q_ln2"]
            p = d + z * a["q_ln2"]
            e = ((p + a["q_b"]) * (p + a["q_b"]) + a["q_c"]) >> np.minimum(z, 31)
        else:
            v = d + (d >> 1) - (d >> 4)
            z = (-v) // a["q_1"]
            r = v + z * a["q_1"]
            e = (((r >> 1) + a["q_1"]) << a["N"]) >> np.minimum(z, 62)  # 2^-z decay, 0 once z >= 31
        s = e.sum(axis=ax, keepdims=True)
        k = (np.int64(1) << a["R"]) // s
        return np.clip((e * k) >> (a["R"] - a["ob"]), a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        ax = L.inverse(x.perm)[a["axis"]]
        i64 = lambda v: const(v, "int64")  # noqa: E731
        # the row max in the input's own dtype (the same value; an int64 copy of x read by the max
        # and the subtract would be a kernel and a tensor of its own)
        mxe = lw.emit(relax.op.max(x.expr, axis=[ax], keepdims=True))
        q = int(a["q_ln2"]) if a["variant"] == "iexp" else 0
        u = int(a["u"])
        i32 = lambda v: const(v, "int32")  # noqa: E731
        # the exp step in int32 (twice the vector lanes of int64, no 64-bit division / multiplies) and
        # e stored as int32 (e <= e_max < 2^30: half the bytes of the three passes over the scores):
        # d = max(diff << u, -32 q_ln2) changes no e -- for d <= -31 q_ln2, z >= 31 and e = L2 >> 31
        # = 0 as 0 < L2 <= e_max < 2^30 (q_c >= 0, q_b >= q_ln2: p + q_b in (0, q_b])
        exp32 = a["variant"] == "iexp" and a["q_c"] >= 0 and a["q_b"] >= q and 40 * q < 2**31
        if exp32 and x.dtype in ("int8", "uint8", "int16") and -31 < u and 32 * q + 2 ** max(u, 0) < 2**31:
            # x - max in int32 too (|diff| < 2^17), clamped at -ceil(32 q_ln2 / 2^u) before the shift:
            # the same d, and |diff << u| <= 32 q_ln2 + 2^u < 2^31
            diff = lw.emit(relax.op.subtract(lw.cast(x.expr, "int32"), lw.cast(mxe, "int32")))
            if u >= 0:
                diff = lw.emit(relax.op.maximum(diff, i32(-(32 * q) // 2**u)))
                d32 = lw.emit(relax.op.left_shift(diff, i32(u)))
            else:
                d32 = lw.emit(relax.op.right_shift(diff, i32(-u)))  # arithmetic: floor
            d32 = lw.emit(relax.op.maximum(d32, i32(-32 * q)))
        else:
            diff = lw.emit(relax.op.subtract(lw.cast(x.expr, "int64"), lw.cast(mxe, "int64")))
            d = lw.emit(relax.op.left_shift(diff, i64(u)) if u >= 0 else
                        relax.op.right_shift(diff, i64(-u)))  # arithmetic: floor
            d32 = lw.cast(lw.emit(relax.op.maximum(d, i64(-32 * q))), "int32") if exp32 else None
        if exp32:
            z = lw.emit(relax.op.floor_divide(lw.emit(relax.op.negative(d32)), i32(q)))
            pb = lw.emit(relax.op.add(lw.emit(relax.op.add(d32, lw.emit(relax.op.multiply(z, i32(q))))),
                                      i32(a["q_b"])))
            L2 = lw.emit(relax.op.add(lw.emit(relax.op.multiply(pb, pb)), i32(a["q_c"])))
            e = lw.emit(relax.op.right_shift(L2, lw.emit(relax.op.minimum(z, i32(31)))))
        elif a["variant"] == "iexp":
            neg = lw.emit(relax.op.negative(d))
            z = lw.emit(relax.op.floor_divide(neg, i64(a["q_ln2"])))
            p = lw.emit(relax.op.add(d, lw.emit(relax.op.multiply(z, i64(a["q_ln2"])))))
            pb = lw.emit(relax.op.add(p, i64(a["q_b"])))
            L2 = lw.emit(relax.op.add(lw.emit(relax.op.multiply(pb, pb)), i64(a["q_c"])))
            e = lw.emit(relax.op.right_shift(L2, lw.emit(relax.op.minimum(z, i64(31)))))
        else:
            v = lw.emit(relax.op.subtract(lw.emit(relax.op.add(d, lw.emit(relax.op.right_shift(d, i64(1))))),
                                          lw.emit(relax.op.right_shift(d, i64(4)))))
            z = lw.emit(relax.op.floor_divide(lw.emit(relax.op.negative(v)), i64(a["q_1"])))
            r = lw.emit(relax.op.add(v, lw.emit(relax.op.multiply(z, i64(a["q_1"])))))
            base = lw.emit(relax.op.add(lw.emit(relax.op.right_shift(r, i64(1))), i64(a["q_1"])))
            e = lw.emit(relax.op.right_shift(lw.emit(relax.op.left_shift(base, i64(a["N"]))),
                                             lw.emit(relax.op.minimum(z, i64(62)))))
        # an int32 e: a cast of its own into the row sum and into the normalization (each fuses there)
        e64 = (lambda: lw.cast(e, "int64")) if exp32 else (lambda: e)
        s = lw.emit(relax.op.sum(e64(), axis=[ax], keepdims=True))
        k = lw.emit(relax.op.floor_divide(i64(1 << a["R"]), s))
        y = lw.emit(relax.op.right_shift(lw.emit(relax.op.multiply(e64(), k)), i64(a["R"] - a["ob"])))
        y = lw.emit(relax.op.clip(y, int(a["lo"]), int(a["hi"])))
        return Value(lw.cast(y, a["dtype"]), x.perm, x.shape, a["dtype"])

    @staticmethod
    def bound(ctx, n, x):
        a = n.attrs
        span = 2.0 * mag(x) * 2.0 ** max(a["u"], 0)
        if span >= 2.0**62 or a["u"] < -62:  # a degenerate input scale (e.g. corrupt weights): d = diff << u
            ctx.fail(n, f"the refined exp argument (input grid shift u = {a['u']})", span, 2.0**62)
        if _emax(a) >= 2**30:
            ctx.fail(n, "the integer exp", float(_emax(a)), 2.0**30)
        L_ = ctx.shapes[n.inputs[0]][a["axis"]]
        if float(L_) * 2**30 >= 2.0**62:
            ctx.fail(n, "the int64 row sum of exps", float(L_) * 2**30, 2.0**62)

    @staticmethod
    def examples(rng):
        out = []
        for variant, scale, dtype in (("iexp", 0.05, "int8"), ("shift", 0.002, "int16"), ("iexp", 1e-5, "int16")):
            a = softmax_constants(scale, variant)
            a.update({"axis": 2, "ob": 8, "lo": 0, "hi": 255, "dtype": "uint8"})
            out.append(Example([(dtype, (2, 3, 11, 4))], a, "uint8"))
        a = dict(a, axis=3, ob=15, hi=32767, dtype="int16")
        out.append(Example([("int16", (2, 3, 11, 4))], a, "int16"))
        return out
