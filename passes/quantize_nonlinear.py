"""Quantization rules of the transformer nonlinearities (LayerNorm, GELU): integer-only forms.

The canonical float nodes come from ``passes/fuse_nonlinear.py``; the integer ops' exact
semantics are ``qcompiler/ref_nonlinear.py`` (``layernorm``, ``gelu``).  Every constant below is
computed here, at compile time; the integer graph holds no float.

I-LayerNorm (I-BERT / I-ViT, with an exact integer sqrt).  Input q at scale S (int8, uint8 or
int16: a residual stream feeding a LayerNorm may be int16), rows of length C on the last axis:
  q' = q >> p                        p >= 0 only when int16 rows are too long for the bounds below
                                     (scale S' = S*2^p)
  y  = C*q' - sum(q')  = C*(q' - mean)             exact, no division
  V  = sum(y^2) + E,  E = max(1, round(C^3*eps/S'^2))
     (V/C^3 = var(q') + eps/S'^2, so  (x - mean)/sqrt(var + eps) = y*sqrt(C)/sqrt(V))
  sd = isqrt(V) = floor(sqrt(V))     Newton from 2^ceil(bits(V)/2), ``steps`` unrolled steps, exact
                                     for every V up to the bound (ref_nonlinear.isqrt_steps)
  k  = floor(2^R / sd)               the one division per row; V >= E >= 1 so sd >= 1 (a constant
                                     row gives y = 0, V = E: output = beta, no division by zero)
  f  = round(y*k / 2^(R-F))          ~ y/sd * 2^F
  out = clip(rq(f; M_c, bias_c))     M_c = gamma_c*sqrt(C) / (S_y*2^F)  (dyadic, per channel),
                                     bias_c = round(beta_c/S_y * 2^shift_c), S_y calibrated
Bounds: var(q') <= (range/2)^2 so V <= C^3*(range/2)^2 + E < 2^62 (chooses p);  y^2 <= V, hence
|y| <= sd and |y*k| <= 2^R = 2^60;  |f| <= 2^F + 1;  |f*mult| < 2^(F+32);  |bias_c| is clamped to
|M_c|*2^F + 2^16 (beyond that the output saturates either way), so the int64 requant fits (checked
again in passes/overflow.py).  F = clip(ceil(log2(max|M_c|*2^F)) + 10, 16, 30): one unit of f is
<= 2^-10 output LSB.

i-GELU (I-BERT, Kim et al. 2021): GELU(x) = x/2 * (1 + erf(x/sqrt2)),
  erf(v) ~ sgn(v)*[A*(min(|v|, -B) + B)^2 + 1],  A = -0.2888, B = -1.769.
  The erf argument is q at scale S_e = S/sqrt2, refined (or coarsened) by 2^u: S_e' = S_e/2^u with u
  chosen so that q_b = floor(B/S_e') has 2^12 <= |q_b| < 2^13 (I-BERT's floor of B/S on a coarse
  int8 grid would move the clip point by up to a whole input step);
  q_c = floor(1/(A*S_e'^2)) < 0,  S_L = A*S_e'^2 < 0:
  poly = (min(|q|*2^u, -q_b) + q_b)^2 + q_c  ~  erf(|x|/sqrt2)/S_L
  s    = sgn(q)*poly + q_c                   ~  (1 + erf(x/sqrt2))/S_L   (1/S_L = q_c as well)
  out  = clip(rq(q*s; M = S*S_L/(2*S_y)))   (M < 0: a negative dyadic multiplier)
  Bounds: t^2 <= q_b^2 < 2^26, |s| <= q_b^2 + 2|q_c| < 2^28; |q*s| < 2^(bits(q)+28); the final
  multiplier keeps only as many bits as |q*s|*|mult| < 2^62 allows (>= 16 bits for int16 inputs).
ShiftGELU (I-ViT, Li & Gu 2023): GELU(x) ~ x*sigmoid(1.702x).  The argument scale is the compile-
  time constant S_z = 1.702*S (no run-time multiply), refined by 2^u so that q_1 = floor(2^u/S_z)
  is in [2^10, 2^11); exp(-|z|) by the Shiftmax shift-only exp (quantize_softmax.py), and the
  sigmoid symmetric, so no max subtraction is needed:  e ~ E0*exp(-|z|), E0 = q_1*2^N,
  sigmoid(z) = (z >= 0 ? E0 : e)/(E0 + e), computed as sig = (num << K) // (E0 + e) (an integer
  division per element, as in I-ViT), out = clip(rq(q*sig; M = S/(2^K*S_y))).
  Bounds: e <= E0 < 2^(11+N) = 2^26, num << K < 2^42, |q*sig| <= |q|*2^K.
"lut" (not in I-BERT/I-ViT): for an 8-bit input a 256-entry table of the exact float GELU, the
  most accurate choice (only the output rounding), as for the other unary functions.
"""

