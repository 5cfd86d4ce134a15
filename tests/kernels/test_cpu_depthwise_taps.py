"""The tap-interleaved depthwise kernel (qcompiler/kernels/cpu_vnni.py ``depthwise_conv2d_taps``:
``vpdpbusd`` with its 4-byte dot products over kernel rows; on AVX2 ``vpmaddwd`` over pairs of rows,
compiled for ``znver2`` so that no AVX-512 instruction is used) against the NumPy reference, element for
element: random and worst-case inputs (all -128 / 127 / 0 / 255, extreme weights and multipliers),
strides 1 / 2, asymmetric padding, dilation, odd widths, C a multiple of 8 but not of 16 (``vpdpbusd
ymm``), kernels of 2..7 rows
(one or two groups of 4 rows), with and without a fused epilogue, int8 / uint8 and int16 inputs
(W8A16 layers: two int16 rows per word, ``vpdpwssd`` on VNNI); and that the lowering routes such
depthwise convs to it while channel counts that are not a multiple of 8 keep the int32-lane kernel.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import tirx  # noqa: E402

from qcompiler.kernels import cpu_vnni as cv  # noqa: E402
from qcompiler.targets import host_has_avx2  # noqa: E402

from .test_cpu_vnni import RANGES, AddClip, build, conv_acc_ref, rand_act, rand_requant, requant_ref  # noqa: E402
from .test_cpu_vnni import target  # noqa: E402,F401  (fixture)

needs_vnni = pytest.mark.skipif(not cv.host_has_vnni(), reason="CPU without AVX-512 VNNI: the kernel cannot run here")
needs_avx2 = pytest.mark.skipif(not host_has_avx2(), reason="CPU without AVX2: the kernel cannot run here")


@pytest.fixture(params=[pytest.param("vnni", marks=needs_vnni), pytest.param("avx2", marks=needs_avx2)])
def isa_target(request):
    """(Isa, target): VNNI on the host's CPU; AVX2 as compiled for a Zen 2 (AVX2, no AVX-512)."""
    if request.param == "vnni":
        return cv.VNNI, tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return cv.AVX2, tvm.target.Target({"kind": "llvm", "mcpu": "znver2"})

CASES = [  # N, H, W, C, KH, KW, strides, pads, dilations
    (1, 9, 7, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 9, 11, 24, 3, 3, (2, 2), (1, 0, 1, 2), (1, 1)),    # C % 16 = 8, asymmetric pads, odd width
    (1, 12, 13, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),     # C < 16
    (1, 10, 10, 72, 5, 5, (1, 1), (2, 2, 2, 2), (2, 2)),    # two row groups, dilation 2
    (1, 14, 15, 64, 5, 5, (2, 2), (2, 2, 2, 2), (1, 1)),
    (1, 8, 8, 32, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1)),      # no padding
    (1, 11, 9, 48, 2, 2, (1, 1), (0, 0, 1, 1), (1, 1)),     # 2 rows
    (1, 9, 9, 16, 4, 3, (1, 2), (2, 1, 1, 1), (1, 1)),      # 4 rows: one full group
    (1, 13, 12, 40, 7, 7, (1, 1), (3, 3, 3, 3), (1, 1)),    # 7 rows: 4 + 3, C % 16 = 8
    (1, 40, 41, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),    # large enough to run in parallel
    (1, 23, 21, 144, 3, 3, (2, 2), (0, 0, 1, 1), (1, 1)),
]


def _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi, post=None, extras=(),
         consts=None):
    isa, target = isa_target
    N, H, W, C = x.shape
    KH, KW, _ = wd.shape
    w4, rc = cv.pack_depthwise_taps(wd, bias, str(x.dtype), mult, shift, isa=isa)
    f = cv.depthwise_conv2d_taps(N, H, W, C, KH, KW, strides, pads, dil, str(x.dtype), out_dtype, lo, hi, post=post,
                                 isa=isa)
    OH, OW = cv._out_shape(H, W, KH, KW, strides, pads, dil)
    dev = tvm.cpu()
    odt = post.out_dtype if post is not None else out_dtype
    out = tvm.runtime.tensor(np.zeros((N, OH, OW, C), odt), dev)
    args = [x, w4, rc, mult, shift, *extras] + ([consts] if consts is not None else [])
    build(f, target)(*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args], out)
    return out.numpy()


