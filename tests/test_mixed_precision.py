"""Mixed precision (qcompiler/mixed/): GPTQ rounding, per-layer plans, the sensitivity cache, the
compile flags and their bad-input lines, and a zoo model compiled with --precision mixed whose
library equals the integer reference bit for bit (W4A8 and W8A16 layers included)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from qcompiler.cli import main
from qcompiler.mixed import gptq
from tests.helpers import make_model, tensor

R = np.random.default_rng(7)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """conv -> relu -> maxpool -> conv -> relu -> GAP -> Gemm -> softmax (the max pool passes its
    input's int8 through, so conv_b cannot read int16)."""
    d = tmp_path_factory.mktemp("mp")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv_a"),
             helper.make_node("Relu", ["c"], ["r0"]),
             helper.make_node("MaxPool", ["r0"], ["r"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["r", "W1", "B1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              name="conv_b"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W2"], ["logits"], name="head"),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=-1)]
    inits = [tensor("W", (R.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)),
             tensor("B", np.zeros(16, np.float32)),
             tensor("W1", (R.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)),
             tensor("B1", (R.standard_normal(32) * 0.1).astype(np.float32)),
             tensor("W2", R.standard_normal((32, 5)).astype(np.float32))]
    m = make_model(nodes, [("x", ["N", 3, 12, 12])], [("prob", None)], inits)
    onnx.save(m, d / "m.onnx")
    np.savez(d / "calib.npz", x=R.standard_normal((8, 3, 12, 12)).astype(np.float32))
    return d