from __future__ import annotations

import math

import numpy as np

from qcompiler.errors import QuantizationError
from qcompiler.qtypes import MAX_SHIFT, Dyadic, QParams, dyadic
from qcompiler.ref_nonlinear import isqrt_steps

from .quantize import Quantizer, rule

# I-LayerNorm
LN_R = 60
V_LIMIT = 2**62
# i-GELU (I-BERT)
GELU_A, GELU_B = -0.2888, -1.769
IGELU_QB_BITS = 12          # 2^12 <= |q_b| < 2^13
# ShiftGELU (I-ViT)
SHIFT_N, SHIFT_K = 15, 16
SIG_ALPHA = 1.702


def dyadic_limited(M: float, max_mult_bits: int, what: str) -> Dyadic:
    """A dyadic multiplier with |mult| < 2^max_mult_bits (low bits of the 31-bit mult dropped)."""
    d = dyadic(M, what)
    m, s = int(d.mult), int(d.shift)
    drop = max(0, 31 - max_mult_bits)
    if drop and m != 0:
        drop = min(drop, s - 1)
        mag = (abs(m) + (1 << (drop - 1))) >> drop if drop > 0 else abs(m)
        m, s = (mag if m > 0 else -mag), s - drop
    if s < 1 or s > MAX_SHIFT:
        raise QuantizationError(f"{what}: multiplier {M:.3g} out of dyadic range")
    return Dyadic(np.asarray(m, np.int64), np.asarray(s, np.int64))


def _act_clamp(qz: Quantizer, qy: QParams, n) -> tuple[int, int]:
    return qz.clamp(qy, n.attrs.get("act"))


# ---- LayerNorm ---------------------------------------------------------------------------------
def layernorm_constants(in_scale: float, in_dtype: str, C: int, epsilon: float, gamma, beta,
                        out_scale: float, lo: int, hi: int, out_dtype: str) -> dict:
    """The attributes of the integer ``layernorm`` op (see the module docstring for the math)."""
    qin = QParams(in_scale, in_dtype)
    gamma = np.broadcast_to(np.asarray(gamma, np.float64).reshape(-1), (C,))
    beta = np.broadcast_to(np.asarray(beta, np.float64).reshape(-1), (C,))
    p = 0
    while True:
        span = ((qin.qmax >> p) - (qin.qmin >> p))
        s_in = in_scale * 2.0**p
        E = max(1, int(round(C**3 * float(epsilon) / s_in**2)))
        vmax = C**3 * span * span // 4 + E
        if vmax < V_LIMIT:
            break
        if E >= V_LIMIT // 2:
            raise QuantizationError(f"LayerNorm: epsilon {epsilon:g} is too large for input scale {in_scale:g}")
        p += 1
        if p > 15:
            raise QuantizationError(f"LayerNorm: rows of {C} are too long for integer variance")
    gain = gamma * math.sqrt(C) / out_scale              # output LSBs per unit of y/sd
    gmax = float(np.abs(gain).max())
    F = int(np.clip(math.ceil(math.log2(max(gmax, 1e-30))) + 10, 16, 30))
    d = dyadic(gain / 2.0**F, "LayerNorm output")
    mult, shift = d.mult.astype(np.int64), d.shift.astype(np.int64)
    bq = beta / out_scale
    bound = np.abs(gain) + 2.0**16                        # |f*M| <= gain (+1 LSB); beyond: saturated
    bq = np.clip(bq, -bound, bound)
    bias = np.round(bq * np.exp2(shift.astype(np.float64))).astype(np.int64)
    return {"pre_shift": p, "eps_int": E, "steps": isqrt_steps(vmax), "vmax": int(vmax), "R": LN_R, "F": F,
            "mult": mult, "shift": shift, "bias": bias, "lo": int(lo), "hi": int(hi), "dtype": out_dtype}


