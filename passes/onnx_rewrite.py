"""What the frontend's ONNX-to-ONNX rewrites share (``unroll_recurrent.py``, ``decompose_onnx.py``):
a builder of the replacement nodes and constants of one node, an initializer lookup, and the loop
that replaces the matching nodes of a model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper


class NodeBuilder:
    """The nodes and initializers that replace ONNX node ``node`` (the ``k``-th of its graph); every
    name is prefixed with the node's, so rewrites of several nodes never collide."""

    def __init__(self, node: onnx.NodeProto, k: int):
        self.prefix = (node.name or f"{node.op_type}_{k}").replace("/", "_")
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/{what}_{self.count}"

    def const(self, what: str, arr) -> str:
        n = self.name(what)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(self, op_type: str, inputs, what: str, out: str | None = None, **attrs) -> str:
        out = out or self.name(what)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs))
        return out


def initializer_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant-node output ``name`` (None: not a constant)."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def replace_nodes(model: onnx.ModelProto, ops, expand: Callable) -> onnx.ModelProto:
    """A copy of ``model`` in which every default-domain node of a type in ``ops`` is replaced by
    ``expand(model, node, k) -> (nodes, initializers)``, or kept where it returns None; ``model``
    itself when there is none.  The value_info is dropped: the rewritten tensors' types are
    inferred by whoever reads the model next."""
    def match(n):
        return n.op_type in ops and n.domain in ("", "ai.onnx")

    if not any(match(n) for n in model.graph.node):
        return model
    m = onnx.shape_inference.infer_shapes(model)
    out = onnx.ModelProto()
    out.CopyFrom(m)
    del out.graph.node[:]
    inits = []
    for k, n in enumerate(m.graph.node):
        rep = expand(m, n, k) if match(n) else None
        if rep is None:
            out.graph.node.append(n)
        else:
            out.graph.node.extend(rep[0])
            inits += rep[1]
    out.graph.initializer.extend(inits)
    del out.graph.value_info[:]
    return out
