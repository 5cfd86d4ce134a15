"""Model forms the frontend rewrites before calibration: pre-quantized models (ONNX Runtime's
dynamic, static QDQ and QOperator quantization; passes/import_quantized.py), STFT
(passes/decompose_onnx.py) and If (passes/specialize_if.py).  Each is checked end to end:
the rewrite against onnxruntime, then float -> integer reference -> TVM (tests/helpers.py)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from passes.decompose_onnx import decompose
from passes.import_quantized import import_quantized
from passes.specialize_if import specialize_ifs
from tests.helpers import check_pipeline, make_model, ort_run, save, tensor

R = np.random.default_rng(7)


def _float_mlp():
    W1 = (R.standard_normal((16, 32)) * 0.3).astype(np.float32)
    W2 = (R.standard_normal((32, 8)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    return make_model(nodes, [("x", [1, 4, 16])], [("y", [1, 4, 8])], [tensor("W1", W1), tensor("W2", W2)], opset=17)


def _float_cnn():
    W = (R.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32)
    b = (R.standard_normal(6) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 6, 8, 8])], [tensor("W", W), tensor("b", b)], opset=17)


def _data(shape, n=8):
    return {"x": R.standard_normal((n, *shape[1:])).astype(np.float32)}


class _Reader:
    def __init__(self, data):
        self.it = iter([{"x": data["x"][i:i + 1]} for i in range(len(data["x"]))])

    def get_next(self):
        return next(self.it, None)


def _ops(m):
    return {n.op_type for n in m.graph.node}


def test_dynamic_quantized_matmul(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    f = save(_float_mlp(), tmp_path)
    q = str(tmp_path / "q.onnx")
    quantize_dynamic(f, q, weight_type=QuantType.QInt8)
    qm = onnx.load(q)
    assert "MatMulInteger" in _ops(qm) and "DynamicQuantizeLinear" in _ops(qm)
    imported = import_quantized(qm)
    assert not _ops(imported) & {"MatMulInteger", "DynamicQuantizeLinear"}
    data = _data((1, 4, 16))
    # the imported float model computes the stored int8 weights exactly: close to the original float model
    np.testing.assert_allclose(ort_run(imported, {"x": data["x"][:1]})[0], ort_run(f, {"x": data["x"][:1]})[0],
                               rtol=0.02, atol=0.05)
    check_pipeline(qm, data, min_cos=0.98, float_rtol=0.02)


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_static_quantized_conv(tmp_path, fmt):
    from onnxruntime.quantization import QuantFormat, quantize_static

    f = save(_float_cnn(), tmp_path)
    q = str(tmp_path / "q.onnx")
    data = _data((1, 3, 8, 8))
    quantize_static(f, q, _Reader(data), quant_format=getattr(QuantFormat, fmt))
    qm = onnx.load(q)
    imported = import_quantized(qm)
    left = _ops(imported) & {"QLinearConv", "DequantizeLinear", "QuantizeLinear"}
    assert not left, left
    check_pipeline(qm, data, min_cos=0.98, float_rtol=0.05)


def test_dynamic_quantized_lstm_matches_lstm():
    """com.microsoft.DynamicQuantizeLSTM stores W as [dirs, input, 4*hidden]: transposed back."""
    import onnxruntime as ort

    I, H, T = 6, 5, 4
    Wq = R.integers(-127, 128, (1, I, 4 * H)).astype(np.int8)
    Rq = R.integers(-127, 128, (1, H, 4 * H)).astype(np.int8)
    inits = [tensor("W", Wq), tensor("R", Rq), tensor("ws", np.array([0.01], np.float32)),
             tensor("wz", np.array([3], np.int8)), tensor("rs", np.array([0.02], np.float32)),
             tensor("rz", np.array([-2], np.int8)), tensor("B", R.standard_normal((1, 8 * H)).astype(np.float32))]
    n = helper.make_node("DynamicQuantizeLSTM", ["x", "W", "R", "B", "", "", "", "", "ws", "wz", "rs", "rz"],
                         ["y"], domain="com.microsoft", hidden_size=H)
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, 1, I])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    f = import_quantized(m)
    assert _ops(f) == {"LSTM"}
    x = R.standard_normal((T, 1, I)).astype(np.float32)
    a = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    b = ort.InferenceSession(f.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(a - b).max() < 0.03   # the contrib op also quantizes its activations: close, not equal


def test_quantized_embedding_gather():
    """DequantizeLinear after a Gather (and a Transpose) of an int8 table: the table is dequantized."""
    table = R.integers(-128, 128, (20, 6)).astype(np.int8)
    nodes = [helper.make_node("Gather", ["T", "ids"], ["g"]),
             helper.make_node("DequantizeLinear", ["g", "s", "z"], ["e"]),
             helper.make_node("Transpose", ["g"], ["gt"], perm=[0, 2, 1]),
             helper.make_node("DequantizeLinear", ["gt", "s", "z"], ["et"]),
             helper.make_node("MatMul", ["e", "et"], ["y"])]
    m = make_model(nodes, [("ids", [1, 5], TensorProto.INT64)], [("y", None)],
                   [tensor("T", table), tensor("s", np.float32(0.05)), tensor("z", np.int8(3))])
    f = import_quantized(m)
    assert not _ops(f) & {"DequantizeLinear"}
    ids = {"ids": R.integers(0, 20, (1, 5)).astype(np.int64)}
    np.testing.assert_allclose(ort_run(f, ids)[0], ort_run(m, ids)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onesided,shape", [(1, [1, 400]), (0, [1, 400, 1])])
def test_stft_is_a_dft_conv(onesided, shape):
    L = 64
    nodes = [helper.make_node("STFT", ["x", "step", "w"], ["s"], onesided=onesided),
             helper.make_node("ReduceSumSquare", ["s"], ["p"], axes=[-1], keepdims=0),
             helper.make_node("Sqrt", ["p"], ["y"])]
    m = make_model(nodes, [("x", shape)], [("y", None)],
                   [tensor("step", np.array(16, np.int64)), tensor("w", np.hanning(L).astype(np.float32))])
    d = decompose(onnx.shape_inference.infer_shapes(m))
    assert "STFT" not in _ops(d) and "Conv" in _ops(d)
    x = R.standard_normal((1, *shape[1:])).astype(np.float32)
    np.testing.assert_allclose(ort_run(d, {"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-4, atol=1e-4)
    check_pipeline(m, {"x": R.standard_normal((8, *shape[1:])).astype(np.float32)}, min_cos=0.97, float_rtol=1e-3)


@pytest.mark.parametrize("shape,axis,length,onesided", [
    ([1, 6, 32, 1], -2, None, 1),    # framed audio, as torch.stft exports it (wespeaker's front end)
    ([1, 32, 6, 1], 1, 40, 0),       # the signal on an inner axis, zero-padded to 40 points
    ([1, 5, 48, 1], 2, 32, 1),       # truncated to 32 points
])
def test_dft_is_a_matmul_by_its_basis(shape, axis, length, onesided):
    """passes/decompose_onnx.py _dft: equal to ONNX Runtime's DFT in float, then the whole pipeline
    (a power spectrum after it) within quantization, bit-exact."""
    r = np.random.default_rng(12)
    ins = ["x", "len" if length else ""]
    nodes = [helper.make_node("DFT", ins, ["s"], axis=axis, onesided=onesided),
             helper.make_node("ReduceSumSquare", ["s"], ["y"], axes=[-1], keepdims=0)]
    inits = [tensor("len", np.array(length, np.int64))] if length else []
    m = make_model(nodes, [("x", shape)], [("y", None)], inits)
    d = decompose(onnx.shape_inference.infer_shapes(m))
    assert "DFT" not in _ops(d) and "MatMul" in _ops(d)
    x = r.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(ort_run(d, {"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-4, atol=1e-3)
    check_pipeline(m, {"x": r.standard_normal((8, *shape[1:])).astype(np.float32)}, min_cos=0.97, float_rtol=1e-3,
                   test={"x": x[:1]})


def _branch(name, k):
    n = helper.make_node("Mul", ["x", f"k{name}"], [f"out_{name}"])
    return helper.make_graph([n], name, [], [helper.make_tensor_value_info(f"out_{name}", TensorProto.FLOAT, None)],
                             [tensor(f"k{name}", np.float32(k))])


def _if_model(cond_nodes, extra_inputs=()):
    W = (R.standard_normal((8, 8)) * 0.3).astype(np.float32)
    nodes = list(cond_nodes) + [
        helper.make_node("If", ["cond"], ["b"], then_branch=_branch("then", 2.0), else_branch=_branch("else", -3.0)),
        helper.make_node("MatMul", ["b", "W"], ["y"])]
    return make_model(nodes, [("x", [1, 8])] + list(extra_inputs), [("y", [1, 8])],
                      [tensor("W", W), tensor("eight", np.array([8], np.int64)), tensor("one", np.array(1, np.int64))])


def test_if_on_a_shape_is_inlined():
    """If(Shape(x)[1] == 8): constant once shapes are fixed: the then-branch, no guard."""
    m = _if_model([helper.make_node("Shape", ["x"], ["sh"], start=1, end=2),
                   helper.make_node("Equal", ["sh", "eight"], ["c1"]),
                   helper.make_node("Squeeze", ["c1"], ["cond"])])
    prep, _, _ = check_pipeline(m, _data((1, 8)), min_cos=0.99)
    assert prep.fr.guards == []


def test_if_steered_by_an_input_is_guarded(tmp_path):
    """If(mode == 1) with mode an int64 input equal to 1 on every calibration sample: the then-branch,
    the condition kept as a guard output; a run with mode = 0 is refused in one line."""
    from qcompiler import driver
    from qcompiler.errors import InputError
    from qcompiler.runtime import Library
    from qcompiler.targets import parse_target

    m = _if_model([helper.make_node("Equal", ["mode", "one"], ["cond"])], [("mode", [], TensorProto.INT64)])
    data = {**_data((1, 8)), "mode": np.array(1, np.int64)}
    f, guards = specialize_ifs(m)
    assert "If" in _ops(f) and guards == []          # no samples: nothing observed, nothing specialized
    prep, _, _ = check_pipeline(m, data, test={"x": data["x"][:1], "mode": data["mode"]}, min_cos=0.99)
    assert [g.expected for g in prep.fr.guards] == [1] and prep.fr.guards[0].inputs == ("mode",)
    path = save(m, tmp_path)
    driver.compile_model(path, tmp_path / "m.so", data, driver.CompileOptions(target=parse_target("cpu")))
    lib = Library(str(tmp_path / "m.so"))
    assert lib.output_names == ["y"]
    x = data["x"][:1]
    np.testing.assert_allclose(lib(x=x, mode=np.array(1, np.int64))["y"], ort_run(m, {"x": x, "mode": np.array(1)})[0],
                               rtol=0.05, atol=0.05 * np.abs(ort_run(m, {"x": x, "mode": np.array(1)})[0]).max())
    with pytest.raises(InputError, match="other branch of If"):
        lib(x=x, mode=np.array(0, np.int64))
    assert lib.bench({"x": x, "mode": np.array(1, np.int64)}, repeats=2)["median_ms"] > 0  # a 0-d input times too
