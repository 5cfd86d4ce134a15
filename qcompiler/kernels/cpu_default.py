"""A default parallel/vectorized CPU schedule for every PrimFunc that no kernel of ours schedules.

After ``LegalizeOps`` + ``FuseOps`` + ``FuseTIR`` every PrimFunc of an integer model is a scalar
loop nest, and ``dlight.cpu`` only covers GEMV and softmax-like reductions (docs/design.md §5).  Our
GEMM/conv kernels arrive scheduled (function attribute ``qc.scheduled``); this module schedules
the rest: requantization chains, clips, casts, shifts, pooling windows, reductions, transposes,
concats, slices, gathers, pads, integer softmax rows.

The schedule of one PrimFunc (rule ``cpu_default``):

1. ``normalize_prim_func``, then inline injective blocks into their consumers: a requantization
   chain of six loop nests becomes one.  Into a reduction only cheap, unguarded producers (a
   cast) are inlined: a pad stays a pass of its own, which vectorizes, rather than nine guarded
   loads per pooling window, which do not.  A value read more than once is inlined only while its
   readers' expressions stay small (``max_inline_expr`` nodes): the Newton steps of an integer
   square root each read the previous step three times, and inlined they are 3^steps copies per
   output element (``_inline_stays_small``).
2. Each remaining root block:

   * spatial (injective) block -- find the longest run of innermost loops that is *clean*: every
     access indexes those loops' variables as its trailing axes, bare, in order, spanning them
     completely (or broadcasts along them), and no ``if_then_else`` condition depends on them.
     Fuse that run (after FlattenBuffer its index is the fused variable itself), split off a
     vector of ``L`` lanes -- ``L = vector_bits / widest type``, the widest type counting casts
     of loaded data (an int32 -> int64 -> int8 requantization chain: 8 lanes on AVX-512; 32
     lanes made LLVM emit scalar code, 14x slower), the largest power of two <= L dividing the
     run, so no tail predicate -- vectorize it, and fuse + parallelize the loops outside.  With
     no clean run (a pad's guarded innermost axis, a transpose, a strided slice) the innermost
     loop stays serial for LLVM's loop vectorizer, and only the loops outside are parallel
     (fusing every loop into one had put div/mod into the body and made a pad 160x slower).
   * reduction block -- spatial loops outside, reduction loops inside, and:
       - a clean innermost run of spatial loops (NHWC channels, the C of a sum over H, W in
         NHWC) becomes vector lanes *inside* the (unrolled, if small) reduction loops;
       - else a small window sliding along the output row (NCHW pooling) gets the row cut into
         chunks of <= 8 outputs, each a serial loop inside the unrolled window, for LLVM to
         vectorize with interleaved loads (TVM's own strided vector loads become per-lane scalar
         loads);
       - else the reduction runs along memory (row sums, global pooling in NCHW): reduction
         loops that walk the read's trailing axes completely are fused into one unit-stride
         loop, which LLVM vectorizes (integer reductions are associative, so it may).
     ``decompose_reduction`` comes last (after parallel/vectorize, which it would block).
   * parallelism -- the fused outer loops run in parallel when the block has at least
     ``min_parallel_work`` vector iterations (2x that for pure copies and loops left to LLVM:
     LLVM loses the buffers' noalias facts inside TVM's parallel closure).

Nothing here changes results: every primitive is checked by TVM (``parallel`` and ``vectorize``
refuse loops that carry a reduction).  Each scheduled function is lowered through the s_tir
passes up to ``VectorizeLoop`` (``CPUScheduleOptions.validate``); if TVM scalarized one of its
vector loops it is rescheduled without vectorization.  A rule that fails on a function falls
back to a simpler one -- ``cpu_default.parallel`` (fuse and parallelize the spatial loops but the
innermost), then ``cpu_default.outer`` (parallelize the outermost loop of each root block where
TVM allows it) -- with a :class:`ScheduleWarning` logged on ``logging.getLogger("qcompiler")``
and returned in the :class:`CPUScheduleReport`.  A function that every rule refuses is left as
it was, unmarked, and reported in ``CPUScheduleReport.failed``.

Every function scheduled here gets ``qc.scheduled = True`` and ``qc.schedule_rule`` (the rule
that produced it); a loop left serial on purpose carries the annotation ``qc.loop``
(``"llvm_vectorize"`` or ``"serial"``), which ``qcompiler.tir_scan`` counts as scheduled.
Functions already scheduled (``qc.scheduled``, ``tirx.is_scheduled``, or any
parallel/vectorized/unrolled/thread-bound loop) are left alone.

Measured on 2 shared Zen 5 cores (single thread, median us, unscheduled -> scheduled): requant
chain 1x64x112x112 int32->int8 375 -> 41; 3x3/2 max pool NCHW 1x64x112x112 int8 188 -> 44-65;
global sum NCHW 1x256x56x56 188 -> 28, NHWC 1207 -> 71; ``where`` 84 -> 6.6; NHWC max pool and
pads stay at LLVM's unscheduled speed (already vectorized by LLVM).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

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
    min_parallel_work  iterations of a block's loop nest (spatial x reduction, a vector of lanes
                       counting once) below which it runs serially: a parallel launch costs a
                       few us (more on a loaded machine), which ~16K vector iterations (~5 us)
                       do not earn back; 2x that for a pure copy (pad, concat, slice) or a loop
                       left to LLVM's vectorizer (counted with the lanes of its widest type)
    max_unroll         reduction windows with at most this many points are fully unrolled
    max_inline_expr    a value read more than once is inlined into its readers only while each
                       reader's expression stays within this many nodes (chains of values read
                       several times -- Newton steps -- otherwise grow exponentially)
    vectorize          let the schedule vectorize (off: parallel and unroll only)
    validate           lower each scheduled function through the TIR passes up to vectorization;
                       fall back to a simpler rule if that fails (a problem surfaces here, per
                       function, rather than in the build of the whole model), and drop the
                       vectorization of a function whose vector loop TVM scalarized
    """

    vector_bits: int = 512
    max_vector_lanes: int = 64
    min_parallel_work: int = 1 << 14
    max_unroll: int = 16
    max_inline_expr: int = 256
    vectorize: bool = True
    validate: bool = True

    def __post_init__(self):
        if self.vector_bits < 64 or self.vector_bits & (self.vector_bits - 1):
            raise ValueError(f"vector_bits must be a power of two >= 64, got {self.vector_bits}")
        if self.max_vector_lanes < 1:
            raise ValueError(f"max_vector_lanes must be >= 1, got {self.max_vector_lanes}")
        if self.min_parallel_work < 0 or self.max_unroll < 0:
            raise ValueError("min_parallel_work and max_unroll must be >= 0")
        if self.max_inline_expr < 1:
            raise ValueError(f"max_inline_expr must be >= 1, got {self.max_inline_expr}")

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
    notes      refinements that are not failures (a vector loop TVM would scalarize, e.g. over
               a call it cannot vectorize such as ``round``, rescheduled as rule
               ``<rule>.novector``: the serial loop is left to LLVM)
    """

    mod: IRModule
    applied: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...]
    failed: tuple[str, ...]
    warnings: tuple[ScheduleWarning, ...]
    notes: tuple[str, ...] = ()


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
    applied, skipped, failed, warnings, notes = [], [], [], [], []
    updates = {}
    bounds = _upper_bounds(mod)
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gvar.name_hint
        if is_scheduled(func) or not _is_s_tir(func):
            skipped.append(name)
            continue
        branched = _size_branch(name, func, options, target, bounds) if bounds else None
        new_func, rule, func_warnings = branched or _schedule_func(name, func, options, target)
        warnings.extend(func_warnings)
        if rule is not None and rule.endswith(".novector"):
            notes.append(f"{name}: TVM would scalarize its vector loop; left to LLVM ({rule})")
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
    for n in notes:
        logger.debug("cpu_default schedule: %s", n)
    return CPUScheduleReport(
        mod=mod,
        applied=tuple(applied),
        skipped=tuple(skipped),
        failed=tuple(failed),
        warnings=tuple(warnings),
        notes=tuple(notes),
    )


def _upper_bounds(mod: IRModule) -> dict[str, int]:
    """Symbolic dim name -> its largest size, from the Relax functions' ``tir_var_upper_bound``
    (a library with symbolic dims, qcompiler/lowering/relax_lower.py)."""
    from tvm import relax  # pylint: disable=import-outside-toplevel

    out: dict[str, int] = {}
    for _, f in mod.functions_items():
        if isinstance(f, relax.Function) and f.attrs is not None and "tir_var_upper_bound" in f.attrs:
            out.update({str(k): int(v) for k, v in f.attrs["tir_var_upper_bound"].items()})
    return out


def _size_branch(name, func, options, target, bounds: dict):
    """A function over symbolic dims, scheduled for its whole range (qcompiler/symbolic.py).

    Its blocks' serial / parallel choices depend on their work, which the schedule judges at the
    dims' representative sizes (``_rep_work``): one choice for every size of the range, a parallel
    launch per call at the small sizes (several us: more than a small kernel) or serial loops at
    the large ones (half the speed on 2 cores).  When its largest buffer (the output, or a
    reduction's input) holds at least ``16 * min_parallel_work`` elements at the range's largest
    sizes, the function is scheduled at the smallest sizes (every dim 1: serial) and at the
    largest, and if the two differ they are
    joined under a run-time test of that buffer's size against that threshold
    (``kernels/branch.py``): a static kernel of each size would have
    made the same choice (``_schedule_symbolic``).  Both bodies compute the same function.
    Returns (function, rule, warnings) as ``_schedule_func``, or None where this does not apply.
    """
    from tvm import relax  # pylint: disable=import-outside-toplevel
    from tvm.tirx.analysis import undefined_vars  # pylint: disable=import-outside-toplevel

    from qcompiler.tune.workload import REP_ROWS, rows_at, rows_bucket  # pylint: disable=import-outside-toplevel

    if relax.analysis.has_reshape_pattern(func):
        return None  # (a reshape becomes a view, RewriteDataflowReshape: it must stay recognizable)
    threshold = options.min_parallel_work * 16
    size, hi = None, -1  # the largest buffer's elements (a reduction's input, else the output), symbolic
    for p in func.params:
        shape = list(getattr(p.ty, "shape", None) or [])
        free = {v.name for d in shape if not isinstance(d, tirx.IntImm) for v in undefined_vars(d)}
        if not free:
            continue
        if not free <= set(bounds):
            return None
        n = tirx.const(1, "int64")
        for d in shape:
            n = n * tirx.Cast("int64", d)
        n = tvm.sym.Analyzer().simplify(n)
        try:
            with rows_at({**REP_ROWS, **bounds}):
                at_hi = rows_bucket(n)
        except (ValueError, TypeError):
            return None
        if at_hi > hi:
            size, hi = n, at_hi
    if size is None or hi < threshold:
        return None
    with rows_at({**REP_ROWS, **{k: 1 for k in bounds}}):
        small, rule_s, _ = _schedule_func(name, func, options, target)
    with rows_at({**REP_ROWS, **bounds}):
        large, rule_l, warn_l = _schedule_func(name, func, options, target)
    if rule_s is None or rule_l is None:
        return None
    if tvm_ffi.structural_equal(small, large):
        return large, rule_l, warn_l
    from .branch import join_schedules  # pylint: disable=import-outside-toplevel

    return join_schedules(size < tirx.const(threshold, "int64"), small, large), rule_l, warn_l


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
            new_func = _apply(rule, func, options)
            if new_func is None:
                continue
            if options.validate:
                lowered = _validate(new_func, target)
                if options.vectorize and _scalarized(new_func, lowered):
                    # TVM gave up on a vector loop (lanes disagree on a condition, a call it
                    # cannot vectorize): the serial loop LLVM vectorizes itself does better
                    new_func = _apply(rule, func, replace(options, vectorize=False))
                    if new_func is None:
                        continue
                    _validate(new_func, target)
                    return new_func, rule_name + ".novector", warnings
            return new_func, rule_name, warnings
        except Exception as err:  # pylint: disable=broad-except
            msg = str(err).strip().splitlines()
            msg = msg[-1] if msg else type(err).__name__
            warnings.append(ScheduleWarning(name, rule_name, f"{type(err).__name__}: {msg}"))
    return func, None, warnings


def _apply(rule, func, options):
    sch = s_tir.Schedule(func, error_render_level="fast")
    if not rule(sch, options):
        return None
    return sch.mod["main"]


def _loop_names(func, kinds=None, annotation: str | None = None) -> set[str]:
    names = set()

    def _visit(node):
        if (kinds is None or node.kind in kinds) and (annotation is None or annotation in node.annotations):
            names.add(str(node.loop_var.name))

    tvm_ffi.structural_walk(func.body, (tirx.For, _visit))
    return names


def _scalarized(func: tirx.PrimFunc, lowered: IRModule) -> bool:
    """Whether VectorizeLoop turned one of ``func``'s vectorized loops into a serial loop
    (it names the scalar loop after the vector one, with a ``.s`` / ``_s`` suffix)."""
    vec = _loop_names(func, (tirx.ForKind.VECTORIZED,))
    if not vec:
        return False
    after = _loop_names(lowered["main"])
    tails = _loop_names(func, (tirx.ForKind.VECTORIZED,), TAIL_VECTOR)
    scalar = {n for n in vec if n + ".s" in after or n + "_s" in after}
    if scalar & tails:  # a tail loop is scalar by design; its whole vectors must not be
        counts: dict[str, int] = {}

        def _count(node):
            counts[str(node.loop_var.name)] = counts.get(str(node.loop_var.name), 0) + 1

        tvm_ffi.structural_walk(lowered["main"].body, (tirx.For, _count))
        if any(counts.get(n + "_s", 0) + counts.get(n + ".s", 0) > 1 for n in tails):
            return True
    return bool(scalar - tails)


_VALIDATE_PASSES = None


def _validate(func: tirx.PrimFunc, target: Target) -> IRModule:
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
                s_tir.transform.LoopPartition(),  # as TVM's pipeline (_tail_vector)
                tirx.transform.VectorizeLoop(True),
            ]
        )
    mod = IRModule({"main": func.with_attr("target", target)})
    return _VALIDATE_PASSES(mod)


# --------------------------------------------------------------------------------------------
# analysis helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Access:
    """One buffer access in a block body: the buffer's shape and the index expressions."""

    buffer: object
    shape: tuple
    indices: tuple
    is_write: bool


def _dtype_of(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, tvm.ir.PrimType) else None


def _bits(dtype: str) -> int:
    dt = tvm.DataType(dtype)
    return max(8, dt.bits * max(1, dt.lanes))


def _contains_load(expr) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, (tvm.ir.TensorLoad, found.append))
    return bool(found)


