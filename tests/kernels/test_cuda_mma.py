"""CUDA tensor-core kernels (qcompiler/kernels/cuda_mma.py).

Without a GPU (runs everywhere nvcc is installed):
  * the SASS of every kernel kind on sm_75 / 80 / 86 / 89 / 90 shows the integer IMMA it must
    (int8 shape on every arch, an S4 form for native INT4 on sm_75..89, S8 and no CALL for W4A8
    on sm_90), nvcc + cuobjdump, cubins cached per session;
  * bit-exact results against the NumPy reference on ragged shapes, by executing the emitted TIR
    in a lock-step SIMT interpreter with the PTX ISA's ldmatrix / mma / cp.async semantics
    (tests/kernels/_ptx_sim.py; it defers cp.async copies to their wait_group, so a missing wait
    shows up as wrong numbers);
  * the kernels go through a Relax module (bb.add_func + call_tir + relax.const weights) and
    ``tvm.compile`` for CUDA.
On a GPU (``-m gpu``; skipped where ``tvm.cuda(0).exist`` is false): the same kernels run on the
device and must match NumPy bit for bit.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import tvm

from qcompiler.errors import TargetError
from qcompiler.kernels import cuda_mma as cm
from qcompiler.kernels.int4_pack import ORDERS, pack_int4, packed_cols, unpack_int4

from ._ptx_sim import run_kernel

C = cm.MmaConfig
NVCC = shutil.which("nvcc") is not None


def _has_cuobjdump() -> bool:
    try:
        cm._tool("cuobjdump")
        return True
    except TargetError:
        return False


needs_sass = pytest.mark.skipif(not (NVCC and _has_cuobjdump()),
                                reason="needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump<14 nvidia-cuda-nvdisasm<14)")

# ---- NumPy reference (kernel contract) ----------------------------------------------------------


def requant_ref(acc64, bias, mult, shift, lo, hi, out_dtype):
    acc = (acc64 + bias.astype(np.int64)).astype(np.int32).astype(np.int64)   # int32 accumulator
    t = acc * mult + (np.int64(1) << (shift - 1))
    return np.clip(t >> shift, lo, hi).astype(out_dtype)


def epilogue_params(rng, n, k, out_dtype):
    bias = rng.integers(-5000, 5000, n).astype(np.int32)
    mult = rng.integers(1 << 29, 1 << 31, n).astype(np.int64)
    if out_dtype == "int32":
        shift = np.full(n, 31, np.int64)
    else:  # outputs spread over the int8 range rather than all clipped
        s = int(np.log2(np.sqrt(k) * 5500)) + 24
        shift = rng.integers(s - 1, s + 2, n).astype(np.int64)
    mult[0] = -mult[0]          # negative multipliers are legal
    return bias, mult, shift


def dense_case(kind, M, N, K, arch, cfg, out_dtype="int8", lo=-128, hi=127, a_dtype="int8", seed=0):
    """(func, args, expected) for one dense problem."""
    rng = np.random.default_rng(seed)
    if kind == "int4":
        A = rng.integers(0 if a_dtype == "uint4" else -8, 16 if a_dtype == "uint4" else 8, (M, K)).astype(np.int8)
    elif a_dtype == "uint8":
        A = rng.integers(0, 256, (M, K)).astype(np.uint8)
    else:
        A = rng.integers(-128, 128, (M, K)).astype(np.int8)
    small = kind in ("int4", "w4a8")
    W = rng.integers(-8, 8, (N, K)).astype(np.int8) if small else rng.integers(-128, 128, (N, K)).astype(np.int8)
    W[0, :] = -8 if small else -128       # extremes
    bias, mult, shift = epilogue_params(rng, N, K, out_dtype)
    if kind == "dense":
        f = cm.dense(M, N, K, out_dtype, lo, hi, arch, cfg, a_dtype=a_dtype)
        ops = (A, W)
    elif kind == "w4a8":
        f = cm.dense_w4a8(M, N, K, out_dtype, lo, hi, arch, cfg, a_dtype=a_dtype)
        ops = (A, pack_int4(W, "mma_k32"))
    else:
        Ap = pack_int4(np.where(A >= 8, A - 16, A).astype(np.int8)) if a_dtype == "uint4" else pack_int4(A)
        f = cm.dense_int4(M, N, K, out_dtype, lo, hi, arch, cfg, a_dtype=a_dtype)
        ops = (Ap, pack_int4(W))
    acc = A.astype(np.int64) @ W.astype(np.int64).T
    out = np.zeros((M, N), out_dtype)
    return f, (*ops, bias, mult, shift, out), requant_ref(acc, bias, mult, shift, lo, hi, out_dtype)


def conv_ref_acc(X, Wk, KH, KW, strides, pads, dilations):
    """int64 NHWC accumulators; W [OC, KH*KW*C] with k = (kh*KW + kw)*C + c."""
    from qcompiler.intops.gemm import conv_acc  # the project's NCHW reference

    N, H, W_, Cc = X.shape
    OC = Wk.shape[0]
    w = Wk.reshape(OC, KH, KW, Cc).transpose(0, 3, 1, 2)
    return conv_acc(X.transpose(0, 3, 1, 2), w, strides, pads, dilations, 1).transpose(0, 2, 3, 1)


def conv_case(geom, arch, cfg, a_dtype="int8", out_dtype="int8", seed=0):
    N, H, W_, Cc, OC, KH, KW, st, pads, dil = geom
    rng = np.random.default_rng(seed)
    X = (rng.integers(0, 256, (N, H, W_, Cc)).astype(np.uint8) if a_dtype == "uint8"
         else rng.integers(-128, 128, (N, H, W_, Cc)).astype(np.int8))
    Wk = rng.integers(-128, 128, (OC, KH * KW * Cc)).astype(np.int8)
    lo, hi = cm.OUT_DTYPES[out_dtype]
    bias, mult, shift = epilogue_params(rng, OC, KH * KW * Cc, out_dtype)
    f = cm.conv2d_nhwc(N, H, W_, Cc, OC, KH, KW, st, pads, dil, out_dtype, lo, hi, arch, cfg, a_dtype=a_dtype)
    OH, OW = cm.conv_output_hw(H, W_, KH, KW, st, pads, dil)
    acc = conv_ref_acc(X, Wk, KH, KW, st, pads, dil)
    out = np.zeros((N, OH, OW, OC), out_dtype)
    return f, (X, Wk, bias, mult, shift, out), requant_ref(acc, bias, mult, shift, lo, hi, out_dtype)


# ---- int4 packing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 8), (5, 37), (2, 3, 64), (4, 100)])
def test_pack_int4_round_trip(order, shape):
    x = np.random.default_rng(1).integers(-8, 8, size=shape).astype(np.int8)
    p = pack_int4(x, order)
    assert p.dtype == np.int32 and p.shape == shape[:-1] + (packed_cols(shape[-1], order),)
    np.testing.assert_array_equal(unpack_int4(p, shape, order), x)


def test_pack_int4_bit_order():
    # linear: element i of a word in bits [4i, 4i+4), two's complement nibbles
    assert pack_int4(np.array([[1, 2, 3, 4, 5, 6, 7, -8]])).view(np.uint32)[0, 0] == 0x87654321
    # mma_k32: word c holds k = 4c+i (nibble 2i) and 16+4c+i (nibble 2i+1)
    w = np.arange(32) % 8
    words = pack_int4(w[None], "mma_k32").view(np.uint32)[0]
    assert [hex(v) for v in words] == ["0x33221100", "0x77665544", "0x33221100", "0x77665544"]
    # padding nibbles are zero
    assert pack_int4(np.array([[-1]])).view(np.uint32)[0, 0] == 0xF


def test_pack_int4_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(np.array([[8]]))
    with pytest.raises(ValueError):
        unpack_int4(np.zeros((2, 1), np.int32), (2, 9))


# ---- configuration / capability --------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(bm=24), dict(bn=48, warps_n=2), dict(bk=48), dict(stages=1), dict(stages=9),
                                dict(warps_m=4, warps_n=8, bm=256, bn=256), dict(vec_a=2),
                                dict(bm=256, bn=128, warps_m=2, warps_n=1), dict(bk=96, warps_k=2),
                                dict(warps_k=8, bk=256, warps_m=2, warps_n=2), dict(warps_k=0)])
def test_config_validation(kw):
    with pytest.raises(ValueError):
        C(**kw)


def test_supports():
    for arch in cm.ARCHS:
        for kind in ("dense", "conv2d", "w4a8"):
            assert cm.supports(arch, kind)
        assert cm.supports(arch, "int4") == (arch != "sm_90")
    assert not cm.supports("sm_70", "dense")
    assert not cm.supports("sm_100", "int4")
    assert not cm.supports("gfx90a", "dense")


def test_unsupported_requests_raise_clear_errors():
    with pytest.raises(cm.KernelUnsupported, match="INT4"):
        cm.dense_int4(16, 16, 64, "int8", -128, 127, "sm_90")
    with pytest.raises(cm.KernelUnsupported, match="K="):
        cm.dense_w4a8(16, 16, cm.MAX_K_W4A8 + 32, "int8", -128, 127, "sm_90")
    with pytest.raises(cm.KernelUnsupported, match="shared memory"):
        cm.dense(64, 64, 512, "int8", -128, 127, "sm_75", C(bm=128, bn=128, bk=256, stages=4))
    with pytest.raises(cm.KernelUnsupported, match="out dtype"):
        cm.dense(16, 16, 32, "float16", 0, 1, "sm_80")
    with pytest.raises(cm.KernelUnsupported, match="clip"):
        cm.dense(16, 16, 32, "int8", -200, 127, "sm_80")
    with pytest.raises(cm.KernelUnsupported, match="copy width"):
        cm.dense(16, 16, 36, "int8", -128, 127, "sm_80", C(bm=16, bn=16, bk=32, warps_m=1, warps_n=1, stages=2, vec_a=16))
    with pytest.raises(cm.KernelUnsupported):
        cm.dense(16, 16, 32, "int8", -128, 127, "sm_70")
    assert isinstance(cm.KernelUnsupported("x"), TargetError)


def test_default_configs_are_valid_and_fit():
    for arch in cm.ARCHS:
        for kind in cm.KINDS:
            for M in (1, 16, 33, 64, 500, 4096):
                for N, K in ((64, 64), (4096, 4096), (11008, 4096), (24, 27)):
                    cfg = cm.default_config(M, N, K, arch, kind)
                    bits = {"w4a8": (8, 4), "int4": (4, 4)}.get(kind, (8, 8))
                    assert cfg.smem_bytes(*bits) <= 96 * 1024
                    if kind in ("w4a8", "int4"):
                        assert cfg.bk % 64 == 0


def test_builds_without_storage_rewrite():
    """The PassContext MetaSchedule's tensor-core candidates need must not break these kernels."""
    f = cm.dense(64, 64, 64, "int8", -128, 127, "sm_80")
    with tvm.transform.PassContext(config={"tirx.disable_storage_rewrite": True}):
        src = cm.cuda_source(f, "sm_80")
    assert "mma.sync.aligned.m16n8k32" in src


