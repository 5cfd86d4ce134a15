"""Physical layouts of lowered tensors as permutations of the logical (ONNX) axis order.

A lowered tensor stores ``physical = transpose(logical, perm)``: physical axis i holds logical axis
perm[i].  NCHW tensors are perm (0, 1, 2, 3); NHWC, which the conv kernels use, is (0, 2, 3, 1).
Consequences used by the lowering:
  * a Transpose node is free: out_perm = T^-1 o in_perm (no data moves);
  * moving to another perm D permutes physical axes by [in_perm^-1[D[i]] for i];
    when only size-1 axes change places that is a reshape, not a copy;
  * elementwise constants broadcast in logical order are transposed by the same perm;
  * reductions, concat, slices, pads map their logical axes through in_perm^-1.
"""

from __future__ import annotations

import numpy as np

NCHW = (0, 1, 2, 3)
NHWC = (0, 2, 3, 1)


def identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def inverse(perm) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def physical_shape(logical_shape, perm) -> tuple[int, ...]:
    """Dims in storage order (ints stay ints; symbolic dims, TIR expressions, stay as they are)."""
    return tuple(_dim(logical_shape[p]) for p in perm)


def _dim(d):
    return int(d) if isinstance(d, (int, np.integer)) else d


def _is_one(d) -> bool:
    return isinstance(d, (int, np.integer)) and int(d) == 1   # a symbolic dim may be > 1


def move_axes(cur: tuple[int, ...], want: tuple[int, ...]) -> tuple[int, ...]:
    """Axes argument of permute_dims taking a tensor stored in ``cur`` to ``want``."""
    inv = inverse(cur)
    return tuple(inv[w] for w in want)


def is_pure_reshape(logical_shape, cur, want) -> bool:
    """True when the non-unit axes keep their relative order (the bytes are the same)."""
    a = [p for p in cur if not _is_one(logical_shape[p])]
    b = [p for p in want if not _is_one(logical_shape[p])]
    return a == b


def after_transpose(in_perm, t_perm) -> tuple[int, ...]:
    """perm of out = Transpose(in, t_perm) when no data is moved: Q with t_perm[Q[i]] = in_perm[i]."""
    tinv = inverse(t_perm)
    return tuple(tinv[p] for p in in_perm)


def const_for(arr: np.ndarray, rank: int, perm) -> np.ndarray:
    """A constant broadcastable in logical order, laid out for a tensor stored in ``perm``."""
    arr = np.asarray(arr)
    if arr.ndim == 0:
        return arr
    if arr.ndim < rank:
        arr = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
    if tuple(perm) == identity(rank):
        return arr
    return np.ascontiguousarray(np.transpose(arr, perm))


def reduced_perm(perm, axes, keepdims: bool) -> tuple[int, ...]:
    if keepdims:
        return tuple(perm)
    kept = [p for p in perm if p not in axes]
    order = sorted(kept)
    return tuple(order.index(p) for p in kept)
