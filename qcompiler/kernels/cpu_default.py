"""A default parallel/vectorized CPU schedule for every PrimFunc that no kernel of ours schedules.

After ``LegalizeOps`` + ``FuseOps`` + ``FuseTIR`` every PrimFunc of an integer model is a scalar
loop nest, and ``dlight.cpu`` only covers GEMV and softmax-like reductions (DESIGN.md §7).  Our
GEMM/conv kernels arrive scheduled (function attribute ``qc.scheduled``); this module schedules
the rest: requantization chains, clips, casts, shifts, pooling windows, reductions, transposes,
concats, slices, gathers, pads, integer softmax rows.

The schedule of one PrimFunc (rule ``cpu_default``):

1. ``normalize_prim_func``, then inline every injective block into its consumer (or, failing
   that, its producer): a requantization chain of six blocks becomes one, a pad becomes a guarded
   load inside the pooling window.
2. Each remaining root block:

   * spatial (injective) block -- fuse its loops (when they walk the written buffer in row-major
     order, the fused loop walks memory contiguously), split off a vector of
     ``L = vector_bits / widest_bits`` lanes (the largest power of two <= L dividing the extent,
     so no tail predicate; fewer than 2 lanes: no vectorization), and run the outer loop in
     parallel when the function does enough work to pay for a thread-pool launch;
   * reduction block -- spatial loops outside, reduction loops inside.  When the written buffer's
     innermost axis is also the innermost (unit-stride) axis of the dominant read (NHWC pooling,
     a sum over H and W in NHWC), that axis is split into vector lanes placed *inside* the
     reduction loops and vectorized (a vector of channels accumulates across the window); the
     other spatial loops are fused and parallel.  When the reduction runs along memory (NCHW
     pooling, row sums, global pooling in NCHW), the spatial loops are fused and parallel and the
     reduction loops stay innermost; reduction loops that walk the trailing axes of the read
     buffer completely are fused into one unit-stride loop, which LLVM vectorizes (integer
     reductions are associative, so it may).  Small windows are unrolled.  The reduction's init
     is split off (``decompose_reduction``) and vectorized alike.

Nothing here changes results: every primitive is checked by TVM (``parallel`` and ``vectorize``
refuse loops that carry a reduction), and a rule that fails on a function falls back to a simpler
one -- ``cpu_default.parallel`` (fuse and parallelize the spatial loops only), then
``cpu_default.outer`` (parallelize the outermost loop of each root block where TVM allows it) --
with a :class:`ScheduleWarning` logged on ``logging.getLogger("qcompiler")`` and returned in the
:class:`CPUScheduleReport`.  A function that every rule refuses is left as it was, unmarked.

Every function scheduled here gets ``qc.scheduled = True`` and ``qc.schedule_rule`` (the rule
that produced it).  Functions already scheduled (``qc.scheduled``, ``tirx.is_scheduled``, or any
parallel/vectorized/unrolled/thread-bound loop) are left alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import IRModule
from tvm.target import Target

logger = logging.getLogger("qcompiler")

SCHEDULED_ATTR = "qc.scheduled"
RULE_ATTR = "qc.schedule_rule"

_SCHEDULED_FOR_KINDS = (
    tirx.ForKind.PARALLEL,
    tirx.ForKind.VECTORIZED,
    tirx.ForKind.UNROLLED,
    tirx.ForKind.THREAD_BINDING,
)


# --------------------------------------------------------------------------------------------
# value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPUScheduleOptions:
    """Knobs of the default CPU schedule.

    vector_bits        width of one vector register (512 on AVX-512; from the target)
    max_vector_lanes   cap on the lanes of one vectorized loop
    min_parallel_work  loop iterations (spatial x reduction) of a block below which it runs
                       serially: a parallel launch costs ~5 us on these machines, which a
                       vectorized 50K-element loop does not earn back
    max_unroll         reduction windows with at most this many points are fully unrolled
    validate           lower each scheduled function through the TIR passes up to vectorization
                       and fall back to a simpler rule if that fails (catches problems at compile
                       time of the function rather than at build time of the whole model)
    """

    vector_bits: int = 512
    max_vector_lanes: int = 64
    min_parallel_work: int = 1 << 17
    max_unroll: int = 16
    validate: bool = True

    def __post_init__(self):
        if self.vector_bits < 64 or self.vector_bits & (self.vector_bits - 1):
            raise ValueError(f"vector_bits must be a power of two >= 64, got {self.vector_bits}")
        if self.max_vector_lanes < 1:
            raise ValueError(f"max_vector_lanes must be >= 1, got {self.max_vector_lanes}")
        if self.min_parallel_work < 0 or self.max_unroll < 0:
            raise ValueError("min_parallel_work and max_unroll must be >= 0")

    @staticmethod
    def for_target(target: Target, **overrides) -> "CPUScheduleOptions":
        """Options for an llvm target: the vector width LLVM reports for its ``mcpu``."""
        bits = 128
        try:
            from tvm.target.codegen import llvm_get_vector_width  # pylint: disable=import-outside-toplevel

            reported = int(llvm_get_vector_width(target))
            if reported >= 64:
                bits = reported
        except Exception:  # pylint: disable=broad-except
            pass
        return CPUScheduleOptions(**{"vector_bits": bits, **overrides})


@dataclass(frozen=True)
class ScheduleWarning:
    """A rule that failed (or was skipped) on one function; ``rule`` is the rule's name."""

    function: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.function}: {self.rule}: {self.message}"


