"""Quantization rules for GEMM-like ops: Conv (1-D/2-D, groups), Dense (constant weights), MatMul.

For y = act(x * W + b) with x at scale S_x, weights per output channel oc:
    S_w[oc] = max|W[oc]| / 127,   W_q = round(W / S_w)                       (int8)
    b_q[oc] = round(b[oc] / (S_x * S_w[oc]))                                 (int32)
    M[oc]   = S_x * S_w[oc] / S_y  ->  (mult[oc], shift[oc])  (dyadic, DESIGN §2)
    y_q     = clip((int64(sum x_q * W_q + b_q) * mult + 2^(shift-1)) >> shift, lo, hi)
with [lo, hi] the output dtype's range intersected with the fused activation (ReLU: lo = 0).
MatMul of two activations (attention) uses per-tensor M = S_a * S_b / S_y.
"""

from __future__ import annotations

import numpy as np

from qcompiler.errors import QuantizationError
from qcompiler.qtypes import dyadic, quantize_weights

from .quantize import Quantizer, rule


BIAS_LIMIT = 2**26  # |b_q| budget: leaves int32 headroom for the products' sum


def _weights_and_bias(W, b, s_in, axis, bits, name):
    """Per-channel weights, with S_w raised where needed so that |b / (S_x S_w)| <= 2^26: a channel
    of near-zero weights and a large (BN-folded) bias would otherwise overflow the int32 bias."""
    wq, sw = quantize_weights(W, axis=axis, bits=bits)
    if b is None:
        return wq, sw, np.zeros(len(sw), np.int32)
    b = b.astype(np.float64)
    need = np.abs(b) / (s_in * BIAS_LIMIT)
    if np.any(need > sw):
        sw = np.maximum(sw, need)
        shape = [1] * W.ndim
        shape[axis] = -1
        qmax = 2 ** (bits - 1) - 1
        wq = np.clip(np.round(W / sw.reshape(shape)), -qmax - 1, qmax).astype(np.int8)
    q = np.round(b / (s_in * sw))
    if np.any(np.abs(q) > BIAS_LIMIT):
        raise QuantizationError(f"node '{name}': the bias does not fit int32 at scale S_x*S_w")
    return wq, sw, q.astype(np.int32)


def _conv_check(g, n):
    if n.inputs[1] not in g.consts:
        return "weights must be constant"
    r = len(g.shape(n.inputs[0]))
    if r not in (3, 4):
        return f"{r - 2}-D convolution (1-D and 2-D only)"
    if len(n.inputs) > 2 and n.inputs[2] and n.inputs[2] not in g.consts:
        return "bias must be constant"
    return None


def _conv_pads(g, n, k, s, d):
    in_shape, out_shape = g.shape(n.inputs[0]), g.shape(n.outputs[0])
    nd = len(k)
    auto = n.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for ax in range(nd):
            total = max((out_shape[2 + ax] - 1) * s[ax] + d[ax] * (k[ax] - 1) + 1 - in_shape[2 + ax], 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[ax], pads[ax + nd] = lo, total - lo
        return pads
    return list(n.attrs.get("pads", [0] * (2 * nd)))


@rule("Conv", check=_conv_check)
def conv(qz: Quantizer, n):
    g = qz.fg
    x = n.inputs[0]
    W = g.consts[n.inputs[1]].astype(np.float64)
    b = g.consts[n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] else None
    nd = W.ndim - 2
    k = list(W.shape[2:])
    s = list(n.attrs.get("strides", [1] * nd))
    d = list(n.attrs.get("dilations", [1] * nd))
    pads = _conv_pads(g, n, k, s, d)
    group = int(n.attrs.get("group", 1))
    qx = qz.qp(x)
    wq, sw, bq = _weights_and_bias(W, b, qx.scale, 0, qz.cfg.weight_bits, n.name)
    out = n.outputs[0]
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    dy = dyadic(qx.scale * sw / qy.scale, f"node '{n.name}'")
    xi = qz.iname(x)
    out_shape = g.shape(out)
    if nd == 1:  # 1-D conv as a 2-D conv over [N, C, 1, L]
        N, C, L = g.shape(x)
        x4 = qz.emit("reshape", [xi], qz.fresh(out + "/in4d"), {"shape": (N, C, 1, L)}, qx.dtype, (N, C, 1, L), qx)
        wq, k, s, d = wq[:, :, None, :], [1] + k, [1] + s, [1] + d
        pads = [0, pads[0], 0, pads[1]]
        shape4 = (out_shape[0], out_shape[1], 1, out_shape[2])
    else:
        x4, shape4 = xi, out_shape
        pads = [pads[0], pads[1], pads[2], pads[3]]  # ONNX (top, left, bottom, right)
    attrs = {"weight": wq, "bias": bq, "mult": dy.mult, "shift": dy.shift,
             "lo": lo, "hi": hi, "dtype": qy.dtype, "strides": tuple(s), "pads": tuple(pads),
             "dilations": tuple(d), "group": group, "weight_bits": qz.cfg.weight_bits}
    if nd == 1:
        y4 = qz.emit("conv", [x4], qz.fresh(out + "/out4d"), attrs, qy.dtype, shape4, qy, node_name=n.name)
        qz.emit("reshape", [y4], out, {"shape": out_shape}, qy.dtype, out_shape, qy, out)
    else:
        qz.emit("conv", [x4], out, attrs, qy.dtype, shape4, qy, out, node_name=n.name)


@rule("Dense")
def dense(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    W = n.attrs["weight"].astype(np.float64)  # [K, N]
    qx = qz.qp(x)
    wq, sw, bq = _weights_and_bias(W, n.attrs.get("bias"), qx.scale, 1, qz.cfg.weight_bits, n.name)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    dy = dyadic(qx.scale * sw / qy.scale, f"node '{n.name}'")
    attrs = {"weight": wq, "bias": bq, "mult": dy.mult,
             "shift": dy.shift, "lo": lo, "hi": hi, "dtype": qy.dtype, "weight_bits": qz.cfg.weight_bits}
    qz.emit("dense", [qz.iname(x)], out, attrs, qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


def _matmul_check(g, n):
    if any(i in g.consts for i in n.inputs):
        return "constant operand of rank != 2"
    return None


@rule("MatMul", check=_matmul_check)
def matmul(qz: Quantizer, n):
    a, b = n.inputs
    out = n.outputs[0]
    qa, qb = qz.qp(a), qz.qp(b)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    alpha = float(n.attrs.get("alpha", 1.0))  # folded attention scale (passes/fuse_attention.py)
    dy = dyadic(alpha * qa.scale * qb.scale / qy.scale, f"node '{n.name}'")
    qz.emit("matmul", [qz.iname(a), qz.iname(b)], out,
            {"mult": dy.mult, "shift": dy.shift, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)
