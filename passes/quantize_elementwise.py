"""Quantization rules for elementwise ops, all in integer arithmetic.

Add(a, b)       y = clip((a*ma + b*mb + 2^(s-1)) >> s), ma = round(S_a/S_y*2^s), mb = round(S_b/S_y*2^s)
                (one shared shift, so the two branches are rounded once, not twice)
Mul(a, b)       y = rq(a*b; S_a*S_b/S_y)
Affine(x; k, o) y = clip((x*m + round(o/S_y*2^s) + 2^(s-1)) >> s),  m/2^s = k*S_x/S_y  (per element
                of the broadcast constants; covers BN, Mul/Add/Sub/Div by constants)
Clip            clamp at [ceil(min/S), floor(max/S)] on the input's own scale (no requantization)
PRelu(x; a)     y = rq(x; S_x/S_y) if x >= 0 else rq(x; a*S_x/S_y)   (shared shift, signed mult)
HardSigmoid     y = clip(rq(x; alpha*S_x/S_y, add = beta/S_y), 0, floor(1/S_y))
HardSwish       h = clip(rq(x; alpha*S_x/S_h, add = beta/S_h), 0, 2^14) with S_h = 2^-14 (int16),
                y = rq(x*h; S_x*S_h/S_y)           (|x*h| <= 2^21: int32-safe)
unary f         8-bit inputs: y = T[x - qmin], T[i] = clip(round(f(S_x*(i+qmin))/S_y)) tabulated at
                compile time with onnxruntime evaluating f itself (Sigmoid, Tanh, Erf, Gelu, ...)
"""

from __future__ import annotations

import numpy as np

from qcompiler.qtypes import QParams, dyadic, dyadic_common

from .quantize import Quantizer, rule

HSWISH_SHIFT = 14


def _bshape(arr: np.ndarray, rank: int) -> np.ndarray:
    arr = np.asarray(arr)
    return arr.reshape((1,) * (rank - arr.ndim) + arr.shape) if arr.ndim < rank else arr


def _binary_check(g, n):
    if any(i in g.consts for i in n.inputs):
        return "constant operand that does not broadcast to the activation's shape"
    return None


