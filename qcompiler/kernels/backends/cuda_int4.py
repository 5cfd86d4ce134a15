"""Native INT4 (W4A4) tensor-core backend: ``mma.m16n8k64.s4`` (sm_80 / 86 / 89), ``m8n8k32`` (sm_75).

Both operands 4-bit, packed ``pack_int4(x)`` in the linear order (``qcompiler/kernels/int4_pack.py``);
kernel ``cuda_mma.dense_int4`` (dense only: no conv kernel, a conv falls to W4A8).  Not on sm_90
(``cuda_mma.supports``: Hopper emulates s4 mma).  Selected only for layers whose activation codes
are 4-bit (``select_cuda(arch, 4, 4)``): the quantizer does not produce those yet, so
``--precision int4`` is refused (``qcompiler/driver.py``).
"""

from . import CudaGemmBackend, register

BACKEND = register(CudaGemmBackend("cuda_mma_s4", weight_bits=4, a_bits=4, mma_kind="int4", conv_kind=None,
                                   tag="int4", dense_builder="dense_int4", conv_builder=None, pack="linear",
                                   a_dtypes=("int4", "uint4"), doc=__doc__))
