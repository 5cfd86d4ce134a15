"""INT8 / INT4 tensor-core GEMM and implicit-GEMM conv kernels for NVIDIA GPUs (TIR, scheduled).

Every kernel computes the fused function of the kernel contract (``qcompiler/kernels/__init__.py``)
with the weight stored [N, K] (row n = output channel, so it loads through ``ldmatrix`` like A):

    acc[m, n] = sum_k A[m, k] * W[n, k] + bias[n]                                    (int32)
    Out[m, n] = clip((int64(acc[m, n]) * mult[n] + (1 << (shift[n] - 1))) >> shift[n], lo, hi)

Kernels (all ``mma.sync`` + ``ldmatrix``; see ``_cuda_intrin.py`` for the fragment layouts):

  dense        A int8|uint8 [M, K] x W int8 [N, K]; ``mma.m16n8k32.s8`` (sm_80+), four
               ``mma.m8n8k16`` per step on sm_75.
  batch_matmul the dense GEMM per batch entry (``blockIdx.z``) of two activations, A [batch, M, K]
               x W [batch, N, K], no bias, one (mult, shift) per tensor (attention Q.K^T, P.V).
  conv2d_nhwc  the same GEMM with A gathered on the fly from X [N, H, W, C] (implicit GEMM):
               row m = (n, oh, ow), column k = (kh * KW + kw) * C + c; zero padding and ragged
               tiles are zero-filled copies, no im2col buffer.
  dense_w4a8   W int4 packed 8 per int32 in the ``mma_k32`` order (``int4_pack``), unpacked in
               registers to int8 (16 * w per byte: two LOP per register, no emulation) and fed to
               the s8 mma; the int32 sum is divided by 16 (exact) before the bias.  The path for
               sm_90, which has no INT4 tensor cores: half the weight bytes of INT8.
  conv2d_nhwc_w4a8  the implicit-GEMM conv with ``dense_w4a8``'s packed weights and unpack.
  dense_int4   A and W int4, both packed ``linear`` [rows, ceil(K/8)] int32; native
               ``mma.m16n8k64.s4`` (sm_80/86/89), ``mma.m8n8k32.s4`` (sm_75).  Not on sm_90
               (ptxas emulates s4 mma there with a CALL per instruction: ``supports`` says no).

How the kernels are written.  Not tensorized: each kernel is generated directly as TIR that is
already fully scheduled (thread bindings, unrolled fragment loops), with the PTX instructions of the
``T.ptx`` dialect (ldmatrix, mma, cp.async with src-size zero fill, ld/st).  That keeps every
instruction under our control and stays clear of ``tvm.s_tir.tensor_intrin`` (30-40 s to import).

Schedule (one CTA computes a BM x BN output tile; ``MmaConfig`` holds the tunable parameters):
  * ``warps_m x warps_n`` warps, each a (BM/warps_m) x (BN/warps_n) sub-tile of 16x8 mma tiles
    with int32 accumulators in registers; ``warps_k`` > 1 adds warp groups that take turns over
    the mma steps of each stage (intra-CTA split-K, for small M: more warps and more CTAs stream
    the weight) and add their partial sums through shared memory before the epilogue;
  * K is walked in BK-element tiles through a ``stages``-deep ring of shared-memory buffers filled
    by ``cp.async`` (sm_80+; zero-fill via src-size for out-of-range rows / columns / padding),
    one ``cp.async.wait_group`` + ``__syncthreads`` per tile, the next tile's copy issued before
    the current tile's mma; on sm_75 (no cp.async) the next tile is loaded into registers before
    the mma and stored to the ring after it;
  * shared rows are padded by 16 bytes (row stride / 16 odd), so ``ldmatrix`` and the 16-byte
    copies are free of bank conflicts; the ring is addressed through raw shared-window addresses
    (one ``access_ptr`` over the whole ring), which keeps TVM's buffer compaction, StorageRewrite
    and ThreadSync from resizing, merging or re-synchronizing it: the barriers are the pipeline's;
  * the epilogue (bias, dyadic requantization, clip, cast) runs on the accumulator registers and
    stores straight to global memory, guarded for ragged M / N.

Ragged shapes are exact: any M, N, K (and any conv geometry) is handled by zero-filled loads and
guarded stores.  Operand alignment picks the copy width (16/8/4 bytes; K % 4 != 0 int8 rows, or a
conv with C % 4 != 0, fall back to byte copies).  What a kernel cannot do raises
:class:`KernelUnsupported` (a ``TargetError``) so the lowering can fall back to a generic schedule.

Every PrimFunc carries ``qc.scheduled``, ``tirx.is_scheduled`` (dlight leaves it alone) and
``op_pattern`` = opaque (FuseOps leaves it alone); it can go into a Relax module with
``bb.add_func`` and be called with ``relax.call_tir``.

Building for the GPU in this TVM: ``tvm.compile`` keeps CUDA *source* in the module and the CUDA
runtime JIT-compiles it when the library is loaded (through the ``tvm_callback_cuda_compile``
global, registered by ``import tvm.support.nvcc``; nvrtc by default, nvcc with
``TVM_CUDA_COMPILE_MODE=nvcc``).  :func:`compile_cubin` / :func:`sass_of` compile that same
source with nvcc here, which needs no GPU.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from math import gcd

import numpy as np
import tvm
from tvm.script import tirx as T

from ._tvmscript import TS
from ..errors import TargetError
from . import _cuda_intrin as ci
from .int4_pack import packed_cols

__all__ = [
    "MmaConfig", "KernelUnsupported", "default_config", "dense", "batch_matmul", "conv2d_nhwc", "dense_w4a8",
    "conv2d_nhwc_w4a8",
    "dense_int4", "supports", "sass_of", "cuda_source", "cuda_sources", "compile_cubin", "cuda_target",
    "build", "ensure_cuda_jit", "conv_output_hw",
    "KINDS", "ARCHS", "MAX_K_W4A8", "config_points",
]

ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
KINDS = ("dense", "conv2d", "w4a8", "int4")
OUT_DTYPES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767),
              "int32": (-(2**31), 2**31 - 1)}
# max opt-in shared memory per block (bytes), by SM version
_SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
               90: 227 * 1024}
MAX_K_W4A8 = (2**31 - 1) // (16 * 255 * 8)  # 16 * sum_k A*w stays in int32 (uint8 A worst case)
_MAX_ACC_REGS = 128
_PAD = 16  # bytes of padding per shared-memory row


class KernelUnsupported(TargetError):
    """This kernel cannot serve the request (arch, dtype, shape); use a generic schedule instead."""


# ---- arch ------------------------------------------------------------------------------------
def _arch_num(arch) -> int:
    """70 / "sm_80" / "sm_90a" / "80" / a cuda Target -> SM number."""
    if isinstance(arch, tvm.target.Target):
        arch = str(arch.attrs.get("arch", ""))
    if isinstance(arch, int):
        return arch
    s = str(arch).strip().lower()
    if s.startswith("sm_"):
        s = s[3:]
    s = s.rstrip("af")
    if not s.isdigit():
        raise KernelUnsupported(f"unknown CUDA arch {arch!r}; expected e.g. 'sm_80'")
    return int(s)


def cuda_target(arch) -> tvm.target.Target:
    """The CUDA target the kernels are built for (``{"kind": "cuda", "arch": "sm_XX"}``)."""
    return tvm.target.Target({"kind": "cuda", "arch": f"sm_{_arch_num(arch)}"})


def supports(arch, kind: str) -> bool:
    """Whether a kernel of ``kind`` ("dense", "conv2d", "w4a8", "int4") exists for ``arch``.

    INT8 kinds need integer mma (sm_75+).  Native INT4 exists on sm_75..sm_89 only: Hopper has no
    INT4 tensor cores (ptxas emulates s4 mma with a CALL), Blackwell dropped the integer s4 mma
    too; use "w4a8" there.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    try:
        sm = _arch_num(arch)
    except KernelUnsupported:
        return False
    if sm < 75:
        return False
    if kind == "int4":
        return sm < 90
    return True


def _smem_limit(sm: int) -> int:
    return _SMEM_LIMIT.get(sm, 99 * 1024 if sm < 90 else 227 * 1024)