def test_no_tensor_intrin_import():
    """Building a kernel must not pull in tvm.s_tir.tensor_intrin (30-40 s to import)."""
    import subprocess
    import sys

    code = ("import sys; from qcompiler.kernels import cuda_mma as cm; "
            "cm.build(cm.dense(32, 32, 64, 'int8', -128, 127, 'sm_80'), 'sm_80'); "
            "print('tvm.s_tir.tensor_intrin' in sys.modules)")
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("False")


def test_primfunc_attrs():
    f = cm.dense(20, 24, 40, "int8", -128, 127, "sm_80")
    assert f.attrs["qc.scheduled"] and f.attrs["tirx.is_scheduled"]
    assert int(f.attrs["op_pattern"]) == 8
    assert "global_symbol" not in f.attrs


# ---- SASS (nvcc + cuobjdump, no GPU) -----------------------------------------------------------------
_SASS_CACHE: dict = {}


def sass(make, key, arch):
    if (key, arch) not in _SASS_CACHE:
        _SASS_CACHE[(key, arch)] = cm.sass_of(make(arch), arch)
    return _SASS_CACHE[(key, arch)]


def imma(text):
    return sorted(set(re.findall(r"\bIMMA\.[0-9A-Z.]+", text)))


def emulated(text):
    """ptxas emulates an instruction with a CALL into a subroutine that returns (RET); a bare
    ``@!P CALL.REL.NOINC <next>`` is its loop-exit idiom and returns nowhere."""
    return bool(re.search(r"\bRET\.", text))


