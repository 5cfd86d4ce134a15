"""Frontend: read, check, upgrade, freeze and fold an ONNX model, then describe it as a ``Graph``.

Steps (docs/design.md §1, §5):
  1. read the file (clear errors for missing, non-ONNX or truncated files) and run the ONNX checker;
  2. upgrade opsets below 13 with ``onnx.version_converter`` (accepts 9..21 as shipped);
  3. freeze every symbolic input dim to a concrete value: the batch axis (see ``batch_axis``: a
     symbolic first dim named like a batch, and that same dim wherever another input declares it)
     to ``batch``, the others (time, sequence, node counts) from the calibration samples' shapes
     or explicit ``shapes``;
  4. fold shape subgraphs and constants with onnxruntime ``ORT_ENABLE_BASIC`` (standard-ONNX
     rewrites only), which is what lets real exports (mtcnn, PP-OCR) import at all;
  5. infer every tensor's static shape and dtype (ONNX shape inference, then one onnxruntime run
     for whatever it left unknown) and turn Constant nodes and initializers into constants.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError, ResourceError, first_line
from .graph import Graph, Node

MIN_OPSET, MAX_OPSET, CANONICAL_OPSET = 9, 21, 13
MAX_DIM = 1 << 24          # no input dimension beyond this (16.7M) is a sane request
INPUT_DTYPES = ("float32", "int64", "int32", "uint8", "int8", "bool")

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
    guards: list = field(default_factory=list)   # passes/specialize_if.py Guard: If nodes specialized on calibration


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
    if not model.graph.output:
        raise ModelError(f"{p}: the graph declares no outputs, so there is nothing to compute; "
                         "re-export the model with its output tensors")
    _check_names(model, p)
    outs = [o.name for o in model.graph.output]
    dup = sorted({o for o in outs if outs.count(o) > 1})
    if dup:
        raise ModelError(f"{p}: the graph lists output {dup[0]!r} {outs.count(dup[0])} times; each output must be "
                         "declared once (re-export the model)")
    if any(not o for o in outs):
        raise ModelError(f"{p}: the graph has an output with an empty name; re-export the model")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelError(f"{p}: the ONNX checker rejects the model: {one_line(e)}") from None
    return model


def _check_names(model: onnx.ModelProto, p) -> None:
    """Names that are not valid UTF-8 come back from protobuf as bytes (a corrupt file the checker passes)."""
    g = model.graph
    for k, n in enumerate(g.node):
        for field, v in (("name", n.name), ("op_type", n.op_type), ("domain", n.domain),
                         *(("input", x) for x in n.input), *(("output", x) for x in n.output)):
            if isinstance(v, bytes):
                raise ModelError(f"{p}: node #{k} ({n.op_type!r}) has {'an' if field[0] in 'io' else 'a'} {field} "
                                 f"that is not valid UTF-8 ({v[:40]!r}); "
                                 "the file is corrupt, re-export the model")
    for what, items in (("input", g.input), ("output", g.output), ("initializer", g.initializer),
                        ("value_info", g.value_info)):
        for v in items:
            if isinstance(v.name, bytes):
                raise ModelError(f"{p}: a graph {what} name is not valid UTF-8 ({v.name[:40]!r}); the file is "
                                 "corrupt, re-export the model")


def one_line(e: BaseException, max_len: int = 300) -> str:
    """An exception's whole message on one line (the checker spreads one sentence over several)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__
    return text if len(text) <= max_len else text[: max_len - 3] + "..."


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
        raise ModelError(f"{path_hint}: upgrading opset {opset} to {CANONICAL_OPSET} failed: {one_line(e)}") from None
    return up


