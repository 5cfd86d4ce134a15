"""The library boundary: quantize (float input -> integers) and dequantize (integers -> float output).

These are the only ops of the integer graph that touch float, at its edges: ``passes/quantize.py``
emits a quantize per float input and a dequantize per float output (``--io float``, the default);
everything between them is integer (proven on the scheduled TIR by ``qcompiler/tir_scan.py``).

  quantize    q = clip(round_half_even(float32(x) * inv_scale), lo, hi)   (float32 multiply)
  dequantize  y = float32(q) * scale
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from qcompiler.lowering.relax_lower import Value, const

from .registry import Example, IntOp, register


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
        a = n.attrs
        e = lw.emit(relax.op.multiply(x.expr, const(a["inv_scale"], "float32")))
        e = lw.emit(relax.op.round(e))
        e = lw.emit(relax.op.clip(e, int(a["lo"]), int(a["hi"])))
        return Value(lw.cast(e, a["dtype"]), x.perm, x.shape, a["dtype"])

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
        e = lw.cast(x.expr, "float32")
        e = lw.emit(relax.op.multiply(e, const(n.attrs["scale"], "float32")))
        return Value(e, x.perm, x.shape, "float32")

    @staticmethod
    def bound(ctx, n, x):
        return (0, 0)

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 9))], {"scale": np.float32(0.0371)}, "float32"),
                Example([("int16", (3, 4))], {"scale": np.float32(1.5e-4)}, "float32")]