def _err(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---- GPTQ ----------------------------------------------------------------------------------------
def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    n, k = 24, 64
    z = R.standard_normal((2048, 8))
    X = z @ R.standard_normal((8, k)) + 0.1 * R.standard_normal((2048, k))  # strongly correlated
    W = R.standard_normal((n, k))
    s = np.abs(W).max(1) / 7
    H = gptq.hessian(X)
    q_rtn = gptq.rtn(W, s, 4)
    q_gptq = gptq.gptq(W, s, H, 4)
    assert q_gptq.dtype == np.int8 and q_gptq.min() >= -8 and q_gptq.max() <= 7

    def err(q):
        return float(np.sum((X @ (W - q * s[:, None]).T) ** 2))
    assert err(q_gptq) < 0.6 * err(q_rtn)


def test_conv_patches_match_the_conv_reference():
    from qcompiler.intops.gemm import conv_acc

    x = R.integers(-5, 6, (2, 4, 7, 6)).astype(np.int8)
    w = R.integers(-3, 4, (6, 2, 3, 3)).astype(np.int8)
    a = {"strides": (2, 1), "pads": (1, 0, 1, 2), "dilations": (1, 2), "group": 2}
    acc = conv_acc(x, w, a["strides"], a["pads"], a["dilations"], a["group"])
    mats = gptq.conv_patches(x, a, w.shape, np.random.default_rng(0), max_rows=10**9)
    for g, m in enumerate(mats):  # every row is one output position; rows in (n, oh, ow) order
        wg = w[g * 3:(g + 1) * 3].reshape(3, -1).astype(np.float64)
        got = (m @ wg.T).reshape(2, acc.shape[2], acc.shape[3], 3).transpose(0, 3, 1, 2)
        assert np.array_equal(got, acc[:, g * 3:(g + 1) * 3])


# ---- plans, sensitivity cache ---------------------------------------------------------------------
def _state(d):
    from qcompiler import progress
    from qcompiler.driver import CompileOptions, prepare
    from qcompiler.targets import parse_target

    progress.set_reporter(progress.Reporter())  # a CLI test before may have left one on a closed stream

    return prepare(str(d / "m.onnx"), str(d / "calib.npz"), CompileOptions(target=parse_target("cpu"))).state


def test_per_layer_plan_sets_weight_and_activation_bits(small):
    from dataclasses import replace

    from passes.quantize import quantize

    st = _state(small)
    ig = quantize(st.fg, st.stats, st.nonneg, replace(st.cfg, plan=(("conv_b", 4, 8), ("conv_a", 8, 16))),
                  st.fr.model)
    by = {n.name: n for n in ig.nodes if n.op in ("conv", "dense")}
    assert by["conv_b"].attrs["weight_bits"] == 4 and np.abs(by["conv_b"].attrs["weight"]).max() <= 8
    assert by["head"].attrs["weight_bits"] == 8
    assert ig.dtypes[by["conv_a"].inputs[0]] == "int16" and ig.dtypes[by["conv_b"].inputs[0]] == "uint8"


def test_sensitivity_cache(small, tmp_path, monkeypatch):
    from qcompiler.mixed import plan as P
    from qcompiler.mixed import sensitivity as S

    monkeypatch.setenv("QC_CACHE_DIR", str(tmp_path))
    st = _state(small)
    feeds = [st.data.feeds(i) for i in range(4)]
    ev = S.Evaluator(st.fg, st.stats, st.nonneg, st.cfg, st.fr.model, feeds,
                     P.fp32_outputs(st.fr.model, feeds, list(st.fg.outputs)))
    layers = P.gemm_layers(st.fg)
    names = [n.name for n in layers]
    mo = P.MixedOptions()
    s1, key = P.sensitivity_for(ev, names, [], str(small / "m.onnx"), feeds, st.cfg, mo)
    assert not s1.cached and (tmp_path / f"sensitivity-{key}.json").is_file()
    assert s1.omega.shape == (3, 4) and np.all(s1.omega[:, 0] == 0) and np.all(s1.omega_int8[:, 1] > 0)
    s2, key2 = P.sensitivity_for(ev, names, [], str(small / "m.onnx"), feeds, st.cfg, mo)
    assert key2 == key and s2.cached and np.array_equal(s1.omega, s2.omega)
    assert np.array_equal(s1.available, s2.available)
    # another config (rounding), other samples: other keys
    _, key3 = P.sensitivity_for(ev, names, [], str(small / "m.onnx"), feeds, st.cfg, P.MixedOptions(rounding="rtn"))
    _, key4 = P.sensitivity_for(ev, names, [], str(small / "m.onnx"), feeds[:2], st.cfg, mo)
    assert len({key, key3, key4}) == 3
    # a corrupt cache file is measured again, not trusted
    (tmp_path / f"sensitivity-{key}.json").write_text("{not json")
    s5, _ = P.sensitivity_for(ev, names, [], str(small / "m.onnx"), feeds, st.cfg, mo)
    assert not s5.cached and np.allclose(s5.omega, s1.omega)


# ---- CLI flags and bad input -------------------------------------------------------------------
def test_compile_w4a8_and_pins_json(small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "w4.so"
    assert main(["-q", "compile", str(small / "m.onnx"), "-o", str(out), "--calib", str(small / "calib.npz"),
                 "--precision", "w4a8", "--pin", "head=8", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["precision"] == "w4a8"
    meta = json.loads(out.with_suffix(".json").read_text())
    bits = {r["name"]: (r["weight_bits"], r["act_bits"]) for r in meta["layers"]}
    assert bits == {"conv_a": (4, 8), "conv_b": (4, 8), "head": (8, 8)}
    assert meta["weight_bytes"] == (16 * 27 + 1) // 2 + 32 * 144 // 2 + 32 * 5
    assert meta["mixed_precision"]["layers"]["head"] == "w8a8"
    assert main(["-q", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "weights      " in text and "int4" in text


def test_compile_pin_16_bit_weights(small, tmp_path, capsys, monkeypatch):
    """--pin NODE=16: that layer's weights at 16 bits (two INT8 kernels, intops/gemm.py); model.json
    lists 16-bit weights at 2 bytes each and the library runs equal to the reference."""
    from qcompiler import reference
    from qcompiler.runtime import Library

    monkeypatch.setenv("QC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "w16.so"
    assert main(["-q", "compile", str(small / "m.onnx"), "-o", str(out), "--calib", str(small / "calib.npz"),
                 "--pin", "conv_b=16"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    bits = {r["name"]: (r["weight_bits"], r["act_bits"]) for r in meta["layers"]}
    assert bits["conv_b"] == (16, 8) and bits["conv_a"] == (8, 8)
    assert meta["weight_bytes"] == 16 * 27 + 32 * 144 * 2 + 32 * 5
    x = dict(np.load(small / "calib.npz"))
    feed = {k: v[:1] for k, v in x.items()}
    got = Library(str(out))(feed)
    st = _state(small)
    from dataclasses import replace

    from passes.quantize import quantize

    ig = quantize(st.fg, st.stats, st.nonneg, replace(st.cfg, plan=(("conv_b", 16, 8),)), st.fr.model)
    want = reference.execute(ig, feed)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v)


def test_compile_mixed_with_budget(small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "mx.so"
    assert main(["-q", "compile", str(small / "m.onnx"), "-o", str(out), "--calib", str(small / "calib.npz"),
                 "--precision", "mixed", "--latency-budget", "1.2", "--size-budget", "0.9"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    mp = meta["mixed_precision"]
    assert mp["predicted_ms"] <= 1.2 * mp["int8_predicted_ms"] * (1 + 1e-9)
    int8_bytes = 16 * 27 + 32 * 144 + 32 * 5
    assert meta["weight_bytes"] <= 0.9 * int8_bytes + 1
    assert mp["sensitivity"]["evaluator"].startswith("integer reference executor")


@pytest.mark.parametrize("args, needle", [
    (["--precision", "int4"], "w4a8"),
    (["--precision", "int4", "--target", "cuda", "--arch", "sm_90"], "w4a8"),
    (["--pin", "conv_bb=4"], "near matches: conv_b"),
    (["--pin", "conv_b=3"], "NODE=8, NODE=4, NODE=16"),
    (["--latency-budget", "0.8"], "applies to --precision mixed"),
    (["--precision", "mixed", "--latency-budget", "0.5"], "smallest achievable"),
    (["--precision", "mixed", "--size-budget", "0.1"], "smallest achievable"),
    (["--precision", "mixed", "--size-budget", "lots"], "--size-budget lots"),
    (["--precision", "mixed", "--latency-budget", "-1"], "positive"),
    (["--precision", "mixed", "--latency-budget", "0.9", "--latency-budget-ms", "1"], "not both"),
    (["--pin", "conv_b=a16"], "16-bit activations are not possible"),
])
def test_bad_precision_requests_are_one_line(small, tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setenv("QC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "bad.so"
    rc = main(["compile", str(small / "m.onnx"), "-o", str(out), "--calib", str(small / "calib.npz"), *args])
    err = [line for line in _err(capsys) if line.startswith("qc compile: error")]
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()


# ---- a zoo model end to end ------------------------------------------------------------------------
@pytest.mark.zoo
def test_zoo_mixed_library_equals_reference(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    from qcompiler import reference, zoo
    from qcompiler.driver import CompileOptions, layer_table, prepare
    from qcompiler.lowering.build import build
    from qcompiler.mixed.plan import MixedOptions
    from qcompiler.targets import parse_target
    from tests.helpers import run_tvm

    name = "mtcnn-rnet"
    if not zoo.available(name):
        pytest.skip(f"zoo package for {name} not installed: {zoo.install_command(name)}")
    from qcompiler import progress

    progress.set_reporter(progress.Reporter())  # a CLI test before may have left one on a closed stream
    monkeypatch.setenv("QC_CACHE_DIR", str(tmp_path))
    batch = 4
    # the ILP decides the other layers; the pins make sure both new layer kinds are in the library
    mo = MixedOptions(pins=("dense=4", "conv2d_5=a16"), latency_budget=1.3, samples=8)
    opts = CompileOptions(target=parse_target("cpu"), batch=batch, precision="mixed", mixed=mo)
    prep = prepare(zoo.model_path(name), zoo.calibration_inputs(name, 16), opts)
    ig = prep.int_graph
    rows = {r["name"]: r for r in layer_table(ig)}
    assert rows["dense"]["weight_bits"] == 4 and rows["conv2d_5"]["act_bits"] == 16
    assert rows["conv2d_5"]["input_dtype"] == "int16"
    res = build(ig, opts.target.tvm_target())
    feeds, _ = zoo.eval_set(name, 8)
    for i in range(0, 8, batch):
        x = {k: v[i:i + batch] for k, v in feeds.items() if k in ig.inputs}
        tv = run_tvm(res.executable, ig, x)
        ref = reference.execute(ig, x)
        for o in ig.outputs:
            assert tv[o].dtype == ref[o].dtype and np.array_equal(tv[o], ref[o]), f"TVM != reference on {o}"


def test_pareto_command(small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QC_CACHE_DIR", str(tmp_path / "cache"))
    png = tmp_path / "p.png"
    assert main(["-q", "mixed-precision", "pareto", str(small / "m.onnx"), "--calib", str(small / "calib.npz"),
                 "--points", "3", "--random", "2", "--plot", str(png), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    kinds = {p["kind"] for p in res["points"]}
    assert {"all-int8", "all-w4a8", "ilp"} <= kinds and png.stat().st_size > 1000
    base = next(p for p in res["points"] if p["kind"] == "all-int8")
    assert base["predicted_fraction"] == pytest.approx(1.0) and base["d_int8"] == 0
    for p in res["points"]:
        if p["kind"] == "ilp":  # the optimum within its budget: no random configuration has a lower sum Omega
            rivals = [r for r in res["points"] if r["kind"] == "random" and r["budget"] == p["budget"]]
            assert all(r["omega_sum"] >= p["omega_sum"] - 1e-12 for r in rivals)
    rc = main(["mixed-precision", "pareto", str(small / "m.onnx"), "--calib", str(small / "calib.npz"),
               "--plot", str(tmp_path / "p.jpg")])
    err = [line for line in _err(capsys) if "error" in line]
    assert rc == 2 and len(err) == 1 and ".png" in err[0]


def test_variant_runs_from_first_change_equal_full_runs(small):
    """The evaluator's prefix reuse (re-executing from the first changed node) equals a full run."""
    from qcompiler import reference
    from qcompiler.mixed import plan as P
    from qcompiler.mixed import sensitivity as S

    st = _state(small)
    feeds = [st.data.feeds(i) for i in range(3)]
    ev = S.Evaluator(st.fg, st.stats, st.nonneg, st.cfg, st.fr.model, feeds,
                     P.fp32_outputs(st.fr.model, feeds, list(st.fg.outputs)))
    for plan in ((("conv_b", 4, 8),), (("head", 4, 8),), (("conv_a", 8, 16), ("head", 4, 8))):
        ig = ev.quantize(plan)
        assert S.first_change(ev.ig8, ig) < len(ig.nodes)
        for f, got in zip(feeds, ev.run(ig)):
            full = reference.execute(ig, f)
            assert all(np.array_equal(full[o], got[o]) for o in ig.outputs)
