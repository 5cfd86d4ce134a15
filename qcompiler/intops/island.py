"""Float islands (``qc compile --allow-float``): one ONNX op kept in float between integer ops.

Where a float op has no integer form (no quantization rule, a rule whose check refuses the node,
or a node ``passes/canonicalize.py`` cannot take), ``--allow-float`` keeps just that op in float
instead of failing the compile.  The quantizer (``passes/quantize.py``) then emits, for the node:

  dequantize     each quantized activation input -> float32 at its scale (integer data without
                 QParams -- indices, masks -- passes as it is and is cast to the dtype the ONNX
                 op expects inside the island)
  float_island   the original ONNX node (op type, domain, attributes, constant inputs), one
                 integer-graph node per output the graph uses (``output`` says which); all of them
                 share one computation in the built library
  quantize       each float output, with QParams from its calibrated range (clamped by a fused
                 activation); integer / bool outputs (ArgMax, TopK indices) pass as integer data
                 without QParams (bool as uint8 0/1, as the compare ops produce it)

A float model input that goes straight into an island is read as given (``--io float``), and a
float output that only islands read stays float (no quantize / dequantize between two islands).

Semantics.  An island's float semantics are ONNX Runtime's: the reference executor runs the
single node in onnxruntime (``reference``).  The library runs the node as TVM's own ONNX frontend
imports it (``tvm.relax.frontend.onnx.from_onnx`` on a one-node model with static shapes), called
as a Relax function of its own (``qc_island_<node>``), legalized, fused and scheduled like every
other op.  A float op in TVM and in onnxruntime may differ in the last bit (``cos``, ``exp``,
reductions in another order), so the op contract test (``tests/test_intops.py``, bit for bit)
runs the island on examples whose results are exact in both (integer data, sorting, indices);
whole libraries with float islands are compared with the reference within one quantization step
after the island's quantize (``tests/test_float_islands.py``).

The island's kernels touch float between the input quantize and the output dequantize, so a
library with islands is not integer-only: the build is told (``build(..., allow_float=True)``),
lists them (``BuildResult.float_islands``, ``island_kernels``), and ``model.json`` /
``qc inspect`` say ``integer_only: false`` and name each island's node, op and kernels.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tvm import relax

from qcompiler.errors import QuantizationError
from qcompiler.qtypes import int_range

from .registry import Example, IntOp, register

if TYPE_CHECKING:
    from passes.quantize import Quantizer

from passes.canonicalize import ISLAND_MARK as MARK  # noqa: E402  set by canonicalize (--allow-float) on
# the nodes it cannot take: the node is kept in float, the value says why

_NON_ONNX_ATTRS = {"act", "domain", MARK}
"""Float-graph attributes that are not ONNX attributes of the node (``act``: a fused Clip, applied
by the island's quantize clamp; ``domain``: the frontend's record of a custom domain)."""

DEFAULT_OPSET = 17


# ---- which nodes can be islands ------------------------------------------------------------------
def onnx_nodes(model: onnx.ModelProto | None) -> dict[str, onnx.NodeProto]:
    """The model's nodes by the name the frontend gives them (``qcompiler.frontend.to_graph``)."""
    if model is None:
        return {}
    return {(n.name or f"{n.op_type}_{k}"): n for k, n in enumerate(model.graph.node)}


def model_opsets(model: onnx.ModelProto | None) -> tuple[tuple[str, int], ...]:
    if model is None:
        return (("", DEFAULT_OPSET),)
    ops = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in model.opset_import}
    ops.setdefault("", DEFAULT_OPSET)
    return tuple(sorted(ops.items()))


def _schema(op: str, domain: str, opsets) -> onnx.defs.OpSchema | None:
    version = dict(opsets).get(domain)
    if version is None:
        return None
    try:
        return onnx.defs.get_schema(op, version, domain)
    except Exception:  # not an ONNX op (one of our canonical forms) or unknown domain
        return None