# Symbolic first dims named like these are not a batch: a time / sequence / graph-size axis whose
# size comes from the data (madmom's [input_dim_0, 81] streams, silero's [sequence_length, 576],
# minimol's [num_nodes, 85]).  Every other symbolic first dim (batch, batch_size, N, B, unk__12,
# DynamicDimension.0, unnamed) is the batch axis.
_NOT_BATCH = re.compile(r"seq|time|len|frame|step|token|word|char|node|edge|atom|vert|point|sample_?rate|"
                        r"width|height|feat|^[tls]$|_dim_\d+$", re.I)


def is_batch_dim(name: str) -> bool:
    """Whether a symbolic first dim named ``name`` is a batch axis (see ``_NOT_BATCH``)."""
    return "batch" in name.lower() or not _NOT_BATCH.search(name)


def batch_dim_names(specs: list[InputSpec]) -> set[str]:
    """The dim names that mean "batch" in this model: those of the batch-like symbolic first dims."""
    return {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str) and is_batch_dim(s.shape[0])}


def batch_axis(spec: InputSpec, names: set[str] | None = None, specs: list[InputSpec] | None = None) -> int | None:
    """The input's batch axis: its first dim when that is a batch-like symbolic dim, else the first axis
    declaring one of the model's batch dim ``names`` (silero-vad's state [2, batch, 128]: axis 1); None
    when it has none (fixed dims, a scalar, a [time, features] stream)."""
    if names is None:
        names = batch_dim_names(specs or [spec])
    for k, d in enumerate(spec.shape):
        if isinstance(d, str) and d in names and (k == 0 or d != "?"):  # unnamed dims match only as a first dim
            return k
    return None


