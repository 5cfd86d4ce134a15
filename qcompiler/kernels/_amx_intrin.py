"""Intel AMX tensor intrinsic of the INT8 GEMM kernels (``qcompiler/kernels/cpu_amx.py``).

One call computes an ``16 mt x 16 nt`` int32 block of C over a reduction of ``64 q``:

    C[i, j] += sum_{k < 64 q} int32(A[i, k]) * int32(B[j // 16, k // 4, j % 16, k % 4])
    A: uint8 [16 mt, 64 q] (row stride free), B: int8 [nt, 16 q, 16, 4] (the VNNI weight layout of
    ``cpu_vnni._pack_kn``), C: int32 [16 mt, 16 nt] (row stride free, a ``local`` tile buffer)

with ``TDPBUSD`` (u8 x s8 products, 4-deep dot products into each int32 of a 16 x 16 tile).  The
implementation loads the C tiles into tile registers 0 .. mt*nt - 1 once, then per 64-deep step
loads mt A tiles (the next mt registers: 16 rows x 64 bytes at A's row stride) and nt B tiles (the
last nt: 16 rows of 64 bytes, contiguous: the 16 x 4 words of 16 columns for 16 groups of 4 reduction steps) and
issues mt x nt ``tdpbusd``; it stores the C tiles back at the end.  So mt * nt + mt + nt <= 8
tile registers: the shapes (1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1).

Tile configuration.  AMX needs a tile configuration (``LDTILECFG``: palette 1, each register 16 rows
of 64 bytes) in the executing thread; it is per thread and a TVM parallel loop runs its chunks on
pool threads, so every call loads it (~150 cycles, measured on a 2-core Sapphire-Rapids-class VM:
against 16 cycles per ``tdpbusd``, amortised over the ``mt nt q`` of the call; ``cpu_amx`` makes
the call cover the whole reduction).  Linux also needs the process to ask for the AMX state once
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); the kernels do it on entry
(:func:`request_permission_stmt`, a cheap syscall), so a library runs under a bare TVM runtime.

Measured on that machine (``benchmarks/cpu_kernels.py``): ``tdpbusd`` from registers 6.2 TOPS per
core (16 cycles per instruction at ~3.3 GHz); with operands streamed from L2, ~100 cycles per 2x2
step instead of 64.  The intrinsics are registered under names of our own, per (mt, nt, q).
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from qcompiler.targets import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL, XFEATURE_XTILEDATA

from ._tvmscript import TS

SHAPES = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))


def _tile_regs(mt: int, nt: int) -> None:
    if (mt, nt) not in SHAPES:
        raise ValueError(f"AMX block {mt}x{nt} tiles does not fit 8 tile registers; use one of {SHAPES}")


def name(mt: int, nt: int, q: int) -> str:
    return f"qc_amx_tdpbusd_{mt}x{nt}x{q}"


def register_zero(mt: int, nt: int, ng: int = 1) -> str:
    """The init of a block whose one update call starts from zero tiles (``register(..., zero=True)``):
    C = 0 described, nothing done (the update's ``tilezero`` is the init)."""
    MR, NR = 16 * mt, 16 * nt * ng
    nm = f"qc_amx_zero_{mt}x{nt}" + (f"_g{ng}" if ng > 1 else "")
    if TensorIntrin.get(nm, allow_missing=True) is not None:
        return nm

    @TS.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        sc = T.int32()
        C = T.match_buffer(c, (MR, NR), "int32", strides=(sc, 1), offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:MR, 0:NR])
            for i, j in T.grid(MR, NR):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = T.int32(0)

    @TS.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        sc = T.int32()
        C = T.match_buffer(c, (MR, NR), "int32", strides=(sc, 1), offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:MR, 0:NR])
            T.evaluate(0)

    TensorIntrin.register(nm, desc, impl)
    return nm


