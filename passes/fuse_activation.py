"""Fold Clip (Relu, Relu6, Clip) into the requantizing op that produces its input.

For a producer P whose only consumer is Clip(min, max):  P now outputs the Clip's tensor and
carries ``act = (min, max)``; its dyadic requantization clamps to
[max(qmin, ceil(min / S_y)), min(qmax, floor(max / S_y))], so ReLU costs nothing at run time.
Clip after Clip intersects the intervals.
"""

from __future__ import annotations

from qcompiler.graph import Graph

REQUANTIZING = {"Conv", "Dense", "MatMul", "Add", "Mul", "Affine", "AveragePool", "ReduceMean", "PRelu",
                "HardSigmoid", "HardSwish", "Clip"}


def fuse_activation(g: Graph) -> Graph:
    g = g.copy()
    changed = True
    while changed:
        changed = False
        prod, cons = g.producers(), g.consumers()
        for n in g.nodes:
            if n.op != "Clip":
                continue
            x = n.inputs[0]
            p = prod.get(x)
            if p is None or p.op not in REQUANTIZING or len(cons.get(x, [])) != 1 or x in g.outputs:
                continue
            if not g.dtypes.get(x, "float").startswith("float"):  # integer data: no requantization to fold into
                continue
            lo, hi = n.attrs["min"], n.attrs["max"]
            if p.op == "Clip":
                lo, hi = max(lo, p.attrs["min"]), min(hi, p.attrs["max"])
                p.attrs = {"min": lo, "max": hi}
            else:
                plo, phi = p.attrs.get("act", (float("-inf"), float("inf")))
                p.attrs["act"] = (max(lo, plo), min(hi, phi))
            p.outputs = list(n.outputs)
            g.nodes.remove(n)
            changed = True
            break
    return g
