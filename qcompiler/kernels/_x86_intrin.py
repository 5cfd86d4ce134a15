"""x86 tensor intrinsics for the u8 x s8 -> s32 GEMM kernels, registered once each.

Both compute a block of dot products into int32 lanes, ``L`` lanes ``kp`` deep:

    C[i] += sum_{k<kp} int32(A[k]) * int32(B[i, k])     for i in 0..L-1
    A: uint8[kp] (broadcast to all lanes), B: int8[L, kp] (L*kp contiguous bytes), C: int32[L]

* AVX-512 VNNI, L = 16, kp = 4: one ``vpdpbusd zmm`` (``llvm.x86.avx512.vpdpbusd.512``).  TVM's
  built-in ``dot_16x4_vnni`` (tvm/s_tir/tensor_intrin/x86.py) passes the two byte operands as
  ``<16 x i32>``; the wheel's LLVM 22 declares the intrinsic ``(<16 x i32>, <64 x i8>, <64 x i8>)``,
  so that intrinsic no longer builds.  This copy reinterprets both byte operands to ``int8x64``.
* AVX2, L = 8, kp = 2: B's 16 bytes sign-extended to int16 (``vpmovsxbw``), A's two bytes
  zero-extended to int16 and broadcast as one 32-bit word, one ``vpmaddwd ymm``
  (``llvm.x86.avx2.pmadd.wd``: int16 x int16 products, adjacent pairs summed in int32) and one
  ``vpaddd``.  Exact: |a*b| <= 255*128 and a pair sums to at most 65280, far inside int32 (unlike
  ``vpmaddubsw``, whose int16 pair sums saturate at 255*127*2 > 32767).

Low-bit variants (same C, L lanes; the weights' unpacking is part of the described semantics, so
the kernels' TE compute calls the same helpers, :func:`w4_lo16` etc., and tensorize matches):

* W4A8, AVX-512 VNNI (``avx512vnni_w4``), L = 16, kp = 8: B is 64 bytes ``[1, 16, 4]``, byte (i, t)
  holding the weight of k = t in its low nibble and of k = 4 + t in its high nibble (two's
  complement nibbles, ``int4_pack.pack_cpu_w4``).  ``(x << 4) & 0xF0`` and ``x & 0xF0`` are the
  two s8 operands of two ``vpdpbusd``, each byte 16 * the weight (exact), so C accumulates 16x the
  dot product; the kernel shifts the sum right by 4 (exact: every term is a multiple of 16).
* W4A8, AVX2 (``avx2_w4``), L = 8, kp = 8G (G = 4): B is G blocks ``[G, 8, 4]`` of the same byte
  layout, nibbles stored biased (w + 8 = w ^ 8 in 4 bits), unpacked as ``(x & 15) - 8`` and
  ``((x >> 4) & 15) - 8``.  ``vpmaddubsw`` (u8 x s8, adjacent pairs summed to int16, saturating)
  is exact here: |pair| <= 2 * 255 * 8 = 4080; the 2G = 8 int16 results are summed in int16
  (|sum| <= 8 * 4080 = 32640 < 2^15) and widened once by ``vpmaddwd`` with ones (pairs to int32).
* W8A16 (int16 activations, int8 weights), AVX-512 VNNI (``avx512vnni_a16``), L = 16, kp = 2:
  ``vpdpwssd`` (s16 x s16 pairs into int32) with B's 32 bytes sign-extended (``vpmovsxbw``);
  AVX2 (``avx2_a16``), L = 8, kp = 2: ``vpmaddwd`` + ``vpaddd``.  Exact: |a*b| <= 2^15 * 2^7, a pair
  <= 2^23; int32 sums wrap modulo 2^32 and are exact whenever the true sum is an int32 (the
  kernel contract).

Lane-wise (no broadcast), for the depthwise kernel (``cpu_vnni.depthwise_conv2d_taps``):

* ``avx512vnni_lanes``, L = 16, kp = 4: ``C[i] += sum_{k<4} byte_k(A[i]) * B[i, k]`` with A uint32[16]
  (each word 4 unsigned bytes, little endian: :func:`word_byte`) and B int8[16, 4]: one ``vpdpbusd
  zmm`` reading A as its 64 bytes.  Every lane has its own 4 activation bytes (4 kernel rows of one
  channel), so the 16 lanes are 16 independent channels.  ``avx512vnni_lanes8``: the same on 8 lanes,
  one ``vpdpbusd ymm`` (AVX512-VL), for channel counts that are multiples of 8 but not of 16.
* ``avx2_lanes``, L = 8, kp = 2: ``C[i] += sum_{k<2} half_k(A[i]) * B[i, k]`` with A uint32[8] (each
  word two int16, :func:`word_half`) and B int8[8, 2] sign-extended (``vpmovsxbw``): one ``vpmaddwd
  ymm`` + ``vpaddd``.  Exact: |a| <= 255, |b| <= 128, a pair sums to at most 2 * 255 * 128.
* ``avx512vnni_lanes_i16`` / ``avx512vnni_lanes8_i16``, L = 16 / 8, kp = 2: the same sum over the
  two int16 halves (int16 inputs, W8A16 layers) in one ``vpdpwssd`` zmm / ymm (AVX512-VNNI,
  -VL).  Exact: a pair sums to at most 2 * 32768 * 128 = 2^23.

They are registered under names of our own (:data:`INTRIN`), from this module, so nothing here
imports ``tvm.s_tir.tensor_intrin`` (whose ``__init__`` takes 30-40 s).  :func:`register` is
idempotent and cheap after the first call.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

INTRIN = {"avx512vnni": "qc_dot_16x4_u8i8i32_vnni", "avx2": "qc_dot_8x2_u8i8i32_avx2",
          "avx512vnni_w4": "qc_dot_16x8_u8i4i32_vnni", "avx2_w4": "qc_dot_8x32_u8i4i32_avx2",
          "avx512vnni_a16": "qc_dot_16x2_i16i8i32_vnni", "avx2_a16": "qc_dot_8x2_i16i8i32_avx2",
          "avx512vnni_lanes": "qc_dot_16x4_u8wi8i32_vnni", "avx512vnni_lanes8": "qc_dot_8x4_u8wi8i32_vnni",
          "avx2_lanes": "qc_dot_8x2_i16wi8i32_avx2", "avx512vnni_lanes_i16": "qc_dot_16x2_i16wi8i32_vnni",
          "avx512vnni_lanes8_i16": "qc_dot_8x2_i16wi8i32_vnni"}
from ._tvmscript import TS  # noqa: E402
from .backends.avx2_w4a8 import AVX2_W4_GROUPS  # noqa: E402  (G of ``avx2_w4``)


# ---- nibble unpacking (the semantics the W4 intrinsics and the W4 TE computes share) -------------
def w4_lo16(x):
    """16 * the signed low nibble of the uint8 ``x``, as int32 (two's complement nibbles)."""
    return (((T.Cast("int32", x) << 4) & 240) ^ 128) - 128


def w4_hi16(x):
    """16 * the signed high nibble of the uint8 ``x``, as int32."""
    return ((T.Cast("int32", x) & 240) ^ 128) - 128


def w4_lo_b(x):
    """The low nibble of ``x`` stored biased (w + 8), as the int32 w."""
    return (T.Cast("int32", x) & 15) - 8


def w4_hi_b(x):
    """The high nibble of ``x`` stored biased, as the int32 w."""
    return ((T.Cast("int32", x) >> 4) & 15) - 8


def _dot_desc(L: int, kp: int, a_dtype: str = "uint8"):
    """The semantics the 8-bit-weight intrinsics implement: ``L`` int32 lanes of ``kp``-deep
    ``a_dtype`` x s8 dot products (u8 activations; int16 for the W8A16 ones)."""

    @TS.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((kp,), a_dtype, offset_factor=1),
        B: T.Buffer((L, kp), "int8", offset_factor=1),
        C: T.Buffer((L,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], A[0:kp], B[0:L, 0:kp])
            T.writes(C[0:L])
            for i in T.serial(0, L):
                for k in T.serial(0, kp):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


@TS.prim_func(s_tir=True)
def _dot_16x4_vnni_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # one expression: in TVM 0.27 a named temporary (``x = ...``) in TVMScript becomes a local
        # buffer, which LowerTVMBuiltin turns into a TVMBackendAllocWorkspace call per use
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="int8x64"),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