def _act(rng, shape, dtype):
    """Random activations of ``dtype`` over its whole range (int16 too)."""
    if dtype == "int16":
        return rng.integers(-(2**15), 2**15, shape).astype(np.int16)
    return rand_act(rng, shape, dtype)


def _want(x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi):
    w = np.ascontiguousarray(wd.transpose(2, 0, 1))[:, None]  # [C, 1, KH, KW]
    acc = conv_acc_ref(x, w, strides, pads, dil, groups=x.shape[3]) + bias
    return requant_ref(acc, mult, shift, lo, hi, out_dtype)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("a_dtype", ["int8", "uint8", "int16"])
def test_random(isa_target, case, a_dtype):
    N, H, W, C, KH, KW, strides, pads, dil = case
    rng = np.random.default_rng(zlib.crc32(repr((case, a_dtype)).encode()))
    out_dtype = str(rng.choice(["int8", "uint8", "int16", "int32"]))
    lo, hi = RANGES[out_dtype][rng.integers(len(RANGES[out_dtype]))]
    x = _act(rng, (N, H, W, C), a_dtype)
    wd = rng.integers(-128, 128, (KH, KW, C)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, C)
    got = _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi)
    np.testing.assert_array_equal(got, _want(x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi))


@pytest.mark.parametrize("a_dtype,fill", [("int8", -128), ("int8", 127), ("int8", 0), ("uint8", 255), ("uint8", 0),
                                          ("int16", -32768), ("int16", 32767)])
@pytest.mark.parametrize("wfill", [-128, 127])
def test_worst_case(isa_target, a_dtype, fill, wfill):
    """Constant extreme inputs and weights (the largest offset sums: 255 * -128 per tap, padding rows
    and columns contributing 128 * w under the offset), the widest int32 output, extreme multipliers
    (|mult| = 2^31 - 1, shifts 1 and 62) and biases."""
    N, H, W, C, KH, KW, strides, pads, dil = (1, 9, 10, 40, 5, 5, (1, 1), (2, 1, 2, 3), (1, 1))
    x = np.full((N, H, W, C), fill, a_dtype)
    wd = np.full((KH, KW, C), wfill, np.int8)
    wd[:, :, 1] = -wfill - (wfill < 0)  # the opposite sign in one channel
    rng = np.random.default_rng(5)
    bias = rng.integers(-(2**30), 2**30, C).astype(np.int32)
    bias[:4] = [2**31 - 1 - 5 * 5 * 255 * 128, -(2**31) + 5 * 5 * 255 * 128, 0, -1]
    mult = np.where(np.arange(C) % 2, 2**31 - 1, -(2**31) + 1).astype(np.int64)
    shift = np.where(np.arange(C) % 3 == 0, 62, np.where(np.arange(C) % 3 == 1, 1, 40)).astype(np.int64)
    for out_dtype in ("int32", "int8"):
        lo, hi = RANGES[out_dtype][0]
        got = _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi)
        np.testing.assert_array_equal(got, _want(x, wd, bias, mult, shift, strides, pads, dil, out_dtype, lo, hi))


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[9]])
@pytest.mark.parametrize("a_dtype", ["int8", "uint8", "int16"])
def test_fused_post(isa_target, case, a_dtype):
    N, H, W, C, KH, KW, strides, pads, dil = case
    rng = np.random.default_rng(zlib.crc32(repr(("post", case, a_dtype)).encode()))
    x = _act(rng, (N, H, W, C), a_dtype)
    wd = rng.integers(-128, 128, (KH, KW, C)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, C)
    OH, OW = cv._out_shape(H, W, KH, KW, strides, pads, dil)
    r = rng.integers(-128, 128, (N, OH, OW, C)).astype(np.int8)
    c0 = np.array([-3], np.int64)
    got = _run(isa_target, x, wd, bias, mult, shift, strides, pads, dil, "int16", -300, 300, post=AddClip(),
               extras=(r,), consts=c0)
    y = _want(x, wd, bias, mult, shift, strides, pads, dil, "int16", -300, 300).astype(np.int64)
    np.testing.assert_array_equal(got, np.clip(y + r.astype(np.int64) * c0[0], -128, 127).astype(np.int8))


