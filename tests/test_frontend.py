"""Frontend: opset upgrade, Constant-node weights, symbolic dims frozen, shape subgraphs folded."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler import frontend
from qcompiler.errors import ModelError
from tests.helpers import check_pipeline, make_model, tensor

R = np.random.default_rng(3)


def test_old_opset_upgraded_and_imported(tmp_path):
    # opset 9: Upsample (removed later), Flatten; weights as initializers
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Upsample", ["r", "s"], ["u"], mode="nearest"),
             helper.make_node("Flatten", ["u"], ["y"])]
    m = make_model(nodes, [("x", [1, 2, 4, 4])], [("y", None)],
                   [tensor("W", R.standard_normal((3, 2, 3, 3)).astype(np.float32)),
                    tensor("s", np.array([1, 1, 2, 2], np.float32))], opset=9)
    onnx.save(m, tmp_path / "m.onnx")
    fr = frontend.load(tmp_path / "m.onnx")
    assert fr.opset == 9 and frontend.model_opset(fr.model) >= 13
    check_pipeline(m, {"x": R.standard_normal((4, 1, 2, 4, 4)).astype(np.float32)[:, 0]})


def test_constant_node_weights_and_symbolic_width():
    """PP-OCR style: weights in Constant nodes, width symbolic, a Shape->Gather->Concat->Reshape chain."""
    W = R.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W"], value=tensor("w", W)),
             helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["sh"]),
             helper.make_node("Constant", [], ["i0"], value=tensor("i0v", np.array([0], np.int64))),
             helper.make_node("Gather", ["sh", "i0"], ["n"], axis=0),
             helper.make_node("Constant", [], ["m1"], value=tensor("m1v", np.array([-1], np.int64))),
             helper.make_node("Concat", ["n", "m1"], ["newshape"], axis=0),
             helper.make_node("Reshape", ["c", "newshape"], ["y"])]
    m = make_model(nodes, [("x", ["N", 3, 8, "W"])], [("y", None)], [])
    check_pipeline(m, {"x": R.standard_normal((4, 3, 8, 12)).astype(np.float32)})


def test_symbolic_dim_without_value_is_an_error(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", ["N", 3, "H"])], [("y", None)])
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="symbolic"):
        frontend.load(tmp_path / "m.onnx", batch=1, shapes={})


def test_opset_out_of_range(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 3])], [("y", None)], opset=7)
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="opset 7"):
        frontend.load(tmp_path / "m.onnx")


def test_integer_input_dtype_kept(tmp_path):
    m = make_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], [("x", [1, 3], TensorProto.INT64)],
                   [("y", None)])
    onnx.save(m, tmp_path / "m.onnx")
    fr = frontend.load(tmp_path / "m.onnx")
    assert fr.graph.dtypes["x"] == "int64"