@TS.prim_func(s_tir=True)
def _dot_8x2_avx2_impl(
    A: T.Buffer((2,), "uint8", offset_factor=1),
    B: T.Buffer((8, 2), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.Cast("int16x16", B.vload([0, 0], dtype="int8x16")),
            T.reinterpret(T.broadcast(T.reinterpret(T.Cast("int16x2", A.vload([0], "uint8x2")), dtype="int32"), 8),
                          dtype="int16x16"),
            dtype="int32x8",
        )


def _w4_desc(L: int, G: int, lo, hi):
    """C[i] += sum_{g<G, t<4} A[8g+t] * lo(B[g,i,t]) + A[8g+4+t] * hi(B[g,i,t])  (kp = 8G; for G = 1 no
    g loop: TVM drops a unit reduction axis from the kernels' compute, see ``cpu_vnni.w4_axes``)."""
    if G == 1:

        @TS.prim_func(s_tir=True)
        def desc1(
            A: T.Buffer((8,), "uint8", offset_factor=1),
            B: T.Buffer((1, L, 4), "uint8", offset_factor=1),
            C: T.Buffer((L,), "int32", offset_factor=1),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:8], B[0:1, 0:L, 0:4])
                T.writes(C[0:L])
                for i in T.serial(0, L):
                    for t in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vt = T.axis.remap("SR", [i, t])
                            C[vi] = C[vi] + (T.Cast("int32", A[vt]) * lo(B[0, vi, vt])
                                             + T.Cast("int32", A[vt + 4]) * hi(B[0, vi, vt]))

        return desc1

    @TS.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((8 * G,), "uint8", offset_factor=1),
        B: T.Buffer((G, L, 4), "uint8", offset_factor=1),
        C: T.Buffer((L,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], A[0:8 * G], B[0:G, 0:L, 0:4])
            T.writes(C[0:L])
            for i in T.serial(0, L):
                for g in T.serial(0, G):
                    for t in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vg, vt = T.axis.remap("SRR", [i, g, t])
                            C[vi] = C[vi] + (T.Cast("int32", A[vg * 8 + vt]) * lo(B[vg, vi, vt])
                                             + T.Cast("int32", A[vg * 8 + 4 + vt]) * hi(B[vg, vi, vt]))

    return desc