def assert_imma(text, expected, arch):
    forms = imma(text)
    assert forms, f"no IMMA in the SASS for {arch}"
    assert expected in forms, f"{arch}: expected {expected}, found {forms}"
    assert not emulated(text), f"{arch}: the kernel calls a subroutine (emulated instruction)"
    assert "LDSM" in text, f"{arch}: no ldmatrix"
    if arch != "sm_75":
        assert "LDGSTS" in text, f"{arch}: no cp.async"


INT8_SHAPE = {"sm_75": "IMMA.8816.S8.S8", "sm_80": "IMMA.16832.S8.S8", "sm_86": "IMMA.16832.S8.S8",
              "sm_89": "IMMA.16832.S8.S8", "sm_90": "IMMA.16832.S8.S8"}
INT4_SHAPE = {"sm_75": "IMMA.8832.S4.S4", "sm_80": "IMMA.16864.S4.S4", "sm_86": "IMMA.16864.S4.S4",
              "sm_89": "IMMA.16864.S4.S4"}
SASS_CFG = C(bm=64, bn=64, bk=64, warps_m=2, warps_n=2, stages=2)


@needs_sass
@pytest.mark.parametrize("arch", cm.ARCHS)
def test_sass_dense_int8(arch):
    text = sass(lambda a: cm.dense(100, 72, 256, "int8", -128, 127, a, SASS_CFG), "dense", arch)
    assert_imma(text, INT8_SHAPE[arch], arch)


