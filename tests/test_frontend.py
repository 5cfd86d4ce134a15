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


def test_batch_axis_from_declared_dims():
    """Only a batch-like symbolic first dim (and that dim on other inputs) is frozen to ``batch``: a
    [time, features] stream or a graph's node count takes the given (calibration) size."""
    S = frontend.InputSpec
    specs = [S("input", ("batch", "sequence"), "float32"), S("sr", (), "int64"), S("state", (2, "batch", 128), "float32")]
    assert frontend.concrete_shapes(specs, 3, {"input": (9, 512)}) == {"input": (3, 512), "sr": (), "state": (2, 3, 128)}
    stream = [S("input", ("input_dim_0", 81), "float32")]
    assert frontend.concrete_shapes(stream, 1, {"input": (200, 81)}) == {"input": (200, 81)}
    with pytest.raises(ModelError, match="symbolic dim 0"):
        frontend.concrete_shapes(stream, 1, {})
    graph = [S("feat", ("num_nodes", 85), "float32"), S("graph_slots", ("num_graphs",), "float32")]
    assert frontend.concrete_shapes(graph, 1, {"feat": (12, 85)}) == {"feat": (12, 85), "graph_slots": (1,)}
    # unnamed dims are one batch only as first dims
    ppocr = [S("x", ("?", 3, "?", "?"), "float32")]
    assert frontend.concrete_shapes(ppocr, 2, {"x": (5, 3, 48, 192)}) == {"x": (2, 3, 48, 192)}


def test_outer_scope_inputs_of_subgraphs():
    body = helper.make_graph([helper.make_node("Add", ["v", "outer"], ["v2"]),
                              helper.make_node("Identity", ["cond"], ["cond2"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("v", TensorProto.FLOAT, [2])],
                             [helper.make_tensor_value_info("cond2", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("v2", TensorProto.FLOAT, [2])])
    assert frontend.outer_scope_inputs({"body": body}) == {"outer"}
    assert frontend.outer_scope_inputs({"axis": 1}) == set()


def _described(fr):
    """What a frontend load gives the pipeline, comparable with ==."""
    g = fr.graph
    return (list(g.shapes.items()), list(g.dtypes.items()), g.inputs, g.outputs,
            [(n.op, n.name, n.inputs, n.outputs, repr(n.attrs)) for n in g.nodes],
            [(k, v.dtype, v.shape, v.tobytes()) for k, v in g.consts.items()],
            fr.model.SerializeToString(deterministic=True))


def _weights_model(ir3: bool = False):
    """A heavy weight (a 2048-element MatMul weight), a small one, a shape chain and a tensor that shape
    inference cannot size (NonZero: sized by the onnxruntime run)."""
    W = R.standard_normal((32, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Shape", ["a"], ["sh"]),
             helper.make_node("Reshape", ["a", "sh"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"]),
             helper.make_node("NonZero", ["x"], ["nz"])]
    m = make_model(nodes, [("x", ["N", 32])], [("y", None), ("nz", None, TensorProto.INT64)],
                   [tensor("W", W), tensor("b", R.standard_normal(64).astype(np.float32))])
    if ir3:  # initializers listed as graph inputs too (IR < 4 exporters)
        m.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [32, 64]))
    return m


@pytest.mark.parametrize("ir3", [False, True])
def test_weightless_inference_equals_whole_model(tmp_path, monkeypatch, ir3):
    """Shape inference and the sizing run see the model without its weights (``frontend._skeleton``):
    the load equals that of the whole model (every tensor's shape and dtype, in the same order, the
    constants, the folded model) and the skeleton ran (no fallback)."""
    onnx.save(_weights_model(ir3), tmp_path / "m.onnx")
    ran = []
    run = frontend._run_skeleton
    monkeypatch.setattr(frontend, "_run_skeleton", lambda *a: ran.append(run(*a)) or ran[-1])
    sk, heavy, added = frontend._skeleton(frontend.read_model(tmp_path / "m.onnx"))
    assert [i.name for i in heavy] == ["W"] and added == (set() if ir3 else {"W"})
    assert [i.name for i in sk.graph.initializer] == ["b"]
    frozen = frontend.freeze(frontend.read_model(tmp_path / "m.onnx"), {"x": (3, 32)})
    got = _described(frontend.load(tmp_path / "m.onnx", batch=3)), frontend._static_sizes(frozen)
    assert ran and all(r is not None for r in ran)
    monkeypatch.setattr(frontend, "SKELETON_MIN", 1 << 62)  # no weight left out: the whole model
    ran.clear()
    assert (_described(frontend.load(tmp_path / "m.onnx", batch=3)), frontend._static_sizes(frozen)) == got
    assert not ran


def test_weightless_run_failure_reports_the_whole_models_error(tmp_path, monkeypatch):
    """A model that fails only when run (an index beyond a weight table's rows): the skeleton's run
    fails, the whole model is run and its error reported, as without the skeleton."""
    T = R.standard_normal((32, 64)).astype(np.float32)
    nodes = [helper.make_node("Add", ["ids", "off"], ["i2"]),
             helper.make_node("Gather", ["T", "i2"], ["y"], axis=0)]
    m = make_model(nodes, [("ids", [1, 4], TensorProto.INT64)], [("y", None)],
                   [tensor("T", T), tensor("off", np.array(40, np.int64))])
    onnx.save(m, tmp_path / "m.onnx")
    errors, ran = [], []
    run = frontend._run_skeleton
    monkeypatch.setattr(frontend, "_run_skeleton", lambda *a: ran.append(run(*a)) or ran[-1])
    for lo in (frontend.SKELETON_MIN, 1 << 62):
        monkeypatch.setattr(frontend, "SKELETON_MIN", lo)
        with pytest.raises(ModelError, match="onnxruntime cannot run the model") as e:
            frontend.load(tmp_path / "m.onnx")
        errors.append(str(e.value))
    assert ran == [None]  # the skeleton failed once (then the whole model); not tried without weights left out
    assert errors[0] == errors[1]


def test_inert_weights_are_only_those_no_fold_can_read(monkeypatch):
    """``frontend._inert_weights``: a MatMul weight and an embedding table looked up by the input go
    to onnxruntime's fold as inputs; a Conv weight (a BatchNorm may fold into it), a table read at
    constant rows (the lookup folds) and a MatMul of two constants stay initializers."""
    monkeypatch.setattr(frontend, "SKELETON_MIN", 4)
    f = np.float32
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Gather", ["T", "ids"], ["e"], axis=0),
             helper.make_node("Gather", ["P", "rows"], ["p"], axis=0),
             helper.make_node("MatMul", ["C", "W2"], ["cw"]),
             helper.make_node("Conv", ["img", "K"], ["c"], kernel_shape=[1, 1])]
    m = make_model(nodes, [("x", [1, 4]), ("ids", [1, 2], TensorProto.INT64), ("img", [1, 2, 3, 3])],
                   [("h", None), ("e", None), ("p", None), ("cw", None), ("c", None)],
                   [tensor("W", np.ones((4, 4), f)), tensor("T", np.ones((8, 4), f)), tensor("P", np.ones((8, 4), f)),
                    tensor("rows", np.array([0, 1], np.int64)), tensor("C", np.ones((2, 4), f)),
                    tensor("W2", np.ones((4, 4), f)), tensor("K", np.ones((4, 2, 1, 1), f))])
    assert frontend._inert_weights(m) == {"W", "T"}
    out = frontend.fold(m)
    assert {i.name for i in out.graph.initializer} >= {"W", "T"}
    assert {vi.name for vi in out.graph.input} == {"x", "ids", "img"}
