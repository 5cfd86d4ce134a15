"""The op contracts: one ``IntOp`` class per integer op, one quantization rule per float op type.

An integer op (the ops of the integer graph that ``passes/quantize.py`` emits) is declared once,
by a subclass of ``IntOp`` decorated with ``@register``, with everything the compiler needs of it
side by side:

  name        the op type in the integer graph (``Node.op``)
  attrs       attribute name -> meaning (the docstring of the attribute set; checked by the tests)
  reference   ``reference(*inputs, attrs) -> ndarray``: the exact semantics in NumPy int64; the
              executor ``qcompiler.reference.execute`` runs it and every lowering must equal it
  lower       ``lower(lw, node, *values) -> Value``: Relax through the BlockBuilder of
              ``qcompiler.lowering.relax_lower.Lowering`` (passed as ``lw``), step for step the
              reference's arithmetic
  bound       ``bound(ctx, node, *intervals) -> interval | None``: the overflow proof by interval
              arithmetic (``passes/overflow.py`` walks the graph); ``ctx.fail(...)`` on a bound
              that cannot be proven; returns the output interval, or None for "the output dtype's
              range clamped by the node's lo/hi attributes"
  examples    ``examples(rng) -> [Example]``: small instances (inputs and attributes) on which the
              contract test builds the op alone and compares TVM with the reference bit for bit,
              on random and on extreme (dtype min/max) inputs (``tests/test_intops.py``)

Float op types (the canonical ONNX-level ops after ``passes/canonicalize.py``) register their
quantization rule with ``@rule("Op", check=...)``: the rule emits integer ops through the
``Quantizer`` (``passes/quantize.py``), ``check`` reports what the rule cannot take before any
work is done; ``@float_ref("Op")`` gives the float op's own semantics (float64), which the float
passes are checked with.  This is what TVM does with ``register_op_attr`` (``FLegalize`` beside the op) and
ONNX Runtime's quantizer with its registry of one operator class per op type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REGISTRY: dict[str, type[IntOp]] = {}

Rule = Callable[[Any, Any], None]          # (Quantizer, float Node) -> None
Check = Callable[[Any, Any], "str | None"]  # (float Graph, float Node) -> why not, or None
RULES: dict[str, Rule] = {}
CHECKS: dict[str, Check] = {}
FloatRef = Callable[[list, Any], Any]      # (input arrays, float Node) -> float64 array
FLOAT_REFS: dict[str, FloatRef] = {}


@dataclass
class Example:
    """One instance of an op for the contract test: integer inputs (dtype, shape) and attributes.

    ``ranges`` optionally narrows an input's values (e.g. a positive divisor); ``extreme`` says
    whether the dtype's min/max may be fed (False where the op's precondition excludes them)."""
    inputs: list[tuple[str, tuple[int, ...]]]
    attrs: dict[str, Any]
    out_dtype: str
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    extreme: bool = True


class IntOp:
    """Base class of an integer op contract (see the module docstring); subclasses override all."""

    name: str = ""
    attrs: dict[str, str] = {}

    @staticmethod
    def reference(*args):
        raise NotImplementedError

    @staticmethod
    def lower(lw, n, *values):
        raise NotImplementedError

    @staticmethod
    def bound(ctx, n, *ins):
        return None

    @staticmethod
    def examples(rng: np.random.Generator) -> list[Example]:
        raise NotImplementedError


def register(cls: type[IntOp]) -> type[IntOp]:
    if not cls.name:
        raise TypeError(f"{cls.__name__}: an IntOp needs a name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"integer op '{cls.name}' registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__})")
    REGISTRY[cls.name] = cls
    return cls


def rule(*ops: str, check: Check | None = None):
    """Register the quantization rule of float op types ``ops`` (and their support check)."""
    def deco(f: Rule) -> Rule:
        for o in ops:
            RULES[o] = f
            if check is not None:
                CHECKS[o] = check
        return f
    return deco


def float_ref(*ops: str):
    """Register the float64 semantics of canonical float op types (``qcompiler/float_reference.py``
    runs them to check the float passes against onnxruntime)."""
    def deco(f: FloatRef) -> FloatRef:
        for o in ops:
            FLOAT_REFS[o] = f
        return f
    return deco


def get(name: str) -> type[IntOp]:
    op = REGISTRY.get(name)
    if op is None:
        raise KeyError(f"no integer op '{name}' is registered (qcompiler/intops/)")
    return op


# ---- interval helpers of the overflow proofs ---------------------------------------------------
I32 = 2**31 - 1
I64 = 2**63 - 1


def mag(iv) -> float:
    """Largest magnitude in an interval."""
    return max(abs(iv[0]), abs(iv[1]))


def dyadic_bound(acc: float, a: dict, mk: str = "mult") -> float:
    """Bound of |acc * mult + add + 2^(shift-1)| for the dyadic step with attributes ``a``."""
    m = np.abs(np.asarray(a[mk], dtype=np.float64)).max()
    s = np.asarray(a["shift"]).max()
    add = np.abs(np.asarray(a["add"], dtype=np.float64)).max() if a.get("add") is not None else 0.0
    return acc * m + add + 2.0 ** (s - 1)


def check_requant(ctx, n, acc: float, a: dict, mk: str = "mult") -> None:
    """The int64 dyadic step of an accumulator bounded by ``acc`` cannot overflow."""
    b = dyadic_bound(acc, a, mk)
    if b > I64:
        ctx.fail(n, "the int64 requantization product", b, I64)