# ---- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MmaConfig:
    """Tunable parameters of the tensor-core GEMM schedule.

    bm, bn    CTA output tile (rows of A x rows of W); multiples of 16 * warps_m / 16 * warps_n
    bk        K elements per pipeline stage: a multiple of 32 (int8) / 64 (int4 and W4A8 kernels)
    warps_m   warps along M, warps_n along N; each warp owns a (bm/warps_m) x (bn/warps_n)
              accumulator tile, at most 64x64 (128 int32 registers)
    warps_k   warps along K (intra-CTA split-K, for small M): the mma steps of each stage are dealt
              round-robin to warps_k warp groups, whose partial sums are added through shared
              memory before the epilogue; warps_m * warps_n * warps_k <= 16
    stages    depth of the shared-memory ring (2..8); stages - 1 tiles are in flight
    vec_a     bytes per global->shared copy of A: 16, 8, 4 (cp.async) or 1 (byte copies);
              0 = the widest the operand's alignment allows
    vec_b     the same for W
    """

    bm: int = 128
    bn: int = 128
    bk: int = 64
    warps_m: int = 2
    warps_n: int = 2
    stages: int = 3
    vec_a: int = 0
    vec_b: int = 0
    warps_k: int = 1

    def __post_init__(self):
        for name in ("bm", "bn", "bk", "warps_m", "warps_n", "warps_k", "stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"MmaConfig: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.warps_m * self.warps_n * self.warps_k > 16:
            raise ValueError(f"MmaConfig: {self.warps_m}x{self.warps_n}x{self.warps_k} warps exceed 16 (512 threads)")
        if (self.bk // 32) % self.warps_k:
            raise ValueError(f"MmaConfig: bk={self.bk} has {self.bk // 32} mma steps, not a multiple of "
                             f"warps_k={self.warps_k}")
        if self.bm % (16 * self.warps_m):
            raise ValueError(f"MmaConfig: bm={self.bm} is not a multiple of 16 * warps_m = {16 * self.warps_m}")
        if self.bn % (16 * self.warps_n):
            raise ValueError(f"MmaConfig: bn={self.bn} is not a multiple of 16 * warps_n = {16 * self.warps_n}")
        if self.bk % 32 or self.bk > 512:
            raise ValueError(f"MmaConfig: bk={self.bk} must be a multiple of 32, at most 512")
        if not 2 <= self.stages <= 8:
            raise ValueError(f"MmaConfig: stages={self.stages} must be in 2..8")
        wm, wn = self.bm // self.warps_m, self.bn // self.warps_n
        if wm * wn // 32 > _MAX_ACC_REGS:
            raise ValueError(f"MmaConfig: warp tile {wm}x{wn} needs {wm * wn // 32} accumulator "
                             f"registers per thread (max {_MAX_ACC_REGS})")
        for name in ("vec_a", "vec_b"):
            if getattr(self, name) not in (0, 1, 4, 8, 16):
                raise ValueError(f"MmaConfig: {name} must be 0, 1, 4, 8 or 16, got {getattr(self, name)}")

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n * self.warps_k

    def smem_bytes(self, a_bits: int = 8, b_bits: int = 8) -> int:
        """Shared memory of the ring, for operands of a_bits / b_bits per element."""
        ta, tb = self.bk * a_bits // 8, self.bk * b_bits // 8
        return self.stages * (self.bm * (ta + _PAD) + self.bn * (tb + _PAD))


_KIND_BITS = {"dense": (8, 8), "conv2d": (8, 8), "w4a8": (8, 4), "int4": (4, 4)}


def default_config(M: int, N: int, K: int, arch, kind: str = "dense", batch: int = 1) -> MmaConfig:
    """A reasonable untuned configuration for an M x N x K problem (no search).

    Small M (decode-like GEMV shapes): 16-row tiles, narrow N tiles so that many CTAs stream the
    weight, deep K stages split across warps (warps_k); large problems: 128x128 tiles with 64x64
    warp tiles.  Vector widths are left to the kernel (0 = the widest the alignment allows).
    ``batch`` independent problems (``batch_matmul``) count towards filling the GPU.
    """
    sm = _arch_num(arch)
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    g = 2 if kind == "w4a8" else 1                 # mma steps per B load
    k_mult = 64 if kind in ("w4a8", "int4") else 32
    step = 64 if kind == "int4" else 32            # K elements per mma step
    stages = 3 if sm >= ci.CP_ASYNC_MIN_ARCH else 2
    tiny = dict(bm=16, bn=16, bk=512, warps_m=1, warps_n=1, warps_k=4, stages=4 if sm >= 80 else 2)
    small = dict(bm=32, bn=32, bk=256, warps_m=2, warps_n=1, warps_k=2, stages=stages)
    mid = dict(bm=64, bn=32, bk=128, warps_m=2, warps_n=1, warps_k=2, stages=stages)
    wide = dict(bm=64, bn=128, bk=64, warps_m=2, warps_n=2, warps_k=1, stages=stages)
    square = dict(bm=64, bn=64, bk=128, warps_m=2, warps_n=2, warps_k=1, stages=stages)
    big = dict(bm=128, bn=128, bk=64, warps_m=2, warps_n=2, warps_k=1, stages=stages)
    if M <= 16:
        order = [tiny]
    elif M <= 32:
        order = [small, tiny]
    elif M <= 64:
        order = [mid, small, tiny]
    elif M <= 256 or M * N <= 256 * 1024:
        order = [wide, square, mid, small, tiny]
    else:
        order = [big, wide, square, mid]
    # the first that gives enough CTAs to fill a GPU (~100 SMs), else the one with the most
    ctas = [batch * -(-M // c["bm"]) * -(-N // c["bn"]) for c in order]
    pick = next((i for i, n in enumerate(ctas) if n >= 100), max(range(len(order)), key=lambda i: ctas[i]))
    cfg = dict(order[pick])
    # no deeper K tiles than the (rounded) reduction needs
    kr = max(k_mult, -(-K // k_mult) * k_mult)
    while cfg["bk"] > k_mult and cfg["bk"] // 2 >= kr:
        cfg["bk"] //= 2
    groups = cfg["bk"] // step // g
    while groups % cfg["warps_k"]:
        cfg["warps_k"] //= 2
    # narrow N tiles for narrow outputs
    while cfg["bn"] // 2 >= max(N, 16 * cfg["warps_n"]) and cfg["bn"] > 16:
        cfg["bn"] //= 2
    a_bits, b_bits = _KIND_BITS[kind]
    c = MmaConfig(**cfg)
    while c.smem_bytes(a_bits, b_bits) > min(_smem_limit(sm), 96 * 1024) and c.stages > 2:
        c = MmaConfig(**{**c.__dict__, "stages": c.stages - 1})
    return c


def config_points(M: int, N: int, K: int, arch, kind: str = "dense"):
    """The MmaConfig grid of an M x N x K problem of ``kind`` (dicts): CTA tiles up to the next power
    of two of M / N, K tiles in the kind's multiples (32 int8, 64 for the 4-bit kernels), 1-4 warps
    per axis, 2-5 stages, the ring within the arch's shared memory.  The generator may still reject
    some (split-K partial sums, ``KernelUnsupported``)."""
    sm = _arch_num(arch)
    smem = _smem_limit(sm)
    bits = _KIND_BITS[kind]
    k_mult = 64 if kind in ("w4a8", "int4") else 32
    cap_m = max(16, 1 << max(0, (M - 1)).bit_length())      # no CTA tile beyond the next power of 2
    cap_n = max(16, 1 << max(0, (N - 1)).bit_length())
    cap_k = max(k_mult, 1 << max(0, (K - 1)).bit_length())
    for bm in (16, 32, 64, 128, 256):
        for bn in (16, 32, 64, 128, 256):
            for bk in (32, 64, 128, 256, 512):
                if bm > cap_m or bn > cap_n or bk % k_mult or bk > cap_k:
                    continue
                for wm in (1, 2, 4):
                    for wn in (1, 2, 4):
                        for wk in (1, 2, 4):
                            for st in (2, 3, 4, 5):
                                kw = dict(bm=bm, bn=bn, bk=bk, warps_m=wm, warps_n=wn, warps_k=wk, stages=st)
                                try:
                                    c = MmaConfig(**kw)
                                except ValueError:
                                    continue
                                if c.smem_bytes(*bits) <= smem:
                                    yield kw


# ---- problem description ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Conv:
    n: int
    h: int
    w: int
    c: int
    kh: int
    kw: int
    oh: int
    ow: int
    sh: int
    sw: int
    pt: int
    pl: int
    dh: int
    dw: int


@dataclass(frozen=True)
class _Operand:
    """One GEMM operand as the loader sees it: rows of bytes in a global buffer."""

    rows: int            # M or N
    row_bytes: int       # bytes per row in global memory (packed int4: 4 * words)
    elem_bytes: int      # bytes per element of the global buffer (1 int8/uint8, 4 packed int32)
    vec: int             # bytes per copy
    conv: _Conv | None = None


@dataclass(frozen=True)
class _Problem:
    kind: str            # "s8" | "w4a8" | "s4"
    M: int
    N: int
    K: int
    a_type: str          # PTX type of A: s8 u8 s4 u4
    out_dtype: str
    lo: int
    hi: int
    a: _Operand
    b: _Operand
    a_shape: tuple
    a_dtype: str
    w_shape: tuple
    w_dtype: str
    out_shape: tuple
    batch: int = 0       # > 0: batched (A [batch, M, K], W [batch, N, K], no bias, scalar mult / shift)


def _as_int(name: str, v) -> int:
    try:
        return operator.index(v)         # int, numpy integers; not float / bool-like strings
    except TypeError:
        raise KernelUnsupported(f"{name} must be an integer, got {v!r}") from None


def _check_epilogue(out_dtype: str, lo, hi) -> tuple[int, int]:
    if out_dtype not in OUT_DTYPES:
        raise KernelUnsupported(f"out dtype must be one of {tuple(OUT_DTYPES)}, got {out_dtype!r}")
    lo, hi = _as_int("lo", lo), _as_int("hi", hi)
    dlo, dhi = OUT_DTYPES[out_dtype]
    if not dlo <= lo <= hi <= dhi:
        raise KernelUnsupported(f"clip range [{lo}, {hi}] is empty or outside {out_dtype} [{dlo}, {dhi}]")
    return lo, hi


def _check_dims(**dims) -> tuple[int, ...]:
    out = []
    for k, v in dims.items():
        v = _as_int(k, v)
        if v <= 0:
            raise KernelUnsupported(f"{k} must be positive, got {v}")
        if v >= 2**31:
            raise KernelUnsupported(f"{k}={v} does not fit int32 indexing")
        out.append(v)
    return tuple(out)


def _widest_vec(row_bytes: int, requested: int, *, cp_async_ok: bool = True, extra: int = 0) -> int:
    """The copy width: the widest of 16/8/4 dividing row_bytes (and ``extra``), else 1."""
    if not isinstance(row_bytes, int):  # a symbolic depth: no alignment is known, byte copies
        if requested not in (0, 1):
            raise KernelUnsupported(f"copy width {requested} bytes: the rows have a symbolic length; use 1")
        return 1
    align = gcd(row_bytes, extra) if extra else row_bytes
    widest = next((v for v in (16, 8, 4) if align % v == 0), 1)
    if requested == 0:
        return widest
    if requested > widest:
        raise KernelUnsupported(f"copy width {requested} bytes does not divide the operand rows "
                                f"({row_bytes} bytes{f', C={extra}' if extra else ''}); use <= {widest}")
    return requested


# ---- the kernel generator ---------------------------------------------------------------------
def _gemm(p: _Problem, cfg: MmaConfig, sm: int) -> tvm.tirx.PrimFunc:
    kind = p.kind
    a_bits = 4 if kind == "s4" else 8
    b_bits = 4 if kind in ("s4", "w4a8") else 8
    k_elems = 64 if kind == "s4" else 32          # K elements per mma step
    if kind in ("s4", "w4a8") and cfg.bk % 64:
        raise KernelUnsupported(f"bk={cfg.bk} must be a multiple of 64 for the int4 kernels")
    BM, BN, BK, S = cfg.bm, cfg.bn, cfg.bk, cfg.stages
    NTH = cfg.threads
    WMW, WNW, WK = cfg.warps_m, cfg.warps_n, cfg.warps_k
    WM, WN = BM // WMW, BN // WNW
    MT, NT8 = WM // 16, WN // 8
    TKA, TKB = BK * a_bits // 8, BK * b_bits // 8      # bytes per shared row per stage
    SA, SB = TKA + _PAD, TKB + _PAD
    KSTEPS = BK // k_elems
    G = 2 if kind == "w4a8" else 1                      # mma steps per B load (W4A8: ldmatrix of 2)
    if (KSTEPS // G) % WK:
        raise KernelUnsupported(f"bk={BK} has {KSTEPS // G} k-groups for {kind}, not a multiple of warps_k={WK}")
    KG = KSTEPS // G // WK                              # k-groups per warp per stage
    B_STEP = 16 if kind == "w4a8" else 32              # W bytes per mma step
    smem = S * (BM * SA + BN * SB)
    if smem > _smem_limit(sm):
        raise KernelUnsupported(f"config needs {smem} bytes of shared memory; sm_{sm} allows {_smem_limit(sm)}")
    if (WK - 1) * BM * BN * 4 > smem:
        raise KernelUnsupported(f"warps_k={WK}: the split-K partial sums ({(WK - 1) * BM * BN * 4} bytes) "
                                f"do not fit the {smem}-byte ring; use fewer warps_k or more stages")
    if isinstance(p.a.row_bytes, int):
        KT = max(-(-p.a.row_bytes // TKA), -(-p.b.row_bytes // TKB))
    else:  # a symbolic depth (int8 operands: both rows are K bytes)
        KT = tvm.tirx.floordiv(p.a.row_bytes + (TKA - 1), TKA)
    # a symbolic M (an int32 variable bound from A's shape): ceil(M / BM) CTAs, every row guarded
    GM = -(-p.M // BM) if isinstance(p.M, int) else tvm.tirx.floordiv(p.M + (BM - 1), BM)
    GN = -(-p.N // BN) if isinstance(p.N, int) else tvm.tirx.floordiv(p.N + (BN - 1), BN)
    if isinstance(GN, int) and GN > 65535:
        raise KernelUnsupported(f"N={p.N} needs {GN} > 65535 column tiles; raise bn")
    use_cp = sm >= ci.CP_ASYNC_MIN_ARCH
    mma = ci.make_mma_16x8(sm, p.a_type, "s4" if kind == "s4" else "s8")
    wait = ci.make_cp_async_wait(S - 2)
    w4a8 = kind == "w4a8"
    batched = not isinstance(p.batch, int) or p.batch > 0

    def make_loader(op: _Operand, tile_rows: int, TK: int, stride: int, g_dtype: str, ring_offset: int,
                    reg0: int):
        V = op.vec
        CPR = TK // V
        TOTAL = tile_rows * CPR
        ITERS = -(-TOTAL // NTH)
        EXACT = TOTAL % NTH == 0
        guard_row = not isinstance(op.rows, int) or op.rows % tile_rows != 0
        guard_k = not isinstance(op.row_bytes, int) or op.row_bytes % TK != 0
        conv = op.conv
        guarded = guard_row or guard_k or conv is not None
        mode = "byte" if V == 1 else ("cp" if use_cp else "ldst")
        EB = op.elem_bytes
        STAGE = tile_rows * stride
        RING0 = ring_offset  # where this operand's stages start in the ring (bytes)

        def cond_of(grow, gb):
            c = None
            if guard_row or conv is not None:
                c = grow < op.rows
            if guard_k or conv is not None:
                c = (gb < op.row_bytes) if c is None else tvm.tirx.And(c, gb < op.row_bytes)
            if conv is not None:
                ohw = conv.oh * conv.ow
                rem = tvm.tirx.floormod(grow, ohw)
                oh, ow = tvm.tirx.floordiv(rem, conv.ow), tvm.tirx.floormod(rem, conv.ow)
                tap = tvm.tirx.floordiv(gb, conv.c)
                kh, kw = tvm.tirx.floordiv(tap, conv.kw), tvm.tirx.floormod(tap, conv.kw)
                ih = oh * conv.sh - conv.pt + kh * conv.dh
                iw = ow * conv.sw - conv.pl + kw * conv.dw
                for extra in (ih >= 0, ih < conv.h, iw >= 0, iw < conv.w):
                    c = tvm.tirx.And(c, extra)
            return c

        def src_of(G, grow, gb, inb, rb):
            def clamp(x):
                return x if inb is None else tvm.tirx.if_then_else(inb, x, 0)

            if conv is None:
                row = clamp(grow) if not batched else rb + clamp(grow)  # rb: the batch entry's first row
                return G[row, clamp(tvm.tirx.floordiv(gb, EB) if EB > 1 else gb)]
            ohw = conv.oh * conv.ow
            n = tvm.tirx.floordiv(grow, ohw)
            rem = tvm.tirx.floormod(grow, ohw)
            oh, ow = tvm.tirx.floordiv(rem, conv.ow), tvm.tirx.floormod(rem, conv.ow)
            tap = tvm.tirx.floordiv(gb, conv.c)
            kh, kw = tvm.tirx.floordiv(tap, conv.kw), tvm.tirx.floormod(tap, conv.kw)
            ci_ = tvm.tirx.floormod(gb, conv.c)
            ih = oh * conv.sh - conv.pt + kh * conv.dh
            iw = ow * conv.sw - conv.pl + kw * conv.dw
            return G[clamp(n), clamp(ih), clamp(iw), clamp(ci_)]

        def as_i8(x):
            return x if g_dtype == "int8" else tvm.tirx.reinterpret("int8", x)

        CP = ci.cp_async_name(V) if mode == "cp" else ""
        NW = max(V // 4, 1)
        LD = {1: "ld.global.u32", 2: "ld.global.v2.u32", 4: "ld.global.v4.u32"}[NW]
        ST = {1: "st.shared.u32", 2: "st.shared.v2.u32", 4: "st.shared.v4.u32"}[NW]

        @T.macro
        def load_regs(regs, ro, addr):  # NW 32-bit words from global memory into regs[ro:ro + NW]
            if NW == 1:
                T.ptx[LD](regs[ro], addr)
            elif NW == 2:
                T.ptx[LD](regs[ro], regs[ro + 1], addr)
            else:
                T.ptx[LD](regs[ro], regs[ro + 1], regs[ro + 2], regs[ro + 3], addr)

        @T.macro
        def chunk_fetch(G, Sm, base, regs, ro, cid, row0, kt, stage, rb):
            r = T.meta_var(cid // CPR)
            c = T.meta_var(cid % CPR)
            grow = T.meta_var(row0 + r)
            gb = T.meta_var(kt * TK + c * V)
            inb = T.meta_var(cond_of(grow, gb))
            src = T.meta_var(src_of(G, grow, gb, inb, rb))
            dst = T.meta_var(base + T.cast(stage * STAGE + r * stride + c * V, "uint32"))
            if mode == "cp":
                if guarded:
                    T.ptx[CP](dst, T.address_of(src), V, T.if_then_else(inb, T.uint32(V), T.uint32(0)))
                else:
                    T.ptx[CP](dst, T.address_of(src), V)
            elif mode == "byte":
                if guarded:
                    Sm[RING0 + stage * STAGE + r * stride + c] = T.if_then_else(inb, as_i8(src), T.int8(0))
                else:
                    Sm[RING0 + stage * STAGE + r * stride + c] = as_i8(src)
            else:  # ldst: into registers now, to shared memory after the mma of this stage (put)
                for i in T.unroll(NW):
                    regs[ro + i] = T.uint32(0)
                if guarded:
                    if inb:
                        load_regs(regs, ro, T.address_of(src))
                else:
                    load_regs(regs, ro, T.address_of(src))

        @T.macro
        def chunk_put(base, regs, ro, cid, stage):
            dst = T.meta_var(base + T.cast(stage * STAGE + (cid // CPR) * stride + (cid % CPR) * V, "uint32"))
            if NW == 1:
                T.ptx[ST](dst, regs[ro])
            elif NW == 2:
                T.ptx[ST](dst, regs[ro], regs[ro + 1])
            else:
                T.ptx[ST](dst, regs[ro], regs[ro + 1], regs[ro + 2], regs[ro + 3])

        @T.macro
        def fetch(G, Sm, base, regs, tid, row0, kt, stage, rb):
            for it in T.unroll(ITERS):
                if EXACT:
                    chunk_fetch(G, Sm, base, regs, reg0 + it * NW, tid + it * NTH, row0, kt, stage, rb)
                else:
                    if tid + it * NTH < TOTAL:
                        chunk_fetch(G, Sm, base, regs, reg0 + it * NW, tid + it * NTH, row0, kt, stage, rb)

        @T.macro
        def put(base, regs, tid, stage):
            for it in T.unroll(ITERS):
                if EXACT:
                    chunk_put(base, regs, reg0 + it * NW, tid + it * NTH, stage)
                else:
                    if tid + it * NTH < TOTAL:
                        chunk_put(base, regs, reg0 + it * NW, tid + it * NTH, stage)

        return fetch, (put if mode == "ldst" else None), (ITERS * NW if mode == "ldst" else 0)

    A_STAGE, B_STAGE = BM * SA, BN * SB
    fetch_a, put_a, nreg_a = make_loader(p.a, BM, TKA, SA, p.a_dtype, 0, 0)
    fetch_b, put_b, nreg_b = make_loader(p.b, BN, TKB, SB, p.w_dtype, S * A_STAGE, nreg_a)
    NREGS = max(nreg_a + nreg_b, 1)
    staged = put_a is not None or put_b is not None
    NACC = MT * NT8 * 4

    @T.macro
    def put_ab(a_base, b_base, regs, tid, stage):
        if put_a is not None:
            put_a(a_base, regs, tid, stage)
        if put_b is not None:
            put_b(b_base, regs, tid, stage)

    @T.macro
    def compute(a_base, b_base, af, bf, braw, acc, stage, wm_, wn_, wk_, lane):
        for kk in T.unroll(KG):
            for h in T.unroll(G):
                # mma step ks = (kk * WK + wk_) * G + h of this stage
                for mi in T.unroll(MT):
                    T.ptx[ci.LDMATRIX_X4](
                        af[mi * 4], af[mi * 4 + 1], af[mi * 4 + 2], af[mi * 4 + 3],
                        a_base + T.cast(stage * A_STAGE + (wm_ * WM + mi * 16 + lane % 16) * SA
                                        + ((kk * WK + wk_) * G + h) * 32 + (lane // 16) * 16, "uint32"))
                if w4a8:
                    # one ldmatrix.x4 holds two n8 tiles x two k steps of packed words
                    if h == 0:
                        for nj in T.unroll(NT8 // 2):
                            T.ptx[ci.LDMATRIX_X4](
                                braw[nj * 4], braw[nj * 4 + 1], braw[nj * 4 + 2], braw[nj * 4 + 3],
                                b_base + T.cast(stage * B_STAGE
                                                + (wn_ * WN + nj * 16 + lane % 8 + 8 * (lane // 16)) * SB
                                                + (kk * WK + wk_) * 32 + 16 * ((lane // 8) % 2), "uint32"))
                    for nt in T.unroll(NT8):
                        b01 = T.meta_var(ci.unpack_w4_mma_k32(braw[(nt // 2) * 4 + (nt % 2) * 2 + h]))
                        bf[nt * 2] = b01[0]
                        bf[nt * 2 + 1] = b01[1]
                else:
                    for nj in T.unroll(NT8 // 2):
                        T.ptx[ci.LDMATRIX_X4](
                            bf[nj * 4], bf[nj * 4 + 1], bf[nj * 4 + 2], bf[nj * 4 + 3],
                            b_base + T.cast(stage * B_STAGE
                                            + (wn_ * WN + nj * 16 + lane % 8 + 8 * (lane // 16)) * SB
                                            + (kk * WK + wk_) * B_STEP + 16 * ((lane // 8) % 2), "uint32"))
                for mi in T.unroll(MT):
                    for nt in T.unroll(NT8):
                        mma(acc, (mi * NT8 + nt) * 4, af, mi * 4, bf, nt * 2)

    wait_all = ci.make_cp_async_wait(0)
    RED_WARP = NACC * 32 * 4        # bytes of one warp's partial accumulators

    @T.macro
    def reduce_k(a_base, acc, tmp, wm_, wn_, wk_, lane):
        """Add the partial sums of the warps_k groups into group 0 (through the idle ring)."""
        if use_cp:
            wait_all()
        T.tvm_storage_sync("shared")
        if wk_ > 0:
            for i in T.unroll(NACC):
                T.ptx["st.shared.u32"](a_base + T.cast((((wk_ - 1) * WNW + wn_) * WMW + wm_) * RED_WARP
                                                       + (i * 32 + lane) * 4, "uint32"), acc[i])
        T.tvm_storage_sync("shared")
        if wk_ == 0:
            for j in T.unroll(WK - 1):
                for i in T.unroll(NACC):
                    T.ptx["ld.shared.u32"](tmp[0], a_base + T.cast(((j * WNW + wn_) * WMW + wm_) * RED_WARP
                                                                   + (i * 32 + lane) * 4, "uint32"))
                    acc[i] = acc[i] + tmp[0]

    guard_m = not isinstance(p.M, int) or p.M % BM != 0
    guard_n = not isinstance(p.N, int) or p.N % BN != 0
    M, N, lo, hi, out_dtype = p.M, p.N, p.lo, p.hi, p.out_dtype

    def requant(v, col, bias, mult, shift):
        x = v
        if w4a8:
            x = tvm.tirx.shift_right(x, tvm.tirx.const(4, "int32"))
        # |mult| < 2^31 (contract): going through int32 lets nvcc use one 32x32->64 multiply
        if batched:  # no bias, one (mult, shift) for the tensor
            col = 0
        else:
            x = x + bias[col]
        m32 = tvm.tirx.Cast("int64", tvm.tirx.Cast("int32", mult[col]))
        t = tvm.tirx.Cast("int64", x) * m32 + tvm.tirx.shift_left(
            tvm.tirx.const(1, "int64"), shift[col] - tvm.tirx.const(1, "int64"))
        y = tvm.tirx.shift_right(t, shift[col])
        y = tvm.tirx.max(tvm.tirx.min(y, tvm.tirx.const(hi, "int64")), tvm.tirx.const(lo, "int64"))
        return tvm.tirx.Cast(out_dtype, y)

    def out_row(row, ob):
        return row if not batched else ob + row   # ob: the batch entry's first output row

    @T.macro
    def store(Out, bias, mult, shift, acc, row, col, idx, ob):
        Out[out_row(row, ob), col] = requant(T.reinterpret("int32", acc[idx]), col, bias, mult, shift)

    # 8/16-bit outputs with an even N: the two adjacent columns of a lane go out as one store
    out_bits = tvm.DataType(out_dtype).bits
    paired = out_bits in (8, 16) and isinstance(N, int) and N % 2 == 0
    pair_dtype = {8: "int16", 16: "int32"}.get(out_bits, "int16")
    lane_mask = (1 << out_bits) - 1

    def pack_pair(v0, v1):
        lo_ = tvm.tirx.bitwise_and(tvm.tirx.Cast("int32", v0), tvm.tirx.const(lane_mask, "int32"))
        hi_ = tvm.tirx.shift_left(tvm.tirx.Cast("int32", v1), tvm.tirx.const(out_bits, "int32"))
        return tvm.tirx.Cast(pair_dtype, tvm.tirx.bitwise_or(lo_, hi_))

    @T.macro
    def store_pair(Outp, bias, mult, shift, acc, row, col, idx, ob):
        Outp[out_row(row, ob), col // 2] = pack_pair(requant(T.reinterpret("int32", acc[idx]), col, bias, mult, shift),
                                        requant(T.reinterpret("int32", acc[idx + 1]), col + 1, bias, mult, shift))

    @T.macro
    def epilogue_pairs(Outp, bias, mult, shift, acc, bx, by, wm_, wn_, lane, ob):
        for mi in T.unroll(MT):
            for nt in T.unroll(NT8):
                for h in T.unroll(2):
                    if guard_m or guard_n:
                        if (bx * BM + wm_ * WM + mi * 16 + h * 8 + lane // 4 < M) and (by * BN + wn_ * WN + nt * 8 + (lane % 4) * 2 < N):
                            store_pair(Outp, bias, mult, shift, acc,
                                       bx * BM + wm_ * WM + mi * 16 + h * 8 + lane // 4,
                                       by * BN + wn_ * WN + nt * 8 + (lane % 4) * 2,
                                       (mi * NT8 + nt) * 4 + h * 2, ob)
                    else:
                        store_pair(Outp, bias, mult, shift, acc,
                                   bx * BM + wm_ * WM + mi * 16 + h * 8 + lane // 4,
                                   by * BN + wn_ * WN + nt * 8 + (lane % 4) * 2,
                                   (mi * NT8 + nt) * 4 + h * 2, ob)

    @T.macro
    def epilogue_single(Out, bias, mult, shift, acc, bx, by, wm_, wn_, lane, ob):
        for mi in T.unroll(MT):
            for nt in T.unroll(NT8):
                for h in T.unroll(2):
                    for e in T.unroll(2):
                        if guard_m or guard_n:
                            if (bx * BM + wm_ * WM + mi * 16 + h * 8 + lane // 4 < M) and (by * BN + wn_ * WN + nt * 8 + (lane % 4) * 2 + e < N):
                                store(Out, bias, mult, shift, acc,
                                      bx * BM + wm_ * WM + mi * 16 + h * 8 + lane // 4,
                                      by * BN + wn_ * WN + nt * 8 + (lane % 4) * 2 + e,
                                      (mi * NT8 + nt) * 4 + h * 2 + e, ob)
                        else:
                            store(Out, bias, mult, shift, acc,
                                  bx * BM + wm_ * WM + mi * 16 + h * 8 + lane // 4,
                                  by * BN + wn_ * WN + nt * 8 + (lane % 4) * 2 + e,
                                  (mi * NT8 + nt) * 4 + h * 2 + e, ob)

    @T.macro
    def epilogue(Out, Outp, bias, mult, shift, acc, bx, by, wm_, wn_, lane, ob):
        if paired:
            epilogue_pairs(Outp, bias, mult, shift, acc, bx, by, wm_, wn_, lane, ob)
        else:
            epilogue_single(Out, bias, mult, shift, acc, bx, by, wm_, wn_, lane, ob)

    a_shape, a_dtype, w_shape, w_dtype, out_shape = p.a_shape, p.a_dtype, p.w_shape, p.w_dtype, p.out_shape
    NBRAW = (NT8 // 2) * 4 if w4a8 else 1

    @T.macro
    def grid(A, W, bias, mult, shift, Out2, OutP, bz):
        for bx in T.thread_binding(GM, thread="blockIdx.x"):
            for by in T.thread_binding(GN, thread="blockIdx.y"):
                for tid in T.thread_binding(NTH, thread="threadIdx.x"):
                    # one ring for both operands: A stages, then B stages
                    ring = T.alloc_buffer((S * (A_STAGE + B_STAGE),), "int8", scope="shared.dyn")
                    acc = T.alloc_buffer((NACC,), "uint32", scope="local")
                    af = T.alloc_buffer((MT * 4,), "uint32", scope="local")
                    bf = T.alloc_buffer((NT8 * 2,), "uint32", scope="local")
                    braw = T.alloc_buffer((NBRAW,), "uint32", scope="local")
                    regs = T.alloc_buffer((NREGS,), "uint32", scope="local")
                    tmp = T.alloc_buffer((1,), "uint32", scope="local")
                    # raw shared-window addresses: one access_ptr over the whole ring keeps the
                    # buffers from being compacted, and hides the ring from ThreadSync (the
                    # pipeline below places its own barriers)
                    # (two buffers would be merged by StorageRewrite: their only visible access
                    # is this access_ptr, so their live ranges look disjoint)
                    a_base = T.cuda.cvta_generic_to_shared(ring.access_ptr("rw", offset=0, extent=S * (A_STAGE + B_STAGE)))
                    b_base = T.meta_var(a_base + T.uint32(S * A_STAGE))
                    for i in T.unroll(NACC):
                        acc[i] = T.uint32(0)
                    for s in T.unroll(S - 1):
                        if s < KT:
                            fetch_a(A, ring, a_base, regs, tid, bx * BM, s, s, bz * M)
                            fetch_b(W, ring, b_base, regs, tid, by * BN, s, s, bz * N)
                            if staged:
                                put_ab(a_base, b_base, regs, tid, s)
                        if use_cp:
                            ci.cp_async_commit()
                    for kt in T.serial(KT):
                        # tile kt has landed (this thread's copies) ...
                        if use_cp:
                            wait()
                        # ... everybody's have, and everybody is done with the stage refilled below
                        T.tvm_storage_sync("shared")
                        if kt + (S - 1) < KT:
                            fetch_a(A, ring, a_base, regs, tid, bx * BM, kt + (S - 1), (kt + (S - 1)) % S, bz * M)
                            fetch_b(W, ring, b_base, regs, tid, by * BN, kt + (S - 1), (kt + (S - 1)) % S, bz * N)
                        if use_cp:
                            ci.cp_async_commit()
                        compute(a_base, b_base, af, bf, braw, acc, kt % S, (tid // 32) % WMW,
                                (tid // 32) // WMW % WNW, (tid // 32) // (WMW * WNW), tid % 32)
                        if staged:
                            if kt + (S - 1) < KT:
                                put_ab(a_base, b_base, regs, tid, (kt + (S - 1)) % S)
                    if WK > 1:
                        reduce_k(a_base, acc, tmp, (tid // 32) % WMW, (tid // 32) // WMW % WNW,
                                 (tid // 32) // (WMW * WNW), tid % 32)
                        if (tid // 32) // (WMW * WNW) == 0:
                            epilogue(Out2, OutP, bias, mult, shift, acc, bx, by, (tid // 32) % WMW,
                                     (tid // 32) // WMW % WNW, tid % 32, bz * M)
                    else:
                        epilogue(Out2, OutP, bias, mult, shift, acc, bx, by, (tid // 32) % WMW,
                                 (tid // 32) // WMW % WNW, tid % 32, bz * M)


    if not batched:
        @TS.prim_func(s_tir=True)
        def kernel(A_in: T.handle, W_in: T.handle, bias: T.Buffer((N,), "int32"), mult: T.Buffer((N,), "int64"),
                   shift: T.Buffer((N,), "int64"), Out_in: T.handle):
            T.func_attr({"tirx.noalias": True})
            A = T.match_buffer(A_in, a_shape, a_dtype)
            W = T.match_buffer(W_in, w_shape, w_dtype)
            Out = T.match_buffer(Out_in, out_shape, out_dtype)
            Out2 = T.decl_buffer((M, N), out_dtype, data=Out.data)
            OutP = T.decl_buffer((M, N // 2 if paired else 1), pair_dtype, data=Out.data)
            grid(A, W, bias, mult, shift, Out2, OutP, 0)
    else:
        # [batch * rows, K] views: entry bz is rows bz*M.. of A / Out and bz*N.. of W
        BATCH = p.batch
        a_rows, w_rows = (BATCH * M, a_shape[-1]), (BATCH * N, w_shape[-1])

        @TS.prim_func(s_tir=True)
        def kernel(A_in: T.handle, W_in: T.handle, mult: T.Buffer((1,), "int64"), shift: T.Buffer((1,), "int64"),
                   Out_in: T.handle):
            T.func_attr({"tirx.noalias": True})
            A = T.match_buffer(A_in, a_shape, a_dtype)
            W = T.match_buffer(W_in, w_shape, w_dtype)
            Out = T.match_buffer(Out_in, out_shape, out_dtype)
            A2 = T.decl_buffer(a_rows, a_dtype, data=A.data)
            W2 = T.decl_buffer(w_rows, w_dtype, data=W.data)
            Out2 = T.decl_buffer((BATCH * M, N), out_dtype, data=Out.data)
            OutP = T.decl_buffer((BATCH * M, N // 2 if paired else 1), pair_dtype, data=Out.data)
            for bz in T.thread_binding(BATCH, thread="blockIdx.z"):
                grid(A2, W2, mult, mult, shift, Out2, OutP, bz)

    attrs = {"qc.scheduled": True, "tirx.is_scheduled": True, "op_pattern": 8,
             "qc.kernel": f"cuda_mma.{kind}", "qc.config": str(cfg)}
    # no global_symbol: the caller names the function (bb.add_func / AttachGlobalSymbol)
    kernel = kernel.without_attr("global_symbol")
    for k, v in attrs.items():
        kernel = kernel.with_attr(k, v)
    return kernel


# ---- public entry points -----------------------------------------------------------------------
_INT8_A = {"int8": "s8", "uint8": "u8"}  # activation dtype -> PTX operand type of the int8 kernels


def _kernel_sm(arch, kind: str) -> int:
    """SM number of ``arch``; KernelUnsupported when no kernel of ``kind`` exists there."""
    sm = _arch_num(arch)
    if not supports(sm, kind):
        if kind == "int4":
            raise KernelUnsupported(f"no native INT4 tensor cores on sm_{sm} (sm_75..sm_89 only); use dense_w4a8")
        raise KernelUnsupported(f"no integer tensor cores on sm_{sm} (need sm_75+)")
    return sm


def _a_type(a_dtype: str, allowed: dict) -> str:
    if a_dtype not in allowed:
        raise KernelUnsupported(f"activation dtype must be one of {tuple(allowed)}, got {a_dtype!r}")
    return allowed[a_dtype]


def _sym_rows(M, name: str = "M") -> tuple:
    """(M of the kernel, M of its config): an int twice, or for a symbolic row count (a Relax
    shape expression: batch x sequence ...) an int32 variable of the kernel's own, bound from A's
    shape at run time, and the representative size ``tune/workload.rows_bucket`` gives it (the
    config, tuning records and cost-model predictions are per bucket)."""
    if isinstance(M, (int, np.integer)):
        return _check_dims(**{name: M})[0], int(M)
    from qcompiler.tune.workload import rows_bucket

    return tvm.tirx.Var(name, "int32"), rows_bucket(M)


def _finish_config(config, M, N, K, sm, kind):
    cfg = config if config is not None else default_config(M, N, K, sm, kind)
    if not isinstance(cfg, MmaConfig):
        raise TypeError(f"config must be an MmaConfig, got {type(cfg).__name__}")
    return cfg


def dense(M: int, N: int, K: int, out_dtype: str, lo: int, hi: int, arch, config: MmaConfig | None = None,
          a_dtype: str = "int8") -> tvm.tirx.PrimFunc:
    """Fused INT8 tensor-core dense.

    Arguments of the PrimFunc: A a_dtype [M, K] (int8, or uint8 after a ReLU), W int8 [N, K],
    bias int32 [N], mult int64 [N], shift int64 [N], Out out_dtype [M, N].  M may be symbolic
    (``_sym_rows``): ceil(M / bm) CTAs and every row load / store guarded.
    """
    M, m_rep = _sym_rows(M)
    N, K = _check_dims(N=N, K=K)
    lo, hi = _check_epilogue(out_dtype, lo, hi)
    sm = _kernel_sm(arch, "dense")
    a_type = _a_type(a_dtype, _INT8_A)
    cfg = _finish_config(config, m_rep, N, K, sm, "dense")
    a = _Operand(M, K, 1, _widest_vec(K, cfg.vec_a))
    b = _Operand(N, K, 1, _widest_vec(K, cfg.vec_b))
    p = _Problem("s8", M, N, K, a_type, out_dtype, lo, hi, a, b, (M, K), a_dtype, (N, K), "int8", (M, N))
    return _gemm(p, cfg, sm)


def batch_matmul(batch: int, M: int, N: int, K: int, a_dtype: str = "int8", b_dtype: str = "int8",
                 out_dtype: str = "int8", lo: int = -128, hi: int = 127, arch="sm_80",
                 config: MmaConfig | None = None) -> tvm.tirx.PrimFunc:
    """Out[b] = requant(A[b] @ W[b]^T) for two activations (attention Q.K^T, P.V), on mma.sync.

    Arguments of the PrimFunc: A a_dtype [batch, M, K] (int8 or uint8), W int8 [batch, N, K] (the
    right operand stored transposed, "W" layout, so it loads through ``ldmatrix`` like A), mult
    int64 [1], shift int64 [1], Out out_dtype [batch, M, N]; no bias:

        Out[b, m, n] = clip((int64(sum_k A[b, m, k] * W[b, n, k]) * mult + 2^(shift-1)) >> shift, lo, hi)

    The GEMM of ``dense`` per batch entry (``blockIdx.z``), its tiles never crossing an entry.
    A right operand held as [K, N] must be transposed first: ``ldmatrix.trans`` moves 16-bit
    elements, so it cannot transpose int8 tiles (the lowering emits a transpose when the stored
    layout is not [N, K]).  batch, M and N may be symbolic (``_sym_rows``: int32 variables of the
    kernel bound from the operands' shapes; every row and column guarded, no paired stores).
    """
    (batch, b_rep), (M, m_rep), (N, n_rep) = _sym_rows(batch, "batch"), _sym_rows(M, "M"), _sym_rows(N, "N")
    K, k_rep = _sym_rows(K, "K")   # a symbolic depth (P.V): byte copies, every k guarded
    lo, hi = _check_epilogue(out_dtype, lo, hi)
    sm = _kernel_sm(arch, "dense")
    a_type = _a_type(a_dtype, _INT8_A)
    if b_dtype != "int8":
        raise KernelUnsupported(f"batch_matmul: the right operand must be int8, got {b_dtype!r}")
    if b_rep > 65535:
        raise KernelUnsupported(f"batch_matmul: batch={b_rep} > 65535 (blockIdx.z)")
    if b_rep * max(m_rep, n_rep) * max(k_rep, n_rep) >= 2**31:
        raise KernelUnsupported("batch_matmul: operands do not fit int32 indexing")
    cfg = config if config is not None else default_config(m_rep, n_rep, k_rep, sm, "dense", batch=b_rep)
    cfg = _finish_config(cfg, m_rep, n_rep, k_rep, sm, "dense")
    a = _Operand(M, K, 1, _widest_vec(K, cfg.vec_a))
    b = _Operand(N, K, 1, _widest_vec(K, cfg.vec_b))
    p = _Problem("s8", M, N, K, a_type, out_dtype, lo, hi, a, b, (batch, M, K), a_dtype, (batch, N, K), "int8",
                 (batch, M, N), batch=batch)
    return _gemm(p, cfg, sm)


def dense_w4a8(M: int, N: int, K: int, out_dtype: str, lo: int, hi: int, arch, config: MmaConfig | None = None,
               a_dtype: str = "int8") -> tvm.tirx.PrimFunc:
    """W4A8 dense: int8 activations x int4 weights (INT8 tensor cores; the sm_90 INT4 path).

    Arguments: A a_dtype [M, K], W int32 [N, ceil(K/32)*4] = ``pack_int4(w, order="mma_k32")``,
    bias int32 [N], mult int64 [N], shift int64 [N], Out out_dtype [M, N].
    The kernel accumulates 16 * sum_k A*w in int32, so K <= MAX_K_W4A8 (65793 for int8 A).
    M may be symbolic, as in ``dense``.
    """
    M, m_rep = _sym_rows(M)
    N, K = _check_dims(N=N, K=K)
    lo, hi = _check_epilogue(out_dtype, lo, hi)
    sm = _kernel_sm(arch, "w4a8")
    a_type = _a_type(a_dtype, _INT8_A)
    if K > MAX_K_W4A8:
        raise KernelUnsupported(f"W4A8: K={K} > {MAX_K_W4A8} may overflow the int32 accumulator of 16*sum")
    cfg = _finish_config(config, m_rep, N, K, sm, "w4a8")
    kw = packed_cols(K, "mma_k32")
    a = _Operand(M, K, 1, _widest_vec(K, cfg.vec_a))
    b = _Operand(N, 4 * kw, 4, _widest_vec(4 * kw, cfg.vec_b))
    p = _Problem("w4a8", M, N, K, a_type, out_dtype, lo, hi, a, b, (M, K), a_dtype, (N, kw), "int32", (M, N))
    return _gemm(p, cfg, sm)


def dense_int4(M: int, N: int, K: int, out_dtype: str, lo: int, hi: int, arch, config: MmaConfig | None = None,
               a_dtype: str = "int4") -> tvm.tirx.PrimFunc:
    """Native INT4 tensor-core dense (sm_75 / sm_80 / sm_86 / sm_89).

    Arguments: A int32 [M, ceil(K/8)] and W int32 [N, ceil(K/8)], both ``pack_int4(x)`` (linear
    order, zero nibbles past K), bias int32 [N], mult int64 [N], shift int64 [N], Out [M, N].
    ``a_dtype`` "uint4" reads the activation nibbles as unsigned (mma .u4.s4).
    """
    M, N, K = _check_dims(M=M, N=N, K=K)
    lo, hi = _check_epilogue(out_dtype, lo, hi)
    sm = _kernel_sm(arch, "int4")
    a_type = _a_type(a_dtype, {"int4": "s4", "uint4": "u4"})
    cfg = _finish_config(config, M, N, K, sm, "int4")
    kw = packed_cols(K, "linear")
    a = _Operand(M, 4 * kw, 4, _widest_vec(4 * kw, cfg.vec_a))
    b = _Operand(N, 4 * kw, 4, _widest_vec(4 * kw, cfg.vec_b))
    if a.vec < 4 or b.vec < 4:  # pragma: no cover - 4 * kw is always a multiple of 4
        raise KernelUnsupported("int4 rows must be copied in 4-byte words")
    p = _Problem("s4", M, N, K, a_type, out_dtype, lo, hi, a, b, (M, kw), "int32", (N, kw), "int32", (M, N))
    return _gemm(p, cfg, sm)


def conv_output_hw(H, W, KH, KW, strides, pads, dilations) -> tuple[int, int]:
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = strides, pads, dilations
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    return OH, OW


def conv2d_nhwc(N: int, H: int, W: int, C: int, OC: int, KH: int, KW: int, strides, pads, dilations,
                out_dtype: str, lo: int, hi: int, arch, config: MmaConfig | None = None,
                a_dtype: str = "int8") -> tvm.tirx.PrimFunc:
    """Fused INT8 tensor-core NHWC convolution (implicit GEMM, groups = 1).

    Arguments: X a_dtype [N, H, W, C], W int8 [OC, KH*KW*C] with k = (kh*KW + kw)*C + c,
    bias int32 [OC], mult int64 [OC], shift int64 [OC], Out out_dtype [N, OH, OW, OC].
    pads = (top, left, bottom, right); zero padding.
    """
    return _conv(N, H, W, C, OC, KH, KW, strides, pads, dilations, out_dtype, lo, hi, arch, config, a_dtype, 8)


def conv2d_nhwc_w4a8(N: int, H: int, W: int, C: int, OC: int, KH: int, KW: int, strides, pads, dilations,
                     out_dtype: str, lo: int, hi: int, arch, config: MmaConfig | None = None,
                     a_dtype: str = "int8") -> tvm.tirx.PrimFunc:
    """W4A8 NHWC convolution: the implicit GEMM of ``conv2d_nhwc`` with ``dense_w4a8``'s weights.

    Arguments: X a_dtype [N, H, W, C], W int32 [OC, ceil(K/32)*4] = ``pack_int4(wk, order="mma_k32")``
    of the int8 matrix wk [OC, K] (values in [-8, 7]) with K = KH*KW*C and k = (kh*KW + kw)*C + c,
    bias int32 [OC], mult int64 [OC], shift int64 [OC], Out out_dtype [N, OH, OW, OC].

    A is gathered as in ``conv2d_nhwc`` (row m = (n, oh, ow), zero-filled padding and ragged tiles);
    each packed weight word is unpacked in registers into the two int8x4 B registers holding
    16 * w (``_cuda_intrin.unpack_w4_mma_k32``) of an s8 ``mma.m16n8k32``, so the accumulator is
    16 * sum_k X*w, divided by 16 (an exact arithmetic shift) before the bias:

        acc = (sum_k (16 * w[oc, k]) * x[m, k]) >> 4 + bias[oc]

    hence K <= MAX_K_W4A8.  Packed rows are zero past K (the pad adds nothing).  Any arch with
    integer mma (sm_75+); the 4-bit layers' path on sm_90, which has no INT4 tensor cores.
    """
    return _conv(N, H, W, C, OC, KH, KW, strides, pads, dilations, out_dtype, lo, hi, arch, config, a_dtype, 4)


def _conv(N, H, W, C, OC, KH, KW, strides, pads, dilations, out_dtype, lo, hi, arch, config, a_dtype,
          w_bits: int) -> tvm.tirx.PrimFunc:
    # a symbolic batch N (the rows N*OH*OW of the implicit GEMM: ``_sym_rows``); H and W are static
    N, n_rep = _sym_rows(N, "N")
    H, W, C, OC, KH, KW = _check_dims(H=H, W=W, C=C, OC=OC, KH=KH, KW=KW)
    strides, pads, dilations = tuple(int(s) for s in strides), tuple(int(s) for s in pads), tuple(int(s) for s in dilations)
    if len(strides) != 2 or len(pads) != 4 or len(dilations) != 2:
        raise KernelUnsupported(f"conv2d_nhwc: strides/dilations need 2 values and pads 4 (t, l, b, r); "
                                f"got {strides}, {pads}, {dilations}")
    if min(strides) < 1 or min(dilations) < 1 or min(pads) < 0:
        raise KernelUnsupported(f"conv2d_nhwc: bad strides {strides}, pads {pads} or dilations {dilations}")
    lo, hi = _check_epilogue(out_dtype, lo, hi)
    kind = "w4a8" if w_bits == 4 else "conv2d"
    sm = _kernel_sm(arch, kind)
    a_type = _a_type(a_dtype, _INT8_A)
    OH, OW = conv_output_hw(H, W, KH, KW, strides, pads, dilations)
    if OH <= 0 or OW <= 0:
        raise KernelUnsupported(f"conv2d_nhwc: empty output {OH}x{OW}")
    M, K = N * OH * OW, KH * KW * C
    _check_dims(M=n_rep * OH * OW, K=K)
    if n_rep * H * W * C >= 2**31:
        raise KernelUnsupported("conv2d_nhwc: input does not fit int32 indexing")
    if w_bits == 4 and K > MAX_K_W4A8:
        raise KernelUnsupported(f"W4A8: K={K} > {MAX_K_W4A8} may overflow the int32 accumulator of 16*sum")
    cfg = _finish_config(config, n_rep * OH * OW, OC, K, sm, kind)
    geom = _Conv(N, H, W, C, KH, KW, OH, OW, strides[0], strides[1], pads[0], pads[1], dilations[0], dilations[1])
    a = _Operand(M, K, 1, _widest_vec(K, cfg.vec_a, extra=C), conv=geom)
    if w_bits == 4:
        kw = packed_cols(K, "mma_k32")
        b = _Operand(OC, 4 * kw, 4, _widest_vec(4 * kw, cfg.vec_b))
        w_shape, w_dtype = (OC, kw), "int32"
    else:
        b = _Operand(OC, K, 1, _widest_vec(K, cfg.vec_b))
        w_shape, w_dtype = (OC, K), "int8"
    p = _Problem("w4a8" if w_bits == 4 else "s8", M, OC, K, a_type, out_dtype, lo, hi, a, b, (N, H, W, C), a_dtype,
                 w_shape, w_dtype, (N, OH, OW, OC))
    return _gemm(p, cfg, sm)


# ---- building, cubins and SASS ------------------------------------------------------------------
def _device_modules(mod):
    """CUDA device modules inside a built library (Executable, runtime Module)."""
    root = mod.mod if hasattr(mod, "mod") and not hasattr(mod, "imports") else mod
    out, seen, todo = [], set(), [root]
    while todo:
        m = todo.pop()
        key = id(m)
        if key in seen:
            continue
        seen.add(key)
        if getattr(m, "kind", None) == "cuda":
            out.append(m)
        todo.extend(getattr(m, "imports", ()))
    return out


def build(func: tvm.tirx.PrimFunc, arch, name: str = "main"):
    """``tvm.compile`` one kernel for ``cuda_target(arch)`` (the module keeps CUDA source)."""
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    return tvm.compile(mod, target=cuda_target(arch))


def cuda_sources(func_or_lib, arch=None) -> list[str]:
    """The generated CUDA C++ translation units of a PrimFunc (built for ``arch``) or of a built
    library (one per CUDA device module; each compiles on its own)."""
    lib = build(func_or_lib, arch) if isinstance(func_or_lib, tvm.tirx.PrimFunc) else func_or_lib
    srcs = [str(m.inspect_source("cuda")) for m in _device_modules(lib)]
    srcs = [s for s in srcs if s]
    if not srcs:
        raise TargetError("the library holds no CUDA source (built for another target, or loaded from a binary)")
    return srcs


def cuda_source(func_or_lib, arch=None) -> str:
    """The generated CUDA C++ of a PrimFunc (built for ``arch``) or of a built library."""
    return "\n".join(cuda_sources(func_or_lib, arch))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    try:
        import nvidia  # the pip wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm

        for base in nvidia.__path__:
            for sub in ("cu13", "cu12", "cuda_cuobjdump", "cuda_nvdisasm"):
                cand = os.path.join(base, sub, "bin", name)
                if os.path.exists(cand):
                    return cand
    except ImportError:
        pass
    raise TargetError(f"{name} not found: install the CUDA toolkit or "
                      f"`pip install \"nvidia-cuda-cuobjdump<14\" \"nvidia-cuda-nvdisasm<14\"`")


def _cache_dir() -> str | None:
    d = os.environ.get("QC_CUBIN_CACHE")
    if d:
        os.makedirs(d, exist_ok=True)
    return d


@functools.lru_cache(maxsize=256)
def _compile_cubin_cached(source: str, sm: int, options: tuple) -> bytes:
    key = hashlib.sha256(f"{sm}|{options}|".encode() + source.encode()).hexdigest()[:32]
    cache = _cache_dir()
    if cache and os.path.exists(os.path.join(cache, key + ".cubin")):
        with open(os.path.join(cache, key + ".cubin"), "rb") as f:
            return f.read()
    nvcc = _tool("nvcc")
    with tempfile.TemporaryDirectory(prefix="qc_cubin_") as tmp:
        cu, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.cubin")
        with open(cu, "w") as f:
            f.write(source)
        cmd = [nvcc, "-cubin", "-O3", f"-arch=sm_{sm}", "-w", *options, "-o", out, cu]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise TargetError(f"nvcc failed for sm_{sm}:\n{r.stdout[-4000:]}{r.stderr[-4000:]}")
        with open(out, "rb") as f:
            data = f.read()
    if cache:
        with open(os.path.join(cache, key + ".cubin"), "wb") as f:
            f.write(data)
    return data


def compile_cubin(source: str, arch, options: tuple = ()) -> bytes:
    """Compile CUDA source to a cubin for ``arch`` with nvcc (cached per process, and on disk
    under ``$QC_CUBIN_CACHE`` if set).  Needs no GPU."""
    return _compile_cubin_cached(source, _arch_num(arch), tuple(options))


def sass_of_cubin(cubin: bytes) -> str:
    """``cuobjdump --dump-sass`` of a cubin."""
    cuobjdump = _tool("cuobjdump")
    env = dict(os.environ)
    try:
        env["PATH"] = os.path.dirname(_tool("nvdisasm")) + os.pathsep + env.get("PATH", "")
    except TargetError:
        pass
    with tempfile.TemporaryDirectory(prefix="qc_sass_") as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise TargetError(f"cuobjdump failed: {r.stderr[-2000:]}")
    return r.stdout


def sass_of(func_or_lib, arch) -> str:
    """SASS of a kernel (PrimFunc, built for ``arch``) or of every CUDA kernel in a built library
    (``tvm.compile`` result or runtime Module), compiled for ``arch`` with nvcc."""
    return "\n".join(sass_of_cubin(compile_cubin(src, arch)) for src in cuda_sources(func_or_lib, arch))


def ensure_cuda_jit() -> None:
    """Make a process able to load CUDA libraries built by ``tvm.compile`` in this TVM.

    Such libraries keep CUDA source; the CUDA runtime compiles it at load time through the
    ``tvm_callback_cuda_compile`` global, which ``tvm.support.nvcc`` registers (nvrtc from the
    ``cuda-bindings`` package by default).  Without cuda-bindings, use nvcc.
    """
    import importlib.util

    import tvm.support.nvcc  # noqa: F401  (registers tvm_callback_cuda_compile)

    if "TVM_CUDA_COMPILE_MODE" not in os.environ and importlib.util.find_spec("cuda") is None:
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
