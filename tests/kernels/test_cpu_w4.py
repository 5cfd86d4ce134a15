"""Low-bit CPU GEMM backends (qcompiler.kernels.backends): W4A8 and W8A16 on AVX-512 VNNI and AVX2,
against the NumPy reference element for element, plus the backend registry, the shared tile model
and a whole model with 4-bit / 16-bit-activation layers through the lowering.

Every backend runs where the host has its ISA; the AVX2 backends are compiled for ``haswell`` (so
LLVM cannot fuse ``vpmaddwd`` + ``vpaddd`` into the AVX-VNNI ``vpdpwssd`` of a newer host) and run
on any AVX2 host.  Reference: tests/kernels/test_cpu_vnni.py (int64 accumulators, the contract's
requantization).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from qcompiler.kernels import backends as KB  # noqa: E402
from qcompiler.kernels import cpu_vnni as cv  # noqa: E402
from qcompiler.kernels import int4_pack, tile_model  # noqa: E402
from qcompiler.targets import host_has_avx2, host_has_vnni  # noqa: E402
from tests.kernels.test_cpu_vnni import (RANGES, build, conv_acc_ref, dense_acc_ref, rand_requant,  # noqa: E402
                                         requant_ref, run)

LOWBIT = ("cpu_vnni_w4", "cpu_avx2_w4", "cpu_vnni_a16", "cpu_avx2_a16")


def _marks(name):
    if "vnni" in name:
        return pytest.mark.skipif(not host_has_vnni(), reason="CPU without AVX-512 VNNI")
    return pytest.mark.skipif(not host_has_avx2(), reason="CPU without AVX2")


@pytest.fixture(params=[pytest.param(n, marks=_marks(n), id=n) for n in LOWBIT])
def backend(request):
    return KB.get(request.param)


@pytest.fixture(params=[pytest.param(n, marks=_marks(n), id=n) for n in ("cpu_vnni_w4", "cpu_avx2_w4")])
def w4(request):
    return KB.get(request.param)


def target_for(be):
    mcpu = "haswell" if "avx2" in be.name else tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu})


def act(rng, shape, dtype, extreme=False):
    if extreme:
        return np.full(shape, {"int8": 127, "uint8": 255, "int16": -32768}[dtype], dtype)
    lo, hi = {"int8": (-128, 128), "uint8": (0, 256), "int16": (-32768, 32768)}[dtype]
    return rng.integers(lo, hi, shape).astype(dtype)


def weights(rng, shape, be):
    if be.weight_bits == 4:
        return rng.integers(-8, 8, shape).astype(np.int8)
    return rng.integers(-128, 128, shape).astype(np.int8)


def a_dtypes(be):
    return list(be.a_dtypes)


def check_dense(be, rng, M, N, K, a_dtype, out_dtype="int8", lo=-128, hi=127, config=None, w=None, a=None,
                requant=None):
    a = act(rng, (M, K), a_dtype) if a is None else a
    w = weights(rng, (K, N), be) if w is None else w
    bias, mult, shift = rand_requant(rng, N) if requant is None else requant
    wp, beff = be.pack_dense(w, bias, a_dtype)
    func = be.dense(M, N, K, a_dtype, out_dtype, lo, hi, config)
    got, lib = run(target_for(be), func, [a, wp, beff, mult, shift], (M, N), out_dtype)
    want = requant_ref(dense_acc_ref(a, w, bias), mult, shift, lo, hi, out_dtype)
    np.testing.assert_array_equal(got, want, err_msg=f"{be.name} dense {M}x{N}x{K} {a_dtype}->{out_dtype} {config}")
    return lib


def check_conv(be, rng, N, H, W, C, OC, KH, KW, strides, pads, dil, a_dtype, out_dtype="int8", lo=-128, hi=127,
               config=None):
    x = act(rng, (N, H, W, C), a_dtype)
    w = weights(rng, (OC, C, KH, KW), be)
    bias, mult, shift = rand_requant(rng, OC)
    wp, beff = be.pack_conv(w, bias, a_dtype)
    if be.reject_conv(C):  # the backend declines (the INT8 kernel is faster); the kernel itself is tested
        with pytest.raises(ValueError, match="pad to"):
            be.conv2d(N, H, W, C, OC, KH, KW, strides, pads, dil, a_dtype, out_dtype, lo, hi, config)
    func = cv.conv2d_nhwc(N, H, W, C, OC, KH, KW, strides, pads, dil, a_dtype, out_dtype, lo, hi, config, isa=be.isa)
    want = requant_ref(conv_acc_ref(x, w, strides, pads, dil) + bias, mult, shift, lo, hi, out_dtype)
    got, _ = run(target_for(be), func, [x, wp, beff, mult, shift], want.shape, out_dtype)
    np.testing.assert_array_equal(got, want, err_msg=f"{be.name} conv {x.shape} {w.shape} s{strides} p{pads}")


def identity_requant(N):
    """acc -> acc exactly: (acc * 2^30 + 2^29) >> 30 == acc (the accumulators, unclipped in int32)."""
    return np.zeros(N, np.int32), np.full(N, 1 << 30, np.int64), np.full(N, 30, np.int64)


# ---- registry, packing, tile model -----------------------------------------------------------------
def test_registry_and_selection():
    names = KB.cpu_names()
    assert set(LOWBIT) | {"cpu_amx", "cpu_vnni", "cpu_avx2"} == set(names)
    vnni = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver2"})
    old = tvm.target.Target({"kind": "llvm", "mcpu": "nehalem"})
    assert KB.select_cpu(vnni, 8, "int8").name == "cpu_vnni"
    assert KB.select_cpu(vnni, 4, "uint8").name == "cpu_vnni_w4"
    assert KB.select_cpu(vnni, 8, "int16").name == "cpu_vnni_a16"
    assert KB.select_cpu(vnni, 4, "int16").name == "cpu_vnni_a16"  # int8 weights with values in [-8, 7]
    assert KB.select_cpu(avx2, 8, "uint8").name == "cpu_avx2"
    assert KB.select_cpu(avx2, 4, "int8").name == "cpu_avx2_w4"
    assert KB.select_cpu(avx2, 8, "int16").name == "cpu_avx2_a16"
    assert KB.select_cpu(old, 4, "int8") is None
    assert KB.int8_twin(KB.get("cpu_avx2_w4")).name == "cpu_avx2"
    assert KB.int8_twin(KB.get("cpu_vnni_w4")).name == "cpu_vnni"


@pytest.mark.parametrize("lanes,groups,biased", [(16, 1, False), (8, 4, True), (8, 2, False)])
def test_pack_cpu_w4_roundtrip_and_layout(lanes, groups, biased):
    rng = np.random.default_rng(0)
    for K, N in ((1, 1), (37, 21), (64, 16)):
        w = rng.integers(-8, 8, (K, N))
        p = int4_pack.pack_cpu_w4(w, lanes, groups, biased)
        kp = 8 * groups
        assert p.dtype == np.uint8 and p.shape == (-(-N // lanes), -(-K // kp), groups, lanes, 4)
        np.testing.assert_array_equal(int4_pack.unpack_cpu_w4(p, K, N, biased), w)
    # element k = kb*kp + 8g + 4h + t, n = L*nb + i sits in byte [nb, kb, g, i, t], nibble h
    w = np.zeros((2 * kp, 2 * lanes), np.int64)
    k, n = kp + 8 * (groups - 1) + 4 + 3, lanes + 5
    w[k, n] = -3
    p = int4_pack.pack_cpu_w4(w, lanes, groups, biased)
    byte = p[1, 1, groups - 1, 5, 3]
    assert (byte >> 4) == ((-3 + 8) if biased else (-3 & 0xF))
    with pytest.raises(ValueError):
        int4_pack.pack_cpu_w4(np.full((4, 4), 8), lanes, groups, biased)


def _old_vnni_cycles(M, N, K, mr, nr, units, L, kp):
    """The tile model as costmodel/features.py computed it before the shared tile model (regression)."""
    import math

    nb = -(-N // L)
    steps = -(-K // kp)
    step = max(mr * nr, mr + nr) / 2 + 0.5 if kp == 4 else mr * nr + (mr + nr) / 2 + 0.5
    per_tile = steps * step + 2 * mr * nr + 40 + (300 if mr * nr * L * 4 >= 1024 else 0)
    tiles = -(-M // mr) * max(1, nb // nr)
    return per_tile * math.ceil(tiles / max(1, units)), per_tile, step


def test_shared_tile_model_matches_the_int8_features():
    from costmodel import features as F

    rng = np.random.default_rng(3)
    for backend, (L, kp, vregs) in {"cpu_vnni": (16, 4, 32), "cpu_avx2": (8, 2, 16)}.items():
        for _ in range(200):
            M, N, K = (int(v) for v in rng.integers(1, 600, 3))
            nb = -(-N // L)
            nr = int(rng.choice([d for d in range(1, 9) if nb % d == 0]))
            mr = int(rng.integers(1, 9))
            units = int(rng.integers(1, 4))
            assert F._vnni_cycles(M, N, K, mr, nr, units, backend) == _old_vnni_cycles(M, N, K, mr, nr, units, L, kp)
            old_best = min(_old_vnni_cycles(M, N, K, a, b, units, L, kp)[0] for b in range(1, 9) if nb % b == 0
                           for a in range(1, min(16, M) + 1) if a * b + b + 1 <= vregs)
            assert F._vnni_best(M, N, K, units, backend) == old_best
    # the default config is the tile model's best default tile, for every backend
    for be in (b for b in KB.cpu_backends() if b.vector):   # AMX has its own block model (cpu_amx)
        mr, nr, _ = tile_model.best_default_tile(300, 200, 512, 1, be.isa)
        cfg = be.default_config(300, 200, 512)
        assert (cfg.mr, cfg.nr) == (mr, nr) and be.isa.fits(mr, nr)


def test_features_of_lowbit_workloads():
    from costmodel import features as F
    from qcompiler.tune.workload import Workload

    for name in LOWBIT:
        w = Workload(name, "conv2d", (1, 14, 14, 20, 48, 3, 3), "int16" if "a16" in name else "uint8", "int8",
                     -128, 127, "cpu:znver4", (1, 1), (1, 1, 1, 1), (1, 1))
        be = KB.get(name)
        M, N, K = F.gemm_mnk(w.fields())
        assert (M, N, K) == w._gemm_mnk() == (196, 48, 9 * be.pad_k(20))
        f = F.cfg_features(w.fields(), dataclasses.asdict(w.default_config()), {"kind": "cpu", "arch": "znver4"})
        assert len(f) == len(F.CFG_NAMES) and all(np.isfinite(v) for v in f[:35])
        assert f[F.CFG_NAMES.index("c_w_bits")] == be.weight_bits
        space = w.config_space()
        assert space and all(be.isa.fits(c.mr, c.nr) for c in space)


# ---- dense --------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
def test_dense_small_m_odd_shapes(backend, M):
    rng = np.random.default_rng(M)
    for N, K in ((33, 13), (100, 70), (17, 260)):
        for ad in a_dtypes(backend):
            check_dense(backend, rng, M, N, K, ad)


@pytest.mark.parametrize("seed", range(4))
def test_dense_random(backend, seed):
    rng = np.random.default_rng(100 + seed)
    M, N, K = int(rng.integers(1, 70)), int(rng.integers(1, 150)), int(rng.integers(1, 300))
    ad = str(rng.choice(a_dtypes(backend)))
    od = str(rng.choice(["int8", "uint8", "int16", "int32"]))
    lo, hi = RANGES[od][rng.integers(len(RANGES[od]))]
    check_dense(backend, rng, M, N, K, ad, od, lo, hi)


def test_dense_worst_case_accumulators(backend):
    """Extreme weights and activations, K large: the accumulators themselves (identity requant)."""
    rng = np.random.default_rng(5)
    M, N = 3, 40
    K = 2047 if backend.weight_bits == 4 else 511  # W8A16: 511 * 2^22 < 2^31 (the contract's bound)
    for ad in a_dtypes(backend):
        for wv in ((-8, 7) if backend.weight_bits == 4 else (-128, 127)):
            a = act(rng, (M, K), ad, extreme=True)
            a[1] = {"int8": -128, "uint8": 0, "int16": 32767}[ad]
            w = np.full((K, N), wv, np.int8)
            w[:, 1::3] = -8 if backend.weight_bits == 4 else -128
            check_dense(backend, rng, M, N, K, ad, "int32", -(2**31), 2**31 - 1, w=w, a=a, requant=identity_requant(N))
        check_dense(backend, rng, 4, 24, K, ad, "int32", -(2**31), 2**31 - 1, requant=identity_requant(24))


def test_w4_pair_sums_at_the_bound(w4):
    """vpmaddubsw's int16 sums at their largest: A+128 = 255 against w = -8 over the whole K."""
    rng = np.random.default_rng(6)
    K, N = 4096 + 40, 16
    for ad, av in (("int8", 127), ("uint8", 255)):
        a = np.full((2, K), av, ad)
        w = np.full((K, N), -8, np.int8)
        check_dense(w4, rng, 2, N, K, ad, "int32", -(2**31), 2**31 - 1, w=w, a=a, requant=identity_requant(N))