@pytest.mark.parametrize("isa,mcpu,a_dtype,instr,absent", [(cv.VNNI, "icelake-server", "int8", "vpdpbusd", None),
                                                            (cv.VNNI, "icelake-server", "int16", "vpdpwssd", None),
                                                            (cv.AVX2, "znver2", "int8", "vpmaddwd", "zmm"),
                                                            (cv.AVX2, "znver2", "int16", "vpmaddwd", "zmm")])
def test_asm_without_running(isa, mcpu, a_dtype, instr, absent):
    t = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    f = cv.depthwise_conv2d_taps(1, 16, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), a_dtype, "int8", -128, 127, isa=isa)
    lib = build(f, t)
    asm = lib.inspect_source("s") if hasattr(lib, "inspect_source") else lib.get_source("asm")
    assert instr in asm and (absent is None or absent not in asm)


def test_pack_layout_and_offset():
    rng = np.random.default_rng(0)
    wd = rng.integers(-128, 128, (5, 3, 24)).astype(np.int8)
    bias = rng.integers(-1000, 1000, 24).astype(np.int32)
    mult, shift = np.full(24, 3, np.int64), np.full(24, 4, np.int64)
    w4, rc = cv.pack_depthwise_taps(wd, bias, "int8", mult, shift)
    assert w4.shape == (2, 3, 24, 4) and w4.dtype == np.int8
    assert w4[1, 2, 7, 0] == wd[4, 2, 7] and w4[0, 1, 3, 2] == wd[2, 1, 3] and (w4[1, :, :, 1:] == 0).all()
    beff = bias.astype(np.int64) - 128 * wd.astype(np.int64).sum(axis=(0, 1))
    # rows (b, mf, s2, rc) of dw_fast_params: shift 4 < 32, scaled by 2^28 into the int32-lane form
    assert rc.shape == (4, 24) and rc.dtype == np.int64
    np.testing.assert_array_equal(rc[3], beff * 3 + 8)
    np.testing.assert_array_equal(rc[:3], [(beff * 3 + 8) << 28, np.full(24, 3 << 28), np.zeros(24)])
    w2, rc2 = cv.pack_depthwise_taps(wd, bias, "int8", mult, shift, isa=cv.AVX2)  # int16 pairs: no offset
    assert w2.shape == (3, 3, 24, 2) and w2[2, 1, 5, 0] == wd[4, 1, 5] and (w2[2, :, :, 1] == 0).all()
    np.testing.assert_array_equal(rc2[3], bias.astype(np.int64) * 3 + 8)