def concrete_shapes(specs: list[InputSpec], batch: int | None,
                    given: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: declared dims win, then ``batch`` for the batch axis (``batch_axis``),
    then ``given`` (complete input shapes: from the calibration samples or --shape) for the rest."""
    names = batch_dim_names(specs)
    out = {}
    for s in specs:
        g = given.get(s.name)
        bax = batch_axis(s, names)
        dims = []
        for k, d in enumerate(s.shape):
            if isinstance(d, int):
                dims.append(d)
            elif k == bax and batch is not None:
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


def _inert_weights(model: onnx.ModelProto) -> set[str]:
    """Large weights no basic graph optimization can read or change: initializers of a weight dtype
    (at least ``SKELETON_MIN`` elements) whose every use is a Gather's table (input 0) or a MatMul's
    right operand (input 1), the other operand depending on an input's values (so the node cannot
    fold: a Gather of position rows by a constant range can, and must see its table).  A Conv's
    weights are never inert: the basic level folds a following BatchNorm / Mul / Add into them."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    heavy = {n for n, i in inits.items() if i.data_type in _WEIGHT_TYPES and int(np.prod(i.dims)) >= SKELETON_MIN}
    if not heavy:
        return set()
    # tensors whose values depend on a graph input's values (the input shapes are fixed here, so
    # Shape / Size outputs do not); nodes are in topological order (the ONNX checker's rule)
    live = {vi.name for vi in g.input if vi.name not in inits}
    for n in g.node:
        if n.op_type not in ("Shape", "Size") and any(x in live for x in n.input if x):
            live.update(n.output)
    bad: set[str] = {o.name for o in g.output}
    for n in g.node:
        for a in n.attribute:  # a subgraph (If / Loop / Scan) may read any outer tensor
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                return set()
        for k, x in enumerate(n.input):
            if x not in heavy:
                continue
            other = n.input[1 - k] if k < 2 and len(n.input) > 1 else ""
            ok = (n.domain in ("", "ai.onnx") and ((n.op_type == "Gather" and k == 0) or
                                                   (n.op_type == "MatMul" and k == 1)) and other in live)
            if not ok:
                bad.add(x)
    return heavy - bad


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold with onnxruntime's basic (standard-ONNX) graph optimizations.

    The inert weights (``_inert_weights``: embedding tables, MatMul weights) go to onnxruntime as
    graph inputs of their type and shape and come back as the same initializers: onnxruntime
    serializes, parses and writes back every byte it is given, which for a 70 MB text encoder was
    ~0.3 s of each fold, and a compile with symbolic dims folds the model once per traced shape."""
    inert = _inert_weights(model)
    if not inert:
        return _fold(model)
    g = model.graph
    kept = [i for i in g.initializer if i.name in inert]
    lite = onnx.ModelProto()
    _copy_message(model, lite, "graph")
    lg = lite.graph
    _copy_message(g, lg, "initializer")
    lg.initializer.extend(i for i in g.initializer if i.name not in inert)
    declared = {vi.name for vi in g.input}
    for i in kept:
        if i.name not in declared:
            lg.input.append(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
    out = _fold(lite)
    og = out.graph
    used = {x for n in og.node for x in n.input}
    gone = {i.name for i in kept if i.name not in declared}
    keep_inputs = [vi for vi in og.input if vi.name not in gone]
    del og.input[:]
    og.input.extend(keep_inputs)
    # as onnxruntime writes them (raw bytes), each before the first initializer that followed it in
    # the model (where onnxruntime keeps the model's order, the full fold's order)
    back = {i.name: (i if i.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(i), i.name))
            for i in kept if i.name in used or i.name in declared}
    order = {i.name: k for k, i in enumerate(g.initializer)}
    rest = list(og.initializer)
    merged, pending = [], sorted(back, key=order.__getitem__)
    for i in rest:
        while pending and i.name in order and order[pending[0]] < order[i.name]:
            merged.append(back[pending.pop(0)])
        merged.append(i)
    merged += [back[n] for n in pending]
    del og.initializer[:]
    og.initializer.extend(merged)
    return out


def _fold(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qc-fold-") as d:
        src, dst = os.path.join(d, "in.onnx"), os.path.join(d, "out.onnx")
        onnx.save(model, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        so.log_severity_level = 4  # errors come back as the exception; no second copy on stderr
        try:
            # MatMulAddFusion would turn MatMul + Add of an activation (a residual, a recurrent sum) into
            # a Gemm whose C is an activation: not a fold, and a form the canonical Dense cannot take
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"], disabled_optimizers=["MatMulAddFusion"])
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load the model: {ort_message(e, model=model)}; check the node's weights, "
                             "attributes and input shapes") from None
        try:
            out = onnx.load(dst)
        except Exception as e:
            raise ModelError(f"onnxruntime's folded model cannot be read back ({type(e).__name__}: "
                             f"{first_line(e)})") from None
    return out


_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_ORT_LOAD = re.compile(r"Load model from \S+ failed:\s*")
_ORT_UNREGISTERED = re.compile(r"(?P<domain>[\w.]*):(?P<op>\w+)\(-?\d+\) is not a registered")
_ORT_NODE_PATTERNS = (
    re.compile(r"Node \((?P<name>[^)]*)\) Op \((?P<op>[^)]*)\)"),                       # shape inference
    re.compile(r"running (?P<op>\S+) node\. Name:'(?P<name>[^']*)'"),                     # run time
    re.compile(r"In Node, \(\"(?P<name>[^\"]*)\", (?P<op>[^,]+),"),                         # graph check
    re.compile(r"Optype \((?P<op>[^)]+)\).*? in node \((?P<name>[^)]*)\)"),                 # type check
    re.compile(r"Name: (?P<name>\S+) OpType: (?P<op>\S+)"),                                  # node spec
)


def ort_message(e: BaseException, max_len: int = 300, model: onnx.ModelProto | None = None) -> str:
    """onnxruntime's (often multi-line, path-laden) error text as one short line naming the node
    (from the text, or for an unregistered op the first ``model`` node of that op)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = _ORT_LOAD.sub("", _ORT_PREFIX.sub("", text))
    where = ""
    for pat in _ORT_NODE_PATTERNS:
        m = pat.search(text)
        if m:
            where = f"node '{m.group('name') or '<unnamed>'}' ({m.group('op').strip()}): "
            break
    m = _ORT_UNREGISTERED.search(text)
    if not where and m and model is not None:
        for k, n in enumerate(model.graph.node):
            if n.op_type == m.group("op") and (n.domain or "") == (m.group("domain") or ""):
                where = f"node '{n.name or f'{n.op_type}_{k}'}' ({m.group('domain')}:{n.op_type}): "
                break
    msg = re.sub(r"Non-zero status code returned while running \S+ node\. Name:'[^']*' Status Message: ", "", text)
    msg = _ORT_NODE_PATTERNS[0].sub("", msg, count=1).strip()
    msg = re.sub(r"\S*/qc-fold-[^/\s]*/\S*", "<model>", msg)
    # C++ noise: source locations, function signatures, "X was false."
    msg = re.sub(r"\S*onnxruntime_src/\S+:\d+\s*", "", msg)
    msg = re.sub(r"(?:\S+\s+)?onnxruntime::[\w:<>]+\([^)]*\)(?: const)?\s*", "", msg)
    msg = re.sub(r"\b(\S+) was false\.\s*", "", msg).strip()
    msg = where + (msg or type(e).__name__)
    return msg if len(msg) <= max_len else msg[: max_len - 3] + "..."


