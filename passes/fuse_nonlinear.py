"""Recognise transformer nonlinearities in the float graph (exact rewrites): LayerNorm, GELU.

Runs after canonicalize/fold_batchnorm and before fuse_patterns, so constant scalings appear as
Mul/Add by a constant (Sub/Div by a constant were already rewritten to Add/Mul) or as Affine nodes;
all three forms are accepted.

  LayerNormalization(x, scale, bias; axis = last, epsilon)              ->  LayerNorm(x)
  ReduceMean -> Sub -> Pow(2) | Mul(d, d) -> ReduceMean -> Add(eps) -> Sqrt -> Div
      [-> Mul(gamma)] [-> Add(beta)]   (reductions over the last axis)  ->  LayerNorm(x)
    LayerNorm attrs: axis = -1, epsilon, gamma [C], beta [C] (float64):
    y = (x - mean) / sqrt(var + epsilon) * gamma + beta  over the last axis.
  x * c0 * (a*erf(k*x) + b) [* c1],  c0*c1*a = c0*c1*b = 1/2, k = 1/sqrt2      ->  Gelu(x; "none")
    (every ordering of the 0.5: on x, on 1 + erf, or after the product)
  x * c0 * (a*tanh(k1*(x + k3*x^3)) + b) [* c1],  k1 = sqrt(2/pi), k3 = 0.044715
    (x^3 as Pow(x, 3), Mul(Mul(x, x), x) or Mul(x, Pow(x, 2)))          ->  Gelu(x; "tanh")
  Gelu(x; approximate) (ONNX opset 20)                                  ->  Gelu(x; approximate)
The fused node keeps the ONNX name of the pattern's last output (calibration ranges are keyed by
it).  An intermediate tensor consumed outside the pattern, or a graph output, blocks the rewrite.
"""

from __future__ import annotations

import math

import numpy as np

from qcompiler.graph import Graph, Node

RTOL = 2e-4          # tolerance on the recognised constants (float32 exports of 1/sqrt2 etc.)


def _close(x: float, y: float, rtol: float = RTOL) -> bool:
    return abs(x - y) <= rtol * max(abs(y), 1e-12)


def layernorm_node(g: Graph, n: Node) -> Node:
    """The canonical LayerNorm node of an ONNX LayerNormalization (axis = last, constant scale/bias)."""
    C = g.shape(n.inputs[0])[-1]
    gamma = g.consts[n.inputs[1]] if len(n.inputs) > 1 and n.inputs[1] else np.ones(C)
    beta = g.consts[n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] else np.zeros(C)
    return Node("LayerNorm", n.name, [n.inputs[0]], [n.outputs[0]],
                {"axis": -1, "epsilon": float(n.attrs.get("epsilon", 1e-5)),
                 "gamma": np.broadcast_to(np.asarray(gamma, np.float64).reshape(-1), (C,)).copy(),
                 "beta": np.broadcast_to(np.asarray(beta, np.float64).reshape(-1), (C,)).copy()})


class _M:
    def __init__(self, g: Graph):
        self.g = g
        self.prod = g.producers()
        self.cons = g.consumers()

    def users(self, t: str) -> list[Node]:
        seen, out = set(), []
        for n in self.cons.get(t, []):
            if id(n) not in seen:
                seen.add(id(n))
                out.append(n)
        return out

    def private(self, t: str, allowed: int = 1) -> bool:
        """``t`` is consumed by ``allowed`` distinct nodes and is not a graph output."""
        return t not in self.g.outputs and len(self.users(t)) == allowed

    def only_user(self, t: str) -> Node | None:
        return self.users(t)[0] if self.private(t) else None

    def last_axis_mean(self, n: Node | None, x: str | None = None) -> bool:
        if n is None or n.op != "ReduceMean" or (x is not None and n.inputs[0] != x):
            return False
        rank = len(self.g.shape(n.inputs[0]))
        return tuple(n.attrs.get("axes", ())) in ((rank - 1,), (-1,)) and int(n.attrs.get("keepdims", 1)) == 1

    def const_operand(self, n: Node) -> tuple[str, np.ndarray] | None:
        if len(n.inputs) != 2:
            return None
        a, b = n.inputs
        if b in self.g.consts and a not in self.g.consts:
            return a, self.g.consts[b].astype(np.float64)
        if a in self.g.consts and b not in self.g.consts and n.op in ("Mul", "Add"):
            return b, self.g.consts[a].astype(np.float64)
        return None

    def affine(self, n: Node | None) -> tuple[str, np.ndarray, np.ndarray] | None:
        """(x, scale, offset) when n computes x*scale + offset with constant scale/offset."""
        if n is None:
            return None
        if n.op == "Affine":
            return n.inputs[0], np.asarray(n.attrs["scale"], np.float64), np.asarray(n.attrs["offset"], np.float64)
        if n.op in ("Mul", "Add", "Sub", "Div") and (co := self.const_operand(n)) is not None:
            x, c = co
            one, zero = np.ones_like(c), np.zeros_like(c)
            return {"Mul": (x, c, zero), "Add": (x, one, c), "Sub": (x, one, -c), "Div": (x, 1.0 / c, zero)}[n.op]
        return None

    def scalar_affine(self, n: Node | None) -> tuple[str, float, float] | None:
        r = self.affine(n)
        if r is None or r[1].size != 1 or r[2].size != 1:
            return None
        return r[0], float(r[1].reshape(())), float(r[2].reshape(()))

    def affine_chain_back(self, t: str) -> tuple[str, float, float, list[Node]]:
        """Follow private scalar-affine producers of ``t`` backwards: t = src*s + o."""
        s, o, nodes = 1.0, 0.0, []
        while self.private(t) and (r := self.scalar_affine(self.prod.get(t))) is not None:
            src, ps, po = r
            s, o = ps * s, po * s + o
            nodes.append(self.prod[t])
            t = src
        return t, s, o, nodes

    def is_square(self, t: str, x: str) -> Node | None:
        p = self.prod.get(t)
        if p is None:
            return None
        if p.op == "Mul" and p.inputs == [x, x]:
            return p
        if p.op == "Pow" and p.inputs[0] == x and p.inputs[1] in self.g.consts and \
                np.all(self.g.consts[p.inputs[1]] == 2):
            return p
        return None


