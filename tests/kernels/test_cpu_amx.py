"""AMX INT8 kernels (qcompiler.kernels.cpu_amx) against the NumPy reference, element for element.

They run where the host has AMX-INT8 and Linux grants the tile state (``targets.host_amx_usable``);
elsewhere those tests skip and only the build / asm / routing checks run.  Reference and helpers are
the VNNI kernels' (tests/kernels/test_cpu_vnni.py): the same contract.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from qcompiler.kernels import _amx_intrin as X  # noqa: E402
from qcompiler.kernels import backends as KB  # noqa: E402
from qcompiler.kernels import cpu_amx as A  # noqa: E402
from qcompiler.targets import host_amx_usable, host_cpu  # noqa: E402

from .test_cpu_vnni import (AddClip, RANGES, build, conv_acc_ref, dense_acc_ref, rand_act,  # noqa: E402
                            rand_requant, requant_ref, run)

needs_amx = pytest.mark.skipif(not host_amx_usable(), reason="CPU / OS without AMX-INT8: kernels cannot run here")
AMX_TARGET = {"kind": "llvm", "mcpu": "sapphirerapids"}


@pytest.fixture(scope="module")
def target():
    return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), "mattr": ["+amx-tile", "+amx-int8"]})


def check_dense(target, rng, M, N, K, a_dtype, out_dtype, lo, hi, config=None, post=None):
    a = rand_act(rng, (M, K), a_dtype)
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, N)
    wp, be = A.pack_dense(w, bias, a_signed=a_dtype == "int8")
    func = A.dense(M, N, K, a_dtype, out_dtype, lo, hi, config, post=post)
    want = requant_ref(dense_acc_ref(a, w, bias), mult, shift, lo, hi, out_dtype)
    args = [a, wp, be, mult, shift]
    if post is not None:
        r = rng.integers(-128, 128, (M, N)).astype(np.int8)
        args += [r, np.array([3], np.int64)]
        want = np.clip(want.astype(np.int64) + 3 * r.astype(np.int64), -128, 127).astype(np.int8)
    got, lib = run(target, func, args, (M, N), post.out_dtype if post else out_dtype)
    np.testing.assert_array_equal(got, want, err_msg=f"dense {M}x{N}x{K} {a_dtype}->{out_dtype} {config}")
    return lib


def check_conv(target, rng, N, H, W, C, OC, KH, KW, strides, pads, dil, a_dtype, out_dtype, lo, hi, config=None,
               x=None):
    x = rand_act(rng, (N, H, W, C), a_dtype) if x is None else x
    w = rng.integers(-128, 128, (OC, C, KH, KW)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, OC)
    wp, be = A.pack_conv(w, bias, a_signed=a_dtype == "int8")
    func = A.conv2d_nhwc(N, H, W, C, OC, KH, KW, strides, pads, dil, a_dtype, out_dtype, lo, hi, config)
    want = requant_ref(conv_acc_ref(x, w, strides, pads, dil) + bias, mult, shift, lo, hi, out_dtype)
    got, _ = run(target, func, [x, wp, be, mult, shift], want.shape, out_dtype)
    np.testing.assert_array_equal(got, want, err_msg=f"conv {x.shape} {w.shape} s{strides} p{pads} d{dil} {config}")


# ---- configuration and packing (no AMX needed) ------------------------------------------------------
def test_config_validation_and_default():
    with pytest.raises(ValueError, match="tile shapes"):
        A.AmxConfig(mr=48, nr=2)
    with pytest.raises(ValueError, match="multiple of 64"):
        A.AmxConfig(kc=96)
    c = A.default_config(3136, 256, 576)
    assert (c.mr, c.nr, c.parallel) == (32, 2, True)
    c = A.default_config(4, 48, 64)   # one small block: serial, the 3 column tiles (48 = 3 x 16) in one call
    assert c.nr * c.ng == 3 and not c.parallel
    pts = list(A.config_points(128, 64, 512))
    assert {(p["mr"], p["nr"]) for p in pts} == {(16, 1), (16, 2), (32, 1), (32, 2), (48, 1)}
    assert {p["ng"] for p in pts if p["kc"]} == {1} and {p["ng"] for p in pts if (p["mr"], p["nr"]) == (16, 1)} == {1, 2, 4}
    with pytest.raises(ValueError, match="ng"):
        A.AmxConfig(kc=128, ng=2)
    assert A.default_config(3136, 256, 64).ng == 2     # 32 x 64 int32 = 8 KB per call


def test_pack_pads_the_reduction_to_64():
    w = np.arange(-50, 50).reshape(20, 5).astype(np.int8)
    wp, be = A.pack_dense(w, None, a_signed=True)
    assert wp.shape == (1, 16, 16, 4)                           # K 20 -> 64, N 5 -> 16
    assert wp[0, 0, 1, 2] == w[2, 1] and not wp[0, 5:].any()    # Wp[nb, k // 4, n, k % 4]
    np.testing.assert_array_equal(be, -128 * w.astype(np.int64).sum(0))
    wc, _ = A.pack_conv(np.ones((16, 40, 3, 3), np.int8), None, a_signed=False)
    assert wc.shape == (1, 9 * 64 // 4, 16, 4)                 # each tap's 40 channels padded to 64
    w3 = np.arange(16 * 3 * 7 * 7).reshape(16, 3, 7, 7).astype(np.int8)
    ws, _ = A.pack_conv(w3, None, a_signed=False)              # an 8 x 8 x 4 grid: 256
    assert ws.shape == (1, 256 // 4, 16, 4) and A.conv_layout(3, 7, 7) == (8, 8, 4)
    t = 1 * 8 + 2                                              # kh 1, kw 2
    assert ws[0, t, 5, 1] == w3[5, 1, 1, 2] and not ws[0, t, :, 3].any() and not ws[0, 7].any()
    assert not ws[0, 56:].any() and A.conv_layout(3, 3, 3) == (4, 4, 4) and A.conv_layout(64, 3, 3) == (3, 3, 64)


def test_asm_has_tdpbusd_without_running():
    asm = build(A.dense(32, 64, 128, "int8", "int8", -128, 127), tvm.target.Target(AMX_TARGET)).inspect_source("asm")
    assert "tdpbusd" in asm and "ldtilecfg" in asm and "tileloadd" in asm
    asm = build(A.conv2d_nhwc(1, 8, 8, 64, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "uint8", "uint8", 0, 255),
                tvm.target.Target(AMX_TARGET)).inspect_source("asm")
    assert "tdpbusd" in asm


def test_routing_static_layers_to_amx_others_to_vnni():
    """The AMX backend comes first where available, declines symbolic dims and narrow convs; the
    depthwise kernels' ISA is never AMX."""
    amx = KB.get("cpu_amx")
    w = np.zeros((64, 64), np.int8)
    assert amx.declines("dense", (256, 64), w) is None
    assert "small" in amx.declines("dense", (16, 64), w)       # 64K MACs: the vector kernels
    assert amx.declines("dense", (tvm.tirx.Var("M", "int64"), 64), w) is None
    assert "symbolic" in amx.declines("conv", (tvm.tirx.Var("N", "int64"), 8, 8, 64), w)
    assert "narrow" in amx.declines("conv", (1, 224, 224, 3), np.zeros((64, 3, 7, 7), np.int8))  # a stem
    assert amx.declines("conv", (1, 56, 56, 16), np.zeros((64, 16, 1, 1), np.int8)) is None    # 1x1: dense
    assert "small" in amx.declines("conv", (1, 8, 8, 64), np.zeros((16, 64, 3, 3), np.int8))
    assert not amx.takes(4, "int8") and amx.takes(8, "uint8") and not amx.takes(8, "int16")
    t = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), "mattr": ["+amx-tile", "+amx-int8"]})
    if host_amx_usable():
        assert KB.select_cpu(t, 8, "int8", ("dense", (256, 64), w)) is amx
        assert KB.select_cpu(t, 8, "int8", ("conv", (tvm.tirx.Var("N", "int64"), 8, 8, 64), w)) is not amx
    from qcompiler.lowering.gemm_cpu import target_isa

    assert target_isa(t) is None or target_isa(t).name != "amx"