def is_ort_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("onnxruntime")


SKELETON_MIN = 1024
"""Initializers of a weight dtype (``_WEIGHT_TYPES``) with at least this many elements are left out
of the models that shape inference and the sizing run see (``_skeleton``)."""
_WEIGHT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                 onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def _copy_message(src, dst, skip: str) -> None:
    """Every set field of the protobuf message ``src`` into ``dst`` except the field ``skip``."""
    from google.protobuf.message import Message

    for fd, v in src.ListFields():
        if fd.name == skip:
            continue
        if isinstance(v, Message):
            getattr(dst, fd.name).CopyFrom(v)
        elif isinstance(v, (str, bytes, int, float, bool)):
            setattr(dst, fd.name, v)
        else:  # a repeated field
            getattr(dst, fd.name).extend(v)


def _skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto], set[str]]:
    """``model`` without its weights, for the work that reads only their types and shapes (ONNX shape
    inference, the onnxruntime run that sizes what inference left unknown): each initializer of a
    weight dtype with at least ``SKELETON_MIN`` elements becomes a graph input of its type and shape
    (its value fed to a run), and its data is not copied.  Inference and onnxruntime serialize the
    model they get, which was most of a frontend load for a model with large weights (a 70 MB text
    encoder: ~0.1 s per copy, three copies per load, and the traces of symbolic dims load the model
    once per traced shape, ``driver.symbolic_graph``).  Shape computations read only small integer
    tensors (Reshape / Expand / Slice / Pad arguments) and a few float scales, never such a
    tensor's values, so inference sizes the same tensors.  Returns (the skeleton, the initializers
    left out, the names that became graph inputs); ``model`` itself and no initializers when it has
    no such weights."""
    g = model.graph
    heavy = [i for i in g.initializer if i.data_type in _WEIGHT_TYPES and int(np.prod(i.dims)) >= SKELETON_MIN]
    if not heavy:
        return model, [], set()
    names = {i.name for i in heavy}
    sg = onnx.GraphProto()
    _copy_message(g, sg, "initializer")
    sg.initializer.extend(i for i in g.initializer if i.name not in names)
    declared = {vi.name for vi in g.input}  # IR < 4: initializers are listed as inputs too
    added = set()
    for i in heavy:
        if i.name not in declared:
            sg.input.append(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
            added.add(i.name)
    sk = onnx.ModelProto()
    _copy_message(model, sk, "graph")
    sk.graph.CopyFrom(sg)
    return sk, heavy, added


def _infer(model: onnx.ModelProto) -> onnx.GraphProto:
    """ONNX shape inference (with data propagation) of ``model``; its own graph where inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:
        return model.graph


def _all_value_types(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                     consts: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """Shapes and dtypes of every tensor: ONNX shape inference, completed by one onnxruntime run.
    Both see the weightless ``_skeleton`` of ``model``; the run is fed the weights (their arrays
    are left in ``consts``, for the caller's graph) and falls back to the whole model if the
    skeleton does not run, so the result and any error are those of the whole model."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    skel, heavy, added = _skeleton(model)
    g = _infer(skel)
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name in added:  # a weight: with the initializers below, in their order
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("elem_type"):
            continue
        dt = _ONNX_TO_NP.get(tt.elem_type)
        if dt:
            dtypes[vi.name] = dt
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
        dtypes[init.name] = _ONNX_TO_NP.get(init.data_type, "unknown")
    missing = [o for n in model.graph.node for o in n.output if o and (o not in shapes or o not in dtypes)]
    # one run at the frozen shapes: sizes what inference left unknown, and proves the model runs at all
    # (a weight whose shape contradicts its node often passes inference and fails only here)
    names = missing or [o.name for o in model.graph.output]
    vals = _run_skeleton(skel, heavy, g, feeds, names, consts) if heavy else None
    try:
        if vals is None:
            vals = run_ort(model, feeds, names)
    except Exception as e:
        if not is_ort_error(e):
            raise
        raise ModelError(f"onnxruntime cannot run the model at the frozen input shapes "
                         f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in feeds.items())}): "
                         f"{ort_message(e, model=model)}; check the node's weights, attributes and input shapes") from None
    for k in missing:
        v = vals[k]
        shapes[k] = tuple(v.shape)
        dtypes[k] = str(v.dtype)
    return shapes, dtypes


