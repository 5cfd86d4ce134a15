"""Compile-time overflow bounds for every integer op (interval arithmetic over the integer graph).

Each tensor gets an interval [lo, hi] (from its dtype, tightened by clamps).  Each op proves its
own bounds: the ``bound`` of its contract in ``qcompiler/intops/`` (int32 accumulators of the
GEMMs, int64 dyadic steps, window and reduction sums, LayerNorm's variance, GELU's products, ...)
receives the input intervals and returns the output interval (None: the output dtype's range,
narrowed by the node's ``lo``/``hi`` clamp).  A violated bound fails compilation with the node's
name (no silent wrap-around).
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler import intops
from qcompiler.errors import QuantizationError
from qcompiler.graph import Graph
from qcompiler.qtypes import int_range

_INT = ("int8", "uint8", "int16", "uint16", "int32", "int64")


def _dtype_range(dt: str) -> tuple[int, int]:
    return int_range(dt) if dt in _INT else (0, 0)


@dataclass
class BoundContext:
    """What an op's ``bound`` may consult: tensor shapes and dtypes, and ``fail``."""
    shapes: dict
    dtypes: dict

    @staticmethod
    def fail(n, what: str, value: float, limit: float):
        raise QuantizationError(f"overflow at node '{n.name}' ({n.op}): {what} can reach {value:.3g} > {limit:.3g}; "
                                "the model's ranges are too wide for 8-bit arithmetic here")


def check_overflow(ig: Graph) -> dict[str, tuple[int, int]]:
    """Returns each tensor's interval; raises QuantizationError at the first unprovable bound."""
    ctx = BoundContext(ig.shapes, ig.dtypes)
    iv: dict[str, tuple[int, int]] = {t: _dtype_range(ig.dtypes[t]) for t in ig.inputs}
    for n in ig.nodes:
        ins = [iv.get(i, _dtype_range(ig.dtypes[i])) for i in n.inputs]
        out = intops.get(n.op).bound(ctx, n, *ins)
        if out is None:
            a = n.attrs
            out = (int(a["lo"]), int(a["hi"])) if "lo" in a and "hi" in a else _dtype_range(ig.dtypes[n.outputs[0]])
        iv[n.outputs[0]] = out
    return iv
