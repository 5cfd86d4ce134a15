"""W4A8 GEMM backend on AVX-512 VNNI: 4-bit weights as nibbles, unpacked in registers into ``vpdpbusd``.

One intrinsic call (``_x86_intrin.py``, ``avx512vnni_w4``): a 64-byte load holds 16 lanes x 8
reduction steps; ``(x << 4) & 0xF0`` and ``x & 0xF0`` are two s8 operands (16 x the weights) of two
``vpdpbusd``; the epilogue shifts the int32 sum right by 4 (exact).  Half the weight bytes of INT8:
the gain is where the weights stream from memory (M <= 8, weights larger than L2).  The reduction
(a conv's channels per tap) is padded to a multiple of 8.
"""

from ..tile_model import Isa
from . import CpuGemmBackend, register

# step (8 deep): two vpdpbusd per accumulator; two broadcasts per row (0.5: cheap loads); a load + 3
# unpack ops per column block.  Tiles of 16 accumulators (a workspace buffer) cost less than in INT8
# (150 cycles, not 300): at M = 8, N = K = 4096, 4x4 and 8x2 ran 1.2-1.3x faster than 4x2 (2026-12-06,
# Zen 5, interleaved), while compute-bound shapes keep 12-14 accumulator tiles (6x2, 7x2, 3x4).
ISA = Isa("avx512vnni_w4", "cpu_vnni_w4", lanes=16, kpack=8, vregs=32, vbytes=64, w_bits=4, kround=8,
          acc_shift=4, workspace_cycles=150, step=("max", 1.0, 0.5, 2.0))
BACKEND = register(CpuGemmBackend(ISA, ("avx512vnni", "avx512bw"), "avx512_vnni", __doc__))
