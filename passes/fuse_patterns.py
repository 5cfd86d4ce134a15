"""Recognise decomposed activations and merge constant affine chains (exact in float).

  Mul(Clip(Add(x, a), 0, c), k)            with k*c == 1  ->  HardSigmoid(x; alpha=k, beta=a*k)
  Mul(x, HardSigmoid(x; alpha, beta))                     ->  HardSwish(x; alpha, beta)
  Mul(Mul(x, Clip(Add(x, a), 0, c)), k)    with k*c == 1  ->  HardSwish(x; alpha=k, beta=a*k)
  Mul(x, const) / Add(x, const) chains                    ->  Affine(x; scale, offset)
(HardSwish(x) = x * clip(alpha*x + beta, 0, 1); ONNX's HardSwish is alpha = 1/6, beta = 1/2.)
Intermediate tensors consumed elsewhere or exposed as graph outputs block a rewrite.
"""

from __future__ import annotations

import numpy as np

from qcompiler.graph import Graph, Node


def _scalar(g: Graph, name: str) -> float | None:
    v = g.consts.get(name)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(()))


class _Matcher:
    def __init__(self, g: Graph):
        self.g = g
        self.prod = g.producers()
        self.cons = g.consumers()

    def private(self, t: str, n_uses: int = 1) -> Node | None:
        """The producer of ``t`` if ``t`` is used only ``n_uses`` times and is not a graph output."""
        if t in self.g.outputs or len(self.cons.get(t, [])) != n_uses:
            return None
        return self.prod.get(t)

    def const_operand(self, n: Node) -> tuple[str, str] | None:
        """(activation input, const input) of a binary node with exactly one constant operand."""
        a, b = n.inputs[0], n.inputs[1]
        if b in self.g.consts and a not in self.g.consts:
            return a, b
        if a in self.g.consts and b not in self.g.consts:
            return b, a
        return None

    def relu6_of_shift(self, t: str, n_uses: int = 1):
        """t = Clip(Add(x, a), 0, c) privately: returns (x, a, c, [nodes])."""
        clip = self.private(t, n_uses)
        if clip is None or clip.op != "Clip" or clip.attrs["min"] != 0.0 or not np.isfinite(clip.attrs["max"]):
            return None
        add = self.private(clip.inputs[0])
        if add is None or add.op != "Add" or (co := self.const_operand(add)) is None:
            return None
        a = _scalar(self.g, co[1])
        if a is None:
            return None
        return co[0], a, clip.attrs["max"], [clip, add]


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-5 * max(1.0, abs(y))


def fuse_patterns(g: Graph) -> Graph:
    g = g.copy()
    changed = True
    while changed:
        changed = False
        m = _Matcher(g)
        dead: set[int] = set()
        for n in g.nodes:
            if id(n) in dead or n.op != "Mul":
                continue
            co = m.const_operand(n)
            k = _scalar(g, co[1]) if co else None
            # HardSigmoid:  Mul(Clip(Add(x, a), 0, c), k)
            if co and k is not None and (r := m.relu6_of_shift(co[0])) and _close(k * r[2], 1.0):
                x, a, c, nodes = r
                n.op, n.inputs, n.attrs = "HardSigmoid", [x], {"alpha": k, "beta": a * k}
                dead.update(id(q) for q in nodes)
                changed = True
                continue
            # HardSwish:  Mul(Mul(x, Clip(Add(x, a), 0, c)), k)
            if co and k is not None and (inner := m.private(co[0])) is not None and inner.op == "Mul":
                x0, x1 = inner.inputs
                for x, t in ((x0, x1), (x1, x0)):
                    r = m.relu6_of_shift(t)
                    if r and r[0] == x and _close(k * r[2], 1.0):
                        n.op, n.inputs, n.attrs = "HardSwish", [x], {"alpha": k, "beta": r[1] * k}
                        dead.update(id(q) for q in r[3] + [inner])
                        changed = True
                        break
                if changed:
                    continue
            # HardSwish:  Mul(x, HardSigmoid(x))
            if not co:
                x0, x1 = n.inputs
                for x, t in ((x0, x1), (x1, x0)):
                    hs = m.private(t)
                    if hs is not None and hs.op == "HardSigmoid" and hs.inputs[0] == x:
                        n.op, n.inputs = "HardSwish", [x]
                        n.attrs = {"alpha": float(hs.attrs.get("alpha", 0.2)), "beta": float(hs.attrs.get("beta", 0.5))}
                        dead.add(id(hs))
                        changed = True
                        break
        g.nodes = [n for n in g.nodes if id(n) not in dead]
    _merge_affine(g)
    g.prune()
    return g


def _merge_affine(g: Graph) -> None:
    """Mul/Add by constants (broadcastable to the activation, not growing it) -> Affine; chains merge."""
    out: list[Node] = []
    m = _Matcher(g)
    for n in g.nodes:
        if n.op in ("Mul", "Add") and (co := m.const_operand(n)) is not None:
            x, c = co
            cv = g.consts[c].astype(np.float64)
            xs, ys = g.shape(x), g.shape(n.outputs[0])
            if tuple(xs) == tuple(ys) and cv.ndim <= len(xs) and g.dtypes.get(x, "").startswith("float"):
                cv = cv.reshape((1,) * (len(xs) - cv.ndim) + cv.shape)
                scale, offset = (cv, np.zeros_like(cv)) if n.op == "Mul" else (np.ones_like(cv), cv)
                p = m.private(x)
                if p is not None and p.op == "Affine" and p in out:
                    # (x*s1 + o1)*s2 + o2  ->  x*(s1*s2) + (o1*s2 + o2)
                    s1, o1 = p.attrs["scale"], p.attrs["offset"]
                    p.attrs = {"scale": s1 * scale, "offset": o1 * scale + offset}
                    p.outputs = n.outputs
                    continue
                n = Node("Affine", n.name, [x], n.outputs, {"scale": scale, "offset": offset})
                m.prod[n.outputs[0]] = n
        out.append(n)
    g.nodes = out
