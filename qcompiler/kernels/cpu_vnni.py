"""INT8 dense, batched matmul and NHWC convolution kernels for x86 CPUs, AVX-512 VNNI or AVX2 (TensorIR, scheduled).

Every kernel computes the fused function of the kernel contract (``qcompiler/kernels/__init__.py``):

    acc[m, n] = sum_k int32(A[m, k]) * int32(W[k, n]) + bias[n]
    Out[m, n] = clip((int64(acc[m, n]) * mult[n] + (1 << (shift[n] - 1))) >> shift[n], lo, hi)

GEMM core.  ``vpdpbusd`` multiplies *unsigned* bytes by *signed* bytes (4-deep dot products into
16 int32 lanes), see ``_x86_intrin.py``; on a CPU with AVX2 but no VNNI the same u8 x s8 products
run as 2-deep dot products into 8 int32 lanes (``vpmovsxbw`` + ``vpmaddwd``, exact).  :class:`Isa`
holds the difference (lanes ``L``, depth ``kp``, registers); every kernel takes ``isa=``.
Unsigned activations go in as they are.  A signed int8 activation is offset to ``A + 128``
(``A xor 0x80``), which is in [0, 255], and the offset is taken back through the bias, which the
packing folds once at compile time:

    sum_k (A[m,k] + 128) * W[k,n] + bias_eff[n] = sum_k A[m,k] * W[k,n] + bias[n]
    with bias_eff[n] = bias[n] - 128 * sum_k W[k,n].

The offset sum ``sum_k (A+128) * W`` is exact in int32 while ``K * 255 * 128 < 2^31``, i.e.
K <= 65793 (checked, :data:`MAX_K`); the epilogue adds ``bias_eff`` in int32, and the sum is the
true ``acc``, which the contract guarantees is an int32 (bounds in passes/overflow.py).  ``bias_eff``
is stored modulo 2^32 (it always fits for K <= 65793 and |bias| < 2^30).  Padding of the reduction (K up to a
multiple of 4) uses zero weights, so the activation value there does not matter.  Zero padding of a
convolution's input means the real activation value 0, i.e. the byte 128 under the offset (0 for
unsigned inputs): a padded tap then contributes ``128 * W`` exactly as a real 0 would, and
``bias_eff`` removes it with all the others.

Packed weight layout (``pack_dense``, ``pack_conv``): ``Wp[N/L, Kp/kp, L, kp]`` int8 with
``Wp[nb, kb, i, j] = W[kp*kb + j, L*nb + i]`` (zero beyond N and K; Kp = K rounded up to a multiple
of 4 for both ISAs), so one ``vpdpbusd`` reads 64 contiguous bytes (one ``vpmaddwd`` 16).  For a
convolution the reduction index is ``k = (kh*KW + kw)*Cp + c`` with ``Cp`` = C rounded up to a
multiple of 4 (zero weights in the extra channels; equal to ``(kh*KW + kw)*C + c`` whenever
C % 4 == 0), so that every group of 4 reduction steps is 4 adjacent NHWC channels.

Low-bit operand formats (the backends of qcompiler/kernels/backends/, each an :class:`Isa`; the
dense / conv builders below take every one):
  * W4A8 (``Isa.w_bits == 4``): the weights are nibbles (``int4_pack.pack_cpu_w4``: uint8
    ``[N/L, Kp/kp, G, L, 4]``, kp = 8G), Kp (a conv's channels per tap) padded to kp.  The GEMM's
    reduction is written as axes (kb, [g,] t) with k = kb*kp + 8g + t, each term a low-nibble product
    (step k) plus a high-nibble product (step k + 4), the form of the intrinsic's description, so
    the unpacking happens in registers inside the microkernel (``_x86_intrin.py``).  VNNI sums
    16 x the products (``Isa.acc_shift`` = 4; the epilogue shifts back, exact); the activation
    offset and ``bias_eff`` are those of INT8 (|w| <= 8 < 128: the same MAX_K bound).
  * W8A16 (``Isa.a_operand == "int16"``): int16 activations read as they are (no offset, no MAX_K:
    products and pair sums are exact in int32 and the sum wraps modulo 2^32 to the true int32
    accumulator of the contract); zero padding is 0.

Schedules (no search at compile time; ``VnniConfig`` holds the tunable parameters):
  * dense / conv: an ``mr x (L nr)`` int32 register tile, reduction loops outside it, the
    ``L x kp`` intrinsic innermost; the (m-tile, n-tile) pairs are fused and run in parallel
    (on the calling thread when ``VnniConfig.parallel`` is off: small GEMMs, see ``default_config``);
    bias + requantization + clip run vectorized on each finished tile (cache-hot).  Conv is an
    implicit GEMM over an offset/zero-padded copy of the input (rows = output pixels ``n, oh, ow``),
    read in place when no copy is needed (uint8, no padding, C % 4 == 0).  Rows past the end of a
    ragged M are computed from the clamped last row and never stored, so nothing reads out of bounds.
  * batch_matmul (two activations, attention Q.K^T / P.V): the dense schedule with the batch in
    the parallel tile loop; B is packed to the VNNI layout inside the kernel, and for int8 A the
    +128 offset is taken back through column sums of B computed in the kernel (a one-row vpdpbusd
    GEMM) that initialize the accumulators (no bias; one mult / shift for the tensor).
  * depthwise (``depthwise_conv2d_taps``: int8 / uint8 input, static height / width, C a multiple
    of 8): ``vpdpbusd`` with its 4-byte dot products over kernel rows (a per-output-row buffer of the
    input rows interleaved byte-wise, weights ``[G, KW, C, 4]``), 16 (or 8) channels per
    instruction, a register tile of output columns, the requantization with the bias folded into
    its rounding term, parallel over (n, oh); on AVX2 the same with int16 row pairs and
    ``vpmaddwd``.  Otherwise (int16 input, a symbolic height / width, other C;
    ``depthwise_conv2d_nhwc``): direct convolution, int32 accumulators vectorized over channels, a
    register tile of output columns x channels, parallel over (n, oh).
  * grouped: direct convolution vectorized over the output channels of a group (weights transposed
    in the kernel), parallel over (n, oh).
The direct convolutions (and their input copies and weight transposes), B packing and column sums
run in parallel only above :data:`PAR_MIN_VECTOR_ITERS` vector iterations; a GEMM's operand copy
follows its tile loop (``VnniConfig.parallel``).
Every returned PrimFunc carries ``qc.scheduled`` and ``tirx.is_scheduled`` so later default
schedules leave it alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from tvm import te, tirx
from tvm.s_tir import SBlock, Schedule

from qcompiler.targets import host_has_vnni  # noqa: F401  (whether this CPU runs these kernels)

from . import tile_model as _tm
from .branch import join_schedules

ACT_DTYPES = ("int8", "uint8")
# the direct depthwise / grouped kernels widen X to int32 themselves: int16 inputs (W8A16) too
DIRECT_ACT_DTYPES = ("int8", "uint8", "int16")
OUT_DTYPES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "int32": (-(2**31), 2**31 - 1)}
MAX_K = (2**31 - 1) // (255 * 128)  # the offset accumulator sum_k (A+128)*W stays in int32


# ---- instruction set ---------------------------------------------------------------------------
# ``Isa`` (lanes, depth, registers, operand formats, step cost) lives in the TVM-free tile model
# (qcompiler/kernels/tile_model.py); each GEMM backend declares its own in
# qcompiler/kernels/backends/ (one module per ISA and bit width).  VNNI and AVX2 are the INT8 ones.
from .backends.avx2_int8 import ISA as AVX2  # noqa: E402
from .backends.vnni_int8 import ISA as VNNI  # noqa: E402
from .tile_model import Isa  # noqa: E402,F401

ISAS = {i.backend: i for i in (VNNI, AVX2)}


# ---- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class VnniConfig:
    """Tunable parameters of the VNNI GEMM schedule.

    mr       rows of the register tile (1..16)
    nr       column blocks (of the ISA's L = 16 / 8 lanes) of the register tile (1..8); must divide
             ceil(N/L); the tile must fit the ISA's registers (``Isa.fits``, checked by the kernels)
    kc       reduction block in elements (a multiple of 4; 0 = the whole reduction; ignored unless it
             divides the reduction).  For a conv it blocks the channel loop of each tap.
    n_outer  loop order of the parallel tile loop: n-tiles outside m-tiles (keeps a weight panel
             cache-resident while the activations stream; good when the weights are the larger
             operand)
    parallel the tile loop (and the operand copy) runs in parallel; off, the kernel runs on the calling
             thread: a parallel launch costs ~3-6 us even with one worker, more than a small GEMM's
             whole work (``default_config`` turns it off below :data:`SERIAL_CYCLES`).  Added after
             the first records were made: ``True`` is the kernel those records measured, and a key
             at that value omits the field (``qcompiler.tune.workload.config_key``).
    """

    mr: int = 3
    nr: int = 4
    kc: int = 0
    n_outer: bool = True
    parallel: bool = field(default=True, metadata={"legacy": True})

    def __post_init__(self):
        if not 1 <= self.mr <= 16:
            raise ValueError(f"VnniConfig: mr must be in 1..16, got {self.mr}")
        if not 1 <= self.nr <= 8:
            raise ValueError(f"VnniConfig: nr must be in 1..8, got {self.nr}")
        if not VNNI.fits(self.mr, self.nr):
            raise ValueError(f"VnniConfig: {self.mr}x{self.nr} accumulators + operands exceed {VNNI.vregs} registers")
        if self.kc < 0 or self.kc % 4:
            raise ValueError(f"VnniConfig: kc must be 0 or a positive multiple of 4, got {self.kc}")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def n_tiles(M: int, N: int, mr: int, nr: int, isa: Isa = VNNI, batch: int = 1) -> int:
    """Register tiles (iterations of the parallel tile loop) of an ``mr x nr`` tiling."""
    return _tm.n_tiles(M, N, mr, nr, isa, batch)


SERIAL_CYCLES = 12_000  # a GEMM estimated below this many cycles (~4 us) runs on the calling thread


def default_config(M: int, N: int, K: int, batch: int = 1, isa: Isa = VNNI) -> VnniConfig:
    """Pick the register tile with a small cost model (no measurement at compile time).

    VNNI: cycles of one 4-deep reduction step of an ``mr x nr`` tile: ``max(mr*nr, mr + nr) / 2``
    (two vpdpbusd or two operand loads per cycle) + 0.5.  AVX2: one 2-deep step costs ``mr*nr``
    (a vpmaddwd and a vpaddd per accumulator) + ``(mr + nr) / 2`` (broadcasts, widening loads) +
    0.5.  Per tile add the epilogue (~2 cycles per L outputs) and a fixed 40; a tile of 1024 bytes
    or more is not a stack buffer for TVM (LowerTVMBuiltin's kMaxStackAlloca) but one
    TVMBackendAllocWorkspace call per tile, charged 300 cycles (fitted on VNNI: 3x4 and 7x2 tiles
    beat 6x4 by 3-8% at K >= 512 and by 20-30% at K = 64).  Rows padded up to a multiple of mr and
    whole tiles split over 2 cores are counted (``batch`` independent GEMMs share the parallel tile
    loop).

    A GEMM whose best tiling costs under :data:`SERIAL_CYCLES` on one core gets ``parallel=False``
    (unless it is one tile, which TVM runs without a launch anyway):
    measured on a 2-core Zen 2 (AVX2), a parallel launch costs ~3.3 us with ``TVM_NUM_THREADS``
    unset (the runtime's default: one worker there), ~0 with it set to 1 and 0.3-1.7 us with 2;
    serial won 1.2-7.8x below 30K MACs at the default and at 2 threads (e.g. a 1x1 conv 256->64 on
    one pixel: 3.83 -> 0.49 us) and lost ~0.7 us at 2 threads around 4 us of work, where it still
    gained ~3 us at the default.
    """
    mr, nr, cycles = _best_tile(M, N, K, batch, isa)
    one_tile = n_tiles(M, N, mr, nr, isa, batch) == 1  # serial either way: keep the legacy value
    # n-tiles outside measured equal or better on every shape tried (1024^3, LLM and conv shapes)
    return VnniConfig(mr=mr, nr=nr, kc=0, n_outer=True, parallel=one_tile or cycles >= SERIAL_CYCLES)


def _best_tile(M: int, N: int, K: int, batch: int, isa: Isa) -> tuple[int, int, float]:
    """(mr, nr, single-core cycles) of the cheapest register tile under ``default_config``'s model
    (qcompiler/kernels/tile_model.py, shared with the cost model's features)."""
    return _tm.best_default_tile(M, N, K, batch, isa)


def gemm_cycles(M: int, N: int, K: int, batch: int = 1, isa: Isa = VNNI) -> float:
    """Estimated single-core cycles of the GEMM with the tile ``default_config`` picks."""
    return _best_tile(M, N, K, batch, isa)[2]


# ---- weight packing (compile time, NumPy) -----------------------------------------------------
def _pack_kn(wk: np.ndarray, isa: Isa = VNNI) -> np.ndarray:
    """int8 [K, N] -> [ceil(N/L), Kp/kp, L, kp] with zero padding (Kp = K rounded up to 4); for a 4-bit
    backend the nibble layout of ``int4_pack.pack_cpu_w4`` (uint8 [ceil(N/L), Kp/kp, G, L, 4])."""
    if isa.w_bits == 4:
        from .int4_pack import pack_cpu_w4

        # VNNI (acc_shift 4) unpacks two's-complement nibbles as 16 x w; AVX2 biased ones as w
        return pack_cpu_w4(wk, isa.lanes, isa.kpack // 8, biased=isa.acc_shift == 0)
    K, N = wk.shape
    L, kp = isa.lanes, isa.kpack
    Kp, Np = _ceil(K, 4) * 4, _ceil(N, L) * L
    w = np.zeros((Kp, Np), np.int8)
    w[:K, :N] = wk
    return np.ascontiguousarray(w.reshape(Kp // kp, kp, Np // L, L).transpose(2, 0, 3, 1))


def _bias_eff(wk: np.ndarray, bias, a_signed: bool) -> np.ndarray:
    N = wk.shape[1]
    b = np.zeros(N, np.int64) if bias is None else np.asarray(bias).astype(np.int64).reshape(N)
    if a_signed:
        b = b - 128 * wk.astype(np.int64).sum(axis=0)
    # modulo 2^32 (two's complement); a no-op for K <= MAX_K and |bias| < 2^30
    return ((b + 2**31) % 2**32 - 2**31).astype(np.int32)


def _check_weight(w: np.ndarray, ndim: int, what: str) -> None:
    if w.dtype != np.int8 or w.ndim != ndim:
        raise ValueError(f"{what}: weights must be int8 with {ndim} dims, got {w.dtype} {w.shape}")


def pack_dense(w: np.ndarray, bias: np.ndarray | None, a_signed: bool,
               isa: Isa = VNNI) -> tuple[np.ndarray, np.ndarray]:
    """w int8 [K, N] (ONNX MatMul B) -> (Wp int8 [ceil(N/L), Kp/kp, L, kp], bias_eff int32 [N]).

    ``a_signed``: int8 activations (the +128 offset folded into bias_eff, for the ISAs that read the
    activations as uint8).  4-bit ISAs: Wp is the nibble layout of ``_pack_kn``."""
    _check_weight(w, 2, "pack_dense")
    return _pack_kn(w, isa), _bias_eff(w, bias, a_signed and isa.a_operand == "uint8")


def _conv_kn(w: np.ndarray, kround: int = 4) -> np.ndarray:
    """int8 [OC, C, KH, KW] -> [KH*KW*Cp, OC], k = (kh*KW + kw)*Cp + c, zero rows for c >= C
    (Cp = C rounded up to ``kround``: 4, or a 4-bit ISA's depth)."""
    OC, C, KH, KW = w.shape
    Cp = _ceil(C, kround) * kround
    t = np.zeros((KH, KW, Cp, OC), np.int8)
    t[:, :, :C, :] = w.transpose(2, 3, 1, 0)
    return t.reshape(KH * KW * Cp, OC)


def pack_conv(w: np.ndarray, bias: np.ndarray | None, a_signed: bool,
              isa: Isa = VNNI) -> tuple[np.ndarray, np.ndarray]:
    """w int8 [OC, C, KH, KW] (ONNX) -> (Wp [ceil(OC/L), KH*KW*Cp/kp, L, kp], bias_eff int32 [OC])."""
    _check_weight(w, 4, "pack_conv")
    wk = _conv_kn(w, isa.kround)
    return _pack_kn(wk, isa), _bias_eff(wk, bias, a_signed and isa.a_operand == "uint8")


# ---- shared pieces ----------------------------------------------------------------------------
def _check_io(a_dtype: str, out_dtype: str, lo: int, hi: int, isa: Isa | None = None,
              dts: tuple | None = None) -> None:
    dts = dts or (ACT_DTYPES if isa is None else isa.a_dtypes)
    if a_dtype not in dts:
        raise ValueError(f"activation dtype must be one of {dts}, got {a_dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out dtype must be one of {tuple(OUT_DTYPES)}, got {out_dtype}")
    omin, omax = OUT_DTYPES[out_dtype]
    if not omin <= lo <= hi <= omax:
        raise ValueError(f"clip range [{lo}, {hi}] is empty or outside {out_dtype}")


def _check_k(K: int, what: str) -> None:
    if K > MAX_K:
        raise ValueError(f"{what}: reduction length {K} > {MAX_K} would overflow the int32 VNNI accumulator")


def _requant(acc64, mult, shift, lo: int, hi: int, out_dtype: str, post=None, at=None):
    """clip((acc64 * mult + (1 << (shift - 1))) >> shift, lo, hi) as out_dtype (all int64 inside);
    with a fused ``post`` (see :class:`Post`), ``post`` of that clipped value as ``post.out_dtype``,
    ``at`` = (post's extra-input tensors, its constants tensor, the output index)."""
    one = tirx.const(1, "int64")
    t = (acc64 * mult + (one << (shift - one))) >> shift
    t = tirx.max(tirx.min(t, tirx.const(hi, "int64")), tirx.const(lo, "int64"))
    if post is None:
        return t.astype(out_dtype)
    extras, consts, i = at
    return post(t, [e[tuple(i)].astype("int64") for e in extras], lambda k: consts[k]).astype(post.out_dtype)


class Post:
    """Interface of a fused elementwise epilogue (``qcompiler.intops.gemm.Epilogue`` implements it):
    ``post(y, extras, k) -> int64 expr`` of the clipped int64 GEMM result ``y``, the extra inputs'
    elements at the same output index (int64) and ``k(i)``, the i-th int64 constant; its result is
    already clipped to ``out_dtype``'s range.  The kernel takes ``len(extra_dtypes)`` more tensors of the
    output's shape and an int64 [n_consts] constants tensor, in that order, before the output."""

    extra_dtypes: tuple = ()
    n_consts: int = 1
    out_dtype: str = "int8"


def _post_args(post, out_shape) -> tuple[list, object]:
    """Placeholders (extra inputs, constants) of a fused epilogue, or ([], None)."""
    if post is None:
        return [], None
    if post.out_dtype not in OUT_DTYPES:
        raise ValueError(f"fused epilogue: out dtype must be one of {tuple(OUT_DTYPES)}, got {post.out_dtype}")
    extras = [te.placeholder(tuple(out_shape), dt, name=f"R{j}") for j, dt in enumerate(post.extra_dtypes)]
    return extras, te.placeholder((post.n_consts,), "int64", name="epi")


def _post_list(extras, consts) -> list:
    return [*extras, consts] if consts is not None else []


def _as_u8(x, signed: bool):
    """The unsigned operand of vpdpbusd: x + 128 for int8 (the offset trick), x for uint8."""
    return (x.astype("int32") + 128).astype("uint8") if signed else x.astype("uint8")


def _as_operand(x, a_dtype: str, isa: Isa):
    """The activation as the ISA's intrinsic reads it: uint8 (int8 offset by +128) or int16 as is."""
    if isa.a_operand == "uint8":
        return _as_u8(x, a_dtype == "int8")
    return x.astype(isa.a_operand)


def _out_shape(H, W, KH, KW, strides, pads, dilations):
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilations, pads
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    if isinstance(OH, int) and isinstance(OW, int) and (OH < 1 or OW < 1):
        raise ValueError(f"conv: empty output {OH}x{OW}")
    return OH, OW


def _finish(sch: Schedule) -> tirx.PrimFunc:
    """The scheduled PrimFunc, marked scheduled, without the "main" symbol the Schedule gave it
    (a module with two functions exporting "main" fails to build; bb.add_func names it)."""
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("qc.scheduled", True).with_attr("tirx.is_scheduled", True)


def _vectorize_inner(sch: Schedule, loop, width: int) -> None:
    """Vectorize ``loop`` in chunks of ``width`` when that divides it (else the whole loop if short)."""
    ext = sch.get(loop).extent
    if not isinstance(ext, tirx.IntImm):  # a symbolic extent: left scalar
        return
    ext = int(ext)
    if ext <= width:
        sch.vectorize(loop)
    elif ext % width == 0:
        sch.vectorize(sch.split(loop, [None, width])[1])


PAR_MIN_VECTOR_ITERS = 1 << 14  # as cpu_default's min_parallel_work: below it a block runs serially


def _parallel_if_worth(sch: Schedule, loop, block: str, lanes: int, symbolic: bool = False) -> None:
    """``sch.parallel(loop)`` when the block ``block`` does at least :data:`PAR_MIN_VECTOR_ITERS`
    vector iterations (all its loops' extents over ``lanes``): a parallel launch costs a few us,
    which a smaller block does not earn back (see ``default_config``).  With a symbolic extent
    (qcompiler/symbolic.py) the work is unknown: ``symbolic`` says what to do (a kernel's main block:
    parallel; the light prep / bpack / colsum blocks: not, a launch costs more at small sizes)."""
    work = 1
    for lp in sch.get_loops(sch.get_sblock(block)):
        ext = sch.get(lp).extent
        if not isinstance(ext, tirx.IntImm):
            if symbolic:
                sch.parallel(loop)
            return
        work *= int(ext)
    if work >= PAR_MIN_VECTOR_ITERS * lanes:
        sch.parallel(loop)


# ---- VNNI GEMM schedule (dense and implicit-GEMM conv) -------------------------------------------
def _check_tile(cfg: VnniConfig, isa: Isa, nb: int, what: str) -> None:
    if nb % cfg.nr:
        raise ValueError(f"{what}: nr={cfg.nr} does not divide ceil(N/{isa.lanes})={nb}")
    if not isa.fits(cfg.mr, cfg.nr):
        raise ValueError(f"{what}: a {cfg.mr}x{cfg.nr} tile does not fit the {isa.vregs} {isa.name} registers")


def _schedule_gemm(sch: Schedule, cfg: VnniConfig, n_red: int, prep_vec_dims: int | None,
                   n_batch: int = 0, isa: Isa = VNNI, prep_w_tile: int | None = None) -> None:
    """Schedule blocks "prep" (unless ``prep_vec_dims`` is None), "gemm" (*batch, m, n, *reduction),
    "out" (*batch, m, n); ``n_batch`` leading batch loops join the parallel tile loop.
    ``prep_w_tile``: a "prep" (n, h, w, c) whose symbolic width is a multiple of it, in groups of that
    many columns x the channels (unrolled).

    Order matters in TVM 0.27: parallel/vectorize/unroll before decompose_reduction, tensorize last.
    """
    intrin = isa.intrin()
    L, kp = isa.lanes, isa.kpack
    gemm = sch.get_sblock("gemm")
    loops = sch.get_loops(gemm)
    bl = list(loops[:n_batch])
    loops = loops[n_batch:]
    m, n, red = loops[0], loops[1], list(loops[2:])
    assert len(red) == n_red
    m0, m1 = sch.split(m, [None, cfg.mr])
    n0, n1, n2 = sch.split(n, [None, cfg.nr, L])
    if isa.w_bits == 4:  # reduction (..., kb, [g,] t): the intrinsic takes ([g,] t); kb counts kp-deep blocks
        n_in = 1 if kp == 8 else 2
        inner = red[-n_in:]
        red = red[:-n_in]
        last = red.pop()
        ext = int(sch.get(last).extent) * kp
        if cfg.kc and cfg.kc % kp == 0 and cfg.kc < ext and ext % cfg.kc == 0:
            k0, k1 = sch.split(last, [None, cfg.kc // kp])
            red_loops = [k0, *red, k1]
        else:
            red_loops = [*red, last]
    else:
        last = red.pop()
        ext = sch.get(last).extent
        ext = int(ext) if isinstance(ext, tirx.IntImm) else 0  # a symbolic depth: no K blocking
        if cfg.kc and cfg.kc < ext and ext % cfg.kc == 0:
            k0, k1, k2 = sch.split(last, [None, cfg.kc // kp, kp])
            red_loops = [k0, *red, k1]
        else:
            k1, k2 = sch.split(last, [None, kp])
            red_loops = [*red, k1]
        inner = [k2]
    outer = [*bl, *([n0, m0] if cfg.n_outer else [m0, n0])]
    sch.reorder(*outer, *red_loops, m1, n1, n2, *inner)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, outer[-1])
    # one tile loop for the thread pool; a serial kernel over symbolic extents keeps its tile loops
    # apart: fused, every index of the unrolled register tile is a div / mod by a symbolic extent,
    # which costs LLVM seconds (a symbolic attention matmul: 0.56 s) and the loop integer divisions
    if cfg.parallel or all(isinstance(sch.get(lp).extent, tirx.IntImm) for lp in outer):
        tile = sch.fuse(*outer)
        n_tile = 1
        if cfg.parallel:
            sch.parallel(tile)
    else:
        n_tile = len(outer)
    sch.unroll(m1)
    sch.unroll(n1)
    # epilogue: column blocks outside rows, so mult/shift/rounding vectors stay in registers
    inner = sch.get_loops(out)[n_tile:]  # under the tile loop(s): (row, col), (col,) when mr == 1, () for 1 x 1
    if len(inner) == 2 and int(sch.get(inner[-1]).extent) % L == 0:
        oc0, oc1 = sch.split(inner[-1], [None, L])
        # a symbolic row count (``_dense``) leaves the rows' predicate (row < M) in a form reorder
        # rejects (no affine binding): the rows stay outside
        if all(isinstance(iv.dom.extent, tirx.IntImm) for iv in sch.get(out).iter_vars):
            sch.reorder(oc0, inner[0], oc1)
        sch.vectorize(oc1)
    elif inner:
        _vectorize_inner(sch, inner[-1], L)
    if prep_vec_dims is not None:
        pl = sch.get_loops(sch.get_sblock("prep"))
        inner = pl[len(pl) - prep_vec_dims:]
        static = [isinstance(sch.get(lp).extent, tirx.IntImm) for lp in inner]
        if prep_w_tile and prep_vec_dims == 2 and not static[0] and static[1]:
            par = sch.fuse(*pl[:-2])
            if cfg.parallel:
                sch.parallel(par)
            # unrolled, not vectorized by TVM: its lanes would be gathers (channels padded, e.g. 3 -> 4,
            # and the clamped positions), which LLVM's SLP vectorizer does better from scalar code
            # (a stem conv 3 -> 16 channels at 320 x 320: 270 us vectorized, 150-190 unrolled, static 107-155)
            w1 = sch.split(inner[0], [None, prep_w_tile])[1]
            sch.unroll(sch.fuse(w1, inner[1]))
        elif not all(static) and static[-1] and int(sch.get(inner[-1]).extent) % min(isa.vbytes, 16) == 0:
            # a symbolic width over static channels (a conv over a symbolic width): channels vectorized
            # by TVM, (n, h) in parallel, the width a loop between
            par = sch.fuse(*pl[: len(pl) - prep_vec_dims])
            if cfg.parallel:
                sch.parallel(par)
            ext = int(sch.get(inner[-1]).extent)
            _vectorize_inner(sch, inner[-1], next(v for v in (isa.vbytes, 32, 16) if ext % v == 0 or ext < v))
        else:
            par = sch.fuse(*pl[: len(pl) - prep_vec_dims])
            # a symbolic inner extent (a depth over a symbolic dim, qcompiler/symbolic.py) is left to
            # LLVM's loop vectorizer, which needs the buffers' noalias facts that TVM's parallel closure
            # drops (the attention P.V prep at sequence 512: 3.3 ms in parallel on one thread, 0.7 ms serial)
            if cfg.parallel and all(static):
                sch.parallel(par)
            vec = sch.fuse(*inner) if prep_vec_dims > 1 else pl[-1]
            _vectorize_inner(sch, vec, isa.vbytes)
    init = sch.decompose_reduction(gemm, red_loops[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(n2, intrin)


def _epilogue(shape, C, bias, mult, shift, lo, hi, out_dtype, idx, acc_shift: int = 0, post=None,
              post_at=None):
    """out[...] = requant(C[row, n] + bias[n]); ``idx(*i) -> (*row, n)`` maps output to GEMM indices.

    The bias is added in int32 (exact: see the module docstring).  ``acc_shift``: the GEMM summed
    ``2^acc_shift`` x the products (VNNI W4A8), shifted back first (exact: a multiple of it).
    ``post``, ``post_at`` = (extras, consts): a fused elementwise epilogue (:class:`Post`).
    """

    def f(*i):
        *r, n = idx(*i)
        c = C[(*r, n)] >> acc_shift if acc_shift else C[(*r, n)]
        at = (*post_at, i) if post is not None else None
        return _requant((c + bias[n]).astype("int64"), mult[n], shift[n], lo, hi, out_dtype, post, at)

    return te.compute(shape, f, name="out")


def w4_axes(isa: Isa, Kp: int, prefix: str = "k") -> list:
    """The reduction axes of a 4-bit GEMM over ``Kp``: (kb, g, t), k = kb*kp + 8g + t; no g axis when
    kp = 8 (G = 1: TVM would drop a unit axis, and the intrinsic's description has none)."""
    kp = isa.kpack
    axes = [te.reduce_axis((0, Kp // kp), name=f"{prefix}b")]
    if kp > 8:
        axes.append(te.reduce_axis((0, kp // 8), name="g"))
    return axes + [te.reduce_axis((0, 4), name="t")]


def _w4_unpack(isa: Isa):
    from . import _x86_intrin as X

    return (X.w4_lo16, X.w4_hi16) if isa.acc_shift == 4 else (X.w4_lo_b, X.w4_hi_b)


def _wp_shape(N: int, Kp: int, isa: Isa) -> tuple[tuple, str]:
    L, kp = isa.lanes, isa.kpack
    if isa.w_bits == 4:
        return (_ceil(N, L), Kp // kp, kp // 8, L, 4), "uint8"
    return (_ceil(N, L), Kp // kp, L, kp), "int8"


def _gemm_sum(isa: Isa, a_at, Wp, j, red: list, kofs):
    """te.sum of the GEMM row x column ``j``: ``a_at(k)`` the activation operand at reduction index
    ``k``; ``red`` leading reduction axes, ``kofs(k_inner_block)``: the index of the packed K block.

    8-bit weights: one more axis k over the block's ``Kp`` (the schedule splits it by kp).  4-bit: axes
    (kb, g, t) with k = kb*kp + 8g + t (+4 for the high nibble), each term a lo-nibble product plus a
    hi-nibble product: the form of the intrinsic's description (``_x86_intrin._w4_desc``).
    """
    L, kp = isa.lanes, isa.kpack
    if isa.w_bits == 4:
        lo, hi = _w4_unpack(isa)
        if kp == 8:
            (kb, t), g = red[-2:], 0
        else:
            kb, g, t = red[-3:]
        x = Wp[j // L, kofs(kb), g, j % L, t]
        k = kb * kp + g * 8 + t
        return te.sum(a_at(k).astype("int32") * lo(x) + a_at(k + 4).astype("int32") * hi(x), axis=red)
    k = red[-1]
    return te.sum(a_at(k).astype("int32") * Wp[j // L, kofs(k // kp), j % L, k % kp].astype("int32"), axis=red)


def dense(M: int, N: int, K: int, a_dtype: str, out_dtype: str, lo: int, hi: int,
          config: VnniConfig | None = None, isa: Isa = VNNI, post: Post | None = None,
          bucket_config=None) -> tirx.PrimFunc:
    """Out[M, N] = requant(A[M, K] @ W + bias); args (A, Wp, bias_eff, mult, shift, Out); with a fused
    ``post`` (A, Wp, bias_eff, mult, shift, *extras [M, N], consts, Out).

    A symbolic ``M`` (qcompiler/symbolic.py: a TIR expression) gives a kernel over any row count,
    bound from A's shape at the call: ``config`` (default: at the representative size,
    ``tune/workload.rows_bucket``) for large M, the tiles of :data:`ROW_BUCKETS` for small ones, a
    serial variant for the row counts whose GEMM costs under :data:`SERIAL_CYCLES`.  A bucket's tile
    is ``bucket_config(rows)`` (the tuning log's record of the workload at the bucket's rows, which
    ``qc tune`` measures for every dense layer) where that gives one, else ``default_config`` there."""
    _check_io(a_dtype, out_dtype, lo, hi, isa)
    if isa.a_operand == "uint8":
        _check_k(K, "dense")
    if not isinstance(M, (int, np.integer)):
        from qcompiler.tune.workload import rows_bucket

        cfg = config or default_config(rows_bucket(M), N, K, isa=isa)

        def config_at(r):
            got = bucket_config(r) if bucket_config is not None else None
            return got if got is not None else default_config(r, N, K, isa=isa)

        buckets = _row_buckets(cfg, rows_bucket(M), config_at)
        key = (N, K, a_dtype, out_dtype, int(lo), int(hi), cfg, tuple(buckets), isa.name, isa.w_bits, isa.a_operand)
        if post is None and key in _SYM_CACHE:  # the same kernel for every layer of this shape
            return _SYM_CACHE[key]
        Mv = tirx.Var("M", "int32")  # the kernel's own variable (int32 like the static loops)
        serial = _serial_rows(lambda m: gemm_cycles(m, N, K, isa=isa))

        def variant(c, lower, upper):  # the kernel for row counts in (lower, upper] (upper None: any)
            if c.parallel and serial >= (upper or 1 << 62):  # all of them serial
                c = dataclasses.replace(c, parallel=False)
            # a serial branch only where some of these row counts are under the threshold: each
            # variant adds its loop nest to the kernel (LLVM time, library size)
            return _dense(Mv, N, K, a_dtype, out_dtype, lo, hi, c, isa, post,
                          serial if c.parallel and serial > lower else 0)

        f = variant(cfg, buckets[0][0] if buckets else 0, None)
        for k, (upper, c) in enumerate(buckets):
            f = join_schedules(Mv <= upper, variant(c, buckets[k + 1][0] if k + 1 < len(buckets) else 0, upper), f)
        if serial:
            f = f.with_attr("qc.rows_serial_max", int(serial))
        if post is None:
            if len(_SYM_CACHE) >= 256:
                _SYM_CACHE.clear()
            _SYM_CACHE[key] = f
        return f
    return _dense(int(M), N, K, a_dtype, out_dtype, lo, hi, config or default_config(M, N, K, isa=isa), isa, post)


def _dense(M, N: int, K: int, a_dtype: str, out_dtype: str, lo: int, hi: int, cfg: VnniConfig, isa: Isa,
           post: Post | None, serial_rows: int = 0) -> tirx.PrimFunc:
    """``dense`` with ``M`` an int or an int32 variable (the GEMM then runs over ceil(M / mr) whole row
    tiles, the last one reading the clamped last row; only the M valid rows are stored); with
    ``serial_rows`` > 0 serial up to that many rows (``_par_branch``)."""
    L, kp = isa.lanes, isa.kpack
    nb = _ceil(N, L)
    _check_tile(cfg, isa, nb, "dense")
    offset = isa.a_operand == "uint8" and a_dtype == "int8"
    kr = max(4, kp)
    sym = not isinstance(M, int)
    Kp, Np = _ceil(K, kr) * kr, nb * L
    Mp = tirx.floordiv(M + (cfg.mr - 1), cfg.mr) * cfg.mr if sym else _ceil(M, cfg.mr) * cfg.mr
    A = te.placeholder((M, K), a_dtype, name="A")
    wshape, wdt = _wp_shape(N, Kp, isa)
    Wp = te.placeholder(wshape, wdt, name="Wp")
    bias = te.placeholder((N,), "int32", name="bias")
    mult = te.placeholder((N,), "int64", name="mult")
    shift = te.placeholder((N,), "int64", name="shift")
    has_prep = offset or Kp != K or a_dtype != isa.a_operand
    if has_prep:
        Ap = te.compute((M, Kp), lambda i, k: tirx.if_then_else(
            k < K, _as_operand(A[i, tirx.min(k, K - 1)], a_dtype, isa), tirx.const(0, isa.a_operand)), name="prep")
    else:
        Ap = A
    row = (lambda i: tirx.min(i, M - 1)) if sym or Mp != M else (lambda i: i)
    if isa.w_bits == 4:
        red = w4_axes(isa, Kp)
    else:
        red = [te.reduce_axis((0, Kp), name="k")]
    C = te.compute((Mp, Np), lambda i, j: _gemm_sum(isa, lambda k: Ap[row(i), k], Wp, j, red, lambda b: b),
                   name="gemm")
    extras, consts = _post_args(post, (M, N))
    out = _epilogue((M, N), C, bias, mult, shift, lo, hi, out_dtype, lambda i, j: (i, j),
                    isa.acc_shift, post, (extras, consts))
    func = te.create_prim_func([A, Wp, bias, mult, shift, *_post_list(extras, consts), out])

    def schedule(c):
        sch = Schedule(func)
        _schedule_gemm(sch, c, n_red=len(red), prep_vec_dims=1 if has_prep else None, isa=isa)
        return _finish(sch)

    if serial_rows > 0:
        return _par_branch(schedule, cfg, M <= serial_rows).with_attr("qc.rows_serial_max", int(serial_rows))
    return schedule(cfg)


_SYM_CACHE: dict = {}  # dense over a symbolic M without epilogue, by its parameters (PrimFuncs are immutable)

# row-count buckets of a GEMM over a symbolic row count below its representative size: (largest row
# count of the bucket, the row count its tile is chosen at).  A tile chosen at the representative
# size (e.g. 5 rows at 256) pads a few rows up to whole tiles (8 rows: 10 computed); the buckets'
# tiles (``default_config`` there) fit them, as a static kernel of that size would
ROW_BUCKETS = ((2, 2), (12, 8), (48, 32))


def _row_buckets(cfg: VnniConfig, rep: int, config_at) -> list[tuple[int, VnniConfig]]:
    """[(upper, config)] of the :data:`ROW_BUCKETS` below ``rep`` whose tile (``config_at(rows)``)
    differs from the next larger bucket's (the last: ``cfg``), largest first: the kernel runs
    ``config`` for row counts up to ``upper`` (``kernels/branch.py``; each variant adds its loop nest
    to the kernel, so equal tiles share one)."""
    out, nxt = [], cfg
    tile = lambda c: (c.mr, c.nr, c.kc, c.n_outer)  # noqa: E731
    for upper, r in reversed(ROW_BUCKETS):
        if upper >= rep:
            continue
        c = config_at(r)
        if tile(c) != tile(nxt):
            out.append((upper, c))
            nxt = c
    return out


def _serial_rows(cycles, limit: int = 1 << 20) -> int:
    """The largest row count m whose GEMM costs under :data:`SERIAL_CYCLES` (``cycles(m)``, single
    core, non-decreasing in m up to the tile rounding); 0 when even one row does not."""
    if cycles(1) >= SERIAL_CYCLES:
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cycles(mid) < SERIAL_CYCLES else (lo, mid - 1)
    return lo


def _par_branch(schedule, cfg: VnniConfig, serial) -> tirx.PrimFunc:
    """One GEMM kernel over symbolic dims, serial where ``serial`` (an expression of its size variables)
    holds, else with ``cfg``.

    A parallel ``cfg`` costs a thread-pool launch per call (~3-10 us on the 2-core hosts,
    docs/design.md §5), more than the whole GEMM at a few rows, which a static kernel of that size
    avoids (``default_config``: serial under SERIAL_CYCLES).  ``schedule(config)`` schedules the one
    unscheduled function with a config; the kernel runs ``schedule(cfg serial)``'s loop nest when
    ``serial`` holds, else ``schedule(cfg)``'s: the same tiles, buffers and arithmetic, so the result
    does not depend on the branch (``kernels/branch.py``)."""
    return join_schedules(serial, schedule(dataclasses.replace(cfg, parallel=False)), schedule(cfg))


def conv2d_nhwc(N: int, H: int, W: int, C: int, OC: int, KH: int, KW: int, strides, pads, dilations,
                a_dtype: str, out_dtype: str, lo: int, hi: int, config: VnniConfig | None = None,
                isa: Isa = VNNI, post: Post | None = None) -> tirx.PrimFunc:
    """Out[N,OH,OW,OC] = requant(conv(X[N,H,W,C], W) + bias) as an implicit GEMM on ``isa``.

    args (X, Wp, bias_eff, mult, shift, Out); Wp/bias_eff from ``pack_conv``; pads = (t, l, b, r);
    with a fused ``post`` (X, Wp, bias_eff, mult, shift, *extras [N,OH,OW,OC], consts, Out).
    Symbolic N / H / W (the kernel's attribute ``qc.ow_tiles`` = mr): OWt = ceil(OW / mr), the number of
    row tiles per output row, as an int32 before Out; serial below :data:`SERIAL_CYCLES` (``_par_branch``).
    """
    _check_io(a_dtype, out_dtype, lo, hi, isa)
    Kp = KH * KW * _ceil(C, isa.kround) * isa.kround
    if isa.a_operand == "uint8":
        _check_k(Kp, "conv2d_nhwc")
    if all(isinstance(d, (int, np.integer)) for d in (N, H, W)):
        return _conv2d(int(N), int(H), int(W), C, OC, KH, KW, strides, pads, dilations, a_dtype, out_dtype, lo, hi,
                       config, isa, post)
    # symbolic N / H / W (qcompiler/symbolic.py): the kernel's own variables, bound from X's shape at the
    # call; the row tiles per output row OWt an int32 argument after the tensors (``_conv2d``)
    from qcompiler.tune.workload import rows_bucket

    if config is None:
        rep = [rows_bucket(d) for d in (N, H, W)]
        _, _, _, _, _, _, rOH, rOW, _, _ = _conv_geometry(rep[1], rep[2], KH, KW, strides, pads, dilations)
        config = default_config(rep[0] * rOH * rOW, OC, Kp, isa=isa)
    # int32 like a static kernel's loops (int64 ones defeat the intrinsic's blockize)
    N, H, W = (d if isinstance(d, (int, np.integer)) else tirx.Var(nm, "int32")
               for d, nm in ((N, "N"), (H, "H"), (W, "W")))
    return _conv2d(N, H, W, C, OC, KH, KW, strides, pads, dilations, a_dtype, out_dtype, lo, hi, config, isa, post)


def _conv2d(N, H, W, C: int, OC: int, KH: int, KW: int, strides, pads, dilations, a_dtype: str, out_dtype: str,
            lo: int, hi: int, config: VnniConfig | None, isa: Isa, post: Post | None) -> tirx.PrimFunc:
    """``conv2d_nhwc`` with N / H / W ints or int64 variables (then OWt an argument: ``conv2d_nhwc``)."""
    sym = not all(isinstance(d, int) for d in (N, H, W))
    sh, sw, dh, dw, pt, pl, OH, OW, Hx, Wx = _conv_geometry(H, W, KH, KW, strides, pads, dilations)
    Cp = _ceil(C, isa.kround) * isa.kround
    Kp = KH * KW * Cp
    M = N * OH * OW
    cfg = config or default_config(M, OC, Kp, isa=isa)
    L, kp = isa.lanes, isa.kpack
    nb = _ceil(OC, L)
    _check_tile(cfg, isa, nb, "conv2d_nhwc")
    offset = isa.a_operand == "uint8" and a_dtype == "int8"
    # over symbolic dims the GEMM rows are (n, oh, ow) with ow in whole tiles of mr, their count OWt an
    # int32 argument: a row tile never crosses an output row, so a row's input address needs no division
    # by the symbolic width (the flat row index's would cost 3 divisions per row and reduction step)
    OWt = tirx.Var("OWt", "int32") if sym else None
    Mp = None if sym else _ceil(M, cfg.mr) * cfg.mr
    X = te.placeholder((N, H, W, C), a_dtype, name="X")
    wshape, wdt = _wp_shape(OC, Kp, isa)
    Wp = te.placeholder(wshape, wdt, name="Wp")
    bias = te.placeholder((OC,), "int32", name="bias")
    mult = te.placeholder((OC,), "int64", name="mult")
    shift = te.placeholder((OC,), "int64", name="shift")
    # the GEMM reads X itself where it needs no padding nor offset (over symbolic dims: no padding on
    # any side, the last row tile's padded rows clamped to the last column, see ``gemm_at``)
    in_place = (not offset and a_dtype == isa.a_operand and Cp == C and
                (not any(pads) if sym else pt == 0 and pl == 0 and Hx <= H and Wx <= W))
    wt = None  # the padded input's column groups (below)
    if in_place:
        Xp = X
    else:
        pad_val = tirx.const(128 if offset else 0, isa.a_operand)

        def prep(n, h, w, c):
            hh, ww = h - pt, w - pl
            inside = tirx.all(hh >= 0, hh < H, ww >= 0, ww < W, c < C)
            v = X[n, tirx.max(tirx.min(hh, H - 1), 0), tirx.max(tirx.min(ww, W - 1), 0), tirx.min(c, C - 1)]
            return tirx.if_then_else(inside, _as_operand(v, a_dtype, isa), pad_val)

        Wxp = Wx
        if sym:
            # over a symbolic width the padded input covers the columns every row tile reads, its last
            # (padded) rows too, so that no row's address is clamped (a min and a vector extract per
            # row and reduction step in the GEMM's inner loop); with few channels
            # (Cp = 4) the width is also rounded up to whole groups of wt columns, wt * Cp <= 16 bytes,
            # so that a group's columns x channels are one static run (``_schedule_gemm``'s
            # ``prep_w_tile``; a fused width x channel loop of symbolic extent stays scalar)
            # Wxp = OWt mr sw + e: the reads (up to (OWt mr - 1) sw + (KW - 1) dw) provably covered
            # whatever the sign the analyzer allows OWt (e >= (KW - 1) dw + 1 - sw, a constant), and a
            # multiple of wt, which divides mr sw (a rounded-up floordiv would be neither)
            wt = math.gcd(16 // Cp, cfg.mr * sw) if Cp < 16 and 16 % Cp == 0 else 1
            Wxp = OWt * (cfg.mr * sw) + _ceil(max(0, (KW - 1) * dw + 1 - sw), wt) * wt
            wt = wt if wt > 1 else None
        Xp = te.compute((N, Hx, Wxp, Cp), prep, name="prep")
    kh = te.reduce_axis((0, KH), name="kh")
    kw = te.reduce_axis((0, KW), name="kw")
    if isa.w_bits == 4:
        red = [kh, kw, *w4_axes(isa, Cp, "c")]
    else:
        red = [kh, kw, te.reduce_axis((0, Cp), name="c")]

    def gemm_at(n, oh, ow, j):
        return _gemm_sum(isa, lambda c: Xp[n, oh * sh + kh * dh, ow * sw + kw * dw, c], Wp, j, red,
                         lambda b: (kh * KW + kw) * (Cp // kp) + b)

    if sym:  # Out[N, OH, OW, OC]: only the valid columns of the last tile of a row stored
        Cacc = te.compute((N, OH, OWt * cfg.mr, nb * L), lambda n, oh, i, j: gemm_at(
            n, oh, tirx.min(i, OW - 1) if in_place else i, j), name="gemm")
        extras, consts = _post_args(post, (N, OH, OW, OC))
        out = _epilogue((N, OH, OW, OC), Cacc, bias, mult, shift, lo, hi, out_dtype,
                        lambda n, oh, ow, j: (n, oh, ow, j), isa.acc_shift, post, (extras, consts))
        func = te.create_prim_func([X, Wp, bias, mult, shift, *_post_list(extras, consts), OWt, out])

        def schedule(c):
            sch = Schedule(func)
            _schedule_gemm(sch, c, n_red=len(red), prep_vec_dims=None if in_place else 2, n_batch=2, isa=isa,
                           prep_w_tile=wt)
            return _finish(sch)

        serial = _serial_rows(lambda m: gemm_cycles(m, OC, Kp, isa=isa)) if cfg.parallel else 0
        rows = tirx.const(cfg.mr, "int64")
        for d in (N, OH, OWt):
            rows = rows * (tirx.const(d, "int64") if isinstance(d, int) else d.astype("int64"))
        f = _par_branch(schedule, cfg, rows <= serial) if serial > 0 else schedule(cfg)
        return f.with_attr("qc.ow_tiles", cfg.mr)

    def gemm(i, j):
        r = tirx.min(i, M - 1) if Mp != M else i
        return gemm_at(r // (OH * OW), (r // OW) % OH, r % OW, j)

    Cacc = te.compute((Mp, nb * L), gemm, name="gemm")
    extras, consts = _post_args(post, (N, OH, OW, OC))
    out = _epilogue((N, OH, OW, OC), Cacc, bias, mult, shift, lo, hi, out_dtype,
                    lambda n, oh, ow, j: ((n * OH + oh) * OW + ow, j), isa.acc_shift, post, (extras, consts))
    sch = Schedule(te.create_prim_func([X, Wp, bias, mult, shift, *_post_list(extras, consts), out]))
    _prepare_conv_epilogue(sch, OH, OW)
    _schedule_gemm(sch, cfg, n_red=len(red), prep_vec_dims=None if in_place else 2, isa=isa)
    return _finish(sch)


def batch_matmul(batch: int, M: int, N: int, K: int, a_dtype: str, b_dtype: str = "int8",
                 out_dtype: str = "int8", lo: int = -128, hi: int = 127, config: VnniConfig | None = None,
                 b_trans: bool = False, isa: Isa = VNNI) -> tirx.PrimFunc:
    """Out[b] = requant(A[b] @ B[b]) for two activations (attention Q.K^T, P.V); scalar mult / shift.

    args (A a_dtype [batch, M, K], B int8 [batch, K, N] (``b_trans``: [batch, N, K]), mult int64 [1],
    shift int64 [1], Out out_dtype [batch, M, N]); no bias.  Both operands change every call, so
    the kernel does what ``pack_dense`` does at compile time, as cheap TE stages:

      "bpack"   Bp[b, N/L, Kp/kp, L, kp] = B in the packed layout (zero beyond N and K);
      "colsum"  (int8 A only) cs[b, n] = sum_k 128 * B[b, k, n] (a one-row GEMM on vpdpbusd, from
                the packed B); the "gemm" accumulators start at -cs, which takes the +128 offset
                back: acc = -cs + sum_k (A+128) * B, in int32 modulo 2^32, exact because acc and the
                offset sum are int32 (K <= MAX_K; the module docstring);
      "prep"    A + 128 as uint8 (int8 A) and / or zero padding of K to a multiple of 4;
      "gemm"    the register-tiled vpdpbusd GEMM of ``dense``, parallel over (batch x tiles);
      "out"     the requantization epilogue per finished tile.
    """
    _check_io(a_dtype, out_dtype, lo, hi)
    if b_dtype != "int8":
        raise ValueError(f"batch_matmul: the VNNI kernel needs an int8 right operand, got {b_dtype}")
    # symbolic dims (qcompiler/symbolic.py): int32 variables of the kernel's own, bound from the
    # operands' shapes; a symbolic M / N / K is processed in whole tiles (Mt = ceil(M / mr), Nt =
    # ceil(N / (nr L)), Kt = ceil(K / 4), computed in the kernel); the M valid rows are stored (the
    # last tile's extra rows read the clamped last row), a symbolic N is stored padded to Nt*nr*L
    # columns (``sym_tiles``: the caller keeps N; a predicated column store would not vectorize)
    dyn = {d: not isinstance(v, (int, np.integer)) for d, v in (("batch", batch), ("M", M), ("N", N), ("K", K))}
    if any(dyn.values()):
        from qcompiler.tune.workload import rows_bucket

        rep = [rows_bucket(v) for v in (M, N, K, batch)]
        if config is None:
            config = default_config(*rep, isa=isa)
        if dyn["K"]:  # no K blocking over a symbolic depth
            config = dataclasses.replace(config, kc=0)
        batch, M, N, K = (tirx.Var(d, "int32") if dyn[d] else int(v)
                          for d, v in (("batch", batch), ("M", M), ("N", N), ("K", K)))
    else:
        _check_k(K, "batch_matmul")
        if min(batch, M, N, K) < 1:
            raise ValueError(f"batch_matmul: empty problem {batch}x{M}x{N}x{K}")
    cfg = config or default_config(M, N, K, batch, isa=isa)
    if not any(dyn.values()):
        return _batch_matmul(batch, M, N, K, a_dtype, out_dtype, lo, hi, cfg, b_trans, isa, dyn)
    # the serial / parallel run-time branch of ``_par_branch``, on the multiply-accumulates: serial up to
    # those of the largest row count whose GEMM (at the other dims' representative sizes) costs under
    # SERIAL_CYCLES; both variants with one tile, so one output shape
    m_s = _serial_rows(lambda m: gemm_cycles(m, rep[1], rep[2], rep[3], isa=isa))
    return _batch_matmul(batch, M, N, K, a_dtype, out_dtype, lo, hi, dataclasses.replace(cfg, parallel=True), b_trans,
                         isa, dyn, m_s * rep[1] * rep[2] * rep[3])


def _batch_matmul(batch, M, N, K, a_dtype: str, out_dtype: str, lo: int, hi: int, cfg: VnniConfig, b_trans: bool,
                  isa: Isa, dyn: dict, serial_macs: int = 0) -> tirx.PrimFunc:
    """``batch_matmul`` with its dims ints or (``dyn``) int32 variables, with one config; with
    ``serial_macs`` > 0 serial up to that many multiply-accumulates (``_par_branch``)."""
    L, kp = isa.lanes, isa.kpack
    step = {"M": cfg.mr, "N": cfg.nr * L, "K": 4}
    tiles = {d: tirx.floordiv({"M": M, "N": N, "K": K}[d] + (step[d] - 1), step[d])
             for d in ("M", "N", "K") if dyn[d]}
    nb = tiles["N"] * cfg.nr if dyn["N"] else _ceil(N, L)
    if not dyn["N"]:
        _check_tile(cfg, isa, nb, "batch_matmul")
    signed = a_dtype == "int8"
    Kp = tiles["K"] * 4 if dyn["K"] else _ceil(K, 4) * 4
    Mp = tiles["M"] * cfg.mr if dyn["M"] else _ceil(M, cfg.mr) * cfg.mr
    A = te.placeholder((batch, M, K), a_dtype, name="A")
    B = te.placeholder((batch, N, K) if b_trans else (batch, K, N), "int8", name="B")
    mult = te.placeholder((1,), "int64", name="mult")
    shift = te.placeholder((1,), "int64", name="shift")

    def b_at(b, k, n):
        return B[b, n, k] if b_trans else B[b, k, n]

    def pack(b, nbi, kb, i, j):
        n, k = nbi * L + i, kb * kp + j
        return tirx.if_then_else(tirx.all(n < N, k < K), b_at(b, tirx.min(k, K - 1), tirx.min(n, N - 1)),
                                 tirx.const(0, "int8"))

    Bp = te.compute((batch, nb, Kp // kp, L, kp), pack, name="bpack")
    if signed:  # 128 * column sums of B, as a one-row GEMM with A = 128 (zero in padded columns)
        c128 = te.compute((Kp,), lambda k: tirx.const(128, "uint8"), name="c128")
        kc = te.reduce_axis((0, Kp), name="kc")
        cs = te.compute((batch, nb * L), lambda b, j: te.sum(
            c128[kc].astype("int32") * Bp[b, j // L, kc // kp, j % L, kc % kp].astype("int32"), axis=kc),
            name="colsum")
    has_prep = signed or dyn["K"] or Kp != K
    if has_prep:
        Ap = te.compute((batch, M, Kp), lambda b, i, k: tirx.if_then_else(
            k < K, _as_u8(A[b, i, tirx.min(k, K - 1)], signed), tirx.const(0, "uint8")), name="prep")
    else:
        Ap = A
    row = (lambda i: tirx.min(i, M - 1)) if dyn["M"] or Mp != M else (lambda i: i)
    k = te.reduce_axis((0, Kp), name="k")
    C = te.compute((batch, Mp, nb * L), lambda b, i, j: te.sum(
        Ap[b, row(i), k].astype("int32") * Bp[b, j // L, k // kp, j % L, k % kp].astype("int32"), axis=k,
        init=cs[b, j] if signed else None), name="gemm")
    # (create_prim_func drops that init but keeps "colsum" in the function; _with_init sets -cs)
    # mult through int32 (|mult| < 2^31, the contract): a 32 x 32 -> 64-bit multiply (vpmuldq)
    oshape = (batch, M, nb * L if dyn["N"] else N)
    out = te.compute(oshape, lambda b, i, j: _requant(
        C[b, i, j].astype("int64"), mult[0].astype("int32").astype("int64"), shift[0], lo, hi, out_dtype),
        name="out")
    func = te.create_prim_func([A, B, mult, shift, out])
    if signed:
        func = _with_init(func, "gemm", "colsum")

    def schedule(c):
        sch = Schedule(func)
        _schedule_bpack(sch, unroll=not any(dyn.values()))
        if signed:
            _schedule_colsum(sch, isa)
        _schedule_gemm(sch, c, n_red=1, prep_vec_dims=1 if has_prep else None, n_batch=1, isa=isa)
        return _finish(sch)

    if serial_macs > 0:
        macs = tirx.const(1, "int64")
        for d in (batch, M, N, K):
            macs = macs * (tirx.Cast("int64", d) if not isinstance(d, int) else tirx.const(d, "int64"))
        f = _par_branch(schedule, cfg, macs <= tirx.const(serial_macs, "int64"))
    else:
        f = schedule(cfg)
    if dyn["N"]:  # the output's columns in whole tiles of this size (lowering/gemm_cpu.py keeps N)
        f = f.with_attr("qc.sym_tiles", [["N", step["N"]]])
    return f


def _schedule_bpack(sch: Schedule, unroll: bool = True) -> None:
    """Pack B per (batch, L-column block) in parallel, each L x kp group unrolled.

    Unrolled byte moves measured faster than vectorizing the group (a byte gather / scatter that
    TVM scalarizes): MiniLM Q.K^T 12x128x128x32 97 -> 71 us, P.V 12x128x32x128 45 -> 37 us.
    Over symbolic dims only the kp bytes are unrolled (each move carries bounds tests on the
    symbolic extents, LLVM's time grows with the unrolled copies of them).
    """
    b, nbi, kb, i, j = sch.get_loops(sch.get_sblock("bpack"))
    _parallel_if_worth(sch, sch.fuse(b, nbi), "bpack", 16)
    if unroll:
        sch.unroll(i)
    sch.unroll(j)


def _schedule_colsum(sch: Schedule, isa: Isa) -> None:
    """Column sums as a one-row GEMM on the ISA's intrinsic (``1 x L`` steps), parallel over the batch."""
    blk = sch.get_sblock("colsum")
    b, j, kc = sch.get_loops(blk)
    j0, j1 = sch.split(j, [None, isa.lanes])
    k0, k1 = sch.split(kc, [None, isa.kpack])
    sch.reorder(j0, k0, j1, k1)
    _parallel_if_worth(sch, b, "colsum", isa.lanes * isa.kpack)
    init = sch.decompose_reduction(blk, k0)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(j1, isa.intrin())
    _vectorize_inner(sch, sch.get_loops(sch.get_sblock("c128"))[0], isa.vbytes)


def _with_init(func: tirx.PrimFunc, block: str, src: str) -> tirx.PrimFunc:
    """``func`` with the reduction block ``block`` [b, i, j] starting from ``-src[b, j]``, not 0.

    (TE's ``te.sum(..., init=...)`` is dropped by ``te.create_prim_func`` in TVM 0.27.)  The read
    of ``src`` is not added to the block's read regions: tensorize matches the update block's reads
    against the intrinsic's, and decompose_reduction copies them from here.  That is safe because
    no schedule step moves either block: "src" stays at the root, before ``block`` (TE's
    topological order).
    """
    sch = Schedule(func)
    rv = sch.get_sblock(block)
    blk = sch.get(rv)
    buf = next(r.source for r in sch.get(sch.get_sblock(src)).writes)
    vb, _, vj = (iv.var for iv in blk.iter_vars[:3])
    init = tirx.BufferStore(blk.init.buffer, tirx.const(0, "int32") - tirx.BufferLoad(buf, [vb, vj]),
                            blk.init.indices)
    new = SBlock(blk.iter_vars, blk.reads, blk.writes, blk.name_hint, blk.body, init, blk.alloc_buffers,
                 blk.match_buffers, blk.annotations)
    sch.state.replace(sch.get_sref(rv), new, {blk: new})
    return sch.mod["main"]


def _prepare_conv_epilogue(sch: Schedule, OH: int, OW: int) -> None:
    """Give the conv epilogue the GEMM's (row, oc) iteration space so it can run per tile.

    (A plain loop fuse is not enough: reverse_compute_at would re-derive a box over (n, oh, ow),
    which is not the set of rows of a tile.)
    """
    out = sch.get_sblock("out")
    sch.transform_block_layout(out, lambda n, oh, ow, j: ((n * OH + oh) * OW + ow, j))


# ---- direct convolutions (depthwise, grouped) ------------------------------------------------------
def _largest_divisor(n: int, candidates) -> int:
    return next((c for c in candidates if n % c == 0), 1)


def _zero_pad(X, N, H, W, C, Hx, Wx, pt, pl, dtype, perm=None):
    """Xp[n, h, w, c] = X[n, h - pt, w - pl, c] inside, 0 outside (the real value 0 of the input).

    ``perm=(Cg, G)`` also regroups the channels: Xp[..., ci*G + g] = X[..., g*Cg + ci].
    """

    def f(n, h, w, c):
        hh, ww = h - pt, w - pl
        inside = tirx.all(hh >= 0, hh < H, ww >= 0, ww < W)
        src = c if perm is None else (c % perm[1]) * perm[0] + c // perm[1]
        v = X[n, tirx.max(tirx.min(hh, H - 1), 0), tirx.max(tirx.min(ww, W - 1), 0), src]
        return tirx.if_then_else(inside, v, tirx.const(0, dtype))

    return te.compute((N, Hx, Wx, C), f, name="prep")


def _conv_geometry(H, W, KH, KW, strides, pads, dilations):
    """Strides, dilations, top/left pads, output size and the input extent (Hx, Wx) the output grid
    touches in padded coordinates (may be less than H + pads)."""
    (sh, sw), (dh, dw), (pt, pl, _, _) = tuple(strides), tuple(dilations), tuple(pads)
    OH, OW = _out_shape(H, W, KH, KW, strides, pads, dilations)
    Hx, Wx = (OH - 1) * sh + (KH - 1) * dh + 1, (OW - 1) * sw + (KW - 1) * dw + 1
    return sh, sw, dh, dw, pt, pl, OH, OW, Hx, Wx


def _schedule_direct(sch: Schedule, n_red: int, tw: int, vec: int, has_prep: bool,
                     epilogue_at_columns: bool = False, parallel: bool | None = None) -> None:
    """Blocks "prep" (optional), "acc" (n, oh, ow, *mid, c, *reduction) and "out" (n, oh, ow, c).

    Parallel over (n, oh); a ``tw x vec`` register tile of (output columns x channels) with the
    reduction outside it; channels vectorized.  The epilogue runs per finished channel tile, or per
    column tile (all channels) when the channel tile is not a box of output channels.
    """
    acc = sch.get_sblock("acc")
    n, oh, ow, *rest = sch.get_loops(acc)
    mid, c, red = rest[: len(rest) - n_red - 1], rest[len(rest) - n_red - 1], rest[len(rest) - n_red:]
    ow0, ow1 = sch.split(ow, [None, tw])
    c0, c1 = sch.split(c, [None, vec])
    sch.reorder(ow0, *mid, c0, *red, ow1, c1)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, ow0 if epilogue_at_columns else c0)
    if parallel is None:
        _parallel_if_worth(sch, sch.fuse(n, oh), "acc", vec, symbolic=True)
    elif parallel:  # decided by the caller (symbolic extents: at their representative sizes)
        sch.parallel(sch.fuse(n, oh))
    sch.unroll(ow1)
    sch.vectorize(c1)
    _vectorize_inner(sch, sch.get_loops(out)[-1], 16)
    if has_prep:
        pn, ph, pw, pc = sch.get_loops(sch.get_sblock("prep"))
        if isinstance(sch.get(pw).extent, tirx.IntImm):
            _parallel_if_worth(sch, sch.fuse(pn, ph), "prep", 64)
            _vectorize_inner(sch, sch.fuse(pw, pc), 64)
        else:  # a symbolic width: the channels vectorized (a fused loop of symbolic extent stays scalar)
            _parallel_if_worth(sch, sch.fuse(pn, ph), "prep", 64)
            _vectorize_inner(sch, pc, next((v for v in (64, 32, 16, 8) if int(sch.get(pc).extent) % v == 0), 64))
    sch.decompose_reduction(acc, red[0])


def _direct_tiles(OW: int, lanes: int) -> tuple[int, int, int]:
    """(vec, tw, OWp): channel vector width dividing ``lanes``, output-column tile, padded width."""
    vec = _largest_divisor(lanes, (64, 32, 16, 8, 4, 2))
    tw = max(1, min(8, 256 // vec, OW))
    tw = min(range(tw, 0, -1), key=lambda t: (_ceil(OW, t) * t - OW > OW // 8, -t))  # little waste
    return vec, tw, _ceil(OW, tw) * tw


def direct_max_tw(C: int) -> int:
    """The widest column tile of :func:`depthwise_conv2d_nhwc` over a symbolic width for C channels
    (tw x vec int32 accumulators within 256, 16 zmm registers)."""
    return max(1, min(8, 256 // _largest_divisor(C, (64, 32, 16, 8, 4, 2))))


def depthwise_conv2d_nhwc(N: int, H: int, W: int, C: int, KH: int, KW: int, strides, pads, dilations,
                          a_dtype: str, out_dtype: str, lo: int, hi: int, post: Post | None = None) -> tirx.PrimFunc:
    """Depthwise conv (group == C, one output channel per input channel), direct, int32 vectorized.

    args (X[N,H,W,C], Wd int8[KH,KW,C], bias int32[C], mult int64[C], shift int64[C], Out[N,OH,OW,C]);
    with a fused ``post`` (:class:`Post`) its extra inputs [N,OH,OW,C] and constants before Out;
    acc = sum_{kh,kw} X[n, oh*sh + kh*dh - pt, ow*sw + kw*dw - pl, c] * Wd[kh, kw, c] + bias[c].
    """
    _check_io(a_dtype, out_dtype, lo, hi, dts=DIRECT_ACT_DTYPES)
    rep = (N, H, W)  # the caller's dims (symbolic ones in the graph's variables: their representative sizes)
    sym = not all(isinstance(d, (int, np.integer)) for d in rep)
    if not isinstance(N, (int, np.integer)):  # a symbolic batch (qcompiler/symbolic.py): an outer loop,
        N = tirx.Var("N", "int64")            # the kernel's own variable, bound from X's shape
    # a symbolic height / width: the kernel's own variables; column tiles of tw (``direct_max_tw``: up to 8),
    # their count OWt = ceil(OW / tw) an int32 argument before the output (attribute ``qc.ow_tiles``);
    # the output and a fused post's extras are exact, the last tile of a row stored in part
    sym_hw = not (isinstance(H, (int, np.integer)) and isinstance(W, (int, np.integer)))
    if sym_hw:
        H, W = (d if isinstance(d, (int, np.integer)) else tirx.Var(nm, "int64") for d, nm in ((H, "H"), (W, "W")))
    sh, sw, dh, dw, pt, pl, OH, OW, Hx, Wx = _conv_geometry(H, W, KH, KW, strides, pads, dilations)
    if sym_hw:
        vec = _largest_divisor(C, (64, 32, 16, 8, 4, 2))
        tw = direct_max_tw(C)
        OWt = tirx.Var("OWt", "int32")  # int32, as the row-tile counts (a PrimValue argument FuseTIR accepts)
        OWp = OWt * tw
        Wx = (OWp - 1) * sw + (KW - 1) * dw + 1
    else:
        vec, tw, OWp = _direct_tiles(OW, C)
        Wx = max(Wx, (OWp - 1) * sw + (KW - 1) * dw + 1)  # room for the padded output columns
    X = te.placeholder((N, H, W, C), a_dtype, name="X")
    Wd = te.placeholder((KH, KW, C), "int8", name="Wd")
    bias = te.placeholder((C,), "int32", name="bias")
    mult = te.placeholder((C,), "int64", name="mult")
    shift = te.placeholder((C,), "int64", name="shift")
    in_place = not sym_hw and pt == 0 and pl == 0 and Hx <= H and Wx <= W
    Xp = X if in_place else _zero_pad(X, N, H, W, C, Hx, Wx, pt, pl, a_dtype)
    kh = te.reduce_axis((0, KH), name="kh")
    kw = te.reduce_axis((0, KW), name="kw")
    acc = te.compute((N, OH, OWp, C), lambda n, oh, ow, c: te.sum(
        Xp[n, oh * sh + kh * dh, ow * sw + kw * dw, c].astype("int32") * Wd[kh, kw, c].astype("int32"),
        axis=[kh, kw]), name="acc")
    extras, consts = _post_args(post, (N, OH, OW, C))
    out = te.compute((N, OH, OW, C), lambda n, oh, ow, c: _requant(
        (acc[n, oh, ow, c] + bias[c]).astype("int64"), mult[c], shift[c], lo, hi, out_dtype, post,
        (extras, consts, (n, oh, ow, c)) if post is not None else None), name="out")
    sch = Schedule(te.create_prim_func([X, Wd, bias, mult, shift, *_post_list(extras, consts),
                                        *([OWt] if sym_hw else []), out]))
    par = None
    if sym:  # the work at the representative sizes (tune/workload.rows_bucket) decides
        from qcompiler.tune.workload import rows_bucket

        try:
            rn, rh, rw = (rows_bucket(d) for d in rep)
            _, _, _, _, _, _, rOH, rOW, _, _ = _conv_geometry(rh, rw, KH, KW, strides, pads, dilations)
            par = rn * rOH * rOW * C * KH * KW >= PAR_MIN_VECTOR_ITERS * vec
        except (ValueError, TypeError):
            par = True
    _schedule_direct(sch, n_red=2, tw=tw, vec=vec, has_prep=not in_place, parallel=par)
    f = _finish(sch)
    return f.with_attr("qc.ow_tiles", tw) if sym_hw else f


DW_LANES = 16  # channels per vpdpbusd zmm of the tap-interleaved depthwise kernel (8: ymm, vpmaddwd on AVX2)


def _taps_isa(isa: Isa, C: int, a_dtype: str = "int8") -> tuple[int, int, int, str]:
    """(kernel rows per 32-bit word P, channel lanes L, bits per row, intrinsic) of the depthwise
    kernel on ``isa`` for C channels of ``a_dtype``: VNNI 4 bytes (``vpdpbusd``, u8 x s8) on 16 lanes,
    or 8 (ymm) when C is a multiple of 8 but not of 16; AVX2 2 int16 (``vpmaddwd``, s16 x s16) on 8
    lanes; int16 inputs (W8A16 layers) 2 int16 rows per word on either ISA (VNNI: ``vpdpwssd``, 16
    lanes or 8).  C must be a multiple of L (``depthwise_taps_ok``; other channel counts take
    depthwise_conv2d_nhwc)."""
    if isa.name == VNNI.name and a_dtype == "int16":
        P, L, bits, intrin = (2, DW_LANES, 16, "avx512vnni_lanes_i16") if C % DW_LANES == 0 else \
            (2, 8, 16, "avx512vnni_lanes8_i16")
    elif isa.name == VNNI.name:
        P, L, bits, intrin = (4, DW_LANES, 8, "avx512vnni_lanes") if C % DW_LANES == 0 else \
            (4, 8, 8, "avx512vnni_lanes8")
    elif isa.name == AVX2.name:
        P, L, bits, intrin = 2, 8, 16, "avx2_lanes"
    else:
        raise ValueError(f"depthwise_conv2d_taps: no kernel for {isa.name}")
    if C % L:
        raise ValueError(f"depthwise_conv2d_taps: {C} channels are not a multiple of {L}")
    return P, L, bits, intrin


def taps_acc_bound(KH: int, KW: int, a_dtype: str) -> int:
    """max |acc| of :func:`depthwise_conv2d_taps` for ``a_dtype`` inputs: KH*KW*255*128 for 8-bit
    ones (the +128 offset form: 0 <= x + 128 <= 255), KH*KW*32768*128 for int16."""
    return KH * KW * (32768 if a_dtype == "int16" else 255) * 128


def folded_round(bias: np.ndarray, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """rc = bias * mult + 2^(shift-1) (int64, computed at compile time), the bias and rounding term of
    :func:`_requant_folded`; ``bias`` unwrapped (int64: an offset-corrected depthwise bias is below
    2^31 + 128 * 128 * KH*KW <= 2^31 + 2^26 for KH*KW <= MAX_K / 16, so |rc| < 2^62.1 + 2^61 < 2^63)."""
    b, m, s = (np.asarray(a, np.int64) for a in (bias, mult, shift))
    return b * m + (np.int64(1) << (s - 1))


def _requant_folded(acc32, rc, mult, shift, lo: int, hi: int, out_dtype: str, post=None, at=None):
    """:func:`_requant` of ``acc32 + bias`` with the bias folded into the rounding term ``rc`` of
    :func:`folded_round` (passed as an argument: the simplifier would factor ``acc*m + bias*m`` back):

        (acc + bias) * mult + 2^(shift-1) = acc * mult + (bias * mult + 2^(shift-1))

    exact in int64: both terms fit (|acc * mult| < 2^62, rc above) and their sum is the contract's
    ``(acc + bias) * mult + 2^(shift-1)``, an int64 (int64 addition is exact modulo 2^64).  Each output
    costs one multiply of sign-extended int32 values (``vpmuldq``; ``mult`` read as its int32 value,
    which it is: |mult| < 2^31) and one add.  The tail (clip, ``post``) is :func:`_requant`'s."""
    t = (acc32.astype("int64") * mult.astype("int32").astype("int64") + rc) >> shift
    t = tirx.max(tirx.min(t, tirx.const(hi, "int64")), tirx.const(lo, "int64"))
    if post is None:
        return t.astype(out_dtype)
    extras, consts, i = at
    return post(t, [e[tuple(i)].astype("int64") for e in extras], lambda k: consts[k]).astype(post.out_dtype)


def pack_depthwise_taps(wd: np.ndarray, bias: np.ndarray | None, a_dtype: str, mult: np.ndarray,
                        shift: np.ndarray, isa: Isa = VNNI) -> tuple[np.ndarray, np.ndarray]:
    """wd int8 [KH, KW, C] -> (W4 int8 [G, KW, C, P], R int64 [4, C]) for :func:`depthwise_conv2d_taps`.

    ``W4[g, kw, c, j] = wd[P*g + j, kw, c]`` (0 for P*g + j >= KH), G = ceil(KH / P) (VNNI: P = 4;
    AVX2 and int16 inputs: P = 2, ``_taps_isa``): the P products a lane sums are P kernel rows of
    one channel.
    ``rc = folded_round(bias_eff, mult, shift)`` with ``bias_eff = bias - 128 * sum_{kh,kw} wd[kh, kw, c]``
    for int8 inputs on VNNI (the +128 offset, module docstring; AVX2 multiplies int16 as they are), in
    int64, is R's last row; R = :func:`dw_fast_params` (rc, mult, shift) adds the parameters of the
    int32-lane epilogue (``_x86_intrin.dw_requant``) for groups of the kernel's L channels.
    """
    _check_weight(wd, 3, "pack_depthwise_taps")
    KH, KW, C = wd.shape
    P, L, _, _ = _taps_isa(isa, C, a_dtype)
    G = _ceil(KH, P)
    w4 = np.zeros((G * P, KW, C), np.int8)
    w4[:KH] = wd
    w4 = np.ascontiguousarray(w4.reshape(G, P, KW, C).transpose(0, 2, 3, 1))
    b = np.zeros(C, np.int64) if bias is None else np.asarray(bias, np.int64)
    if a_dtype == "int8" and P == 4:
        b = b - 128 * wd.astype(np.int64).sum(axis=(0, 1))
    rc = folded_round(b, mult, shift)
    return w4, dw_fast_params(rc, mult, shift, taps_acc_bound(KH, KW, a_dtype), L)


def dw_fast_params(rc: np.ndarray, mult: np.ndarray, shift: np.ndarray, amax: int, group: int = DW_LANES) -> np.ndarray:
    """[4, C] int64 rows (b, mf, s2, rc) of the int32-lane depthwise epilogue
    (``_x86_intrin.dw_requant``) for accumulators ``|a| <= amax``: per channel

        clip((a * mult + rc) >> shift)  =  clip(int32((a * mf + b) >> 32) >> s2)     (s2 >= 0)

    * shift >= 32: mf = mult, b = rc, s2 = shift - 32.  Exact for every int64 ``a * mult + rc``
      (wrapping as the int64 form does): an arithmetic shift by ``shift`` is one by 32 (the high
      dword, an int32) then one by ``shift - 32`` <= 30, and the result of a shift by >= 32 is
      already an int32, so clipping it in int32 is clipping it in int64.
    * shift < 32 (k = 32 - shift): mf = mult * 2^k, b = rc * 2^k, s2 = 0, when mf is an int32 and
      ``(amax * |mult| + |rc|) * 2^k < 2^63`` (no int64 overflow for any ``a``): then the scaled sum is
      exactly ``2^k (a * mult + rc)`` and its high dword ``floor((a * mult + rc) / 2^shift)``.
    * otherwise (also outside the Dyadic contract |mult| < 2^31, 1 <= shift <= 62, or when another
      channel of its ``group`` -- the kernel's L lanes -- is) s2 = -1: the int64 form, which reads
      only the rc row (mf = b = 0).  The kernel branches once per L channels
      on the first one's s2, so a group never mixes the two forms.
    ``amax`` bounds the kernel's raw accumulator (KH * KW * 255 * 128: u8 x s8 products on VNNI, s16
    x s8 on AVX2).
    """
    rc, mult, shift = (np.asarray(x, np.int64).reshape(-1) for x in (rc, mult, shift))
    C = rc.shape[0]
    mult, shift = np.broadcast_to(mult, (C,)), np.broadcast_to(shift, (C,))
    out = np.zeros((4, C), np.int64)
    out[3] = rc
    ok = np.zeros(C, bool)
    for c in range(C):  # Python integers: the bounds exactly
        m, s, r = int(mult[c]), int(shift[c]), int(rc[c])
        if not (-(2**31) <= m < 2**31 and 1 <= s <= 62):  # outside the Dyadic contract: the int64 form
            continue
        if s >= 32:
            out[0, c], out[1, c], out[2, c], ok[c] = r, m, s - 32, True
        else:
            k = 32 - s
            if abs(m << k) < 2**31 and (amax * abs(m) + abs(r)) << k < 2**63:
                out[0, c], out[1, c], out[2, c], ok[c] = r << k, m << k, 0, True
    ok = np.repeat(ok.reshape(-1, group).all(axis=1), group) if C % group == 0 else np.zeros(C, bool)
    out[:3, ~ok] = [[0], [0], [-1]]
    return out


def depthwise_taps_ok(N, H, W, C, KH, KW, a_dtype: str, isa: Isa | None) -> bool:
    """Whether :func:`depthwise_conv2d_taps` takes the layer: static C (N, H, W may be symbolic), int8 /
    uint8 / int16 input, a VNNI or AVX2 target, C a multiple of 8 (a ragged channel tail would need
    masked or gathered loads: the int32-lane kernel is faster there), at least 2 kernel rows (one
    row would leave the other products of a lane idle) and an int32 accumulator
    (:func:`taps_acc_bound` < 2^31)."""
    static = isinstance(C, (int, np.integer))
    return (static and isa is not None and isa.name in (VNNI.name, AVX2.name) and a_dtype in DIRECT_ACT_DTYPES
            and int(C) % 8 == 0 and KH >= 2 and taps_acc_bound(KH, KW, a_dtype) < 2**31)


def depthwise_conv2d_taps(N: int, H: int, W: int, C: int, KH: int, KW: int, strides, pads, dilations,
                          a_dtype: str, out_dtype: str, lo: int, hi: int, post: Post | None = None,
                          isa: Isa = VNNI, int32_epilogue: bool = True, share_rows: bool = True) -> tirx.PrimFunc:
    """Depthwise conv on ``vpdpbusd`` with the 4-byte dot products over kernel rows (AVX-512 VNNI), or
    on ``vpmaddwd`` with its int16 pairs over kernel rows (``isa=AVX2``).

    args (X[N,H,W,C] int8/uint8, W4 int8 [G, KW, C, P] and R int64 [4, C] of :func:`pack_depthwise_taps`,
    mult int64[C], shift int64[C], [post's extras, consts], Out[N,OH,OW,C]).

    For each output row (n, oh) (the parallel loop) a row-band buffer of uint32 words holds the
    input rows that row reads, interleaved by kernel row (little endian, byte j of the word):

        X4[g, w, c] byte j = u8(Xp[n, oh*sh + (4g + j)*dh, w, c])     (0 for 4g + j >= KH)

    with ``Xp`` the zero-padded input in padded coordinates and u8 the ``vpdpbusd`` operand (x + 128
    for int8: padding is the byte 128, the real value 0; x for uint8).  Then, 16 channels per lane
    vector, one ``vpdpbusd`` per (g, kw) and output column (a 3x3 kernel: 3 instructions per 16
    outputs, 9 of their 12 byte products useful):

        acc[ow, c] = sum_{g, kw} sum_{j<4} byte_j(X4[g, ow*sw + kw*dw, c]) * W4[g, kw, c, j]
                   = sum_{kh, kw} u8(Xp[...]) * wd[kh, kw, c]

    and ``acc + bias_eff`` is the true accumulator (the offset taken back as in the GEMMs; exact in
    int32 for KH*KW*255*128 < 2^31).  The buffer costs one 64-byte store per 16 channels and padded
    input column per output row (~1 per 16 outputs at stride 1), built from 16-byte row loads
    zero-extended to words, shifted and or-ed (vectorized over channels).  At stride and dilation 1
    with an even output height, when KH + 1 rows take no more groups than KH (KH = 2, 3, 5, 6, 7 on
    VNNI, odd KH on AVX2), one buffer of KH + 1 rows serves two
    output rows (``share_rows``): row 2i + r reads the band's rows r .. r + KH - 1, i.e. the same
    words with the weights shifted by r slots (``w4s``, built once per call), so the buffer costs half
    as much per output and a 3x3 kernel uses all 4 bytes of each word.  The epilogue (bias,
    requantization, clip, fused ``post``) runs on each finished ``tw x 16`` tile, with whole column
    tiles in int32 lanes where R allows it (``dw_fast_params``, the intrinsic of
    ``_x86_intrin.register_dw_requant``: 8 vector instructions per 16 outputs instead of 13 in int64;
    a fused ``post`` then runs on that clipped int32 tile; ``int32_epilogue=False`` keeps the int64
    form, ``share_rows=False`` one buffer per output row, for A/B timings).  C a multiple of 16
    (of 8: ``vpdpbusd ymm``, 8 channels per instruction), static C (``depthwise_taps_ok``); a
    symbolic batch N (qcompiler/symbolic.py) is the kernel's own variable, bound from X's shape; a
    symbolic H / W too (OWt column tiles per row, the last one stored in part: above).

    AVX2 (no VNNI): the same with P = 2 kernel rows per word as two int16 (the input sign- or
    zero-extended, no offset: ``vpmaddwd`` multiplies signed int16, padding is 0), 8 channels per
    ``vpmaddwd`` + ``vpaddd``, G = ceil(KH / 2) groups (a 3x3 kernel: 6 of each per 8 outputs,
    9 of 12 products useful), against 9 ``vpmulld`` + 9 ``vpaddd`` of the int32-lane kernel.
    """
    _check_io(a_dtype, out_dtype, lo, hi, dts=DIRECT_ACT_DTYPES)
    if not isinstance(C, (int, np.integer)):
        raise ValueError("depthwise_conv2d_taps: a symbolic channel count")
    if taps_acc_bound(KH, KW, a_dtype) >= 2**31:
        raise ValueError(f"depthwise_conv2d_taps: a {KH}x{KW} kernel overflows the int32 accumulator")
    sym_n = not isinstance(N, (int, np.integer))
    N = tirx.Var("N", "int64") if sym_n else int(N)
    # a symbolic height / width: the kernel's own int32 variables (as a static kernel's loops: int64
    # ones defeat the intrinsic's blockize); column tiles of tw = 8, their count OWt =
    # ceil(OW / tw) an int32 argument before the output (attribute ``qc.ow_tiles`` = tw); the output
    # and a post's extras are exact [N, OH, OW, C]: the last tile of a row computes its padded
    # columns (clamped, masked loads) and stores only the valid ones
    sym_hw = not (isinstance(H, (int, np.integer)) and isinstance(W, (int, np.integer)))
    H, W = (int(d) if isinstance(d, (int, np.integer)) else tirx.Var(nm, "int32") for d, nm in ((H, "H"), (W, "W")))
    C = int(C)
    sh, sw, dh, dw, pt, pl, OH, OW, _, _ = _conv_geometry(H, W, KH, KW, strides, pads, dilations)
    P, L, bits, intrin = _taps_isa(isa, C, a_dtype)
    G = _ceil(KH, P)
    OWt = None
    if sym_hw:
        tw = 8
        OWt = tirx.Var("OWt", "int32")
        OWp = OWt * tw
    else:
        tw = max(1, min(8, OW))
        tw = min(range(tw, 0, -1), key=lambda t: (_ceil(OW, t) * t - OW > OW // 8, -t))  # little waste
        OWp = _ceil(OW, tw) * tw
    Wx = (OWp - 1) * sw + (KW - 1) * dw + 1
    signed = a_dtype == "int8"
    X = te.placeholder((N, H, W, C), a_dtype, name="X")
    W4 = te.placeholder((G, KW, C, P), "int8", name="W4")
    rc = te.placeholder((4, C), "int64", name="rc")  # dw_fast_params' rows (b, mf, s2, rc)
    mult = te.placeholder((C,), "int64", name="mult")
    shift = te.placeholder((C,), "int64", name="shift")

    # two output rows per row band where that costs no more groups (stride and dilation 1, an even
    # height): rows 2i and 2i + 1 read input rows 2i - pt + t, t < KH + 1, so one band of KH + 1 rows
    # serves both, with the weights shifted by one row for the second (W4s below)
    R2 = 2 if (share_rows and sh == 1 and dh == 1 and isinstance(OH, int) and OH % 2 == 0
               and _ceil(KH + 1, P) == G) else 1
    rows, ones = min(P, KH + R2 - 1), (1 << bits) - 1
    u32 = lambda v: tirx.const(v, "uint32")  # noqa: E731
    # VNNI int8: byte j of the word is (x xor 0x80) = x + 128, and 0 xor 0x80 = 128 the padding (module
    # docstring); AVX2: the int16 halves hold x itself (sign-extended), 0 the padding
    flip = u32(sum(128 << (8 * j) for j in range(rows))) if signed and P == 4 else None

    def x4(n, oh, g, w, c):
        """The bits of Xp[n, h_j, w, c] for the P rows h_j in bytes / halves j, from loads at clamped
        positions and-ed with one word mask that zeroes the parts of rows / columns outside the input
        (scalar conditions over the vector of channels: no branch; rows past the kernel (weight 0)
        need no mask)."""
        word, mask = None, None
        ww = w - pl
        for j in range(rows):
            hh = oh * sh + (g * P + j) * dh - pt
            v = X[n, tirx.max(tirx.min(hh, H - 1), 0), tirx.max(tirx.min(ww, W - 1), 0), c]
            b = (v.astype("uint8") if P == 4 else v.astype("int16").astype("uint16")).astype("uint32")
            b = b << u32(bits * j) if j else b
            word = b if word is None else word | b
            conds = [hh >= 0, hh < H, ww >= 0, ww < W]
            m = tirx.Select(tirx.all(*conds), u32(ones << (bits * j)), u32(0))
            mask = m if mask is None else mask | m
        word = word & mask
        return word ^ flip if flip is not None else word

    X4 = te.compute((N, OH // R2, G, Wx, C), lambda n, i, g, w, c: x4(n, i * R2, g, w, c), name="x4")
    from ._x86_intrin import dw_requant, register, register_dw_requant, word_byte, word_half

    part = word_byte if P == 4 else word_half
    j = te.reduce_axis((0, P), name="j")
    red = (([te.reduce_axis((0, G), name="g")] if G > 1 else [])
           + ([te.reduce_axis((0, KW), name="kw")] if KW > 1 else []))  # TE drops unit reduction axes
    gk = (red[0] if G > 1 else 0), (red[-1] if KW > 1 else 0)
    if R2 == 1:
        acc = te.compute((N, OH, OWp, C), lambda n, oh, ow, c: te.sum(
            part(X4[n, oh, gk[0], ow * sw + gk[1] * dw, c], j) * W4[gk[0], gk[1], c, j].astype("int32"),
            axis=[*red, j]), name="acc")
    else:  # W4s[r] holds kernel row t - r in slot t = g*P + j (zero for t < r): row 2i + r's weights
        def w4s(r, g, kw, c, jj):
            t = g * P + jj - r
            tc = tirx.max(t, 0)
            return tirx.if_then_else(t >= 0, W4[tc // P, kw, c, tc % P], tirx.const(0, "int8"))

        W4s = te.compute((R2, G, KW, C, P), w4s, name="w4s")
        acc = te.compute((N, OH, OWp, C), lambda n, oh, ow, c: te.sum(
            part(X4[n, oh // R2, gk[0], ow * sw + gk[1] * dw, c], j)
            * W4s[oh % R2, gk[0], gk[1], c, j].astype("int32"), axis=[*red, j]), name="acc")
    extras, consts = _post_args(post, (N, OH, OW, C))
    # the int32-lane epilogue, tensorized below (register_dw_requant), on whole column tiles (the
    # predicate of a ragged last tile defeats the tensorize; a static width keeps the int64 form
    # there, a symbolic one requantizes the padded tile ("yq") and stores its valid columns); with a
    # fused post, the clipped int32 requantized tile ("yq") then post of it, vectorized
    fast_epi = (sym_hw or OW % tw == 0) and int32_epilogue
    staged = post is not None or sym_hw  # a "yq" tile stage before "out"
    if fast_epi:
        yq = te.compute((N, OH, OWp if sym_hw else OW, C), lambda n, oh, ow, c: dw_requant(
            acc[n, oh, ow, c], rc[0, c], rc[1, c], rc[2, c], rc[3, c], mult[c], shift[c], lo, hi,
            out_dtype if post is None else "int32"), name="yq" if staged else "out")
        if post is not None:
            out = te.compute((N, OH, OW, C), lambda n, oh, ow, c: post(
                yq[n, oh, ow, c].astype("int64"), [e[n, oh, ow, c].astype("int64") for e in extras],
                lambda k: consts[k]).astype(post.out_dtype), name="out")
        else:
            out = te.compute((N, OH, OW, C), lambda *i: yq(*i), name="out") if staged else yq
    else:
        out = te.compute((N, OH, OW, C), lambda n, oh, ow, c: _requant_folded(
            acc[n, oh, ow, c], rc[3, c], mult[c], shift[c], lo, hi, out_dtype, post,
            (extras, consts, (n, oh, ow, c)) if post is not None else None), name="out")
    sch = Schedule(te.create_prim_func([X, W4, rc, mult, shift, *_post_list(extras, consts),
                                        *([OWt] if sym_hw else []), out]))
    blk = sch.get_sblock("acc")
    n, oh, ow, c, *rl = sch.get_loops(blk)
    jl, rl = rl[-1], rl[:-1]
    ow0, ow1 = sch.split(ow, [None, tw])
    c0, c1 = sch.split(c, [None, L])
    if R2 > 1:  # the band's two rows one after the other inside the parallel loop
        oh, r2 = sch.split(oh, [None, R2])
        sch.reorder(r2, ow0, c0, *rl, ow1, c1, jl)
    else:
        sch.reorder(ow0, c0, *rl, ow1, c1, jl)
    # a symbolic batch / height: (n, oh) not fused (a fused loop of symbolic extent defeats the
    # tensorize's blockize), the rows of each image in parallel
    sym_rows = sym_n or not isinstance(OH, int)
    row = oh if sym_rows else sch.fuse(n, oh)
    if fast_epi and staged:
        yb = sch.get_sblock("yq")
        sch.reverse_compute_at(yb, c0)
    ob = sch.get_sblock("out")
    sch.reverse_compute_at(ob, c0)
    xb = sch.get_sblock("x4")
    sch.compute_at(xb, row)
    _parallel_if_worth(sch, row, "acc", L * 4, symbolic=sym_rows or sym_hw)
    xl = sch.get_loops(xb)[1:]
    xc0, xc1 = sch.split(xl[-1], [None, L])
    sch.vectorize(xc1)
    sch.unroll(ow1)
    if fast_epi and not staged:
        sch.tensorize(sch.get_loops(ob)[-1], register_dw_requant(lo, hi, out_dtype, L))
    else:
        if fast_epi:
            sch.tensorize(sch.get_loops(yb)[-1], register_dw_requant(lo, hi, out_dtype if post is None else "int32", L))
        sch.vectorize(sch.get_loops(ob)[-1])
    init = sch.decompose_reduction(blk, rl[0] if rl else ow1)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(c1, register(intrin))
    f = _finish(sch)
    return f.with_attr("qc.ow_tiles", tw) if sym_hw else f


def grouped_conv2d_nhwc(N: int, H: int, W: int, C: int, OC: int, KH: int, KW: int, strides, pads, dilations,
                        groups: int, a_dtype: str, out_dtype: str, lo: int, hi: int) -> tirx.PrimFunc:
    """Grouped conv (1 < groups, incl. depthwise with channel multiplier > 1), direct, int32 vectorized.

    args (X[N,H,W,C], W int8[OC, C/groups, KH, KW] (ONNX, unpacked), bias int32[OC] (plain),
    mult int64[OC], shift int64[OC], Out[N,OH,OW,OC]).  Output channel oc = g*OCg + j reads input
    channels g*Cg .. g*Cg + Cg - 1.  The weights are transposed inside the kernel (cheap next to the
    convolution) so that the weight vector is a contiguous load.  With OCg >= 8 output channels per
    group the vector runs over those (the input value is a broadcast); with fewer it runs over the
    groups (input channel g*Cg + ci per lane: contiguous for Cg == 1, a strided gather otherwise).
    """
    _check_io(a_dtype, out_dtype, lo, hi, dts=DIRECT_ACT_DTYPES)
    if not isinstance(N, (int, np.integer)):  # a symbolic batch (qcompiler/symbolic.py): an outer loop,
        N = tirx.Var("N", "int64")            # the kernel's own variable, bound from X's shape
    if groups < 1 or C % groups or OC % groups:
        raise ValueError(f"grouped_conv2d_nhwc: groups={groups} must divide C={C} and OC={OC}")
    Cg, OCg = C // groups, OC // groups
    sh, sw, dh, dw, pt, pl, OH, OW, Hx, Wx = _conv_geometry(H, W, KH, KW, strides, pads, dilations)
    by_group = OCg < 8  # vector over the groups (lanes g, input channel g*Cg + ci), else over OCg
    vec, tw, OWp = _direct_tiles(OW, groups if by_group else OCg)
    Wx = max(Wx, (OWp - 1) * sw + (KW - 1) * dw + 1)
    X = te.placeholder((N, H, W, C), a_dtype, name="X")
    Wt = te.placeholder((OC, Cg, KH, KW), "int8", name="W")
    bias = te.placeholder((OC,), "int32", name="bias")
    mult = te.placeholder((OC,), "int64", name="mult")
    shift = te.placeholder((OC,), "int64", name="shift")
    in_place = pt == 0 and pl == 0 and Hx <= H and Wx <= W
    kh = te.reduce_axis((0, KH), name="kh")
    kw = te.reduce_axis((0, KW), name="kw")
    ci = te.reduce_axis((0, Cg), name="ci")
    if by_group and Cg > 1:
        # channels regrouped to (ci, g) while padding, so the lanes over g are contiguous
        Xq = _zero_pad(X, N, H, W, C, Hx, Wx, pt, pl, a_dtype, perm=(Cg, groups))

        def x_at(n, oh, ow, g):
            return Xq[n, oh * sh + kh * dh, ow * sw + kw * dw, ci * groups + g].astype("int32")
    else:
        Xp = X if in_place else _zero_pad(X, N, H, W, C, Hx, Wx, pt, pl, a_dtype)

        def x_at(n, oh, ow, g):
            return Xp[n, oh * sh + kh * dh, ow * sw + kw * dw, g * Cg + ci].astype("int32")

    if by_group:  # acc[n, oh, ow, j, g] for oc = g*OCg + j
        Wr = te.compute((KH, KW, Cg, OCg, groups), lambda a, b, i, j, g: Wt[g * OCg + j, i, a, b], name="wprep")
        acc = te.compute((N, OH, OWp, OCg, groups), lambda n, oh, ow, j, g: te.sum(
            x_at(n, oh, ow, g) * Wr[kh, kw, ci, j, g].astype("int32"), axis=[kh, kw, ci]), name="acc")
        acc_at = lambda n, oh, ow, o: acc[n, oh, ow, o % OCg, o // OCg]  # noqa: E731
    else:  # acc[n, oh, ow, g, j]
        Wr = te.compute((KH, KW, Cg, groups, OCg), lambda a, b, i, g, j: Wt[g * OCg + j, i, a, b], name="wprep")
        acc = te.compute((N, OH, OWp, groups, OCg), lambda n, oh, ow, g, j: te.sum(
            x_at(n, oh, ow, g) * Wr[kh, kw, ci, g, j].astype("int32"), axis=[kh, kw, ci]), name="acc")
        acc_at = lambda n, oh, ow, o: acc[n, oh, ow, o // OCg, o % OCg]  # noqa: E731
    out = te.compute((N, OH, OW, OC), lambda n, oh, ow, o: _requant(
        (acc_at(n, oh, ow, o) + bias[o]).astype("int64"), mult[o], shift[o], lo, hi, out_dtype), name="out")
    sch = Schedule(te.create_prim_func([X, Wt, bias, mult, shift, out]))
    wl = sch.get_loops(sch.get_sblock("wprep"))
    _parallel_if_worth(sch, sch.fuse(wl[0], wl[1]), "wprep", 16)
    _vectorize_inner(sch, wl[-1], 16)
    _schedule_direct(sch, n_red=3, tw=tw, vec=vec, has_prep=not in_place or (by_group and Cg > 1),
                     epilogue_at_columns=True)
    return _finish(sch)
