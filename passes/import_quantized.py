"""Pre-quantized ONNX models back to float, so the integer pipeline quantizes them its own way.

Models quantized by ONNX Runtime's tool (dynamic: ``DynamicQuantizeLinear`` + ``MatMulInteger`` /
``ConvInteger`` / ``com.microsoft.DynamicQuantizeLSTM`` / ``DynamicQuantizeMatMul``; static QOperator:
``QLinearConv`` / ``QLinearMatMul``) or exported in QDQ form (``QuantizeLinear`` -> ``DequantizeLinear``
around float ops, TF/PyTorch QAT) carry int8 weights whose float values are exact:
``W = (W_q - zp) * s``.  Their activation quantization, though, is either dynamic (a float scale
computed at run time: not integer-only) or a fake-quant pair the float model does not need.  This
pass (frontend, before calibration; ``qcompiler/frontend.py``) rewrites every such node into the
float op it stands for, with the stored weights dequantized, so the model is calibrated and
quantized like any float model:

  DynamicQuantizeLinear(x) -> (q, s, zp)    q := x (float), s := 1.0, zp := 0; every consumer of q
                                            and zp must be one of the integer ops rewritten below
  MatMulInteger(A, B, a_zp, b_zp)           MatMul(A', B'),  X' = X - zp in float (X = q above: X)
  ConvInteger(x, w, x_zp, w_zp)             Conv(x', w') with the same attributes
      (their outputs feed ``Cast(to=float)`` and a ``Mul`` by s_A * s_B; with s_A = 1 the product
       is the weight scale, so the float result is A @ W exactly as the float model computed it)
  DynamicQuantizeMatMul(A, B, b_s, b_zp, bias)          MatMul(A, (B - b_zp) * b_s) [+ bias]
  DynamicQuantizeLSTM(X, W, R, B, ..., W_s, W_zp, R_s, R_zp)
                                            LSTM(X, W', R', B, ...), W' = ((W - zp) * s)^T: the
                                            contrib op stores W as [dirs, input, 4*hidden]
  QLinearConv / QLinearMatMul               DequantizeLinear -> float op -> QuantizeLinear
  DequantizeLinear(const)                   the float constant
  DequantizeLinear(Gather(const, idx))      Gather(float constant, idx)  (quantized embeddings)
  DequantizeLinear(QuantizeLinear(x))       Clip(x, (qmin - zp) s, (qmax - zp) s): a fake-quant pair
                                            without its rounding (the pipeline requantizes)

A node of these types in any other arrangement is left as it is (the support check names it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QUANT_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
             "DynamicQuantizeLSTM", "QLinearConv", "QLinearMatMul", "DequantizeLinear", "QuantizeLinear"}


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


class _Model:
    """The model's constants, producers and consumers, and the nodes/initializers to swap in."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in model.graph.output}
        self.new_inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, base: str, arr: np.ndarray) -> str:
        self.count += 1
        name = f"{base}__float{self.count}"
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def value(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None


def _dequant(q: np.ndarray, s: np.ndarray, zp: np.ndarray | None, axis: int = 1) -> np.ndarray:
    """(q - zp) * s in float32, per tensor or along ``axis`` (ONNX DequantizeLinear)."""
    q = q.astype(np.float64)
    s = np.asarray(s, np.float64)
    z = np.zeros_like(s) if zp is None else np.asarray(zp, np.float64)
    if s.ndim == 1 and s.size > 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q - z) * s).astype(np.float32)


def _dynamic_q(m: _Model, name: str) -> onnx.NodeProto | None:
    p = m.producer.get(name)
    return p if p is not None and p.op_type == "DynamicQuantizeLinear" and p.output[0] == name else None


def _float_operand(m: _Model, nodes: list, x: str, zp: str) -> str | None:
    """The float value an integer GEMM operand stands for: a constant minus its zero point, the
    float input of a DynamicQuantizeLinear, or None (an integer activation of another origin)."""
    v = m.value(x)
    if v is not None:
        z = m.value(zp)
        if zp and z is None:
            return None
        return m.const(x, v.astype(np.float32) - (0 if z is None else z.astype(np.float32)))
    d = _dynamic_q(m, x)
    if d is not None and (not zp or zp == d.output[2]):
        return d.input[0]
    return None