def _run_skeleton(skel: onnx.ModelProto, heavy: list[onnx.TensorProto], inferred: onnx.GraphProto,
                  feeds: dict[str, np.ndarray], names: list[str], consts: dict | None) -> dict[str, np.ndarray] | None:
    """The sizing run of ``_all_value_types`` on the ``_skeleton`` ``skel`` (changed in place):
    ``names`` exposed as outputs, typed from ``inferred`` as ``ort_util.expose`` types them, and the
    weights ``heavy`` fed as inputs (their arrays also left in ``consts``).  None where it fails:
    the caller then runs the whole model, whose result or error is the one to report."""
    import onnxruntime as ort

    from .ort_util import session

    types: dict[str, int] = {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        if vi.type.tensor_type.elem_type:
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    have = {o.name for o in skel.graph.output}
    for n in names:
        if n not in have:
            skel.graph.output.append(helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None))
            have.add(n)
    try:
        weights = {i.name: initializer_array(i) for i in heavy}
        sess = session(skel)
        ro = ort.RunOptions()
        ro.log_severity_level = 4
        vals = dict(zip(names, sess.run(names, {**feeds, **weights}, ro)))
    except Exception:
        return None
    if consts is not None:
        consts.update(weights)
    return vals


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Run ``model`` in onnxruntime, returning ``names`` (intermediates exposed); its own error log is
    silenced (the exception carries the message)."""
    import onnxruntime as ort

    from .ort_util import expose, session

    sess = session(expose(model, names))
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    return dict(zip(names, sess.run(names, feeds, ro)))


def to_graph(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Graph:
    weights: dict[str, np.ndarray] = {}  # the arrays of the weights the sizing run was fed
    shapes, dtypes = _all_value_types(model, feeds, weights)
    g = Graph(nodes=[], inputs=[], outputs=[o.name for o in model.graph.output], shapes=shapes, dtypes=dtypes,
              name=model.graph.name or "model", opset=model_opset(model))
    for init in model.graph.initializer:
        g.add_const(init.name, weights[init.name] if init.name in weights else initializer_array(init))
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


def outer_scope_inputs(attrs: dict) -> set[str]:
    """Names a node's subgraphs (Loop / If / Scan bodies, in ``attrs`` as GraphProtos) read from the
    enclosing graph: such a node is not constant even when all its explicit inputs are, and cannot be
    evaluated on its own (tf2onnx's Keras LSTM Loops read the layer input this way)."""
    def reads(g: onnx.GraphProto) -> set[str]:
        local = {i.name for i in g.input} | {i.name for i in g.initializer} | {i.name for i in g.sparse_initializer}
        out: set[str] = set()
        for n in g.node:
            out |= {i for i in n.input if i and i not in local}
            for a in n.attribute:
                for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                           list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                    out |= {i for i in reads(sg) if i not in local}
            local |= set(n.output)
        return out

    found: set[str] = set()
    for v in attrs.values():
        for g in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(g, onnx.GraphProto):
                found |= reads(g)
    return found


def _constant_value(attrs: dict, name: str) -> np.ndarray:
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dt)
    raise ModelError(f"Constant node '{name}' has an unsupported value kind ({', '.join(attrs)})")


