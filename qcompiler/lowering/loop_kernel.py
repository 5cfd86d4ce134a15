"""One kernel per recurrence: the steps of a ``loop`` run inside a single PrimFunc.

``qcompiler/lowering/relax_loop.py`` lowers a loop of T steps to Relax functions the VM runs: a
recursion over blocks of steps, each step a call of ``rec_step_k`` whose kernels are fused and
scheduled like the model's.  That is correct for any step, but every step costs the VM ~50 packed
calls beyond its kernels (argument checks, the allocation of each intermediate, the take / put
copies): on a small recurrent model (madmom's beat BLSTM: 25 units) the VM's work was ~90% of the run.

After scheduling, a step whose body is nothing but ``call_tir`` of scheduled PrimFuncs (the usual
case: the integer ops of an LSTM / GRU / RNN cell) is folded into one PrimFunc ``rec_loop_k``:

  rec_loop_k(xs[T, fx], s0_j..., c..., so_j..., ys[T, fy])   (c: the step's constants)
      so_j = s0_j
      for t in 0..T-1 (serial):
          row = t  (T - 1 - t for a reversed direction)
          xt = xs[row]
          <the body of each step kernel, its buffers bound to xt, so_j, c and the step's
           intermediates (allocated once, outside the loop)>
          so_j = the step's new state j;  ys[row] = the step's output

and the call of ``rec_run_k(0, T, xs, s0..., ys0)`` in the caller becomes one ``call_tir`` of it
with the same results (the final states and Y).  The kernels' bodies are taken as scheduled: each
kernel's own parameter buffers are declared (``DeclBuffer``) as views of the loop's buffers and its
symbolic dims bound (``Bind``) to theirs (``_bind_param``; ``PrimFunc.specialize`` of TVM 0.27
leaves the body's buffers as they were), so the arithmetic, and hence every bit of the output, is
the step's own; ``ConvertSSA`` renames what a kernel used twice defines twice; the recursion
functions become dead and are dropped.  A step that
is anything else (a Relax op left unlowered, a kernel with several outputs or symbolic
arguments) keeps the recursion.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.s_tir.stmt import SBlock, SBlockRealize

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


class _Unsupported(Exception):
    """The step does not fold into one kernel (the recursion stays)."""


def _shape(ty) -> list | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = ty.shape
    if not isinstance(shape, relax.ShapeExpr):
        return None
    return list(shape.values)


def _copy(dst: tirx.Buffer, dst_lead: list, src: tirx.Buffer, src_lead: list, shape: list, name: str) -> tirx.Stmt:
    """dst[dst_lead..., i...] = src[src_lead..., i...] over ``shape`` (serial loops)."""
    ivs = [tirx.Var(f"{name}{d}", "int64") for d in range(len(shape))]
    body = tirx.BufferStore(dst, tirx.BufferLoad(src, src_lead + ivs), dst_lead + ivs)
    for iv, ext in reversed(list(zip(ivs, shape))):
        body = tirx.For(iv, tirx.const(0, "int64"), ext.astype("int64"),
                        tirx.ForKind.SERIAL, body)
    return body


def _bind_param(p: tirx.Buffer, b: tirx.Buffer, bound: dict) -> list:
    """Statements that make the kernel's own parameter buffer ``p`` a view of the loop's buffer
    ``b`` (same dtype, rank and extents): its symbolic dims (and offset) bound to ``b``'s, then
    ``DeclBuffer(p, data=b's data)``.  The kernel's body then runs unchanged."""
    out = []
    if len(p.strides):
        raise _Unsupported(f"kernel buffer {p.name} has strides")

    def bind(v, value):
        if isinstance(v, tirx.IntImm):
            if not isinstance(value, tirx.IntImm) or int(v.value) != int(value.value):
                raise _Unsupported(f"kernel buffer {p.name}: {list(p.shape)} vs {list(b.shape)}")
            return
        if not isinstance(v, tirx.Var):
            raise _Unsupported(f"kernel buffer {p.name}: dim {v}")
        if v in bound:
            return
        bound[v] = value
        out.append(tirx.Bind(v, value.astype(v.ty.dtype)))

    for pe, be in zip(p.shape, b.shape):
        bind(pe, be)
    bind(p.elem_offset, tirx.const(0, "int64"))
    out.append(tirx.DeclBuffer(p, data=tirx.buffer_data(b)))
    return out


def _step_program(step: relax.Function):
    """(params, [(kernel gvar, [arg exprs], out var)], output exprs) of a step made only of
    ``call_tir`` bindings, or raise _Unsupported."""
    body = step.body
    if not isinstance(body, relax.SeqExpr):
        raise _Unsupported("body")
    calls, alias = [], {}
    for blk in body.blocks:
        for b in blk.bindings:
            if not isinstance(b, relax.VarBinding):
                raise _Unsupported("binding")
            v = b.value
            if isinstance(v, relax.Call) and v.op.same_as(_CALL_TIR):
                if len(v.args) > 2 or len(v.ty_args) != 1 or not isinstance(v.ty_args[0], relax.TensorType):
                    raise _Unsupported("call_tir form")
                calls.append((v.args[0], list(v.args[1].fields), b.var))
            elif isinstance(v, (relax.Tuple, relax.Var)):
                alias[b.var] = v
            else:
                raise _Unsupported(type(v).__name__)
    out = body.body
    while isinstance(out, relax.Var) and out in alias:
        out = alias[out]
    if not isinstance(out, relax.Tuple):
        raise _Unsupported("output")
    fields = []
    for f in out.fields:
        while isinstance(f, relax.Var) and f in alias:
            f = alias[f]
        fields.append(f)
    return list(step.params), calls, fields


def build_loop_primfunc(mod: tvm.IRModule, step: relax.Function, reverse: bool):
    """The PrimFunc running every step of ``step`` (module docstring) and the step's constants, in
    the order of its parameters after the states; raises _Unsupported."""
    params, calls, outs = _step_program(step)
    ns = len(params) - 1
    if len(outs) != ns + 1:
        raise _Unsupported("outputs")
    x_p = params[ns]
    fx = _shape(x_p.ty)
    fy = _shape(outs[ns].ty)
    if fx is None or fy is None or len(fx) != 1 or len(fy) != 1:
        raise _Unsupported("x / y shape")
    dx, dy = x_p.ty.dtype, outs[ns].ty.dtype
    n = tirx.Var("n", "int64")

    def param_buffer(name, shape, dtype):
        b = tirx.decl_buffer(shape, dtype, name)   # (a TIR buffer is the parameter itself)
        handles.append(b)
        return b

    handles: list = []
    xs = param_buffer("xs", [n, fx[0]], dx)
    buf: dict = {}                 # relax var / constant -> buffer
    s_in, s_out = [], []
    for j, p in enumerate(params[:ns]):
        sh = _shape(p.ty)
        if sh is None:
            raise _Unsupported("state shape")
        s_in.append(param_buffer(f"s{j}_in", sh, p.ty.dtype))
    consts: list = []
    const_bufs: list = []
    for _gv, args, _v in calls:
        for a in args:
            if isinstance(a, tvm.ir.expr.Constant) and not any(a.same_as(c) for c in consts):
                sh = list(a.value.shape)
                const_bufs.append(param_buffer(f"c{len(consts)}", sh, str(a.value.dtype)))
                consts.append(a)
    for j, p in enumerate(params[:ns]):
        b = param_buffer(f"s{j}_out", list(s_in[j].shape), s_in[j].dtype)
        s_out.append(b)
        buf[p] = b                 # the steps read the current state where the last one left it
    ys = param_buffer("ys", [n, fy[0]], dy)

    xt = tirx.decl_buffer(fx, dx, "xt")
    buf[x_p] = xt
    allocs = [xt]
    for _gv, _args, v in calls:
        sh = _shape(v.ty)
        if sh is None:
            raise _Unsupported("intermediate shape")
        b = tirx.decl_buffer(sh, v.ty.dtype, f"v{len(allocs)}")
        buf[v] = b
        allocs.append(b)

    def lookup(a):
        if isinstance(a, tvm.ir.expr.Constant):
            return const_bufs[next(i for i, c in enumerate(consts) if a.same_as(c))]
        if a in buf:
            return buf[a]
        raise _Unsupported("argument")

    t = tirx.Var("t", "int64")
    row = (n - tirx.const(1, "int64") - t) if reverse else t
    stmts = [_copy(xt, [], xs, [row], fx, "ix")]
    for gv, args, v in calls:
        f = mod[gv]
        if not isinstance(f, tirx.PrimFunc) or len(f.params) != len(args) + 1:
            raise _Unsupported("kernel")
        binds = [lookup(a) for a in args] + [buf[v]]
        decls: list = []
        bound: dict = {}
        for p, b in zip(f.params, binds):
            if p.shape is None or p.dtype != b.dtype or len(p.shape) != len(b.shape):
                raise _Unsupported("kernel signature")
            decls += _bind_param(p, b, bound)
        stmts.append(tirx.SeqStmt(decls + [f.body]))
    for j in range(ns):
        o = outs[j]
        src = lookup(o)
        if not src.same_as(s_out[j]):
            stmts.append(_copy(s_out[j], [], src, [], list(s_out[j].shape), f"is{j}_"))
    stmts.append(_copy(ys, [row], lookup(outs[ns]), [], fy, "iy"))
    loop = tirx.For(t, tirx.const(0, "int64"), n, tirx.ForKind.SERIAL, tirx.SeqStmt(stmts))
    init = [_copy(s_out[j], [], s_in[j], [], list(s_in[j].shape), f"i{j}_") for j in range(ns)]
    body = tirx.SeqStmt(init + [loop]) if init else loop
    root = SBlockRealize([], True, SBlock([], [], [], "root", body, alloc_buffers=allocs))
    func = tirx.PrimFunc(handles, root).with_attrs({
        "tirx.noalias": True, "tirx.is_scheduled": True, "qc.scheduled": True, "s_tir": True,
        "qc.loop_kernel": True})
    return func, consts


def fuse_loop_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace each call ``rec_run_k(0, T, xs, s0..., ys0)`` whose step folds into one PrimFunc by
    a ``call_tir`` of that PrimFunc (module docstring); the recursion is then dropped."""
    loops = {}
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function) and f.attrs is not None and "qc.loop_step" in f.attrs:
            step_gv = mod.get_global_var(str(f.attrs["qc.loop_step"]))
            try:
                func, consts = build_loop_primfunc(mod, mod[step_gv], bool(int(f.attrs["qc.loop_reverse"])))
            except _Unsupported:
                continue
            loops[gv] = (func, consts, int(f.attrs["qc.loop"]))
    if not loops:
        return mod
    bb = relax.BlockBuilder(mod)   # (add_func gives the new GlobalVars the type call_tir checks)
    new_gvs = {run_gv: bb.add_func(func, f"rec_loop_{k}") for run_gv, (func, _c, k) in loops.items()}
    mod = bb.get()

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.GlobalVar) and call.op in new_gvs:
                lo = call.args[0]
                if isinstance(lo, tvm.ir.expr.Constant) and int(lo.value.numpy()) == 0:
                    consts = loops[call.op][1]
                    ns = len(call.args) - 4
                    xs, states, ys = call.args[2], list(call.args[3:3 + ns]), call.args[3 + ns]
                    outs = [s.ty for s in states] + [ys.ty]
                    return relax.call_tir(new_gvs[call.op], [xs, *states, *consts], outs)
            return call

    rw = Rewrite(mod)
    for gv, f in list(mod.functions_items()):
        if isinstance(f, relax.Function) and gv not in loops and not gv.name_hint.startswith("rec_"):
            mod[gv] = rw.visit_expr(f)
    entries = [gv.name_hint for gv, f in mod.functions_items()
               if isinstance(f, relax.Function) and not gv.name_hint.startswith("rec_")
               and f.attrs is not None and "global_symbol" in f.attrs]
    mod = relax.transform.DeadCodeElimination(entries)(mod)
    # a kernel used twice (in a step, or in the step and elsewhere) defines its variables twice
    return tirx.transform.ConvertSSA()(mod)
