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
Bounds (checked here at compile time): e < 2^30, e*k <= 2^(R+1) < 2^63.
"""

from __future__ import annotations

import math

from qcompiler.errors import QuantizationError
from qcompiler.qtypes import QParams

from .quantize import Quantizer, rule

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
