"""W4A8 tensor-core backend: s8 / u8 activations x 4-bit weights on the int8 ``mma.m16n8k32``.

Weights are stored ``pack_int4(W, order="mma_k32")`` (8 per int32, ``qcompiler/kernels/int4_pack.py``);
each word is unpacked in registers into the two int8x4 B registers of a k32 step, holding 16 * w per
byte (two LOP, ``_cuda_intrin.unpack_w4_mma_k32``), and the int32 sum is divided by 16 (exact) before
the bias.  Kernels ``cuda_mma.dense_w4a8`` and ``cuda_mma.conv2d_nhwc_w4a8`` (implicit GEMM).  Every
arch with integer mma; the 4-bit path of sm_90, which has no INT4 tensor cores.  Half the weight
bytes of INT8; K <= ``cuda_mma.MAX_K_W4A8``.
"""

from . import CudaGemmBackend, register

BACKEND = register(CudaGemmBackend("cuda_mma_w4", weight_bits=4, a_bits=8, mma_kind="w4a8", conv_kind="w4a8",
                                   tag="w4a8", dense_builder="dense_w4a8", conv_builder="conv2d_nhwc_w4a8",
                                   pack="mma_k32", a_dtypes=("int8", "uint8"), doc=__doc__))
