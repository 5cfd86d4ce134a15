"""Selections and comparisons: Max/Min of two activations, Equal/Less/Greater(/OrEqual), Not/And/
Or/Xor, Where; quantization rules and integer ops.

Max(a, b) / Min(a, b)  (``minmax`` op) both operands requantized to the output scale with one shared
      shift, selected, rounded once:  y = clip((sel(a*ma, b*mb) + 2^(s-1)) >> s, lo, hi),
      ma/2^s = S_a/S_y, mb/2^s = S_b/S_y; the rounding is monotone, so max/min commute with it.
      Constant operands were folded into the clamp by ``passes/canonicalize.py``.
Comparisons  (``compare`` op) on real values a*S_a against b*S_b: both sides scaled to a common
      grid (ma : mb = S_a : S_b, one shared shift, no rounding after the multiply), compared in
      int64:  y = uint8(cmp(a*ma, b*mb)).  Integer data (token ids, masks) has scale 1.  A constant
      operand c (any broadcastable shape) becomes the int64 constant round(c * 2^s / S_a) with mb = 1
      (ma = 1 and c itself for integer data).  Equal of two
      tensors on one scale is exact (ma == mb); of different scales it is equality of the real
      values up to the multipliers' 2^-31 relative error.
Logic  (``logic`` op) on uint8 0/1:  Not = 1 - x, And = min, Or = max, Xor = (a != b).
Where(c, a, b)  (``where`` op)  y = clip((c ? a*ma : b*mb) + 2^(s-1)) >> s) at the output scale.  A
      constant branch (a scalar or a tensor) is quantized at the output scale; a constant far outside the other branch's
      calibrated range (|c| > 2 max|x|, e.g. masked_fill(-inf) or -1e9) would swamp the output's
      range, so the output takes that branch's scale and the constant saturates to the dtype's
      end (qmin or qmax) instead.
Bounds: |a| * |ma| + |b| * |mb| + 2^(s-1) < 2^63.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax

from qcompiler.lowering.relax_lower import Value, const
from qcompiler.qtypes import dyadic_common

from .registry import I64, Example, IntOp, float_ref, mag, register, rule

if TYPE_CHECKING:
    from passes.quantize import Quantizer

CMP = {"Equal": "eq", "Less": "lt", "Greater": "gt", "LessOrEqual": "le", "GreaterOrEqual": "ge"}
_NP_CMP = {"eq": np.equal, "lt": np.less, "gt": np.greater, "le": np.less_equal, "ge": np.greater_equal}
_RX_CMP = {"eq": relax.op.equal, "lt": relax.op.less, "gt": relax.op.greater, "le": relax.op.less_equal,
           "ge": relax.op.greater_equal}
LOGIC = {"Not": "not", "And": "and", "Or": "or", "Xor": "xor"}


def _scale(qz: Quantizer, t: str) -> float:
    """The real value of one integer step of operand ``t`` (1 for integer data)."""
    qp = qz.ig.qparams.get(qz.iname(t))
    return qp.scale if qp is not None else 1.0


def _const_operand(qz: Quantizer, n, name: str, value: float, dtype: str) -> str:
    """An integer graph constant holding ``value`` (already on the integer grid)."""
    c = qz.fresh(f"{n.name}/{name}")
    qz.ig.add_const(c, np.asarray(value, dtype))
    return c


def _act(y, n):
    a = n.attrs.get("act")
    return np.clip(y, a[0], a[1]) if a is not None else y


# ---- Max / Min -----------------------------------------------------------------------------------
@rule("Max", "Min")
def minmax(qz: Quantizer, n):
    a, b = n.inputs
    out = n.outputs[0]
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    (ma, mb), s = dyadic_common([qz.qp(a).scale / qy.scale, qz.qp(b).scale / qy.scale], f"node '{n.name}'")
    qz.emit("minmax", [qz.iname(a), qz.iname(b)], out,
            {"mode": n.op.lower(), "mult_a": ma, "mult_b": mb, "shift": s, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@float_ref("Max", "Min")
def _minmax_f(x, n):
    return _act((np.maximum if n.op == "Max" else np.minimum)(x[0], x[1]), n)


def _two_branch_bound(ctx, n, x, y, what):
    a = n.attrs
    b = (mag(x) * float(np.abs(a["mult_a"]).max()) + mag(y) * float(np.abs(a["mult_b"]).max())
         + 2.0 ** (np.max(a["shift"]) - 1))
    if b > I64:
        ctx.fail(n, what, b, I64)


def _rq_branches(lw, n, x, y):
    a = n.attrs
    x, y = lw.same_perm(x, y)
    ref = x if x.rank >= y.rank else y
    tx = lw.emit(relax.op.multiply(lw.cast(x.expr, "int64"), lw.c(a["mult_a"], "int64", ref)))
    ty = lw.emit(relax.op.multiply(lw.cast(y.expr, "int64"), lw.c(a["mult_b"], "int64", ref)))
    return tx, ty, ref


def _finish(lw, n, t, ref):
    a = n.attrs
    shift = np.asarray(a["shift"], np.int64)
    t = lw.emit(relax.op.add(t, lw.c(np.left_shift(np.int64(1), shift - 1), "int64", ref)))
    t = lw.emit(relax.op.right_shift(t, lw.c(shift, "int64", ref)))
    t = lw.emit(relax.op.clip(t, int(a["lo"]), int(a["hi"])))
    return lw.out_value(n, lw.cast(t, a["dtype"]), ref)


def _finish_ref(t, a):
    s = np.asarray(a["shift"], np.int64)
    return np.clip((t + (np.int64(1) << (s - 1))) >> s, a["lo"], a["hi"]).astype(a["dtype"])


@register
class MinMaxOp(IntOp):
    """y = clip((sel(int64(a) * mult_a, int64(b) * mult_b) + 2^(shift-1)) >> shift, lo, hi), sel =
    max or min (a and b broadcast).  Bound: |a| |mult_a| + |b| |mult_b| + 2^(shift-1) < 2^63."""
    name = "minmax"
    attrs = {"mode": "max | min", "mult_a": "int64 multiplier of a", "mult_b": "int64 multiplier of b",
             "shift": "shared shift", "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, y, a):
        f = np.maximum if a["mode"] == "max" else np.minimum
        return _finish_ref(f(x.astype(np.int64) * a["mult_a"], y.astype(np.int64) * a["mult_b"]), a)

    @staticmethod
    def lower(lw, n, x, y):
        tx, ty, ref = _rq_branches(lw, n, x, y)
        f = relax.op.maximum if n.attrs["mode"] == "max" else relax.op.minimum
        return _finish(lw, n, lw.emit(f(tx, ty)), ref)

    @staticmethod
    def bound(ctx, n, x, y):
        _two_branch_bound(ctx, n, x, y, "the int64 requantized operands")

    @staticmethod
    def examples(rng):
        (ma, mb), s = dyadic_common([0.9, 0.2], "example")
        return [Example([("int8", (2, 3, 5)), ("int8", (2, 3, 5))],
                        {"mode": "max", "mult_a": ma, "mult_b": mb, "shift": s, "lo": -128, "hi": 127, "dtype": "int8"},
                        "int8"),
                Example([("int16", (4, 6)), ("uint8", (1, 6))],
                        {"mode": "min", "mult_a": ma, "mult_b": mb, "shift": s, "lo": -20, "hi": 127, "dtype": "int8"},
                        "int8")]


# ---- comparisons ---------------------------------------------------------------------------------
def _cmp_check(g, n):
    if all(i in g.consts for i in n.inputs):
        return "constant operands"
    return None


@rule(*CMP, check=_cmp_check)
def compare(qz: Quantizer, n):
    a, b = n.inputs
    out = n.outputs[0]
    consts = qz.fg.consts
    if a in consts:  # c OP x  ==  x OP' c
        a, b = b, a
        mode = {"lt": "gt", "gt": "lt", "le": "ge", "ge": "le", "eq": "eq"}[CMP[n.op]]
    else:
        mode = CMP[n.op]
    sa = _scale(qz, a)
    if b in consts:
        integer_data = qz.iname(a) not in qz.ig.qparams
        ma = np.int64(1) if integer_data else dyadic_common([1.0], f"node '{n.name}'")[0][0]
        with np.errstate(all="ignore"):
            C = np.asarray(consts[b], np.float64) / sa * float(np.asarray(ma))
        C = np.where(np.isnan(C), 0.0, np.clip(C, -2.0**62, 2.0**62))
        if mode == "eq":
            C = np.where(C == np.round(C), C, 2.0**62)  # no integer of a equals such a constant
        bi, mb = _const_operand(qz, n, "c", np.round(C).astype(np.int64), "int64"), np.int64(1)
    else:
        sb = _scale(qz, b)
        if qz.iname(a) not in qz.ig.qparams and qz.iname(b) not in qz.ig.qparams:
            ma = mb = np.int64(1)  # two integer data tensors: compared as they are
        else:
            ref = max(sa, sb)
            (ma, mb), s = dyadic_common([sa / ref, sb / ref], f"node '{n.name}'")
        bi = qz.iname(b)
    qz.emit("compare", [qz.iname(a), bi], out, {"mode": mode, "mult_a": ma, "mult_b": mb},
            "uint8", qz.fg.shape(out), None, out, node_name=n.name)


@float_ref(*CMP)
def _compare_f(x, n):
    return _NP_CMP[CMP[n.op]](x[0], x[1]).astype(np.float64)


@register
class CompareOp(IntOp):
    """y = uint8(cmp(int64(a) * mult_a, int64(b) * mult_b)), cmp in eq/lt/gt/le/ge (1 = true).
    Bound: |a| |mult_a| < 2^63 and |b| |mult_b| < 2^63 (a multiplier of 1 cannot overflow)."""
    name = "compare"
    attrs = {"mode": "eq | lt | gt | le | ge", "mult_a": "int64 multiplier of a", "mult_b": "int64 multiplier of b"}

    @staticmethod
    def reference(x, y, a):
        return _NP_CMP[a["mode"]](x.astype(np.int64) * a["mult_a"], y.astype(np.int64) * a["mult_b"]).astype(np.uint8)

    @staticmethod
    def lower(lw, n, x, y):
        tx, ty, ref = _rq_branches(lw, n, x, y)
        e = lw.cast(lw.emit(_RX_CMP[n.attrs["mode"]](tx, ty)), "uint8")
        return Value(e, lw.out_value(n, e, ref).perm, lw.ig.shapes[n.outputs[0]], "uint8")

    @staticmethod
    def bound(ctx, n, x, y):
        for v, m in ((x, n.attrs["mult_a"]), (y, n.attrs["mult_b"])):
            if np.abs(m).max() > 1 and mag(v) * float(np.abs(m).max()) > I64:  # x * 1 cannot overflow
                ctx.fail(n, "the int64 scaled operand", mag(v) * float(np.abs(m).max()), I64)
        return (0, 1)

    @staticmethod
    def examples(rng):
        (ma, mb), _ = dyadic_common([1.0, 0.37], "example")
        return [Example([("int8", (2, 3, 5)), ("int8", (2, 3, 5))], {"mode": m, "mult_a": ma, "mult_b": mb}, "uint8")
                for m in ("lt", "ge")] + \
               [Example([("int8", (3, 4)), ("int8", (3, 4))], {"mode": "eq", "mult_a": ma, "mult_b": ma}, "uint8"),
                Example([("int64", (2, 7)), ("int64", (1,))], {"mode": "eq", "mult_a": np.int64(1), "mult_b": np.int64(1)},
                        "uint8", ranges={0: (-3, 3), 1: (0, 0)})]


# ---- logic ---------------------------------------------------------------------------------------
@rule(*LOGIC)
def logic(qz: Quantizer, n):
    out = n.outputs[0]
    ins = [_const_operand(qz, n, "c", (np.asarray(qz.fg.consts[i]) != 0).astype(np.uint8), "uint8")
           if i in qz.fg.consts else qz.iname(i) for i in n.inputs]
    qz.emit("logic", ins, out, {"mode": LOGIC[n.op]}, "uint8", qz.fg.shape(out), None, out, node_name=n.name)


@float_ref(*LOGIC)
def _logic_f(x, n):
    b = [np.asarray(v) != 0 for v in x]
    f = {"Not": lambda: ~b[0], "And": lambda: b[0] & b[1], "Or": lambda: b[0] | b[1], "Xor": lambda: b[0] ^ b[1]}
    return f[n.op]().astype(np.float64)


@register
class LogicOp(IntOp):
    """Boolean logic on uint8 0/1 (nonzero = true): not = (x == 0), and, or, xor; output uint8 0/1."""
    name = "logic"
    attrs = {"mode": "not | and | or | xor"}

    @staticmethod
    def reference(*xs):
        *xs, a = xs
        b = [x != 0 for x in xs]
        r = {"not": lambda: ~b[0], "and": lambda: b[0] & b[1], "or": lambda: b[0] | b[1],
             "xor": lambda: b[0] ^ b[1]}[a["mode"]]()
        return r.astype(np.uint8)

    @staticmethod
    def lower(lw, n, *xs):
        R = relax.op
        mode = n.attrs["mode"]
        def i32(v):  # compares on bool tensors do not compile (LLVM fcmp on i1): widen first
            return lw.cast(v.expr, "int32")

        if mode == "not":
            e = lw.emit(R.equal(i32(xs[0]), const(0, "int32")))
            return Value(lw.cast(e, "uint8"), xs[0].perm, xs[0].shape, "uint8")
        x, y = lw.same_perm(*xs)
        bx = lw.emit(R.not_equal(i32(x), const(0, "int32")))
        by = lw.emit(R.not_equal(i32(y), const(0, "int32")))
        f = {"and": R.logical_and, "or": R.logical_or, "xor": R.logical_xor}[mode]
        return lw.out_value(n, lw.cast(lw.emit(f(bx, by)), "uint8"), x if x.rank >= y.rank else y)

    @staticmethod
    def bound(ctx, n, *ins):
        return (0, 1)

    @staticmethod
    def examples(rng):
        r = {0: (0, 1), 1: (0, 1)}
        return [Example([("uint8", (3, 5))], {"mode": "not"}, "uint8", ranges=r)] + \
               [Example([("uint8", (3, 5)), ("uint8", (1, 5))], {"mode": m}, "uint8", ranges=r)
                for m in ("and", "or", "xor")]


# ---- where ---------------------------------------------------------------------------------------
def _where_check(g, n):
    if n.inputs[0] in g.consts:
        return "a constant condition"
    return None


@rule("Where", check=_where_check)
def where(qz: Quantizer, n):
    c, a, b = n.inputs
    out = n.outputs[0]
    consts = qz.fg.consts
    acts = [t for t in (a, b) if t not in consts]
    val = {t: np.asarray(consts[t], np.float64) for t in (a, b) if t in consts}
    far = []
    if len(acts) == 1:  # both constant: the output's calibrated scale holds both
        span = max(abs(qz.stats[acts[0]].lo), abs(qz.stats[acts[0]].hi), 1e-30)
        far = [t for t, v in val.items() if not np.all(np.isfinite(v)) or np.abs(v).max() > 2 * span]
    qy = qz.qp(acts[0]) if far and len(acts) == 1 else qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    ins, mults = [], []
    for t in (a, b):
        if t in consts:
            with np.errstate(invalid="ignore"):
                q = np.clip(np.where(np.isfinite(val[t]), np.round(val[t] / qy.scale), np.sign(val[t]) * np.inf),
                            qy.qmin, qy.qmax)
            ins.append(_const_operand(qz, n, "branch", q, qy.dtype))
            mults.append(1.0)
        else:
            ins.append(qz.iname(t))
            mults.append(qz.qp(t).scale / qy.scale)
    (ma, mb), s = dyadic_common(mults, f"node '{n.name}'")
    qz.emit("where", [qz.iname(c)] + ins, out,
            {"mult_a": ma, "mult_b": mb, "shift": s, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@float_ref("Where")
def _where_f(x, n):
    return _act(np.where(np.asarray(x[0]) != 0, x[1], x[2]).astype(np.float64), n)


@register
class WhereOp(IntOp):
    """y = clip(((c != 0 ? int64(a) * mult_a : int64(b) * mult_b) + 2^(shift-1)) >> shift, lo, hi)
    (c, a, b broadcast).  Bound: max(|a| |mult_a|, |b| |mult_b|) + 2^(shift-1) < 2^63."""
    name = "where"
    attrs = {"mult_a": "int64 multiplier of a", "mult_b": "int64 multiplier of b", "shift": "shared shift",
             "lo": "clamp minimum", "hi": "clamp maximum", "dtype": "output integer dtype"}

    @staticmethod
    def reference(c, x, y, a):
        t = np.where(c != 0, x.astype(np.int64) * a["mult_a"], y.astype(np.int64) * a["mult_b"])
        return _finish_ref(t, a)

    @staticmethod
    def lower(lw, n, c, x, y):
        if not (c.rank == x.rank == y.rank and c.perm == x.perm == y.perm):
            c, x, y = lw.logical(c), lw.logical(x), lw.logical(y)
        tx, ty, ref = _rq_branches(lw, n, x, y)
        if c.rank > ref.rank:
            ref = c
        cond = lw.emit(relax.op.not_equal(lw.cast(c.expr, "int32"), const(0, "int32")))  # bool: see LogicOp
        return _finish(lw, n, lw.emit(relax.op.where(cond, tx, ty)), ref)

    @staticmethod
    def bound(ctx, n, c, x, y):
        _two_branch_bound(ctx, n, x, y, "the int64 requantized branches")

    @staticmethod
    def examples(rng):
        (ma, mb), s = dyadic_common([0.7, 1.3], "example")
        a = {"mult_a": ma, "mult_b": mb, "shift": s, "lo": -128, "hi": 127, "dtype": "int8"}
        return [Example([("uint8", (2, 3, 5)), ("int8", (2, 3, 5)), ("int8", (2, 3, 5))], a, "int8", ranges={0: (0, 1)}),
                Example([("uint8", (2, 1, 5)), ("int16", (2, 4, 5)), ("int8", (1,))], a, "int8", ranges={0: (0, 1)})]
