"""W4A8 GEMM backend on AVX2: 4-bit weights as nibbles, ``vpmaddubsw`` (exact for weights in [-8, 7]).

One intrinsic call (``_x86_intrin.py``, ``avx2_w4``): 8 lanes x 32 reduction steps; four 32-byte
loads of biased nibbles, each unpacked to two s8 vectors (``& 15``, ``>> 4 & 15``, ``- 8``);
eight ``vpmaddubsw`` (u8 x s8 pair sums <= 2*255*8 = 4080, no saturation) summed in int16
(<= 32640), one ``vpmaddwd`` by ones into int32.  Twice the MACs per multiply instruction of the
INT8 AVX2 path.  The reduction (a conv's channels per tap) is padded to a multiple of 32.
"""

from ..tile_model import Isa
from . import CpuGemmBackend, register

AVX2_W4_GROUPS = 4  # G: 8 int16 vpmaddubsw results (2 per group) summed before one vpmaddwd

# step (32 deep) per accumulator: 8 vpmaddubsw + 7 vpaddw + vpmaddwd + vpaddd (~6 cycles); per row 8
# broadcasts; per column block 4 loads + 20 unpack ops, and its 8 unpacked vectors crowd the 16 ymm
# registers (w = 12).  2026-12-06 on Zen 5 (code for znver2), tiles 8x1 > 6x1 > 4x2 ~ 6x2 > 2x4 by
# 5-25% on 512x512x1024, 3136x64x576, 784x128x1152: the coefficients rank them so.
ISA = Isa("avx2_w4", "cpu_avx2_w4", lanes=8, kpack=8 * AVX2_W4_GROUPS, vregs=16, vbytes=32, w_bits=4,
          kround=8 * AVX2_W4_GROUPS, step=("sum", 6.0, 0.5, 12.0))
BACKEND = register(CpuGemmBackend(ISA, ("avx2",), "avx2", __doc__))
