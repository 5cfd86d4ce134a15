"""Gathers and scatters at run-time indices (qcompiler/intops/indexed.py): a graph network's message
passing -- messages gathered from the source nodes (Gather), summed and max-pooled onto the
destination nodes (ScatterElements add / max), nodes picked by GatherND, NaN features masked
(IsNaN + Where) --, a PyTorch slice assignment (ScatterND) and a detector's top-k boxes picked by
GatherElements: integer-only, bit-exact to the reference, close to onnxruntime."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.helpers import check_pipeline, make_model, tensor

R = np.random.default_rng(11)
N, E, F, H = 6, 10, 4, 8


def _gnn():
    nodes = [helper.make_node("IsNaN", ["x"], ["nan"]), helper.make_node("Where", ["nan", "zero", "x"], ["xc"]),
             helper.make_node("MatMul", ["xc", "W"], ["h"]),
             helper.make_node("Gather", ["h", "src"], ["msg"], axis=1), helper.make_node("Relu", ["msg"], ["m"]),
             helper.make_node("ScatterElements", ["Z", "dst", "m"], ["agg"], axis=1, reduction="add"),
             helper.make_node("ScatterElements", ["Z", "dst", "m"], ["mx"], axis=1, reduction="max"),
             helper.make_node("GatherND", ["agg", "sel"], ["picked"])]
    inits = [tensor("W", (R.standard_normal((F, H)) * 0.5).astype(np.float32)), tensor("zero", np.float32(0)),
             tensor("Z", np.zeros((1, N, H), np.float32))]
    m = make_model(nodes, [("x", [1, N, F]), ("src", [E], TensorProto.INT64), ("dst", [1, E, H], TensorProto.INT64),
                           ("sel", [2, 2], TensorProto.INT64)], [("picked", None), ("mx", None)], inits)
    return m


def _feeds(n):
    src = R.integers(-N, N, E)                                   # negative indices count from the end
    dst = np.broadcast_to(R.integers(0, N, E)[None, :, None], (1, E, H))
    return {"x": R.standard_normal((n, N, F)).astype(np.float32), "src": src.astype(np.int64),
            "dst": np.ascontiguousarray(dst).astype(np.int64),
            "sel": np.array([[0, 1], [0, -1]], np.int64)}


def test_message_passing_is_integer_only_and_bit_exact():
    calib = _feeds(8)
    test = {k: (v[:1] if k == "x" else v) for k, v in calib.items()}
    prep, tv, ref = check_pipeline(_gnn(), calib, test, min_cos=0.99)
    ops = {n.op for n in prep.int_graph.nodes}
    assert {"take_rt", "scatter", "gather_nd", "compare"} <= ops and "float_island" not in ops


@pytest.mark.parametrize("reduction", ["none", "min"])
def test_scatter_reductions(reduction):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("ScatterElements", ["h", "idx", "u"], ["y"], axis=0, reduction=reduction)]
    m = make_model(nodes, [("x", [5, 3]), ("idx", [2, 4], TensorProto.INT64), ("u", [2, 4])], [("y", None)],
                   [tensor("W", (R.standard_normal((3, 4)) * 0.5).astype(np.float32))])
    idx = np.array([[0, 4, 2, 1], [3, 0, 2, 4]], np.int64)     # distinct rows per column: one write each
    calib = {"x": R.standard_normal((5, 3)).astype(np.float32), "idx": idx,
             "u": R.standard_normal((2, 4)).astype(np.float32)}
    check_pipeline(m, calib, calib, min_cos=0.99)


def test_slice_assignment_scatter_nd():
    """``y[:, 0:2] = sigmoid(y[:, 0:2]) * 2`` as PyTorch exports it (a YOLO head): ScatterND with
    constant indices writing an activation into another."""
    rows = 5
    idx = np.stack(np.meshgrid(np.arange(rows), np.arange(2), indexing="ij"), -1).astype(np.int64)  # [5, 2, 2]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("Slice", ["y", "s0", "s1", "ax"], ["xy"]), helper.make_node("Sigmoid", ["xy"], ["sg"]),
             helper.make_node("Mul", ["sg", "two"], ["xy2"]),
             helper.make_node("ScatterND", ["y", "idx", "xy2"], ["out"])]
    inits = [tensor("W", (R.standard_normal((3, 6)) * 0.7).astype(np.float32)), tensor("idx", idx),
             tensor("s0", np.array([0], np.int64)), tensor("s1", np.array([2], np.int64)),
             tensor("ax", np.array([1], np.int64)), tensor("two", np.float32(2))]
    m = make_model(nodes, [("x", [rows, 3])], [("out", None)], inits)
    calib = {"x": R.standard_normal((rows, 3)).astype(np.float32)}
    prep, _, _ = check_pipeline(m, calib, calib, min_cos=0.99)
    assert "scatter" in {n.op for n in prep.int_graph.nodes}


def test_top_k_boxes_by_gather_elements():
    """A detector's post-processing: the k best scores (TopK) pick their boxes (GatherElements of the
    box tensor at the TopK indices, expanded over the 4 coordinates)."""
    n_box, k = 12, 4
    nodes = [helper.make_node("MatMul", ["x", "Wb"], ["boxes"]), helper.make_node("MatMul", ["x", "Ws"], ["s2"]),
             helper.make_node("Reshape", ["s2", "shp"], ["scores"]),
             helper.make_node("TopK", ["scores", "k"], ["top", "ti"], axis=0),
             helper.make_node("Unsqueeze", ["ti", "one"], ["ti2"]), helper.make_node("Expand", ["ti2", "shp4"], ["ti4"]),
             helper.make_node("GatherElements", ["boxes", "ti4"], ["picked"], axis=0)]
    inits = [tensor("Wb", (R.standard_normal((5, 4)) * 0.7).astype(np.float32)),
             tensor("Ws", (R.standard_normal((5, 1)) * 0.7).astype(np.float32)),
             tensor("shp", np.array([n_box], np.int64)), tensor("k", np.array([k], np.int64)),
             tensor("one", np.array([1], np.int64)), tensor("shp4", np.array([k, 4], np.int64))]
    m = make_model(nodes, [("x", [n_box, 5])], [("picked", None)], inits)
    calib = {"x": R.standard_normal((n_box, 5)).astype(np.float32)}
    prep, _, _ = check_pipeline(m, calib, calib, min_cos=0.99)
    assert "gather_el" in {n.op for n in prep.int_graph.nodes}