def _integer_gemm(m: _Model, n: onnx.NodeProto, nodes: list) -> bool:
    """MatMulInteger / ConvInteger -> MatMul / Conv on float operands."""
    zps = list(n.input[2:4]) + [""] * (4 - len(n.input))
    a = _float_operand(m, nodes, n.input[0], zps[0])
    b = _float_operand(m, nodes, n.input[1], zps[1])
    if a is None or b is None:
        return False
    if not all(c.op_type == "Cast" and _attrs(c).get("to") == TensorProto.FLOAT for c in m.consumers.get(n.output[0], [])):
        return False
    if n.op_type == "MatMulInteger":
        nodes.append(helper.make_node("MatMul", [a, b], [n.output[0]], name=n.name))
    else:
        nodes.append(helper.make_node("Conv", [a, b], [n.output[0]], name=n.name, **_attrs(n)))
    return True


def _dynamic_matmul(m: _Model, n: onnx.NodeProto, nodes: list) -> bool:
    B, s, zp = (m.value(i) for i in n.input[1:4])
    if B is None or s is None:
        return False
    w = m.const(n.input[1], _dequant(B, s, zp, axis=-1))
    if len(n.input) > 4 and n.input[4]:
        mid = n.output[0] + "__matmul"
        nodes.append(helper.make_node("MatMul", [n.input[0], w], [mid], name=n.name + "/MatMul"))
        nodes.append(helper.make_node("Add", [mid, n.input[4]], [n.output[0]], name=n.name))
    else:
        nodes.append(helper.make_node("MatMul", [n.input[0], w], [n.output[0]], name=n.name))
    return True


def _lstm(m: _Model, n: onnx.NodeProto, nodes: list) -> bool:
    ins = list(n.input) + [""] * (12 - len(n.input))
    W, R, Ws, Wz, Rs, Rz = (m.value(ins[i]) for i in (1, 2, 8, 9, 10, 11))
    if W is None or R is None or Ws is None or Rs is None:
        return False

    def deq(q, s, z):  # [dirs, in, 4h] with per-direction (or per-direction-and-column) scales
        s = np.asarray(s, np.float64).reshape(q.shape[0], 1, -1)
        z = np.zeros_like(s) if z is None else np.asarray(z, np.float64).reshape(q.shape[0], 1, -1)
        return np.transpose((q.astype(np.float64) - z) * s, (0, 2, 1)).astype(np.float32)

    w, r = m.const(ins[1], deq(W, Ws, Wz)), m.const(ins[2], deq(R, Rs, Rz))
    inputs = [ins[0], w, r] + ins[3:8]
    while inputs and not inputs[-1]:
        inputs.pop()
    nodes.append(helper.make_node("LSTM", inputs, list(n.output), name=n.name, **_attrs(n)))
    return True


def _qlinear(m: _Model, n: onnx.NodeProto, nodes: list) -> bool:
    """QLinearConv(x, xs, xzp, w, ws, wzp, ys, yzp, B) / QLinearMatMul(a, as, azp, b, bs, bzp, ys, yzp)
    -> DequantizeLinear of the activations, the float op on dequantized constants, QuantizeLinear."""
    ins = list(n.input)
    operands = []
    for q, s, z in ((ins[0], ins[1], ins[2]), (ins[3], ins[4], ins[5])):
        v, sv, zv = m.value(q), m.value(s), m.value(z)
        if v is not None and sv is not None:
            axis = 0 if n.op_type == "QLinearConv" else -1
            operands.append(m.const(q, _dequant(v, sv, zv, axis=axis)))
        else:
            out = q + "__dequantized"
            nodes.append(helper.make_node("DequantizeLinear", [q, s, z] if z else [q, s], [out], name=out))
            operands.append(out)
    mid = n.output[0] + "__float"
    if n.op_type == "QLinearConv":
        extra = []
        if len(ins) > 8 and ins[8]:
            bq, xs, ws = m.value(ins[8]), m.value(ins[1]), m.value(ins[4])
            if bq is None or xs is None or ws is None:
                return False
            extra = [m.const(ins[8], (bq.astype(np.float64) * float(xs) * np.asarray(ws, np.float64)).astype(np.float32))]
        nodes.append(helper.make_node("Conv", operands + extra, [mid], name=n.name, **_attrs(n)))
    else:
        nodes.append(helper.make_node("MatMul", operands, [mid], name=n.name))
    nodes.append(helper.make_node("QuantizeLinear", [mid, ins[6], ins[7]], [n.output[0]], name=n.name + "/quantize"))
    return True


