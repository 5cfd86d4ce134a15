"""The register-tile model of the x86 GEMM kernels, shared by the kernels, the tuner and the cost
model (TVM-free: ``costmodel/features.py`` imports it without TVM).

An x86 GEMM backend (``qcompiler/kernels/backends/``) runs an ``mr x (L nr)`` int32 register tile,
the reduction outside it and one tensor intrinsic innermost that adds ``kpack`` reduction steps
into ``L`` int32 lanes (``qcompiler/kernels/_x86_intrin.py``).  :class:`Isa` describes one such
intrinsic (lanes, depth, registers, the operand formats) and the cost of one ``kpack``-deep step of
the tile; everything below (tiles, cycles, the default tile) is computed from it alone, so a new
ISA or bit width declares one :class:`Isa` in its backend module and nothing here changes.

Cycles of one ``kpack``-deep step of an ``mr x nr`` tile (``Isa.step_cycles``):

    "max" (a dot-product instruction, VNNI):  max(mul*mr*nr, a*mr + w*nr) + 0.5
    "sum" (a multiply + an add per accumulator, AVX2):  mul*mr*nr + a*mr + w*nr + 0.5

(mul: multiply instructions per accumulator and step over their issue rate; a, w: the operand
instructions per row (broadcasts) and per column block (loads, widening, nibble unpacking)).  Per
tile add the epilogue (~2 cycles per L outputs) and a fixed 40; a tile of 1024 bytes or more of
accumulators is not a stack buffer for TVM (LowerTVMBuiltin's kMaxStackAlloca) but one
TVMBackendAllocWorkspace call per tile, charged 300 cycles.  (The INT8 coefficients were fitted on
VNNI: 3x4 and 7x2 tiles beat 6x4 by 3-8% at K >= 512 and by 20-30% at K = 64; see
``cpu_vnni.default_config``.)
"""

from __future__ import annotations

from dataclasses import dataclass


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Isa:
    """The x86 vector ISA / operand format a GEMM kernel is generated for.

    name      key of ``_x86_intrin.INTRIN`` (the tensor intrinsic)
    backend   the tuning workloads' backend name (records of different backends never mix)
    lanes     int32 accumulator lanes of one intrinsic call = output columns per block (L)
    kpack     reduction steps of one intrinsic call (kp)
    vregs     vector registers (the register tile must fit)
    vbytes    bytes per vector register (vectorized copies)
    a_dtypes  activation dtypes the kernels take
    a_operand the dtype the intrinsic reads the activations as: "uint8" (int8 inputs offset by +128,
              corrected in the bias, cpu_vnni's module docstring) or "int16" (as they are)
    w_bits    weight bits (8: int8 bytes; 4: nibbles, ``int4_pack.pack_cpu_w4``)
    kround    the reduction (a conv's channels per tap) is padded to a multiple of this
    acc_shift the intrinsic accumulates ``2^acc_shift`` x the dot products (the epilogue shifts back)
    workspace_cycles  the charge per tile of >= 1 KiB of accumulators (a workspace call, not a stack buffer)
    step      "max" | "sum" and (mul, a, w): the step model of the module docstring
    """

    name: str
    backend: str
    lanes: int
    kpack: int
    vregs: int
    vbytes: int
    a_dtypes: tuple = ("int8", "uint8")
    a_operand: str = "uint8"
    w_bits: int = 8
    kround: int = 4
    acc_shift: int = 0
    workspace_cycles: int = 300
    step: tuple = ("max", 0.5, 0.5, 0.5)

    def intrin(self) -> str:
        """Register the tensor intrinsic (needs TVM) and return its name."""
        from ._x86_intrin import register

        return register(self.name)

    def fits(self, mr: int, nr: int) -> bool:
        """mr x nr accumulators + nr weight vectors + one activation broadcast fit in the registers."""
        return mr * nr + nr + 1 <= self.vregs

    def step_cycles(self, mr: int, nr: int) -> float:
        kind, mul, a, w = self.step
        if kind == "max":
            return max(mul * mr * nr, a * mr + w * nr) + 0.5
        return mul * mr * nr + a * mr + w * nr + 0.5

    def red_steps(self, K: int) -> int:
        """Intrinsic calls along a reduction of K (as the model has always counted them: K over
        ``kpack``, rounded up; callers pass a conv's K with its channels already padded)."""
        return ceil_div(K, self.kpack)


def n_tiles(M: int, N: int, mr: int, nr: int, isa: Isa, batch: int = 1) -> int:
    """Register tiles (iterations of the parallel tile loop) of an ``mr x nr`` tiling (a tile wider
    than N, which no kernel accepts, counts as one column of tiles)."""
    return batch * ceil_div(M, mr) * max(1, ceil_div(N, isa.lanes) // nr)


def tile_cost(M: int, N: int, K: int, mr: int, nr: int, isa: Isa, units: int = 1,
              batch: int = 1) -> tuple[float, float, float, int]:
    """(cycles on ``units`` cores: whole tiles split over them, cycles of one tile, cycles of one
    ``kpack``-deep step, tiles) of an ``mr x nr`` tile."""
    step = isa.step_cycles(mr, nr)
    ws = isa.workspace_cycles if mr * nr * isa.lanes * 4 >= 1024 else 0
    per_tile = isa.red_steps(K) * step + 2 * mr * nr + 40 + ws
    tiles = n_tiles(M, N, mr, nr, isa, batch)
    return per_tile * ceil_div(tiles, max(1, units)), per_tile, step, tiles


def default_tiles(N: int, isa: Isa):
    """The (mr, nr) candidates of the default config: at most 16 accumulators, mr <= 8, nr <= 4
    (2x8 and 14x2 ran 20-50% slower on VNNI); a wider nr only when ceil(N/L) has no divisor in
    2..4 (e.g. N = 80, 112 at L = 16)."""
    nb = ceil_div(N, isa.lanes)
    nrs = [d for d in (4, 3, 2, 1) if nb % d == 0]
    if nrs == [1] and nb <= 8:
        nrs = [nb, 1]
    for nr in nrs:
        for mr in range(1, min(8, 16 // nr) + 1):
            if isa.fits(mr, nr):
                yield mr, nr


def space_tiles(M: int, N: int, isa: Isa):
    """Every register tile of the tuning space: nr in 1..8 dividing ceil(N/L), mr in 1..min(16, M)."""
    nb = ceil_div(N, isa.lanes)
    for nr in range(1, 9):
        if nb % nr:
            continue
        for mr in range(1, min(16, M) + 1):
            if isa.fits(mr, nr):
                yield mr, nr


DEFAULT_UNITS = 2  # the default tile is chosen for 2 cores (the project's machines)


def best_default_tile(M: int, N: int, K: int, batch: int, isa: Isa,
                      units: int = DEFAULT_UNITS) -> tuple[int, int, float]:
    """(mr, nr, single-core cycles) of the cheapest default tile (ties: the wider nr)."""
    best = None
    for mr, nr in default_tiles(N, isa):
        cost, per_tile, _, tiles = tile_cost(M, N, K, mr, nr, isa, units, batch)
        key = (round(cost), -nr)
        if best is None or key < best[0]:
            best = (key, mr, nr, per_tile * tiles)
    return best[1:]


def best_space_cycles(M: int, N: int, K: int, isa: Isa, units: int) -> float:
    """Modelled cycles on ``units`` cores of the best tile of the whole tuning space."""
    return min(tile_cost(M, N, K, mr, nr, isa, units)[0] for mr, nr in space_tiles(M, N, isa))