def register(mt: int, nt: int, q: int, zero: bool = False, ng: int = 1) -> str:
    """Register the (mt, nt, q) intrinsic unless it already is; return its name.  ``zero``: the C tiles
    start from ``tilezero``, not from memory -- only for the one call of a block that covers its whole
    reduction, after the no-op init of :func:`register_zero` (together: C = A B).  ``ng`` > 1 (with
    ``zero``): the call computes ``ng`` column blocks of 16 nt one after the other (C is
    [16 mt, 16 nt ng], B [nt ng, ...]), loading the tile configuration once for all of them."""
    _tile_regs(mt, nt)
    if ng > 1 and not zero:
        raise ValueError("several column blocks per AMX call need the zero-start form")
    nm = name(mt, nt, q) + ("_z" if zero else "") + (f"_g{ng}" if ng > 1 else "")
    if TensorIntrin.get(nm, allow_missing=True) is not None:
        return nm
    MR, NR, KC, KQ = 16 * mt, 16 * nt * ng, 64 * q, 16 * q
    NT = nt * ng
    _A0, _B0 = mt * nt, mt * nt + mt  # tile registers: C 0 .. mt*nt - 1, then the A tiles, then B

    @TS.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (MR, KC), "uint8", strides=(sa, 1), offset_factor=1)
        B = T.match_buffer(b, (NT, KQ, 16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (MR, NR), "int32", strides=(sc, 1), offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:MR, 0:NR], A[0:MR, 0:KC], B[0:NT, 0:KQ, 0:16, 0:4])
            T.writes(C[0:MR, 0:NR])
            for i, j, k in T.grid(MR, NR, KC):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(
                        B[vj // 16, vk // 4, vj % 16, vk % 4], "int32")

    @TS.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sc = T.int32()
        A = T.match_buffer(a, (MR, KC), "uint8", strides=(sa, 1), offset_factor=1)
        B = T.match_buffer(b, (NT, KQ, 16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (MR, NR), "int32", strides=(sc, 1), offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:MR, 0:NR], A[0:MR, 0:KC], B[0:NT, 0:KQ, 0:16, 0:4])
            T.writes(C[0:MR, 0:NR])
            # palette 1; registers 0..7: 16 rows of 64 bytes (bytes 16..31: colsb, 48..55: rows)
            cfg = T.alloc_buffer((16,), "int32", scope="local")
            for w in T.unroll(16):
                cfg[w] = T.if_then_else(w == 0, 1, T.if_then_else(
                    4 <= w and w < 8, 64 | (64 << 16), T.if_then_else(12 <= w and w < 14, 0x10101010, 0)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))
            for jg in range(ng):
                for ti in T.unroll(mt):
                    for tj in T.unroll(nt):
                        if zero:
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(ti * nt + tj)))
                        else:
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(ti * nt + tj),
                                                          T.address_of(C[ti * 16, tj * 16]), T.int64(sc * 4)))
                for kb in range(q):
                    # A tile, then (first row of tiles only) its B tiles, each tdpbusd right after its operands
                    for ti in T.unroll(mt):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(_A0 + ti),
                                                      T.address_of(A[ti * 16, kb * 64]), T.int64(sa)))
                        for tj in T.unroll(nt):
                            if ti == 0:
                                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(_B0 + tj),
                                                              T.address_of(B[jg * nt + tj, kb * 16, 0, 0]),
                                                              T.int64(64)))
                            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(ti * nt + tj),
                                                          T.int8(_A0 + ti), T.int8(_B0 + tj)))
                for ti in T.unroll(mt):
                    for tj in T.unroll(nt):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(ti * nt + tj),
                                                      T.address_of(C[ti * 16, jg * NR // ng + tj * 16]),
                                                      T.int64(sc * 4)))

    TensorIntrin.register(nm, desc, impl)
    return nm


def request_permission_stmt() -> tirx.Stmt:
    """``syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``: the process may use the
    AMX tile data (Linux >= 5.16; a no-op once granted).  Its result is not checked here:
    ``qcompiler.targets.host_amx_usable`` asked the same at compile time."""
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731
    return tirx.Evaluate(tirx.call_extern("int64", "syscall", i64(SYS_ARCH_PRCTL), i64(ARCH_REQ_XCOMP_PERM),
                                          i64(XFEATURE_XTILEDATA)))
