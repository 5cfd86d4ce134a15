"""Per-layer latency of the precision choices (qcompiler/mixed/latency.py) and ``qc tune --precision``:
with a cost model, each W4A8 / W8A16 column is the model's prediction of the layer's own kernel, so
the ILP's predicted total equals ``qc predict`` (``costmodel.whole``) of the compiled configuration;
without one the roofline ratio is the fallback; the tuner's tasks include every choice's kernels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.helpers import make_model, tensor

R = np.random.default_rng(18)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """conv -> relu -> conv -> relu -> GAP -> Gemm -> relu -> Gemm (every layer can take each choice; the
    Gemms above 1% of the model's multiply-adds, so --precision int8 widens none of them as a head:
    passes/auto_wide.py head_layers)."""
    d = tmp_path_factory.mktemp("mpl")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv_a"),
             helper.make_node("Relu", ["c"], ["r0"]),
             helper.make_node("Conv", ["r0", "W1", "B1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              name="conv_b"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W2"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "W3"], ["y"], name="fc2")]
    inits = [tensor("W", (R.standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32)),
             tensor("B", np.zeros(32, np.float32)),
             tensor("W1", (R.standard_normal((64, 32, 3, 3)) * 0.1).astype(np.float32)),
             tensor("B1", (R.standard_normal(64) * 0.1).astype(np.float32)),
             tensor("W2", (R.standard_normal((64, 1024)) * 0.2).astype(np.float32)),
             tensor("W3", (R.standard_normal((1024, 64)) * 0.05).astype(np.float32))]
    m = make_model(nodes, [("x", ["N", 3, 16, 16])], [("y", None)], inits)
    onnx.save(m, d / "m.onnx")
    return d, {"x": R.standard_normal((8, 3, 16, 16)).astype(np.float32)}


class _FakeModel:
    """A deterministic stand-in for a trained cost model: a smooth function of each kernel's features
    (so an INT8, a W4A8 and a W8A16 kernel of one layer get different predictions)."""

    per_call_ms = 0.002
    target: dict = {}

    def predict(self, X):
        from costmodel import features as F
        from costmodel.train import STRUCTURAL

        X = np.asarray(X, float)[:, F.columns(list(STRUCTURAL))]   # the deployed feature families
        mu = 1e-6 * (1.0 + np.log1p(np.abs(np.nan_to_num(X))).sum(1))
        return mu, 0.9 * mu, 1.1 * mu


@pytest.fixture
def fake_model(monkeypatch):
    import costmodel.predict as P

    monkeypatch.setattr(P, "load_for", lambda target, path=None: (_FakeModel(), "fake"))
    return _FakeModel()


def _prepare(d, calib, precision="mixed", **mo):
    from qcompiler.driver import CompileOptions, prepare
    from qcompiler.mixed.plan import MixedOptions
    from qcompiler.targets import parse_target

    opts = CompileOptions(target=parse_target("cpu"), precision=precision, mixed=MixedOptions(samples=8, **mo))
    return prepare(str(d / "m.onnx"), calib, opts)


def _qc_predict(prep):
    from costmodel.predict import load_for
    from costmodel.whole import graph_kernels, predict_kernels
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import describe

    spec = parse_target("cpu")
    model, _ = load_for(describe(spec))
    return predict_kernels(graph_kernels(prep.int_graph, spec), describe(spec), model)


def test_ilp_total_equals_predict_of_the_chosen_configuration(small, fake_model, monkeypatch, tmp_path):
    monkeypatch.setenv("QC_CACHE_DIR", str(tmp_path))
    d, calib = small
    pins = ("conv_a=8", "conv_b=4", "fc1=4", "fc2=8")
    prep = _prepare(d, calib, pins=pins, latency_budget=2.0)
    m = prep.mixed
    assert m["layers"] == {"conv_a": "w8a8", "conv_b": "w4a8", "fc1": "w4a8", "fc2": "w8a8"}
    assert m["latency_source"] == "model"
    got = _qc_predict(prep)
    assert got["source"] == "model"
    assert m["predicted_ms"] == pytest.approx(got["total_ms"], rel=1e-9)
    # and the all-INT8 total is qc predict of the INT8 compile
    assert m["int8_predicted_ms"] == pytest.approx(_qc_predict(_prepare(d, calib, "int8"))["total_ms"], rel=1e-9)


def test_variant_columns_are_the_variant_kernels(small, fake_model):
    """Each choice's column is the prediction of the kernel that choice compiles to (not a ratio)."""
    from qcompiler.mixed.latency import predict_layers, uniform_graph
    from qcompiler.mixed.plan import CHOICES
    from qcompiler.targets import parse_target

    d, calib = small
    prep = _prepare(d, calib, "int8")
    lat = predict_layers(prep.int_graph, parse_target("cpu"), src=prep.state)
    assert lat.source == "model" and lat.names == ["conv_a", "conv_b", "fc1", "fc2"]
    for ci, c in enumerate(CHOICES):
        if c == "w16a8":   # two INT8 kernels per layer: the INT8 prediction x the roofline ratio
            assert np.all(lat.ms[:, ci] > lat.ms[:, 0])
            continue
        g = uniform_graph(prep.state, c)
        res = _qc_predict_graph(g)
        gemm = [layer["predicted_ms"] for layer in res["layers"]
                if any(k in layer["kernel"] for k in ("conv", "dense", "matmul"))]
        assert np.allclose(sorted(lat.ms[:, ci]), sorted(gemm[:4]), rtol=1e-9) or c == "w8a16"
    assert not np.allclose(lat.ms[:, 0], lat.ms[:, 1])  # W4A8 kernels are predicted as themselves


