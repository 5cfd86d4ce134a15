"""Quantization value types and the dyadic arithmetic every pass, kernel and reference share.

Conventions (docs/design.md §2):
  * symmetric quantization, zero point 0: real = scale * q;
  * weights per output channel: S_w = max|w| / (2^(b-1) - 1), q = clamp(round(w / S_w));
  * activations per tensor; unsigned [0, 2^b - 1] only where the producer is provably >= 0;
  * dyadic requantization: a real multiplier M is applied as (x * mult + 2^(shift-1)) >> shift,
    i.e. round-half-up of x * mult / 2^shift with an arithmetic (floor) shift.
    mult/shift come from frexp: M = m * 2^e, m in [0.5, 1); mult = round(m * 2^31),
    shift = 31 - e; if mult == 2^31 then mult = 2^30, shift -= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import QuantizationError

INT_RANGES = {
    "int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255),
    "int16": (-32768, 32767), "uint16": (0, 65535), "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}
MAX_SHIFT = 62


def int_range(dtype: str) -> tuple[int, int]:
    return INT_RANGES[dtype]


@dataclass(frozen=True)
class QParams:
    """How an integer tensor represents real values: real = scale * q, q of ``dtype``."""

    scale: float
    dtype: str

    def __post_init__(self):
        if self.dtype not in INT_RANGES:
            raise ValueError(f"QParams: unknown integer dtype {self.dtype}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"QParams: scale must be finite and > 0, got {self.scale}")

    @property
    def qmin(self) -> int:
        return INT_RANGES[self.dtype][0]

    @property
    def qmax(self) -> int:
        return INT_RANGES[self.dtype][1]

    @property
    def bits(self) -> int:
        return int(self.dtype.lstrip("uint"))

    @property
    def signed(self) -> bool:
        return not self.dtype.startswith("u")


def activation_qparams(lo: float, hi: float, nonneg: bool, bits: int = 8) -> QParams:
    """Per-tensor symmetric scale from a calibrated range."""
    if nonneg:
        amax = max(hi, 0.0)
        qmax = 2**bits - 1
        dtype = f"uint{bits}"
    else:
        amax = max(abs(lo), abs(hi))
        qmax = 2 ** (bits - 1) - 1
        dtype = f"int{bits}"
    if not np.isfinite(amax) or amax <= 0:
        amax = 1.0  # a constant-zero tensor: any scale represents it exactly
    return QParams(float(amax) / qmax, dtype)


@dataclass(frozen=True)
class Dyadic:
    """Integer multiplier arrays: x -> (x * mult + 2^(shift-1)) >> shift (broadcastable arrays)."""

    mult: np.ndarray  # int64, |mult| < 2^31
    shift: np.ndarray  # int64, 1 <= shift <= 62

    def __post_init__(self):
        m, s = np.asarray(self.mult), np.asarray(self.shift)
        if m.dtype != np.int64 or s.dtype != np.int64:
            raise ValueError("Dyadic: mult and shift must be int64 arrays")
        if np.any(np.abs(m) >= 2**31) or np.any(s < 1) or np.any(s > MAX_SHIFT):
            raise ValueError("Dyadic: |mult| < 2^31 and 1 <= shift <= 62 required")

    def value(self) -> np.ndarray:
        return self.mult.astype(np.float64) / np.exp2(self.shift.astype(np.float64))


def dyadic(M, what: str = "multiplier") -> Dyadic:
    """Dyadic (mult, shift) arrays for real multipliers ``M`` (any sign, any shape)."""
    M = np.asarray(M, dtype=np.float64)
    if not np.all(np.isfinite(M)):
        raise QuantizationError(f"{what}: non-finite requantization multiplier")
    mag = np.abs(M)
    m, e = np.frexp(mag)
    mult = np.round(m * 2.0**31).astype(np.int64)
    shift = (31 - e).astype(np.int64)
    carry = mult == 2**31
    mult = np.where(carry, 2**30, mult)
    shift = np.where(carry, shift - 1, shift)
    # very small multipliers: keep the shift in range by dropping low bits of mult
    over = shift > MAX_SHIFT
    if np.any(over):
        drop = shift - MAX_SHIFT
        mult = np.where(over, np.floor(mult / np.exp2(np.where(over, drop, 0)) + 0.5).astype(np.int64), mult)
        shift = np.where(over, MAX_SHIFT, shift)
    zero = (mag == 0) | (mult == 0)
    mult = np.where(zero, 0, mult)
    shift = np.where(zero, 1, shift)
    if np.any(shift < 1):
        raise QuantizationError(f"{what}: multiplier {float(mag.max()):.3g} is too large for int32 dyadic "
                                "arithmetic (>= 2^30); the calibrated ranges are degenerate")
    mult = np.where(M < 0, -mult, mult).astype(np.int64)
    return Dyadic(mult, shift.astype(np.int64))


def dyadic_common(Ms: list, what: str = "add") -> tuple[list[np.ndarray], np.ndarray]:
    """Several multipliers sharing one shift (for sums of requantized branches):
    returns ([mult_i], shift) with mult_i = round(M_i * 2^shift), all |mult_i| < 2^31."""
    arrs = [np.abs(np.asarray(M, dtype=np.float64)) for M in Ms]
    big = np.max(np.stack(np.broadcast_arrays(*arrs)), axis=0)
    _, e = np.frexp(np.where(big > 0, big, 1.0))
    shift = np.clip(31 - e, 1, MAX_SHIFT).astype(np.int64)
    while True:
        mults = [np.round(np.asarray(M, dtype=np.float64) * np.exp2(shift)).astype(np.int64) for M in Ms]
        if all(np.all(np.abs(m) < 2**31) for m in mults):
            break
        shift = shift - np.any([np.abs(m) >= 2**31 for m in np.broadcast_arrays(*mults)], axis=0)
        if np.any(shift < 1):
            raise QuantizationError(f"{what}: branch multipliers too large for int32 dyadic arithmetic")
    return mults, shift


def requant_ref(x: np.ndarray, mult: np.ndarray, shift: np.ndarray, add: np.ndarray | None = None) -> np.ndarray:
    """NumPy reference of the dyadic step in int64: (x * mult + add + 2^(shift-1)) >> shift."""
    t = x.astype(np.int64) * mult.astype(np.int64)
    if add is not None:
        t = t + add.astype(np.int64)
    t = t + (np.int64(1) << (shift.astype(np.int64) - 1))
    return t >> shift.astype(np.int64)


W16_QMAX = 127 * 256 + 127   # 16-bit weights: q = 256 * hi + lo with hi, lo both int8 (intops/gemm.py)


def weight_qmax(bits: int) -> int:
    """Largest weight magnitude at ``bits``: 2^(b-1) - 1, and ``W16_QMAX`` at 16 bits."""
    return W16_QMAX if bits == 16 else 2 ** (bits - 1) - 1


def quantize_weights(w: np.ndarray, axis: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric weights: (q int8, or int16 at 16 bits; S_w float64 per channel along ``axis``)."""
    qmax = weight_qmax(bits)
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w.astype(np.float64)), axis=red) if red else np.abs(w.astype(np.float64))
    scale = np.where(amax > 0, amax / qmax, 1.0)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax - 1, qmax).astype(np.int16 if bits > 8 else np.int8)
    return q, scale
