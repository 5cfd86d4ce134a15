"""Per-channel lookup tables: a per-channel Affine folded into the unary tables that read it.

A constant per-channel multiply before a periodic or saturating function (Fourier features
``sin(x * 2^k * pi/2)``, a per-channel scale before a Sigmoid) makes a tensor whose channels differ
by orders of magnitude: one per-tensor 8-bit scale for ``k*x + o`` leaves the small channels no
level at all (trueocr-order: 16 frequencies spanning 2^15, the Affine's output scale 394, every
channel below 2^8 * pi/2 rounded to 0).  When every consumer of ``Affine(x; k, o)`` is a unary table
(``qcompiler/intops/elementwise.py`` ``unary_lut``), the Affine emits nothing and each consumer
tabulates its function of the Affine's *input* codes, one 2^bits-entry row per channel of the
broadcast constants:

  y = T[c, x - qmin],   T[c, i] = clip(round(f(clip(k_c*S_x*(i+qmin) + o_c, act)) / S_y))

For an 8-bit x this is exact up to the output rounding (one rounding instead of two, the
intermediate range never quantized), so it is applied wherever it is possible, not only where the
channels differ.  A 16-bit x (an Affine is a wide consumer, ``passes/quantize.py`` ``wide_ok``) is
first requantized to 8 bits at its own calibrated range, and only where that is the finer choice:
the tables' input step |k_c|*S_x8 against the Affine output's per-tensor step S_y, in mean square
relative to each channel's extent, at most a quarter of it (``_worth_it``).
The table's rows broadcast against ``x`` in logical order like any per-channel constant: the op
``lut_ch`` indexes the flattened table with ``x + offset + 2^bits * c``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax

from qcompiler.lowering.relax_lower import Value, const
from qcompiler.qtypes import QParams, activation_qparams, dyadic

from .registry import Example, IntOp, RULES, register

if TYPE_CHECKING:
    from passes.quantize import Quantizer

MAX_ROWS = 4096   # channels of a folded Affine (4096 x 256 int16 entries = 2 MiB at most)
WIN = 0.25        # a 16-bit input is folded when its tables' mean square step is <= WIN x the Affine's


def _bshape(arr, rank: int) -> np.ndarray:
    arr = np.asarray(arr, np.float64)
    return arr.reshape((1,) * (rank - arr.ndim) + arr.shape) if arr.ndim < rank else arr


def _range(qz: Quantizer, x: str, qx: QParams) -> tuple[float, float]:
    """The real range of ``x``: calibrated, or (a tensor the float passes made) its 16-bit QParams'."""
    st = qz.stats.get(x)
    if st is not None:
        return float(st.lo), float(st.hi)
    return qx.qmin * qx.scale, qx.qmax * qx.scale


def _q8(qz: Quantizer, x: str, qx: QParams) -> QParams:
    """8-bit QParams of the 16-bit ``x``."""
    if x in qz.stats:
        return qz.out_qparams(x, bits=8)
    lo, hi = _range(qz, x, qx)
    return activation_qparams(lo, hi, x in qz.nonneg, 8)


def _worth_it(qz: Quantizer, n, x: str, qx: QParams, qx8: QParams, k: np.ndarray, o: np.ndarray) -> bool:
    """For a 16-bit ``x`` (which the fold first requantizes to 8 bits at its own range): whether the
    tables' input step per channel, |k_c| * S_x8, is finer than the Affine output's per-tensor 8-bit
    step S_y, in mean square relative to each channel's extent w_c (a per-tensor scale of a tensor
    whose channels differ by 1000x loses the small ones; a fused clamp that keeps a narrow part of
    x's range is better served by the Affine's own output scale)."""
    qy = qz.out_qparams(n.outputs[0])
    xlo, xhi = _range(qz, x, qx)
    xlo, xhi = max(xlo, qx8.qmin * qx8.scale), min(xhi, qx8.qmax * qx8.scale)
    a, b = k * xlo + o, k * xhi + o
    act = n.attrs.get("act")
    if act is not None:
        a, b = np.clip(a, act[0], act[1]), np.clip(b, act[0], act[1])
    w = np.abs(b - a).ravel()
    live = w > 0
    if not live.any():
        return True
    inv = 1.0 / w[live] ** 2
    step_b = np.abs(k).ravel()[live] * qx8.scale
    # a clear win only (half the step in amplitude): at a 2-7x channel spread (madmom-key-cnn's
    # BatchNorm -> Elu) the two are close and the Affine's own scale measured better (0.997 vs 0.993)
    return float(np.sum(step_b ** 2 * inv)) <= WIN * float(np.sum(qy.scale ** 2 * inv))