@needs_sass
@pytest.mark.parametrize("arch", cm.ARCHS)
def test_sass_conv_int8(arch):
    text = sass(lambda a: cm.conv2d_nhwc(2, 10, 10, 32, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "uint8", 0, 255, a,
                                         SASS_CFG, a_dtype="uint8"), "conv", arch)
    assert_imma(text, INT8_SHAPE[arch].replace("S8.S8", "U8.S8"), arch)


@needs_sass
@pytest.mark.parametrize("arch", [a for a in cm.ARCHS if a != "sm_90"])
def test_sass_native_int4(arch):
    text = sass(lambda a: cm.dense_int4(64, 64, 256, "int8", -128, 127, a, SASS_CFG), "int4", arch)
    assert_imma(text, INT4_SHAPE[arch], arch)


@needs_sass
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_w4a8_is_int8_mma_without_emulation(arch):
    text = sass(lambda a: cm.dense_w4a8(16, 128, 512, "int8", -128, 127, a,
                                        C(bm=16, bn=64, bk=128, warps_m=1, warps_n=4, stages=3)), "w4a8", arch)
    assert_imma(text, "IMMA.16832.S8.S8", arch)
    assert not [f for f in imma(text) if "S4" in f or "U4" in f]


@needs_sass
def test_sass_s4_mma_on_sm90_is_emulated(monkeypatch):
    """Why supports("sm_90", "int4") is False: Hopper runs s4 mma as a subroutine of s8 IMMA."""
    monkeypatch.setattr(cm, "supports", lambda arch, kind: True)
    text = cm.sass_of(cm.dense_int4(64, 64, 256, "int8", -128, 127, "sm_90", SASS_CFG), "sm_90")
    assert emulated(text) and not [f for f in imma(text) if "S4" in f]


@needs_sass
def test_sass_of_library_and_failure_without_imma():
    # a plain non-tensor-core kernel: sass_of works on a built library, and the check must fail
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def add_one(A: T.Buffer((64,), "int32"), B: T.Buffer((64,), "int32")):
        for i in T.thread_binding(64, thread="threadIdx.x"):
            B[i] = A[i] + 1

    lib = tvm.compile(tvm.IRModule({"main": add_one}), target=cm.cuda_target("sm_80"))
    text = cm.sass_of(lib, "sm_80")
    assert "Function" in text or "IADD" in text
    with pytest.raises(AssertionError, match="no IMMA"):
        assert_imma(text, "IMMA.16832.S8.S8", "sm_80")


