"""Warp-level PTX building blocks of the CUDA integer GEMM kernels (``cuda_mma.py``).

The kernels are written directly in TIR with the table-driven ``T.ptx`` dialect of TVM 0.27
(``tvm/backend/cuda/ptx``): every instruction below is one inline-asm helper in the generated CUDA,
on ``uint32`` register arrays that nvcc keeps in registers (all indices are constants after
unrolling).  Nothing here registers a ``TensorIntrin`` and nothing imports
``tvm.s_tir.tensor_intrin`` (30-40 s to import): the kernels are not tensorized, they are written
already scheduled.

Fragment layouts (PTX ISA 9.7.16.5, "Matrix Fragments"), lane = 4 * g + c (g = lane // 4,
c = lane % 4), all integer types seen as bytes:

  mma.m16n8k32 .s8 / mma.m16n8k64 .s4 (sm_80+), per lane
    A  a0: row g,   bytes 4c..4c+3      a1: row g+8, bytes 4c..4c+3
       a2: row g,   bytes 16+4c..+3     a3: row g+8, bytes 16+4c..+3
    B  b0: col (n) g, bytes 4c..4c+3    b1: col g, bytes 16+4c..+3      (B stored [N, K])
    C  c0, c1: row g, cols 2c, 2c+1     c2, c3: row g+8, cols 2c, 2c+1
  (bytes = k for .s8; byte b holds k = 2b (low nibble), 2b+1 (high nibble) for .s4.)

  sm_75 has only the m8n8 shapes (mma.m8n8k16 .s8, mma.m8n8k32 .s4), whose A/B/C fragments are the
  8-row quarters of the ones above, so one m16n8k32 step is four m8n8k16 mma on the same
  registers:  (c0,c1) += a0*b0 + a2*b1;  (c2,c3) += a1*b0 + a3*b1.

  ldmatrix.x4 (.b16) on a [rows, bytes] shared tile: lane l gives the address of row
  (l % 16), byte column 16 * (l // 16) for A (-> a0..a3 of one m16 tile), and of row
  (l % 8) + 8 * (l // 16), byte column 16 * ((l // 8) % 2) for B (-> b0, b1 of two n8 tiles).
"""

from __future__ import annotations

from tvm.script import tirx as T

CP_ASYNC_MIN_ARCH = 80
MMA_M16_MIN_ARCH = 80


def mma_names(arch: int, a_type: str, b_type: str) -> tuple[str, int]:
    """PTX mma spelling and how many of them make one 16x8 step (1 on sm_80+, 4 on sm_75).

    a_type / b_type are PTX types: s8, u8 (8-bit kernels) or s4, u4 (4-bit kernels).
    """
    bits = 4 if a_type in ("s4", "u4") else 8
    if arch >= MMA_M16_MIN_ARCH:
        shape = "m16n8k64" if bits == 4 else "m16n8k32"
        return f"mma.sync.aligned.{shape}.row.col.s32.{a_type}.{b_type}.s32", 1
    shape = "m8n8k32" if bits == 4 else "m8n8k16"
    return f"mma.sync.aligned.{shape}.row.col.s32.{a_type}.{b_type}.s32", 4


LDMATRIX_X4 = "ldmatrix.sync.aligned.m8n8.x4.shared.b16"


def make_mma_16x8(arch: int, a_type: str, b_type: str):
    """Macro ``mma(acc, ab, af, ao, bf, bo)``: acc[ab..ab+3] += A(af[ao..ao+3]) * B(bf[bo..bo+1])."""
    name, parts = mma_names(arch, a_type, b_type)
    if parts == 1:

        @T.macro
        def mma(acc, ab, af, ao, bf, bo):
            T.ptx[name](acc[ab], acc[ab + 1], acc[ab + 2], acc[ab + 3],
                        af[ao], af[ao + 1], af[ao + 2], af[ao + 3],
                        bf[bo], bf[bo + 1],
                        acc[ab], acc[ab + 1], acc[ab + 2], acc[ab + 3])

        return mma

    @T.macro
    def mma8(acc, ab, af, ao, bf, bo):
        T.ptx[name](acc[ab], acc[ab + 1], af[ao], bf[bo], acc[ab], acc[ab + 1])
        T.ptx[name](acc[ab], acc[ab + 1], af[ao + 2], bf[bo + 1], acc[ab], acc[ab + 1])
        T.ptx[name](acc[ab + 2], acc[ab + 3], af[ao + 1], bf[bo], acc[ab + 2], acc[ab + 3])
        T.ptx[name](acc[ab + 2], acc[ab + 3], af[ao + 3], bf[bo + 1], acc[ab + 2], acc[ab + 3])

    return mma8


def cp_async_name(vec: int) -> str:
    """cp.async spelling for a ``vec``-byte copy (``.cg`` bypasses L1 and takes only 16 bytes)."""
    if vec not in (4, 8, 16):
        raise ValueError(f"cp.async copies 4, 8 or 16 bytes, not {vec}")
    return f"cp.async.{'cg' if vec == 16 else 'ca'}.shared.global"


@T.macro
def cp_async_commit():
    T.ptx["cp.async.commit_group"]()


def make_cp_async_wait(pending: int):
    @T.macro
    def wait():
        T.ptx["cp.async.wait_group"](pending)

    return wait


def unpack_w4_mma_k32(word):
    """The two int8x4 B registers (16 * value per byte) in one ``mma_k32``-packed int4 word.

    See ``int4_pack``: nibble 2i -> byte i of b0, nibble 2i+1 -> byte i of b1.  Two LOP/SHF each,
    no emulation, so the W4A8 kernel feeds plain s8 IMMA.
    """
    b0 = T.bitwise_and(T.shift_left(word, T.uint32(4)), T.uint32(0xF0F0F0F0))
    b1 = T.bitwise_and(word, T.uint32(0xF0F0F0F0))
    return b0, b1
