"""INT8 (u8 x s8) GEMM backend on AVX-512 VNNI: ``vpdpbusd`` 16 lanes x 4 deep (``cpu_vnni.py``)."""

from ..tile_model import Isa
from . import CpuGemmBackend, register

# step: max(mr*nr, mr + nr) / 2 + 0.5 (two vpdpbusd or two operand loads per cycle)
ISA = Isa("avx512vnni", "cpu_vnni", lanes=16, kpack=4, vregs=32, vbytes=64, step=("max", 0.5, 0.5, 0.5))
BACKEND = register(CpuGemmBackend(ISA, ("avx512vnni", "avx512bw"), "avx512_vnni", __doc__))