def _rewrite_integer_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    m = _Model(model)
    out_nodes: list[onnx.NodeProto] = []
    rewritten: set[str] = set()
    handlers = {"MatMulInteger": _integer_gemm, "ConvInteger": _integer_gemm, "DynamicQuantizeMatMul": _dynamic_matmul,
                "DynamicQuantizeLSTM": _lstm, "QLinearConv": _qlinear, "QLinearMatMul": _qlinear}
    for n in model.graph.node:
        h = handlers.get(n.op_type)
        new: list[onnx.NodeProto] = []
        if h is not None and n.domain in ("", "ai.onnx", "com.microsoft") and h(m, n, new):
            out_nodes += new
            rewritten.add(n.name)
        else:
            out_nodes.append(n)
    # DynamicQuantizeLinear whose quantized outputs now feed nothing but the rewritten ops: q := x,
    # s := 1 (the Mul by s_A * s_B keeps the weight scale), zp dropped
    final: list[onnx.NodeProto] = []
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in out_nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for n in out_nodes:
        if n.op_type == "DynamicQuantizeLinear":
            q, s, zp = (list(n.output) + ["", "", ""])[:3]
            if not readers.get(q) and not readers.get(zp) and q not in m.outputs and zp not in m.outputs:
                if s and (readers.get(s) or s in m.outputs):
                    final.append(helper.make_node("Constant", [], [s], name=n.name + "/unit_scale",
                                                  value=numpy_helper.from_array(np.array(1.0, np.float32))))
                continue
        final.append(n)
    return _replace(model, final, m.new_inits)


def _replace(model, nodes, inits) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    del out.graph.value_info[:]
    return out


