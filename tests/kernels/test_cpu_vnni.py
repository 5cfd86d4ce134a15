"""CPU INT8 kernels (qcompiler.kernels.cpu_vnni) against a NumPy reference, element for element.

The GEMM kernels (dense, conv, batch_matmul) run once per ISA (``isa`` fixture: AVX-512 VNNI, AVX2),
each where the host has it; the direct depthwise / grouped kernels need neither.

Reference: accumulators in int64 (the products of a GEMM summed by a float64 matmul, exact here:
every partial sum is an integer below 2^53), then the contract's requantization in int64:
    out = clip((acc * mult + (1 << (shift - 1))) >> shift, lo, hi).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from qcompiler.kernels import cpu_vnni as cv  # noqa: E402
from qcompiler.targets import host_has_avx2  # noqa: E402

needs_vnni = pytest.mark.skipif(not cv.host_has_vnni(), reason="CPU without AVX-512 VNNI: kernels cannot run here")
needs_avx2 = pytest.mark.skipif(not host_has_avx2(), reason="CPU without AVX2: kernels cannot run here")

RANGES = {"int8": [(-128, 127)], "uint8": [(0, 255), (0, 127)], "int16": [(-32768, 32767), (0, 32767)],
          "int32": [(-(2**31), 2**31 - 1)]}


@pytest.fixture(params=[pytest.param(cv.VNNI, marks=needs_vnni, id="vnni"),
                        pytest.param(cv.AVX2, marks=needs_avx2, id="avx2")])
def isa(request):
    return request.param


@pytest.fixture(scope="module")
def target():
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


# ---- NumPy reference --------------------------------------------------------------------------
def requant_ref(acc, mult, shift, lo, hi, dtype):
    t = acc.astype(np.int64) * mult.astype(np.int64) + (np.int64(1) << (shift.astype(np.int64) - 1))
    return np.clip(t >> shift.astype(np.int64), lo, hi).astype(dtype)


def dense_acc_ref(a, w, bias):
    return (a.astype(np.float64) @ w.astype(np.float64)).astype(np.int64) + bias.astype(np.int64)


def conv_acc_ref(x, w, strides, pads, dilations, groups=1):
    """int64 accumulators of an NHWC conv, weights [OC, C/g, KH, KW], zero padding."""
    n, h, wd, c = x.shape
    oc, cg, kh_, kw_ = w.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilations, pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (h + pt + pb - dh * (kh_ - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw_ - 1) - 1) // sw + 1
    acc = np.zeros((n, oh, ow, oc))
    ocg = oc // groups
    for g in range(groups):
        for kh in range(kh_):
            for kw in range(kw_):
                patch = xp[:, kh * dh: kh * dh + (oh - 1) * sh + 1: sh, kw * dw: kw * dw + (ow - 1) * sw + 1: sw,
                           g * cg:(g + 1) * cg]
                acc[..., g * ocg:(g + 1) * ocg] += patch @ w[g * ocg:(g + 1) * ocg, :, kh, kw].astype(np.float64).T
    return acc.astype(np.int64)


# ---- helpers ------------------------------------------------------------------------------------
def rand_act(rng, shape, dtype):
    lo, hi = (-128, 128) if dtype == "int8" else (0, 256)
    return rng.integers(lo, hi, shape).astype(dtype)


class AddClip:
    """A fused epilogue (``cpu_vnni.Post``): (shared by the depthwise and symbolic-row tests) clip(y + r * c0, -128, 127) with one int8 extra input."""

    extra_dtypes = ("int8",)
    n_consts = 1
    out_dtype = "int8"

    def __call__(self, y, extras, k):
        t = y + extras[0] * k(0)
        return tirx.max(tirx.min(t, tirx.const(127, "int64")), tirx.const(-128, "int64"))


def rand_requant(rng, n, big_acc=True):
    """Per-channel (bias, mult, shift) with negative and zero multipliers and shifts 1..62."""
    mult = rng.integers(1, 2**31, n).astype(np.int64)
    mult[rng.random(n) < 0.3] *= -1
    mult[rng.random(n) < 0.1] = 0
    shift = rng.integers(18, 34, n).astype(np.int64) if big_acc else rng.integers(1, 63, n).astype(np.int64)
    shift[rng.random(n) < 0.1] = rng.integers(1, 63)
    bias = rng.integers(-(2**20), 2**20, n).astype(np.int32)
    return bias, mult, shift


def build(func, target):
    """Standalone build: the kernels carry no global symbol (Relax names them), so give one."""
    return tvm.tirx.build(func.with_attr("global_symbol", "main"), target=target)


def run(target, func, args, out_shape, out_dtype):
    lib = build(func, target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype), dev)
    lib(*[tvm.runtime.tensor(a, dev) for a in args], out)
    return out.numpy(), lib


def check_dense(target, rng, M, N, K, a_dtype, out_dtype, lo, hi, config=None, isa=cv.VNNI):
    a = rand_act(rng, (M, K), a_dtype)
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, N)
    wp, be = cv.pack_dense(w, bias, a_signed=a_dtype == "int8", isa=isa)
    func = cv.dense(M, N, K, a_dtype, out_dtype, lo, hi, config, isa=isa)
    got, lib = run(target, func, [a, wp, be, mult, shift], (M, N), out_dtype)
    want = requant_ref(dense_acc_ref(a, w, bias), mult, shift, lo, hi, out_dtype)
    np.testing.assert_array_equal(got, want, err_msg=f"dense {M}x{N}x{K} {a_dtype}->{out_dtype} {config}")
    return lib


def check_conv(target, rng, N, H, W, C, OC, KH, KW, strides, pads, dil, a_dtype, out_dtype, lo, hi, config=None,
               isa=cv.VNNI):
    x = rand_act(rng, (N, H, W, C), a_dtype)
    w = rng.integers(-128, 128, (OC, C, KH, KW)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, OC)
    wp, be = cv.pack_conv(w, bias, a_signed=a_dtype == "int8", isa=isa)
    func = cv.conv2d_nhwc(N, H, W, C, OC, KH, KW, strides, pads, dil, a_dtype, out_dtype, lo, hi, config, isa=isa)
    want = requant_ref(conv_acc_ref(x, w, strides, pads, dil) + bias, mult, shift, lo, hi, out_dtype)
    got, lib = run(target, func, [x, wp, be, mult, shift], want.shape, out_dtype)
    np.testing.assert_array_equal(got, want, err_msg=f"conv {x.shape} {w.shape} s{strides} p{pads} d{dil}")
    return lib


def random_io(rng):
    a_dtype = str(rng.choice(["int8", "uint8"]))
    out_dtype = str(rng.choice(["int8", "uint8", "int16", "int32"]))
    lo, hi = RANGES[out_dtype][rng.integers(len(RANGES[out_dtype]))]
    return a_dtype, out_dtype, lo, hi


# ---- packing and configuration --------------------------------------------------------------------
def test_pack_dense_layout_and_offset_bias():
    rng = np.random.default_rng(1)
    K, N = 13, 37
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    bias = rng.integers(-1000, 1000, N).astype(np.int32)
    wp, be = cv.pack_dense(w, bias, a_signed=True)
    assert wp.shape == (3, 4, 16, 4) and wp.dtype == np.int8 and be.dtype == np.int32
    for nb, kb, i, j in np.ndindex(*wp.shape):
        k, n = 4 * kb + j, 16 * nb + i
        assert wp[nb, kb, i, j] == (w[k, n] if k < K and n < N else 0)
    np.testing.assert_array_equal(be, bias - 128 * w.astype(np.int64).sum(0))
    _, be_u = cv.pack_dense(w, bias, a_signed=False)
    np.testing.assert_array_equal(be_u, bias)
    _, be_none = cv.pack_dense(w, None, a_signed=False)
    assert (be_none == 0).all()


def test_pack_dense_avx2_layout():
    rng = np.random.default_rng(3)
    K, N = 13, 37
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    wp, _ = cv.pack_dense(w, None, a_signed=True, isa=cv.AVX2)
    assert wp.shape == (5, 8, 8, 2)  # N -> 5 blocks of 8, K -> 16 (a multiple of 4) in pairs
    for nb, kb, i, j in np.ndindex(*wp.shape):
        k, n = 2 * kb + j, 8 * nb + i
        assert wp[nb, kb, i, j] == (w[k, n] if k < K and n < N else 0)


def test_pack_conv_reduction_order():
    rng = np.random.default_rng(2)
    OC, C, KH, KW = 20, 6, 3, 2
    w = rng.integers(-128, 128, (OC, C, KH, KW)).astype(np.int8)
    wp, _ = cv.pack_conv(w, None, a_signed=False)
    Cp = 8
    assert wp.shape == (2, KH * KW * Cp // 4, 16, 4)
    for oc, c, kh, kw in np.ndindex(OC, C, KH, KW):
        k = (kh * KW + kw) * Cp + c
        assert wp[oc // 16, k // 4, oc % 16, k % 4] == w[oc, c, kh, kw]


def test_config_validation_and_default():
    with pytest.raises(ValueError):
        cv.VnniConfig(mr=0)
    with pytest.raises(ValueError):
        cv.VnniConfig(mr=7, nr=4)  # 28 accumulators + 4 + 1 > 32 zmm
    with pytest.raises(ValueError):
        cv.VnniConfig(kc=6)
    for M, N, K in [(1, 4096, 4096), (1024, 1024, 1024), (3136, 64, 576), (49, 2048, 512), (5, 80, 3), (7, 176, 9)]:
        cfg = cv.default_config(M, N, K)
        assert (-(-N // 16)) % cfg.nr == 0
    with pytest.raises(ValueError):
        cv.dense(8, 48, 8, "int8", "int8", -128, 127, cv.VnniConfig(mr=2, nr=2))  # 2 does not divide 3
    with pytest.raises(ValueError):
        cv.dense(8, 16, 8, "int8", "int8", 0, 300, None)  # clip range outside int8
    for M, N, K in [(1, 4096, 4096), (1024, 1024, 1024), (3136, 64, 576), (49, 2048, 512), (5, 80, 3), (7, 56, 9)]:
        cfg = cv.default_config(M, N, K, isa=cv.AVX2)
        assert (-(-N // 8)) % cfg.nr == 0 and cv.AVX2.fits(cfg.mr, cfg.nr)
    with pytest.raises(ValueError, match="does not fit"):
        cv.dense(8, 64, 8, "int8", "int8", -128, 127, cv.VnniConfig(mr=3, nr=4), isa=cv.AVX2)  # 17 > 16 ymm


def test_small_gemms_run_serially():
    """Below SERIAL_CYCLES the default config runs on the calling thread (no parallel launch); one
    tile keeps the legacy parallel=True (TVM launches nothing for it either); large GEMMs are parallel."""
    for isa in (cv.VNNI, cv.AVX2):
        small, large = cv.default_config(4, 64, 256, isa=isa), cv.default_config(256, 512, 1024, isa=isa)
        assert not small.parallel and large.parallel
        assert cv.default_config(1, 8, 64, isa=isa).parallel  # one tile
        assert cv.gemm_cycles(4, 64, 256, isa=isa) < cv.SERIAL_CYCLES <= cv.gemm_cycles(256, 512, 1024, isa=isa)
    assert "T.parallel" not in cv.dense(4, 64, 256, "int8", "int8", -128, 127, isa=cv.AVX2).script()
    assert "T.parallel" in cv.dense(256, 512, 1024, "int8", "int8", -128, 127, isa=cv.AVX2).script()
    assert "T.parallel" not in cv.depthwise_conv2d_nhwc(1, 6, 6, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8",
                                                        "int8", -128, 127).script()
    assert "T.parallel" in cv.depthwise_conv2d_nhwc(1, 56, 56, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8",
                                                    "int8", -128, 127).script()


def test_function_attributes():
    f = cv.dense(8, 16, 8, "int8", "int8", -128, 127)
    assert bool(f.attrs["qc.scheduled"]) and bool(f.attrs["tirx.is_scheduled"])
    assert "global_symbol" not in f.attrs


# ---- dense ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(16))
def test_dense_random_shapes(target, isa, seed):
    rng = np.random.default_rng(100 + seed)
    M, N, K = (int(v) for v in (rng.integers(1, 70), rng.integers(1, 100), rng.integers(1, 300)))
    check_dense(target, rng, M, N, K, *random_io(rng), isa=isa)


@pytest.mark.parametrize("a_dtype,out_dtype,lo,hi", [
    ("int8", "int8", -128, 127), ("int8", "uint8", 0, 127), ("uint8", "uint8", 0, 255),
    ("uint8", "int32", -(2**31), 2**31 - 1), ("int8", "int16", -32768, 32767)])
def test_dense_dtypes_ragged(target, isa, a_dtype, out_dtype, lo, hi):
    check_dense(target, np.random.default_rng(7), 45, 83, 101, a_dtype, out_dtype, lo, hi, isa=isa)


@pytest.mark.parametrize("config", [cv.VnniConfig(1, 1), cv.VnniConfig(6, 4, kc=64, n_outer=False),
                                    cv.VnniConfig(7, 2, n_outer=True), cv.VnniConfig(16, 1), cv.VnniConfig(3, 4, kc=32),
                                    cv.VnniConfig(2, 4, kc=64, n_outer=False), cv.VnniConfig(6, 2), cv.VnniConfig(14, 1),
                                    cv.VnniConfig(3, 2, parallel=False),
                                    cv.VnniConfig(2, 4, kc=64, n_outer=False, parallel=False)])
def test_dense_configs(target, isa, config):
    if not isa.fits(config.mr, config.nr):  # the kernel refuses a tile beyond the ISA's registers
        with pytest.raises(ValueError, match="does not fit"):
            cv.dense(50, 64, 256, "int8", "int8", -128, 127, config, isa=isa)
        return
    check_dense(target, np.random.default_rng(8), 50, 64, 256, "int8", "int8", -128, 127, config, isa=isa)


def test_dense_large_and_asm(target, isa):
    lib = check_dense(target, np.random.default_rng(9), 256, 512, 1024, "int8", "int8", -128, 127, isa=isa)
    asm = lib.inspect_source("asm")
    if isa is cv.VNNI:
        assert "vpdpbusd" in asm
    else:  # on a host with AVX-512 VNNI, LLVM fuses the AVX2 kernel's vpmaddwd + vpaddd into vpdpwssd
        assert "vpmaddwd" in asm or "vpdpwssd" in asm


def test_asm_has_vpdpbusd_without_running():
    lib = build(cv.dense(16, 32, 64, "uint8", "uint8", 0, 255), tvm.target.Target({"kind": "llvm", "mcpu": "znver5"}))
    asm = lib.inspect_source("asm")
    assert "vpdpbusd" in asm and "zmm" in asm


def test_asm_avx2_has_vpmaddwd_without_running():
    f = cv.dense(16, 32, 64, "int8", "uint8", 0, 255, isa=cv.AVX2)
    asm = build(f, tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})).inspect_source("asm")
    assert "vpmaddwd" in asm and "ymm" in asm and "zmm" not in asm and "vpdpbusd" not in asm


def test_dense_saturation_and_zero_mult(target, isa):
    """Accumulators near the int32 limits, tiny shifts (saturating clip), zero multipliers."""
    M, N, K = 9, 33, 40
    a = np.full((M, K), -128, np.int8)
    a[::2] = 127
    w = np.full((K, N), -128, np.int8)
    w[:, 1::3] = 127
    bias = np.zeros(N, np.int32)
    mult = np.where(np.arange(N) % 4 == 0, 0, (2**31 - 1) * np.where(np.arange(N) % 2 == 0, 1, -1)).astype(np.int64)
    shift = np.full(N, 1, np.int64)
    shift[::5] = 62
    wp, be = cv.pack_dense(w, bias, a_signed=True, isa=isa)
    func = cv.dense(M, N, K, "int8", "int8", -128, 127, isa=isa)
    got, _ = run(target, func, [a, wp, be, mult, shift], (M, N), "int8")
    np.testing.assert_array_equal(got, requant_ref(dense_acc_ref(a, w, bias), mult, shift, -128, 127, "int8"))
    # accumulators within 2^-10 of the int32 limits, at the kernel's largest K (cv.MAX_K): the
    # kernel accumulates uint8 x int8 (int8 activations through the +128 offset, folded into the
    # bias), so activations 255 (uint8) / 127 (int8) against weights -128 over K = 65792 reach
    # -2,147,450,880 = INT32_MIN + 32,768, and against 127 +2,130,673,920
    for a_dtype, a_hi, a_lo in (("uint8", 255, 0), ("int8", 127, -128)):
        M, N, K = 4, 33, 65792
        assert K <= cv.MAX_K
        a = np.full((M, K), a_lo, a_dtype)
        a[::2] = a_hi
        w = np.full((K, N), -128, np.int8)
        w[:, 1::3] = 127
        bias = np.zeros(N, np.int32)
        acc = dense_acc_ref(a, w, bias)
        kernel_acc = dense_acc_ref((a.astype(np.int64) + (128 if a_dtype == "int8" else 0)), w, bias)
        lim = 2**31
        assert kernel_acc.min() <= -lim * (1 - 2**-10) and kernel_acc.max() >= lim * (1 - 2**-6), \
            (kernel_acc.min(), kernel_acc.max())
        assert kernel_acc.max() < lim and kernel_acc.min() >= -lim
        mult = np.full(N, 2**30, np.int64)
        shift = np.full(N, 24, np.int64)     # acc * 2^30 >> 24 = acc * 64: saturates
        shift[::2] = 54                      # acc * 2^30 >> 54 = acc / 2^24: in [-128, 127], shows acc
        wp, be = cv.pack_dense(w, bias, a_signed=a_dtype == "int8", isa=isa)
        func = cv.dense(M, N, K, a_dtype, "int8", -128, 127, isa=isa)
        got, _ = run(target, func, [a, wp, be, mult, shift], (M, N), "int8")
        want = requant_ref(acc, mult, shift, -128, 127, "int8")
        assert len(np.unique(want[:, ::2])) > 2  # the unsaturated columns show the accumulator's value
        np.testing.assert_array_equal(got, want, err_msg=f"{a_dtype} K={K}")


# ---- convolutions ---------------------------------------------------------------------------------
CONV_CASES = [
    # N, H, W, C, OC, KH, KW, strides, pads (t, l, b, r), dilations
    (1, 9, 7, 5, 20, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 9, 7, 8, 20, 3, 2, (2, 1), (0, 1, 2, 0), (1, 2)),
    (1, 8, 8, 16, 32, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),  # 1x1: in-place GEMM for uint8
    (1, 11, 13, 3, 17, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1)),  # stem-like, C % 4 != 0
    (2, 6, 5, 12, 48, 3, 3, (1, 2), (2, 0, 1, 1), (2, 1)),
    (1, 10, 10, 32, 16, 2, 2, (2, 2), (0, 0, 0, 0), (1, 1)),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_conv2d(target, isa, case, a_dtype):
    rng = np.random.default_rng(zlib.crc32(repr((case, a_dtype)).encode()))
    _, out_dtype, lo, hi = random_io(rng)
    check_conv(target, rng, *case, a_dtype, out_dtype, lo, hi, isa=isa)


@pytest.mark.parametrize("seed", range(10))
def test_conv2d_random_shapes(target, isa, seed):
    rng = np.random.default_rng(200 + seed)
    while True:
        N, H, W = int(rng.integers(1, 3)), int(rng.integers(1, 13)), int(rng.integers(1, 13))
        C, OC = int(rng.integers(1, 21)), int(rng.integers(1, 41))
        KH, KW = (int(v) for v in rng.integers(1, 4, 2))
        strides, dil = tuple(int(v) for v in rng.integers(1, 3, 2)), tuple(int(v) for v in rng.integers(1, 3, 2))
        pads = tuple(int(v) for v in rng.integers(0, 3, 4))
        if H + pads[0] + pads[2] > dil[0] * (KH - 1) and W + pads[1] + pads[3] > dil[1] * (KW - 1):
            break
    check_conv(target, rng, N, H, W, C, OC, KH, KW, strides, pads, dil, *random_io(rng), isa=isa)


def test_conv2d_signed_padding_is_real_zero(target, isa):
    """All-negative int8 input: a padded tap must contribute as a real 0, not as the byte 128 (= -0)."""
    rng = np.random.default_rng(11)
    N, H, W, C, OC = 1, 5, 6, 8, 16
    x = np.full((N, H, W, C), -128, np.int8)
    w = rng.integers(-128, 128, (OC, C, 3, 3)).astype(np.int8)
    bias = np.zeros(OC, np.int32)
    mult, shift = np.full(OC, 2, np.int64), np.ones(OC, np.int64)  # identity: out = acc
    wp, be = cv.pack_conv(w, bias, a_signed=True, isa=isa)
    func = cv.conv2d_nhwc(N, H, W, C, OC, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", "int32", -(2**31), 2**31 - 1,
                          isa=isa)
    got, _ = run(target, func, [x, wp, be, mult, shift], (N, H, W, OC), "int32")
    np.testing.assert_array_equal(got, conv_acc_ref(x, w, (1, 1), (1, 1, 1, 1), (1, 1)))


@pytest.mark.parametrize("config", [cv.VnniConfig(1, 2), cv.VnniConfig(5, 1, kc=8), cv.VnniConfig(4, 1, parallel=False)])
def test_conv2d_configs(target, isa, config):
    check_conv(target, np.random.default_rng(12), 1, 7, 9, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1),
               "int8", "uint8", 0, 255, config, isa=isa)


DW_CASES = [
    (1, 9, 7, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 9, 11, 24, 3, 3, (2, 2), (1, 0, 1, 2), (1, 1)),
    (1, 10, 10, 72, 5, 5, (1, 1), (2, 2, 2, 2), (2, 2)),
    (1, 8, 8, 64, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 40, 40, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),  # large enough to run in parallel
]


@needs_avx2
@pytest.mark.parametrize("case", DW_CASES)
@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_depthwise(target, case, a_dtype):
    N, H, W, C, KH, KW, strides, pads, dil = case
    rng = np.random.default_rng(zlib.crc32(repr((case, a_dtype)).encode()))
    _, out_dtype, lo, hi = random_io(rng)
    x = rand_act(rng, (N, H, W, C), a_dtype)
    w = rng.integers(-128, 128, (C, 1, KH, KW)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, C)
    want = requant_ref(conv_acc_ref(x, w, strides, pads, dil, groups=C) + bias, mult, shift, lo, hi, out_dtype)
    func = cv.depthwise_conv2d_nhwc(N, H, W, C, KH, KW, strides, pads, dil, a_dtype, out_dtype, lo, hi)
    wd = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))  # [KH, KW, C]
    got, _ = run(target, func, [x, wd, bias, mult, shift], want.shape, out_dtype)
    np.testing.assert_array_equal(got, want)


GROUPED_CASES = [
    # N, H, W, C, OC, KH, KW, strides, pads, dilations, groups
    (1, 9, 7, 6, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2),  # Cg 3, OCg 6: vector over groups
    (1, 9, 7, 6, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 6),  # depthwise, channel multiplier 2
    (2, 8, 9, 64, 64, 3, 3, (2, 1), (1, 1, 0, 0), (1, 1), 4),  # OCg 16: vector over OCg
    (1, 6, 6, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 16),  # ResNeXt-like Cg 4, OCg 4
]


@needs_avx2
@pytest.mark.parametrize("case", GROUPED_CASES)
@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_grouped(target, case, a_dtype):
    N, H, W, C, OC, KH, KW, strides, pads, dil, groups = case
    rng = np.random.default_rng(zlib.crc32(repr((case, a_dtype)).encode()))
    _, out_dtype, lo, hi = random_io(rng)
    x = rand_act(rng, (N, H, W, C), a_dtype)
    w = rng.integers(-128, 128, (OC, C // groups, KH, KW)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, OC)
    want = requant_ref(conv_acc_ref(x, w, strides, pads, dil, groups) + bias, mult, shift, lo, hi, out_dtype)
    func = cv.grouped_conv2d_nhwc(N, H, W, C, OC, KH, KW, strides, pads, dil, groups, a_dtype, out_dtype, lo, hi)
    got, _ = run(target, func, [x, w, bias, mult, shift], want.shape, out_dtype)
    np.testing.assert_array_equal(got, want)


# ---- batched matmul of two activations (attention Q.K^T, P.V) ----------------------------------------------
def check_bmm(target, rng, batch, M, N, K, a_dtype, out_dtype, lo, hi, b_trans=False, config=None, isa=cv.VNNI):
    a = rand_act(rng, (batch, M, K), a_dtype)
    b = rng.integers(-128, 128, (batch, K, N)).astype(np.int8)
    b[0, :, 0] = -128                                  # extreme column sums
    mult = np.array([int(rng.integers(-(2**31) + 1, 2**31))], np.int64)
    shift = np.array([int(rng.integers(14, 30))], np.int64)
    func = cv.batch_matmul(batch, M, N, K, a_dtype, "int8", out_dtype, lo, hi, config, b_trans=b_trans, isa=isa)
    bin_ = np.ascontiguousarray(b.transpose(0, 2, 1)) if b_trans else b
    got, lib = run(target, func, [a, bin_, mult, shift], (batch, M, N), out_dtype)
    acc = np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)
    want = requant_ref(acc, mult, shift, lo, hi, out_dtype)
    np.testing.assert_array_equal(got, want, err_msg=f"bmm {batch}x{M}x{N}x{K} {a_dtype} b_trans={b_trans}")
    return lib


@pytest.mark.parametrize("shape", [(3, 17, 35, 29), (2, 33, 40, 64), (2, 5, 16, 7), (1, 1, 1, 1), (4, 128, 32, 128),
                                   (12, 20, 20, 32)])
@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("b_trans", [False, True])
def test_batch_matmul(target, isa, shape, a_dtype, b_trans):
    rng = np.random.default_rng(zlib.crc32(repr((shape, a_dtype, b_trans)).encode()))
    _, out_dtype, lo, hi = random_io(rng)
    check_bmm(target, rng, *shape, a_dtype, out_dtype, lo, hi, b_trans, isa=isa)


@pytest.mark.parametrize("seed", range(4))
def test_batch_matmul_random_shapes(target, isa, seed):
    rng = np.random.default_rng(500 + seed)
    batch, M, N, K = (int(rng.integers(1, hi)) for hi in (5, 40, 70, 90))
    a_dtype = ["int8", "uint8"][seed % 2]
    check_bmm(target, rng, batch, M, N, K, a_dtype, "int8", -128, 127, b_trans=bool(seed // 2),
              config=cv.VnniConfig(int(rng.integers(1, 6)), 1), isa=isa)


def test_batch_matmul_saturating_offset_sums(target, isa):
    """int8 A = -128 everywhere and B = -128: the offset sum is 0 and the column sums are extreme."""
    batch, M, N, K = 2, 5, 18, 300
    a = np.full((batch, M, K), -128, np.int8)
    b = np.full((batch, K, N), -128, np.int8)
    b[1] = 127
    mult, shift = np.array([1], np.int64), np.array([8], np.int64)
    func = cv.batch_matmul(batch, M, N, K, "int8", "int8", "int32", -(2**31), 2**31 - 1, isa=isa)
    got, _ = run(target, func, [a, b, mult, shift], (batch, M, N), "int32")
    acc = np.matmul(a.astype(np.int64), b.astype(np.int64))
    np.testing.assert_array_equal(got, requant_ref(acc, mult, shift, -(2**31), 2**31 - 1, "int32"))


def test_batch_matmul_asm_has_vpdpbusd_without_running():
    for b_trans, a_dtype in ((False, "uint8"), (True, "int8")):
        f = cv.batch_matmul(12, 128, 128, 32, a_dtype, "int8", "int8", -128, 127, b_trans=b_trans)
        asm = build(f, tvm.target.Target({"kind": "llvm", "mcpu": "znver5"})).inspect_source("asm")
        assert "vpdpbusd" in asm and "zmm" in asm


def test_batch_matmul_rejects():
    with pytest.raises(ValueError, match="int8 right operand"):
        cv.batch_matmul(1, 4, 4, 4, "int8", "uint8", "int8", -128, 127)
    with pytest.raises(ValueError, match="overflow"):
        cv.batch_matmul(1, 4, 4, cv.MAX_K + 1, "int8", "int8", "int8", -128, 127)


# ---- through Relax: call_tir with constant weights in tvm.compile ------------------------------------------
@needs_vnni
def test_relax_call_tir(target):
    rng = np.random.default_rng(13)
    N, H, W, C, OC = 1, 6, 6, 8, 20
    M, K = N * 6 * 6, OC  # a dense after the conv, over the flattened pixels
    wc = rng.integers(-128, 128, (OC, C, 3, 3)).astype(np.int8)
    bc, mc, sc = rand_requant(rng, OC)
    wd = rng.integers(-128, 128, (K, 24)).astype(np.int8)
    bd, md, sd = rand_requant(rng, 24)
    wcp, bce = cv.pack_conv(wc, bc, a_signed=True)
    wdp, bde = cv.pack_dense(wd, bd, a_signed=False)
    conv = cv.conv2d_nhwc(N, H, W, C, OC, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", "uint8", 0, 255)
    dense = cv.dense(M, 24, K, "uint8", "int8", -128, 127)

    def const64(v):  # relax.const silently narrows int64 NumPy arrays to int32 without the dtype
        return relax.const(v, "int64")

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape=(N, H, W, C), dtype="int8"))
    with bb.function("main", [x]):
        g_conv = bb.add_func(conv, "qc_conv")
        g_dense = bb.add_func(dense, "qc_dense")
        with bb.dataflow():
            y = bb.emit(relax.call_tir(g_conv, [x, relax.const(wcp), relax.const(bce), const64(mc), const64(sc)],
                                       relax.TensorType(shape=(N, H, W, OC), dtype="uint8")))
            y2 = bb.emit(relax.op.reshape(y, (M, K)))
            z = bb.emit(relax.call_tir(g_dense, [y2, relax.const(wdp), relax.const(bde), const64(md), const64(sd)],
                                       relax.TensorType(shape=(M, 24), dtype="int8")))
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target)
    assert any("vpdpbusd" in m.inspect_source("asm") for m in ex.mod.imports if m.kind == "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xv = rand_act(rng, (N, H, W, C), "int8")
    got = vm["main"](tvm.runtime.tensor(xv)).numpy()
    y_ref = requant_ref(conv_acc_ref(xv, wc, (1, 1), (1, 1, 1, 1), (1, 1)) + bc, mc, sc, 0, 255, "uint8")
    want = requant_ref(dense_acc_ref(y_ref.reshape(M, K), wd, bd), md, sd, -128, 127, "int8")
    np.testing.assert_array_equal(got, want)