def fold_affine(qz: Quantizer, n) -> bool:
    """Whether Affine node ``n`` is folded into the tables of its consumers (then it emits nothing,
    or only the requantization of a 16-bit input to 8 bits; ``qz.folded_affine`` records it for
    :func:`channel_lut`)."""
    from .elementwise import WIDE_TABLES, unary_lut

    x, out = n.inputs[0], n.outputs[0]
    if out in qz.fg.outputs:
        return False
    users = qz.consumers.get(out, [])
    if not users:
        return False
    for u in users:
        if RULES.get(u.op) is not unary_lut or u.name in qz.islands or u.inputs[0] != out or out in u.inputs[1:]:
            return False
    rank = len(qz.fg.shape(x))
    k, o = np.broadcast_arrays(_bshape(n.attrs["scale"], rank), _bshape(n.attrs["offset"], rank))
    if k.ndim > rank or k.size > MAX_ROWS:
        return False
    k, o = np.ascontiguousarray(k), np.ascontiguousarray(o)
    qx, xi = qz.qp(x), qz.iname(x)
    if qx.bits > 8 and any(u.op in WIDE_TABLES or qz._output_table(u) for u in users):
        return False  # a 16-bit Affine output indexes their 65536-entry tables (elementwise.py)
    if qx.bits > 8:
        qx8 = _q8(qz, x, qx)
        if not _worth_it(qz, n, x, qx, qx8, k, o):
            return False
        dy = dyadic(np.asarray(qx.scale / qx8.scale), f"node '{n.name}'")
        xi = qz.emit("requant", [xi], qz.fresh(f"{xi}/q8"),
                     {"mult": dy.mult, "shift": dy.shift, "lo": qx8.qmin, "hi": qx8.qmax, "dtype": qx8.dtype},
                     qx8.dtype, qz.fg.shape(x), qx8, node_name=f"{n.name}/q8")
        qx = qx8
    qz.folded_affine[out] = (xi, qx, k, o, n.attrs.get("act"))
    return True


def channel_lut(qz: Quantizer, n, eval_unary) -> None:
    """The rule of a unary table over a folded Affine (see the module docstring); ``eval_unary`` is
    ``elementwise._eval_unary`` (onnxruntime evaluating the node's own function)."""
    src, out = n.inputs[0], n.outputs[0]
    xi, qx, k, o, act = qz.folded_affine[src]
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    codes = np.arange(qx.qmin, qx.qmax + 1, dtype=np.float64)
    v = k.reshape(-1, 1) * (codes * qx.scale) + o.reshape(-1, 1)
    if act is not None:
        v = np.clip(v, act[0], act[1])
    with np.errstate(all="ignore"):
        f = eval_unary(n, v, qz.fg.consts)
    f = np.where(np.isfinite(f), f, np.sign(np.nan_to_num(f)) * 1e30)
    table = np.clip(np.round(f / qy.scale), lo, hi).astype(qy.dtype).reshape(k.shape + (len(codes),))
    qz.emit("lut_ch", [xi], out, {"table": table, "offset": -qx.qmin, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


def _rows(table: np.ndarray) -> np.ndarray:
    """int64 offsets ``2^bits * c`` of each row, in the broadcast shape of the rows."""
    rows = table.shape[:-1]
    return (np.arange(int(np.prod(rows, dtype=np.int64)), dtype=np.int64) * table.shape[-1]).reshape(rows)


@register
class ChannelLutOp(IntOp):
    """y = table[c, x + offset]: a unary function of an 8-bit input tabulated per channel, the rows
    ``table[..., :]`` broadcasting against x in logical order (the channels of a folded per-channel
    Affine).  No arithmetic to bound; the output interval is the table's."""
    name = "lut_ch"
    attrs = {"table": "output values: the broadcast shape of the channels, then one entry per input code",
             "offset": "index of code 0 in a row", "dtype": "output dtype"}

    @staticmethod
    def reference(x, a):
        t = a["table"]
        idx = x.astype(np.int64) + a["offset"] + _rows(t)
        return t.reshape(-1)[idx].astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        t = a["table"]
        base = lw.c((_rows(t) + a["offset"]).astype(np.int32), "int32", x)
        idx = lw.emit(relax.op.add(lw.cast(x.expr, "int32"), base))
        e = lw.take(const(t.reshape(-1), a["dtype"]), idx, 0)
        shape = tuple(lw.ig.shapes[n.outputs[0]])  # (symbolic dims as the graph states them)
        perm = x.perm if len(shape) == x.rank else tuple(range(len(shape)))
        return Value(e, perm, shape, a["dtype"])

    @staticmethod
    def bound(ctx, n, x):
        return (int(n.attrs["table"].min()), int(n.attrs["table"].max()))

    @staticmethod
    def examples(rng):
        return [Example([("int8", (2, 3, 5, 4))], {"table": rng.integers(-128, 128, (1, 3, 1, 4, 256)).astype(np.int8),
                                                  "offset": 128, "dtype": "int8"}, "int8"),
                Example([("uint8", (4, 6))], {"table": rng.integers(-9000, 9000, (6, 256)).astype(np.int16),
                                             "offset": 0, "dtype": "int16"}, "int16")]