def onnx_attributes(n, protos: dict, opsets) -> tuple[bytes, ...] | str:
    """The node's ONNX attributes (serialized ``AttributeProto``), or why it cannot be an island.

    The original ``NodeProto`` of the ONNX model supplies them when the float passes left the node
    as the model has it (same name and op type); otherwise they are rebuilt from the float node's
    attributes with the types of the op's ONNX schema.  A node carrying attributes the float
    passes added (other than a fused Clip, ``act``) changed meaning and cannot be run as ONNX."""
    domain = n.attrs.get("domain", "") or ""
    proto = protos.get(n.name)
    schema = _schema(n.op, domain, opsets)
    proto_domain = "" if proto is None or proto.domain in ("", "ai.onnx") else proto.domain
    if proto is not None and proto.op_type == n.op and proto_domain == domain:
        if schema is not None:
            extra = set(n.attrs) - _NON_ONNX_ATTRS - set(schema.attributes)
            if extra:
                return f"the float passes rewrote it ({', '.join(sorted(extra))})"
        return tuple(a.SerializeToString() for a in proto.attribute)
    if schema is None:
        return "no ONNX form of this node"
    out = []
    for k, v in n.attrs.items():
        if k in _NON_ONNX_ATTRS:
            continue
        if k not in schema.attributes:
            return f"no ONNX form of this node (attribute '{k}')"
        t = schema.attributes[k].type
        if isinstance(v, np.ndarray) and t == onnx.defs.OpSchema.AttrType.TENSOR:
            v = numpy_helper.from_array(v)
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        try:
            out.append(helper.make_attribute(k, v, attr_type=int(t)).SerializeToString())
        except Exception as e:  # noqa: BLE001 - a value the schema type does not hold
            return f"attribute '{k}' has no ONNX form ({type(e).__name__})"
    return tuple(out)


def island_problem(fg, n, protos: dict, opsets) -> str | None:
    """Why node ``n`` of the float graph cannot be kept in float, or None."""
    got = onnx_attributes(n, protos, opsets)
    if isinstance(got, str):
        return got
    for i in n.inputs:
        if i and i not in fg.consts and not fg.dtypes.get(i):
            return f"input '{i}' has no known dtype"
    for o in n.outputs:
        if o and (o not in fg.shapes or not fg.dtypes.get(o)):
            return f"output '{o}' has no static shape"
    return None


# ---- the quantizer's side: dequantize -> float_island -> quantize ----------------------------------
def _ig_dtype(onnx_dtype: str) -> str:
    """The integer graph's dtype of an island output of ONNX dtype ``onnx_dtype``."""
    if onnx_dtype.startswith("float") or onnx_dtype == "bfloat16":
        return "float32"
    if onnx_dtype == "bool":
        return "uint8"
    return onnx_dtype


def emit_island(qz: Quantizer, n, why: str = "") -> None:
    """Emit float node ``n`` as a float island (module docs) through the Quantizer ``qz``."""
    fg = qz.fg
    attrs_or_why = onnx_attributes(n, qz.onnx_nodes, qz.opsets)
    if isinstance(attrs_or_why, str):
        raise QuantizationError(f"node '{n.name}' ({n.op}) cannot be kept in float: {attrs_or_why}")
    acts, slots, in_dtypes = [], [], []
    for i in n.inputs:
        if not i:
            slots.append(None)
        elif i in fg.consts:
            slots.append(np.asarray(fg.consts[i]))
        elif i in fg.inputs and qz.cfg.io == "float" and fg.dtypes[i].startswith("float"):
            slots.append(len(acts))  # a float model input: the island reads it as given
            acts.append(i)
            in_dtypes.append(fg.dtypes[i])
        else:
            xi = qz.iname(i)
            qp = qz.ig.qparams.get(xi)
            if qp is not None:  # a quantized activation: back to float at its scale
                f = qz.fresh(f"{xi}/f")
                xi = qz.emit("dequantize", [xi], f, {"scale": np.float32(qp.scale)}, "float32", qz.ig.shapes[xi],
                             node_name=f"{n.name}/dequantize{len(acts)}")
            slots.append(len(acts))
            acts.append(xi)
            in_dtypes.append(fg.dtypes[i])
    out_dtypes = tuple(fg.dtypes.get(o, "float32") if o else "" for o in n.outputs)
    out_shapes = tuple(tuple(int(d) for d in fg.shape(o)) if o else () for o in n.outputs)
    base = {"onnx_op": n.op, "domain": n.attrs.get("domain", "") or "", "onnx_attrs": attrs_or_why,
            "slots": tuple(slots), "in_dtypes": tuple(in_dtypes), "out_dtypes": out_dtypes,
            "out_shapes": out_shapes, "opsets": qz.opsets, "island": n.name, "reason": why or "no integer form"}
    for k, o in enumerate(n.outputs):
        if not o or (not qz.consumers.get(o) and o not in fg.outputs):
            continue
        dt = _ig_dtype(out_dtypes[k])
        name = n.name if k == 0 else f"{n.name}:{k}"
        if dt != "float32":  # integer / bool data: no QParams, passes as it is
            qz.emit("float_island", acts, o, {**base, "output": k}, dt, out_shapes[k], None, o, node_name=name)
            continue
        users = qz.consumers.get(o, [])
        if o not in fg.outputs and all(u.name in qz.islands for u in users):
            # read by islands only: stays float, no quantize / dequantize between them
            qz.emit("float_island", acts, qz.fresh(o), {**base, "output": k}, "float32", out_shapes[k],
                    float_name=o, node_name=name)
            continue
        f = qz.emit("float_island", acts, qz.fresh(f"{o}/f"), {**base, "output": k}, "float32", out_shapes[k],
                    node_name=name)
        qp = qz.out_qparams(o)
        lo, hi = qz.clamp(qp, n.attrs.get("act"))
        qz.emit("quantize", [f], o, {"inv_scale": np.float32(1.0 / qp.scale), "lo": lo, "hi": hi, "dtype": qp.dtype},
                qp.dtype, out_shapes[k], qp, o, node_name=f"{n.name}/quantize{k}")