def _bcast4(A, off: int, n: int, dtype: str):
    """Bytes A[off:off+4] as one 32-bit word broadcast to ``n`` words, reinterpreted as ``dtype``."""
    return T.reinterpret(T.broadcast(T.reinterpret(A.vload([off], "uint8x4"), dtype="int32"), n), dtype=dtype)


def _vnni_w4_expr(A, B, C):
    x = B.vload([0, 0, 0], dtype="uint8x64")
    lo = T.reinterpret((x << T.broadcast(T.uint8(4), 64)) & T.broadcast(T.uint8(240), 64), dtype="int8x64")
    hi = T.reinterpret(x & T.broadcast(T.uint8(240), 64), dtype="int8x64")
    dp = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512")
    c = T.call_llvm_pure_intrin(dp, C.vload([0], dtype="int32x16"), _bcast4(A, 0, 16, "int8x64"), lo,
                                dtype="int32x16")
    return T.call_llvm_pure_intrin(dp, c, _bcast4(A, 4, 16, "int8x64"), hi, dtype="int32x16")


@TS.prim_func(s_tir=True)
def _dot_16x8_w4_vnni_impl(
    A: T.Buffer((8,), "uint8", offset_factor=1),
    B: T.Buffer((1, 16, 4), "uint8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:8], B[0:1, 0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = _vnni_w4_expr(A, B, C)


def _avx2_w4_expr(A, B, C, G: int):
    mub = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw")
    s = None
    for g in range(G):
        x = B.vload([g, 0, 0], dtype="uint8x32")
        lo = T.reinterpret(x & T.broadcast(T.uint8(15), 32), dtype="int8x32") - T.broadcast(T.int8(8), 32)
        hi = T.reinterpret((x >> T.broadcast(T.uint8(4), 32)) & T.broadcast(T.uint8(15), 32),
                           dtype="int8x32") - T.broadcast(T.int8(8), 32)
        for off, w in ((8 * g, lo), (8 * g + 4, hi)):
            p = T.call_llvm_pure_intrin(mub, _bcast4(A, off, 8, "int8x32"), w, dtype="int16x16")
            s = p if s is None else s + p
    wd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
    return C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(wd, s, T.broadcast(T.int16(1), 16),
                                                                    dtype="int32x8")


G_ = AVX2_W4_GROUPS


@TS.prim_func(s_tir=True)
def _dot_8x32_w4_avx2_impl(
    A: T.Buffer((8 * G_,), "uint8", offset_factor=1),
    B: T.Buffer((G_, 8, 4), "uint8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:8 * G_], B[0:G_, 0:8, 0:4])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] = _avx2_w4_expr(A, B, C, G_)


@TS.prim_func(s_tir=True)
def _dot_16x2_a16_vnni_impl(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((16, 2), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpwssd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 16), dtype="int16x32"),
            T.Cast("int16x32", B.vload([0, 0], dtype="int8x32")),
            dtype="int32x16",
        )


@TS.prim_func(s_tir=True)
def _dot_8x2_a16_avx2_impl(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((8, 2), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.Cast("int16x16", B.vload([0, 0], dtype="int8x16")),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8), dtype="int16x16"),
            dtype="int32x8",
        )


def word_half(a, k):
    """Half ``k`` (0 = least significant) of the uint32 word ``a``, as a signed int16 value in int32."""
    return T.Cast("int32", T.Cast("int16", (a >> T.Cast("uint32", k * 16)) & T.uint32(65535)))


def word_byte(a, k):
    """Byte ``k`` (0 = least significant) of the uint32 word ``a``, as int32 (the unsigned operand)."""
    return T.Cast("int32", (a >> T.Cast("uint32", k * 8)) & T.uint32(255))


def _dot_lanes_desc_of(L: int, P: int = 4):
    """C[i] += sum_{k<P} part_k(A[i]) * B[i, k] on ``L`` lanes (the lane-wise intrinsics): the P = 4
    unsigned bytes of each word (:func:`word_byte`) or its P = 2 int16 halves (:func:`word_half`)."""
    part = word_byte if P == 4 else word_half

    @TS.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((L,), "uint32", offset_factor=1),
        B: T.Buffer((L, P), "int8", offset_factor=1),
        C: T.Buffer((L,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], A[0:L], B[0:L, 0:P])
            T.writes(C[0:L])
            for i in T.serial(0, L):
                for k in T.serial(0, P):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + part(A[vi], vk) * T.Cast("int32", B[vi, vk])

    return desc


def _lanes_b(B, L: int, P: int):
    """B's L x P weights as the operand of ``vpdpbusd`` (P = 4: the bytes) or ``vpdpwssd`` (P = 2:
    sign-extended to int16)."""
    v = B.vload([0, 0], dtype=f"int8x{P * L}")
    return v if P == 4 else T.Cast(f"int16x{2 * L}", v)


def _dot_lanes_vnni_impl_of(L: int, P: int = 4):
    """``vpdpbusd`` (P = 4: A's words as the unsigned bytes) or ``vpdpwssd`` (P = 2: as int16 pairs)
    on ``L`` int32 lanes (16: zmm, 8: ymm)."""
    intrin = f"llvm.x86.avx512.{'vpdpbusd' if P == 4 else 'vpdpwssd'}.{32 * L}"
    a_dt = f"int8x{4 * L}" if P == 4 else f"int16x{2 * L}"

    @TS.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((L,), "uint32", offset_factor=1),
        B: T.Buffer((L, P), "int8", offset_factor=1),
        C: T.Buffer((L,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], A[0:L], B[0:L, 0:P])
            T.writes(C[0:L])
            C[T.ramp(T.int32(0), 1, L)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrin),
                C.vload([0], dtype=f"int32x{L}"),
                T.reinterpret(A.vload([0], dtype=f"uint32x{L}"), dtype=a_dt),
                _lanes_b(B, L, P),
                dtype=f"int32x{L}",
            )

    return impl


@TS.prim_func(s_tir=True)
def _dot_lanes_avx2_impl(
    A: T.Buffer((8,), "uint32", offset_factor=1),
    B: T.Buffer((8, 2), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:8], B[0:8, 0:2])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.reinterpret(A.vload([0], dtype="uint32x8"), dtype="int16x16"),
            T.Cast("int16x16", B.vload([0, 0], dtype="int8x16")),
            dtype="int32x8",
        )


