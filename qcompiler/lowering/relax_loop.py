"""Lower an integer ``loop`` (``qcompiler/intops/recurrent.py``) to Relax functions the VM runs.

Relax has no loop construct, and TIR cannot call our scheduled kernels from a loop; the VM runs
functions that call each other, so a loop of T steps is a recursion.  A chain of T nested calls
overflows the VM's native stack at a few thousand steps (a segfault at T = 2048, measured), so
the steps are split in halves instead: depth about log2(T / LOOP_BLOCKS[0]) + 4.

  rec_step_k(S..., x_t)                 the body, lowered as any integer graph (its kernels fused
                                        and scheduled like the model's): (S'..., y_t)
  rec_run_k(lo, hi, X, S..., Y)         hi - lo == 1: t = lo (T - 1 - lo when reversed);
                                        (S, y) = rec_step_k(S, X[t]); Y[t] = y (in place)
                                        hi - lo in LOOP_BLOCKS: those steps one after the other
                                        else: [lo, mid) then [mid, hi) with the states of the
                                        first part (mid: whole blocks on the left, ``_MID_TIR``)
  main                                  Y = rec_run_k(0, T, X, S0..., zeros)[-1]

X and Y travel as [T, features] (reshapes are views); X[t] is read by a small copy kernel, y is
written into row t of Y by ``call_tir_inplace``.  What a step costs beyond its kernels is the VM's
work: ~280 packed calls per step of ar-romanizer-enc's GRU (allocations of the step's
intermediates on every call, argument checks) around ~20 kernels (docs/design.md §6).  So on CPUs,
after scheduling, ``qcompiler/lowering/loop_kernel.py`` replaces the call of ``rec_run_k`` by one
kernel running every step wherever the step folds; this recursion is what remains for the others.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

# row t of X read into Y, or Y written into row t of X; row n - 1 - t for a reversed direction ({row})
_ROW_TIR = '''
@T.prim_func(private=True)
def row(X: T.handle, t: T.Buffer((), "int64"), o: T.Buffer((), "int64"), Y: T.Buffer(({F},), "{dt}")):
    T.func_attr({{"qc.scheduled": True, "tirx.noalias": True, "op_pattern": 8}})
    n = T.int64()
    Xb = T.match_buffer(X, (n, {F}), "{dt}")
    for j in T.serial({F}, annotations={{"qc.loop": "serial"}}):
        {stmt}
'''
_TAKE, _PUT = "Y[j] = Xb[{row}, j]", "Xb[{row}, j] = Y[j]"

# the recursion's arithmetic, one kernel each (Relax ops on scalar tensors were two kernels each)
_LEAF_TIR = '''
@T.prim_func(private=True)
def leaf(lo: T.Buffer((), "int64"), hi: T.Buffer((), "int64"), o: T.Buffer((), "bool")):
    T.func_attr({{"qc.scheduled": True, "tirx.noalias": True, "op_pattern": 8}})
    o[()] = hi[()] - lo[()] == T.int64({n})
'''

# the split point: a whole number of blocks of K steps on the left where the range holds more than
# one (so that the recursion ends in blocks of K, one call each), else of k steps, else the middle
_MID_TIR = '''
@T.prim_func(private=True)
def mid(lo: T.Buffer((), "int64"), hi: T.Buffer((), "int64"), o: T.Buffer((), "int64")):
    T.func_attr({{"qc.scheduled": True, "tirx.noalias": True, "op_pattern": 8}})
    n = hi[()] - lo[()]
    o[()] = T.if_then_else(n > T.int64({K}), lo[()] + T.int64({K}) * T.max((n // T.int64({K})) // T.int64(2), T.int64(1)),
                           T.if_then_else(n > T.int64({k}),
                                          lo[()] + T.int64({k}) * T.max((n // T.int64({k})) // T.int64(2), T.int64(1)),
                                          (lo[()] + hi[()]) // T.int64(2)))
'''

LOOP_BLOCKS = (32, 8)
"""Steps a leaf of the recursion runs one after the other (a range of exactly that many steps): the
recursion's own calls (its tests, split points, the calls and their argument checks) are paid once
per block instead of about twice per step.  Long ranges split into blocks of the first size
(madmom-beats-blstm, 200 steps: 7% faster than blocks of 8), shorter ones into the second (a range
under a block runs as single-step leaves)."""

_SIZE_TIR = '''
@T.prim_func(private=True)
def size(X: T.handle, o: T.Buffer((), "int64")):
    T.func_attr({{"qc.scheduled": True, "tirx.noalias": True, "op_pattern": 8}})
    n = T.int64()
    Xb = T.match_buffer(X, (n, {F}), "{dt}")
    o[()] = n
'''


_ZEROS_TIR = '''
@T.prim_func(private=True)
def zeros(X: T.handle, Y: T.handle):
    T.func_attr({{"qc.scheduled": True, "tirx.noalias": True, "op_pattern": 8}})
    n = T.int64()
    Xb = T.match_buffer(X, (n, {F}), "{dt}")
    Yb = T.match_buffer(Y, (n, {FY}), "{dy}")
    for i in T.serial(n, annotations={{"qc.loop": "serial"}}):
        for j in T.serial({FY}):
            Yb[i, j] = T.{dy}(0)
'''
"""(Y's rows start as zeros: a kernel of its own, as the others, never fused: FuseTIR takes a
kernel whose extents are single variables only, and T is an expression of the model's dims, e.g.
8 * the width in steps of an OCR recogniser)"""


def _tir(src: str, **kw) -> tirx.PrimFunc:
    import tvm.script.tirx as T
    from tvm.script import from_source

    return from_source(src.format(**kw), extra_vars={"T": T})


def _flat(shape) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64))


def _tensor(shape, dtype) -> relax.TensorType:
    return relax.TensorType(list(shape), dtype)


def _i64(v: int) -> relax.Expr:
    return relax.const(v, "int64")


def prebuild_loops(lw) -> None:
    """Build the functions of every ``loop`` node of ``lw.ig`` (before ``main``: a function scope of
    the BlockBuilder cannot open inside another).  ``lw._loops[node name]`` = (rec_run gvar, size
    gvar)."""
    lw._loops, lw._loop_vars = {}, []
    for k, n in enumerate(x for x in lw.ig.nodes if x.op == "loop"):
        lw._loops[n.name] = _build_loop(lw, n, k)


def _build_loop(lw, n, k: int):
    from .relax_lower import Lowering

    bb = lw.bb
    body, ns, reverse = n.attrs["body"], int(n.attrs["n_states"]), bool(n.attrs["reverse"])
    x_in, y_out = body.inputs[ns], body.outputs[ns]
    fx, fy = _flat(body.shapes[x_in]), _flat(body.shapes[y_out])
    dx, dy = body.dtypes[x_in], body.dtypes[y_out]
    state_ty = [_tensor(body.shapes[t], body.dtypes[t]) for t in body.inputs[:ns]]

    # the step
    sub = Lowering(body, lw.target, lw.gemm)
    sub.bb = bb
    params = [relax.Var(f"s{j}", ty) for j, ty in enumerate(state_ty)] + [relax.Var("x_t", _tensor((fx,), dx))]
    with bb.function(f"rec_step_{k}", params, private=True):
        with bb.dataflow():
            res = sub.lower_body(params)
        step = bb.emit_func_output(res)  # (an identical body of another loop: that one's function)

    row = "n - T.int64(1) - t[()] - o[()]" if reverse else "t[()] + o[()]"
    take = bb.add_func(_tir(_ROW_TIR, F=fx, dt=dx, stmt=_TAKE.format(row=row)), f"rec_take_{k}")
    put = bb.add_func(_tir(_ROW_TIR, F=fy, dt=dy, stmt=_PUT.format(row=row)), f"rec_put_{k}")
    K, k2 = LOOP_BLOCKS
    leaf_f = bb.add_func(_tir(_LEAF_TIR, n=1), "rec_leaf")
    block_f = bb.add_func(_tir(_LEAF_TIR, n=K), "rec_block")
    block2_f = bb.add_func(_tir(_LEAF_TIR, n=k2), "rec_block2")
    mid_f = bb.add_func(_tir(_MID_TIR, K=K, k=k2), "rec_mid")
    size = bb.add_func(_tir(_SIZE_TIR, F=fx, dt=dx), f"rec_size_{k}")
    zeros = bb.add_func(_tir(_ZEROS_TIR, F=fx, dt=dx, FY=fy, dy=dy), f"rec_zeros_{k}")

    def run_params():
        t = tirx.Var("T", "int64")
        ps = [relax.Var(v, _tensor((), "int64")) for v in ("lo", "hi")]
        ps += [relax.Var("xs", _tensor((t, fx), dx))]
        ps += [relax.Var(f"s{j}", ty) for j, ty in enumerate(state_ty)]
        ps += [relax.Var("ys", _tensor((t, fy), dy))]
        return ps, t

    ps, t = run_params()
    ret = relax.TupleType([*state_ty, _tensor((t, fy), dy)])
    stub = relax.Function(ps, relax.Tuple(ps[3:]), ret_ty=ret).with_attr("qc.loop", k)  # (its body below;
    run = bb.add_func(stub, f"rec_run_{k}")                                             # unique: the attr)
    ps, t = run_params()
    lo, hi, xs, *rest = ps
    states, ys = rest[:ns], rest[ns]

    def steps(count: int) -> relax.SeqExpr:
        """``count`` steps from row lo on (a reversed direction: the take / put kernels read row
        T - 1 - lo - j)."""
        bb._begin_binding_block()
        ss, y = list(states), ys
        for j in range(count):
            x_t = bb.emit(relax.call_tir(take, [xs, lo, _i64(j)], _tensor((fx,), dx)))
            r = bb.emit(relax.Call(step, [*ss, x_t]))
            ss = [bb.emit(relax.TupleGetItem(r, i)) for i in range(ns)]
            y = bb.emit(relax.call_tir_inplace(put, [y, lo, _i64(j), bb.emit(relax.TupleGetItem(r, ns))], [0],
                                               _tensor((t, fy), dy)))
        done = bb.emit(relax.Tuple([*ss, y]))
        return relax.SeqExpr([bb._end_block()], done)

    with bb.function(f"rec_run_{k}_body", ps, private=True):
        leaf = bb.emit(relax.call_tir(leaf_f, [lo, hi], _tensor((), "bool")))
        one = steps(1)
        bb._begin_binding_block()
        blk = bb.emit(relax.call_tir(block_f, [lo, hi], _tensor((), "bool")))
        many = steps(K)
        bb._begin_binding_block()
        blk2 = bb.emit(relax.call_tir(block2_f, [lo, hi], _tensor((), "bool")))
        few = steps(k2)
        bb._begin_binding_block()
        mid = bb.emit(relax.call_tir(mid_f, [lo, hi], _tensor((), "int64")))
        a = bb.emit(relax.Call(run, [lo, mid, xs, *states, ys]))
        b = bb.emit(relax.Call(run, [mid, hi, xs, *[relax.TupleGetItem(a, j) for j in range(ns + 1)]]))
        split = relax.SeqExpr([bb._end_block()], b)
        inner2 = bb.emit(relax.If(blk2, few, split))
        other2 = relax.SeqExpr([bb._end_block()], inner2)
        inner = bb.emit(relax.If(blk, many, other2))
        other = relax.SeqExpr([bb._end_block()], inner)
        out = bb.emit(relax.If(leaf, one, other))
        full = bb.emit_func_output(out)
    # what qcompiler/lowering/loop_kernel.py needs to fold the steps into one kernel
    fn = bb.get()[full].with_attrs({"qc.loop": k, "qc.loop_step": step.name_hint, "qc.loop_reverse": int(reverse)})
    bb.update_func(run, fn)
    return run, size, zeros


def drop_loop_bodies(mod: tvm.IRModule) -> tvm.IRModule:
    """The module without the ``rec_run_*_body`` scratch functions (their code is in rec_run_*)."""
    for gv in list(mod.get_global_vars()):
        if gv.name_hint.startswith("rec_run_") and gv.name_hint.endswith("_body"):
            del mod[gv]
    return mod


def lower_loop(lw, n, *vals):
    """The ``loop`` node in ``main``: one call of its rec_run function (module docstring)."""
    from .relax_lower import Value

    run, size, zeros = lw._loops[n.name]
    body, ns = n.attrs["body"], int(n.attrs["n_states"])
    xs = lw.logical(vals[ns])
    T = xs.shape[0]
    fx, fy = _flat(xs.shape[1:]), _flat(body.shapes[body.outputs[ns]])
    x2 = lw.emit(relax.op.reshape(xs.expr, [T, fx]))
    if not isinstance(T, (int, tirx.IntImm)) and not isinstance(T, tirx.Var):
        # the steps as a variable of their own (T is an expression of the model's dims, 8 * the
        # width in steps of an OCR recogniser): FuseTIR passes only single variables to kernels
        tv = tirx.Var(f"steps_{len(lw._loop_vars)}", "int64")
        lw._loop_vars.append(tv)
        x2 = lw.bb.match_cast(x2, _tensor((tv, fx), xs.dtype))
        T_loop = tv
    else:
        T_loop = T
    nt = lw.emit(relax.call_tir(size, [x2], _tensor((), "int64")))
    y_dtype = body.dtypes[body.outputs[ns]]
    y0 = lw.emit(relax.call_tir(zeros, [x2], _tensor((T_loop, fy), y_dtype)))
    states = [lw.logical(v).expr for v in vals[:ns]]
    r = lw.emit(relax.Call(run, [_i64(0), nt, x2, *states, y0]))
    y = lw.emit(relax.TupleGetItem(r, ns))
    shape = lw.ig.shapes[n.outputs[0]]
    if T_loop is not T:  # back in the model's dims (a run-time check that they agree)
        y = lw.bb.match_cast(y, _tensor((T, fy), y_dtype))
    y = lw.emit(relax.op.reshape(y, list(shape)))
    return Value(y, tuple(range(len(shape))), shape, y_dtype)
