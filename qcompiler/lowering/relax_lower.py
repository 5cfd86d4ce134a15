"""Lower the integer graph to a Relax module with a BlockBuilder.

Each integer op of ``qcompiler.reference`` becomes Relax ops (legalized and fused later) or a
``call_tir`` to one of our scheduled kernels (``qcompiler.lowering.gemm``); the arithmetic is the
reference's, step for step, so the built library equals the NumPy executor bit for bit:

  requant   t = int64(x) * mult (+ add) + 2^(shift-1);  y = clip(t >> shift, lo, hi) -> dtype
  add       t = int64(a) * mult_a + int64(b) * mult_b + 2^(shift-1);  y = clip(t >> shift)
  quantize  y = clip(round(x * inv_scale), lo, hi)  (float32 multiply, round half to even)
  dequantize y = float32(q) * scale
Tensors carry a physical layout (``layout.py``): convolutions run NHWC, Transposes are free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx

from qcompiler.graph import Graph, Node

from . import layout as L
from .lower_nonlinear import NonlinearOps


def const(arr, dtype: str) -> relax.Expr:
    return relax.const(np.asarray(arr, dtype=dtype), dtype)


@dataclass
class Value:
    expr: relax.Expr
    perm: tuple[int, ...]
    shape: tuple[int, ...]   # logical
    dtype: str

    @property
    def rank(self) -> int:
        return len(self.shape)


class Lowering(NonlinearOps):
    """Builds ``main`` over the integer graph.  ``gemm`` provides the conv/dense lowering."""

    def __init__(self, ig: Graph, target: tvm.target.Target, gemm):
        self.ig, self.target, self.gemm = ig, target, gemm
        self.bb = relax.BlockBuilder()
        self.env: dict[str, Value] = {}

    # ---- helpers ---------------------------------------------------------------------------
    def emit(self, expr, name: str = "") -> relax.Expr:
        return self.bb.emit(expr, name_hint=_hint(name))

    def to_perm(self, v: Value, want: tuple[int, ...]) -> Value:
        if tuple(v.perm) == tuple(want):
            return v
        if L.is_pure_reshape(v.shape, v.perm, want):
            e = self.emit(relax.op.reshape(v.expr, L.physical_shape(v.shape, want)))
        else:
            e = self.emit(relax.op.permute_dims(v.expr, list(L.move_axes(v.perm, want))))
        return Value(e, tuple(want), v.shape, v.dtype)

    def logical(self, v: Value) -> Value:
        return self.to_perm(v, L.identity(v.rank))

    def cast(self, e, dtype):
        return self.emit(relax.op.astype(e, dtype))

    def c(self, arr, dtype, v: Value) -> relax.Expr:
        """A logical-order broadcast constant laid out for ``v``."""
        return const(L.const_for(np.asarray(arr), v.rank, v.perm), dtype)

    def requant_expr(self, t64, v: Value, mult, shift, add, lo, hi, dtype):
        """clip((t64 * mult + add + 2^(shift-1)) >> shift, lo, hi) -> dtype, with t64 int64."""
        shift = np.asarray(shift, np.int64)
        rnd = np.left_shift(np.int64(1), shift - 1)
        e = self.emit(relax.op.multiply(t64, self.c(mult, "int64", v)))
        if add is not None:
            rnd = rnd + np.asarray(add, np.int64)
        e = self.emit(relax.op.add(e, self.c(rnd, "int64", v)))
        e = self.emit(relax.op.right_shift(e, self.c(shift, "int64", v)))
        e = self.emit(relax.op.clip(e, int(lo), int(hi)))
        return self.cast(e, dtype)

    # ---- driver ----------------------------------------------------------------------------
    def build(self, io_dtypes: dict[str, str] | None = None) -> tvm.IRModule:
        ig = self.ig
        params = []
        for t in ig.inputs:
            var = relax.Var(_hint(t), relax.TensorType(shape=ig.shapes[t], dtype=ig.dtypes[t]))
            params.append(var)
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for t, var in zip(ig.inputs, params):
                    self.env[t] = Value(var, L.identity(len(ig.shapes[t])), ig.shapes[t], ig.dtypes[t])
                for t, arr in ig.consts.items():  # integer constants (e.g. a quantized class token)
                    arr = np.asarray(arr)
                    self.env[t] = Value(const(arr, str(arr.dtype)), L.identity(arr.ndim), tuple(arr.shape), str(arr.dtype))
                for n in ig.nodes:
                    fn = getattr(self, "op_" + n.op)
                    v = fn(n, *[self.env[i] for i in n.inputs])
                    assert tuple(v.shape) == tuple(ig.shapes[n.outputs[0]]), (n, v.shape, ig.shapes[n.outputs[0]])
                    self.env[n.outputs[0]] = v
                outs = [self.logical(self.env[o]).expr for o in ig.outputs]
                res = self.bb.emit_output(relax.Tuple(outs) if len(outs) > 1 else outs[0])
            self.bb.emit_func_output(res)
        return self.bb.get()

    # ---- boundary --------------------------------------------------------------------------
    def op_quantize(self, n: Node, x: Value) -> Value:
        a = n.attrs
        e = self.emit(relax.op.multiply(x.expr, const(a["inv_scale"], "float32")))
        e = self.emit(relax.op.round(e))
        e = self.emit(relax.op.clip(e, int(a["lo"]), int(a["hi"])))
        return Value(self.cast(e, a["dtype"]), x.perm, x.shape, a["dtype"])

    def op_dequantize(self, n: Node, x: Value) -> Value:
        e = self.cast(x.expr, "float32")
        e = self.emit(relax.op.multiply(e, const(n.attrs["scale"], "float32")))
        return Value(e, x.perm, x.shape, "float32")

    # ---- GEMM-like ---------------------------------------------------------------------------
    def op_conv(self, n: Node, x: Value) -> Value:
        x = self.to_perm(x, L.NHWC)
        e = self.gemm.conv(self, n, x.expr, x.dtype, L.physical_shape(x.shape, L.NHWC))
        return Value(e, L.NHWC, self.ig.shapes[n.outputs[0]], n.attrs["dtype"])

    def op_dense(self, n: Node, x: Value) -> Value:
        x = self.logical(x)
        K = x.shape[-1]
        M = int(np.prod(x.shape[:-1]))
        e2 = x.expr if x.rank == 2 else self.emit(relax.op.reshape(x.expr, (M, K)))
        y = self.gemm.dense(self, n, e2, x.dtype, M, K)
        out_shape = self.ig.shapes[n.outputs[0]]
        if len(out_shape) != 2:
            y = self.emit(relax.op.reshape(y, out_shape))
        return Value(y, L.identity(len(out_shape)), out_shape, n.attrs["dtype"])

    def op_matmul(self, n: Node, a: Value, b: Value) -> Value:
        # the GEMM lowering does the whole op (layouts of a / b, accumulation, requantization)
        e = self.gemm.matmul(self, n, a, b)
        shape = self.ig.shapes[n.outputs[0]]
        return Value(e, L.identity(len(shape)), shape, n.attrs["dtype"])

    # ---- elementwise ---------------------------------------------------------------------------
    def _same_perm(self, a: Value, b: Value) -> tuple[Value, Value]:
        if a.rank == b.rank and a.perm != b.perm:
            b = self.to_perm(b, a.perm)
        elif a.rank != b.rank:
            a, b = self.logical(a), self.logical(b)
        return a, b

    def _out_value(self, n, e, ref: Value) -> Value:
        shape = self.ig.shapes[n.outputs[0]]
        perm = ref.perm if len(shape) == ref.rank else L.identity(len(shape))
        return Value(e, perm, shape, n.attrs.get("dtype", ref.dtype))

    def op_requant(self, n: Node, x: Value) -> Value:
        a = n.attrs
        t = self.cast(x.expr, "int64")
        e = self.requant_expr(t, x, a["mult"], a["shift"], a.get("add"), a["lo"], a["hi"], a["dtype"])
        return Value(e, x.perm, x.shape, a["dtype"])

    def op_add(self, n: Node, x: Value, y: Value) -> Value:
        a = n.attrs
        x, y = self._same_perm(x, y)
        ref = x if x.rank >= y.rank else y
        shift = np.asarray(a["shift"], np.int64)
        tx = self.emit(relax.op.multiply(self.cast(x.expr, "int64"), self.c(a["mult_a"], "int64", ref)))
        ty = self.emit(relax.op.multiply(self.cast(y.expr, "int64"), self.c(a["mult_b"], "int64", ref)))
        t = self.emit(relax.op.add(tx, ty))
        t = self.emit(relax.op.add(t, self.c(np.left_shift(np.int64(1), shift - 1), "int64", ref)))
        t = self.emit(relax.op.right_shift(t, self.c(shift, "int64", ref)))
        t = self.emit(relax.op.clip(t, int(a["lo"]), int(a["hi"])))
        return self._out_value(n, self.cast(t, a["dtype"]), ref)

    def op_mul(self, n: Node, x: Value, y: Value) -> Value:
        a = n.attrs
        x, y = self._same_perm(x, y)
        ref = x if x.rank >= y.rank else y
        t = self.emit(relax.op.multiply(self.cast(x.expr, "int64"), self.cast(y.expr, "int64")))
        out = self._out_value(n, t, ref)
        e = self.requant_expr(t, out, a["mult"], a["shift"], None, a["lo"], a["hi"], a["dtype"])
        return Value(e, out.perm, out.shape, a["dtype"])

    def op_clip(self, n: Node, x: Value) -> Value:
        e = self.emit(relax.op.clip(x.expr, int(n.attrs["lo"]), int(n.attrs["hi"])))
        return Value(e, x.perm, x.shape, x.dtype)

    def op_prelu(self, n: Node, x: Value) -> Value:
        a = n.attrs
        t = self.cast(x.expr, "int64")
        neg = self.emit(relax.op.less(t, const(0, "int64")))
        m = self.emit(relax.op.where(neg, self.c(np.broadcast_to(a["mult_neg"], np.broadcast_shapes(
            np.shape(a["mult_neg"]), np.shape(a["mult_pos"]))), "int64", x),
            self.c(np.broadcast_to(a["mult_pos"], np.broadcast_shapes(np.shape(a["mult_neg"]), np.shape(a["mult_pos"]))),
                   "int64", x)))
        shift = np.asarray(a["shift"], np.int64)
        e = self.emit(relax.op.multiply(t, m))
        e = self.emit(relax.op.add(e, self.c(np.left_shift(np.int64(1), shift - 1), "int64", x)))
        e = self.emit(relax.op.right_shift(e, self.c(shift, "int64", x)))
        e = self.emit(relax.op.clip(e, int(a["lo"]), int(a["hi"])))
        return Value(self.cast(e, a["dtype"]), x.perm, x.shape, a["dtype"])

    def op_lut(self, n: Node, x: Value) -> Value:
        a = n.attrs
        idx = self.emit(relax.op.add(self.cast(x.expr, "int32"), const(a["offset"], "int32")))
        e = self.emit(relax.op.take(const(a["table"], a["dtype"]), idx, axis=0))
        return Value(e, x.perm, x.shape, a["dtype"])

    def op_cast(self, n: Node, x: Value) -> Value:
        return Value(self.cast(x.expr, n.attrs["dtype"]), x.perm, x.shape, n.attrs["dtype"])

    def op_int_cast(self, n: Node, x: Value) -> Value:
        a = n.attrs
        e = self.emit(relax.op.clip(self.cast(x.expr, "int64"), int(a["lo"]), int(a["hi"])))
        return Value(self.cast(e, a["dtype"]), x.perm, x.shape, a["dtype"])

    def op_maskadd(self, n: Node, x: Value, m: Value) -> Value:
        a = n.attrs
        x, m = self._same_perm(x, m)
        mm = self.emit(relax.op.clip(self.cast(m.expr, "int64"), -(2**20), 2**20))
        t = self.emit(relax.op.multiply(mm, const(a["A"], "int64")))
        t = self.emit(relax.op.add(self.cast(x.expr, "int64"), t))
        t = self.emit(relax.op.add(t, const(a["B"], "int64")))
        t = self.emit(relax.op.clip(t, int(a["lo"]), int(a["hi"])))
        return self._out_value(n, self.cast(t, a["dtype"]), x)

    def op_embedding(self, n: Node, ids: Value) -> Value:
        t = n.attrs["table"]
        ids = self.logical(ids)
        i = self.emit(relax.op.clip(self.cast(ids.expr, "int64"), 0, int(t.shape[0]) - 1))
        i = self.cast(i, "int32")
        e = self.emit(relax.op.take(const(t, str(t.dtype)), i, axis=0))
        shape = self.ig.shapes[n.outputs[0]]
        return Value(e, L.identity(len(shape)), shape, str(t.dtype))

    def op_div(self, n: Node, x: Value, d: Value) -> Value:
        a = n.attrs
        x, d = self._same_perm(x, d)
        sh = int(a["shift"])
        t = self.emit(relax.op.multiply(self.cast(x.expr, "int64"), const(int(a["mult"]), "int64")))
        if sh > 31:
            t = self.emit(relax.op.right_shift(self.emit(relax.op.add(t, const(1 << (sh - 32), "int64"))),
                                               const(sh - 31, "int64")))
        D = self.emit(relax.op.maximum(self.cast(d.expr, "int64"), const(1, "int64")))
        D = self.emit(relax.op.left_shift(D, const(min(sh, 31), "int64")))
        num = self.emit(relax.op.add(t, self.emit(relax.op.right_shift(D, const(1, "int64")))))
        q = self.emit(relax.op.floor_divide(num, D))
        q = self.emit(relax.op.clip(q, int(a["lo"]), int(a["hi"])))
        return self._out_value(n, self.cast(q, a["dtype"]), x if x.rank >= d.rank else d)

    # ---- pooling and reductions ----------------------------------------------------------------
    def _pool(self, n: Node, x: Value, kind: str) -> Value:
        a = n.attrs
        if x.perm != L.NHWC:
            x = self.logical(x)
        nhwc = x.perm == L.NHWC
        out_shape = self.ig.shapes[n.outputs[0]]
        dtype = x.dtype if kind == "max" else "int32"
        f = _te_pool(kind, a["kernel"], a["strides"], a["pads"], a.get("dilations", (1, 1)), nhwc, dtype)
        e = self.bb.emit_te(f, x.expr, primfunc_name_hint=f"{kind}pool")
        return Value(e, x.perm, out_shape, dtype)

    def op_maxpool(self, n, x):
        return self._pool(n, x, "max")

    def op_sumpool(self, n, x):
        return self._pool(n, x, "sum")

    def _reduce(self, n, x: Value, kind: str) -> Value:
        a = n.attrs
        inv = L.inverse(x.perm)
        axes = sorted(inv[ax] for ax in a["axes"])
        src = self.cast(x.expr, "int32") if kind == "sum" else x.expr
        f = relax.op.sum if kind == "sum" else relax.op.max
        e = self.emit(f(src, axis=axes, keepdims=bool(a["keepdims"])))
        perm = L.reduced_perm(x.perm, set(a["axes"]), bool(a["keepdims"]))
        return Value(e, perm, self.ig.shapes[n.outputs[0]], "int32" if kind == "sum" else x.dtype)

    def op_reduce_sum(self, n, x):
        return self._reduce(n, x, "sum")

    def op_reduce_max(self, n, x):
        return self._reduce(n, x, "max")

    def op_softmax(self, n: Node, x: Value) -> Value:
        a = n.attrs
        ax = L.inverse(x.perm)[a["axis"]]
        i64 = lambda v: const(v, "int64")  # noqa: E731
        xi = self.cast(x.expr, "int64")
        mx = self.emit(relax.op.max(xi, axis=[ax], keepdims=True))
        diff = self.emit(relax.op.subtract(xi, mx))
        d = self.emit(relax.op.left_shift(diff, i64(a["u"])) if a["u"] >= 0 else
                      relax.op.right_shift(diff, i64(-a["u"])))  # arithmetic: floor
        neg = self.emit(relax.op.negative(d))
        if a["variant"] == "iexp":
            z = self.emit(relax.op.floor_divide(neg, i64(a["q_ln2"])))
            p = self.emit(relax.op.add(d, self.emit(relax.op.multiply(z, i64(a["q_ln2"])))))
            pb = self.emit(relax.op.add(p, i64(a["q_b"])))
            L2 = self.emit(relax.op.add(self.emit(relax.op.multiply(pb, pb)), i64(a["q_c"])))
            e = self.emit(relax.op.right_shift(L2, self.emit(relax.op.minimum(z, i64(31)))))
        else:
            v = self.emit(relax.op.subtract(self.emit(relax.op.add(d, self.emit(relax.op.right_shift(d, i64(1))))),
                                            self.emit(relax.op.right_shift(d, i64(4)))))
            z = self.emit(relax.op.floor_divide(self.emit(relax.op.negative(v)), i64(a["q_1"])))
            r = self.emit(relax.op.add(v, self.emit(relax.op.multiply(z, i64(a["q_1"])))))
            base = self.emit(relax.op.add(self.emit(relax.op.right_shift(r, i64(1))), i64(a["q_1"])))
            e = self.emit(relax.op.right_shift(self.emit(relax.op.left_shift(base, i64(a["N"]))),
                                               self.emit(relax.op.minimum(z, i64(62)))))
        s = self.emit(relax.op.sum(e, axis=[ax], keepdims=True))
        k = self.emit(relax.op.floor_divide(i64(1 << a["R"]), s))
        y = self.emit(relax.op.right_shift(self.emit(relax.op.multiply(e, k)), i64(a["R"] - a["ob"])))
        y = self.emit(relax.op.clip(y, int(a["lo"]), int(a["hi"])))
        return Value(self.cast(y, a["dtype"]), x.perm, x.shape, a["dtype"])

    # ---- data movement -------------------------------------------------------------------------
    def op_reshape(self, n: Node, x: Value) -> Value:
        shape = tuple(n.attrs["shape"])
        if tuple(shape) == tuple(x.shape):
            return x
        x = self.logical(x)
        return Value(self.emit(relax.op.reshape(x.expr, shape)), L.identity(len(shape)), shape, x.dtype)

    def op_transpose(self, n: Node, x: Value) -> Value:
        perm = tuple(n.attrs["perm"])
        shape = tuple(x.shape[p] for p in perm)
        return Value(x.expr, L.after_transpose(x.perm, perm), shape, x.dtype)

    def op_concat(self, n: Node, *xs: Value) -> Value:
        perm = xs[0].perm
        xs = [self.to_perm(v, perm) for v in xs]
        ax = L.inverse(perm)[n.attrs["axis"]]
        e = self.emit(relax.op.concat([v.expr for v in xs], axis=ax))
        return Value(e, perm, self.ig.shapes[n.outputs[0]], xs[0].dtype)

    def op_slice(self, n: Node, x: Value) -> Value:
        a = n.attrs
        inv = L.inverse(x.perm)
        shape = self.ig.shapes[n.outputs[0]]
        axes, begins, ends, strides = [], [], [], []
        for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
            axes.append(inv[ax])
            begins.append(int(st))
            strides.append(int(sp))
            ends.append(int(en) if en is not None else (-(2**31) if sp < 0 else 2**31 - 1))
        e = self.emit(relax.op.strided_slice(x.expr, axes, begins, ends, strides))
        return Value(e, x.perm, shape, x.dtype)

    def op_gather(self, n: Node, x: Value) -> Value:
        a = n.attrs
        idx = np.asarray(a["indices"], np.int64)
        shape = self.ig.shapes[n.outputs[0]]
        if idx.ndim == 1:
            ax = L.inverse(x.perm)[a["axis"]]
            e = self.emit(relax.op.take(x.expr, const(idx.astype(np.int32), "int32"), axis=ax))
            return Value(e, x.perm, shape, x.dtype)
        x = self.logical(x)
        e = self.emit(relax.op.take(x.expr, const(idx.astype(np.int32), "int32"), axis=a["axis"]))
        return Value(e, L.identity(len(shape)), shape, x.dtype)

    def op_pad(self, n: Node, x: Value) -> Value:
        a = n.attrs
        r = x.rank
        p = a["pads"]
        width = []
        for i in range(r):
            lg = x.perm[i]
            width += [int(p[lg]), int(p[lg + r])]
        e = self.emit(relax.op.nn.pad(x.expr, width, pad_value=float(a["value"])))
        return Value(e, x.perm, self.ig.shapes[n.outputs[0]], x.dtype)


def _hint(name: str) -> str:
    s = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return s if s and not s[0].isdigit() else "t_" + s


def _te_pool(kind, kernel, strides, pads, dilations, nhwc: bool, dtype: str):
    """TE max/sum pooling (2-D, NCHW or NHWC) with explicit (top, left, bottom, right) pads.
    Max pads with the dtype's minimum (never selected over a real value), sum with 0."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads

    def f(x):
        if nhwc:
            N, H, W, C = (int(d) for d in x.shape)
        else:
            N, C, H, W = (int(d) for d in x.shape)
        OH = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
        OW = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
        fill = tvm.tirx.min_value(x.dtype) if kind == "max" else tirx.const(0, x.dtype)

        def at(n, c, h, w):
            ok = tirx.all(h >= 0, h < H, w >= 0, w < W)
            hh = tirx.max(tirx.min(h, H - 1), 0)
            ww = tirx.max(tirx.min(w, W - 1), 0)
            v = x[n, hh, ww, c] if nhwc else x[n, c, hh, ww]
            return tirx.if_then_else(ok, v, fill)

        rh = te.reduce_axis((0, kh), "rh")
        rw = te.reduce_axis((0, kw), "rw")
        if kind == "max":
            def body(n, c, i, j):
                return te.max(at(n, c, i * sh + rh * dh - pt, j * sw + rw * dw - pl), axis=[rh, rw])
        else:
            def body(n, c, i, j):
                return te.sum(at(n, c, i * sh + rh * dh - pt, j * sw + rw * dw - pl).astype("int32"), axis=[rh, rw])
        if nhwc:
            return te.compute((N, OH, OW, C), lambda n, i, j, c: body(n, c, i, j), name=f"{kind}pool")
        return te.compute((N, C, OH, OW), lambda n, c, i, j: body(n, c, i, j), name=f"{kind}pool")

    return f
