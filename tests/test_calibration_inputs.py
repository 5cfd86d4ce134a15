"""Calibration data for inputs without a batch axis: the model's declared input rank decides which
axis holds the samples (qcompiler/calibrate.py), and the compiled shapes come from the declared dims
and --batch, never from the number of samples."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler import calibrate, frontend
from qcompiler.cli import main
from qcompiler.errors import CalibrationError
from tests.helpers import make_model, one_line_error, tensor

R = np.random.default_rng(11)
W = (R.standard_normal((8, 8)) * 0.4).astype(np.float32)


def _scalar_model():
    """y = relu(x @ W) * gain, with gain a scalar input (like silero-vad's sample rate)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("Mul", ["r", "gain"], ["y"])]
    return make_model(nodes, [("x", ["N", 8]), ("gain", [])], [("y", None)], [tensor("W", W)])


def _state_model():
    """A recurrent step: y = relu(x @ W + mean(state)), stateN = tanh(state); state [2, 1, 8] has no batch."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("ReduceMean", ["state", "axes"], ["s"], keepdims=0),
             helper.make_node("Add", ["m", "s"], ["a"]), helper.make_node("Relu", ["a"], ["y"]),
             helper.make_node("Tanh", ["state"], ["stateN"])]
    return make_model(nodes, [("x", ["N", 8]), ("state", [2, 1, 8])], [("y", None), ("stateN", None)],
                      [tensor("W", W), tensor("axes", np.array([0, 1], np.int64))], opset=18)


def _stream_model():
    """A [time, features] stream with no batch dim (madmom's models): y = relu(x @ W)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    return make_model(nodes, [("x", ["time", 8])], [("y", None)], [tensor("W", W)])


def _compile(tmp_path, model, calib, *extra):
    onnx.save(model, tmp_path / "m.onnx")
    if isinstance(calib, dict):
        np.savez(tmp_path / "calib.npz", **calib)
        calib = tmp_path / "calib.npz"
    out = tmp_path / "m.so"
    rc = main(["-q", "compile", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(calib), *extra])
    assert rc == 0
    meta = json.loads((tmp_path / "m.json").read_text())
    return out, meta


def _run(lib, feeds: dict) -> dict:
    """One run of the library at its compiled shapes (the TVM runtime alone)."""
    import tvm
    from tvm import relax

    meta = json.loads(lib.with_suffix(".json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    args = []
    for i in meta["inputs"]:
        a = np.asarray(feeds[i["name"]], dtype=i["dtype"])
        assert all(d == w for d, w in zip(a.shape, i["shape"]) if isinstance(w, int)) and a.ndim == len(i["shape"]), \
            (i["name"], a.shape, i["shape"])  # a named dim: symbolic
        args.append(tvm.runtime.tensor(np.require(a, requirements="C")))  # ascontiguousarray makes 0-d 1-d
    res = vm["main"](*args)
    outs = [res] if len(meta["outputs"]) == 1 else list(res)
    return {o["name"]: r.numpy() for o, r in zip(meta["outputs"], outs)}


def _ort(model, feeds):
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], s.run(None, feeds)))


def _close(a, b, tol=0.06):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= tol * (1 + np.abs(b).max()), (a, b)


def _shapes(meta, side="inputs"):
    return {i["name"]: i["shape"] for i in meta[side]}


# ---- (a) a scalar input: one value shared by all samples -------------------------------------------

def test_scalar_input(tmp_path):
    m = _scalar_model()
    x = R.standard_normal((6, 8)).astype(np.float32)
    lib, meta = _compile(tmp_path, m, {"x": x, "gain": np.float32(0.5)})
    assert _shapes(meta) == {"x": [1, 8], "gain": []}          # declared: symbolic batch -> --batch 1
    assert meta["calibration"]["samples"] == 6 and meta["batch"] == 1
    feeds = {"x": x[:1], "gain": np.array(0.5, np.float32)}
    _close(_run(lib, feeds)["y"], _ort(m, feeds)["y"])


# ---- (b) a fixed-size state beside a batched input: never split ----------------------------------------

def test_fixed_state_beside_batched_input(tmp_path):
    m = _state_model()
    x = R.standard_normal((5, 8)).astype(np.float32)
    state = (R.standard_normal((2, 1, 8)) * 0.3).astype(np.float32)
    lib, meta = _compile(tmp_path, m, {"x": x, "state": state})
    assert _shapes(meta) == {"x": [1, 8], "state": [2, 1, 8]}
    assert meta["calibration"]["samples"] == 5 and meta["batch"] == 1
    assert _shapes(meta, "outputs") == {"y": [1, 8], "stateN": [2, 1, 8]}
    feeds = {"x": x[:1], "state": state}
    got, want = _run(lib, feeds), _ort(m, feeds)
    for k in ("y", "stateN"):
        _close(got[k], want[k])


def test_per_sample_states_and_batch(tmp_path):
    """A stack [N, 2, 1, 8] gives each sample its own state; --batch 3 keeps x's declared batch axis."""
    m = _state_model()
    x = R.standard_normal((4, 8)).astype(np.float32)
    states = (R.standard_normal((4, 2, 1, 8)) * 0.3).astype(np.float32)
    specs = frontend.input_specs(m)
    cs = calibrate.calibration_set({"x": x, "state": states}, specs, 1)
    assert (cs.n, cs.batch, cs.shapes) == (4, 1, {"x": (1, 8), "state": (2, 1, 8)})
    f = cs.feeds(2)
    assert np.array_equal(f["x"], x[2:3]) and np.array_equal(f["state"], states[2])
    shared = calibrate.calibration_set({"x": x, "state": states[0]}, specs, 3)
    assert (shared.n, shared.batch, shared.shapes) == (4, 3, {"x": (3, 8), "state": (2, 1, 8)})
    with pytest.raises(CalibrationError, match="'state'.*no batch axis.*--batch 1"):
        calibrate.calibration_set({"x": x, "state": states}, specs, 3)


def test_batch_axis_elsewhere_is_broadcast():
    """silero-vad: state [2, batch, 128] shares the batch dim of input [batch, sequence]."""
    specs = [frontend.InputSpec("input", ("batch", "sequence"), "float32"), frontend.InputSpec("sr", (), "int64"),
             frontend.InputSpec("state", (2, "batch", 4), "float32")]
    data = {"input": np.ones((5, 32), np.float32), "sr": np.array(16000), "state": np.zeros((2, 1, 4), np.float32)}
    cs = calibrate.calibration_set(data, specs, 2)
    assert cs.shapes == {"input": (2, 32), "sr": (), "state": (2, 2, 4)} and cs.n == 5
    assert frontend.concrete_shapes(specs, 2, cs.shapes) == cs.shapes
    f = cs.feeds(4)
    assert f["state"].shape == (2, 2, 4) and f["sr"].shape == () and f["input"].shape == (2, 32)


# ---- (c) a [time, features] stream with no batch dim ------------------------------------------------------

def test_stream_input_without_batch_dim(tmp_path):
    m = _stream_model()
    xs = R.standard_normal((3, 10, 8)).astype(np.float32)     # a stack of 3 streams of 10 frames
    lib, meta = _compile(tmp_path, m, {"x": xs})
    # the time axis the model declares symbolic stays so (calibrated at the streams' 10 frames)
    assert _shapes(meta) == {"x": ["time", 8]} and _shapes(meta, "outputs") == {"y": ["time", 8]}
    assert meta["symbolic_dims"]["time"]["calibrated"] == 10
    assert meta["calibration"]["samples"] == 3
    _close(_run(lib, {"x": xs[1]})["y"], _ort(m, {"x": xs[1]})["y"])
    # one stream given as is: one sample of 10 frames, not 10 samples
    cs = calibrate.calibration_set({"x": xs[0]}, frontend.input_specs(m), 1)
    assert (cs.n, cs.shapes) == (1, {"x": (10, 8)})


def test_sample_count_does_not_change_compiled_shape():
    specs = [frontend.InputSpec("x", ("N", 3, 8, "W"), "float32")]
    for n in (1, 4, 9):
        cs = calibrate.calibration_set({"x": np.zeros((n, 3, 8, 12), np.float32)}, specs, 1)
        assert cs.shapes == {"x": (1, 3, 8, 12)} and cs.n == n
    cs = calibrate.calibration_set({"x": np.zeros((9, 3, 8, 12), np.float32)}, specs, 4)
    assert cs.shapes == {"x": (4, 3, 8, 12)} and [len(cs.feeds(s)["x"]) for s in (0, 4, 8)] == [4, 4, 4]


# ---- (d) a folder of .npz files, one sample each ------------------------------------------------------

def test_folder_of_single_samples(tmp_path):
    m = _state_model()
    d = tmp_path / "calib"
    d.mkdir()
    x = R.standard_normal((4, 8)).astype(np.float32)
    state = np.zeros((2, 1, 8), np.float32)
    for i in range(4):   # x as one sample without its batch axis ([8]) or with it ([1, 8])
        np.savez(d / f"s{i}.npz", x=x[i] if i % 2 else x[i:i + 1], state=state)
    lib, meta = _compile(tmp_path, m, d, "--batch", "2")
    assert _shapes(meta) == {"x": [2, 8], "state": [2, 1, 8]}
    assert meta["calibration"]["samples"] == 4 and meta["batch"] == 2
    feeds = {"x": x[:2], "state": state}
    _close(_run(lib, feeds)["y"], _ort(m, feeds)["y"])


def test_folder_of_streams(tmp_path):
    m = _stream_model()
    d = tmp_path / "calib"
    d.mkdir()
    xs = R.standard_normal((3, 12, 8)).astype(np.float32)
    for i in range(3):
        np.savez(d / f"{i}.npz", x=xs[i])
    lib, meta = _compile(tmp_path, m, d)
    assert _shapes(meta) == {"x": ["time", 8]} and meta["calibration"]["samples"] == 3
    assert meta["symbolic_dims"]["time"]["calibrated"] == 12
    _close(_run(lib, {"x": xs[2]})["y"], _ort(m, {"x": xs[2]})["y"])


# ---- bad input: one line, exit code 2, naming the input, its declared shape, the array's and the expected

_bad = one_line_error


def test_bad_calibration_inputs(tmp_path, capsys):
    out = str(tmp_path / "o.so")
    for name, model in (("scalar", _scalar_model()), ("state", _state_model()), ("stream", _stream_model())):
        onnx.save(model, tmp_path / f"{name}.onnx")
    x = np.zeros((4, 8), np.float32)

    def bad(model, calib, *needles, extra=()):
        p = tmp_path / "bad.npz"
        np.savez(p, **calib)
        _bad(capsys, ["compile", str(tmp_path / f"{model}.onnx"), "-o", out, "--calib", str(p), *extra], *needles)
        assert not os.path.exists(out)

    bad("scalar", {"x": x, "gain": np.ones((4, 2), np.float32)}, "'gain'", "declared shape ()", "(4, 2)", "scalar")
    bad("state", {"x": x, "state": np.zeros((2, 8), np.float32)}, "'state'", "(2, 1, 8)", "(2, 8)", "one sample")
    bad("state", {"x": x, "state": np.zeros((3, 2, 1, 8), np.float32)}, "disagree", "'x' 4", "'state' 3")
    bad("state", {"x": np.zeros((4, 5), np.float32), "state": np.zeros((2, 1, 8), np.float32)},
        "'x'", "(N, 8)", "(4, 5)", "dim 1 must be 8")
    bad("stream", {"x": np.zeros((2, 10, 8), np.float32)}, "no batch axis", "--batch 1", extra=("--batch", "2"))
    bad("stream", {"x": np.zeros((10,), np.float32)}, "'x'", "(time, 8)", "(10,)", "for one sample")
    d = tmp_path / "uneven"
    d.mkdir()
    np.savez(d / "a.npz", x=np.zeros((10, 8), np.float32))
    np.savez(d / "b.npz", x=np.zeros((12, 8), np.float32))
    _bad(capsys, ["compile", str(tmp_path / "stream.onnx"), "-o", out, "--calib", str(d), "--static-shapes"],
         "'x'", "'time'", "10", "12", "b.npz", "equal size")
    # by default the time axis stays symbolic: streams of different lengths calibrate it
    from qcompiler.cli import main

    assert main(["-q", "compile", str(tmp_path / "stream.onnx"), "-o", out, "--calib", str(d)]) == 0


def test_batch_dim_names():
    for name in ("N", "batch", "batch_size", "B", "unk__653", "?", "DynamicDimension.0", "p2o.DynamicDimension.0"):
        assert frontend.is_batch_dim(name), name
    for name in ("sequence_length", "time", "input_dim_0", "num_nodes", "num_edges", "feats_length", "T", "seq"):
        assert not frontend.is_batch_dim(name), name


def test_undefined_output_type_is_completed():
    """A model whose graph output says elem_type 0 (UNDEFINED) still loads in onnxruntime (tf2onnx
    models' constant Casts folded in a one-node model used to fail with "Invalid tensor data type 0")."""
    from qcompiler.ort_util import session

    node = helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT16)
    g = helper.make_graph([node], "f", [], [helper.make_tensor_value_info("y", 0, None)],
                          [tensor("c", np.ones(3, np.float32))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    (y,) = session(m).run(None, {})
    assert y.dtype == np.float16 and y.tolist() == [1, 1, 1]
