"""Exact per-axis interpolation maps of a Resize node (linear / cubic), from onnxruntime itself.

Resize in these modes is separable: along each resized axis the output is a fixed linear map of
the input, out[o] = sum_i A[i, o] x[i].  Running the node's own Resize (its attributes, scales or
sizes, on onnxruntime, the reference executor) on an identity batch -- input [n, 1, 1, n] with
x[i, 0, 0, j] = (i == j), resized along the last axis only -- returns A, so every
coordinate_transformation_mode, cubic coefficient, exclude_outside and antialias setting is ONNX's
own rule, with no re-implementation.  The nonzero taps of each output column become
(idx [T, out], w [T, out]) with T the most taps any column has (missing taps: weight 0).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompiler.graph import Node


def _ort_axis_map(node: Node, n_in: int, n_out: int, scale: float | None) -> np.ndarray:
    from qcompiler.ort_util import session

    attrs = {k: v for k, v in node.attrs.items() if k not in ("domain", "act", "axes")}
    if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        raise ValueError("coordinate_transformation_mode tf_crop_and_resize")
    inits = [numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    if scale is not None:
        inits.append(numpy_helper.from_array(np.array([1, 1, 1, scale], np.float32), "scales"))
        ins = ["x", "roi", "scales"]
    else:
        inits.append(numpy_helper.from_array(np.array([n_in, 1, 1, n_out], np.int64), "sizes"))
        ins = ["x", "roi", "", "sizes"]
    op = "Resize"
    n = helper.make_node(op, ins, ["y"], **attrs)
    g = helper.make_graph([n], "r", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [n_in, 1, 1, n_in])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    eye = np.eye(n_in, dtype=np.float32).reshape(n_in, 1, 1, n_in)
    y = session(m).run(["y"], {"x": eye})[0]
    if y.shape != (n_in, 1, 1, n_out):
        raise ValueError(f"per-axis map has shape {y.shape[-1]}, expected {n_out}")
    return y.reshape(n_in, n_out).astype(np.float64)


def resize_maps(node: Node, in_shape, out_shape, consts: dict):
    """(axes, [idx [T, out] int64], [w [T, out] float64]) for the axes whose size or map changes."""
    scales = None
    if node.op == "Upsample":
        scales = consts.get(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("scales")
    elif len(node.inputs) > 2 and node.inputs[2] and consts.get(node.inputs[2]) is not None \
            and np.size(consts[node.inputs[2]]):
        scales = consts[node.inputs[2]]
    if node.attrs.get("axes") is not None and scales is not None:
        full = np.ones(len(in_shape), np.float64)
        for k, ax in enumerate(node.attrs["axes"]):
            full[ax % len(in_shape)] = scales[k]
        scales = full
    if node.op == "Upsample":
        node = Node("Resize", node.name, node.inputs, node.outputs,
                    {"mode": node.attrs.get("mode", "nearest"), "coordinate_transformation_mode": "asymmetric"})
    axes, idx, w = [], [], []
    for ax, (a, b) in enumerate(zip(in_shape, out_shape)):
        s = None if scales is None else float(np.asarray(scales, np.float64).reshape(-1)[ax])
        if a == b and (s is None or s == 1.0):
            continue
        A = _ort_axis_map(node, a, b, s)
        taps = [np.flatnonzero(A[:, o]) for o in range(b)]
        T = max(1, max(len(t) for t in taps))
        ii = np.zeros((T, b), np.int64)
        ww = np.zeros((T, b), np.float64)
        for o, t in enumerate(taps):
            ii[:len(t), o] = t
            ww[:len(t), o] = A[t, o]
        axes.append(ax)
        idx.append(ii)
        w.append(ww)
    return axes, idx, w
