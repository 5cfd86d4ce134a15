"""One ``make_shape`` / ``make_prim_value`` per distinct value: a pass over VM-lowered Relax functions.

TVM's ``VMShapeLower`` turns every shape a symbolic-shape function uses (each ``alloc_tensor``,
each ``reshape``) into a ``vm.builtin.make_shape`` call that reads the shape heap, and every
symbolic scalar a kernel takes into a ``vm.builtin.make_prim_value``, one call per use: MiniLM
over ``batch x sequence`` made 200 ``make_shape`` calls per run for 19 distinct shapes, each a VM
instruction and a new object (a static library has none: its shapes are constants).  Measured
2026-12-07 on the Zen 4 VM, 2 threads, MiniLM at 1 x 8 tokens: 0.292 -> 0.276 ms.
The heap's slots are each written once, before any read of them (``match_shape`` at the
function's entry and after each ``match_cast``, then the ``shape_func`` that computes the derived
expressions), so two reads with the same arguments return equal values wherever the second one
runs: this pass keeps the first and points the later ones' users at it.

Scopes: a call is reused only where its binding dominates the later one (the same or an enclosing
``SeqExpr``; the branches of an ``If`` start from their parent's table and keep their own).  A
shape variable that ``KillAfterLastUse`` drops (``vm.kill_object``) is never reused after that.
"""

from __future__ import annotations

import tvm
from tvm import relax

HEAP_READS = ("vm.builtin.make_shape", "vm.builtin.make_prim_value")


def _is_heap_read(e) -> bool:
    return (isinstance(e, relax.Call) and isinstance(e.op, relax.ExternFunc)
            and e.op.global_symbol in HEAP_READS)


def _killed(e) -> list:
    """The variables a ``vm.kill_object`` call drops."""
    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.vm.kill_object":
        return [a for a in e.args if isinstance(a, relax.Var)]
    return []


def _key(call: relax.Call):
    """The call's arguments as a hashable key: variables by identity, constants by value."""
    out = []
    for a in call.args:
        if isinstance(a, relax.Var):
            out.append(("var", a))
        elif isinstance(a, tvm.tirx.IntImm):
            out.append(("int", int(a.value)))
        else:  # anything else: no reuse (a fresh key)
            return None
    return tuple(out)


@relax.expr_functor.mutator
class _Dedup(relax.PyExprMutator):
    def __init__(self, mod=None):
        super().__init__(mod)
        self.scopes: list[dict] = [{}]
        self.removed = 0

    def visit_seq_expr_(self, op):
        self.scopes.append(dict(self.scopes[-1]))
        try:
            return super().visit_seq_expr_(op)
        finally:
            self.scopes.pop()

    def visit_var_binding_(self, binding):
        value = binding.value
        table = self.scopes[-1]
        for v in _killed(value):
            for k in [k for k, kept in table.items() if kept.same_as(v)]:
                del table[k]
        args = _key(value) if _is_heap_read(value) else None
        key = (value.op.global_symbol,) + args if args else None
        if key is not None and key in table:
            self.set_var_remap(binding.var, table[key])
            self.removed += 1
            return
        # the same variable (its struct info holds: only shape variables of equal ndim are remapped)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.visit_expr(value)))
        if key is not None:
            table[key] = binding.var


def dedup_heap_reads(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``mod`` with repeated shape-heap reads folded into the first (module docs), and how many
    calls were removed."""
    out = {}
    removed = 0
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            m = _Dedup(mod)
            nf = m.visit_expr(f)
            if m.removed:
                out[gv] = nf
                removed += m.removed
    if not out:
        return mod, 0
    mod = mod.clone()
    for gv, f in out.items():
        mod[gv] = f
    return mod, removed


@tvm.transform.module_pass(opt_level=0, name="qc.DedupHeapReads")
def DedupHeapReads(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 - a TVM pass
    return dedup_heap_reads(mod)[0]
