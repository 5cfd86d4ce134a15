"""Lower the integer graph to a Relax module with a BlockBuilder.

Each integer op becomes Relax ops (legalized and fused later) or a ``call_tir`` to one of our
scheduled kernels (``qcompiler.lowering.gemm``), through the ``lower`` of its contract in
``qcompiler/intops/``; the arithmetic is the op's reference, step for step, so the built library
equals the NumPy executor bit for bit.  Tensors carry a physical layout (``layout.py``):
convolutions run NHWC, Transposes are free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx

from qcompiler.graph import Graph, Node

from . import layout as L


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


class Lowering:
    """Builds ``main`` over the integer graph: each node through the ``lower`` of its op contract
    (``qcompiler/intops/``), which calls back into the helpers below.  ``gemm`` provides the
    conv/dense/matmul lowering of the target (``qcompiler/lowering/gemm.py``)."""

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
                from qcompiler import intops

                for n in ig.nodes:
                    v = intops.get(n.op).lower(self, n, *[self.env[i] for i in n.inputs])
                    assert tuple(v.shape) == tuple(ig.shapes[n.outputs[0]]), (n, v.shape, ig.shapes[n.outputs[0]])
                    self.env[n.outputs[0]] = v
                outs = [self.logical(self.env[o]).expr for o in ig.outputs]
                res = self.bb.emit_output(relax.Tuple(outs) if len(outs) > 1 else outs[0])
            self.bb.emit_func_output(res)
        return self.bb.get()

    # ---- helpers of the op lowerings (qcompiler/intops/) -----------------------------------------
    def same_perm(self, a: Value, b: Value) -> tuple[Value, Value]:
        """Two operands of a broadcasting op in one layout (the logical one when ranks differ)."""
        if a.rank == b.rank and a.perm != b.perm:
            b = self.to_perm(b, a.perm)
        elif a.rank != b.rank:
            a, b = self.logical(a), self.logical(b)
        return a, b

    def out_value(self, n, e, ref: Value) -> Value:
        """The Value of node ``n``'s output ``e``, laid out like ``ref`` where the ranks agree."""
        shape = self.ig.shapes[n.outputs[0]]
        perm = ref.perm if len(shape) == ref.rank else L.identity(len(shape))
        return Value(e, perm, shape, n.attrs.get("dtype", ref.dtype))

    def pool(self, n: Node, x: Value, kind: str) -> Value:
        """2-D max / sum pooling (TE), in NHWC when the input is, else NCHW."""
        a = n.attrs
        if x.perm != L.NHWC:
            x = self.logical(x)
        nhwc = x.perm == L.NHWC
        out_shape = self.ig.shapes[n.outputs[0]]
        dtype = x.dtype if kind == "max" else "int32"
        f = _te_pool(kind, a["kernel"], a["strides"], a["pads"], a.get("dilations", (1, 1)), nhwc, dtype)
        e = self.bb.emit_te(f, x.expr, primfunc_name_hint=f"{kind}pool")
        return Value(e, x.perm, out_shape, dtype)

    def reduce(self, n, x: Value, kind: str) -> Value:
        """Sum (int32) or max over ``axes``, in the input's layout."""
        a = n.attrs
        inv = L.inverse(x.perm)
        axes = sorted(inv[ax] for ax in a["axes"])
        src = self.cast(x.expr, "int32") if kind == "sum" else x.expr
        f = relax.op.sum if kind == "sum" else relax.op.max
        e = self.emit(f(src, axis=axes, keepdims=bool(a["keepdims"])))
        perm = L.reduced_perm(x.perm, set(a["axes"]), bool(a["keepdims"]))
        return Value(e, perm, self.ig.shapes[n.outputs[0]], "int32" if kind == "sum" else x.dtype)


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