# ---- LayerNorm --------------------------------------------------------------------------------------
def _match_decomposed_ln(m: _M, mean1: Node) -> tuple[list[Node], Node] | None:
    """mean1 = ReduceMean(x) at the start of a decomposed LayerNorm: (nodes, replacement)."""
    g = m.g
    if not m.last_axis_mean(mean1):
        return None
    x, mu = mean1.inputs[0], mean1.outputs[0]
    sub = m.only_user(mu)
    if sub is None or sub.op != "Sub" or sub.inputs != [x, mu]:
        return None
    d = sub.outputs[0]
    users = m.users(d)
    if d in g.outputs or len(users) != 2:
        return None
    sq = next((u for u in users if m.is_square(u.outputs[0], d) is u), None)
    div = next((u for u in users if u.op == "Div" and u.inputs[0] == d), None)
    if sq is None or div is None:
        return None
    mean2 = m.only_user(sq.outputs[0])
    if not m.last_axis_mean(mean2, sq.outputs[0]):
        return None
    add = m.only_user(mean2.outputs[0])
    r = m.scalar_affine(add)
    if r is None or r[1] != 1.0 or r[2] < 0:
        return None
    eps = r[2]
    sqrt = m.only_user(add.outputs[0])
    if sqrt is None or sqrt.op != "Sqrt" or div.inputs[1] != sqrt.outputs[0] or not m.private(sqrt.outputs[0]):
        return None
    nodes = [mean1, sub, sq, mean2, add, sqrt, div]
    C = g.shape(x)[-1]
    gamma, beta = np.ones(C), np.zeros(C)
    last = div
    # trailing per-channel affine (Mul gamma, Add beta, or Affine), along the last axis only
    while (nxt := m.only_user(last.outputs[0])) is not None:
        r = m.affine(nxt)
        if r is None or r[0] != last.outputs[0]:
            break
        sc, of = r[1], r[2]
        ok = all(v.ndim == 0 or (v.size in (1, C) and v.shape[-1] in (1, C) and v.size == v.shape[-1])
                 for v in (sc, of))
        if not ok or g.shape(nxt.outputs[0]) != g.shape(x):
            break
        sc, of = np.broadcast_to(sc.reshape(-1), (C,)), np.broadcast_to(of.reshape(-1), (C,))
        gamma, beta = gamma * sc, beta * sc + of
        nodes.append(nxt)
        last = nxt
    if last.outputs[0] != div.outputs[0] and div.outputs[0] in g.outputs:
        return None
    rep = Node("LayerNorm", last.name, [x], [last.outputs[0]],
               {"axis": -1, "epsilon": float(eps), "gamma": gamma.astype(np.float64), "beta": beta.astype(np.float64)})
    return nodes, rep


