"""ONNX ``Loop`` with a trip count known at compile time, unrolled into its iterations.

tf2onnx exports a Keras LSTM / GRU as a ``Loop`` over time (a TF ``while``); once the input shapes
are fixed and folded (``qcompiler/frontend.py``) its trip count ``M`` is a constant.  Each
iteration i becomes a copy of the body (names prefixed ``<loop>/step<i>/``: one calibrated range per role, passes/shared_steps.py) with

  iteration_num := i (int64 constant),  cond_in := the previous cond_out,
  v_in[k] := the previous v_out[k] (the initial values for i = 0),

the Loop's outputs become the last v_out[k] and, for each scan output, the per-iteration values
stacked on a new axis 0 (Unsqueeze + Concat).  The body's ops are then calibrated and quantized like
any other node (the recurrence unrolled, as ``unroll_recurrent.py`` does for ONNX LSTM / GRU).

A loop may stop early when its condition turns false.  After unrolling, the model is folded
(onnxruntime) with every iteration's cond_out kept: each must then be the constant True (a loop
that runs its full trip count); a condition that depends on the data, or turns false, leaves the
Loop as it was (the support check names it).  Loops whose trip count is not a constant, or above
``MAX_TRIPS``, are left too.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .specialize_if import _const_value, _rename_inputs

MAX_TRIPS = 1024


def _unroll_one(node: onnx.NodeProto, M: int, k: int):
    """(nodes, initializers, the cond_out name of every iteration) replacing ``node``."""
    body = next(a.g for a in node.attribute if a.name == "body")
    prefix = (node.name or f"Loop_{k}").replace("/", "_")
    n_carried = len(node.input) - 2
    n_scan = len(body.output) - 1 - n_carried
    cond = node.input[1] if len(node.input) > 1 else ""
    carried = list(node.input[2:])
    nodes, inits, conds = [], [], []
    scans: list[list[str]] = [[] for _ in range(n_scan)]
    for i in range(M):
        p = f"{prefix}/step{i}/"
        g = onnx.GraphProto()
        g.CopyFrom(body)
        names = {}
        it_name = p + "iteration_num"
        inits.append(numpy_helper.from_array(np.array(i, np.int64), it_name))
        names[body.input[0].name] = it_name
        if len(body.input) > 1:
            if cond:
                names[body.input[1].name] = cond
            else:
                t = p + "cond_in"
                inits.append(numpy_helper.from_array(np.array(True), t))
                names[body.input[1].name] = t
        for bi, v in zip(body.input[2:], carried):
            names[bi.name] = v
        for init in g.initializer:
            names[init.name] = p + init.name
        for n in g.node:
            for o in n.output:
                if o:
                    names[o] = p + o
        _rename_inputs(g, names)
        for n in g.node:
            for j, o in enumerate(n.output):
                if o:
                    n.output[j] = names[o]
            n.name = p + (n.name or n.op_type)
        for init in g.initializer:
            t = onnx.TensorProto()
            t.CopyFrom(init)
            t.name = names[init.name]
            inits.append(t)
        nodes.extend(g.node)
        outs = [names.get(o.name, o.name) for o in body.output]
        cond = outs[0]
        conds.append(cond)
        carried = outs[1:1 + n_carried]
        for j in range(n_scan):
            scans[j].append(outs[1 + n_carried + j])
    # the Loop's outputs: final carried values, then the stacked scan outputs
    for j, out in enumerate(node.output[:n_carried]):
        if out:
            nodes.append(helper.make_node("Identity", [carried[j]], [out], name=f"{prefix}/final/{j}"))
    axes = f"{prefix}/axes0"
    inits.append(numpy_helper.from_array(np.array([0], np.int64), axes))
    for j, out in enumerate(node.output[n_carried:]):
        if not out:
            continue
        parts = []
        for i, s in enumerate(scans[j]):
            u = f"{prefix}/scan{j}/it{i}"
            nodes.append(helper.make_node("Unsqueeze", [s, axes], [u], name=u))
            parts.append(u)
        nodes.append(helper.make_node("Concat", parts, [out], name=f"{prefix}/scan{j}", axis=0))
    return nodes, inits, conds[:-1]    # the last cond_out decides nothing


def unroll_loops(model: onnx.ModelProto, fold) -> onnx.ModelProto:
    """``model`` with every top-level Loop of constant trip count that always runs to the end
    unrolled; ``fold`` is the frontend's constant folding (onnxruntime)."""
    loops = [n for n in model.graph.node if n.op_type == "Loop" and n.domain in ("", "ai.onnx")]
    if not loops:
        return model
    plan = {}
    for k, n in enumerate(model.graph.node):
        if n.op_type != "Loop" or n.domain not in ("", "ai.onnx") or not n.input[0]:
            continue
        M = _const_value(model, n.input[0])
        if M is None or M.size != 1 or not 0 < int(M.reshape(-1)[0]) <= MAX_TRIPS:
            continue
        if len(n.input) > 1 and n.input[1]:
            c = _const_value(model, n.input[1])
            if c is None or not bool(np.asarray(c).reshape(-1)[0]):
                continue
        plan[id(n)] = (int(M.reshape(-1)[0]), k)
    if not plan:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    conds: list[str] = []
    for n in model.graph.node:
        if id(n) not in plan:
            out.graph.node.append(n)
            continue
        nodes, inits, cs = _unroll_one(n, *plan[id(n)])
        out.graph.node.extend(nodes)
        out.graph.initializer.extend(inits)
        conds += cs
    del out.graph.value_info[:]
    if conds:  # every iteration's condition must fold to True: keep them as outputs while folding
        n_out = len(out.graph.output)
        for c in conds:
            out.graph.output.append(helper.make_tensor_value_info(c, onnx.TensorProto.BOOL, None))
        folded = fold(out)
        ok = all((v := _const_value(folded, c)) is not None and bool(np.all(v)) for c in conds)
        if not ok:
            return model
        del folded.graph.output[n_out:]
        return folded
    return out