# ---- the one-node ONNX model ----------------------------------------------------------------------
def island_model(a: dict, in_shapes) -> onnx.ModelProto:
    """The island's node alone: activation inputs ``x0..`` (static shapes, ONNX dtypes), constant
    inputs as initializers, every output ``y0..`` a graph output."""
    names, inits = [], []
    for k, s in enumerate(a["slots"]):
        if s is None:
            names.append("")
        elif isinstance(s, (int, np.integer)):
            names.append(f"x{int(s)}")
        else:
            names.append(f"c{k}")
            inits.append(numpy_helper.from_array(np.asarray(s), f"c{k}"))
    outs = [f"y{k}" if dt else "" for k, dt in enumerate(a["out_dtypes"])]
    node = helper.make_node(a["onnx_op"], names, outs, domain=a["domain"] or None)
    for b in a["onnx_attrs"]:
        at = onnx.AttributeProto()
        at.ParseFromString(b)
        node.attribute.append(at)
    np2onnx = onnx.helper.np_dtype_to_tensor_dtype
    ins = [helper.make_tensor_value_info(f"x{j}", np2onnx(np.dtype(dt)), list(sh))
           for j, (dt, sh) in enumerate(zip(a["in_dtypes"], in_shapes))]
    ovs = [helper.make_tensor_value_info(o, np2onnx(np.dtype(dt)), list(sh))
           for o, dt, sh in zip(outs, a["out_dtypes"], a["out_shapes"]) if o]
    opsets = [helper.make_opsetid(d, v) for d, v in a["opsets"]]
    m = helper.make_model(helper.make_graph([node], "qc_island", ins, ovs, inits), opset_imports=opsets)
    m.ir_version = max(7, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    return m


@functools.lru_cache(maxsize=64)
def _session(model_bytes: bytes):
    from qcompiler.ort_util import session

    m = onnx.ModelProto()
    m.ParseFromString(model_bytes)
    return session(m)


def _out_index(a: dict) -> int:
    """Position of output ``a['output']`` among the one-node model's (non-empty) outputs."""
    return sum(1 for dt in a["out_dtypes"][: a["output"]] if dt)


def _to_ig(y: np.ndarray, onnx_dtype: str) -> np.ndarray:
    return np.asarray(y).astype(_ig_dtype(onnx_dtype))


def run_island(a: dict, *xs) -> np.ndarray:
    """ONNX Runtime on the island's node (the reference semantics)."""
    feeds = {f"x{j}": np.asarray(x).astype(dt) for j, (x, dt) in enumerate(zip(xs, a["in_dtypes"]))}
    m = island_model(a, [x.shape for x in xs])
    outs = _session(m.SerializeToString()).run(None, feeds)
    return _to_ig(outs[_out_index(a)], a["out_dtypes"][a["output"]])


# ---- lowering: TVM's ONNX frontend on the one-node model ----------------------------------------------
@relax.expr_functor.mutator
class _Rebind(relax.PyExprMutator):
    """Points the imported function's calls at the functions as added to our module."""

    def __init__(self, mapping):
        super().__init__()
        self.mapping = mapping

    def visit_global_var_(self, op):  # noqa: N802 - TVM's visitor name
        return self.mapping.get(op.name_hint, op)


def _hint(s: str) -> str:
    s = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in s)
    return s if s and not s[0].isdigit() else "n_" + s