def _widest_data_bits(block: s_tir.SBlock) -> int:
    """Widest element type the block computes with: the buffers it touches and every cast of
    loaded data (a requantization chain reads int32 and writes int8 but multiplies in int64).
    Index arithmetic (int64 loop variables, narrowed to int32 later) does not count."""
    bits = 8
    for region in list(block.reads) + list(block.writes):
        bits = max(bits, _bits(region.source.dtype))

    def _cast(node):
        nonlocal bits
        dtype = _dtype_of(node)
        if dtype is not None and _contains_load(node.value):
            bits = max(bits, _bits(dtype))

    for stmt in (block.body, block.init):
        if stmt is not None:
            tvm_ffi.structural_walk(stmt, (tirx.Cast, _cast))
    return bits


def _lanes(options: CPUScheduleOptions, block: s_tir.SBlock) -> int:
    """One vector register of the widest type: more lanes than that made LLVM split an int64
    requantization chain into scalar code (8 lanes: 38 us, 32 lanes: 553 us, 1x64x112x112)."""
    return max(1, min(options.max_vector_lanes, options.vector_bits // _widest_data_bits(block)))


def _accesses(block: s_tir.SBlock) -> list[_Access] | None:
    """Every load and the store of a block whose body is one BufferStore; None otherwise."""
    body = block.body
    if not isinstance(body, tirx.BufferStore):
        return None
    out = [_Access(body.buffer, tuple(body.buffer.shape), tuple(body.indices), True)]

    def _load(node):
        out.append(_Access(node.source, tuple(node.source.shape), tuple(node.indices), False))

    tvm_ffi.structural_walk(body.value, (tvm.ir.TensorLoad, _load))
    for idx in body.indices:
        tvm_ffi.structural_walk(idx, (tvm.ir.TensorLoad, _load))
    return out


def _condition_vars(block: s_tir.SBlock) -> list:
    """Variables used in the condition of an ``if_then_else`` (pad, concat): TVM scalarizes a
    vectorized loop whose lanes disagree on such a condition."""
    conds = []

    def _call(node):
        op = getattr(node, "op", None)
        name = getattr(op, "name", "") or ""
        if name.endswith("if_then_else") and len(node.args) == 3:
            conds.append(node.args[0])

    tvm_ffi.structural_walk(block.body, (tvm.ir.Call, _call))
    out = []
    for cond in conds:
        tvm_ffi.structural_walk(cond, (tirx.Var, out.append))
    return out


def _int_extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n (1 if n is odd)."""
    v = 1
    while v * 2 <= cap and n % (v * 2) == 0:
        v *= 2
    return v


def _get_sblock_realize(sch, block_rv):
    return tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block_rv)


def _loop_iter_map(sch, block_rv, loops):
    """For each loop: (block iter var, iter type) it binds alone, or (None, None)."""
    block = sch.get(block_rv)
    realize = _get_sblock_realize(sch, block_rv)
    result = []
    for lp in loops:
        lv = sch.get(lp).loop_var
        found = (None, None)
        for iv, val in zip(block.iter_vars, realize.iter_values):
            if isinstance(val, tirx.Var) and val.same_as(lv):
                found = (iv.var, iv.iter_type)
                break
        result.append(found)
    return result


def _is_var(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _uses_any(expr, variables) -> bool:
    found = []

    def _visit(node):
        if any(node.same_as(v) for v in variables):
            found.append(node)

    tvm_ffi.structural_walk(expr, (tirx.Var, _visit))
    return bool(found)


def _is_unit(dim) -> bool:
    return isinstance(dim, tirx.IntImm) and int(dim) == 1


def _suffix_ok(accesses, suffix_vars, suffix_ext, dirty) -> bool:
    """Whether fusing the loops of ``suffix_vars`` (outer to inner, non-unit) walks every
    access either contiguously or uniformly (broadcast), so a vector of lanes along the fused
    loop becomes one vector load/store per access after FlattenBuffer (see module docs)."""
    if any(any(v.same_as(d) for d in dirty) for v in suffix_vars):
        return False
    for acc in accesses:
        used = []  # (dim, suffix position)
        for dim, idx in enumerate(acc.indices):
            if not _uses_any(idx, suffix_vars):
                continue
            pos = next((j for j, v in enumerate(suffix_vars) if _is_var(idx, v)), None)
            if pos is None:
                return False  # a suffix var under arithmetic (stride, offset, gather)
            used.append((dim, pos))
        if acc.is_write and len(used) != len(suffix_vars):
            return False
        if not used:
            continue
        dims = [d for d, _ in used]
        poss = [p for _, p in used]
        if poss != list(range(poss[0], poss[0] + len(poss))):
            return False  # not a consecutive run of the suffix, in loop order
        # the used dims must be consecutive non-unit dims and be the innermost non-unit dims
        last_dim = dims[-1]
        between = [d for d in range(dims[0], last_dim + 1) if d not in dims]
        if any(not _is_unit(acc.shape[d]) for d in between):
            return False
        if any(not _is_unit(acc.shape[d]) for d in range(last_dim + 1, len(acc.shape))):
            return False
        # all used dims but the outermost span the loop completely
        for d, p in used[1:]:
            if not isinstance(acc.shape[d], tirx.IntImm) or int(acc.shape[d]) != suffix_ext[p]:
                return False
    return True


def _suffix_vec(accesses, suffix_vars, suffix_ext, lanes) -> int:
    """Lanes for the fused suffix: a power of two dividing its extent, and for each access
    that broadcasts along the trailing suffix loops (a per-channel vector in NCHW), dividing
    their extent so that all lanes read one element; and for each access that only uses a
    trailing run, dividing that run (lanes stay inside one contiguous row)."""
    vec = _pow2_divisor(math.prod(suffix_ext), lanes)
    for acc in accesses:
        poss = [
            j
            for idx in acc.indices
            for j, v in enumerate(suffix_vars)
            if _is_var(idx, v)
        ]
        if not poss:
            continue
        post = math.prod(suffix_ext[max(poss) + 1 :])
        run = math.prod(suffix_ext[min(poss) : max(poss) + 1])
        need = post if post > 1 else (run if min(poss) > 0 else math.prod(suffix_ext))
        while vec > 1 and need % vec:
            vec //= 2
    return vec


def _vector_suffix(sch, block_rv, loops, lanes):
    """The longest run of innermost loops that vectorizes cleanly: (start index, lanes).
    Start index == len(loops) when not even the innermost loop does."""
    block = sch.get(block_rv)
    accesses = _accesses(block)
    binds = _loop_iter_map(sch, block_rv, loops)
    extents = [_int_extent(sch, lp) for lp in loops]
    if accesses is None or any(v is None for v, _ in binds):
        return len(loops), 1
    # only loops of a static extent, inside the last symbolic one (a symbolic row count over a
    # static hidden size: the hidden size vectorizes as in a static kernel)
    first = max((i + 1 for i, e in enumerate(extents) if e is None), default=0)
    dirty = _condition_vars(block)
    best_k, best_vec = len(loops), 1
    for k in range(len(loops) - 1, first - 1, -1):
        if binds[k][1] != tirx.IterVar.DataPar:
            break
        if extents[k] == 1:
            continue
        svars = [binds[j][0] for j in range(k, len(loops)) if extents[j] != 1]
        sext = [extents[j] for j in range(k, len(loops)) if extents[j] != 1]
        if not _suffix_ok(accesses, svars, sext, dirty):
            break
        vec = _suffix_vec(accesses, svars, sext, lanes)
        if vec < best_vec:
            break
        best_k, best_vec = k, vec
        if vec >= lanes and math.prod(sext) >= 4 * lanes:
            break  # long enough: fusing further only adds index arithmetic
    return best_k, best_vec


def _work(sch, loops) -> int | None:
    total = 1
    for lp in loops:
        ext = _int_extent(sch, lp)
        if ext is None:
            return None
        total *= ext
    return total


def _rep_work(sch, loops) -> int | None:
    """The work of loops with symbolic extents at the dims' representative (calibrated) sizes
    (``tune/workload.rows_bucket``), or None when a size is unknown."""
    from qcompiler.tune.workload import rows_bucket

    total = 1
    for lp in loops:
        try:
            total *= rows_bucket(sch.get(lp).extent)
        except (ValueError, TypeError):
            return None
    return total


# --------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------


def _is_injective(sch, block_rv) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block_rv).iter_vars)


def _cheap_for_reduction(block: s_tir.SBlock) -> bool:
    """An injective producer worth recomputing inside a reduction (a cast, a shift), rather
    than a guarded load (a pad: keeping it a separate, LLVM-vectorized pass measured faster
    than a window of guarded loads) or a long chain recomputed once per window point."""
    if _condition_vars(block) or not isinstance(block.body, tirx.BufferStore):
        return False
    return _expr_size(block.body.value) <= 12


def _expr_size(expr) -> int:
    """Nodes of ``expr`` counted as a tree (a subexpression shared by two parents counts twice:
    TVM's simplifiers and printers walk it twice), not counting the buffers its loads name (a
    walk also enters each load's buffer, whose symbolic shape -- h * 8 -- would count as if it
    were arithmetic: a cast over a symbolic image was not inlined into its sum, which then read a
    materialized int64 copy, 10x the time of the static kernel)."""
    count, loads = [], []
    tvm_ffi.structural_walk(expr, (tirx.Expr, count.append))
    tvm_ffi.structural_walk(expr, (tvm.ir.TensorLoad, loads.append))
    in_buffers = 0
    for ld in loads:
        nodes = []
        tvm_ffi.structural_walk(ld.source, (tirx.Expr, nodes.append))
        in_buffers += len(nodes)
    return len(count) - in_buffers


def _loads_of(block: s_tir.SBlock, buf) -> int:
    """Loads of ``buf`` in ``block``'s body."""
    loads = []

    def _load(node):
        if node.source.same_as(buf):
            loads.append(node)

    tvm_ffi.structural_walk(block.body, (tvm.ir.TensorLoad, _load))
    return len(loads)


def _inline_stays_small(producer: s_tir.SBlock, consumers, max_expr: int) -> bool:
    """Whether inlining ``producer`` (a BufferStore block) into ``consumers`` keeps every
    consumer's expression within ``max_expr`` nodes -- checked only where the inlining copies the
    producer's expression (read twice or more in all); a producer read once just moves.

    Inlining copies the producer's expression into every load of its buffer, and a chain of
    values each read several times grows exponentially: the Newton steps of I-LayerNorm's
    integer square root (``x = min(x, (x + V // max(x, 1)) >> 1)``, ``lower_isqrt`` in
    ``qcompiler/intops/nonlinear.py``) read ``x`` three times, so 6 inlined steps are 3^6 copies
    of the start value, per output element, and an i-GELU after the LayerNorm (``nonlinear.py``)
    reads that again three times: a 740k-character PrimFunc whose TIR simplification took minutes
    (issue 16, minimol).  Kept as blocks of their own, such values are computed once per row."""
    if not isinstance(producer.body, tirx.BufferStore):
        return True
    buf = producer.body.buffer
    loads = [_loads_of(c, buf) for c in consumers]
    if sum(loads) <= 1:
        return True
    size = _expr_size(producer.body.value)
    for c, n in zip(consumers, loads):
        if n and isinstance(c.body, tirx.BufferStore) and _expr_size(c.body.value) + n * (size - 1) > max_expr:
            return False
    return True


def _inline(sch, blocks, max_expr: int):
    """Inline injective blocks into their consumers (and, failing that, reverse-inline
    injective consumers into injective producers); return the blocks that remain.  A value
    read more than once stays a block of its own where copying its expression into its readers
    would make one of them larger than ``max_expr`` nodes (``_inline_stays_small``)."""
    blocks = list(blocks)

    def into_consumers(blk) -> bool:
        consumers = sch.get_consumers(blk)
        return (bool(consumers)
                and (all(_is_injective(sch, c) for c in consumers) or _cheap_for_reduction(sch.get(blk)))
                and _inline_stays_small(sch.get(blk), [sch.get(c) for c in consumers], max_expr))

    def into_producers(blk) -> bool:
        producers = sch.get_producers(blk)
        return (bool(producers) and all(_is_injective(sch, p) for p in producers)
                and all(_inline_stays_small(sch.get(p), [sch.get(blk)], max_expr) for p in producers))

    def once(can, inline) -> bool:
        for i, blk in enumerate(blocks):
            if not _is_injective(sch, blk) or not can(blk):
                continue
            try:
                inline(blk)
            except Exception:  # pylint: disable=broad-except
                continue
            blocks.pop(i)
            return True
        return False

    # forward inlining until none applies, then one reverse inlining, and again
    while once(into_consumers, sch.compute_inline) or once(into_producers, sch.reverse_compute_inline):
        pass
    return blocks


def _normalized_root_blocks(sch, options):
    from tvm.s_tir.dlight.analysis import normalize_prim_func  # pylint: disable=import-outside-toplevel

    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    return _inline(sch, [info.block_rv for info in infos], options.max_inline_expr)


def _rule_default(sch, options) -> bool:
    blocks = _normalized_root_blocks(sch, options)
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
    """Fallback 1: fuse the leading spatial loops but the innermost of each root block and
    parallelize them; no vectorization beyond what LLVM does by itself."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func  # pylint: disable=import-outside-toplevel

    infos = normalize_prim_func(sch)
    if infos is None:
        return False
    for info in infos:
        block_rv = info.block_rv
        loops = sch.get_loops(block_rv)
        if not loops:
            continue
        work = _work(sch, loops)
        kinds = [k for _, k in _loop_iter_map(sch, block_rv, loops)]
        lead = []
        for lp, k in zip(loops[:-1], kinds):
            if k != tirx.IterVar.DataPar:
                break
            lead.append(lp)
        if work is None:  # symbolic extents: judged at the representative sizes (unknown: assume large)
            work = _rep_work(sch, loops)
        if lead and (work is None or work >= options.min_parallel_work * 16):
            sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
        else:
            _mark(sch, loops[0], "serial")
    return True


def _rule_outer(sch, options) -> bool:
    """Fallback 2: parallelize the outermost loop of each root block where TVM allows it."""
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    for block_rv in sch.get_child_blocks(root):
        _schedule_outer(sch, block_rv, options)
    return True


def _parallel_or_serial(sch, lead) -> None:
    """The loops ``lead`` fused and run in parallel; serial (marked) where TVM cannot rule out a
    dependence."""
    try:
        sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
    except Exception:  # pylint: disable=broad-except - a dependence TVM cannot rule out: serial
        _mark(sch, lead[0], "serial")


def _schedule_symbolic(sch, block_rv, loops, options=None) -> None:
    """A block with symbolic extents.  An elementwise block (every loop data-parallel) large at the
    dims' representative sizes: the loops outside the innermost fused and run in parallel, the
    innermost left serial for LLVM's loop vectorizer (a trip count known at run time); MiniLM's
    softmax at sequence 512 ran serial before.  Anything else (a reduction inside: a pooling window)
    stays serial, its inner loops to LLVM (parallel over the outer loops with the reduction innermost
    made a max-pool 200x slower)."""
    kinds = [k for _, k in _loop_iter_map(sch, block_rv, loops)]
    work = _rep_work(sch, loops)
    elementwise = len(kinds) == len(loops) and all(k == tirx.IterVar.DataPar for k in kinds)
    n_sp = next((i for i, k in enumerate(kinds) if k != tirx.IterVar.DataPar), len(kinds))
    if (not elementwise and 0 < n_sp < len(loops) and len(kinds) == len(loops)
            and all(k == tirx.IterVar.CommReduce for k in kinds[n_sp:])
            and any(_int_extent(sch, lp) is None for lp in loops[n_sp:])
            and options is not None and work is not None and work >= options.min_parallel_work * 16):
        # a reduction along a symbolic axis (a softmax row's max / sum over the sequence): its
        # spatial loops in parallel, the reduction inside each, its innermost loop to LLVM (a
        # pooling window, a short static reduction, stays serial: see above)
        _mark(sch, loops[-1], "llvm_vectorize")
        _parallel_or_serial(sch, loops[:n_sp])
        return
    if (not elementwise or len(loops) < 2
            or (options is not None and work is not None and work < options.min_parallel_work * 16)):
        _mark(sch, loops[0], "serial")
        return
    lead = loops[:-1]
    if not (options is not None and _tail_vector(sch, block_rv, loops[-1], options)):
        _mark(sch, loops[-1], "llvm_vectorize")
    if lead:
        _parallel_or_serial(sch, _parallel_prefix(sch, lead))


PARALLEL_TASKS = 64
"""Iterations (at the representative sizes) the fused parallel loop of a symbolic elementwise block
needs; the loops inside it stay nested (``_parallel_prefix``)."""


def _parallel_prefix(sch, lead) -> list:
    """The outermost loops of ``lead`` whose iterations reach ``PARALLEL_TASKS`` at the dims'
    representative sizes (all of them if they never do).  Fused, a loop's index is recovered by a
    div / mod by the extents inside it -- symbolic ones, an integer division each rather than a
    multiply-shift -- once per iteration of the loops left nested; fusing every loop but the
    innermost paid that per innermost run: a pixel shuffle (1, 24, 2, 2, H, W) -> (1, 24, H, 2, W, 2),
    innermost extent 2, at 640 x 640 ran 10.7 ms, 3.5x its static kernel."""
    for i in range(1, len(lead) + 1):
        w = _rep_work(sch, lead[:i])
        if w is not None and w >= PARALLEL_TASKS:
            return list(lead[:i])
    return list(lead)


TAIL_VECTOR = "qc.vector_tail"
"""Annotation of a vector loop split off a symbolic innermost loop (``_tail_vector``): its last
partial vector runs as a scalar tail loop, which ``_scalarized`` expects."""


def _tail_vector(sch, block_rv, loop, options) -> bool:
    """A symbolic innermost loop walking every access contiguously (the key axis of attention
    scores [heads, rows, sequence]): split into vectors of one register plus a scalar tail.  The
    split's predicate ``outer * lanes + inner < n`` would make TVM scalarize the whole loop; the
    outer loop's ``pragma_loop_partition_hint`` lets ``LoopPartition`` (before ``VectorizeLoop``
    in TVM's pipeline) cut it into the whole vectors, with no test, and the last partial one.
    Left to LLVM's loop vectorizer instead, MiniLM's i-exp over 12 x 512 x 512 scores ran 1.4x
    the time of the static kernel's (1.85 vs 1.32 ms, 2-core Xeon, 2026-12-07).  False: the loop
    does not walk its accesses contiguously (a transpose, a gather), or vectors are off."""
    if not options.vectorize or _int_extent(sch, loop) is not None:
        return False
    block = sch.get(block_rv)
    accesses = _accesses(block)
    var = _loop_iter_map(sch, block_rv, [loop])[0][0]
    if accesses is None or var is None or not _suffix_ok(accesses, [var], [1], _condition_vars(block)):
        return False
    lanes = _lanes(options, block)
    if lanes < 2:
        return False
    outer, inner = sch.split(loop, factors=[None, lanes])
    sch.vectorize(inner)
    sch.annotate(inner, TAIL_VECTOR, 1)
    sch.annotate(outer, "pragma_loop_partition_hint", 1)
    return True


def _schedule_outer(sch, block_rv, options) -> None:
    loops = sch.get_loops(block_rv)
    if not loops:
        return
    work = _work(sch, loops)
    if work is None:
        _schedule_symbolic(sch, block_rv, loops, options)
        return
    if work < options.min_parallel_work * 16:
        _mark(sch, loops[0], "serial")  # too little work to parallelize: serial on purpose
        return
    try:
        sch.parallel(loops[0])
    except Exception:  # pylint: disable=broad-except
        # TVM refuses (a dependence it cannot rule out): the block stays an unscheduled loop
        # nest, unmarked, so tir_scan reports it
        pass


def _parallel_outer(sch, outer_loops, tail, work, options, *, vec=1, auto_vectorized=False):
    """Fuse ``outer_loops`` (consecutive, outermost first) and run them in parallel; pull in
    ``tail`` (the next loop, e.g. the outer part of a split vector loop) when the outer loops
    alone give too few tasks.  ``work / vec`` (vector iterations) decides whether to.

    ``auto_vectorized``: a pure copy, or an inner loop left to LLVM's loop vectorizer, which
    loses the buffers' noalias facts inside TVM's parallel closure (a pad measured 3.6 us
    serial, 9.3 us as a one-thread parallel loop): such blocks need 2x the work."""
    threshold = options.min_parallel_work * (2 if auto_vectorized else 1)
    if work // max(1, vec) < threshold:
        return
    loops = list(outer_loops)
    extent = math.prod(_int_extent(sch, lp) or 1 for lp in loops) if loops else 1
    if tail is not None and extent < 16:
        loops.append(tail)
    if not loops:
        return
    sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


LOOP_ANNOTATION = "qc.loop"
"""Loop annotation for a loop the schedule leaves serial on purpose: ``"llvm_vectorize"`` (the
innermost loop, for LLVM's loop vectorizer) or ``"serial"`` (too little work to parallelize).
It tells ``tir_scan`` that the function was scheduled; codegen ignores it."""


def _mark(sch, loop, why: str) -> None:
    sch.annotate(loop, LOOP_ANNOTATION, why)


def _split_vector(sch, loop, vec):
    """Split ``loop`` into (outer or None, inner of ``vec`` iterations)."""
    if vec < _int_extent(sch, loop):
        outer, inner = sch.split(loop, factors=[None, vec])
        return outer, inner
    return None, loop


def _schedule_spatial(sch, block_rv, options) -> None:
    """Injective block: vectorize the longest clean innermost run of loops (fused), fuse and
    parallelize the loops outside it; leave a non-vectorizable innermost loop to LLVM."""
    loops = sch.get_loops(block_rv)
    block = sch.get(block_rv)
    work = _work(sch, loops)
    if work is None:  # symbolic extents (qcompiler/symbolic.py): judged at the representative sizes
        if not _symbolic_vector(sch, block_rv, loops, options):
            _schedule_symbolic(sch, block_rv, loops, options)
        return
    lanes = _lanes(options, block) if options.vectorize else 1
    k, vec = _vector_suffix(sch, block_rv, loops, lanes)
    if vec >= 2 and k < len(loops):
        vloop = sch.fuse(*loops[k:]) if len(loops) - k > 1 else loops[k]
        v_out, v_in = _split_vector(sch, vloop, vec)
        sch.vectorize(v_in)
        _parallel_outer(
            sch, loops[:k], v_out, work, options, vec=vec, auto_vectorized=_is_copy(block)
        )
        return
    # nothing to vectorize cleanly (a guarded copy, a transpose, a gather): keep the innermost
    # loop serial for LLVM, parallelize the loops outside it
    _mark(sch, loops[-1], "llvm_vectorize")
    _parallel_outer(sch, loops[:-1], None, work, options, vec=lanes, auto_vectorized=True)


def _symbolic_vector(sch, block_rv, loops, options) -> bool:
    """An injective block over symbolic outer loops and a clean static innermost run (a requant /
    GELU over [batch, sequence, hidden]): the run vectorized as in a static kernel, the loops
    outside fused and run in parallel when the work at the representative sizes is large.  LLVM's
    loop vectorizer left alone on such a loop gave scalar int64 code (MiniLM's i-GELU kernel at
    1 x 64: 0.14 ms against 0.09 ms static).  False: no such run (``_schedule_symbolic``)."""
    lanes = _lanes(options, sch.get(block_rv)) if options.vectorize else 1
    k, vec = _vector_suffix(sch, block_rv, loops, lanes)
    if vec < 2 or k >= len(loops) or k == 0:
        return False
    lead = loops[:k]
    outer = _rep_work(sch, lead)
    work = None if outer is None else outer * math.prod(_int_extent(sch, lp) for lp in loops[k:])
    vloop = sch.fuse(*loops[k:]) if len(loops) - k > 1 else loops[k]
    _, v_in = _split_vector(sch, vloop, vec)
    sch.vectorize(v_in)
    if work is not None and work // vec < options.min_parallel_work:  # as _parallel_outer
        _mark(sch, lead[0], "serial")
        return True
    _parallel_or_serial(sch, lead)
    return True


def _window_row_var(block, s_vars):
    """The written buffer's innermost spatial var when every read indexes it only in its last
    axis as ``var * stride + (reduction terms)`` (a pooling window sliding along the output
    row in NCHW), else None."""
    accesses = _accesses(block)
    if accesses is None or not accesses[0].indices:
        return None
    last = accesses[0].indices[-1]
    var = next((v for v in s_vars if _is_var(last, v)), None)
    if var is None:
        return None
    for acc in accesses[1:]:
        idx = list(acc.indices)
        if acc.buffer.same_as(accesses[0].buffer) or not any(_uses_any(e, [var]) for e in idx):
            continue  # the reduction reading its own accumulator, or a read not along the row
        if not idx or any(_uses_any(e, [var]) for e in idx[:-1]):
            return None
        terms = _sum_terms(idx[-1])
        with_var = [t for t in terms if _uses_any(t, [var])]
        if len(with_var) != 1:
            return None
        term = with_var[0]
        if not _is_var(term, var):
            if not isinstance(term, tirx.Mul):
                return None
            stride = term.b if _is_var(term.a, var) else term.a if _is_var(term.b, var) else None
            if not isinstance(stride, tirx.IntImm) or int(stride) < 1:
                return None
        if any(_uses_any(t, s_vars) for t in terms if t is not term):
            return None
    return var


def _is_copy(block: s_tir.SBlock) -> bool:
    """A block that only moves data (the stored value is a load, or an if_then_else of loads
    and constants): memory-bound and cheap, parallel only when large."""
    body = block.body
    if not isinstance(body, tirx.BufferStore):
        return False
    value = body.value
    if isinstance(value, tvm.ir.Call) and (getattr(value.op, "name", "") or "").endswith(
        "if_then_else"
    ):
        return all(
            isinstance(a, (tvm.ir.TensorLoad, tirx.IntImm, tirx.FloatImm)) for a in value.args[1:]
        )
    return isinstance(value, tvm.ir.TensorLoad)


def _sum_terms(expr):
    if isinstance(expr, tirx.Add):
        return _sum_terms(expr.a) + _sum_terms(expr.b)
    return [expr]


def _schedule_reduction(sch, block_rv, options) -> None:
    """Reduction block: parallel spatial loops outside, reduction loops inside.

    * a clean innermost run of spatial loops (NHWC channels) becomes vector lanes inside the
      reduction loops;
    * else, for a small window sliding along the output row (NCHW pooling), the row is cut
      into chunks of <= 8 outputs, each an LLVM-vectorized loop inside the unrolled window;
    * else the reduction runs along memory: spatial loops outside (parallel), reduction loops
      fused where they walk the read's trailing axes, for LLVM to vectorize; a small window
      is unrolled inside the output row loop.
    """
    loops = sch.get_loops(block_rv)
    block = sch.get(block_rv)
    binds = _loop_iter_map(sch, block_rv, loops)
    s_loops = [lp for lp, (_, k) in zip(loops, binds) if k == tirx.IterVar.DataPar]
    r_loops = [lp for lp, (_, k) in zip(loops, binds) if k == tirx.IterVar.CommReduce]
    s_vars = [v for v, k in binds if k == tirx.IterVar.DataPar]
    r_vars = [v for v, k in binds if k == tirx.IterVar.CommReduce]
    work = _work(sch, loops)
    if work is None:  # symbolic extents (a sum over an image's height and width): at the representative sizes
        work = _rep_work(sch, loops)
    if work is None or not r_loops or not s_loops:
        _schedule_outer(sch, block_rv, options)
        return
    sch.reorder(*s_loops, *r_loops)
    lanes = _lanes(options, block) if options.vectorize else 1
    small_window = _small_window(sch, r_loops, options)

    k, vec = _vector_suffix(sch, block_rv, s_loops, lanes)
    if vec >= 2 and k < len(s_loops):
        # lanes along a clean innermost spatial run, inside the reduction loops
        vloop = sch.fuse(*s_loops[k:]) if len(s_loops) - k > 1 else s_loops[k]
        v_out, v_in = _split_vector(sch, vloop, vec)
        outer = s_loops[:k]
        sch.reorder(*outer, *([v_out] if v_out is not None else []), *r_loops, v_in)
        _parallel_outer(sch, outer, v_out, work, options, vec=vec)
        if small_window:
            for lp in r_loops:
                sch.unroll(lp)
        sch.vectorize(v_in)  # parallel/vectorize first: decompose_reduction would block them
        init = sch.decompose_reduction(block_rv, r_loops[0])
        init_loops = sch.get_loops(init)
        if init_loops:
            sch.vectorize(init_loops[-1])
        return

    if small_window and options.vectorize and _window_row_var(block, s_vars) is not None:
        var = _window_row_var(block, s_vars)
        if var.same_as(s_vars[-1]):
            # pooling in NCHW: chunks of <= 8 outputs along the row, the unrolled window
            # around each chunk, the chunk loop innermost and serial. LLVM vectorizes each
            # chunk loop with interleaved (strided) loads: 1x64x113x113 3x3/2 int8 measured
            # 43-62 us against 154 us unscheduled; TVM's own strided vector loads became
            # per-lane scalar loads (300 us), a whole-row inner loop left LLVM a scalar tail
            # (148 us).
            chunk = _pow2_divisor(_int_extent(sch, s_loops[-1]), 8)
            if chunk >= 2:
                w_out, w_in = _split_vector(sch, s_loops[-1], chunk)
                outer = s_loops[:-1] + ([w_out] if w_out is not None else [])
                sch.reorder(*outer, *r_loops, w_in)
                _parallel_outer(
                    sch, s_loops[:-1], w_out, work, options, vec=chunk, auto_vectorized=True
                )
                for lp in r_loops:
                    sch.unroll(lp)
                _mark(sch, w_in, "llvm_vectorize")
                sch.decompose_reduction(block_rv, r_loops[0])
                return

    r_loops = _fuse_contiguous_reduction(sch, block, r_loops, r_vars)
    if small_window and len(s_loops) >= 2:
        # keep the output row loop outside the unrolled window for LLVM to vectorize
        _mark(sch, s_loops[-1], "llvm_vectorize")
        _parallel_outer(
            sch, s_loops[:-1], None, work, options, vec=lanes, auto_vectorized=True
        )
        for lp in r_loops:
            sch.unroll(lp)
    else:
        _mark(sch, r_loops[-1], "llvm_vectorize")
        _parallel_outer(sch, s_loops, None, work, options, vec=lanes, auto_vectorized=True)
    sch.decompose_reduction(block_rv, r_loops[0])


def _fuse_contiguous_reduction(sch, block, r_loops, r_vars):
    """Fuse the reduction loops when every read indexes its trailing axes with exactly the
    reduction vars in loop order, each covering its axis completely (a row-major walk)."""
    if len(r_loops) < 2:
        return r_loops
    accesses = _accesses(block)
    if accesses is None:
        return r_loops
    exts = [_int_extent(sch, lp) for lp in r_loops]
    if any(e is None for e in exts):
        return r_loops
    n = len(r_vars)
    for acc in accesses:
        idx = list(acc.indices)
        if not any(_uses_any(e, r_vars) for e in idx):
            continue
        if len(idx) < n or any(_uses_any(e, r_vars) for e in idx[:-n]):
            return r_loops
        for e, v, dim, ext in zip(idx[-n:], r_vars, acc.shape[-n:], exts):
            if not _is_var(e, v) or not isinstance(dim, tirx.IntImm) or int(dim) != ext:
                return r_loops
    return [sch.fuse(*r_loops)]


def _small_window(sch, r_loops, options) -> bool:
    exts = [_int_extent(sch, lp) for lp in r_loops]
    return all(e is not None for e in exts) and math.prod(exts) <= options.max_unroll