def _qc_predict_graph(g):
    from costmodel.predict import load_for
    from costmodel.whole import graph_kernels, predict_kernels
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import describe

    spec = parse_target("cpu")
    model, _ = load_for(describe(spec))
    return predict_kernels(graph_kernels(g, spec), describe(spec), model)


def test_roofline_ratio_without_a_cost_model(small, monkeypatch):
    import costmodel.predict as P
    from qcompiler.mixed.latency import predict_layers
    from qcompiler.targets import parse_target

    monkeypatch.setattr(P, "load_for", lambda target, path=None: (None, "none"))
    d, calib = small
    prep = _prepare(d, calib, "int8")
    lat = predict_layers(prep.int_graph, parse_target("cpu"), src=prep.state)
    assert lat.source == "roofline/roofline-ratio"
    assert np.all(lat.ms > 0)


def test_uniform_graphs_route_layers_to_their_backends(small):
    from qcompiler.kernels import backends
    from qcompiler.mixed.latency import uniform_graph

    d, calib = small
    prep = _prepare(d, calib, "int8")
    g4, g16 = uniform_graph(prep.state, "w4a8"), uniform_graph(prep.state, "w8a16")
    gem = [n for n in g4.nodes if n.op in ("conv", "dense")]
    assert all(int(n.attrs.get("weight_bits", 8)) == 4 for n in gem)
    assert all(np.abs(np.asarray(n.attrs["weight"])).max() <= 8 for n in gem)
    assert all(g16.dtypes[n.inputs[0]] == "int16" for n in g16.nodes if n.op in ("conv", "dense"))
    assert backends.get("cpu_vnni_w4").weight_bits == 4


def test_tune_tasks_cover_every_choice(small):
    from qcompiler.kernels import backends
    from qcompiler.targets import host_has_avx2, host_has_vnni, parse_target
    from qcompiler.tune.tuner import extract_tasks

    if not (host_has_vnni() or host_has_avx2()):
        pytest.skip("no x86 GEMM backend on this host")
    d, calib = small
    spec = parse_target("cpu")
    by = {p: extract_tasks([str(d / "m.onnx")], spec, calib=calib, precision=p) for p in ("int8", "w4a8", "w8a16", "mixed")}
    kinds = {p: {(backends.get(t.workload.backend).weight_bits, t.workload.a_dtype) for t in ts} for p, ts in by.items()}
    assert all(b == 8 and a != "int16" for b, a in kinds["int8"])
    assert any(b == 4 for b, _ in kinds["w4a8"])
    assert any(a == "int16" for _, a in kinds["w8a16"])
    keys = {p: {t.workload.key for t in ts} for p, ts in by.items()}
    assert keys["mixed"] == keys["int8"] | keys["w4a8"] | keys["w8a16"]


def test_tune_rejects_unknown_precision(small):
    from qcompiler.errors import InputError
    from qcompiler.targets import parse_target
    from qcompiler.tune.tuner import extract_tasks

    d, calib = small
    with pytest.raises(InputError, match="choose from int8, w4a8, w8a16, mixed"):
        extract_tasks([str(d / "m.onnx")], parse_target("cpu"), calib=calib, precision="int3")


def test_cost_features_tell_the_backends_apart():
    """The cost model's GEMM features read each backend's tile model (costmodel/features.py): one
    shape on the INT8, W4A8 and W8A16 VNNI backends gives three different feature rows."""
    from costmodel import features as F

    target = {"kind": "cpu", "arch": "znver5", "cores": 2, "isa": "avx512vnni"}
    rows = {}
    for be, a in (("cpu_vnni", "uint8"), ("cpu_vnni_w4", "uint8"), ("cpu_vnni_a16", "int16")):
        w = {"backend": be, "kind": "conv2d", "shape": [1, 28, 28, 64, 128, 3, 3], "a_dtype": a,
             "out_dtype": "int8", "lo": -128, "hi": 127, "target": "cpu:znver5", "strides": [1, 1],
             "pads": [1, 1, 1, 1], "dilations": [1, 1]}
        rows[be] = np.array(F.cfg_features(w, {"mr": 4, "nr": 2, "kc": 0, "n_outer": True, "parallel": True}, target))
    names = F.CFG_NAMES
    assert rows["cpu_vnni_w4"][names.index("c_w_bits")] == 4 and rows["cpu_vnni"][names.index("c_w_bits")] == 8
    assert rows["cpu_vnni_a16"][names.index("c_a_bits")] == 16
    v = names.index("v_log_cycles")
    assert len({round(float(r[v]), 6) for r in rows.values()}) == 3   # three tile models
