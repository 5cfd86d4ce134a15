"""Fuse the elementwise integer ops that consume a conv / dense result into the GEMM node (integer graph).

A conv or dense kernel writes its requantized result, and without this pass a separate kernel reads
it back to add the residual (ResNet's and the transformers' skip connections, ReLU included in the
add's clamp) or to apply hard-swish (MobileNetV3: a gate ``requant`` and a ``mul``), then writes
again.  Here those ops move into the GEMM node's ``epilogue`` (``qcompiler/intops/gemm.py``): the
node keeps its name, op and GEMM attributes, takes the ops' other operands as extra inputs and
produces the last op's output; the ops' attributes are kept unchanged, and the node's reference /
overflow bound / Relax lowering run the ops' own, so the fused graph computes what the unfused one
did bit for bit.  The CPU kernels (``qcompiler/lowering/gemm_cpu.py``) evaluate the steps on the
finished register tile, so the activations are written once between GEMMs; other targets and
kernels lower the steps as before (Relax ops that FuseOps merges into one kernel).

Patterns, repeated while they match (the current tensor ``t``: the GEMM's output, then each step's):
  * ``t`` has one consumer, an ``add`` / ``mul`` / ``requant`` / ``clip`` whose other operands have
    ``t``'s shape (no broadcasting) -> one step (residual add, a clip after it, ...);
  * ``t`` feeds exactly a ``requant`` g (input ``t``, one consumer) and a ``mul`` of ``t`` and g's
    output (hard-swish) -> two steps.
Conditions: ``t`` is no graph output; every constant of a step is per tensor (one value: the
kernels take them as one int64 argument vector); its clamp lies inside its dtype (so the int64
result equals the dtype's value); at most ``MAX_EXTRA`` extra inputs.
"""

from __future__ import annotations

import numpy as np

from qcompiler.graph import Graph, Node
from qcompiler.intops.gemm import EPILOGUE_OPS
from qcompiler.intops.registry import get
from qcompiler.qtypes import INT_RANGES, int_range

GEMM_OPS = ("conv", "dense")
MAX_EXTRA = 2


def _scalar_consts(n: Node) -> bool:
    """Every constant is one value, and every multiplier |m| < 2^31 (the kernels multiply it as a
    sign-extended int32, elementwise.py ``_m32``)."""
    op = get(n.op)
    for k in op.epilogue_consts:
        v = n.attrs.get(k)
        if v is None:
            continue
        v = np.asarray(v)
        if v.size != 1 or (k.startswith("mult") and not abs(int(v.reshape(-1)[0])) < 2**31):
            return False
    return True


def _clamp_ok(ig: Graph, n: Node) -> bool:
    a = n.attrs
    dtype = ig.dtypes.get(n.outputs[0], "")
    if dtype not in INT_RANGES or "lo" not in a or "hi" not in a:  # e.g. a float output (the exit dequantize)
        return False
    lo, hi = int_range(dtype)
    return lo <= int(a["lo"]) <= int(a["hi"]) <= hi


def _fusable(ig: Graph, n: Node, shape) -> bool:
    return (n.op in EPILOGUE_OPS and tuple(ig.shapes[n.outputs[0]]) == tuple(shape)
            and all(tuple(ig.shapes[i]) == tuple(shape) for i in n.inputs)
            and _scalar_consts(n) and _clamp_ok(ig, n))


def _next_group(ig: Graph, cons: dict, t: str, shape, taken: set) -> list[Node] | None:
    """The consumers of ``t`` that one pattern absorbs (in graph order), or None."""
    cs = [c for c in cons.get(t, [])]
    if any(id(c) in taken for c in cs):
        return None
    if len(cs) == 1 and _fusable(ig, cs[0], shape):
        return cs
    if len(cs) == 2:
        g = next((c for c in cs if c.op == "requant"), None)
        m = next((c for c in cs if c.op == "mul"), None)
        if (g is not None and m is not None and g.inputs == [t] and sorted(m.inputs) == sorted([t, g.outputs[0]])
                and [id(c) for c in cons.get(g.outputs[0], [])] == [id(m)]
                and _fusable(ig, g, shape) and _fusable(ig, m, shape)):
            return [g, m]
    return None


def fuse_epilogue(ig: Graph) -> Graph:
    """The graph with each conv / dense node's elementwise consumers folded into it (in place: the
    node list is rebuilt; tensors keep their names, the GEMM's own output disappears)."""
    cons = ig.consumers()
    outputs = set(ig.outputs)
    taken: set[int] = set()            # absorbed nodes
    place: dict[int, Node] = {}        # id(last absorbed node) -> the fused node
    fused_gemms: set[int] = set()
    for n in ig.nodes:
        if n.op not in GEMM_OPS or n.attrs.get("epilogue") or len(n.inputs) != 1:
            continue
        t = n.outputs[0]
        shape = ig.shapes[t]
        refs = {t: "y"}
        extras: list[str] = []
        steps: list[dict] = []
        absorbed: list[Node] = []
        while t not in outputs:
            group = _next_group(ig, cons, t, shape, taken)
            if group is None:
                break
            new_extra = [i for c in group for i in c.inputs if i not in refs and i not in extras
                         and i not in {c2.outputs[0] for c2 in group}]
            if len(extras) + len(dict.fromkeys(new_extra)) > MAX_EXTRA:
                break
            for c in group:
                for i in c.inputs:
                    if i not in refs:
                        extras.append(i)
                        refs[i] = f"in{len(extras)}"
                refs[c.outputs[0]] = f"s{len(steps)}"
                steps.append({"op": c.op, "args": tuple(refs[i] for i in c.inputs), "attrs": dict(c.attrs),
                              "name": c.name})
                absorbed.append(c)
            t = group[-1].outputs[0]
        if not steps:
            continue
        last = absorbed[-1]
        in_scales = tuple(n.attrs.get("in_scales", (None,)))[:1] + tuple(
            ig.qparams[e].scale if e in ig.qparams else None for e in extras)
        attrs = {**n.attrs, "epilogue": tuple(steps), "in_scales": in_scales,
                 "out_scale": last.attrs.get("out_scale")}
        taken.update(id(c) for c in absorbed)
        fused_gemms.add(id(n))
        place[id(last)] = Node(n.op, n.name, [n.inputs[0], *extras], [t], attrs)
    if not place:
        return ig
    nodes = []
    for n in ig.nodes:
        if id(n) in fused_gemms:
            continue
        if id(n) in place:
            nodes.append(place[id(n)])
        elif id(n) not in taken:
            nodes.append(n)
    ig.nodes = nodes
    return ig


def count_fused(ig: Graph) -> dict[str, int]:
    """Fused epilogues by pattern (the steps' op names joined), for reports."""
    out: dict[str, int] = {}
    for n in ig.nodes:
        if n.attrs.get("epilogue"):
            k = f"{n.op}+" + "+".join(s["op"] for s in n.attrs["epilogue"])
            out[k] = out.get(k, 0) + 1
    return out
