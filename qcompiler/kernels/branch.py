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
    the function's size variables) holds, else ``if_false``'s.  The signature and attributes are
    ``if_false``'s.

    Each branch has intermediate buffers of its own (``_fresh_copy``): one buffer used in both
    branches would be allocated above the ``if`` at its whole size, where TVM otherwise places it in
    the tile loop that uses it and compacts it to one tile (a GEMM's int32 accumulators: a register
    tile, not a batch x M x N array in memory; found by the compile time, ~9x that of one
    schedule).  Where no such copy can be made, the branches share them."""
    from tvm import s_tir

    rf = if_false.body.block
    copy = _fresh_copy(if_true, if_false)
    if copy is not None:
        rt, match = copy
        blk = s_tir.SBlock([], [], [], "if_true", rt.body, None, list(rt.alloc_buffers), match)
        body = tirx.IfThenElse(cond, s_tir.SBlockRealize([], tirx.const(True, "bool"), blk), rf.body)
        allocs = list(rf.alloc_buffers)
    else:
        rt = if_true.body.block
        body = tirx.IfThenElse(cond, rt.body, rf.body)
        allocs = list(rf.alloc_buffers) + [b for b in rt.alloc_buffers
                                           if not any(b.same_as(x) for x in rf.alloc_buffers)]
    root = s_tir.SBlock([], [], [], "root", body, None, allocs)
    return if_false.with_body(s_tir.SBlockRealize([], tirx.const(True, "bool"), root))


def _fresh_copy(if_true: tirx.PrimFunc, if_false: tirx.PrimFunc):
    """``if_true``'s root block with fresh buffers, written over ``if_false``'s parameters ->
    (block, match_buffers), or None.

    ``s_tir.renew_defs`` copies the function with new buffers and size variables; ``specialize`` on
    the parameters whose dims are constants or plain variables maps its size variables back onto
    ``if_false``'s (TVM 0.27: a PrimFunc's parameters are its buffers; specialize keeps them, now
    shaped in ``if_false``'s variables); the block's match_buffers then bind each onto
    ``if_false``'s."""
    from tvm import ir, s_tir

    def plain(buf):
        return all(isinstance(d, (tirx.IntImm, tirx.Var)) for d in buf.shape)

    try:
        fresh = s_tir.renew_defs(if_true)
        t = fresh.specialize({pt: pf for pt, pf in zip(fresh.params, if_false.params) if plain(pt)})
        match = [s_tir.MatchBufferRegion(pt, tirx.BufferRegion(pf, [ir.Range.from_min_extent(0, d) for d in pf.shape]))
                 for pt, pf in zip(t.params, if_false.params)]
    except Exception:  # noqa: BLE001 - e.g. a size variable only in composite dims: share the buffers
        return None
    return t.body.block, match