@pytest.mark.parametrize("cfg", [dict(mr=1, nr=1), dict(mr=4, nr=2, n_outer=False), dict(mr=2, nr=2, kc=64),
                                 dict(mr=3, nr=1, kc=32, parallel=False), dict(mr=6, nr=2)])
def test_dense_configs(backend, cfg):
    config = cv.VnniConfig(**cfg)
    M, N, K = 13, 4 * backend.isa.lanes, 256
    if not backend.isa.fits(config.mr, config.nr):
        with pytest.raises(ValueError):
            backend.dense(M, N, K, a_dtypes(backend)[0], "int8", -128, 127, config)
        return
    check_dense(backend, np.random.default_rng(7), M, N, K, a_dtypes(backend)[0], config=config)


# ---- conv ---------------------------------------------------------------------------------------
CONVS = [  # N, H, W, C, OC, KH, KW, strides, pads, dilations
    (1, 9, 8, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 7, 7, 3, 20, 3, 3, (2, 2), (1, 0, 1, 2), (1, 1)),
    (2, 5, 6, 40, 24, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 11, 10, 13, 8, 3, 3, (1, 2), (2, 2, 2, 2), (2, 1)),
    (1, 4, 4, 64, 48, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[:7])))
def test_conv(backend, case):
    rng = np.random.default_rng(sum(case[:7]))
    for ad in a_dtypes(backend):
        check_conv(backend, rng, *case, ad)