# ---- GELU ---------------------------------------------------------------------------------------------
def _gelu_tail(m: _M, fn: Node, x: str) -> tuple[list[Node], str] | None:
    """From fn = Erf/Tanh(...) to the end of x*c0*(a*fn + b)*c1 with c*a = c*b = 1/2."""
    nodes, t, a, b = [], fn.outputs[0], 1.0, 0.0
    mul = None
    while True:
        u = m.only_user(t)
        if u is None:
            return None
        r = m.scalar_affine(u)
        if r is not None and r[0] == t:
            a, b = a * r[1], b * r[1] + r[2]
            nodes.append(u)
            t = u.outputs[0]
            continue
        if u.op == "Mul" and len(u.inputs) == 2 and t in u.inputs and u.inputs[0] != u.inputs[1]:
            mul = u
        break
    if mul is None:
        return None
    other = mul.inputs[1] if mul.inputs[0] == t else mul.inputs[0]
    c = 1.0
    if other != x:
        p = m.prod.get(other)
        r = m.scalar_affine(p)
        if r is None or r[0] != x or r[2] != 0.0 or not m.private(other):
            return None
        c = r[1]
        nodes.append(p)
    nodes.append(mul)
    t = mul.outputs[0]
    if _close(c * a, 0.5) and _close(c * b, 0.5):
        return nodes, t
    while (u := m.only_user(t)) is not None:
        r = m.scalar_affine(u)
        if r is None or r[0] != t or r[2] != 0.0:
            return None
        c *= r[1]
        nodes.append(u)
        t = u.outputs[0]
        if _close(c * a, 0.5) and _close(c * b, 0.5):
            return nodes, t
    return None


def _match_gelu(m: _M, fn: Node) -> tuple[list[Node], Node] | None:
    g = m.g
    if not m.private(fn.inputs[0]):
        return None
    if fn.op == "Erf":
        p = m.prod.get(fn.inputs[0])
        r = m.scalar_affine(p)
        if r is None or r[2] != 0.0 or not _close(r[1], 1 / math.sqrt(2)):
            return None
        x, head, approx = r[0], [p], "none"
    else:  # Tanh: k1*(x + k3*x^3), scalings possibly split over several affine nodes
        src, k1, o1, chain = m.affine_chain_back(fn.inputs[0])
        add = m.prod.get(src)
        if add is None or add.op != "Add" or o1 != 0.0 or not m.private(src):
            return None
        hit = None
        for x, w in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            if x in g.consts or w in g.consts:
                continue
            cube_t, k3, o3, chain3 = m.affine_chain_back(w)
            if o3 != 0.0 or not chain3 or not m.private(cube_t):
                continue
            cube = m.prod.get(cube_t)
            sq = None
            if cube is not None and cube.op == "Pow" and cube.inputs[0] == x and cube.inputs[1] in g.consts and \
                    np.all(g.consts[cube.inputs[1]] == 3):
                inner = []
            elif cube is not None and cube.op == "Mul" and x in cube.inputs:
                o = cube.inputs[1] if cube.inputs[0] == x else cube.inputs[0]
                sq = m.is_square(o, x)
                if sq is None or not m.private(o):
                    continue
                inner = [sq]
            else:
                continue
            if _close(k1, math.sqrt(2 / math.pi)) and _close(k3, 0.044715):
                hit = (x, chain + [add] + chain3 + [cube] + inner)
                break
        if hit is None:
            return None
        x, head = hit
        approx = "tanh"
    tail = _gelu_tail(m, fn, x)
    if tail is None:
        return None
    nodes, out = tail
    last = next(n for n in nodes if n.outputs[0] == out)
    rep = Node("Gelu", last.name, [x], [out], {"approximate": approx})
    return head + [fn] + nodes, rep


def fuse_nonlinear(g: Graph) -> Graph:
    g = g.copy()
    changed = True
    while changed:
        changed = False
        m = _M(g)
        for n in g.nodes:
            res = None
            if n.op == "LayerNormalization":
                rank = len(g.shape(n.inputs[0]))
                ax = int(n.attrs.get("axis", -1))
                if ax in (-1, rank - 1) and all(i in g.consts for i in n.inputs[1:] if i) and \
                        not any(o for o in n.outputs[1:]):
                    res = [n], layernorm_node(g, n)
            elif n.op == "ReduceMean":
                res = _match_decomposed_ln(m, n)
            elif n.op in ("Erf", "Tanh"):
                res = _match_gelu(m, n)
            elif n.op == "Gelu" and set(n.attrs) - {"approximate", "act"}:
                n.attrs = {k: v for k, v in n.attrs.items() if k in ("approximate", "act")}
            elif n.op == "Gelu" and "approximate" not in n.attrs:
                n.attrs["approximate"] = "none"
            if res is None:
                continue
            nodes, rep = res
            dead = {id(q) for q in nodes}
            pos = max(i for i, q in enumerate(g.nodes) if id(q) in dead)
            g.nodes = [q for q in g.nodes[:pos] if id(q) not in dead] + [rep] + \
                      [q for q in g.nodes[pos + 1:] if id(q) not in dead]
            changed = True
            break
    g.toposort()
    g.prune()
    return g