def _import(lw, a: dict, xs) -> relax.Expr:
    """Import the island once per library; returns the call of its Relax function on ``xs``."""
    from tvm.relax.frontend.onnx import from_onnx

    cache = lw.__dict__.setdefault("float_islands", {})
    if a["island"] in cache:
        return cache[a["island"]][1]
    m = island_model(a, [x.shape for x in xs])
    try:
        mod = from_onnx(m, keep_params_in_input=False)
    except Exception as e:  # noqa: BLE001 - TVM's importer names the op it cannot convert
        from qcompiler.errors import first_line

        raise QuantizationError(f"node '{a['island']}' ({a['onnx_op']}) cannot be kept in float: TVM's ONNX "
                                f"importer cannot convert it ({type(e).__name__}: {first_line(e)})") from None
    mapping = {}
    for gv, f in mod.functions_items():
        if gv.name_hint != "main":
            new = lw.bb.add_func(f, f"qc_island_{_hint(a['island'])}_{gv.name_hint}")
            mapping[gv.name_hint] = new
    main = mod["main"]
    if mapping:
        main = _Rebind(mapping).visit_expr(main)
    main = main.without_attr("global_symbol").without_attr("num_input")
    gv = lw.bb.add_func(main, f"qc_island_{_hint(a['island'])}")
    args = []
    for x, dt in zip(xs, a["in_dtypes"]):
        x = lw.logical(x)
        args.append(x.expr if x.dtype == dt else lw.cast(x.expr, dt))
    call = lw.emit(relax.Call(gv, args), f"island_{a['island']}")
    cache[a["island"]] = (gv.name_hint, call)
    return call


def lower_island(lw, n, *xs):
    from qcompiler.lowering import layout as L
    from qcompiler.lowering.relax_lower import Value

    a = n.attrs
    call = _import(lw, a, xs)
    e = call
    if isinstance(call.ty, relax.TupleType):
        e = lw.emit(relax.TupleGetItem(call, _out_index(a)))
    odt = a["out_dtypes"][a["output"]]
    dt = _ig_dtype(odt)
    if odt != dt:
        e = lw.cast(e, dt)
    shape = tuple(a["out_shapes"][a["output"]])
    return Value(e, L.identity(len(shape)), shape, dt)


@register
class FloatIslandOp(IntOp):
    """One output of an ONNX node kept in float (``--allow-float``; module docs): ONNX Runtime's
    semantics of the node on its inputs (each cast to the dtype the op expects); float outputs come
    out as float32 (quantized by the ``quantize`` after it), bool as uint8 0/1, integers as they
    are.  No integer arithmetic: the bound is the output dtype's range."""
    name = "float_island"
    attrs = {"onnx_op": "ONNX op type", "domain": "ONNX domain ('' = default)",
             "onnx_attrs": "the node's ONNX attributes (serialized AttributeProto)",
             "slots": "per ONNX input: index into the node's inputs, a constant array, or None (omitted)",
             "in_dtypes": "ONNX dtype of each activation input", "out_dtypes": "ONNX dtype of each output",
             "out_shapes": "static shape of each output", "opsets": "(domain, version) imports",
             "island": "the ONNX node's name (the outputs of one node share one computation)",
             "output": "which output of the node this is",
             "reason": "why the node has no integer form (for the metadata)"}

    @staticmethod
    def reference(*args):
        *xs, a = args
        return run_island(a, *xs)

    @staticmethod
    def lower(lw, n, *xs):
        return lower_island(lw, n, *xs)

    @staticmethod
    def bound(ctx, n, *ins):
        dt = ctx.dtypes[n.outputs[0]]
        return int_range(dt) if dt in ("int8", "uint8", "int16", "uint16", "int32", "int64") else (0, 0)

    @staticmethod
    def examples(rng):
        def ex(op, ins, outs, out, attrs=(), consts=(), ranges=None):
            slots = [j for j in range(len(ins))] + list(consts)
            return Example(ins, {"onnx_op": op, "domain": "", "onnx_attrs": tuple(
                helper.make_attribute(k, v).SerializeToString() for k, v in attrs),
                "slots": tuple(slots), "in_dtypes": tuple(dt for dt, _ in ins),
                "out_dtypes": tuple(dt for dt, _ in outs), "out_shapes": tuple(tuple(s) for _, s in outs),
                "opsets": (("", DEFAULT_OPSET),), "island": f"{op}_{out}", "output": out}, _ig_dtype(outs[out][0]),
                ranges=ranges or {}, extreme=ranges is None)

        k3 = np.array([3], np.int64)
        return [
            # integer outputs of float ops: exact in both
            # (TVM's argmax gives -1 on a row all at the dtype minimum / -inf: dequantized data never is)
            ex("ArgMax", [("int32", (2, 5, 3))], [("int64", (2, 1, 3))], 0, [("axis", 1)],
               ranges={0: (-(2**31) + 1, 2**31 - 1)}),
            ex("TopK", [("int32", (3, 8))], [("int32", (3, 3)), ("int64", (3, 3))], 0, [("axis", 1)], [k3]),
            ex("Neg", [("int16", (4, 6))], [("int16", (4, 6))], 0),
            ex("Greater", [("int8", (2, 7)), ("int8", (2, 7))], [("bool", (2, 7))], 0),
            ex("CumSum", [("int32", (3, 5))], [("int32", (3, 5))], 0, [("reverse", 1)], [np.array(1, np.int64)],
               ranges={0: (-10**6, 10**6)}),
        ]
