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
from qcompiler.symbolic import SymArray, SymTable, same_shape, sym_data, tir_name

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

    def take(self, x: relax.Expr, idx: relax.Expr, axis: int) -> relax.Expr:
        """``x`` gathered along ``axis`` at ``idx`` (the index tensor's axes replace ``axis``), indices
        in range by construction (clipped table indices, constant index maps), so unchecked: Relax's
        ``take`` in its "fast" mode computes the same, but its legalization prints a warning for
        every such op (thousands in a model of table lookups)."""
        xs, ns = (list(self.bb.normalize(e).ty.shape) for e in (x, idx))
        axis %= len(xs)

        def f(a, i):
            def body(*p):
                j = p[axis:axis + len(ns)]
                k = (i(*j) if j else i()).astype("int64")
                return a[(*p[:axis], k, *p[axis + len(ns):])]

            return te.compute((*xs[:axis], *ns, *xs[axis + 1:]), body, name="take")

        return self.bb.emit_te(f, x, idx, primfunc_name_hint="take")

    def lut(self, x: relax.Expr, table: np.ndarray, offset: int) -> relax.Expr:
        """table[x + offset] elementwise (indices in range by construction: ``offset`` is the index of
        code 0 and the table has an entry per code), as one kernel that FuseOps takes as injective --
        each output element from its own input element, the table a constant -- so that it fuses
        with the elementwise kernels around it (as an add and a gather it was two kernels, the gather
        opaque to fusion)."""
        def f(xt, tab):
            return te.compute(xt.shape, lambda *p: tab[xt(*p).astype("int32") + tirx.const(int(offset), "int32")],
                              name="lut")

        return self.bb.emit_te(f, x, const(table, str(table.dtype)), primfunc_name_hint="lut",
                               primfunc_attrs={"op_pattern": 2})

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
        """A logical-order broadcast constant laid out for ``v``.  A ``SymArray`` (a constant whose
        extent follows a symbolic dim, ``qcompiler/symbolic.py``) is stored at its largest size and
        sliced to the run's size."""
        if isinstance(arr, SymTable):
            return self._table_row(arr, dtype, v)
        sizes = {}
        if isinstance(arr, SymArray):
            arr, sizes = arr.data, arr.sizes
        arr = np.asarray(arr)
        e = const(L.const_for(arr, v.rank, v.perm), dtype)
        if sizes:
            lead = v.rank - arr.ndim if 0 < arr.ndim < v.rank else 0
            phys = L.inverse(v.perm) if arr.ndim else ()
            shape = list(L.const_for(arr, v.rank, v.perm).shape)
            for ax in sorted(sizes):
                shape[int(phys[lead + ax])] = sizes[ax]
            # the leading part (a TE copy: its output shape names the symbolic size, which a
            # strided_slice's inferred shape would not)
            e = self.bb.emit_te(lambda t: te.compute(shape, lambda *i: t(*i), name="sym_prefix"), e,
                                primfunc_name_hint="sym_prefix")
        return e

    def _sym_const(self, arr: SymArray, shape: tuple) -> Value:
        """A graph constant of symbolic shape ``shape`` (``qcompiler/symbolic.py``): its stored data
        (at the largest size along ``arr.sizes``, extent 1 along broadcast axes) sliced to the run's
        sizes and broadcast to ``shape`` by one TE copy (its output shape names the sizes)."""
        data = np.asarray(arr.data)
        dtype = str(data.dtype)
        e = const(data, dtype)
        if tuple(data.shape) != tuple(shape) or arr.sizes:
            bcast = [ax not in arr.sizes and int(n) == 1 for ax, n in enumerate(data.shape)]
            e = self.bb.emit_te(lambda c: te.compute(shape, lambda *i: c(*[0 if b else x for b, x in zip(bcast, i)]),
                                                     name="sym_const"), e, primfunc_name_hint="sym_const")
        return Value(e, L.identity(len(shape)), shape, dtype)

    def _table_row(self, t, dtype: str, v: Value) -> relax.Expr:
        """The row of a ``SymTable`` for this run's size (u - lo), laid out for ``v`` like ``c``."""
        rows = np.stack([L.const_for(r, v.rank, v.perm) for r in np.asarray(t.data)])  # each row laid out as c()
        key = (t.var.name, int(t.lo))
        if key not in self._table_rows:  # the row index of this run, u - lo: once per dim
            lo = int(t.lo)  # (u: the dim's variable, bound in main from an input's size, / step where stepped)
            self._table_rows[key] = self.bb.emit_te(lambda u: te.compute((1,), lambda i: u - lo, name="size_row"),
                                                    t.var, primfunc_name_hint="size_row")
        row = self.take(const(rows, dtype), self._table_rows[key], 0)
        return self.emit(relax.op.reshape(row, tuple(rows.shape[1:])))

    def requant_expr(self, t64, v: Value, mult, shift, add, lo, hi, dtype):
        """clip((t64 * mult + add + 2^(shift-1)) >> shift, lo, hi) -> dtype, with t64 int64."""
        table = next((x for x in (mult, shift, add) if isinstance(x, SymTable)), None)
        shift_t = shift
        shift = sym_data(shift).astype(np.int64)
        rnd = np.left_shift(np.int64(1), shift - 1)
        e = self.emit(relax.op.multiply(t64, self.c(mult, "int64", v)))
        if add is not None:
            rnd = rnd + sym_data(add).astype(np.int64)
            if isinstance(add, SymArray):
                rnd = SymArray(rnd, add.sizes)
        if table is not None:  # rows per size of a symbolic dim (qcompiler/symbolic.py SymTable)
            if not isinstance(shift_t, SymTable):
                shift = np.broadcast_to(shift, (len(table.data),) + shift.shape)
                rnd = np.broadcast_to(rnd, shift.shape)
            rnd, shift = SymTable(table.var, table.lo, np.ascontiguousarray(rnd)), SymTable(table.var, table.lo, shift)
        e = self.emit(relax.op.add(e, self.c(rnd, "int64", v)))
        e = self.emit(relax.op.right_shift(e, self.c(shift, "int64", v)))
        e = self.emit(relax.op.clip(e, int(lo), int(hi)))
        return self.cast(e, dtype)

    # ---- driver ----------------------------------------------------------------------------
    def build(self, io_dtypes: dict[str, str] | None = None) -> tvm.IRModule:
        ig = self.ig
        params = []
        # a symbolic dim with a step (sizes step * u, qcompiler/symbolic.py): the graph's dims are in u,
        # which Relax cannot bind from an input's size; the input takes a variable of its own, u is
        # bound from it below (match_cast) and the input is cast to its dims in u
        stepped = {self._tvar(n): (st, tirx.Var(tir_name(n) + "_size", "int64"))
                   for n, (_, _, st) in ig.dim_ranges.items() if st > 1}
        self._table_rows: dict = {}  # (dim name, lo) -> the [u - lo] tensor SymTable rows are picked by
        for t in ig.inputs:
            shape = [self._raw(d, stepped) for d in ig.shapes[t]]
            params.append(relax.Var(_hint(t), relax.TensorType(shape=shape, dtype=ig.dtypes[t])))
        # symbolic dims: their largest sizes let Relax plan the memory once, for every shape in range
        bounds = {}
        for k, (_, hi, st) in ig.dim_ranges.items():
            bounds[tir_name(k)] = hi // st
            if st > 1:
                bounds[tir_name(k) + "_size"] = hi
        attrs = {"tir_var_upper_bound": bounds} if bounds else None
        if any(n.op == "loop" for n in ig.nodes):  # their functions first (qcompiler/lowering/relax_loop.py)
            from .relax_loop import prebuild_loops

            prebuild_loops(self)
        if stepped:
            # the graph runs in "main_body", whose signature holds the u (a Shape parameter first, then
            # the inputs in u): Relax plans memory from the upper bounds of signature variables only,
            # and with u bound inside main by a match_cast every intermediate was allocated per call
            # (PP-OCRv4 rec: 48 alloc_storage per run, none reused; now planned as for plain dims)
            us = list(stepped)
            body_params = [relax.Var("steps", relax.ShapeType(us))]
            body_params += [relax.Var(_hint(t), relax.TensorType(shape=list(ig.shapes[t]), dtype=ig.dtypes[t]))
                            for t in ig.inputs]
            body_bounds = {u.name: bounds[u.name] for u in us if u.name in bounds}
            body = self._emit_graph("main_body", body_params[1:], body_params, {"tir_var_upper_bound": body_bounds})
        with self.bb.function("main", params, attrs=attrs):
            if not stepped:
                self._lower_graph(params)
            else:
                with self.bb.dataflow():
                    for u, (st, size) in stepped.items():
                        # u = size // step, read at run time into a shape (a variable Relax knows only by
                        # this binding: bound from an expression, FuseTIR's symbolic-argument rewriting
                        # would pass fused kernels ``size // step`` where it requires a plain variable)
                        probe = self.bb.emit_te(lambda n: te.compute((1,), lambda i: tirx.floordiv(n, st),
                                                                     name="size_in_steps"),
                                                size, primfunc_name_hint="size_in_steps")
                        shp = self.bb.emit(relax.op.call_pure_packed("vm.builtin.tensor_to_shape", probe,
                                                                     ty_args=relax.ShapeType(ndim=1)))
                        self.bb.match_cast(shp, relax.ShapeType([u]))
                    args = [relax.ShapeExpr(us)]
                    for t, var in zip(ig.inputs, params):
                        if any(not _is_int(d) for d in ig.shapes[t]):  # checks size == step * u at run time
                            var = self.bb.match_cast(var, relax.TensorType(shape=list(ig.shapes[t]), dtype=ig.dtypes[t]))
                        args.append(var)
                    res = self.bb.emit_output(relax.Call(body, args))
                self.bb.emit_func_output(res)
        from .relax_loop import drop_loop_bodies

        return drop_loop_bodies(self.bb.get())

    def _emit_graph(self, name: str, inputs: list, params: list, attrs: dict):
        """A Relax function ``name`` (``params``) computing the graph from ``inputs`` (a subset of
        ``params``): its GlobalVar."""
        with self.bb.function(name, params, attrs=attrs, private=True):
            self._lower_graph(inputs)
        return self.bb.get().get_global_var(name)

    def _lower_graph(self, inputs: list) -> None:
        """The graph in the current function, its inputs the Relax vars ``inputs``; emits its output."""
        ig = self.ig
        with self.bb.dataflow():
            for t, var in zip(ig.inputs, inputs):
                self.env[t] = Value(var, L.identity(len(ig.shapes[t])), ig.shapes[t], ig.dtypes[t])
            self._lower_nodes()
            outs = [self.logical(self.env[o]).expr for o in ig.outputs]
            res = self.bb.emit_output(relax.Tuple(outs) if len(outs) > 1 else outs[0])
        self.bb.emit_func_output(res)

    def _lower_nodes(self) -> None:
        """The graph's constants and nodes into ``self.env``, each node through its op contract."""
        ig = self.ig
        for t, arr in ig.consts.items():  # integer constants (e.g. a quantized class token)
            if isinstance(arr, SymArray):  # one whose extent follows a symbolic dim
                self.env[t] = self._sym_const(arr, tuple(ig.shapes[t]))
                continue
            arr = np.asarray(arr)
            self.env[t] = Value(const(arr, str(arr.dtype)), L.identity(arr.ndim), tuple(arr.shape), str(arr.dtype))
        from qcompiler import intops

        for n in ig.nodes:
            v = intops.get(n.op).lower(self, n, *[self.env[i] for i in n.inputs])
            assert same_shape(v.shape, ig.shapes[n.outputs[0]]), (n, v.shape, ig.shapes[n.outputs[0]])
            self.env[n.outputs[0]] = v

    def lower_body(self, params: list) -> relax.Expr:
        """The body of a ``loop`` (``qcompiler/lowering/relax_loop.py``), in the caller's dataflow
        block: ``params`` = its states then its step input flattened; returns the tuple (states...,
        step output flattened)."""
        ig = self.ig
        ns = len(params) - 1
        self._table_rows = {}
        for t, p in zip(ig.inputs[:ns], params[:ns]):
            self.env[t] = Value(p, L.identity(len(ig.shapes[t])), ig.shapes[t], ig.dtypes[t])
        x = ig.inputs[ns]
        self.env[x] = Value(self.emit(relax.op.reshape(params[ns], list(ig.shapes[x]))), L.identity(len(ig.shapes[x])),
                            ig.shapes[x], ig.dtypes[x])
        self._lower_nodes()
        outs = [self.logical(self.env[o]).expr for o in ig.outputs[:ns]]
        y = self.logical(self.env[ig.outputs[ns]])
        outs.append(self.emit(relax.op.reshape(y.expr, [int(np.prod([int(d) for d in y.shape]))])))
        return self.bb.emit_output(relax.Tuple(outs))

    def _tvar(self, name: str):
        """The TIR variable of the symbolic dim ``name`` in the graph's shapes."""
        for shp in self.ig.shapes.values():
            for d in shp:
                if not _is_int(d):
                    for v in _free_vars(d):
                        if v.name == tir_name(name):
                            return v
        return tirx.Var(tir_name(name), "int64")

    @staticmethod
    def _raw(d, stepped: dict):
        """An input dim as the Relax parameter declares it: step * u -> the size's own variable."""
        if _is_int(d):
            return d
        from tvm.sym import Analyzer

        for u, (st, size) in stepped.items():
            if Analyzer().can_prove_equal(d, u * st):
                return size
        return d

    # ---- helpers of the op lowerings (qcompiler/intops/) -----------------------------------------
    def same_perm(self, a: Value, b: Value) -> tuple[Value, Value]:
        """Two operands of a broadcasting op in one layout (the logical one when ranks differ)."""
        if a.rank == b.rank and a.perm != b.perm:
            b = self.to_perm(b, a.perm)
        elif a.rank != b.rank:
            a, b = self.logical(a), self.logical(b)
        return a, b

    def affine_take(self, x: relax.Expr, m, axis: int) -> relax.Expr:
        """take(x, idx, axis) for an index map idx(p) = c0 + sum_i coef_i * (p_i // div_i) over an output of
        ``m.shape`` (``qcompiler.symbolic.AffineMap``; sizes and coefficients may be symbolic)."""
        k = len(m.shape)
        # the symbolic coefficients go to emit_te as arguments: it maps their size variables onto the
        # kernel's own (a size only in the coefficients, a target length indexing its last token,
        # would otherwise be undefined in the kernel)
        sym = [e for e in (m.c0, *m.coef) if not _is_int(e)]

        def f(xt, *ex):
            it = iter(ex)
            c0 = m.c0 if _is_int(m.c0) else next(it)
            coef = [c if _is_int(c) else next(it) for c in m.coef]

            div = m.divisors()

            def body(*p):
                i = c0 + sum((c * (p[axis + j] // div[j] if div[j] != 1 else p[axis + j])
                              for j, c in enumerate(coef) if not (_is_int(c) and int(c) == 0)),
                             tirx.const(0, "int64"))
                return xt[(*p[:axis], i, *p[axis + k:])]
            shape = (*xt.shape[:axis], *m.shape, *xt.shape[axis + 1:])
            return te.compute(shape, body, name="affine_take")

        return self.bb.emit_te(f, x, *sym, primfunc_name_hint="affine_take")

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
        """Sum (int64) or max over ``axes``, in the input's layout."""
        a = n.attrs
        inv = L.inverse(x.perm)
        axes = sorted(inv[ax] for ax in a["axes"])
        src = self.cast(x.expr, "int64") if kind == "sum" else x.expr
        f = relax.op.sum if kind == "sum" else relax.op.max
        e = self.emit(f(src, axis=axes, keepdims=bool(a["keepdims"])))
        perm = L.reduced_perm(x.perm, set(a["axes"]), bool(a["keepdims"]))
        return Value(e, perm, self.ig.shapes[n.outputs[0]], "int64" if kind == "sum" else x.dtype)


def _free_vars(e) -> list:
    from tvm.tirx.analysis import undefined_vars

    return list(undefined_vars(e))


def _is_int(d) -> bool:
    return isinstance(d, (int, np.integer)) or isinstance(d, tirx.IntImm)


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
        dims = [d if not _is_int(d) else int(d) for d in x.shape]  # symbolic dims stay symbolic
        if nhwc:
            N, H, W, C = dims
        else:
            N, C, H, W = dims
        from .gemm import simplify

        OH = simplify((H + pt + pb - dh * (kh - 1) - 1) // sh + 1)
        OW = simplify((W + pl + pr - dw * (kw - 1) - 1) // sw + 1)
        fill = tvm.tirx.min_value(x.dtype) if kind == "max" else tirx.const(0, x.dtype)

        def at(n, c, h, w):
            ok = tirx.all(h >= 0, h < H, w >= 0, w < W)  # (symbolic H / W: clamped below, so never out of bounds)
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