def initializer_array(init: onnx.TensorProto, what: str = "initializer") -> np.ndarray:
    try:
        return numpy_helper.to_array(init)
    except Exception as e:
        raise ModelError(f"{what} '{init.name}' is corrupt: its data does not match its dtype/shape "
                         f"{tuple(init.dims)} ({type(e).__name__}: {first_line(e)}); re-export the model") from None


def _consumers(model: onnx.ModelProto, name: str) -> str:
    users = [f"'{n.name or f'{n.op_type}_{k}'}' ({n.op_type})" for k, n in enumerate(model.graph.node) if name in n.input]
    if not users:
        return "no node"
    return "node " + ", ".join(users[:3]) + (" ..." if len(users) > 3 else "")


_AUTO_PAD = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def check_weights(model: onnx.ModelProto, path_hint: str) -> None:
    """Every initializer and Constant readable, float ones finite (NaN/Inf weights make every scale
    meaningless; a one-value +-Inf constant is a fill value or a bound, and allowed); enumerated
    attributes onnxruntime would reject without naming the node are valid."""
    def finite(name: str, arr: np.ndarray, what: str, consumer: str) -> None:
        if arr.dtype.kind in "fc" and arr.size and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            kind = "NaN" if np.isnan(arr).any() else "Inf"
            if kind == "Inf" and arr.size == 1:
                return  # a fill value or bound (masked_fill(-inf), Clip(max=inf)), not a weight
            raise ModelError(f"{path_hint}: {what} '{name}' (used by {consumer}) holds {bad} non-finite value(s) "
                             f"({kind}); fix or retrain the weights and re-export the model")

    for init in model.graph.initializer:
        finite(init.name, initializer_array(init), "initializer", _consumers(model, init.name))
    for k, n in enumerate(model.graph.node):
        for a in n.attribute:  # onnxruntime rejects a bad auto_pad without naming the node
            if a.name == "auto_pad" and a.s.decode(errors="replace") not in _AUTO_PAD:
                raise ModelError(f"{path_hint}: node '{n.name or f'{n.op_type}_{k}'}' ({n.op_type}) has auto_pad "
                                 f"{a.s.decode(errors='replace')!r}; valid: {', '.join(_AUTO_PAD)}")
    for k, n in enumerate(model.graph.node):
        if n.op_type != "Constant" or n.domain not in ("", "ai.onnx"):
            continue
        for a in n.attribute:
            if a.name == "value" and a.HasField("t"):
                arr = initializer_array(a.t, f"Constant node '{n.name or k}' value")
            elif a.name in ("value_float", "value_floats"):
                arr = np.asarray(helper.get_attribute_value(a), np.float32)
            else:
                continue
            out = n.output[0] if n.output else "?"
            finite(out, arr, f"constant '{out}' of node '{n.name or f'Constant_{k}'}'", _consumers(model, out))