# ---- bit-exact execution of the emitted TIR (lock-step PTX interpreter, no GPU) ----------------------
DENSE_SIM = [
    # kind, M, N, K, arch, config, out, a_dtype
    ("dense", 16, 16, 32, "sm_80", C(bm=16, bn=16, bk=32, warps_m=1, warps_n=1, stages=2), "int8", "int8"),
    ("dense", 37, 50, 100, "sm_80", C(bm=32, bn=32, bk=32, warps_m=2, warps_n=1, stages=3), "int8", "int8"),
    ("dense", 37, 50, 99, "sm_90", C(bm=32, bn=32, bk=64, warps_m=1, warps_n=2, stages=2), "int32", "int8"),
    ("dense", 33, 40, 72, "sm_75", C(bm=32, bn=32, bk=32, warps_m=2, warps_n=1, stages=2), "int8", "int8"),
    ("dense", 33, 40, 200, "sm_86", C(bm=32, bn=32, bk=32, warps_m=2, warps_n=1, stages=4), "uint8", "uint8"),
    ("dense", 3, 24, 40, "sm_89", None, "int16", "int8"),
    ("w4a8", 5, 40, 100, "sm_90", C(bm=16, bn=32, bk=64, warps_m=1, warps_n=2, stages=3), "int8", "int8"),
    ("w4a8", 17, 24, 160, "sm_90", C(bm=32, bn=32, bk=128, warps_m=2, warps_n=1, stages=2), "int8", "uint8"),
    ("w4a8", 5, 40, 100, "sm_75", C(bm=16, bn=32, bk=64, warps_m=1, warps_n=2, stages=2), "int8", "int8"),
    ("int4", 18, 40, 200, "sm_80", C(bm=32, bn=32, bk=64, warps_m=1, warps_n=2, stages=3), "int8", "int4"),
    ("int4", 9, 16, 72, "sm_89", C(bm=16, bn=16, bk=64, warps_m=1, warps_n=1, stages=2), "int32", "uint4"),
    ("int4", 18, 40, 200, "sm_75", C(bm=32, bn=32, bk=128, warps_m=2, warps_n=1, stages=2), "int8", "int4"),
    ("dense", 19, 37, 64, "sm_90", C(bm=16, bn=32, bk=64, warps_m=1, warps_n=2, stages=3), "int8", "int8"),  # odd N
    # intra-CTA split-K (warps_k), and the register-staged sm_75 pipeline with it
    ("dense", 5, 40, 300, "sm_80", C(bm=16, bn=16, bk=128, warps_m=1, warps_n=1, warps_k=4, stages=3), "int8", "int8"),
    ("dense", 20, 24, 200, "sm_75", C(bm=32, bn=16, bk=64, warps_m=2, warps_n=1, warps_k=2, stages=2), "int8", "int8"),
    ("w4a8", 5, 40, 300, "sm_90", C(bm=16, bn=16, bk=256, warps_m=1, warps_n=1, warps_k=4, stages=3), "int8", "int8"),
    ("int4", 9, 24, 200, "sm_86", C(bm=16, bn=16, bk=128, warps_m=1, warps_n=1, warps_k=2, stages=3), "int8", "int4"),
]


@pytest.mark.parametrize("kind,M,N,K,arch,cfg,out,a_dtype", DENSE_SIM,
                         ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}-{c[4]}-{c[7]}" for c in DENSE_SIM])
def test_simulated_dense_bit_exact(kind, M, N, K, arch, cfg, out, a_dtype):
    lo, hi = cm.OUT_DTYPES[out]
    if out == "int8":
        lo = 0 if a_dtype == "uint8" else -100  # a ReLU-like or narrowed clip
    f, args, expected = dense_case(kind, M, N, K, arch, cfg, out, lo, hi, a_dtype)
    run_kernel(f, *args)
    np.testing.assert_array_equal(args[-1], expected)


CONV_SIM = [
    ((1, 6, 7, 16, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "sm_80", C(bm=32, bn=32, bk=64, warps_m=2, warps_n=1, stages=3), "int8"),
    ((2, 9, 8, 8, 20, 3, 2, (2, 1), (0, 1, 2, 0), (1, 2)), "sm_90", C(bm=32, bn=32, bk=32, warps_m=1, warps_n=2, stages=2), "int8"),
    ((1, 8, 8, 3, 16, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)), "sm_86", C(bm=16, bn=16, bk=32, warps_m=1, warps_n=1, stages=2), "uint8"),
    ((1, 5, 5, 4, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "sm_75", C(bm=16, bn=16, bk=32, warps_m=1, warps_n=1, stages=2), "int8"),
    ((1, 6, 6, 24, 16, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1)), "sm_89", None, "uint8"),
    ((1, 5, 4, 8, 17, 3, 3, (1, 1), (2, 0, 0, 2), (1, 1)), "sm_90", None, "int8"),      # odd OC, uneven pads
]


@pytest.mark.parametrize("geom,arch,cfg,a_dtype", CONV_SIM, ids=[f"conv{i}-{c[1]}" for i, c in enumerate(CONV_SIM)])
def test_simulated_conv_bit_exact(geom, arch, cfg, a_dtype):
    f, args, expected = conv_case(geom, arch, cfg, a_dtype)
    run_kernel(f, *args)
    np.testing.assert_array_equal(args[-1], expected)


def test_simulator_catches_a_missing_wait(monkeypatch):
    """The interpreter is not vacuous: waiting for one group too few gives wrong numbers."""
    from qcompiler.kernels import _cuda_intrin as ci

    orig = ci.make_cp_async_wait
    monkeypatch.setattr(ci, "make_cp_async_wait", lambda n: orig(n + 1))
    f, args, expected = dense_case("dense", 37, 50, 100, "sm_80", C(bm=32, bn=32, bk=32, warps_m=2, warps_n=1, stages=3))
    run_kernel(f, *args)
    assert (args[-1] != expected).any()


