"""W8A16 GEMM backend on AVX2: int16 activations x int8 weights, ``vpmaddwd`` 8 lanes x 2 deep."""

from ..tile_model import Isa
from . import CpuGemmBackend, register

ISA = Isa("avx2_a16", "cpu_avx2_a16", lanes=8, kpack=2, vregs=16, vbytes=32, a_dtypes=("int16",),
          a_operand="int16", step=("sum", 1.0, 0.5, 0.5))
BACKEND = register(CpuGemmBackend(ISA, ("avx2",), "avx2", __doc__))
