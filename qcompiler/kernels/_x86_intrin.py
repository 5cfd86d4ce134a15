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

They are registered under names of our own (:data:`INTRIN`), from this module, so nothing here
imports ``tvm.s_tir.tensor_intrin`` (whose ``__init__`` takes 30-40 s).  :func:`register` is
idempotent and cheap after the first call.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

INTRIN = {"avx512vnni": "qc_dot_16x4_u8i8i32_vnni", "avx2": "qc_dot_8x2_u8i8i32_avx2"}


def _dot_desc(L: int, kp: int):
    """The semantics both intrinsics implement: ``L`` int32 lanes of ``kp``-deep u8 x s8 dot products."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((kp,), "uint8", offset_factor=1),
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


@T.prim_func(s_tir=True)
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


@T.prim_func(s_tir=True)
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


_DEFS = {"avx512vnni": ((16, 4), _dot_16x4_vnni_impl), "avx2": ((8, 2), _dot_8x2_avx2_impl)}


def register(isa: str = "avx512vnni") -> str:
    """Register the intrinsic of ``isa`` (a key of :data:`INTRIN`) unless it already is; return its name."""
    name = INTRIN[isa]
    if TensorIntrin.get(name, allow_missing=True) is None:
        shape, impl = _DEFS[isa]
        TensorIntrin.register(name, _dot_desc(*shape), impl)
    return name
