"""INT8 tensor-core backend: s8 / u8 activations x s8 weights, ``mma.m16n8k32`` (``m8n8k16`` on sm_75).

Kernels ``cuda_mma.dense`` and ``cuda_mma.conv2d_nhwc`` (implicit GEMM); the weight operand is the int8
matrix W [N, K].  Also the exact fallback of the 4-bit backends (4-bit codes are int8 values).
"""

from . import CudaGemmBackend, register

BACKEND = register(CudaGemmBackend("cuda_mma", weight_bits=8, a_bits=8, mma_kind="dense", conv_kind="conv2d",
                                   tag="mma", dense_builder="dense", conv_builder="conv2d_nhwc", pack="int8",
                                   a_dtypes=("int8", "uint8"), doc=__doc__))
