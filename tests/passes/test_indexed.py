"""Gathers and scatters at run-time indices (qcompiler/intops/indexed.py): a graph network's message
passing -- messages gathered from the source nodes (Gather), summed and max-pooled onto the
destination nodes (ScatterElements add / max), nodes picked by GatherND, NaN features masked
(IsNaN + Where) -- integer-only, bit-exact to the reference, close to onnxruntime."""

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
    assert {"take_rt", "scatter_el", "gather_nd", "compare"} <= ops and "float_island" not in ops


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
