"""W8A16 GEMM backend on AVX-512 VNNI: int16 activations x int8 weights, ``vpdpwssd`` 16 lanes x 2 deep.

The weights are sign-extended in registers (``vpmovsxbw``); no activation offset (signed x signed).
"""

from ..tile_model import Isa
from . import CpuGemmBackend, register

ISA = Isa("avx512vnni_a16", "cpu_vnni_a16", lanes=16, kpack=2, vregs=32, vbytes=64, a_dtypes=("int16",),
          a_operand="int16", step=("max", 0.5, 0.5, 1.0))
BACKEND = register(CpuGemmBackend(ISA, ("avx512vnni", "avx512bw"), "avx512_vnni", __doc__))
