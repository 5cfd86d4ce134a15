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
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


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