def test_routing():
    """int8 / uint8 / int16 input and C a multiple of 8 on a VNNI or AVX2 target take the new kernel (a
    symbolic batch, height and width too); no ISA, C % 8 != 0, one-row kernels and kernels whose
    int16 sums could overflow int32 keep depthwise_conv2d_nhwc."""
    ok = cv.depthwise_taps_ok
    assert ok(1, 56, 56, 64, 3, 3, "int8", cv.VNNI) and ok(1, 56, 56, 64, 3, 3, "uint8", cv.VNNI)
    assert ok(1, 56, 56, 64, 3, 3, "int8", cv.AVX2)
    assert ok(1, 56, 56, 64, 3, 3, "int16", cv.VNNI) and ok(1, 56, 56, 64, 7, 7, "int16", cv.AVX2)
    assert not ok(1, 56, 56, 64, 23, 23, "int16", cv.VNNI) and not ok(1, 56, 56, 20, 3, 3, "int16", cv.VNNI)
    assert ok(tirx.Var("n", "int64"), 56, 56, 64, 3, 3, "int8", cv.VNNI)  # a symbolic batch: yes
    assert ok(1, tirx.Var("h", "int64"), tirx.Var("w", "int64"), 64, 3, 3, "int8", cv.VNNI)  # symbolic H / W too
    assert not ok(1, 56, 56, 64, 3, 3, "int8", None) and not ok(1, 56, 56, 64, 1, 3, "int8", cv.VNNI)
    assert ok(1, 28, 28, 72, 3, 3, "int8", cv.VNNI) and not ok(1, 28, 28, 20, 3, 3, "int8", cv.VNNI)
    with pytest.raises(ValueError):
        cv.depthwise_conv2d_taps(1, 30, 30, 16, 23, 23, (1, 1), (1,) * 4, (1, 1), "int16", "int8", -128, 127)
    with pytest.raises(ValueError):
        cv.depthwise_conv2d_taps(1, 8, 8, 20, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", "int8", -128, 127)


@needs_vnni
def test_symbolic_batch(target):
    """A symbolic batch N (qcompiler/symbolic.py): the kernel's own variable, one library for every N."""
    H, W, C, KH, KW, strides, pads, dil = 9, 10, 24, 3, 3, (2, 1), (1, 1, 1, 1), (1, 1)
    rng = np.random.default_rng(7)
    wd = rng.integers(-128, 128, (KH, KW, C)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, C)
    w4, rc = cv.pack_depthwise_taps(wd, bias, "int8", mult, shift)
    f = cv.depthwise_conv2d_taps(tirx.Var("n", "int64"), H, W, C, KH, KW, strides, pads, dil, "int8", "int8", -128, 127)
    assert "T.parallel" in f.script()
    lib = build(f, target)
    dev = tvm.cpu()
    for N in (1, 3):
        x = rand_act(rng, (N, H, W, C), "int8")
        want = _want(x, wd, bias, mult, shift, strides, pads, dil, "int8", -128, 127)
        out = tvm.runtime.tensor(np.zeros(want.shape, np.int8), dev)
        lib(*[tvm.runtime.tensor(a, dev) for a in (x, w4, rc, mult, shift)], out)
        np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("geo", [((1, 1), (1, 1, 1, 1), (1, 1), 3), ((2, 2), (1, 0, 1, 2), (1, 1), 3),
                                 ((1, 1), (2, 2, 2, 2), (2, 2), 5)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("a_dtype", ["int8", "int16"])
def test_symbolic_height_and_width(isa_target, geo, fused, a_dtype):
    """A symbolic height and width: the kernel's own variables, column tiles of tw (their count
    ceil(OW / tw) an argument, ``qc.ow_tiles``), the exact output equal to the reference at every
    size tried (one column, widths that are not a multiple of the tile, odd heights), with and
    without a fused epilogue (its extra input exact too)."""
    isa, target = isa_target
    strides, pads, dil, k = geo
    C = 24 if isa is cv.VNNI else 16
    rng = np.random.default_rng(sum(strides) + k + fused + len(a_dtype))
    wd = rng.integers(-128, 128, (k, k, C)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, C)
    w4, rc = cv.pack_depthwise_taps(wd, bias, a_dtype, mult, shift, isa=isa)
    post = AddClip() if fused else None
    f = cv.depthwise_conv2d_taps(1, tirx.Var("h", "int64"), tirx.Var("w", "int64"), C, k, k, strides, pads, dil,
                                 a_dtype, "int8", -128, 127, post=post, isa=isa)
    tw = int(f.attrs["qc.ow_tiles"])
    lib = build(f, target)
    dev = tvm.cpu()
    span = (k - 1) * dil[0] + 1 - pads[0] - pads[2]  # the smallest height / width with one output (about)
    for H, W in [(max(span, 1) + 8, max(span, 1)), (span + 4, span + 8), (span + 7, span + 15), (span + 12, 40)]:
        x = _act(rng, (1, H, W, C), a_dtype)
        want = _want(x, wd, bias, mult, shift, strides, pads, dil, "int8", -128, 127)
        OH, OW = want.shape[1:3]
        owt = -(-OW // tw)
        extra = []
        if fused:
            r = rng.integers(-128, 128, (1, OH, OW, C)).astype(np.int8)
            extra = [r, np.asarray([3], np.int64)]
            want = np.clip(want.astype(np.int64) + r.astype(np.int64) * 3, -128, 127).astype(np.int8)
        out = tvm.runtime.tensor(np.zeros((1, OH, OW, C), np.int8), dev)
        lib(*[tvm.runtime.tensor(a, dev) for a in (x, w4, rc, mult, shift, *extra)], owt, out)
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"H={H} W={W} {geo} fused={fused}")
