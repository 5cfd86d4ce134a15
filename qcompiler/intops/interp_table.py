"""Interpolated lookup tables of 16-bit inputs (the gates of unrolled recurrences).

A unary function of a 16-bit input as an exact table has 65536 entries (128 KiB of int16).  Inside an
unrolled LSTM / GRU every time step has its own gate nodes (``passes/unroll_recurrent.py``), so the
gates would carry T copies of such tables.  After TFLite's int16 activations (a 513-entry table with
linear interpolation between its knots), a smooth function f of a 16-bit input x at scale S_x is
tabulated at every 2^k-th code and interpolated in integers:

    u = x - qmin                       (0 .. 2^16 - 1 for int16)
    i = u >> k,  r = u - (i << k)      (knot index, position between knots: 0 .. 2^k - 1)
    y = clip((T[i] * (2^k - r) + T[i + 1] * r + 2^(k-1)) >> k, lo, hi)
    T[j] = clip(round(f(S_x * (j * 2^k + qmin)) / S_y), lo, hi),   j = 0 .. 2^(16-k)

with round half up and an arithmetic shift.  ``k`` = 7: 513 knots (2 KiB of int32).  Error against
f: the interpolation error h^2/8 * max|f''| with h = 2^k S_x (sigmoid: max|f''| = sqrt(3)/18 = 0.096,
tanh: 4/(3 sqrt(3)) = 0.77; a pre-activation range of +-8 at int16 has S_x = 2^-12, h = 2^-5: at most
1.2e-5 and 9.4e-5), plus the half-step rounding of the knots and of the result (one output step at
most).

Bound: every T[j] lies in [lo, hi] (|T| <= 2^15 for 16-bit outputs), so the weighted sum is at most
2^15 * 2^k = 2^22 in magnitude: int32 arithmetic is exact.  The result is a convex combination of
two knots, so it lies in [min T, max T].
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from qcompiler.lowering.relax_lower import Value, const

from .registry import I32, Example, IntOp, register

INTERP_BITS = 7
"""Codes between two knots (2^7): 513 knots for a 16-bit input."""

INTERP_FUNCS = ("Sigmoid", "Tanh")
"""Functions tabulated this way: smooth and bounded, with |f''| <= 0.77."""


def knots(f, qmin: int, qmax: int, s_x: float, s_y: float, lo: int, hi: int, k: int = INTERP_BITS) -> np.ndarray:
    """T[j] of the module docstring (int32), for ``f`` evaluated on a float64 array."""
    n = ((qmax - qmin) >> k) + 2
    codes = qmin + (np.arange(n, dtype=np.int64) << k)
    with np.errstate(all="ignore"):
        v = f(codes.astype(np.float64) * s_x)
    v = np.where(np.isfinite(v), v, np.sign(np.nan_to_num(v)) * 1e30)
    return np.clip(np.round(v / s_y), lo, hi).astype(np.int32)


@register
class LutInterpOp(IntOp):
    """y = clip((T[i] * (2^k - r) + T[i+1] * r + 2^(k-1)) >> k, lo, hi), u = x + offset, i = u >> k,
    r = u - (i << k) (module docstring).  ``table`` has ((max code + offset) >> k) + 2 entries, all in
    [lo, hi].  Bound: |T| * 2^k + 2^(k-1) < 2^31 (int32 arithmetic)."""
    name = "lut_interp"
    attrs = {"table": "int32 knots T[j] = f at code j * 2^k - offset", "offset": "-qmin of the input dtype",
             "k": "log2 of the codes between two knots", "lo": "clamp minimum", "hi": "clamp maximum",
             "dtype": "output dtype"}

    @staticmethod
    def reference(x, a):
        k = int(a["k"])
        u = x.astype(np.int64) + int(a["offset"])
        i = u >> k
        r = u - (i << k)
        t = a["table"].astype(np.int64)
        y = (t[i] * ((1 << k) - r) + t[i + 1] * r + (1 << (k - 1))) >> k
        return np.clip(y, a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        """One kernel: the index, both knot loads and the interpolation (as separate Relax ops the
        two gathers of a data-dependent index stay kernels of their own, four or five per gate and
        step of a recurrence, each a VM call with its allocation)."""
        a = n.attrs
        k, off, lo, hi, dt = int(a["k"]), int(a["offset"]), int(a["lo"]), int(a["hi"]), a["dtype"]

        def f(xt, tab):
            def body(*p):
                u = xt(*p).astype("int32") + tirx.const(off, "int32")
                i = u >> k
                r = u & ((1 << k) - 1)   # u >= 0: u - (i << k)
                s = tab[i] * ((1 << k) - r) + tab[i + 1] * r + (1 << (k - 1))
                return tirx.max(tirx.min(s >> k, hi), lo).astype(dt)

            return te.compute(xt.shape, body, name="lut_interp")

        # injective for FuseOps (each output element from its own input element; the knots are a
        # constant), so the gate slices before it and the cell arithmetic after it fuse with it
        y = lw.bb.emit_te(f, x.expr, const(np.asarray(a["table"], np.int32), "int32"), primfunc_name_hint="lut_interp",
                          primfunc_attrs={"op_pattern": 2})
        return Value(y, x.perm, x.shape, dt)

    @staticmethod
    def bound(ctx, n, x):
        a = n.attrs
        t = np.abs(np.asarray(a["table"], np.int64))
        b = float(t.max()) * 2.0 ** int(a["k"]) + 2.0 ** (int(a["k"]) - 1)
        if b > I32:
            ctx.fail(n, "the int32 interpolation sum", b, I32)
        return (max(int(a["lo"]), int(a["table"].min())), min(int(a["hi"]), int(a["table"].max())))

    @staticmethod
    def examples(rng):
        k = INTERP_BITS
        sig = knots(lambda v: 1 / (1 + np.exp(-v)), -32768, 32767, 16 / 32768, 1 / 32767, -32768, 32767, k)
        tnh = knots(np.tanh, -32768, 32767, 5 / 32768, 1 / 127, -128, 127, k)
        rnd = rng.integers(-32768, 32768, size=(65536 >> 5) + 2).astype(np.int32)
        return [Example([("int16", (2, 3, 40))], {"table": sig, "offset": 32768, "k": k, "lo": -32768, "hi": 32767,
                                                  "dtype": "int16"}, "int16"),
                Example([("int16", (5, 64))], {"table": tnh, "offset": 32768, "k": k, "lo": -128, "hi": 127,
                                               "dtype": "int8"}, "int8"),
                # arbitrary knots (the worst case of the bound), 2^5 codes between them
                Example([("int16", (4, 33))], {"table": rnd, "offset": 32768, "k": 5, "lo": -32768, "hi": 32767,
                                               "dtype": "int16"}, "int16")]
