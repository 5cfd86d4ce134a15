"""The op contracts of qcompiler/intops/: every registered integer op has all its parts, and its
TVM build equals its NumPy reference bit for bit on random and on extreme inputs.

For each op, every example of ``examples()`` becomes one node of a small integer graph (its own
inputs, its own output); the graph passes the overflow proof, then runs through the reference
executor and through the CPU build on three input sets: uniform random over the dtype (or the
example's range), all-minimum and all-maximum (alternating min/max for binary ops), and a mix.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from qcompiler import intops, reference
from qcompiler.graph import Graph, Node
from qcompiler.intops.registry import IntOp
from qcompiler.qtypes import INT_RANGES
from passes.quantize import unsupported  # noqa: F401  (imports every rule family)

OPS = sorted(intops.REGISTRY)


def test_every_op_declares_its_whole_contract():
    for name, op in intops.REGISTRY.items():
        assert op.name == name
        assert (op.__doc__ or "").strip(), f"{name}: no docstring (the math and its bound)"
        assert op.attrs, f"{name}: no attributes declared"
        for part in ("reference", "lower", "examples"):
            assert getattr(op, part) is not getattr(IntOp, part), f"{name}: no {part}"
        assert op.examples(np.random.default_rng(0)), f"{name}: no examples"


def test_every_emitted_op_is_registered_and_every_example_uses_declared_attrs():
    """The quantization rules emit only registered ops (scan the rule sources), and the examples
    set no attribute the op does not declare (the declared set documents the op)."""
    import re

    emitted = set()
    for rule in set(intops.RULES.values()):
        emitted |= set(re.findall(r'emit\("([a-z_]+)"', inspect.getsource(inspect.getmodule(rule))))
    assert emitted <= set(intops.REGISTRY), emitted - set(intops.REGISTRY)
    for name, op in intops.REGISTRY.items():
        for ex in op.examples(np.random.default_rng(0)):
            extra = set(ex.attrs) - set(op.attrs)
            assert not extra, f"{name}: example attributes {extra} are not declared"


def _values(rng, dtype, shape, kind, lohi=None):
    if dtype.startswith("float"):
        if kind == "random":
            return (rng.standard_normal(shape) * 3.0).astype(dtype)
        if kind == "mix":  # beyond the clamp both ways, and exact half steps
            return rng.choice(np.array([-1e4, 1e4, 0.0, 0.5, -2.5, 1e-30], dtype), size=shape)
        return np.full(shape, -1e4 if kind == "min" else 1e4, dtype)
    lo, hi = lohi or INT_RANGES[dtype]
    if kind == "random":
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    if kind == "mix":
        return rng.choice(np.array([lo, hi, 0, lo + 1, hi - 1], dtype=np.int64), size=shape).astype(dtype)
    return np.full(shape, lo if kind == "min" else hi, dtype)


def _graph(name, examples):
    g = Graph(nodes=[], inputs=[], outputs=[], shapes={}, dtypes={}, name=name)
    for k, ex in enumerate(examples):
        ins = []
        for j, (dt, shape) in enumerate(ex.inputs):
            t = f"x{k}_{j}"
            g.inputs.append(t)
            g.shapes[t], g.dtypes[t] = tuple(shape), dt
            ins.append(t)
        out = f"y{k}"
        g.nodes.append(Node(name, f"{name}{k}", ins, [out], dict(ex.attrs)))
        args = [np.zeros(s, d) for d, s in ex.inputs]
        g.shapes[out] = tuple(intops.get(name).reference(*args, ex.attrs).shape)
        g.dtypes[out] = ex.out_dtype
        g.outputs.append(out)
    return g


@pytest.mark.parametrize("name", OPS)
def test_tvm_equals_reference(name):
    from passes.overflow import check_overflow
    from qcompiler.lowering.build import build
    from qcompiler.targets import parse_target
    from tests.helpers import run_tvm

    rng = np.random.default_rng(sum(map(ord, name)))
    examples = intops.get(name).examples(rng)
    g = _graph(name, examples)
    check_overflow(g)  # every example is provably safe (its bounds hold over the whole dtype range)
    res = build(g, parse_target("cpu").tvm_target())
    for kind in ("random", "min", "max", "mix"):
        feeds = {}
        for k, ex in enumerate(examples):
            for j, (dt, shape) in enumerate(ex.inputs):
                kk = kind
                if kind in ("min", "max") and not ex.extreme:
                    kk = "mix"
                if kind in ("min", "max") and j % 2 == 1:  # binary ops: the other operand at the other end
                    kk = {"min": "max", "max": "min"}[kind]
                feeds[f"x{k}_{j}"] = _values(rng, dt, shape, kk, ex.ranges.get(j))
        ref = reference.execute(g, feeds)
        tv = run_tvm(res.executable, g, feeds)
        for k, out in enumerate(g.outputs):
            r, t = ref[out], tv[out]
            assert t.shape == r.shape and t.dtype == r.dtype, (name, k, kind, t.shape, r.shape, t.dtype, r.dtype)
            bad = np.flatnonzero(t != r)
            assert bad.size == 0, (f"{name} example {k}, {kind} inputs: TVM differs from the reference at {bad.size} "
                                   f"of {r.size}, e.g. {t.ravel()[bad[:4]]} vs {r.ravel()[bad[:4]]}")


@pytest.mark.parametrize("op", ["softmax", "gelu"])
def test_degenerate_input_scale_fails_the_overflow_proof(op):
    """A huge input scale (corrupt weights) asks for a grid shift u that no int64 holds; the
    op's bound refuses it in one line instead of TVM failing on a shift amount >= 64."""
    from passes.overflow import check_overflow
    from qcompiler.errors import QuantizationError
    from qcompiler.intops.nonlinear import gelu_constants
    from qcompiler.intops.softmax import softmax_constants

    if op == "softmax":
        a = dict(softmax_constants(4.4e25, "iexp"), axis=1, ob=8, lo=0, hi=255, dtype="uint8")
    else:
        a = gelu_constants(1e-30, "int8", "igelu", 0.04, -128, 127, "int8")
    g = Graph([Node(op, "n0", ["x"], ["y"], a)], ["x"], ["y"], {"x": (2, 5), "y": (2, 5)},
              {"x": "int8", "y": a["dtype"]})
    with pytest.raises(QuantizationError, match="n0") as err:
        check_overflow(g)
    assert "\n" not in str(err.value)
