"""The transformer nonlinearities (LayerNorm, GELU): quantization rules and integer-only ops.

The canonical float nodes come from ``passes/fuse_nonlinear.py``; the integer ops ``layernorm``
and ``gelu`` (classes at the end: exact semantics, Relax lowering, bounds) follow the formulas
below step for step.  Every constant is computed here, at compile time; the integer graph holds
no float.  In the integer ops, ``>>`` is an arithmetic (floor) shift and ``//`` a floor division;
the Relax lowering computes exactly that (``right_shift``, ``floor_divide`` on int64).

I-LayerNorm (I-BERT / I-ViT, with an exact integer sqrt).  Input q at scale S (int8, uint8 or
int16: a residual stream feeding a LayerNorm may be int16), rows of length C on the last axis:
  q' = q >> p                        p >= 0 only when int16 rows are too long for the bounds below
                                     (scale S' = S*2^p)
  y  = C*q' - sum(q')  = C*(q' - mean)             exact, no division
  V  = sum(y^2) + E,  E = max(1, round(C^3*eps/S'^2))
     (V/C^3 = var(q') + eps/S'^2, so  (x - mean)/sqrt(var + eps) = y*sqrt(C)/sqrt(V))
  sd = isqrt(V) = floor(sqrt(V))     Newton from 2^ceil(bits(V)/2), ``steps`` unrolled steps, exact
                                     for every V up to the bound (isqrt_steps)
  k  = floor(2^R / sd)               the one division per row; V >= E >= 1 so sd >= 1 (a constant
                                     row gives y = 0, V = E: output = beta, no division by zero)
  f  = round(y*k / 2^(R-F))          ~ y/sd * 2^F
  out = clip(rq(f; M_c, bias_c))     M_c = gamma_c*sqrt(C) / (S_y*2^F)  (dyadic, per channel),
                                     bias_c = round(beta_c/S_y * 2^shift_c), S_y calibrated
Bounds: var(q') <= (range/2)^2 so V <= C^3*(range/2)^2 + E < 2^62 (chooses p);  y^2 <= V, hence
|y| <= sd and |y*k| <= 2^R = 2^60;  |f| <= 2^F + 1;  |f*mult| < 2^(F+32);  |bias_c| is clamped to
|M_c|*2^F + 2^16 (beyond that the output saturates either way), so the int64 requant fits (checked
again by LayerNormOp.bound).  F = clip(ceil(log2(max|M_c|*2^F)) + 10, 16, 30): one unit of f is
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
  is in [2^10, 2^11); exp(-|z|) by the Shiftmax shift-only exp (intops/softmax.py), and the
  sigmoid symmetric, so no max subtraction is needed:  e ~ E0*exp(-|z|), E0 = q_1*2^N,
  sigmoid(z) = (z >= 0 ? E0 : e)/(E0 + e), computed as sig = (num << K) // (E0 + e) (an integer
  division per element, as in I-ViT), out = clip(rq(q*sig; M = S/(2^K*S_y))).
  Bounds: e <= E0 < 2^(11+N) = 2^26, num << K < 2^42, |q*sig| <= |q|*2^K.
"lut" (not in I-BERT/I-ViT): for an 8-bit input a 256-entry table of the exact float GELU, the
  most accurate choice (only the output rounding), as for the other unary functions.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
from tvm import relax

from qcompiler.errors import QuantizationError
from qcompiler.lowering.relax_lower import Value
from qcompiler.qtypes import MAX_SHIFT, Dyadic, QParams, dyadic

from .registry import I64, Example, IntOp, register, rule

if TYPE_CHECKING:
    from passes.quantize import Quantizer

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
    from passes.fuse_nonlinear import layernorm_node

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
        from .elementwise import unary_lut

        return unary_lut(qz, n)
    if variant == "lut":
        variant = "igelu"  # a table needs an 8-bit input
    if qx.bits > 16:
        raise QuantizationError(f"node '{n.name}' (Gelu): input {qx.dtype}; int8/int16 expected")
    qy = qz.out_qparams(out)
    lo, hi = _act_clamp(qz, qy, n)
    attrs = gelu_constants(qx.scale, qx.dtype, variant, qy.scale, lo, hi, qy.dtype)
    qz.emit("gelu", [qz.iname(x)], out, attrs, qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


# ---- integer ops -------------------------------------------------------------------------------
def _i64(v) -> relax.Expr:
    return relax.const(np.asarray(v, dtype=np.int64), "int64")


def lower_isqrt(lw, V, steps: int):
    """``isqrt`` in Relax on a per-row [.., 1] int64 tensor: x0 = 1 << #{j : V >= 4^j}, then
    ``steps`` unrolled Newton steps x = min(x, (x + V // x) >> 1)."""
    R = relax.op
    ge = lw.emit(R.greater_equal(V, _i64(POW4)))                       # [.., 1] vs [32] -> [.., 32]
    e = lw.emit(R.sum(lw.cast(ge, "int64"), axis=[-1], keepdims=True))
    x = lw.emit(R.left_shift(_i64(1), e))
    for _ in range(steps):
        q = lw.emit(R.floor_divide(V, lw.emit(R.maximum(x, _i64(1)))))
        nx = lw.emit(R.right_shift(lw.emit(R.add(x, q)), _i64(1)))
        x = lw.emit(R.minimum(x, nx))
    return x


@register
class LayerNormOp(IntOp):
    """I-LayerNorm over the last axis (module docstring), in int64:
      xi = x >> pre_shift;  y = C*xi - sum(xi);  V = sum(y*y) + eps_int;  sd = isqrt(V)
      k = 2^R // sd;  f = (y*k + 2^(R-F-1)) >> (R-F);  out = clip(rq(f; mult[c], shift[c], bias[c]))
    Bound: V <= C^3 * (span/2)^2 + eps_int < 2^62 (and within the Newton proof's vmax);
    |f*mult| + |bias| + 2^(shift-1) < 2^63."""
    name = "layernorm"
    attrs = {"pre_shift": "input right shift p", "eps_int": "integer epsilon E >= 1", "steps": "Newton steps",
             "vmax": "largest V the step count is proven for", "R": "normalisation shift", "F": "fraction bits of f",
             "mult": "per-channel multipliers", "shift": "per-channel shifts", "bias": "per-channel offsets",
             "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, a):
        xi = x.astype(np.int64) >> a["pre_shift"]
        C = xi.shape[-1]
        s = xi.sum(axis=-1, keepdims=True)
        y = np.int64(C) * xi - s
        V = (y * y).sum(axis=-1, keepdims=True) + np.int64(a["eps_int"])
        sd = isqrt(V, a["steps"])
        R, F = a["R"], a["F"]
        k = (np.int64(1) << R) // sd
        f = (y * k + (np.int64(1) << (R - F - 1))) >> (R - F)
        shift = np.asarray(a["shift"], np.int64)
        t = f * np.asarray(a["mult"], np.int64) + np.asarray(a["bias"], np.int64) + (np.int64(1) << (shift - 1))
        return np.clip(t >> shift, a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        R = relax.op
        x = lw.logical(x)
        C = x.shape[-1]
        xi = lw.cast(x.expr, "int64")
        if a["pre_shift"]:
            xi = lw.emit(R.right_shift(xi, _i64(a["pre_shift"])))
        s = lw.emit(R.sum(xi, axis=[-1], keepdims=True))
        y = lw.emit(R.subtract(lw.emit(R.multiply(xi, _i64(C))), s))
        V = lw.emit(R.add(lw.emit(R.sum(lw.emit(R.multiply(y, y)), axis=[-1], keepdims=True)),
                          _i64(a["eps_int"])))
        sd = lower_isqrt(lw, V, int(a["steps"]))
        Rb, F = int(a["R"]), int(a["F"])
        k = lw.emit(R.floor_divide(_i64(1 << Rb), sd))
        f = lw.emit(R.right_shift(lw.emit(R.add(lw.emit(R.multiply(y, k)), _i64(1 << (Rb - F - 1)))),
                                  _i64(Rb - F)))
        shift = np.asarray(a["shift"], np.int64)
        rnd = np.asarray(a["bias"], np.int64) + np.left_shift(np.int64(1), shift - 1)
        t = lw.emit(R.multiply(f, lw.c(a["mult"], "int64", x)))
        t = lw.emit(R.add(t, lw.c(rnd, "int64", x)))
        t = lw.emit(R.right_shift(t, lw.c(shift, "int64", x)))
        t = lw.emit(R.clip(t, int(a["lo"]), int(a["hi"])))
        return Value(lw.cast(t, a["dtype"]), x.perm, x.shape, a["dtype"])

    @staticmethod
    def bound(ctx, n, x):
        a = n.attrs
        C = ctx.shapes[n.inputs[0]][-1]
        p = int(a["pre_shift"])
        span = (int(x[1]) >> p) - (int(x[0]) >> p)
        vmax = C**3 * span * span // 4 + int(a["eps_int"])
        if vmax >= 2**62:
            ctx.fail(n, "the int64 row variance sum", float(vmax), 2.0**62)
        if vmax > int(a.get("vmax", vmax)):
            ctx.fail(n, "the row variance (beyond the Newton step count's proof)", float(vmax), float(a["vmax"]))
        fmax = 2.0 ** a["F"] + 1
        b = (fmax * float(np.abs(a["mult"]).max()) + float(np.abs(a["bias"]).max())
             + 2.0 ** (int(np.max(a["shift"])) - 1))
        if b > I64:
            ctx.fail(n, "the int64 requantization of the normalised value", b, I64)

    @staticmethod
    def examples(rng):
        out = []
        for dt, s, C in (("int8", 0.05, 32), ("int16", 1e-3, 48)):
            g, b = rng.standard_normal(C) * 0.3 + 1, rng.standard_normal(C) * 0.2
            a = layernorm_constants(s, dt, C, 1e-5, g, b, 0.03, -128, 127, "int8")
            out.append(Example([(dt, (2, 5, C))], a, "int8"))
        return out


@register
class GeluOp(IntOp):
    """i-GELU or ShiftGELU of the module docstring, in int64:
      igelu: t = min(|q| << u, -q_b) + q_b;  poly = t*t + q_c;  s = sgn(q)*poly + q_c
      shift: e = Shiftmax exp of -1.702|x|;  s = ((q >= 0 ? E0 : e) << K) // (E0 + e)
      out = clip(rq(q * s; mult, shift), lo, hi)
    Bound: |q| << u < 2^62; |q| * max|s| * |mult| + 2^(shift-1) < 2^63; ShiftGELU also (E0 << K) < 2^63."""
    name = "gelu"
    attrs = {"variant": "igelu | shift", "u": "argument grid shift", "q_b": "igelu: clip point",
             "q_c": "igelu: constant", "q_1": "shift: floor(2^u / S_z)", "N": "shift: mantissa bits",
             "K": "shift: sigmoid fraction bits", "pmax": "largest |q * s|", "mult": "output multiplier",
             "shift": "output shift", "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, a):
        q = x.astype(np.int64)
        aq = np.abs(q)
        ae = aq << a["u"] if a["u"] >= 0 else aq >> (-a["u"])
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

    @staticmethod
    def lower(lw, n, x):
        a = n.attrs
        R = relax.op
        q = lw.cast(x.expr, "int64")
        aq = lw.emit(R.abs(q))
        u = int(a["u"])
        ae = lw.emit(R.left_shift(aq, _i64(u)) if u >= 0 else R.right_shift(aq, _i64(-u)))
        neg = lw.emit(R.less(q, _i64(0)))
        if a["variant"] == "igelu":
            t = lw.emit(R.add(lw.emit(R.minimum(ae, _i64(-a["q_b"]))), _i64(a["q_b"])))
            poly = lw.emit(R.add(lw.emit(R.multiply(t, t)), _i64(a["q_c"])))
            s = lw.emit(R.add(lw.emit(R.where(neg, lw.emit(R.negative(poly)), poly)), _i64(a["q_c"])))
        else:
            d = lw.emit(R.negative(ae))
            v = lw.emit(R.subtract(lw.emit(R.add(d, lw.emit(R.right_shift(d, _i64(1))))),
                                   lw.emit(R.right_shift(d, _i64(4)))))
            z = lw.emit(R.floor_divide(lw.emit(R.negative(v)), _i64(a["q_1"])))
            r = lw.emit(R.add(v, lw.emit(R.multiply(z, _i64(a["q_1"])))))
            base = lw.emit(R.add(lw.emit(R.right_shift(r, _i64(1))), _i64(a["q_1"])))
            sh = lw.emit(R.subtract(_i64(a["N"]), lw.emit(R.minimum(z, _i64(a["N"])))))
            e = lw.emit(R.left_shift(base, sh))
            e0 = int(a["q_1"]) << int(a["N"])
            num = lw.emit(R.where(neg, e, _i64(e0)))
            s = lw.emit(R.floor_divide(lw.emit(R.left_shift(num, _i64(a["K"]))),
                                       lw.emit(R.add(e, _i64(e0)))))
        p = lw.emit(R.multiply(q, s))
        shift = int(a["shift"])
        t = lw.emit(R.multiply(p, _i64(a["mult"])))
        t = lw.emit(R.add(t, _i64(1 << (shift - 1))))
        t = lw.emit(R.right_shift(t, _i64(shift)))
        t = lw.emit(R.clip(t, int(a["lo"]), int(a["hi"])))
        return Value(lw.cast(t, a["dtype"]), x.perm, x.shape, a["dtype"])

    @staticmethod
    def bound(ctx, n, x):
        a = n.attrs
        qm = float(max(abs(x[0]), abs(x[1])))
        if qm * 2.0 ** max(a["u"], 0) >= 2.0**62 or a["u"] < -62:  # |q| << u (a degenerate input scale)
            ctx.fail(n, f"the scaled argument (grid shift u = {a['u']})", qm * 2.0 ** max(a["u"], 0), 2.0**62)
        if a["variant"] == "igelu":
            smax = float(a["q_b"]) ** 2 + 2.0 * abs(a["q_c"])
        else:
            smax = 2.0 ** a["K"]
            if float(a["q_1"]) * 2.0 ** (a["N"] + a["K"]) > I64:
                ctx.fail(n, "the sigmoid numerator", float(a["q_1"]) * 2.0 ** (a["N"] + a["K"]), I64)
        b = qm * smax * abs(float(a["mult"])) + 2.0 ** (int(a["shift"]) - 1)
        if b > I64:
            ctx.fail(n, "the int64 product x * (1 + erf) / sigmoid", b, I64)

    @staticmethod
    def examples(rng):
        out = []
        for dt, s, variant in (("int8", 6 / 127, "igelu"), ("int16", 6 / 32767, "igelu"), ("int16", 1e-3, "shift"),
                               ("int8", 0.5, "shift")):
            out.append(Example([(dt, (3, 40))], gelu_constants(s, dt, variant, 0.04, -128, 127, "int8"), "int8"))
        return out
