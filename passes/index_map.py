"""Exact index maps of data-movement ops, computed by running the op itself on position codes.

For an op that only copies input elements (Resize with mode=nearest, Tile, Expand, DepthToSpace,
SpaceToDepth, ...) the output is out[p] = x[idx(p)] for a fixed map idx.  Feeding the op (through
onnxruntime, the reference executor) a tensor whose element i holds the value i yields idx for
every ONNX attribute combination, with no re-implementation of the op's coordinate rules.
Codes are int32 when the op accepts integers, else float32 (exact for fewer than 2^24 elements).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qcompiler.graph import Node


def index_map(node: Node, in_shape: tuple[int, ...], consts: dict[str, np.ndarray]) -> np.ndarray:
    """int64 array of the output's shape: flat index into the first input for each output element."""
    size = int(np.prod(in_shape))
    errors = []
    for dtype, tp in ((np.int32, onnx.TensorProto.INT32), (np.float32, onnx.TensorProto.FLOAT)):
        if dtype == np.float32 and size >= 2**24:
            break
        codes = np.arange(size, dtype=dtype).reshape(in_shape)
        inputs = [helper.make_tensor_value_info("x", tp, list(in_shape))]
        inits = []
        names = ["x"]
        for k, name in enumerate(node.inputs[1:], 1):
            if not name:
                names.append("")
                continue
            arr = consts[name]
            inits.append(onnx.numpy_helper.from_array(arr, f"c{k}"))
            names.append(f"c{k}")
        attrs = {k: v for k, v in node.attrs.items() if not k.startswith("_") and k != "domain"}
        n = helper.make_node(node.op, names, ["y"], **attrs)
        g = helper.make_graph([n], "idx", inputs, [helper.make_tensor_value_info("y", tp, None)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17 if node.op != "Resize" else 19)])
        try:
            from qcompiler.ort_util import session

            y = session(m).run(["y"], {"x": codes})[0]
            return y.astype(np.int64)
        except Exception as e:  # op rejects this dtype: try the next
            errors.append(str(e).splitlines()[0])
    raise ValueError(f"cannot derive the index map of {node.op} '{node.name}': {'; '.join(errors)}")
