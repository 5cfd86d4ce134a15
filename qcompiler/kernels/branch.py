"""One PrimFunc that runs one of two schedules of a kernel, chosen at run time by its sizes.

A kernel over symbolic dims (qcompiler/symbolic.py) serves every size of a range; a schedule good
at its large sizes (a parallel loop: a thread-pool launch of ~3-10 us per call on the 2-core hosts,
docs/design.md §5) costs more than the whole work at its small sizes, where a static kernel of that
size runs serially.  ``join_schedules`` puts a serial and a parallel schedule of the *same*
unscheduled function under ``if <cond>``, the condition an integer expression of the function's own
size variables (bound from its buffers' shapes).  ``Schedule`` keeps a function's parameters, size
variables and intermediate buffers, so both loop nests read and write the same buffers; only the
loop structure differs, so the result does not depend on the branch taken.  Users:
``cpu_vnni._par_branch`` (GEMM kernels over a symbolic row count) and ``cpu_default._size_branch``.
"""

from __future__ import annotations

from tvm import tirx


def join_schedules(cond, if_true: tirx.PrimFunc, if_false: tirx.PrimFunc) -> tirx.PrimFunc:
    """Two schedules of one PrimFunc as one: ``if_true``'s loop nest where ``cond`` (a PrimExpr over
    the function's size variables) holds, else ``if_false``'s, under one root block allocating the
    intermediates both use once.  The signature and attributes are ``if_false``'s."""
    from tvm import s_tir

    rt, rf = if_true.body.block, if_false.body.block
    allocs = list(rf.alloc_buffers) + [b for b in rt.alloc_buffers if not any(b.same_as(x) for x in rf.alloc_buffers)]
    root = s_tir.SBlock([], [], [], "root", tirx.IfThenElse(cond, rt.body, rf.body), None, allocs)
    return if_false.with_body(s_tir.SBlockRealize([], tirx.const(True, "bool"), root))
