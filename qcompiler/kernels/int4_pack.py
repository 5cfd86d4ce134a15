"""Packing of signed 4-bit integers, 8 per int32 word (two bit orders, both documented here).

The value range is [-8, 7]; a nibble holds the value's two's-complement low 4 bits.  Rows are
packed independently along the last axis (K, the reduction axis of a GEMM); a row whose length
is not a multiple of the block is padded with zero nibbles, which add nothing to a dot product.

``order="linear"`` (the default; what ``dense_int4`` takes for both operands)
    word j of a row holds elements 8j .. 8j+7; element 8j+i sits in bits [4i, 4i+4) (nibble i,
    low nibble first).  Read as bytes (little endian), byte b holds elements 2b (low nibble) and
    2b+1 (high nibble).  This is the element order PTX uses for ``.s4`` mma fragments, so packed
    rows load through ``ldmatrix`` as if they were int8 rows of K/2 bytes.  Rows are padded to
    a multiple of 8 elements: shape [..., ceil(K/8)].

``order="mma_k32"`` (what ``dense_w4a8`` takes for its weight)
    K is cut into blocks of 32; block q of a row becomes the 4 words 4q .. 4q+3.  Word 4q+c holds
    the 8 elements the mma.m16n8k32 B fragment of lane c (lane % 4 == c) needs:
        nibble 2i   <- element 32q + 4c + i        (i = 0..3)
        nibble 2i+1 <- element 32q + 16 + 4c + i
    so ``(word << 4) & 0xF0F0F0F0`` and ``word & 0xF0F0F0F0`` are the two int8x4 registers of the
    fragment, each byte holding 16 * value (exact; the kernel divides the int32 sum by 16).
    Rows are padded to a multiple of 32 elements: shape [..., ceil(K/32) * 4].

Both orders round-trip exactly (``unpack_int4(pack_int4(x, o), x.shape, o) == x``).
"""

from __future__ import annotations

import numpy as np

ORDERS = ("linear", "mma_k32")
INT4_MIN, INT4_MAX = -8, 7


def _block(order: str) -> int:
    if order == "linear":
        return 8
    if order == "mma_k32":
        return 32
    raise ValueError(f"unknown int4 packing order {order!r}; expected one of {ORDERS}")