# ---- bit-exact on the host's AMX ---------------------------------------------------------------------
@needs_amx
@pytest.mark.parametrize("seed", range(6))
def test_dense_random_shapes(target, seed):
    rng = np.random.default_rng(100 + seed)
    M, N, K = int(rng.integers(1, 130)), int(rng.integers(1, 100)), int(rng.integers(1, 300))
    a_dtype = str(rng.choice(["int8", "uint8"]))
    out_dtype = str(rng.choice(["int8", "uint8", "int16", "int32"]))
    lo, hi = RANGES[out_dtype][rng.integers(len(RANGES[out_dtype]))]
    check_dense(target, rng, M, N, K, a_dtype, out_dtype, lo, hi)


@needs_amx
@pytest.mark.parametrize("config", [A.AmxConfig(16, 1), A.AmxConfig(16, 2, kc=128), A.AmxConfig(32, 1, n_outer=True),
                                    A.AmxConfig(32, 2, kc=64, parallel=False), A.AmxConfig(48, 1),
                                    A.AmxConfig(16, 3, n_outer=True), A.AmxConfig(16, 1, ng=6),
                                    A.AmxConfig(32, 1, ng=3, n_outer=True), A.AmxConfig(16, 2, ng=3, parallel=False)])
def test_dense_configs(target, config):
    check_dense(target, np.random.default_rng(7), 100, 96, 256, "int8", "int8", -128, 127, config)
    check_dense(target, np.random.default_rng(8), 96, 96, 192, "uint8", "uint8", 0, 255, config)  # in place