def test_conv_config_and_out_dtypes(backend):
    rng = np.random.default_rng(9)
    ad = a_dtypes(backend)[0]
    check_conv(backend, rng, 1, 10, 10, 64, 2 * backend.isa.lanes, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), ad,
               "int16", -32768, 32767, cv.VnniConfig(mr=3, nr=2, kc=32))
    check_conv(backend, rng, 1, 6, 6, 8, 16, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), ad, "uint8", 0, 255)


# ---- code generation ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,mcpu,want,absent", [
    ("cpu_vnni_w4", "znver4", ["vpdpbusd"], []),
    ("cpu_avx2_w4", "haswell", ["vpmaddubsw", "vpmaddwd"], ["vpdpbusd", "vpdpwssd", "zmm"]),
    ("cpu_vnni_a16", "znver4", ["vpdpwssd"], []),
    ("cpu_avx2_a16", "haswell", ["vpmaddwd"], ["vpdpwssd", "zmm"]),
])
def test_asm_without_running(name, mcpu, want, absent):
    be = KB.get(name)
    f = be.dense(8, 64, 96, a_dtypes(be)[0], "int8", -128, 127)
    asm = build(f, tvm.target.Target({"kind": "llvm", "mcpu": mcpu})).inspect_source("asm")
    for w in want:
        assert w in asm, (name, w)
    for w in absent:
        assert w not in asm, (name, w)