def check_input_specs(specs: list[InputSpec], path_hint: str) -> None:
    if not specs:
        raise ModelError(f"{path_hint}: the model has no (non-constant) inputs; nothing to calibrate or compile")
    for s in specs:
        if s.dtype not in INPUT_DTYPES:
            raise ModelError(f"input '{s.name}' has dtype {s.dtype}; supported: float32 and integer inputs "
                             "(re-export the model with a float32 input)")
        for k, d in enumerate(s.shape):
            if isinstance(d, int) and d > MAX_DIM:
                raise ModelError(f"input '{s.name}' declares dim {k} = {d}, beyond the supported {MAX_DIM}; "
                                 "re-export the model with real input sizes")


def check_concrete_shapes(conc: dict[str, tuple[int, ...]]) -> None:
    for name, dims in conc.items():
        for k, d in enumerate(dims):
            if d < 1 or d > MAX_DIM:
                raise ModelError(f"input '{name}' gets dim {k} = {d} (shape {tuple(dims)}); every input dim must be "
                                 f"1..{MAX_DIM}: give calibration data of a real input size")


# ---- memory: refuse what cannot fit, instead of being killed for it ----------------------------

_NP_BYTES = {"float32": 4, "float64": 8, "float16": 2, "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8,
             "bool": 1}


def memory_budget() -> int:
    """Bytes the compiler may use: $QC_MEMORY_LIMIT (e.g. 8G, 512M) or the available RAM."""
    env = os.environ.get("QC_MEMORY_LIMIT", "").strip()
    if env:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", env, re.I)
        if m:
            return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return 8 << 30


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_memory(sizes: dict[str, int], what: str, inputs: dict[str, tuple[int, ...]], extra: int = 0) -> None:
    """``sizes``: bytes per tensor that will be live together.  Refuse (one line) when the largest
    tensor exceeds a quarter of the budget or all together (plus ``extra``) half of it."""
    if not sizes:
        return
    budget = memory_budget()
    big = max(sizes, key=sizes.get)
    total = sum(sizes.values()) + extra
    shapes = ", ".join(f"'{k}' {tuple(v)}" for k, v in inputs.items())
    if sizes[big] > budget // 4:
        raise ResourceError(f"tensor '{big}' would need {human_bytes(sizes[big])} at input shape(s) {shapes}, more "
                            f"than a quarter of the {human_bytes(budget)} of memory available; use smaller inputs "
                            "(dims, batch) or a larger machine (QC_MEMORY_LIMIT overrides the limit)")
    if total > budget // 2:
        raise ResourceError(f"{what} would need about {human_bytes(total)} at input shape(s) {shapes} (largest "
                            f"tensor '{big}' {human_bytes(sizes[big])}), more than half of the {human_bytes(budget)} "
                            "available; use smaller inputs (dims, batch) or a larger machine "
                            "(QC_MEMORY_LIMIT overrides the limit)")


def tensor_bytes(shape, dtype: str) -> int:
    n = 1
    for d in shape:
        n *= max(int(d), 0)
    return n * _NP_BYTES.get(dtype, 4)