@rule("Add", check=_binary_check)
def add(qz: Quantizer, n):
    a, b = n.inputs
    out = n.outputs[0]
    qa, qb = qz.qp(a), qz.qp(b)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    (ma, mb), s = dyadic_common([qa.scale / qy.scale, qb.scale / qy.scale], f"node '{n.name}'")
    qz.emit("add", [qz.iname(a), qz.iname(b)], out,
            {"mult_a": ma, "mult_b": mb, "shift": s, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@rule("Mul", check=_binary_check)
def mul(qz: Quantizer, n):
    a, b = n.inputs
    out = n.outputs[0]
    qa, qb = qz.qp(a), qz.qp(b)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    dy = dyadic(qa.scale * qb.scale / qy.scale, f"node '{n.name}'")
    qz.emit("mul", [qz.iname(a), qz.iname(b)], out,
            {"mult": dy.mult, "shift": dy.shift, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@rule("Affine")
def affine(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    rank = len(qz.fg.shape(x))
    k = _bshape(n.attrs["scale"], rank).astype(np.float64)
    o = _bshape(n.attrs["offset"], rank).astype(np.float64)
    k, o = np.broadcast_arrays(k, o)
    dy = dyadic(k * qx.scale / qy.scale, f"node '{n.name}'")
    add_term = np.round(o / qy.scale * np.exp2(dy.shift.astype(np.float64))).astype(np.int64)
    qz.emit("requant", [qz.iname(x)], out,
            {"mult": dy.mult, "shift": dy.shift, "add": add_term, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@rule("Clip")
def clip(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    lo, hi = qz.clamp(qx, (n.attrs["min"], n.attrs["max"]))
    qz.emit("clip", [qz.iname(x)], out, {"lo": lo, "hi": hi}, qx.dtype, qz.fg.shape(out), qx, out, node_name=n.name)


def _prelu_check(g, n):
    if n.inputs[1] not in g.consts:
        return "slope must be constant"
    return None


@rule("PRelu", check=_prelu_check)
def prelu(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    rank = len(qz.fg.shape(x))
    slope = _bshape(qz.fg.consts[n.inputs[1]].astype(np.float64), rank)
    qx = qz.qp(x)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    pos = np.full(slope.shape, qx.scale / qy.scale)
    (mp, mn), s = dyadic_common([pos, slope * qx.scale / qy.scale], f"node '{n.name}'")
    qz.emit("prelu", [qz.iname(x)], out,
            {"mult_pos": mp, "mult_neg": mn, "shift": s, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


def _affine_requant(qx: QParams, alpha: float, beta: float, s_out: float):
    dy = dyadic(np.asarray(alpha * qx.scale / s_out), "hard activation")
    add = np.round(beta / s_out * np.exp2(dy.shift.astype(np.float64))).astype(np.int64)
    return dy, add


@rule("HardSigmoid")
def hard_sigmoid(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    qy = qz.out_qparams(out, nonneg=True)
    act = n.attrs.get("act", (0.0, 1.0))
    lo, hi = qz.clamp(qy, (max(0.0, act[0]), min(1.0, act[1])))
    dy, addv = _affine_requant(qx, float(n.attrs.get("alpha", 0.2)), float(n.attrs.get("beta", 0.5)), qy.scale)
    qz.emit("requant", [qz.iname(x)], out,
            {"mult": dy.mult, "shift": dy.shift, "add": addv, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@rule("HardSwish")
def hard_swish(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    shape = qz.fg.shape(out)
    qh = QParams(2.0 ** -HSWISH_SHIFT, "int16")
    dy, addv = _affine_requant(qx, float(n.attrs.get("alpha", 1 / 6)), float(n.attrs.get("beta", 0.5)), qh.scale)
    h = qz.emit("requant", [qz.iname(x)], qz.fresh(out + "/gate"),
                {"mult": dy.mult, "shift": dy.shift, "add": addv, "lo": 0, "hi": 2**HSWISH_SHIFT, "dtype": "int16"},
                "int16", shape, qh, node_name=n.name + "/gate")
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    dm = dyadic(qx.scale * qh.scale / qy.scale, f"node '{n.name}'")
    qz.emit("mul", [qz.iname(x), h], out, {"mult": dm.mult, "shift": dm.shift, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, shape, qy, out, node_name=n.name)


# ---- unary functions as lookup tables (8-bit inputs) -------------------------------------------
UNARY = ("Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Erf", "Abs", "Softplus", "Softsign", "Elu", "Selu", "Celu",
         "Gelu", "Mish", "Sin", "Cos", "Reciprocal", "ThresholdedRelu", "Round", "Floor", "Ceil", "Sign")


def _eval_unary(n, x: np.ndarray) -> np.ndarray:
    from onnx import helper

    from qcompiler.ort_util import session

    attrs = {k: v for k, v in n.attrs.items() if k not in ("domain", "act")}
    node = helper.make_node(n.op, ["x"], ["y"], **attrs)
    m = helper.make_model(helper.make_graph([node], "u", [helper.make_tensor_value_info("x", 1, list(x.shape))],
                                            [helper.make_tensor_value_info("y", 1, None)]),
                          opset_imports=[helper.make_opsetid("", 20)])
    return session(m).run(["y"], {"x": x.astype(np.float32)})[0].astype(np.float64)


@rule(*UNARY)
def unary_lut(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    if qx.bits > 8:
        from qcompiler.errors import QuantizationError

        raise QuantizationError(f"node '{n.name}' ({n.op}): a lookup table needs an 8-bit input, got {qx.dtype}")
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    codes = np.arange(qx.qmin, qx.qmax + 1)
    with np.errstate(all="ignore"):
        f = _eval_unary(n, codes * qx.scale)
    f = np.where(np.isfinite(f), f, np.sign(np.nan_to_num(f)) * 1e30)
    table = np.clip(np.round(f / qy.scale), lo, hi).astype(qy.dtype)
    qz.emit("lut", [qz.iname(x)], out, {"table": table, "offset": -qx.qmin, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)