MOVES = {"Gather", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice"}


def _dequantized_constants(m: _Model):
    """Integer constants every path of which (through data movement on input 0: ``MOVES``) ends in
    DequantizeLinear nodes of one scale and zero point: (constant, its scale, zero point, axis,
    the DequantizeLinear nodes)."""
    for name, v in m.consts.items():
        if v.dtype.kind not in "iu" or v.dtype == np.int64 or name not in m.consumers:
            continue
        dqs, params, ok, todo = [], set(), True, [name]
        while todo and ok:
            t = todo.pop()
            if t in m.outputs:
                ok = False
            for c in m.consumers.get(t, []):
                if c.op_type == "DequantizeLinear" and c.input[0] == t:
                    ins = list(c.input) + [""] * (3 - len(c.input))
                    s, z = m.value(ins[1]), m.value(ins[2])
                    if s is None or (ins[2] and z is None):
                        ok = False
                        break
                    axis = int(_attrs(c).get("axis", 1))
                    if np.asarray(s).size > 1 and t != name:
                        ok = False  # a per-axis scale after data movement: its axis moved too
                        break
                    params.add((np.asarray(s).tobytes(), None if z is None else np.asarray(z).tobytes(), axis))
                    dqs.append(c)
                elif c.op_type in MOVES and c.input[0] == t and c.domain in ("", "ai.onnx"):
                    todo.extend(c.output)
                else:
                    ok = False
                    break
        if ok and dqs and len(params) == 1:
            c = dqs[0]
            ins = list(c.input) + [""] * (3 - len(c.input))
            yield name, m.value(ins[1]), m.value(ins[2]), int(_attrs(c).get("axis", 1)), dqs


def _fold_dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Integer constants read only through DequantizeLinear (directly or after Gather / Transpose /
    Reshape ...: quantized embeddings and weights) become float constants and those
    DequantizeLinear nodes identities; DequantizeLinear(QuantizeLinear(x)) with one set of
    parameters becomes x."""
    m = _Model(model)
    swap: dict[str, np.ndarray] = {}
    identity: set[int] = set()
    for name, s, z, axis, dqs in _dequantized_constants(m):
        swap[name] = _dequant(m.consts[name], s, z, axis)
        identity.update(id(c) for c in dqs)
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and id(n) not in identity:
            p = m.producer.get(n.input[0])
            if p is not None and p.op_type == "QuantizeLinear" and list(p.input[1:]) == list(n.input[1:]):
                identity.add(id(n))
    if not swap and not identity:
        return model
    nodes = []
    for n in model.graph.node:
        if id(n) in identity:
            p = m.producer.get(n.input[0])
            if p is not None and p.op_type == "QuantizeLinear" and not _from_swapped(m, n.input[0], swap):
                nodes += _fake_quant_clip(m, p, n)
            else:
                nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
        elif n.op_type == "Constant" and n.output[0] in swap:
            nodes.append(helper.make_node("Constant", [], [n.output[0]], name=n.name,
                                          value=numpy_helper.from_array(swap[n.output[0]], n.output[0])))
        else:
            nodes.append(n)
    out = _replace(model, nodes, m.new_inits)
    inits = [numpy_helper.from_array(swap[i.name], i.name) if i.name in swap else i for i in out.graph.initializer]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return _drop_dead(out)


def _fake_quant_clip(m: _Model, q: onnx.NodeProto, dq: onnx.NodeProto) -> list:
    """DequantizeLinear(QuantizeLinear(x)) without its rounding: x clipped to the range the
    quantized type represents, [(qmin - zp) s, (qmax - zp) s] -- the quantizer drops a Relu / Clip
    before such a pair when that range already clips (a uint8 zero point of 0 is a Relu)."""
    ins = list(q.input) + [""] * (3 - len(q.input))
    s, z = m.value(ins[1]), m.value(ins[2])
    if s is None or np.asarray(s).size != 1 or (ins[2] and z is None):
        return [helper.make_node("Identity", [q.input[0]], [dq.output[0]], name=dq.name)]
    dt = np.dtype(z.dtype) if z is not None else np.dtype(np.uint8)
    info = np.iinfo(dt)
    zp = 0.0 if z is None else float(np.asarray(z).reshape(-1)[0])
    sc = float(np.asarray(s).reshape(-1)[0])
    lo = m.const(dq.output[0] + "_lo", np.array((info.min - zp) * sc, np.float32))
    hi = m.const(dq.output[0] + "_hi", np.array((info.max - zp) * sc, np.float32))
    return [helper.make_node("Clip", [q.input[0], lo, hi], [dq.output[0]], name=dq.name)]


def _from_swapped(m: _Model, t: str, swap: dict) -> bool:
    p = m.producer.get(t)
    while p is not None and p.op_type in MOVES:
        if p.input[0] in swap:
            return True
        p = m.producer.get(p.input[0])
    return t in swap


def _subgraph_reads(n: onnx.NodeProto) -> set[str]:
    """Every name the subgraphs of ``n`` (If / Loop / Scan bodies, nested) read."""
    out: set[str] = set()
    for a in n.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for node in g.node:
                out.update(i for i in node.input if i)
                out |= _subgraph_reads(node)
    return out


def _drop_dead(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes and initializers nothing reads any more (QuantizeLinear left by a folded pair)."""
    live = {o.name for o in model.graph.output}
    keep = []
    for n in reversed(model.graph.node):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(i for i in n.input if i)
            live.update(_subgraph_reads(n))
    keep.reverse()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    inits = [i for i in out.graph.initializer if i.name in live]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out


def is_prequantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANT_OPS for n in model.graph.node)


def import_quantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its quantized ops rewritten to float (see the module docstring); ``model``
    itself when it has none."""
    if not is_prequantized(model):
        return model
    model = _rewrite_integer_ops(model)
    model = _fold_dequantize(model)
    model = _drop_dead(model)
    if not any(n.domain == "com.microsoft" for n in model.graph.node):
        kept = [o for o in model.opset_import if o.domain != "com.microsoft"]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return model
