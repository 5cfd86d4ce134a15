"""Arithmetic on integer data: ONNX int tensors (token ids, lengths, widths, indices) computed exactly.

A float op with integer inputs and outputs (an ``int64`` width plus an offset, ``Mod`` of a
position, the index arithmetic of a greedy CTC decoder) is not quantized: its values are exact
integers at scale 1, so it becomes one ``int_arith`` op with ONNX's integer semantics, in the
output's own dtype (wrapping on overflow as onnxruntime's does):

  add, sub, mul       a + b, a - b, a * b
  div                 a / b truncated toward zero (ONNX integer Div); b == 0 is undefined in ONNX
                      and gives 0 here
  mod (fmod = 0)      a - floor(a / b) * b (the sign of b);  fmod = 1: a - trunc(a / b) * b
  max, min, neg, abs
  cast                x in another integer dtype (bool -> 0 / 1; narrowing wraps, as ONNX's Cast)
  where               c ? a : b (c bool or integer, nonzero = true)
  clip                min(max(x, lo), hi)
Constant operands are integer constants of the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax

from qcompiler.lowering.relax_lower import Value, const

from .registry import Example, IntOp, register

if TYPE_CHECKING:
    from passes.quantize import Quantizer

INT_OPS = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Mod": "mod", "Max": "max", "Min": "min",
           "Neg": "neg", "Abs": "abs", "Cast": "cast", "Where": "where", "Clip": "clip"}


def _is_int(dt: str) -> bool:
    return dt.startswith("int") or dt.startswith("uint")


def is_int_data(g, n) -> bool:
    """Whether float-graph node ``n`` is integer arithmetic (every input and output an integer tensor)."""
    if n.op not in INT_OPS or not n.outputs or not all(_is_int(g.dtypes.get(o, "")) for o in n.outputs):
        return False
    def dtype(i):
        return str(g.consts[i].dtype) if i in g.consts else g.dtypes.get(i, "")

    ins = [i for i in n.inputs if i]
    if n.op in ("Cast", "Where"):  # a bool source / condition
        return (_is_int(dtype(ins[0])) or dtype(ins[0]) == "bool") and all(_is_int(dtype(i)) for i in ins[1:])
    return all(_is_int(dtype(i)) for i in ins)


def int_data_rule(qz: Quantizer, n) -> None:
    out = n.outputs[0]
    dt = qz.fg.dtypes[out]
    ins = []
    for i in n.inputs:
        if i in qz.fg.consts:
            c = qz.fresh(f"{n.name}/c")
            qz.ig.add_const(c, np.asarray(qz.fg.consts[i]).astype(dt))
            ins.append(c)
        else:
            if qz.iname(i) in qz.ig.qparams:
                from qcompiler.errors import QuantizationError

                raise QuantizationError(f"node '{n.name}' ({n.op}): integer arithmetic on a quantized activation")
            ins.append(qz.iname(i))
    mode = INT_OPS[n.op]
    attrs = {"mode": mode, "dtype": dt}
    if mode == "mod":
        attrs["fmod"] = int(n.attrs.get("fmod", 0))
    if mode == "clip":  # canonical Clip: float bounds (+-inf: none)
        info = np.iinfo(dt)
        lo, hi = float(n.attrs.get("min", -np.inf)), float(n.attrs.get("max", np.inf))
        attrs["lo"] = int(max(info.min, np.ceil(lo))) if np.isfinite(lo) else int(info.min)
        attrs["hi"] = int(min(info.max, np.floor(hi))) if np.isfinite(hi) else int(info.max)
    qz.emit("int_arith", ins, out, attrs, dt, qz.fg.shape(out), None, out, node_name=n.name)


def _trunc_div(a, b):
    q = np.floor_divide(a, np.where(b == 0, 1, b))
    q = q + ((a % np.where(b == 0, 1, b) != 0) & ((a < 0) != (b < 0)))
    return np.where(b == 0, 0, q)


@register
class IntArithOp(IntOp):
    """Integer arithmetic of the module docstring, in ``dtype`` (wrapping as onnxruntime's).  No
    quantization step to bound: the values are the model's own integers."""
    name = "int_arith"
    attrs = {"mode": "add | sub | mul | div | mod | max | min | neg | abs | cast | where | clip",
             "lo": "clip: minimum", "hi": "clip: maximum", "fmod": "mod: 1 = the sign of a",
             "dtype": "output integer dtype"}

    @staticmethod
    def reference(*xs):
        *xs, a = xs
        dt = a["dtype"]
        x = [np.asarray(v).astype(dt) for v in xs]
        m = a["mode"]
        if m == "cast":
            return np.asarray(xs[0]).astype(dt)
        if m == "clip":
            return np.clip(np.asarray(xs[0]).astype(dt), a["lo"], a["hi"]).astype(dt)
        if m == "where":
            return np.where(np.asarray(xs[0]) != 0, x[1], x[2]).astype(dt)
        with np.errstate(over="ignore"):
            if m in ("neg", "abs"):
                return (np.negative(x[0]) if m == "neg" else np.abs(x[0])).astype(dt)
            p, q = x
            if m == "div":
                return _trunc_div(p, q).astype(dt)
            if m == "mod":
                r = p - _trunc_div(p, q) * q if a.get("fmod") else p - np.floor_divide(p, np.where(q == 0, 1, q)) * q
                return np.where(q == 0, 0, r).astype(dt)
            f = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[m]
            return f(p, q).astype(dt)

    @staticmethod
    def lower(lw, n, *xs):
        R = relax.op
        a = n.attrs
        dt, m = a["dtype"], a["mode"]
        if m == "where":
            c, x, y = (lw.logical(v) for v in xs)
            cond = lw.emit(R.not_equal(lw.cast(c.expr, "int32"), const(0, "int32")))  # no i1 compares
            e = lw.emit(R.where(cond, lw.cast(x.expr, dt), lw.cast(y.expr, dt)))
            shape = lw.ig.shapes[n.outputs[0]]
            return Value(e, tuple(range(len(shape))), shape, dt)
        if len(xs) == 1:
            x = xs[0]
            e = lw.cast(x.expr, dt)
            if m == "clip":
                e = lw.emit(R.clip(e, int(a["lo"]), int(a["hi"])))
            elif m != "cast":
                e = lw.emit(R.negative(e) if m == "neg" else R.abs(e))
            return Value(e, x.perm, x.shape, dt)
        x, y = lw.same_perm(*xs)
        ref = x if x.rank >= y.rank else y
        p, q = lw.cast(x.expr, dt), lw.cast(y.expr, dt)
        if m in ("div", "mod"):
            zero, one = const(0, dt), const(1, dt)
            qz = lw.emit(R.equal(q, zero))
            qs = lw.emit(R.where(qz, lw.emit(R.add(lw.emit(R.multiply(q, zero)), one)), q))   # b == 0 -> 1
            fq = lw.emit(R.floor_divide(p, qs))
            fr = lw.emit(R.subtract(p, lw.emit(R.multiply(fq, qs))))
            if m == "div" or a.get("fmod"):
                sa, sb = lw.cast(lw.emit(R.less(p, zero)), "int32"), lw.cast(lw.emit(R.less(qs, zero)), "int32")
                adj = lw.emit(R.logical_and(lw.emit(R.not_equal(fr, zero)), lw.emit(R.not_equal(sa, sb))))  # no i1 compares
                tq = lw.emit(R.add(fq, lw.cast(adj, dt)))
                e = tq if m == "div" else lw.emit(R.subtract(p, lw.emit(R.multiply(tq, qs))))
            else:
                e = fr
            e = lw.emit(R.where(qz, lw.emit(R.multiply(e, zero)), e))
        else:
            f = {"add": R.add, "sub": R.subtract, "mul": R.multiply, "max": R.maximum, "min": R.minimum}[m]
            e = lw.emit(f(p, q))
        return lw.out_value(n, e, ref)

    @staticmethod
    def bound(ctx, n, *ins):
        return None

    @staticmethod
    def examples(rng):
        r = {0: (-50, 50), 1: (-7, 7)}
        out = [Example([("int64", (3, 5)), ("int64", (3, 5))], {"mode": m, "dtype": "int64", "fmod": f}, "int64",
                       ranges=r, extreme=False)
               for m, f in (("add", 0), ("sub", 0), ("mul", 0), ("div", 0), ("mod", 0), ("mod", 1), ("max", 0))]
        out.append(Example([("int32", (4,))], {"mode": "neg", "dtype": "int32"}, "int32", ranges={0: (-9, 9)},
                           extreme=False))
        out.append(Example([("int64", (2, 5))], {"mode": "cast", "dtype": "int32"}, "int32", ranges={0: (-99, 99)}))
        out.append(Example([("int64", (3, 4))], {"mode": "clip", "dtype": "int64", "lo": -5, "hi": 7}, "int64"))
        out.append(Example([("uint8", (2, 5)), ("int64", (2, 5)), ("int64", (1, 5))], {"mode": "where", "dtype": "int64"},
                           "int64", ranges={0: (0, 1)}))
        return out
