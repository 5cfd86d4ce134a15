"""ONNX ``If`` nodes replaced by the branch they take: always when the condition is a constant,
and under a run-time guard when the condition took one value on every calibration sample.

Exporters emit ``If`` for shape checks (a constant once the input shapes are fixed and folded) and
for mode switches steered by an input (a sample rate, a flag).  Neither has an integer form as
control flow, but both have one as data flow: the taken branch's nodes are inlined in place of the
``If`` (their names prefixed with the node's, the branch outputs renamed to the node's outputs), so
they are calibrated and quantized like any other node.

A condition computed from the inputs is kept as an extra graph output, ``qc_guard/<node>`` (int64:
1 or 0): the library computes it integer-only from its inputs, and the runtime
(``qcompiler/guards.py``) refuses, in one line, a run whose condition differs from the one
specialized (model.json ``guards``).  A condition that varied over the calibration samples is left
alone, and the support check names the ``If``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GUARD_PREFIX = "qc_guard/"


@dataclass(frozen=True)
class Guard:
    output: str        # the extra graph output holding the condition (int64 scalar, 1 or 0)
    expected: int      # the value every calibration sample gave
    node: str          # the If node
    inputs: tuple      # the model inputs the condition depends on

    def as_json(self) -> dict:
        return {"output": self.output, "expected": self.expected, "node": self.node, "inputs": list(self.inputs)}


def _const_value(model: onnx.ModelProto, name: str):
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _rename_inputs(g: onnx.GraphProto, names: dict) -> None:
    """Inputs of the nodes of ``g`` and of its nested subgraphs renamed by ``names``."""
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in names:
                n.input[k] = names[i]
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename_inputs(sub, names)


def _inline(node: onnx.NodeProto, branch: onnx.GraphProto, k: int):
    """The nodes and initializers that stand for ``node`` taking ``branch``."""
    prefix = (node.name or f"If_{k}").replace("/", "_") + "/"
    g = onnx.GraphProto()
    g.CopyFrom(branch)
    names = {i.name: prefix + i.name for i in g.initializer}
    names.update({o: prefix + o for n in g.node for o in n.output if o})
    _rename_inputs(g, names)
    for n in g.node:
        for j, o in enumerate(n.output):
            if o:
                n.output[j] = names[o]
        if n.name:
            n.name = prefix + n.name
    inits = []
    for i in g.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(i)
        t.name = names[i.name]
        inits.append(t)
    nodes = list(g.node)
    for out, bo in zip(node.output, g.output):
        if out:
            nodes.append(helper.make_node("Identity", [names.get(bo.name, bo.name)], [out], name=prefix + "out/" + out))
    return nodes, inits


def _input_deps(model: onnx.ModelProto, name: str) -> tuple:
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    seen, todo, out = set(), [name], []
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in inputs:
            out.append(t)
        elif t in producer:
            todo.extend(i for i in producer[t].input if i)
    return tuple(sorted(out))


def _observed(model: onnx.ModelProto, conds: list[str], samples) -> dict[str, set]:
    """The values each condition takes on the calibration samples (onnxruntime)."""
    from qcompiler.frontend import run_ort

    values: dict[str, set] = {c: set() for c in conds}
    starts = range(0, samples.n, samples.batch)
    for s in list(starts)[:16]:
        feeds = samples.feeds(s)
        feeds = {k: v for k, v in feeds.items() if k in {i.name for i in model.graph.input}}
        got = run_ort(model, feeds, conds)
        for c in conds:
            values[c].update(bool(x) for x in np.asarray(got[c]).reshape(-1))
    return values


def specialize_ifs(model: onnx.ModelProto, samples=None) -> tuple[onnx.ModelProto, list[Guard]]:
    """``model`` with each top-level If inlined where its condition is constant, or (given the
    calibration ``samples``, a ``qcompiler.calibrate.CalibSet``) took one value on every sample;
    the guards of the latter."""
    ifs = [n for n in model.graph.node if n.op_type == "If" and n.domain in ("", "ai.onnx")]
    if not ifs:
        return model, []
    taken: dict[int, bool] = {}
    dynamic = []
    for n in ifs:
        v = _const_value(model, n.input[0])
        if v is not None and v.size == 1:
            taken[id(n)] = bool(v.reshape(-1)[0])
        else:
            dynamic.append(n)
    guards: list[Guard] = []
    if dynamic and samples is not None:
        try:
            seen = _observed(model, [n.input[0] for n in dynamic], samples)
        except Exception:  # a condition onnxruntime cannot compute alone: leave those Ifs to the support check
            seen = {}
        for n in dynamic:
            vals = seen.get(n.input[0], set())
            if len(vals) == 1:
                taken[id(n)] = vals.pop()
                deps = _input_deps(model, n.input[0])
                guards.append(Guard(GUARD_PREFIX + (n.name or n.output[0]), int(taken[id(n)]), n.name or n.output[0], deps))
    if not taken:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    inits = []
    for k, n in enumerate(model.graph.node):
        if id(n) not in taken:
            out.graph.node.append(n)
            continue
        attrs = {a.name: a.g for a in n.attribute}
        nodes, bi = _inline(n, attrs["then_branch" if taken[id(n)] else "else_branch"], k)
        out.graph.node.extend(nodes)
        inits += bi
    out.graph.initializer.extend(inits)
    for g in guards:
        cond = next(n.input[0] for n in ifs if (n.name or n.output[0]) == g.node)
        out.graph.node.append(helper.make_node("Cast", [cond], [g.output], name=g.output, to=TensorProto.INT64))
        out.graph.output.append(helper.make_tensor_value_info(g.output, TensorProto.INT64, None))
    del out.graph.value_info[:]
    return out, guards
