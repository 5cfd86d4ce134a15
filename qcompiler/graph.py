"""The ONNX-level graph IR that the passes rewrite (docs/design.md §1).

Why this route: calibration statistics are keyed by ONNX tensor names (onnxruntime computes them
by name), and Relax's importer renames every tensor (lv, lv1, ...). So the float passes and the
quantization run on this small named-tensor IR, which is calibrated by onnxruntime on the
frontend's ONNX model, and only the finished integer graph is lowered to Relax with a
BlockBuilder (``qcompiler.lowering``).  The same IR carries both the float graph (ONNX op types,
domain "") and the integer graph (qcompiler op types, see ``qcompiler.intops``).

A ``Graph`` is a list of nodes in topological order plus tensor metadata: every tensor name has a
static shape and a dtype; constants live in ``consts``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # short, for error messages
        return f"{self.op}({self.name})"


@dataclass
class Graph:
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = "model"
    opset: int = 17     # the ONNX default-domain opset the float nodes follow (constant folding runs them)
    # integer graphs: how each integer tensor represents real values (qcompiler.qtypes.QParams)
    qparams: dict[str, Any] = field(default_factory=dict)
    # symbolic dims of a graph fitted over sizes (qcompiler/symbolic.py): name -> (min, max)
    dim_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    # ---- queries -------------------------------------------------------------------------
    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, name: str) -> np.ndarray:
        return self.consts[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def copy(self) -> Graph:
        return dataclasses.replace(
            self,
            nodes=[dataclasses.replace(n, inputs=list(n.inputs), outputs=list(n.outputs), attrs=dict(n.attrs))
                   for n in self.nodes],
            inputs=list(self.inputs), outputs=list(self.outputs), shapes=dict(self.shapes),
            dtypes=dict(self.dtypes), consts=dict(self.consts), qparams=dict(self.qparams),
            dim_ranges=dict(self.dim_ranges),
        )

    # ---- edits ---------------------------------------------------------------------------
    def add_const(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        self.consts[name] = value
        self.shapes[name] = tuple(value.shape)
        self.dtypes[name] = str(value.dtype)
        return name

    def fresh(self, base: str) -> str:
        """A tensor name not yet used in the graph."""
        taken = set(self.shapes) | {o for n in self.nodes for o in n.outputs}
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    def toposort(self) -> None:
        """Reorder nodes topologically (networkx), keeping the original order among peers."""
        order = {id(n): i for i, n in enumerate(self.nodes)}
        g = nx.DiGraph()
        prod = self.producers()
        for n in self.nodes:
            g.add_node(id(n))
            for i in n.inputs:
                if i in prod:
                    g.add_edge(id(prod[i]), id(n))
        by_id = {id(n): n for n in self.nodes}
        try:
            ids = list(nx.lexicographical_topological_sort(g, key=lambda k: order[k]))
        except nx.NetworkXUnfeasible as e:
            raise ValueError("graph has a cycle") from e
        self.nodes = [by_id[i] for i in ids]

    def prune(self) -> None:
        """Drop nodes whose outputs reach no graph output, and unused constants."""
        prod = self.producers()
        live: set[str] = set()
        stack = list(self.outputs)
        keep: set[int] = set()
        while stack:
            t = stack.pop()
            if t in live:
                continue
            live.add(t)
            n = prod.get(t)
            if n is not None and id(n) not in keep:
                keep.add(id(n))
                stack.extend(i for i in n.inputs if i)
        self.nodes = [n for n in self.nodes if id(n) in keep]
        used = {i for n in self.nodes for i in n.inputs} | set(self.outputs)
        for c in [c for c in self.consts if c not in used]:
            del self.consts[c]

    def rename_tensor(self, old: str, new: str) -> None:
        """Make every reference to ``old`` refer to ``new`` (which must already be described)."""
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
            n.outputs = [new if o == old else o for o in n.outputs]
        self.outputs = [new if o == old else o for o in self.outputs]


def op_histogram(nodes: Iterable[Node]) -> dict[str, int]:
    h: dict[str, int] = {}
    for n in nodes:
        h[n.op] = h.get(n.op, 0) + 1
    return h
