"""NumPy reference (bit-exact semantics) of the integer transformer nonlinearities: LayerNorm, GELU.

Registered into ``qcompiler.reference.OPS`` on import (``qcompiler.reference`` imports this module).
Everything is int64; ``>>`` is an arithmetic (floor) shift, ``//`` a floor division, exactly as the
Relax lowering (``qcompiler.lowering.lower_nonlinear``) computes it.  The math, the choice of the
constants and the bounds are in ``passes/quantize_nonlinear.py``.

layernorm (x: int8/int16/uint8, normalised over the last axis of length C):
  xi = int64(x) >> pre_shift
  y  = C*xi - sum(xi)                          exact: y = C*(xi - mean)
  V  = sum(y*y) + eps_int                      eps_int >= 1, so V >= 1
  sd = isqrt(V)                                floor(sqrt(V)), Newton (``isqrt``); sd >= |y| elementwise
  k  = 2^R // sd                               the one division per row (R = 60)
  f  = (y*k + 2^(R-F-1)) >> (R-F)              |f| <= 2^F: y/sd in units of 2^-F
  out = clip((f*mult[c] + bias[c] + 2^(shift[c]-1)) >> shift[c], lo, hi)

gelu, variant "igelu" (I-BERT):
  q  = int64(x), a = |q|, ae = a << u (u >= 0) or a >> -u
  t  = min(ae, -q_b) + q_b,  poly = t*t + q_c      erf(|x|/sqrt2) ~ poly * S_L, S_L = A*S_e^2 < 0
  s  = (q < 0 ? -poly : poly) + q_c                (1 + erf(x/sqrt2)) ~ s * S_L
  P  = q * s;  out = clip((P*mult + 2^(shift-1)) >> shift, lo, hi)
gelu, variant "shift" (I-ViT ShiftGELU, x*sigmoid(1.702x), sigmoid from a shift-only exp):
  d  = -(a << u) (or -(a >> -u)),  v = d + (d >> 1) - (d >> 4)
  z  = (-v) // q_1,  r = v + z*q_1,  e = ((r >> 1) + q_1) << (N - min(z, N))   e ~ E0*exp(-1.702|x|)
  E0 = q_1 << N,  sig = ((q >= 0 ? E0 : e) << K) // (E0 + e)                    sigmoid(1.702x)*2^K
  P  = q * sig;  out = clip((P*mult + 2^(shift-1)) >> shift, lo, hi)
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .reference import op

I64 = np.int64
# x0 = 2^ceil(bits(V)/2) = 2^(number of j in 0..31 with V >= 4^j), for 0 <= V < 2^64
POW4 = np.array([1 << (2 * j) for j in range(32)], dtype=np.int64)


def isqrt_steps(vmax: int) -> int:
    """Newton steps that make ``isqrt`` exact for every 0 <= V <= vmax (vmax < 2^64).

    Start x0 = 2^ceil(b/2) with b = bits(V): V < 2^b gives x0 > sqrt(V) and V >= 2^(b-1) gives
    x0 <= 2*sqrt(V).  The real Newton map g(x) = (x + V/x)/2 is increasing for x >= sqrt(V), and the
    integer step floor((x + floor(V/x))/2) is <= g(x) and >= floor(sqrt(V)) (AM-GM), so the integer
    iterate stays between floor(sqrt(V)) and the real iterate started at ratio r0 = 2:
    r_{n+1} = (r_n + 1/r_n)/2.  Once (r_n - 1)*sqrt(vmax) < 1, x_n < sqrt(V) + 1, i.e.
    x_n in {s, s+1} (s = floor(sqrt(V))), and one more step gives s (V < (s+1)^2 so
    floor(V/(s+1)) <= s).  The step is taken as x = min(x, step(x)), so further steps keep s.
    """
    r = Fraction(2)
    root = math.isqrt(max(int(vmax), 1)) + 1        # > sqrt(vmax)
    n = 0
    while (r - 1) * root >= 1:
        r = (r + 1 / r) / 2                         # exact rational arithmetic
        n += 1
    return n + 1


def isqrt(V: np.ndarray, steps: int) -> np.ndarray:
    """floor(sqrt(V)) of int64 V >= 0 by ``steps`` unrolled Newton steps (exact: see ``isqrt_steps``)."""
    V = np.asarray(V, dtype=np.int64)
    e = (V[..., None] >= POW4).sum(axis=-1).astype(np.int64)
    x = np.left_shift(np.int64(1), e)
    for _ in range(steps):
        x = np.minimum(x, (x + V // np.maximum(x, 1)) >> 1)
    return x


@op("layernorm")
def layernorm(x, a):
    xi = x.astype(np.int64) >> a["pre_shift"]
    C = xi.shape[-1]
    s = xi.sum(axis=-1, keepdims=True)
    y = I64(C) * xi - s
    V = (y * y).sum(axis=-1, keepdims=True) + I64(a["eps_int"])
    sd = isqrt(V, a["steps"])
    R, F = a["R"], a["F"]
    k = (np.int64(1) << R) // sd
    f = (y * k + (np.int64(1) << (R - F - 1))) >> (R - F)
    shift = np.asarray(a["shift"], np.int64)
    t = f * np.asarray(a["mult"], np.int64) + np.asarray(a["bias"], np.int64) + (np.int64(1) << (shift - 1))
    return np.clip(t >> shift, a["lo"], a["hi"]).astype(a["dtype"])


def _scaled_abs(q: np.ndarray, u: int) -> np.ndarray:
    aq = np.abs(q)
    return aq << u if u >= 0 else aq >> (-u)


@op("gelu")
def gelu(x, a):
    q = x.astype(np.int64)
    ae = _scaled_abs(q, a["u"])
    if a["variant"] == "igelu":
        t = np.minimum(ae, -a["q_b"]) + a["q_b"]
        poly = t * t + a["q_c"]
        s = np.where(q < 0, -poly, poly) + a["q_c"]
    else:
        d = -ae
        v = d + (d >> 1) - (d >> 4)
        z = (-v) // a["q_1"]
        r = v + z * a["q_1"]
        e = ((r >> 1) + a["q_1"]) << (a["N"] - np.minimum(z, a["N"]))
        e0 = np.int64(a["q_1"]) << a["N"]
        s = (np.where(q >= 0, e0, e) << a["K"]) // (e0 + e)
    p = q * s
    shift = np.int64(a["shift"])
    t = (p * np.int64(a["mult"]) + (np.int64(1) << (shift - 1))) >> shift
    return np.clip(t, a["lo"], a["hi"]).astype(a["dtype"])