_DEFS = {
    "avx512vnni": (lambda: _dot_desc(16, 4), _dot_16x4_vnni_impl),
    "avx2": (lambda: _dot_desc(8, 2), _dot_8x2_avx2_impl),
    "avx512vnni_w4": (lambda: _w4_desc(16, 1, w4_lo16, w4_hi16), _dot_16x8_w4_vnni_impl),
    "avx2_w4": (lambda: _w4_desc(8, AVX2_W4_GROUPS, w4_lo_b, w4_hi_b), _dot_8x32_w4_avx2_impl),
    "avx512vnni_a16": (lambda: _dot_desc(16, 2, "int16"), _dot_16x2_a16_vnni_impl),
    "avx2_a16": (lambda: _dot_desc(8, 2, "int16"), _dot_8x2_a16_avx2_impl),
    "avx512vnni_lanes": (lambda: _dot_lanes_desc_of(16), _dot_lanes_vnni_impl_of(16)),
    "avx512vnni_lanes8": (lambda: _dot_lanes_desc_of(8), _dot_lanes_vnni_impl_of(8)),
    "avx2_lanes": (lambda: _dot_lanes_desc_of(8, 2), _dot_lanes_avx2_impl),
    "avx512vnni_lanes_i16": (lambda: _dot_lanes_desc_of(16, 2), _dot_lanes_vnni_impl_of(16, 2)),
    "avx512vnni_lanes8_i16": (lambda: _dot_lanes_desc_of(8, 2), _dot_lanes_vnni_impl_of(8, 2)),
}


