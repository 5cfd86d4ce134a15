"""W4A8 implicit-GEMM convolution on the int8 tensor cores (``cuda_mma.conv2d_nhwc_w4a8``).

Without a GPU: bit-exact against the project's NumPy conv reference by executing the emitted TIR in
the lock-step PTX interpreter (tests/kernels/_ptx_sim.py), on ragged shapes (C not a multiple of 4,
K not a multiple of 32, odd OC, strides, dilations, uneven pads, uint8 activations, sm_75's
register-staged pipeline, split-K); SASS (nvcc + cuobjdump) on sm_80 / sm_90 shows the s8 IMMA fed
by the register unpack, no s4 form, no emulation CALL and no local-memory traffic (spills).
On a GPU (``-m gpu``): the same kernel on the device, bit for bit.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from qcompiler.kernels import cuda_mma as cm
from qcompiler.kernels.int4_pack import pack_int4

from ._ptx_sim import run_kernel
from .test_cuda_mma import INT8_SHAPE, assert_imma, conv_ref_acc, epilogue_params, imma, needs_sass, requant_ref

C = cm.MmaConfig


def w4_conv_case(geom, arch, cfg, a_dtype="int8", out_dtype="int8", seed=0):
    """(func, args, expected): weights in [-8, 7] packed ``mma_k32``; reference = the int8 conv of the
    same values."""
    N, H, W_, Cc, OC, KH, KW, st, pads, dil = geom
    rng = np.random.default_rng(seed)
    X = (rng.integers(0, 256, (N, H, W_, Cc)).astype(np.uint8) if a_dtype == "uint8"
         else rng.integers(-128, 128, (N, H, W_, Cc)).astype(np.int8))
    K = KH * KW * Cc
    Wk = rng.integers(-8, 8, (OC, K)).astype(np.int8)
    Wk[0, :] = -8                                  # the extreme: 16 * -8 = -128 per byte
    Wk[-1, :] = 7
    lo, hi = cm.OUT_DTYPES[out_dtype]
    bias, mult, shift = epilogue_params(rng, OC, K, out_dtype)
    f = cm.conv2d_nhwc_w4a8(N, H, W_, Cc, OC, KH, KW, st, pads, dil, out_dtype, lo, hi, arch, cfg, a_dtype=a_dtype)
    OH, OW = cm.conv_output_hw(H, W_, KH, KW, st, pads, dil)
    acc = conv_ref_acc(X, Wk, KH, KW, st, pads, dil)
    out = np.zeros((N, OH, OW, OC), out_dtype)
    return f, (X, pack_int4(Wk, "mma_k32"), bias, mult, shift, out), requant_ref(acc, bias, mult, shift, lo, hi,
                                                                                out_dtype)


W4_CONV_SIM = [
    # geom (N, H, W, C, OC, KH, KW, strides, pads, dilations), arch, config, a_dtype, out_dtype
    ((1, 6, 7, 16, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "sm_80",
     C(bm=32, bn=32, bk=64, warps_m=2, warps_n=1, stages=3), "int8", "int8"),
    ((2, 9, 8, 8, 20, 3, 2, (2, 1), (0, 1, 2, 0), (1, 2)), "sm_90",
     C(bm=32, bn=32, bk=64, warps_m=1, warps_n=2, stages=2), "uint8", "int8"),
    ((1, 8, 8, 3, 16, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)), "sm_86", None, "uint8", "uint8"),   # C = 3: byte copies
    ((1, 5, 5, 4, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "sm_75",
     C(bm=16, bn=16, bk=64, warps_m=1, warps_n=1, stages=2), "int8", "int16"),                 # register-staged
    ((1, 5, 4, 8, 17, 3, 3, (1, 1), (2, 0, 0, 2), (1, 1)), "sm_90", None, "int8", "int32"),     # odd OC, K = 72
    ((1, 4, 4, 64, 16, 2, 2, (1, 1), (0, 0, 1, 1), (1, 1)), "sm_89",
     C(bm=16, bn=16, bk=128, warps_m=1, warps_n=1, warps_k=2, stages=3), "int8", "int8"),      # split-K
]


@pytest.mark.parametrize("geom,arch,cfg,a_dtype,out", W4_CONV_SIM,
                         ids=[f"w4conv{i}-{c[1]}-{c[3]}-{c[4]}" for i, c in enumerate(W4_CONV_SIM)])
def test_simulated_w4a8_conv_bit_exact(geom, arch, cfg, a_dtype, out):
    f, args, expected = w4_conv_case(geom, arch, cfg, a_dtype, out)
    run_kernel(f, *args)
    np.testing.assert_array_equal(args[-1], expected)


def test_simulated_w4a8_conv_needs_the_mma_k32_order():
    """Not vacuous: the same weights packed in the linear order give wrong numbers."""
    geom = W4_CONV_SIM[0]
    f, args, expected = w4_conv_case(*geom[:3])
    N, H, W_, Cc, OC, KH, KW = geom[0][:7]
    from qcompiler.kernels.int4_pack import unpack_int4

    wk = unpack_int4(args[1], (OC, KH * KW * Cc), "mma_k32")
    lin = pack_int4(wk, "linear")
    wrong = np.zeros_like(args[1])
    wrong[:, :lin.shape[1]] = lin
    args = (args[0], wrong, *args[2:])
    run_kernel(f, *args)
    assert (args[-1] != expected).any()


def test_w4a8_conv_contract():
    f = cm.conv2d_nhwc_w4a8(1, 8, 8, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", -128, 127, "sm_90")
    assert f.attrs["qc.kernel"] == "cuda_mma.w4a8" and int(f.attrs["op_pattern"]) == 8
    with pytest.raises(cm.KernelUnsupported, match="MAX_K|overflow"):
        cm.conv2d_nhwc_w4a8(1, 4, 4, 8192, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", -128, 127, "sm_90")
    with pytest.raises(cm.KernelUnsupported, match="activation dtype"):
        cm.conv2d_nhwc_w4a8(1, 4, 4, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", -128, 127, "sm_90",
                            a_dtype="int16")
    with pytest.raises(cm.KernelUnsupported, match="multiple of 64"):
        cm.conv2d_nhwc_w4a8(1, 4, 4, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", -128, 127, "sm_90",
                            C(bm=16, bn=16, bk=32, warps_m=1, warps_n=1, stages=2))


def local_memory(text: str) -> list[str]:
    """SASS local loads / stores (register spills or a local array left in memory)."""
    return sorted(set(re.findall(r"\b(?:LDL|STL)(?:\.[0-9A-Z]+)*", text)))


@needs_sass
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("cfg", [C(bm=64, bn=64, bk=64, warps_m=2, warps_n=2, stages=3),
                                 C(bm=128, bn=128, bk=64, warps_m=2, warps_n=2, stages=3)], ids=["64x64", "128x128"])
def test_sass_w4a8_conv(arch, cfg):
    f = cm.conv2d_nhwc_w4a8(1, 28, 28, 64, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "uint8", 0, 255, arch, cfg,
                            a_dtype="uint8")
    text = cm.sass_of(f, arch)
    assert_imma(text, "IMMA.16832.U8.S8", arch)
    assert not [x for x in imma(text) if "S4" in x or "U4" in x]
    assert not local_memory(text), f"{arch}: local memory in the SASS: {local_memory(text)}"


@needs_sass
@pytest.mark.parametrize("arch", ["sm_75", "sm_86", "sm_89"])
def test_sass_w4a8_conv_other_archs(arch):
    f = cm.conv2d_nhwc_w4a8(1, 28, 28, 64, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", -128, 127, arch)
    text = cm.sass_of(f, arch)
    assert_imma(text, INT8_SHAPE[arch], arch)
    assert not [x for x in imma(text) if "S4" in x or "U4" in x] and not local_memory(text)


# ---- on a GPU --------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("geom", [(1, 56, 56, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
                                  (2, 15, 17, 3, 32, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1)),
                                  (4, 14, 14, 256, 128, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1))])
def test_gpu_w4a8_conv_bit_exact(geom):
    dev = tvm.cuda(0)
    arch = f"sm_{dev.compute_version.replace('.', '')}"
    cm.ensure_cuda_jit()
    f, args, expected = w4_conv_case(geom, arch, None)
    lib = cm.build(f, arch)
    targs = [tvm.runtime.tensor(a, dev) for a in args]
    lib["main"](*targs)
    np.testing.assert_array_equal(targs[-1].numpy(), expected)


@pytest.mark.parametrize("backend", ["cuda_mma_w4", "cuda_mma"])
def test_simulated_backend_conv_from_onnx_weights(backend):
    """Through the GemmBackend interface as gemm_cuda.py calls it: ONNX weights [OC, C, KH, KW] ->
    ``pack_conv`` -> ``conv2d`` kernel == the project's NCHW conv reference (``intops.gemm.conv_acc``)."""
    from qcompiler.intops.gemm import conv_acc
    from qcompiler.kernels import backends as KB

    be = KB.get(backend)
    rng = np.random.default_rng(3)
    N, H, W_, Cc, OC, KH, KW, st, pads, dil = 1, 6, 5, 12, 20, 3, 3, (1, 2), (1, 0, 1, 2), (1, 1)
    X = rng.integers(0, 256, (N, H, W_, Cc)).astype(np.uint8)
    w = rng.integers(-8, 8, (OC, Cc, KH, KW)).astype(np.int8)
    bias, mult, shift = epilogue_params(rng, OC, KH * KW * Cc, "int8")
    f = be.conv2d(N, H, W_, Cc, OC, KH, KW, st, pads, dil, "uint8", "int8", -128, 127, "sm_90")
    wk, _ = be.pack_conv(w)
    OH, OW = cm.conv_output_hw(H, W_, KH, KW, st, pads, dil)
    out = np.zeros((N, OH, OW, OC), np.int8)
    run_kernel(f, X, wk, bias, mult, shift, out)
    acc = conv_acc(X.transpose(0, 3, 1, 2), w, st, pads, dil, 1).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out, requant_ref(acc, bias, mult, shift, -128, 127, "int8"))


@pytest.mark.parametrize("backend", ["cuda_mma_w4", "cuda_mma"])
def test_simulated_backend_dense_from_graph_weights(backend):
    """Dense through the interface: graph weights [K, N] -> ``pack_dense`` -> ``dense`` == A @ W."""
    from qcompiler.kernels import backends as KB

    be = KB.get(backend)
    rng = np.random.default_rng(4)
    M, K, N = 7, 100, 40
    A = rng.integers(-128, 128, (M, K)).astype(np.int8)
    w = rng.integers(-8, 8, (K, N)).astype(np.int8)
    bias, mult, shift = epilogue_params(rng, N, K, "int8")
    f = be.dense(M, N, K, "int8", "int8", -128, 127, "sm_80")
    wk, _ = be.pack_dense(w)
    out = np.zeros((M, N), np.int8)
    run_kernel(f, A, wk, bias, mult, shift, out)
    acc = A.astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(out, requant_ref(acc, bias, mult, shift, -128, 127, "int8"))