# ---- batched matmul of two activations (attention) ----------------------------------------------------
def bmm_case(batch, M, N, K, arch, cfg, a_dtype="int8", out_dtype="int8", seed=0):
    """(func, args, expected): A [batch, M, K] x W [batch, N, K] (B^T), one (mult, shift)."""
    rng = np.random.default_rng(seed)
    A = (rng.integers(0, 256, (batch, M, K)).astype(np.uint8) if a_dtype == "uint8"
         else rng.integers(-128, 128, (batch, M, K)).astype(np.int8))
    W = rng.integers(-128, 128, (batch, N, K)).astype(np.int8)
    W[0, 0, :] = -128
    lo, hi = cm.OUT_DTYPES[out_dtype]
    mult = np.array([int(rng.integers(1 << 29, 1 << 31))], np.int64)
    shift = np.array([31 if out_dtype == "int32" else int(np.log2(np.sqrt(K) * 5500)) + 24], np.int64)
    f = cm.batch_matmul(batch, M, N, K, a_dtype, "int8", out_dtype, lo, hi, arch, cfg)
    acc = np.einsum("bmk,bnk->bmn", A.astype(np.int64), W.astype(np.int64))
    want = np.clip((acc * mult[0] + (np.int64(1) << (shift[0] - 1))) >> shift[0], lo, hi).astype(out_dtype)
    return f, (A, W, mult, shift, np.zeros((batch, M, N), out_dtype)), want


BMM_SIM = [
    # batch, M, N, K, arch, config, a_dtype, out_dtype
    (3, 17, 35, 40, "sm_80", C(bm=32, bn=32, bk=32, warps_m=1, warps_n=1, stages=2), "int8", "int8"),
    (2, 20, 24, 70, "sm_75", None, "uint8", "int8"),                                 # ragged K, byte copies
    (2, 16, 16, 32, "sm_90", None, "int8", "int16"),
    (4, 9, 8, 128, "sm_86", C(bm=16, bn=16, bk=64, warps_m=1, warps_n=1, warps_k=2, stages=3), "uint8", "uint8"),
    (2, 33, 17, 32, "sm_89", C(bm=32, bn=16, bk=32, warps_m=2, warps_n=1, stages=3), "int8", "int32"),  # odd N
]


@pytest.mark.parametrize("batch,M,N,K,arch,cfg,a_dtype,out", BMM_SIM,
                         ids=[f"bmm-{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}-{c[6]}" for c in BMM_SIM])
def test_simulated_batch_matmul_bit_exact(batch, M, N, K, arch, cfg, a_dtype, out):
    f, args, expected = bmm_case(batch, M, N, K, arch, cfg, a_dtype, out)
    run_kernel(f, *args)
    np.testing.assert_array_equal(args[-1], expected)


def test_batch_matmul_contract():
    f = cm.batch_matmul(12, 128, 128, 32, "int8", "int8", "int8", -128, 127, "sm_80")
    assert int(f.attrs["op_pattern"]) == 8 and f.attrs["qc.scheduled"]
    with pytest.raises(cm.KernelUnsupported, match="right operand"):
        cm.batch_matmul(2, 16, 16, 32, "int8", "uint8", "int8", -128, 127, "sm_80")
    with pytest.raises(cm.KernelUnsupported):
        cm.batch_matmul(2, 16, 16, 32, "int8", "int8", "int8", -128, 127, "sm_70")


@needs_sass
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_batch_matmul_int8(arch):
    text = sass(lambda a: cm.batch_matmul(12, 128, 128, 32, "int8", "int8", "int8", -128, 127, a), "bmm_qk", arch)
    assert_imma(text, "IMMA.16832.S8.S8", arch)
    text = sass(lambda a: cm.batch_matmul(12, 128, 32, 128, "uint8", "int8", "int8", -128, 127, a), "bmm_pv", arch)
    assert_imma(text, "IMMA.16832.U8.S8", arch)


