"""INT8 (u8 x s8) GEMM backend on AVX2: ``vpmovsxbw`` + ``vpmaddwd``, 8 lanes x 2 deep (``cpu_vnni.py``)."""

from ..tile_model import Isa
from . import CpuGemmBackend, register

# step: mr*nr (a vpmaddwd and a vpaddd per accumulator) + (mr + nr) / 2 (broadcasts, widening loads) + 0.5
ISA = Isa("avx2", "cpu_avx2", lanes=8, kpack=2, vregs=16, vbytes=32, step=("sum", 1.0, 0.5, 0.5))
BACKEND = register(CpuGemmBackend(ISA, ("avx2",), "avx2", __doc__))