# ---- whole model through the lowering -----------------------------------------------------------
def _small_model():
    from onnx import helper

    from tests.helpers import make_model, tensor

    r = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "W3", "B3"], ["y"])]
    inits = [tensor("W1", (r.standard_normal((24, 5, 3, 3)) * 0.3).astype(np.float32)),
             tensor("B1", (r.standard_normal(24) * 0.1).astype(np.float32)),
             tensor("W2", (r.standard_normal((40, 24, 3, 3)) * 0.1).astype(np.float32)),
             tensor("B2", (r.standard_normal(40) * 0.1).astype(np.float32)),
             tensor("W3", (r.standard_normal((40 * 4 * 4, 10)) * 0.05).astype(np.float32)),
             tensor("B3", (r.standard_normal(10) * 0.1).astype(np.float32))]
    return make_model(nodes, [("x", [1, 5, 9, 9])], [("y", None)], inits)


def _prepared(tmp_path):
    from qcompiler.driver import CompileOptions, prepare
    from qcompiler.targets import parse_target
    from tests.helpers import save

    data = {"x": np.random.default_rng(1).standard_normal((6, 5, 9, 9)).astype(np.float32)}
    opts = CompileOptions(target=parse_target("cpu"))
    return prepare(save(_small_model(), tmp_path), data, opts), data, opts


def _build_and_compare(ig, data, opts, want_kernels, target=None):
    from qcompiler import reference
    from qcompiler.lowering.build import build as tvm_build
    from tests.helpers import run_tvm

    test = {"x": data["x"][:1]}
    res = tvm_build(ig, target or opts.target.tvm_target())
    ref = reference.execute(ig, test)
    got = run_tvm(res.executable, ig, test)
    for k in ig.outputs:
        np.testing.assert_array_equal(got[k], ref[k])
    for k in want_kernels:
        assert res.gemm_kernels.get(k), (k, res.gemm_kernels)
    assert not res.fallbacks, res.fallbacks
    return res


