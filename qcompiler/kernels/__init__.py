"""Integer kernels (TensorIR) that the lowering attaches with ``call_tir``.

Every GEMM-like kernel here computes the same fused function, so the lowering, the NumPy
reference executor (``qcompiler.reference``) and each kernel agree bit for bit:

    acc[m, n] = sum_k int32(A[m, k]) * int32(W[k, n]) + bias[n]            (int32, no overflow:
                                                                           bounds checked by
                                                                           passes/overflow.py)
    t[m, n]   = int64(acc[m, n]) * mult[n] + (1 << (shift[n] - 1))        (int64)
    Out[m, n] = clip(t[m, n] >> shift[n], lo, hi)   cast to out_dtype      (arithmetic shift)

``mult`` (int64, |mult| < 2^31, may be negative or 0) and ``shift`` (int64, 1 <= shift <= 62)
are the dyadic requantization constants of HAWQ-V3 (docs/design.md §2): M = mult * 2^-shift, with
rounding half up.  ``lo``/``hi`` are Python ints baked into the kernel (ReLU is lo = 0).

Modules:
  cpu_vnni     u8 x s8 -> s32 AVX-512 VNNI dense and NHWC conv (signed activations through the
               +128 offset, corrected in the bias), depthwise conv, batch_matmul of two activations;
               the same register-tiled GEMM builders serve every x86 backend below
  backends/    one GemmBackend per ISA and bit width (name, config, workload, default config, config
               space, TIR builder, weight packing; TVM-free registry): vnni_int8 / avx2_int8 (INT8),
               vnni_w4a8 / avx2_w4a8 (4-bit weights as nibbles), vnni_w8a16 / avx2_w8a16 (int16
               activations); ``backends.select_cpu`` picks one per layer
  tile_model   the TVM-free register-tile cost model (default tiles; the cost model's features)
  _x86_intrin  the x86 tensor intrinsics (vpdpbusd, vpmaddwd, vpmaddubsw, vpdpwssd, nibble unpacking)
  int4_pack    4-bit packing: the GPU orders and the x86 CPU layout (``pack_cpu_w4``)
  cpu_default  a default parallel/vectorized schedule for every other PrimFunc on CPU
  cuda_mma     s8 x s8 -> s32 mma.sync tensor-core dense / conv (implicit GEMM), batch_matmul, W4A8,
               native s4

The CPU conv / dense / depthwise kernels take an optional fused elementwise epilogue
(``cpu_vnni.Post``, built by ``qcompiler.intops.gemm.Epilogue`` for the nodes of
``passes/fuse_epilogue.py``): the clipped int64 ``Out`` value above goes on through the fused ops'
arithmetic (a residual add reading one more tensor of the output's shape, hard-swish's gate requant
and mul, a clip) before the one store; their per-tensor constants are an int64 argument vector.

``batch_matmul`` (attention: both operands are activations) computes the same function per batch
entry with bias = 0 and one (mult, shift) for the whole tensor (int64 [1] arguments).
"""