# ---- Relax integration (compile only) ----------------------------------------------------------------
def test_relax_call_tir_compiles_for_cuda():
    from tvm import relax

    rng = np.random.default_rng(0)
    M, N, K = 8, 64, 96
    f1 = cm.dense(M, N, K, "int8", -128, 127, "sm_90")
    f2 = cm.dense_w4a8(M, N, N, "int8", 0, 127, "sm_90")
    f3 = cm.conv2d_nhwc(1, 4, 2, N, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", 0, 127, "sm_90", a_dtype="uint8")
    x = relax.Var("x", relax.TensorType((M, K), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            g1, g2, g3 = bb.add_func(f1, "qc_dense"), bb.add_func(f2, "qc_w4a8"), bb.add_func(f3, "qc_conv")
            # int64 constants must say so: relax.const(np.int64 array) silently makes int32
            b = relax.const(rng.integers(-9, 9, N).astype(np.int32))
            m = relax.const(np.full(N, 1 << 30, np.int64), "int64")
            s = relax.const(np.full(N, 33, np.int64), "int64")
            y = bb.emit(relax.call_tir(g1, [x, relax.const(rng.integers(-128, 128, (N, K)).astype(np.int8)), b, m, s],
                                       relax.TensorType((M, N), "int8")))
            w4 = relax.const(pack_int4(rng.integers(-8, 8, (N, N)), "mma_k32"))
            z = bb.emit(relax.call_tir(g2, [y, w4, b, m, s], relax.TensorType((M, N), "int8")))
            zu = bb.emit(relax.op.reshape(relax.op.astype(z, "uint8"), (1, 4, 2, N)))
            b3 = relax.const(np.zeros(32, np.int32))
            m3 = relax.const(np.full(32, 1 << 30, np.int64), "int64")
            s3 = relax.const(np.full(32, 33, np.int64), "int64")
            o = bb.emit_output(relax.call_tir(g3, [zu, relax.const(rng.integers(-128, 128, (32, 9 * N)).astype(np.int8)),
                                                  b3, m3, s3], relax.TensorType((1, 4, 2, 32), "int8")))
        bb.emit_func_output(o)
    ex = tvm.compile(bb.get(), target=cm.cuda_target("sm_90"))
    names = set(re.findall(r'__global__ void __launch_bounds__\(\d+\) (\w+)\(', cm.cuda_source(ex)))
    assert {"qc_dense_kernel", "qc_w4a8_kernel", "qc_conv_kernel"} <= names
    if NVCC and _has_cuobjdump():
        assert "IMMA.16832" in cm.sass_of(ex, "sm_90")


# ---- on a GPU --------------------------------------------------------------------------------------
def _gpu_arch():
    dev = tvm.cuda(0)
    return f"sm_{dev.compute_version.replace('.', '')}"


gpu = pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA GPU")

def _run_on_gpu(f, arch, args, expected):
    """Build for the GPU's arch, run once on device 0, compare the output (last argument) exactly."""
    lib = cm.build(f, arch)
    dev = tvm.cuda(0)
    targs = [tvm.runtime.tensor(a, dev) for a in args]
    lib["main"](*targs)
    np.testing.assert_array_equal(targs[-1].numpy(), expected)


GPU_DENSE = [
    ("dense", 1, 4096, 4096, None), ("dense", 37, 200, 300, None), ("dense", 256, 512, 1024, None),
    ("dense", 1000, 1000, 1000, C(bm=128, bn=128, bk=64, warps_m=2, warps_n=2, stages=3)),
    ("dense", 64, 64, 30, None), ("w4a8", 1, 4096, 4096, None), ("w4a8", 33, 256, 200, None),
    ("int4", 64, 256, 512, None), ("int4", 5, 40, 100, None),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind,M,N,K,cfg", GPU_DENSE, ids=[f"{c[0]}-{c[1]}x{c[2]}x{c[3]}" for c in GPU_DENSE])
def test_gpu_dense_bit_exact(kind, M, N, K, cfg):
    arch = _gpu_arch()
    if not cm.supports(arch, "int4" if kind == "int4" else "dense"):
        pytest.skip(f"{kind} not supported on {arch}")
    cm.ensure_cuda_jit()
    f, args, expected = dense_case(kind, M, N, K, arch, cfg, a_dtype="int4" if kind == "int4" else "int8")
    _run_on_gpu(f, arch, args, expected)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("geom", [(1, 56, 56, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
                                  (2, 15, 17, 3, 32, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1)),
                                  (4, 14, 14, 256, 128, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1))])
def test_gpu_conv_bit_exact(geom):
    arch = _gpu_arch()
    cm.ensure_cuda_jit()
    f, args, expected = conv_case(geom, arch, None)
    _run_on_gpu(f, arch, args, expected)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch,M,N,K,a_dtype", [(12, 128, 128, 32, "int8"), (12, 128, 32, 128, "uint8"),
                                                 (5, 37, 50, 70, "int8")])
def test_gpu_batch_matmul_bit_exact(batch, M, N, K, a_dtype):
    arch = _gpu_arch()
    cm.ensure_cuda_jit()
    f, args, expected = bmm_case(batch, M, N, K, arch, None, a_dtype)
    _run_on_gpu(f, arch, args, expected)


# ---- symbolic dims: one kernel for every row count / batch / sequence -----------------------------
def _at(func, *arrays):
    """``func`` with its symbolic dims bound by the shapes of its leading buffer params ``arrays``
    (``PrimFunc.specialize``), simplified so the simulator sees integer extents."""
    spec = func.specialize({p: tvm.tirx.decl_buffer(a.shape, str(a.dtype)) for p, a in zip(func.params, arrays)})
    return tvm.tirx.transform.StmtSimplify()(tvm.IRModule({"main": spec}))["main"]


@pytest.mark.parametrize("kind", ["dense", "w4a8"])
def test_simulated_dense_over_a_symbolic_row_count_bit_exact(kind):
    """One kernel for M = batch x sequence: ceil(M / bm) CTAs, rows guarded; equal to the NumPy
    reference at M = 1, a prime, the tile edge and past the representative size."""
    from qcompiler.tune.workload import rows_at

    rows = tvm.tirx.Var("rows", "int64")
    with rows_at({"rows": 40}):
        build = cm.dense if kind == "dense" else cm.dense_w4a8
        f = build(rows, 40, 100, "int8", -100, 127, "sm_80")
    assert not isinstance(f.params[0].shape[0], (int, tvm.tirx.IntImm))   # A [M, K]: M a variable
    for m in (1, 5, 16, 17, 71):
        _, args, expected = dense_case(kind, m, 40, 100, "sm_80", None, "int8", -100, 127)
        run_kernel(_at(f, args[0]), *args)
        np.testing.assert_array_equal(args[-1], expected, err_msg=f"M={m}")


def test_simulated_conv_over_a_symbolic_batch_bit_exact():
    from qcompiler.tune.workload import rows_at

    n = tvm.tirx.Var("n", "int64")
    geo = (6, 7, 16, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    with rows_at({"n": 2}):
        f = cm.conv2d_nhwc(n, *geo, "int8", -128, 127, "sm_80")
    for batch in (1, 2, 3):
        _, args, expected = conv_case((batch, *geo), "sm_80", None)
        run_kernel(_at(f, args[0]), *args)
        np.testing.assert_array_equal(args[-1], expected, err_msg=f"N={batch}")


@pytest.mark.parametrize("which", ["qk", "pv"])
def test_simulated_attention_matmul_over_symbolic_batch_and_sequence_bit_exact(which):
    """Q.K^T ([b, s, dh] x [b, s, dh]^T: batch, rows and columns symbolic) and P.V ([b, s, s] x
    [b, dh, s]^T: the depth symbolic too, byte copies with every k guarded) at sequence 1, primes,
    the tile edge and beyond the representative size."""
    from qcompiler.tune.workload import rows_at

    b, s = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")
    dh = 32
    a_dtype = "int8" if which == "qk" else "uint8"
    with rows_at({"b": 2, "s": 24}):
        f = (cm.batch_matmul(b, s, s, dh, a_dtype, "int8", "int8", -128, 127, "sm_80") if which == "qk" else
             cm.batch_matmul(b, s, dh, s, a_dtype, "int8", "int8", -128, 127, "sm_80"))
    for batch, seq in ((1, 1), (2, 5), (3, 17), (1, 32), (2, 70)):
        n, k = (seq, dh) if which == "qk" else (dh, seq)
        _, args, expected = bmm_case(batch, seq, n, k, "sm_80", None, a_dtype=a_dtype)
        run_kernel(_at(f, args[0], args[1]), *args)
        np.testing.assert_array_equal(args[-1], expected, err_msg=f"batch={batch} seq={seq}")


@needs_sass
def test_sass_of_symbolic_kernels_is_imma():
    from qcompiler.tune.workload import rows_at

    rows = tvm.tirx.Var("rows", "int64")
    with rows_at({"rows": 64}):
        f = cm.batch_matmul(rows, rows, 32, rows, "uint8", "int8", "int8", -128, 127, "sm_80")
    text = cm.sass_of(cm.build(f, "sm_80", "bmm_sym"), "sm_80")
    assert "IMMA.16832" in text and "LDL" not in text and "STL" not in text
