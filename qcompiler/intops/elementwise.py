"""Elementwise ops: quantization rules of the float ops and the integer ops they emit.

Integer ops: requant, add, mul, clip, prelu, lut (each class below: attributes, NumPy reference,
Relax lowering, overflow bound, examples).  Quantization rules of the float ops:

Add(a, b)       y = clip((a*ma + b*mb + 2^(s-1)) >> s), ma = round(S_a/S_y*2^s), mb = round(S_b/S_y*2^s)
                (one shared shift, so the two branches are rounded once, not twice)
Sub(a, b)       the same with mb = -round(S_b/S_y*2^s) (both operands activations)
Mul(a, b)       y = rq(a*b; S_a*S_b/S_y)
Affine(x; k, o) y = clip((x*m + round(o/S_y*2^s) + 2^(s-1)) >> s),  m/2^s = k*S_x/S_y  (per element
                of the broadcast constants; covers BN, Mul/Add/Sub/Div by constants)
Clip            clamp at [ceil(min/S), floor(max/S)] on the input's own scale (no requantization)
PRelu(x; a)     y = rq(x; S_x/S_y) if x >= 0 else rq(x; a*S_x/S_y)   (shared shift, signed mult)
HardSigmoid     y = clip(rq(x; alpha*S_x/S_y, add = beta/S_y), 0, floor(1/S_y))
HardSwish       h = clip(rq(x; alpha*S_x/S_h, add = beta/S_h), 0, 2^14) with S_h = 2^-14 (int16),
                y = rq(x*h; S_x*S_h/S_y)           (|x*h| <= 2^21: int32-safe)
unary f         8-bit inputs: y = T[x - qmin], T[i] = clip(round(f(S_x*(i+qmin))/S_y)) tabulated at
                compile time with onnxruntime evaluating f itself (Sigmoid, Tanh, Erf, Gelu, Pow by a
                constant exponent, ...); the gates (Sigmoid / Tanh) of an unrolled recurrence with
                16-bit inputs: 513 knots, linear interpolation (``interp_table.py``)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax, tirx

from qcompiler.lowering.relax_lower import Value, const
from qcompiler.qtypes import QParams, dyadic, dyadic_common, requant_ref

from .registry import I64, Example, IntOp, check_requant, dyadic_bound, float_ref, mag, register, rule
from . import interp_table, tables

if TYPE_CHECKING:
    from passes.quantize import Quantizer

HSWISH_SHIFT = 14


def _bshape(arr: np.ndarray, rank: int) -> np.ndarray:
    arr = np.asarray(arr)
    return arr.reshape((1,) * (rank - arr.ndim) + arr.shape) if arr.ndim < rank else arr


def _binary_check(g, n):
    if any(i in g.consts for i in n.inputs):
        return "constant operand that does not broadcast to the activation's shape"
    return None


@rule("Add", "Sub", check=_binary_check)
def add(qz: Quantizer, n):
    """a + b, or a - b of two activations (the ``add`` op with a negative multiplier for b)."""
    a, b = n.inputs
    out = n.outputs[0]
    qa, qb = qz.qp(a), qz.qp(b)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    sign = -1.0 if n.op == "Sub" else 1.0
    (ma, mb), s = dyadic_common([qa.scale / qy.scale, sign * qb.scale / qy.scale], f"node '{n.name}'")
    qz.emit("add", [qz.iname(a), qz.iname(b)], out,
            {"mult_a": ma, "mult_b": mb, "shift": s, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@float_ref("Sub")
def _sub_f(x, n):
    y = x[0] - x[1]
    a = n.attrs.get("act")
    return np.clip(y, a[0], a[1]) if a is not None else y


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
    if tables.fold_affine(qz, n):  # every consumer is a table: folded into theirs (intops/tables.py)
        return
    qx = qz.qp(x)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    rank = len(qz.fg.shape(x))
    k = _bshape(n.attrs["scale"], rank).astype(np.float64)
    o = _bshape(n.attrs["offset"], rank).astype(np.float64)
    k, o = np.broadcast_arrays(k, o)
    dy = dyadic(k * qx.scale / qy.scale, f"node '{n.name}'")
    # an offset past the output range saturates the output whatever x is (a causal mask's finfo.min
    # folded into a position bias): clipped to where it still does, so the int64 sum stays in range
    xmax = float(max(abs(qx.qmin), abs(qx.qmax)))
    bound = 2.0**17 + 2.0 * xmax * np.abs(k * qx.scale / qy.scale)
    o_codes = np.clip(o / qy.scale, -bound, bound)
    add_term = np.round(o_codes * np.exp2(dy.shift.astype(np.float64))).astype(np.int64)
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
         "Gelu", "Mish", "Sin", "Cos", "Reciprocal", "ThresholdedRelu", "Round", "Floor", "Ceil", "Sign", "Pow", "Mod")


# functions whose input range spans decades (the log of a power spectrum) take a 16-bit input
# (passes/quantize.py wide_ok), as do the tables that make a graph output: a 16-bit input indexes a
# 65536-entry table (128 KiB of int16) instead of losing everything below 1/127 of its range; the
# other tables take 8 bits (Sqrt too: a 16-bit sqrt(re^2 + im^2) in silero-vad left its speech
# probability equal and moved its LSTM state output from cosine 0.89 to 0.88)
WIDE_TABLES = ("Log",)


def _eval_unary(n, x: np.ndarray, consts: dict | None = None) -> np.ndarray:
    """f(x) by onnxruntime running the node itself (its other operands, e.g. Pow's exponent, are
    constants taken from ``consts``)."""
    from onnx import helper, numpy_helper

    from qcompiler.ort_util import session

    attrs = {k: v for k, v in n.attrs.items() if k not in ("domain", "act")}
    names = ["x"] + [f"c{k}" if i else "" for k, i in enumerate(n.inputs[1:], 1)]
    inits = [numpy_helper.from_array(np.asarray(consts[i]).astype(np.float32), f"c{k}")
             for k, i in enumerate(n.inputs[1:], 1) if i]
    node = helper.make_node(n.op, names, ["y"], **attrs)
    m = helper.make_model(helper.make_graph([node], "u", [helper.make_tensor_value_info("x", 1, list(x.shape))],
                                            [helper.make_tensor_value_info("y", 1, None)], inits),
                          opset_imports=[helper.make_opsetid("", 20)])
    return session(m).run(["y"], {"x": x.astype(np.float32)})[0].astype(np.float64)


def _in_step(t: str) -> bool:
    """Whether ``t`` belongs to a time step of an unrolled recurrence (``passes/shared_steps.py``)."""
    from passes.shared_steps import role

    return role(t) is not None


def _pow_check(g, n):
    return None if len(n.inputs) > 1 and n.inputs[1] in g.consts else "the second operand must be a constant"


@rule(*UNARY, check=lambda g, n: _pow_check(g, n) if n.op in ("Pow", "Mod") else None)
def unary_lut(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    if x in qz.folded_affine:  # a per-channel Affine folded into this table (intops/tables.py)
        return tables.channel_lut(qz, n, _eval_unary)
    qx = qz.qp(x)
    if qx.bits > 16:
        from qcompiler.errors import QuantizationError

        raise QuantizationError(f"node '{n.name}' ({n.op}): a lookup table needs an 8-bit input, got {qx.dtype}")
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    if qx.bits == 16 and n.op in interp_table.INTERP_FUNCS and qz.cfg.recurrent_wide and _in_step(x):
        # a gate of an unrolled recurrence: 513 interpolated knots, not T copies of 65536 entries
        table = interp_table.knots(lambda v: _eval_unary(n, v, qz.fg.consts), qx.qmin, qx.qmax, qx.scale,
                                   qy.scale, lo, hi)
        qz.emit("lut_interp", [qz.iname(x)], out, {"table": table, "offset": -qx.qmin, "k": interp_table.INTERP_BITS,
                                                   "lo": lo, "hi": hi, "dtype": qy.dtype},
                qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)
        return
    codes = np.arange(qx.qmin, qx.qmax + 1)
    with np.errstate(all="ignore"):
        f = _eval_unary(n, codes * qx.scale, qz.fg.consts)
    f = np.where(np.isfinite(f), f, np.sign(np.nan_to_num(f)) * 1e30)
    table = np.clip(np.round(f / qy.scale), lo, hi).astype(qy.dtype)
    qz.emit("lut", [qz.iname(x)], out, {"table": table, "offset": -qx.qmin, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


# ---- integer ops -------------------------------------------------------------------------------
# ``epilogue`` (requant, add, mul, clip): the op's reference on int64 TIR scalars, for the fused
# epilogue of a conv / dense kernel (``qcompiler/intops/gemm.py`` ``Epilogue``,
# ``passes/fuse_epilogue.py``): ``v`` the operands (int64), ``k(name)`` the int64 value of a per-tensor
# constant attribute (one of ``epilogue_consts``), ``a`` the attributes (lo / hi baked in); returns the
# clipped int64 value, which the op's dtype holds (its cast is the identity).
_ONE = tirx.const(1, "int64")


def _m32(m):
    """A multiplier (|m| < 2^31 by the ops' contracts) as a sign-extended int32: the same value, and
    LLVM multiplies two such operands with ``vpmuldq`` (32 x 32 -> 64) instead of a full 64-bit
    multiply (several times cheaper on x86)."""
    return m.astype("int32").astype("int64")


def _clip64(t, a):
    return tirx.max(tirx.min(t, tirx.const(int(a["hi"]), "int64")), tirx.const(int(a["lo"]), "int64"))


def _i8_dyadic(rng, shape, lo=2**29, hi=2**31 - 1, s_lo=30, s_hi=40):
    return (rng.integers(lo, hi, size=shape, dtype=np.int64) * rng.choice([-1, 1], size=shape),
            rng.integers(s_lo, s_hi, size=shape, dtype=np.int64))


@register
class Requant(IntOp):
    """y = clip((int64(x) * mult + add + 2^(shift-1)) >> shift, lo, hi): the dyadic step (round half
    up, arithmetic shift) of every rescaling; per-element ``mult``/``shift``/``add`` broadcast
    against x in logical (NCHW) order.  Bound: |x| * |mult| + |add| + 2^(shift-1) < 2^63."""
    name = "requant"
    attrs = {"mult": "int64 multipliers, |mult| < 2^31", "shift": "int64 shifts in 1..62",
             "add": "optional int64 offsets added before the shift", "lo": "clamp minimum", "hi": "clamp maximum",
             "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, a):
        return np.clip(requant_ref(x, a["mult"], a["shift"], a.get("add")), a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        t = lw.cast(x.expr, "int64")
        e = lw.requant_expr(t, x, a["mult"], a["shift"], a.get("add"), a["lo"], a["hi"], a["dtype"])
        return Value(e, x.perm, x.shape, a["dtype"])

    @staticmethod
    def bound(ctx, n, x):
        check_requant(ctx, n, float(mag(x)), n.attrs)

    epilogue_consts = ("mult", "shift", "add")

    @staticmethod
    def epilogue(v, k, a):
        """The reference on int64 scalars inside a GEMM kernel's epilogue (``gemm.py`` ``Epilogue``)."""
        t = v[0] * _m32(k("mult"))
        if a.get("add") is not None:
            t = t + k("add")
        return _clip64((t + (_ONE << (k("shift") - _ONE))) >> k("shift"), a)

    @staticmethod
    def examples(rng):
        m, s = _i8_dyadic(rng, (1, 4, 1, 1))
        add = rng.integers(-2**36, 2**36, size=(1, 4, 1, 1), dtype=np.int64)
        return [Example([("int32", (2, 4, 3, 5))], {"mult": m, "shift": s, "lo": -128, "hi": 127, "dtype": "int8"},
                        "int8"),
                Example([("int16", (3, 7))], {"mult": np.int64(1 << 30), "shift": np.int64(25),
                                              "add": np.int64(12345), "lo": 0, "hi": 255, "dtype": "uint8"}, "uint8"),
                Example([("int32", (1, 4, 2, 2))], {"mult": m, "shift": s, "add": add, "lo": -32768, "hi": 32767,
                                                    "dtype": "int16"}, "int16")]


@register
class AddOp(IntOp):
    """y = clip((int64(a) * mult_a + int64(b) * mult_b + 2^(shift-1)) >> shift, lo, hi): the sum of
    two requantized branches rounded once (one shared shift; a and b broadcast).
    Bound: |a| * |mult_a| + |b| * |mult_b| + 2^(shift-1) < 2^63."""
    name = "add"
    attrs = {"mult_a": "int64 multiplier of a", "mult_b": "int64 multiplier of b", "shift": "shared shift",
             "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, y, a):
        s = a["shift"].astype(np.int64)
        t = x.astype(np.int64) * a["mult_a"] + y.astype(np.int64) * a["mult_b"] + (np.int64(1) << (s - 1))
        return np.clip(t >> s, a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x, y):
        a = n.attrs
        x, y = lw.same_perm(x, y)
        ref = x if x.rank >= y.rank else y
        shift = np.asarray(a["shift"], np.int64)
        tx = lw.emit(relax.op.multiply(lw.cast(x.expr, "int64"), lw.c(a["mult_a"], "int64", ref)))
        ty = lw.emit(relax.op.multiply(lw.cast(y.expr, "int64"), lw.c(a["mult_b"], "int64", ref)))
        t = lw.emit(relax.op.add(tx, ty))
        t = lw.emit(relax.op.add(t, lw.c(np.left_shift(np.int64(1), shift - 1), "int64", ref)))
        t = lw.emit(relax.op.right_shift(t, lw.c(shift, "int64", ref)))
        t = lw.emit(relax.op.clip(t, int(a["lo"]), int(a["hi"])))
        return lw.out_value(n, lw.cast(t, a["dtype"]), ref)

    @staticmethod
    def bound(ctx, n, x, y):
        a = n.attrs
        b = (mag(x) * float(np.abs(a["mult_a"]).max()) + mag(y) * float(np.abs(a["mult_b"]).max())
             + 2.0 ** (np.max(a["shift"]) - 1))
        if b > I64:
            ctx.fail(n, "the int64 sum of requantized branches", b, I64)

    epilogue_consts = ("mult_a", "mult_b", "shift")

    @staticmethod
    def epilogue(v, k, a):
        t = v[0] * _m32(k("mult_a")) + v[1] * _m32(k("mult_b")) + (_ONE << (k("shift") - _ONE))
        return _clip64(t >> k("shift"), a)

    @staticmethod
    def examples(rng):
        (ma, mb), s = dyadic_common([0.37, -1.9], "example")
        return [Example([("int8", (2, 3, 4, 4)), ("int8", (2, 3, 4, 4))],
                        {"mult_a": ma, "mult_b": mb, "shift": s, "lo": -128, "hi": 127, "dtype": "int8"}, "int8"),
                Example([("int16", (2, 5, 6)), ("uint8", (1, 6))],
                        {"mult_a": ma, "mult_b": mb, "shift": s, "lo": -32768, "hi": 32767, "dtype": "int16"}, "int16")]


@register
class MulOp(IntOp):
    """y = clip(rq(int64(a) * int64(b); mult, shift), lo, hi) (a and b broadcast).
    Bound: |a| * |b| * |mult| + 2^(shift-1) < 2^63."""
    name = "mul"
    attrs = {"mult": "int64 multiplier", "shift": "shift", "lo": "clamp minimum", "hi": "clamp maximum",
             "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, y, a):
        return np.clip(requant_ref(x.astype(np.int64) * y.astype(np.int64), a["mult"], a["shift"]),
                       a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x, y):
        a = n.attrs
        x, y = lw.same_perm(x, y)
        ref = x if x.rank >= y.rank else y
        t = lw.emit(relax.op.multiply(lw.cast(x.expr, "int64"), lw.cast(y.expr, "int64")))
        out = lw.out_value(n, t, ref)
        e = lw.requant_expr(t, out, a["mult"], a["shift"], None, a["lo"], a["hi"], a["dtype"])
        return Value(e, out.perm, out.shape, a["dtype"])

    @staticmethod
    def bound(ctx, n, x, y):
        b = dyadic_bound(float(mag(x)) * mag(y), n.attrs)
        if b > I64:
            ctx.fail(n, "the int64 product", b, I64)

    epilogue_consts = ("mult", "shift")

    @staticmethod
    def epilogue(v, k, a):
        t = v[0] * v[1] * _m32(k("mult")) + (_ONE << (k("shift") - _ONE))
        return _clip64(t >> k("shift"), a)

    @staticmethod
    def examples(rng):
        d = dyadic(0.0123, "example")
        return [Example([("int8", (2, 3, 4)), ("int16", (2, 3, 4))],
                        {"mult": d.mult, "shift": d.shift, "lo": -128, "hi": 127, "dtype": "int8"}, "int8"),
                Example([("uint8", (1, 8)), ("int8", (3, 1))],
                        {"mult": d.mult, "shift": d.shift, "lo": -32768, "hi": 32767, "dtype": "int16"}, "int16")]


@register
class ClipOp(IntOp):
    """y = clip(x, lo, hi) on the input's own scale and dtype (a fused ReLU / ReLU6 / Clip)."""
    name = "clip"
    attrs = {"lo": "clamp minimum", "hi": "clamp maximum"}

    @staticmethod
    def reference(x, a):
        return np.clip(x, a["lo"], a["hi"]).astype(x.dtype)

    @staticmethod
    def lower(lw, n, x):
        e = lw.emit(relax.op.clip(x.expr, int(n.attrs["lo"]), int(n.attrs["hi"])))
        return Value(e, x.perm, x.shape, x.dtype)

    @staticmethod
    def bound(ctx, n, x):
        return (max(x[0], n.attrs["lo"]), min(x[1], n.attrs["hi"]))

    epilogue_consts = ()

    @staticmethod
    def epilogue(v, k, a):
        return _clip64(v[0], a)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 9))], {"lo": 0, "hi": 100}, "int8"),
                Example([("int16", (3, 4, 5))], {"lo": -300, "hi": 7000}, "int16")]


