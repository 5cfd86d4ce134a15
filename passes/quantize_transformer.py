"""Quantization rules for the transformer plumbing: integer data, masks, embeddings, divisions.

Cast(int -> float)   integer data (an attention mask, token-type ids) used as numbers: the values are
                     exact at scale 1.  y = clip(x, floor(lo), ceil(hi)) in the narrowest integer
                     type holding the calibrated range [lo, hi] (a mask: [0, 1] -> uint8); values
                     outside the calibrated range saturate (state it for non-mask data).
MaskAdd(x, m; a, b)  y = x + a*m + b with a*1 + b = 0 and b << 0 (passes/fuse_attention.py): the
                     scores keep their scale S_x and widen to int32;
                     y = clip(x + clip(m, +-2^20) * A + B, -2^31, 2^31 - 1), A = round(a/S_x),
                     B = round(b/S_x) (both clipped to +-2^30).  For m = 1 the terms cancel
                     exactly (A = -B); for m = 0 the score drops by >= 2^30 - 2^16 steps, far more
                     than the 31 * ln2 / S_x steps after which the integer exp is exactly 0, so a
                     masked position gets exactly zero weight (padding cannot change the result).
Embedding(ids; T)    T quantized per tensor, symmetric int8 at S = max|T| / 127 (the table is
                     known, so no calibration clipping); y = Tq[clip(ids, 0, V-1)].  Out-of-range
                     ids are rejected at run time by qcompiler.runtime (the library clamps them
                     only for memory safety).
Div(x, d)            x / d for a positive integer activation d (e.g. the token count of a mean
                     pooling).  With M = S_x / (S_d * S_y) = mult * 2^-shift (dyadic):
                       t = x * mult;  if shift > 31: t = (t + 2^(s1-1)) >> s1, s1 = shift - 31
                       D = max(d, 1) << min(shift, 31)
                       y = clip(floor((t + (D >> 1)) / D), lo, hi)
                     one integer division per element, rounding half up; |t| < 2^62, D < 2^62.
MatMul alpha         MatMul(a, b; alpha) (fuse_attention) requantizes with alpha * S_a * S_b / S_y.
Residual stream      an Add / Affine whose every consumer is a LayerNorm keeps its output in
                     int16 (I-ViT): LayerNorm statistics want the finer grid, the int16 stays in
                     bounds (|y| <= 2^15, y^2 sums in int64) and costs only the Add's own output.
"""

from __future__ import annotations

import math

import numpy as np

from qcompiler.errors import QuantizationError
from qcompiler.qtypes import QParams, dyadic

from .quantize import Quantizer, rule


def _int_dtype_for(lo: int, hi: int) -> str:
    for dt, (a, b) in (("uint8", (0, 255)), ("int8", (-128, 127)), ("int16", (-32768, 32767))):
        if a <= lo and hi <= b:
            return dt
    return "int32"


@rule("Cast")
def cast(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    xi = qz.iname(x)
    if xi in qz.ig.qparams:
        raise QuantizationError(f"node '{n.name}' (Cast): casting a quantized activation is not supported")
    st = qz.stats.get(out)
    if st is None:
        raise QuantizationError(f"no calibration range for tensor '{out}'")
    lo, hi = int(math.floor(st.lo)), int(math.ceil(st.hi))
    lo, hi = max(lo, -(2**31)), min(hi, 2**31 - 1)
    dt = _int_dtype_for(lo, hi)
    qz.emit("int_cast", [xi], out, {"lo": lo, "hi": hi, "dtype": dt}, dt, qz.fg.shape(out), QParams(1.0, dt), out,
            node_name=n.name)


@rule("MaskAdd")
def mask_add(qz: Quantizer, n):
    x, m = n.inputs
    out = n.outputs[0]
    qx = qz.qp(x)
    A = int(np.clip(np.round(n.attrs["a"] / qx.scale), -(2**30), 2**30))
    B = int(np.clip(np.round(n.attrs["b"] / qx.scale), -(2**30), 2**30))
    qy = QParams(qx.scale, "int32")
    qz.emit("maskadd", [qz.iname(x), qz.iname(m)], out,
            {"A": A, "B": B, "lo": -(2**31), "hi": 2**31 - 1, "dtype": "int32"},
            "int32", qz.fg.shape(out), qy, out, node_name=n.name)


@rule("Embedding")
def embedding(qz: Quantizer, n):
    ids, out = n.inputs[0], n.outputs[0]
    t = np.asarray(n.attrs["table"], np.float64)
    amax = float(np.abs(t).max()) or 1.0
    s = amax / 127.0
    tq = np.clip(np.round(t / s), -127, 127).astype(np.int8)
    qz.emit("embedding", [qz.iname(ids)], out, {"table": tq}, "int8", qz.fg.shape(out), QParams(s, "int8"), out,
            node_name=n.name)


def _div_check(g, n):
    if any(i in g.consts for i in n.inputs):
        return "constant operand (expected Mul by the reciprocal)"
    return None


@rule("Div", check=_div_check)
def div(qz: Quantizer, n):
    x, d = n.inputs
    out = n.outputs[0]
    qx, qd = qz.qp(x), qz.qp(d)
    st = qz.stats.get(d)
    if st is not None and st.lo <= 0:
        raise QuantizationError(f"node '{n.name}' (Div): the denominator '{d}' is not positive on the calibration "
                                f"data (min {st.lo:g}); only divisions by a positive activation are supported")
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    dy = dyadic(qx.scale / (qd.scale * qy.scale), f"node '{n.name}'")
    qz.emit("div", [qz.iname(x), qz.iname(d)], out,
            {"mult": int(dy.mult), "shift": int(dy.shift), "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)