def _static_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of every tensor ONNX shape inference can size, without running anything (inference of
    the weightless ``_skeleton``: the weights are initializers, left out below)."""
    g = _infer(_skeleton(model)[0])
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[vi.name] = tensor_bytes([d.dim_value for d in tt.shape.dim], _ONNX_TO_NP.get(tt.elem_type, "float32"))
    inits = {i.name for i in model.graph.initializer}
    return {k: v for k, v in out.items() if k not in inits}


_CHECKED: dict = {}   # (path, mtime, size) -> [opset, the upgraded model, weights checked]: _read(reuse=True)


def _read(path: str | os.PathLike, check: bool, reuse: bool) -> tuple[int, onnx.ModelProto]:
    """The file read (``read_model``: the checker), its opset and the model upgraded (``upgrade``),
    and with ``check`` its weights checked (``check_weights``).  ``reuse``: kept for later ``reuse``
    calls while the file is unchanged (path, mtime, size; one model at a time), which then neither
    read nor check it again.  The model returned is shared: read it, copy before changing it."""
    st = os.stat(path) if reuse and os.path.isfile(path) else None
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size) if st is not None else None
    kept = _CHECKED.get(key) if key is not None else None
    if kept is None:
        model = read_model(path)
        opset = model_opset(model)
        kept = [opset, upgrade(model, str(path)), False]
        if key is not None:
            _CHECKED.clear()
            _CHECKED[key] = kept
    if check and not kept[2]:
        check_weights(kept[1], str(path))
        kept[2] = True
    return kept[0], kept[1]


def read_upgraded(path: str | os.PathLike) -> onnx.ModelProto:
    """``read_model`` then ``upgrade`` (the input declarations the compile driver reads first), kept
    for the ``load(reuse=True)`` calls that follow: the file is read and checked once per compile.
    Shared: do not change it."""
    return _read(path, check=False, reuse=True)[1]


def load(path: str | os.PathLike, batch: int | None = 1,
         shapes: dict[str, tuple[int, ...]] | None = None, samples=None, reuse: bool = False,
         loop_recurrent: bool = False) -> FrontendResult:
    """Read, check, upgrade, freeze (``batch`` for the batch axis; ``shapes`` for the rest),
    fold and describe the model.  ``samples`` (the calibration set) lets an If whose condition took
    one value on every sample be specialized (``passes/specialize_if.py``).  ``reuse``: the file's
    read / checks / upgrade of an earlier ``reuse`` call or ``read_upgraded`` (the same file
    unchanged), as a compile reads the model's inputs first and the traces of symbolic dims load
    one model at several shapes (``driver.symbolic_graph``).  ``loop_recurrent``: LSTM / GRU / RNN
    become one Scan over time each, not unrolled (``passes/unroll_recurrent.py``; the traces of a
    symbolic time axis)."""
    opset, model = _read(path, check=True, reuse=reuse)  # shared, never changed here: freeze() copies it
    specs = input_specs(model)
    check_input_specs(specs, str(path))
    conc = concrete_shapes(specs, batch, shapes or {})
    check_concrete_shapes(conc)
    frozen = freeze(model, conc)
    # before anything runs: every tensor shape inference can size, live together as calibration keeps them
    check_memory(_static_sizes(frozen), "running the model", conc)
    from passes.decompose_onnx import decompose
    from passes.import_quantized import import_quantized
    from passes.unroll_recurrent import unroll_recurrent

    # a pre-quantized model (ONNX Runtime's quantizer, QDQ) back to float first: it is requantized
    model = fold(decompose(import_quantized(frozen), strict=False))
    from passes.specialize_if import specialize_ifs

    model, guards = specialize_ifs(model, samples)
    if any(n.op_type == "If" for n in frozen.graph.node):
        model = fold(model)  # the inlined branches, and Ifs whose condition became constant
        model, more = specialize_ifs(model, samples)
        guards += more
    if any(n.op_type == "Loop" for n in model.graph.node):
        from passes.unroll_loop import unroll_loops

        for _ in range(8):  # a Loop of constant trip count: its iterations (a later Loop's count
            before = sum(n.op_type == "Loop" for n in model.graph.node)   # may fold only then)
            model = fold(unroll_loops(model, fold))
            if sum(n.op_type == "Loop" for n in model.graph.node) == before:
                break

    # before calibration, so every tensor they create is calibrated by name
    model = decompose(unroll_recurrent(model, loop_recurrent))  # LSTM / GRU / RNN unrolled; InstanceNorm, ReduceL2, ... decomposed
    feeds = {s.name: np.zeros(conc[s.name], dtype=s.dtype) for s in specs}
    graph = to_graph(model, feeds)
    return FrontendResult(model=model, graph=graph, input_specs=specs, opset=opset, guards=guards)