def packed_cols(k: int, order: str = "linear") -> int:
    """Number of int32 words per packed row of ``k`` int4 elements."""
    blk = _block(order)
    return -(-k // blk) * blk // 8


# nibble position (0..7 within a word) -> element offset within the 8 (linear) or 32 (mma_k32)
# elements that feed the word's block; the word index inside the block is added separately.
def _source_index(order: str) -> np.ndarray:
    """For one block: idx[w, i] = element offset (within the block) stored in nibble i of word w."""
    if order == "linear":
        return np.arange(8).reshape(1, 8)
    idx = np.empty((4, 8), dtype=np.int64)
    for c in range(4):
        for i in range(4):
            idx[c, 2 * i] = 4 * c + i
            idx[c, 2 * i + 1] = 16 + 4 * c + i
    return idx


def pack_int4(x: np.ndarray, order: str = "linear") -> np.ndarray:
    """Pack integers in [-8, 7] along the last axis into int32 words (see the module docstring)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"pack_int4 needs an integer array, got {x.dtype}")
    if x.size and (x.min() < INT4_MIN or x.max() > INT4_MAX):
        raise ValueError(f"pack_int4: values must lie in [{INT4_MIN}, {INT4_MAX}], "
                         f"got [{int(x.min())}, {int(x.max())}]")
    blk = _block(order)
    k = x.shape[-1]
    kp = -(-k // blk) * blk
    lead = x.shape[:-1]
    xp = np.zeros(lead + (kp,), dtype=np.int64)
    xp[..., :k] = x
    nib = (xp & 0xF).astype(np.uint32).reshape(lead + (kp // blk, blk))
    src = _source_index(order)                                # [words per block, 8]
    gathered = nib[..., src]                                  # [..., blocks, wpb, 8]
    shifts = (4 * np.arange(8)).astype(np.uint32)
    words = np.bitwise_or.reduce(gathered << shifts, axis=-1)  # [..., blocks, wpb]
    return words.reshape(lead + (kp // 8,)).view(np.int32)


def unpack_int4(p: np.ndarray, shape, order: str = "linear") -> np.ndarray:
    """Inverse of :func:`pack_int4`: int8 array of ``shape`` (its last axis is the packed one)."""
    p = np.asarray(p)
    if p.dtype not in (np.int32, np.uint32):
        raise TypeError(f"unpack_int4 needs int32 words, got {p.dtype}")
    shape = tuple(int(s) for s in shape)
    blk = _block(order)
    k = shape[-1]
    kp = -(-k // blk) * blk
    if p.shape != shape[:-1] + (kp // 8,):
        raise ValueError(f"unpack_int4: packed shape {p.shape} does not match {shape} "
                         f"(expected {shape[:-1] + (kp // 8,)} for order {order!r})")
    lead = shape[:-1]
    u = p.view(np.uint32).reshape(lead + (kp // blk, blk // 8, 1))
    nib = ((u >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.int8)   # [..., blocks, wpb, 8]
    val = np.where(nib >= 8, nib - 16, nib).astype(np.int8)
    out = np.empty(lead + (kp // blk, blk), dtype=np.int8)
    src = _source_index(order)
    out[..., src] = val
    return out.reshape(lead + (kp,))[..., :k]


# ---- x86 CPU layout (qcompiler/kernels/backends/vnni_w4a8.py, avx2_w4a8.py) ------------------------
def pack_cpu_w4(wk: np.ndarray, lanes: int, groups: int, biased: bool) -> np.ndarray:
    """int [K, N] in [-8, 7] -> uint8 ``[ceil(N/L), Kp/kp, G, L, 4]`` nibbles, kp = 8G, Kp = K rounded up
    to kp (zero weights beyond K and N).

    One intrinsic call reads ``G`` blocks of ``L x 4`` bytes; for reduction step ``k = kb*kp + 8g + 4h + t``
    and column ``n = L*nb + i`` the weight sits in byte ``[nb, kb, g, i, t]``, low nibble for h = 0, high
    for h = 1, so ``x & 0xF`` / ``x >> 4`` (or ``(x << 4) & 0xF0`` / ``x & 0xF0``) of a whole vector are
    the weights of 4 consecutive reduction steps per lane, in the byte order of ``vpdpbusd`` /
    ``vpmaddubsw``.  ``biased``: nibbles hold ``w + 8`` (in [0, 15]; unpacked as ``nibble - 8``), else
    the two's-complement low 4 bits of ``w``.  :func:`unpack_cpu_w4` inverts it.
    """
    wk = np.asarray(wk)
    if wk.ndim != 2 or not np.issubdtype(wk.dtype, np.integer):
        raise ValueError(f"pack_cpu_w4: need an integer [K, N] array, got {wk.dtype} {wk.shape}")
    if wk.size and (wk.min() < INT4_MIN or wk.max() > INT4_MAX):
        raise ValueError(f"pack_cpu_w4: values must lie in [{INT4_MIN}, {INT4_MAX}], "
                         f"got [{int(wk.min())}, {int(wk.max())}]")
    K, N = wk.shape
    kp = 8 * groups
    Kp, Np = -(-K // kp) * kp, -(-N // lanes) * lanes
    w = np.zeros((Kp, Np), np.int64)
    w[:K, :N] = wk
    nib = ((w + 8) & 0xF) if biased else (w & 0xF)
    # [Kp, Np] -> [kb, g, h, t, nb, i] -> [nb, kb, g, i, t, h]
    t = nib.reshape(Kp // kp, groups, 2, 4, Np // lanes, lanes).transpose(4, 0, 1, 5, 3, 2)
    return np.ascontiguousarray((t[..., 0] | (t[..., 1] << 4)).astype(np.uint8))


def unpack_cpu_w4(p: np.ndarray, K: int, N: int, biased: bool) -> np.ndarray:
    """Inverse of :func:`pack_cpu_w4`: int8 [K, N]."""
    nbk, kbk, groups, lanes, four = p.shape
    assert four == 4
    lo, hi = (p & 0xF).astype(np.int64), (p >> 4).astype(np.int64)
    t = np.stack([lo, hi], axis=-1)                            # [nb, kb, g, i, t, h]
    v = (t - 8) if biased else np.where(t >= 8, t - 16, t)
    w = v.transpose(1, 2, 5, 4, 0, 3).reshape(kbk * groups * 8, nbk * lanes)
    return w[:K, :N].astype(np.int8)
