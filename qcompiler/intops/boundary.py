"""The library boundary: quantize (float input -> integers) and dequantize (integers -> float output).

These are the only ops of the integer graph that touch float, at its edges: ``passes/quantize.py``
emits a quantize per float input and a dequantize per float output (``--io float``, the default);
everything between them is integer (proven on the scheduled TIR by ``qcompiler/tir_scan.py``).
Each is lowered to one ``call_tir`` of a PrimFunc of its own (``qc_quantize`` / ``qc_dequantize``),
opaque to FuseOps and marked with the ``qc.boundary`` attribute: left to FuseOps, a quantize fuses
with the integer ops after it into one kernel that no scan can tell from a float op in the
integer region.

  quantize    q = clip(round_half_even(float32(x) * inv_scale), lo, hi)   (float32 multiply)
  dequantize  y = float32(q) * scale
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from qcompiler.errors import QuantizationError
from qcompiler.graph import Node
from qcompiler.lowering import layout as L
from qcompiler.lowering.relax_lower import Value
from qcompiler.tir_scan import BOUNDARY_ATTR

from .registry import Example, IntOp, register

OPAQUE = 8
"""``op_pattern`` of a PrimFunc FuseOps must not fuse with anything (TVM's kOpaque)."""


def boundary_func(kind: str, shape, in_dtype: str, out_dtype: str, compute) -> tirx.PrimFunc:
    """One PrimFunc ``y[i] = compute(x[i])`` over ``shape``, marked as the ``kind`` boundary
    (``"quantize"`` / ``"dequantize"``) and opaque to FuseOps."""
    # a symbolic dim: a variable of the function's own (bound from x's shape; the dim may be an expression)
    shape = [tirx.IntImm("int64", int(d)) if isinstance(d, (int, np.integer)) else tirx.Var(f"d{k}", "int64")
             for k, d in enumerate(shape)]
    x = te.placeholder(shape, in_dtype, "x")
    y = te.compute(shape, lambda *i: compute(x(*i)), name=f"qc_{kind}")
    func = te.create_prim_func([x, y]).without_attr("global_symbol")
    return func.with_attr("op_pattern", OPAQUE).with_attr(BOUNDARY_ATTR, kind)


def _f32(v) -> tirx.PrimExpr:
    return tirx.const(float(np.float32(v)), "float32")


def _boundary_call(lw, kind: str, v: Value, out_dtype: str, compute) -> relax.Expr:
    shape = L.physical_shape(v.shape, v.perm)
    gv = lw.bb.add_func(boundary_func(kind, shape, v.dtype, out_dtype, compute), f"qc_{kind}")
    return lw.emit(relax.call_tir(gv, [v.expr], relax.TensorType(shape=tuple(shape), dtype=out_dtype)), f"qc_{kind}")


def _scalar(n: Node, key: str) -> tirx.PrimExpr:
    if np.size(n.attrs[key]) != 1:  # the quantizer emits one scale per input / output tensor
        raise QuantizationError(f"internal: {n.op} {n.name} has {np.size(n.attrs[key])} scales, one expected; "
                                "please report")
    return _f32(np.asarray(n.attrs[key]).reshape(()))


def lower_quantize(lw, n: Node, x: Value) -> Value:
    """The input quantize as the ``qc_quantize`` boundary kernel (module docs), arithmetic as the
    reference's: ``cast(max(min(nearbyint(float32(x) * inv_scale), hi), lo))`` -- TOPI's round
    (``nearbyint``: ties to even, as ``np.round``) and clip, what LegalizeOps makes of
    ``relax.op.round`` / ``clip``."""
    a = n.attrs
    inv, lo, hi, dtype = _scalar(n, "inv_scale"), _f32(a["lo"]), _f32(a["hi"]), a["dtype"]

    def compute(v):
        v = v if x.dtype == "float32" else tirx.Cast("float32", v)  # the reference's float32(x)
        return tirx.Cast(dtype, tirx.max(tirx.min(tirx.nearbyint(v * inv), hi), lo))

    return Value(_boundary_call(lw, "quantize", x, dtype, compute), x.perm, x.shape, dtype)


def lower_dequantize(lw, n: Node, x: Value) -> Value:
    """The output dequantize as the ``qc_dequantize`` boundary kernel: ``float32(q) * scale``.
    The tensor goes back to its logical layout first, on the integer side (fused with the
    integer ops before it), so no float transpose follows the boundary."""
    scale = _scalar(n, "scale")
    x = lw.logical(x)
    e = _boundary_call(lw, "dequantize", x, "float32", lambda v: tirx.Cast("float32", v) * scale)
    return Value(e, x.perm, x.shape, "float32")


@register
class QuantizeOp(IntOp):
    """q = clip(round_half_even(float32(x) * inv_scale), lo, hi) -> dtype."""
    name = "quantize"
    attrs = {"inv_scale": "float32 1 / S", "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "integer dtype"}

    @staticmethod
    def reference(x, a):
        v = np.round(x.astype(np.float32) * np.float32(a["inv_scale"]))
        return np.clip(v, a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        return lower_quantize(lw, n, x)

    @staticmethod
    def examples(rng):
        return [Example([("float32", (2, 3, 5))], {"inv_scale": np.float32(40.0), "lo": -128, "hi": 127,
                                                   "dtype": "int8"}, "int8"),
                Example([("float32", (4, 7))], {"inv_scale": np.float32(1 / 3e-4), "lo": -32768, "hi": 32767,
                                                "dtype": "int16"}, "int16")]


@register
class DequantizeOp(IntOp):
    """y = float32(q) * scale."""
    name = "dequantize"
    attrs = {"scale": "float32 S"}

    @staticmethod
    def reference(x, a):
        return x.astype(np.float32) * np.float32(a["scale"])

    @staticmethod
    def lower(lw, n, x):
        return lower_dequantize(lw, n, x)

    @staticmethod
    def bound(ctx, n, x):
        return (0, 0)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 9))], {"scale": np.float32(0.0371)}, "float32"),
                Example([("int16", (3, 4))], {"scale": np.float32(1.5e-4)}, "float32")]