@register
class PReluOp(IntOp):
    """y = clip(rq(x; mult_pos) if x >= 0 else rq(x; mult_neg), lo, hi), one shared shift, signed
    multipliers broadcast per channel.  Bound: |x| * max(|mult_pos|, |mult_neg|) + 2^(shift-1) < 2^63."""
    name = "prelu"
    attrs = {"mult_pos": "int64 multiplier for x >= 0", "mult_neg": "int64 multiplier for x < 0",
             "shift": "shared shift", "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, a):
        xi = x.astype(np.int64)
        m = np.where(xi >= 0, a["mult_pos"], a["mult_neg"])
        return np.clip(requant_ref(xi, m, a["shift"]), a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        t = lw.cast(x.expr, "int64")
        neg = lw.emit(relax.op.less(t, const(0, "int64")))
        shape = np.broadcast_shapes(np.shape(a["mult_neg"]), np.shape(a["mult_pos"]))
        m = lw.emit(relax.op.where(neg, lw.c(np.broadcast_to(a["mult_neg"], shape), "int64", x),
                                   lw.c(np.broadcast_to(a["mult_pos"], shape), "int64", x)))
        shift = np.asarray(a["shift"], np.int64)
        e = lw.emit(relax.op.multiply(t, m))
        e = lw.emit(relax.op.add(e, lw.c(np.left_shift(np.int64(1), shift - 1), "int64", x)))
        e = lw.emit(relax.op.right_shift(e, lw.c(shift, "int64", x)))
        e = lw.emit(relax.op.clip(e, int(a["lo"]), int(a["hi"])))
        return Value(lw.cast(e, a["dtype"]), x.perm, x.shape, a["dtype"])

    @staticmethod
    def bound(ctx, n, x):
        check_requant(ctx, n, float(mag(x)), n.attrs, "mult_pos")
        check_requant(ctx, n, float(mag(x)), n.attrs, "mult_neg")

    @staticmethod
    def examples(rng):
        slope = rng.uniform(-0.5, 0.5, size=(1, 3, 1, 1))
        (mp, mn), s = dyadic_common([np.full(slope.shape, 0.8), slope * 0.8], "example")
        return [Example([("int8", (2, 3, 4, 4))],
                        {"mult_pos": mp, "mult_neg": mn, "shift": s, "lo": -128, "hi": 127, "dtype": "int8"}, "int8")]


@register
class LutOp(IntOp):
    """y = table[x + offset]: any unary function of an 8-bit input, tabulated at compile time
    (``offset`` = -qmin of the input dtype, so every code has an entry).  No arithmetic to bound;
    the output interval is the table's."""
    name = "lut"
    attrs = {"table": "output values, one per input code", "offset": "index of code 0", "dtype": "output dtype"}

    @staticmethod
    def reference(x, a):
        return a["table"][x.astype(np.int64) + a["offset"]].astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        e = lw.lut(x.expr, np.asarray(a["table"], a["dtype"]), int(a["offset"]))
        return Value(e, x.perm, x.shape, a["dtype"])

    @staticmethod
    def bound(ctx, n, x):
        return (int(n.attrs["table"].min()), int(n.attrs["table"].max()))

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 3, 5))], {"table": rng.integers(-128, 128, 256).astype(np.int8), "offset": 128,
                                               "dtype": "int8"}, "int8"),
                Example([("uint8", (4, 6))], {"table": rng.integers(-9000, 9000, 256).astype(np.int16), "offset": 0,
                                             "dtype": "int16"}, "int16")]