def register(isa: str = "avx512vnni") -> str:
    """Register the intrinsic of ``isa`` (a key of :data:`INTRIN`) unless it already is; return its name."""
    name = INTRIN[isa]
    if TensorIntrin.get(name, allow_missing=True) is None:
        desc, impl = _DEFS[isa]
        TensorIntrin.register(name, desc(), impl)
    return name


# ---- depthwise requantization epilogue on int32 lanes (``cpu_vnni.depthwise_conv2d_taps``) ----------
def dw_requant(a, b, mf, s2, rc, mult, shift, lo: int, hi: int, out_dtype: str):
    """One output of the depthwise epilogue from the int32 accumulator ``a`` (the semantics of
    :func:`register_dw_requant`, also the kernel's TE compute): where ``s2 >= 0`` (the fast form)

        clip(int32((int64(a) * mf + b) >> 32) >> s2, lo, hi)

    else the int64 form ``clip((int64(a) * mult + rc) >> shift, lo, hi)``.  All parameters int64
    (``cpu_vnni.pack_depthwise_taps`` makes the two equal, bit for bit, and ``mf`` an int32 value)."""
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731
    fast = ((tirx.Cast("int64", a) * mf + b) >> i64(32)).astype("int32") >> s2.astype("int32")
    fast = tirx.max(tirx.min(fast, tirx.const(hi, "int32")), tirx.const(lo, "int32")).astype(out_dtype)
    slow = (tirx.Cast("int64", a) * tirx.Cast("int64", tirx.Cast("int32", mult)) + rc) >> shift
    slow = tirx.max(tirx.min(slow, i64(hi)), i64(lo)).astype(out_dtype)
    return tirx.if_then_else(s2 >= i64(0), fast, slow)


def _dw_fast_vec(A, R, lo: int, hi: int, out_dtype: str, L: int):
    """:func:`dw_requant`'s fast form on ``L`` lanes: the 64-bit products of the even and of the odd
    lanes (``vpmuldq``: int32 x int32 -> int64 of the low dwords, the odd accumulators shifted down
    by 32 first), plus ``b`` (two L/2 x int64 halves, de-interleaved by a shuffle of one load), the
    high dwords gathered back in lane order by one two-source shuffle (``vpermt2d``), then L-lane
    int32 ops: the variable shift ``s2`` (``vpsravd``), the clip and the narrowing (``vpmovsdb``).
    The parameter loads and shuffles are loop-invariant: LLVM hoists them out of a tile's columns."""
    H = L // 2

    def half(x, parity):
        return tirx.Shuffle([x], [tirx.const(i, "int32") for i in range(parity, L, 2)])

    c32 = tirx.Broadcast(tirx.const(32, "int64"), H)
    a64 = tirx.reinterpret(f"int64x{H}", A.vload([0], dtype=f"int32x{L}"))
    b, mf = R.vload([0, 0], dtype=f"int64x{L}"), R.vload([1, 0], dtype=f"int64x{L}")
    sx = lambda v: tirx.Cast(f"int64x{H}", tirx.Cast(f"int32x{H}", v))  # noqa: E731  (int32 values: vpmuldq)
    even = ((a64 << c32) >> c32) * sx(half(mf, 0)) + half(b, 0)
    odd = (a64 >> c32) * sx(half(mf, 1)) + half(b, 1)
    # lane 2j: dword 2j + 1 (the high one) of the even products, lane 2j + 1: that of the odd ones
    hi32 = tirx.Shuffle([tirx.reinterpret(f"int32x{L}", even), tirx.reinterpret(f"int32x{L}", odd)],
                        [tirx.const(i + 1 + (L - 1) * (i % 2), "int32") for i in range(L)])
    y = hi32 >> tirx.Cast(f"int32x{L}", R.vload([2, 0], dtype=f"int64x{L}"))
    y = tirx.max(tirx.min(y, tirx.Broadcast(tirx.const(hi, "int32"), L)), tirx.Broadcast(tirx.const(lo, "int32"), L))
    return tirx.Cast(f"{out_dtype}x{L}", y)