@needs_amx
@pytest.mark.parametrize("M", [1, 16, 17])
def test_dense_one_row_block_configs(target, M):
    """A GEMM of one row block with row blocks outer (a tuned record may ask for it)."""
    for cfg in (A.AmxConfig(16, 1), A.AmxConfig(32, 2, n_outer=False, parallel=False)):
        check_dense(target, np.random.default_rng(M), M, 32, 576, "uint8", "int16", -32768, 32767, cfg)


@needs_amx
@pytest.mark.parametrize("a_dtype,N,K", [("int8", 384, 384), ("uint8", 48, 100)])
def test_dense_symbolic_rows(target, a_dtype, N, K):
    """One kernel over a symbolic row count (serial below its threshold, parallel above): every size
    equals the reference, the range's small end, ragged blocks and a prime among them."""
    from qcompiler.tune.workload import rows_at

    rng = np.random.default_rng(N)
    with rows_at({"s": 128}):
        f = A.dense(tvm.tirx.Var("s", "int64") * 1, N, K, a_dtype, "int8", -128, 127)
    m_s = int(f.attrs.get("qc.rows_serial_max") or 0)
    lib = build(f, target)
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, N)
    wp, be = A.pack_dense(w, bias, a_signed=a_dtype == "int8")
    for M in sorted({1, 5, 31, 32, 33, 97, 257, m_s, m_s + 1} - {0}):
        a = rand_act(rng, (M, K), a_dtype)
        out = tvm.runtime.tensor(np.zeros((M, N), np.int8))
        lib(*[tvm.runtime.tensor(x) for x in (a, wp, be, mult, shift)], out)
        want = requant_ref(dense_acc_ref(a, w, bias), mult, shift, -128, 127, "int8")
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"M={M}")


@needs_amx
def test_dense_fused_epilogue(target):
    check_dense(target, np.random.default_rng(3), 70, 64, 130, "int8", "int16", -300, 300, post=AddClip())


@needs_amx
def test_dense_extreme_accumulators(target):
    """Saturated operands at a long reduction: accumulators near the int32 limits (uint8 255 and
    int8 127 against weights -128 over K = 65536)."""
    for a_dtype, a_hi in (("uint8", 255), ("int8", 127)):
        M, N, K = 20, 32, 65536
        a = np.full((M, K), a_hi, a_dtype)
        w = np.full((K, N), -128, np.int8)
        w[:, 1::2] = 127
        bias = np.zeros(N, np.int32)
        mult = np.full(N, 1, np.int64)
        shift = np.full(N, 1, np.int64)
        wp, be = A.pack_dense(w, bias, a_signed=a_dtype == "int8")
        got, _ = run(target, A.dense(M, N, K, a_dtype, "int32", -(2**31), 2**31 - 1), [a, wp, be, mult, shift],
                     (M, N), "int32")
        want = requant_ref(dense_acc_ref(a, w, bias), mult, shift, -(2**31), 2**31 - 1, "int32")
        np.testing.assert_array_equal(got, want)


CONVS = [  # N, H, W, C, OC, KH, KW, strides, pads, dilations
    (1, 14, 14, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 9, 11, 40, 24, 3, 3, (2, 2), (1, 0, 2, 1), (1, 1)),
    (1, 12, 12, 128, 32, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1)),
    (1, 10, 10, 96, 48, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2)),
    (1, 7, 7, 256, 80, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 6, 5, 33, 16, 5, 3, (1, 2), (2, 1, 2, 1), (1, 1)),
    # narrow convs: a padded copy, a (KHp, KWp, Cp) grid (cpu_amx.conv_layout)
    (1, 23, 21, 3, 64, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1)),
    (2, 9, 10, 5, 24, 3, 3, (1, 1), (1, 1, 1, 1), (2, 2)),
    (1, 8, 8, 16, 32, 3, 3, (1, 2), (0, 1, 2, 1), (1, 1)),
    (1, 5, 6, 1, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
]


@needs_amx
@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_conv2d(target, case, a_dtype):
    lo, hi = (-128, 127)
    check_conv(target, np.random.default_rng(hash(case) % 1000), *case, a_dtype, "int8", lo, hi)


@needs_amx
def test_conv2d_signed_padding_is_real_zero(target):
    """int8 input all -128 with zero padding: the padded taps must count as 0, not -128."""
    x = np.full((1, 6, 6, 64), -128, np.int8)
    check_conv(target, np.random.default_rng(5), 1, 6, 6, 64, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8",
               "int32", -(2**31), 2**31 - 1, x=x)


@needs_amx
@pytest.mark.parametrize("config", [A.AmxConfig(16, 1), A.AmxConfig(32, 2, kc=128), A.AmxConfig(48, 1, n_outer=True),
                                    A.AmxConfig(32, 2, ng=2)])
def test_conv2d_configs(target, config):
    check_conv(target, np.random.default_rng(11), 1, 9, 9, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "uint8",
               "uint8", 0, 255, config)


def test_intrinsic_shapes_fit_the_tile_registers():
    for mt, nt in X.SHAPES:
        assert mt * nt + mt + nt <= 8
    with pytest.raises(ValueError, match="tile registers"):
        X.register(2, 3, 1)
