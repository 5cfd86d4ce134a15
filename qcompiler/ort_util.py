"""onnxruntime as the reference float executor: sessions and runs that expose intermediate tensors."""

from __future__ import annotations

import numpy as np
import onnx


def session(model: onnx.ModelProto, optimize: bool = False, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(complete_types(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def _untyped(g: onnx.GraphProto) -> bool:
    for vi in list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
            return True
    return any(_untyped(a.g) for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH) or \
        any(_untyped(sg) for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for sg in a.graphs)


def complete_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with no tensor type left UNDEFINED (elem_type 0), which onnxruntime refuses to load
    ("Invalid tensor data type 0"): a graph output or value_info declared with an unknown type (a
    one-node model built to fold a constant, an exporter's placeholder) gets the type ONNX shape
    inference gives it, and one it cannot type loses its type field (onnxruntime infers it).
    Returns ``model`` itself when nothing is undefined."""
    if not _untyped(model.graph):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(m).graph
    except Exception:
        inferred = m.graph
    known = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.value_info) + list(inferred.output)
             + list(inferred.input) if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
    known.update({i.name: i.data_type for i in m.graph.initializer})

    def fix(g: onnx.GraphProto, top: bool) -> None:
        for vi in list(g.output) + list(g.value_info):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.elem_type == onnx.TensorProto.UNDEFINED:
                if top and known.get(vi.name):
                    tt.elem_type = known[vi.name]
                else:
                    vi.ClearField("type")
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    fix(a.g, False)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        fix(sg, False)

    fix(m.graph, True)
    return m


def expose(model: onnx.ModelProto, names: list[str], elem_types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``names`` (intermediate tensors)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    types = dict(elem_types or {})
    try:
        inferred = onnx.shape_inference.infer_shapes(m).graph
    except Exception:
        inferred = m.graph
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        if vi.type.tensor_type.elem_type:
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None))
            have.add(n)
    return m


def run_with_intermediates(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                           names: list[str]) -> dict[str, np.ndarray]:
    sess = session(expose(model, names))
    outs = sess.run(names, feeds)
    return dict(zip(names, outs))
