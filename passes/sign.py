"""Sign analysis: the set of tensors that are provably >= 0 (so they may be stored unsigned).

Forward dataflow over the float graph: a tensor is non-negative when its producer guarantees it
(Clip/act with min >= 0, HardSigmoid, Softmax, Sigmoid, Exp, Abs, Sqrt) or preserves it from
non-negative inputs (pools, reductions of max/mean, data movement, Concat of all, Add/Mul of
non-negative operands, Affine with non-negative scale and offset, Pad with a non-negative value).
Calibration never decides signedness: a tensor that merely looked positive stays signed.
"""

from __future__ import annotations

import numpy as np

from qcompiler.graph import Graph

_ALWAYS = {"HardSigmoid", "Softmax", "Sigmoid", "Exp", "Abs", "Sqrt", "Softplus"}
_PRESERVE = {"MaxPool", "AveragePool", "ReduceMean", "ReduceMax", "Reshape", "Transpose", "Slice", "Gather",
             "Concat", "Add", "Mul", "Dense", "Conv"}


def nonnegative(g: Graph) -> set[str]:
    nn: set[str] = set()
    for n in g.nodes:
        act = n.attrs.get("act")
        if act is not None and act[0] >= 0:
            nn.update(n.outputs)
            continue
        if n.op == "Clip" and n.attrs["min"] >= 0:
            nn.update(n.outputs)
        elif n.op in _ALWAYS:
            nn.update(n.outputs)
        elif n.op in ("Dense", "Conv"):
            continue  # weights have both signs
        elif n.op in _PRESERVE:
            acts = [i for i in n.inputs if i and i not in g.consts]
            consts = [g.consts[i] for i in n.inputs if i in g.consts]
            if acts and all(i in nn for i in acts) and all(np.all(c >= 0) for c in consts):
                nn.update(n.outputs)
        elif n.op == "Affine":
            if n.inputs[0] in nn and np.all(n.attrs["scale"] >= 0) and np.all(n.attrs["offset"] >= 0):
                nn.update(n.outputs)
        elif n.op == "Pad":
            if n.inputs[0] in nn and n.attrs["value"] >= 0:
                nn.update(n.outputs)
    return nn
