"""Frontend: read, check, upgrade, freeze and fold an ONNX model, then describe it as a ``Graph``.

Steps (DESIGN.md §1, §7):
  1. read the file (clear errors for missing, non-ONNX or truncated files) and run the ONNX checker;
  2. upgrade opsets below 13 with ``onnx.version_converter`` (accepts 9..21 as shipped);
  3. freeze every symbolic input dim to a concrete value: the batch dim (first dim) to ``batch``,
     the others from the calibration arrays' shapes or explicit ``shapes``;
  4. fold shape subgraphs and constants with onnxruntime ``ORT_ENABLE_BASIC`` (standard-ONNX
     rewrites only), which is what lets real exports (mtcnn, PP-OCR) import at all;
  5. infer every tensor's static shape and dtype (ONNX shape inference, then one onnxruntime run
     for whatever it left unknown) and turn Constant nodes and initializers into constants.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError
from .graph import Graph, Node

MIN_OPSET, MAX_OPSET, CANONICAL_OPSET = 9, 21, 13

_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str, ...]   # as declared; str for symbolic dims
    dtype: str


@dataclass
class FrontendResult:
    model: onnx.ModelProto      # frozen, folded, shape-inferred: what calibration runs
    graph: Graph                # the same model as our IR
    input_specs: list[InputSpec]
    opset: int


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file (give the path of an .onnx model)")
    if not p.is_file():
        raise ModelError(f"{p}: not a file (give the path of an .onnx model)")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # DecodeError, truncated files, external data problems
        raise ModelError(f"{p}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'parse error'}); "
                         "check the file is a complete .onnx export") from None
    if not model.graph.node:
        raise ModelError(f"{p}: not an ONNX model (the graph has no nodes; truncated or wrong file?)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelError(f"{p}: the ONNX checker rejects the model: {str(e).splitlines()[0]}") from None
    return model


def model_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise ModelError("model imports no default-domain opset")


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                     for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, _ONNX_TO_NP.get(tt.elem_type, "unknown")))
    return specs


def upgrade(model: onnx.ModelProto, path_hint: str) -> onnx.ModelProto:
    opset = model_opset(model)
    if opset < MIN_OPSET or opset > MAX_OPSET:
        raise ModelError(f"{path_hint}: opset {opset} is outside the supported range {MIN_OPSET}-{MAX_OPSET}; "
                         "convert the model with onnx.version_converter first")
    if opset >= CANONICAL_OPSET:
        return model
    try:
        up = onnx.version_converter.convert_version(model, CANONICAL_OPSET)
        onnx.checker.check_model(up)
    except Exception as e:
        raise ModelError(f"{path_hint}: upgrading opset {opset} to {CANONICAL_OPSET} failed: {str(e).splitlines()[0]}") from None
    return up


def concrete_shapes(specs: list[InputSpec], batch: int | None,
                    given: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: declared dims win, then ``batch`` for a symbolic first dim, then
    ``given`` (from calibration data or --shape) for the rest."""
    out = {}
    for s in specs:
        g = given.get(s.name)
        dims = []
        for k, d in enumerate(s.shape):
            if isinstance(d, int):
                dims.append(d)
            elif k == 0 and batch is not None:
                dims.append(batch)
            elif g is not None and len(g) == len(s.shape):
                dims.append(int(g[k]))
            else:
                raise ModelError(f"input '{s.name}' has symbolic dim {k} ('{d}') and no value for it: "
                                 "pass calibration data of that input or --shape")
        out[s.name] = tuple(dims)
    return out


def freeze(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(v)
    # outputs/value_info may carry stale symbolic dims: drop them, shape inference redoes them
    for vi in list(m.graph.value_info):
        m.graph.value_info.remove(vi)
    for vi in m.graph.output:  # keep the rank, forget the (possibly symbolic) sizes
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            d.Clear()
            d.dim_param = f"{vi.name}_d{k}"
    return m


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold with onnxruntime's basic (standard-ONNX) graph optimizations."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qc-fold-") as d:
        src, dst = os.path.join(d, "in.onnx"), os.path.join(d, "out.onnx")
        onnx.save(model, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        so.log_severity_level = 3
        try:
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load the frozen model: {str(e).splitlines()[0]}") from None
        out = onnx.load(dst)
    return out


def _all_value_types(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Shapes and dtypes of every tensor: ONNX shape inference, completed by one onnxruntime run."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("elem_type"):
            continue
        dt = _ONNX_TO_NP.get(tt.elem_type)
        if dt:
            dtypes[vi.name] = dt
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
        dtypes[init.name] = _ONNX_TO_NP.get(init.data_type, "unknown")
    missing = [o for n in g.node for o in n.output if o and (o not in shapes or o not in dtypes)]
    if missing:
        from .ort_util import run_with_intermediates

        vals = run_with_intermediates(model, feeds, missing)
        for k, v in vals.items():
            shapes[k] = tuple(v.shape)
            dtypes[k] = str(v.dtype)
    return shapes, dtypes


def to_graph(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Graph:
    shapes, dtypes = _all_value_types(model, feeds)
    g = Graph(nodes=[], inputs=[], outputs=[o.name for o in model.graph.output], shapes=shapes, dtypes=dtypes,
              name=model.graph.name or "model")
    for init in model.graph.initializer:
        g.add_const(init.name, numpy_helper.to_array(init))
    inits = set(g.consts)
    g.inputs = [vi.name for vi in model.graph.input if vi.name not in inits]
    for k, n in enumerate(model.graph.node):
        if n.domain not in ("", "ai.onnx"):
            g.nodes.append(Node(n.op_type, n.name or f"{n.op_type}_{k}", list(n.input), list(n.output),
                                {"domain": n.domain}))
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for key, v in list(attrs.items()):
            if isinstance(v, onnx.TensorProto):
                attrs[key] = numpy_helper.to_array(v)
            elif isinstance(v, bytes):
                attrs[key] = v.decode()
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                attrs[key] = [x.decode() for x in v]
        if n.op_type == "Constant":
            g.add_const(n.output[0], _constant_value(attrs, n.name))
            continue
        g.nodes.append(Node(n.op_type, n.name or f"{n.op_type}_{k}", list(n.input), list(n.output), attrs))
    return g


def _constant_value(attrs: dict, name: str) -> np.ndarray:
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dt)
    raise ModelError(f"Constant node '{name}' has an unsupported value kind ({', '.join(attrs)})")


def load(path: str | os.PathLike, batch: int | None = 1,
         shapes: dict[str, tuple[int, ...]] | None = None) -> FrontendResult:
    """Read, check, upgrade, freeze (``batch`` for a symbolic first dim; ``shapes`` for the rest),
    fold and describe the model."""
    model = read_model(path)
    opset = model_opset(model)
    model = upgrade(model, str(path))
    specs = input_specs(model)
    for s in specs:
        if s.dtype not in ("float32", "int64", "int32", "uint8", "int8", "bool"):
            raise ModelError(f"input '{s.name}' has dtype {s.dtype}; supported: float32 and integer inputs")
    conc = concrete_shapes(specs, batch, shapes or {})
    model = fold(freeze(model, conc))
    feeds = {s.name: np.zeros(conc[s.name], dtype=s.dtype) for s in specs}
    graph = to_graph(model, feeds)
    return FrontendResult(model=model, graph=graph, input_specs=specs, opset=opset)
