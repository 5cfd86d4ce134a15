"""AVX-512 VNNI tensor intrinsic (u8 x s8 -> s32, 16 lanes x 4-deep dot products), registered once.

    C[i] += sum_{k<4} int32(A[k]) * int32(B[i, k])     for i in 0..15
    A: uint8[4] (one 32-bit word, broadcast to all 16 lanes), B: int8[16, 4] (64 contiguous bytes),
    C: int32[16] (one zmm register)

The implementation is one ``vpdpbusd zmm`` (``llvm.x86.avx512.vpdpbusd.512``).  TVM's built-in
``dot_16x4_vnni`` (tvm/s_tir/tensor_intrin/x86.py) passes the two byte operands as ``<16 x i32>``;
the wheel's LLVM 22 declares the intrinsic ``(<16 x i32>, <64 x i8>, <64 x i8>)``, so that
intrinsic no longer builds.  This copy reinterprets both byte operands to ``int8x64``.

It is registered under a name of our own, :data:`VNNI_INTRIN`, from this module, so nothing here
imports ``tvm.s_tir.tensor_intrin`` (whose ``__init__`` takes 30-40 s).  :func:`register` is
idempotent and cheap after the first call.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_INTRIN = "qc_dot_16x4_u8i8i32_vnni"


@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


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


def register() -> str:
    """Register :data:`VNNI_INTRIN` unless it already is; return its name."""
    if TensorIntrin.get(VNNI_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc, _dot_16x4_vnni_impl)
    return VNNI_INTRIN