@dataclass(frozen=True)
class CPUScheduleReport:
    """What :func:`schedule_cpu_default_report` did.

    mod        the module, scheduled
    applied    (function name, rule name) for every function scheduled here
    skipped    names of functions left alone (already scheduled, or not a PrimFunc of s_tir)
    failed     names of functions every rule refused (left unscheduled)
    warnings   one entry per rule that failed on a function
    """

    mod: IRModule
    applied: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...]
    failed: tuple[str, ...]
    warnings: tuple[ScheduleWarning, ...]


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def is_scheduled(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` carries a schedule already (ours, dlight's, or any annotated loop)."""
    attrs = func.attrs if func.attrs is not None else {}
    for key in (SCHEDULED_ATTR, "tirx.is_scheduled"):
        if key in attrs and bool(attrs[key]):
            return True
    found = False

    def _visit(node):
        nonlocal found
        if node.kind in _SCHEDULED_FOR_KINDS:
            found = True

    # (tvm.tirx has no stmt_functor.post_order_visit in 0.27: tvm_ffi.structural_walk is the walker)
    tvm_ffi.structural_walk(func.body, (tirx.For, _visit))
    return found


def schedule_cpu_default(
    mod: IRModule, target: Target | dict | str, options: CPUScheduleOptions | None = None
) -> IRModule:
    """Schedule every PrimFunc of ``mod`` lacking ``qc.scheduled``; warnings go to the log."""
    return schedule_cpu_default_report(mod, target, options).mod


def schedule_cpu_default_report(
    mod: IRModule, target: Target | dict | str, options: CPUScheduleOptions | None = None
) -> CPUScheduleReport:
    """As :func:`schedule_cpu_default`, and say which rule scheduled what and what failed."""
    target = _as_target(target)
    if target.kind.name != "llvm":
        raise ValueError(f"schedule_cpu_default needs an llvm target, got {target.kind.name!r}")
    options = options or CPUScheduleOptions.for_target(target)
    applied, skipped, failed, warnings = [], [], [], []
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gvar.name_hint
        if is_scheduled(func) or not _is_s_tir(func):
            skipped.append(name)
            continue
        new_func, rule, func_warnings = _schedule_func(name, func, options, target)
        warnings.extend(func_warnings)
        if rule is None:
            failed.append(name)
            continue
        updates[gvar] = new_func.with_attr(SCHEDULED_ATTR, True).with_attr(RULE_ATTR, rule)
        applied.append((name, rule))
    if updates:
        mod = mod.clone()
        for gvar, func in updates.items():
            mod[gvar] = func
    for w in warnings:
        logger.warning("cpu_default schedule: %s", w)
    return CPUScheduleReport(
        mod=mod,
        applied=tuple(applied),
        skipped=tuple(skipped),
        failed=tuple(failed),
        warnings=tuple(warnings),
    )


@tvm.transform.module_pass(opt_level=0, name="qc.CPUDefaultSchedule")
class CPUDefaultSchedule:  # pylint: disable=too-few-public-methods
    """Module pass: :func:`schedule_cpu_default` with a fixed target (place it after
    ``FuseTIR`` in the Relax pipeline, before the dataflow lowering passes)."""

    def __init__(self, target: Target | dict | str, options: CPUScheduleOptions | None = None):
        self.target = _as_target(target)
        self.options = options

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return schedule_cpu_default(mod, self.target, self.options)


# --------------------------------------------------------------------------------------------
# driver: one function, rules from the best to the simplest
# --------------------------------------------------------------------------------------------


def _as_target(target) -> Target:
    return target if isinstance(target, Target) else Target(target)


def _is_s_tir(func: tirx.PrimFunc) -> bool:
    """A schedulable function has a root block (s_tir); a lowered one does not."""
    return isinstance(func.body, s_tir.SBlockRealize)


def _schedule_func(name, func, options, target):
    """Try the rules in order; return (new func, rule name or None, warnings)."""
    warnings = []
    rules: list[tuple[str, Callable]] = [
        ("cpu_default", _rule_default),
        ("cpu_default.parallel", _rule_parallel),
        ("cpu_default.outer", _rule_outer),
    ]
    for rule_name, rule in rules:
        try:
            sch = s_tir.Schedule(func, error_render_level="fast")
            if not rule(sch, options):
                continue
            new_func = sch.mod["main"]
            if options.validate:
                _validate(new_func, target)
            return new_func, rule_name, warnings
        except Exception as err:  # pylint: disable=broad-except
            msg = str(err).strip().splitlines()
            msg = msg[-1] if msg else type(err).__name__
            warnings.append(ScheduleWarning(name, rule_name, f"{type(err).__name__}: {msg}"))
    return func, None, warnings


_VALIDATE_PASSES = None


def _validate(func: tirx.PrimFunc, target: Target) -> None:
    """Lower ``func`` through the s_tir passes up to vectorization (no code generation)."""
    global _VALIDATE_PASSES  # pylint: disable=global-statement
    if _VALIDATE_PASSES is None:
        _VALIDATE_PASSES = tvm.transform.Sequential(
            [
                s_tir.transform.CanonicalizeLoop(),
                s_tir.transform.LowerInitBlock(),
                s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
                s_tir.transform.ConvertBlocksToOpaque(),
                s_tir.transform.CompactBufferAllocation(),
                s_tir.transform.LowerMatchBuffer(),
                s_tir.transform.LowerOpaqueBlock(),
                tirx.transform.FlattenBuffer(),
                tirx.transform.NarrowDataType(32),
                tirx.transform.VectorizeLoop(True),
            ]
        )
    mod = IRModule({"main": func.with_attr("target", target)})
    _VALIDATE_PASSES(mod)


# --------------------------------------------------------------------------------------------
# analysis helpers
# --------------------------------------------------------------------------------------------


def _int_extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n (1 if n is odd)."""
    v = 1
    while v * 2 <= cap and n % (v * 2) == 0:
        v *= 2
    return v


def _block_bits(block: s_tir.SBlock) -> int:
    """Widest element type (bits) the block reads or writes; 8 at least."""
    bits = 8
    for region in list(block.reads) + list(block.writes):
        dtype = tvm.DataType(region.source.dtype)
        bits = max(bits, dtype.bits * max(1, dtype.lanes))
    return bits


def _lanes(options: CPUScheduleOptions, block: s_tir.SBlock) -> int:
    return max(1, min(options.max_vector_lanes, options.vector_bits // _block_bits(block)))


def _loop_iter_map(sch, block_rv, loops):
    """For each loop: (block iter var, iter type) it binds, or (None, None) if not trivial."""
    block = sch.get(block_rv)
    realize_stmt = _get_sblock_realize(sch, block_rv)
    loop_vars = [sch.get(lp).loop_var for lp in loops]
    result = []
    for lv in loop_vars:
        found = (None, None)
        for iv, val in zip(block.iter_vars, realize_stmt.iter_values):
            if isinstance(val, tirx.Var) and val.same_as(lv):
                found = (iv.var, iv.iter_type)
                break
        result.append(found)
    return result


def _get_sblock_realize(sch, block_rv):
    return tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block_rv)


def _is_var(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _uses_var(expr, var) -> bool:
    found = False

    def _visit(node):
        nonlocal found
        if node.same_as(var):
            found = True

    tvm_ffi.structural_walk(expr, (tirx.Var, _visit))
    return found


def _unit_stride_last(region, var) -> bool:
    """``var`` indexes the last axis of ``region`` with coefficient 1 and no other axis."""
    idx = [r.min for r in region.region]
    if not idx:
        return False
    last = idx[-1]
    if any(_uses_var(e, var) for e in idx[:-1]):
        return False
    if _is_var(last, var):
        return True
    # var + (expression free of var), e.g. ow + rw
    if isinstance(last, tirx.Add):
        a, b = last.a, last.b
        return (_is_var(a, var) and not _uses_var(b, var)) or (
            _is_var(b, var) and not _uses_var(a, var)
        )
    return False


def _writes_row_major(block: s_tir.SBlock, iter_vars_in_loop_order) -> bool:
    """The single written region is indexed by the (non-unit) loop iter vars in loop order."""
    if len(block.writes) != 1:
        return False
    idx = [r.min for r in block.writes[0].region]
    shape = list(block.writes[0].source.shape)
    wanted = [v for v in iter_vars_in_loop_order if v is not None]
    got = []
    for e, dim in zip(idx, shape):
        if isinstance(dim, tirx.IntImm) and int(dim) == 1:
            continue
        if not isinstance(e, tirx.Var):
            return False
        got.append(e)
    # unit loops bind iter vars that may not appear; compare the vars that do appear in order
    present = [v for v in wanted if any(g.same_as(v) for g in got)]
    return len(present) == len(got) and all(a.same_as(b) for a, b in zip(present, got))


def _work(sch, loops) -> int | None:
    total = 1
    for lp in loops:
        ext = _int_extent(sch, lp)
        if ext is None:
            return None
        total *= ext
    return total


# --------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------


def _normalized_root_blocks(sch):
    from tvm.s_tir.dlight.analysis import normalize_prim_func  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.dlight.base import try_inline  # pylint: disable=import-outside-toplevel

    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    if len(infos) > 1:
        infos = try_inline(sch, infos)
    return [info.block_rv for info in infos]


def _rule_default(sch, options) -> bool:
    blocks = _normalized_root_blocks(sch)
    if blocks is None:
        return False
    for block_rv in blocks:
        loops = sch.get_loops(block_rv)
        if not loops:
            continue
        kinds = [k for _, k in _loop_iter_map(sch, block_rv, loops)]
        if any(k is None for k in kinds):
            _schedule_outer(sch, block_rv, options)
        elif all(k == tirx.IterVar.DataPar for k in kinds):
            _schedule_spatial(sch, block_rv, options)
        elif all(k in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce) for k in kinds):
            _schedule_reduction(sch, block_rv, options)
        else:
            _schedule_outer(sch, block_rv, options)
    return True


def _rule_parallel(sch, options) -> bool:
    """Fallback 1: fuse the leading spatial loops of each (normalized) root block, parallel."""
    blocks = _normalized_root_blocks(sch)
    if blocks is None:
        return False
    for block_rv in blocks:
        loops = sch.get_loops(block_rv)
        if not loops:
            continue
        work = _work(sch, loops)
        if work is None or work < options.min_parallel_work:
            continue
        kinds = [k for _, k in _loop_iter_map(sch, block_rv, loops)]
        lead = []
        for lp, k in zip(loops, kinds):
            if k != tirx.IterVar.DataPar:
                break
            lead.append(lp)
        if lead:
            sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
    return True


def _rule_outer(sch, options) -> bool:
    """Fallback 2: parallelize the outermost loop of each root block where TVM allows it."""
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    for block_rv in sch.get_child_blocks(root):
        _schedule_outer(sch, block_rv, options)
    return True


def _schedule_outer(sch, block_rv, options) -> None:
    loops = sch.get_loops(block_rv)
    if not loops:
        return
    work = _work(sch, loops)
    if work is None or work < options.min_parallel_work:
        return
    try:
        sch.parallel(loops[0])
    except Exception:  # pylint: disable=broad-except
        pass  # the outermost loop carries a dependence: leave the block serial


def _schedule_spatial(sch, block_rv, options) -> None:
    """Injective block: fuse, vectorize the contiguous tail, parallel outer chunk."""
    loops = sch.get_loops(block_rv)
    block = sch.get(block_rv)
    lanes = _lanes(options, block)
    extents = [_int_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):  # symbolic shapes: parallel only
        _schedule_outer(sch, block_rv, options)
        return
    total = math.prod(extents)
    ivars = [v for v, _ in _loop_iter_map(sch, block_rv, loops)]
    if _writes_row_major(block, ivars):
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        vec = _pow2_divisor(total, lanes)
        outer_loops = []
    else:
        # vectorize the innermost loop only; fuse the others for parallelism
        fused = loops[-1]
        vec = _pow2_divisor(extents[-1], lanes)
        outer_loops = loops[:-1]
    if vec >= 2:
        if vec < _int_extent(sch, fused):
            outer, inner = sch.split(fused, factors=[None, vec])
        else:
            outer, inner = None, fused
        sch.vectorize(inner)
    else:
        outer = fused
    par_loops = outer_loops + ([outer] if outer is not None else [])
    if par_loops and total >= options.min_parallel_work:
        sch.parallel(sch.fuse(*par_loops) if len(par_loops) > 1 else par_loops[0])


def _schedule_reduction(sch, block_rv, options) -> None:
    """Reduction block: parallel spatial outside, reduction inside, vector lanes on the
    innermost contiguous spatial axis when the reduction does not run along memory."""
    loops = sch.get_loops(block_rv)
    block = sch.get(block_rv)
    lanes = _lanes(options, block)
    binds = _loop_iter_map(sch, block_rv, loops)
    s_loops = [lp for lp, (_, k) in zip(loops, binds) if k == tirx.IterVar.DataPar]
    r_loops = [lp for lp, (_, k) in zip(loops, binds) if k == tirx.IterVar.CommReduce]
    s_vars = [v for v, k in binds if k == tirx.IterVar.DataPar]
    r_vars = [v for v, k in binds if k == tirx.IterVar.CommReduce]
    extents = [_int_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents) or not r_loops:
        _schedule_outer(sch, block_rv, options)
        return
    work = math.prod(extents)
    s_ext = {lp: _int_extent(sch, lp) for lp in s_loops}
    sch.reorder(*s_loops, *r_loops)

    # the spatial axis that is innermost in the output and unit-stride in the dominant read
    vec_loop, vec = None, 1
    if len(block.writes) == 1 and block.writes[0].region:
        last = block.writes[0].region[-1].min
        for lp, var in zip(s_loops, s_vars):
            if _is_var(last, var) and s_ext[lp] > 1:
                reads = [r for r in block.reads if any(_uses_var(x.min, var) for x in r.region)]
                if reads and all(_unit_stride_last(r, var) for r in reads):
                    vec_loop, vec = lp, _pow2_divisor(s_ext[lp], lanes)
                break
    if vec_loop is not None and vec >= 2:
        rest = [lp for lp in s_loops if not lp.same_as(vec_loop)]
        if vec < s_ext[vec_loop]:
            v_out, v_in = sch.split(vec_loop, factors=[None, vec])
            outer_list = rest + [v_out]
        else:
            v_in = vec_loop
            outer_list = rest
        sch.reorder(*outer_list, *r_loops, v_in)
        outer = sch.fuse(*outer_list) if len(outer_list) > 1 else (outer_list[0] if outer_list else None)
        if outer is not None and work >= options.min_parallel_work:
            sch.parallel(outer)
        _unroll_small_window(sch, r_loops, options)
        init = sch.decompose_reduction(block_rv, r_loops[0])
        sch.vectorize(v_in)
        init_loops = sch.get_loops(init)
        if init_loops:
            sch.vectorize(init_loops[-1])
        return

    # reduction along memory: fuse reduction loops that walk the trailing read axes completely
    r_loops = _fuse_contiguous_reduction(sch, block, r_loops, r_vars)
    outer = sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0] if s_loops else None
    if outer is not None and work >= options.min_parallel_work:
        sch.parallel(outer)
    _unroll_small_window(sch, r_loops, options)
    sch.decompose_reduction(block_rv, r_loops[0])


def _fuse_contiguous_reduction(sch, block, r_loops, r_vars):
    """Fuse the reduction loops when every read indexes its trailing axes with exactly the
    reduction vars in loop order, each covering its axis completely (a row-major walk)."""
    if len(r_loops) < 2:
        return r_loops
    n = len(r_vars)
    for region in block.reads:
        idx = [r.min for r in region.region]
        if not any(_uses_var(e, v) for e in idx for v in r_vars):
            continue
        if len(idx) < n:
            return r_loops
        shape = list(region.source.shape)
        for e, v, dim, lp in zip(idx[-n:], r_vars, shape[-n:], r_loops):
            if not _is_var(e, v) or not isinstance(dim, tirx.IntImm):
                return r_loops
            if int(dim) != _int_extent(sch, lp):
                return r_loops
        if any(_uses_var(e, v) for e in idx[:-n] for v in r_vars):
            return r_loops
    return [sch.fuse(*r_loops)]


def _unroll_small_window(sch, r_loops, options) -> None:
    exts = [_int_extent(sch, lp) for lp in r_loops]
    if len(r_loops) >= 1 and all(e is not None for e in exts) and math.prod(exts) <= options.max_unroll:
        for lp in r_loops:
            sch.unroll(lp)