def _dw_slow_vec(A, R, M, S, lo: int, hi: int, out_dtype: str, L: int):
    """:func:`dw_requant`'s int64 form on ``L`` lanes (what the vectorized TE compute gives)."""
    x = (tirx.Cast(f"int64x{L}", A.vload([0], dtype=f"int32x{L}"))
         * tirx.Cast(f"int64x{L}", tirx.Cast(f"int32x{L}", M.vload([0], dtype=f"int64x{L}")))
         + R.vload([3, 0], dtype=f"int64x{L}"))
    y = x >> S.vload([0], dtype=f"int64x{L}")
    y = tirx.max(tirx.min(y, tirx.Broadcast(tirx.const(hi, "int64"), L)), tirx.Broadcast(tirx.const(lo, "int64"), L))
    return tirx.Cast(f"{out_dtype}x{L}", y)


def register_dw_requant(lo: int, hi: int, out_dtype: str, L: int = 16) -> str:
    """The ``L``-lane depthwise epilogue ``O[i] = dw_requant(A[i], R[0, i], R[1, i], R[2, i], R[3, i],
    M[i], S[i])`` (:func:`dw_requant`) for one output range, registered once; returns its name.

    R is the [4, L] slice of ``cpu_vnni.pack_depthwise_taps``'s [4, C] parameters for L channels
    (b, mf, s2, rc rows), M / S the multipliers / shifts.  The implementation branches once on
    ``R[2, 0] >= 0``: the packing gives the L channels of a group one form (``s2 >= 0`` for all, or
    ``-1`` for all), so the branch is the lane-wise selection of the semantics (LLVM unswitches it
    out of a tile's columns).  Fast form (:func:`_dw_fast_vec`): 2 ``vpmuldq`` + 2 ``vpaddq`` on
    the 64-bit products and L-lane int32 ops after one shuffle, against the 64-bit shifts, clips and
    narrowings of both halves of the int64 form (on AVX2, without ``vpsravq`` / ``vpminsq``,
    emulated)."""
    name = f"qc_dw_requant{L}_{out_dtype}_{lo}_{hi}".replace("-", "m")
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @TS.prim_func(s_tir=True)
    def desc(r: T.handle, a: T.handle, m: T.handle, s: T.handle, o: T.handle) -> None:
        rs = T.int32()
        R = T.match_buffer(r, (4, L), "int64", offset_factor=1, strides=[rs, 1])
        A = T.match_buffer(a, (L,), "int32", offset_factor=1)
        M = T.match_buffer(m, (L,), "int64", offset_factor=1)
        S = T.match_buffer(s, (L,), "int64", offset_factor=1)
        O = T.match_buffer(o, (L,), out_dtype, offset_factor=1)
        with T.sblock("root"):
            T.reads(R[0:4, 0:L], A[0:L], M[0:L], S[0:L])
            T.writes(O[0:L])
            for i in T.serial(0, L):
                with T.sblock("update"):
                    vi = T.axis.remap("S", [i])
                    O[vi] = dw_requant(A[vi], R[0, vi], R[1, vi], R[2, vi], R[3, vi], M[vi], S[vi], lo, hi, out_dtype)

    @TS.prim_func(s_tir=True)
    def impl(r: T.handle, a: T.handle, m: T.handle, s: T.handle, o: T.handle) -> None:
        rs = T.int32()
        R = T.match_buffer(r, (4, L), "int64", offset_factor=1, strides=[rs, 1])
        A = T.match_buffer(a, (L,), "int32", offset_factor=1)
        M = T.match_buffer(m, (L,), "int64", offset_factor=1)
        S = T.match_buffer(s, (L,), "int64", offset_factor=1)
        O = T.match_buffer(o, (L,), out_dtype, offset_factor=1)
        with T.sblock("root"):
            T.reads(R[0:4, 0:L], A[0:L], M[0:L], S[0:L])
            T.writes(O[0:L])
            if R[2, 0] >= T.int64(0):
                O[T.ramp(T.int32(0), 1, L)] = _dw_fast_vec(A, R, lo, hi, out_dtype, L)
            else:
                O[T.ramp(T.int32(0), 1, L)] = _dw_slow_vec(A, R, M, S, lo, hi, out_dtype, L)

    TensorIntrin.register(name, desc, impl)
    return name
