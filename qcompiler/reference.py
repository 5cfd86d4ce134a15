"""NumPy reference executor of the integer graph: runs each op's exact semantics, bit for bit.

Every integer op declares its semantics once, as the ``reference`` of its contract in
``qcompiler/intops/`` (NumPy int64; GEMM/conv sums in float64, which is exact: every product of
two 8/16-bit integers and every sum of up to 2^20 of them is far below 2^53), casting to the op's
declared dtype after clamping, exactly as the lowered TVM code does.  The TVM library must equal
this executor element for element.

Dyadic step (``qcompiler/qtypes.py``):  rq(x; mult, shift, add) = (x * mult + add + 2^(shift-1)) >> shift.
"""

from __future__ import annotations

import numpy as np

from .graph import Graph, Node


def run_node(node: Node, args: list[np.ndarray]) -> np.ndarray:
    from . import intops

    op = intops.REGISTRY.get(node.op)
    if op is None:
        raise KeyError(f"reference: no integer op '{node.op}' (node {node.name})")
    return op.reference(*args, node.attrs)


def execute(graph: Graph, feeds: dict[str, np.ndarray], keep: bool = False) -> dict[str, np.ndarray]:
    """Run the integer graph; returns the graph outputs (all tensors when ``keep``)."""
    env: dict[str, np.ndarray] = dict(graph.consts)
    env.update(feeds)
    consumers = graph.consumers()
    remaining = {k: len(v) for k, v in consumers.items()}
    outs = set(graph.outputs)
    for node in graph.nodes:
        y = run_node(node, [env[i] for i in node.inputs])
        env[node.outputs[0]] = y
        if not keep:
            for i in node.inputs:
                remaining[i] -= 1
                if remaining[i] == 0 and i not in outs and i not in graph.consts:
                    env.pop(i, None)
    return env if keep else {o: env[o] for o in graph.outputs}