@pytest.mark.skipif(not host_has_avx2(), reason="CPU without AVX2 or VNNI")
@pytest.mark.parametrize("isa", ["host", "avx2"])
def test_model_with_4bit_layers(tmp_path, isa):
    """Second conv and dense at 4 bits (weights requantized by hand); on AVX2 (a haswell target, run
    here) also the first conv, whose 5 channels per tap the W4A8 kernel declines (padding to 32):
    it runs on the INT8 kernel, warned."""
    prep, data, opts = _prepared(tmp_path)
    ig = prep.int_graph
    gemms = [n for n in ig.nodes if n.op in ("conv", "dense")]
    assert len(gemms) == 3
    for n in (gemms if isa == "avx2" else gemms[1:]):
        w = n.attrs["weight"].astype(np.int32)
        n.attrs["weight"] = np.clip(np.round(w / 16), -8, 7).astype(np.int8)
        n.attrs["weight_bits"] = 4
    if isa == "avx2":
        target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
        _build_and_compare(ig, data, opts, ["conv_avx2", "conv_avx2_w4", "dense_avx2_w4"], target)
        return
    tag = "vnni" if host_has_vnni() else "avx2"
    _build_and_compare(ig, data, opts, [f"conv_{tag}", f"conv_{tag}_w4", f"dense_{tag}_w4"])


@pytest.mark.skipif(not host_has_avx2(), reason="CPU without AVX2 or VNNI")
def test_model_with_16bit_activations(tmp_path):
    """The first conv reads int16 activations (W8A16): the input quantized 128x finer, the conv's
    requantization shift 7 more (same real scale)."""
    prep, data, opts = _prepared(tmp_path)
    ig = prep.int_graph
    q = next(n for n in ig.nodes if n.op == "quantize")
    conv = next(n for n in ig.nodes if n.op == "conv")
    assert conv.inputs[0] == q.outputs[0]
    q.attrs.update(inv_scale=np.float32(q.attrs["inv_scale"] * 128), lo=-32768, hi=32767, dtype="int16")
    ig.dtypes[q.outputs[0]] = "int16"
    conv.attrs["shift"] = np.asarray(conv.attrs["shift"]) + 7
    tag = "vnni" if host_has_vnni() else "avx2"   # (AMX declines GEMMs this small: cpu_amx.MIN_MACS)
    _build_and_compare(ig, data, opts, [f"conv_{tag}_a16", f"conv_{tag}", f"dense_{tag}"])


# ---- tuner and cost model -------------------------------------------------------------------------
@pytest.mark.skipif(not host_has_avx2(), reason="CPU without AVX2 or VNNI")
def test_tasks_tuning_records_and_features_of_lowbit_layers(tmp_path):
    """tasks_from_graph routes 4-bit / int16-input layers to their backends, the tuner measures them
    into records under those backend names, and the cost model featurizes the records."""
    from costmodel import features as F
    from qcompiler.tune import records as R
    from qcompiler.tune.tuner import tune
    from qcompiler.tune.workload import tasks_from_graph

    prep, data, opts = _prepared(tmp_path)
    ig = prep.int_graph
    gemms = [n for n in ig.nodes if n.op in ("conv", "dense")]
    for n in gemms[1:]:
        n.attrs["weight"] = np.clip(n.attrs["weight"] // 16, -8, 7).astype(np.int8)
        n.attrs["weight_bits"] = 4
    tasks = tasks_from_graph(ig, opts.target, "m")
    tag = "cpu_vnni" if host_has_vnni() else "cpu_avx2"
    assert sorted(t.workload.backend for t in tasks) == sorted([tag, f"{tag}_w4", f"{tag}_w4"])
    w4 = [t for t in tasks if t.workload.backend.endswith("_w4")]
    tune(w4, opts.target, tmp_path / "log", trials=4, repeats=2, min_repeat_ms=5)
    recs = R.read(tmp_path / "log").records
    assert len(recs) == 4 and {r["workload"]["backend"] for r in recs} == {f"{tag}_w4"}
    assert all(r["error"] is None for r in recs), [r["error"] for r in recs]
    X = F.cfg_only(recs[0]["workload"], recs[0]["config"], recs[0]["target"])
    assert np.isfinite(X[: len(F.TARGET_NAMES) + 35]).all()