def _ln_check(fg, n):
    rank = len(fg.shape(n.inputs[0]))
    ax = int(n.attrs.get("axis", -1))
    if ax not in (-1, rank - 1):
        return f"normalised axis {ax} (the last axis only)"
    return None


@rule("LayerNorm", check=_ln_check)
def layernorm(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    if qx.bits > 16:
        raise QuantizationError(f"node '{n.name}' (LayerNorm): input {qx.dtype}; int8/int16 expected")
    C = int(qz.fg.shape(x)[-1])
    qy = qz.out_qparams(out)
    lo, hi = _act_clamp(qz, qy, n)
    attrs = layernorm_constants(qx.scale, qx.dtype, C, n.attrs["epsilon"], n.attrs["gamma"], n.attrs["beta"],
                                qy.scale, lo, hi, qy.dtype)
    qz.emit("layernorm", [qz.iname(x)], out, attrs, qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@rule("LayerNormalization", check=lambda fg, n: _ln_check(fg, n) or (
        "Mean/InvStdDev outputs" if any(o for o in n.outputs[1:]) else None) or (
        None if all(i in fg.consts for i in n.inputs[1:] if i) else "scale/bias must be constants"))
def layernormalization(qz: Quantizer, n):
    """The ONNX op, if it reaches the quantizer unfused (fuse_nonlinear normally rewrites it)."""
    from .fuse_nonlinear import layernorm_node

    layernorm(qz, layernorm_node(qz.fg, n))


# ---- GELU --------------------------------------------------------------------------------------
def gelu_constants(in_scale: float, in_dtype: str, variant: str, out_scale: float, lo: int, hi: int,
                   out_dtype: str) -> dict:
    qin = QParams(in_scale, in_dtype)
    qabs = max(abs(qin.qmin), abs(qin.qmax))
    if variant == "igelu":
        se = in_scale / math.sqrt(2.0)
        u = math.ceil(math.log2(2**IGELU_QB_BITS * se / abs(GELU_B)))
        se_u = se / 2.0**u
        q_b = math.floor(GELU_B / se_u)
        q_c = math.floor(1.0 / (GELU_A * se_u * se_u))
        s_l = GELU_A * se_u * se_u
        smax = q_b * q_b + 2 * abs(q_c)
        M = in_scale * s_l / 2.0 / out_scale
        c = {"u": u, "q_b": q_b, "q_c": q_c}
    elif variant == "shift":
        sz = SIG_ALPHA * in_scale
        u = math.ceil(math.log2(2**10 * sz))
        q_1 = math.floor(2.0**u / sz)
        smax = 1 << SHIFT_K
        M = in_scale / 2.0**SHIFT_K / out_scale
        c = {"u": u, "q_1": q_1, "N": SHIFT_N, "K": SHIFT_K}
        if (q_1 << SHIFT_N) >= 2**40:
            raise QuantizationError(f"ShiftGELU: exp bound too large for input scale {in_scale:g}")
    else:
        raise QuantizationError(f"unknown GELU variant {variant}")
    pmax = qabs * smax
    bits = 62 - pmax.bit_length()
    if bits < 16:
        raise QuantizationError(f"GELU: input {in_dtype} too wide for the int64 product ({pmax:.3g})")
    d = dyadic_limited(M, min(31, bits), "GELU output")
    c.update({"variant": variant, "mult": int(d.mult), "shift": int(d.shift), "pmax": int(pmax),
              "lo": int(lo), "hi": int(hi), "dtype": out_dtype})
    return c


@rule("Gelu")
def gelu(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    variant = qz.cfg.gelu
    if variant == "lut" and qx.bits <= 8:
        from .quantize_elementwise import unary_lut

        return unary_lut(qz, n)
    if variant == "lut":
        variant = "igelu"  # a table needs an 8-bit input
    if qx.bits > 16:
        raise QuantizationError(f"node '{n.name}' (Gelu): input {qx.dtype}; int8/int16 expected")
    qy = qz.out_qparams(out)
    lo, hi = _act_clamp(qz, qy, n)
    attrs = gelu_constants(qx.scale, qx.dtype, variant, qy.scale, lo, hi, qy.dtype)
    qz.emit("gelu", [qz.iname(x)], out, attrs, qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)
