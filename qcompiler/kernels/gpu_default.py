"""Default GPU schedules (dlight) for every PrimFunc that no kernel of ours schedules.

Our tensor-core GEMM/conv kernels arrive scheduled (function attribute ``qc.scheduled``);
every other PrimFunc of a legalized, fused integer model (requantization chains, pooling,
reductions, transposes, concats, slices, gathers, pads, integer softmax rows) gets the first of
TVM's dlight GPU rules that applies, in the order the Relax CUDA pipeline uses:

    Matmul, GEMV, Reduction, GeneralReduction, Fallback

A rule that raises on a function, or whose result does not lower (the s_tir passes up to
``VerifyMemory``, which rejects a loop touching global memory outside a thread binding), is
recorded as a :class:`~qcompiler.kernels.cpu_default.ScheduleWarning` (logged on
``logging.getLogger("qcompiler")``) and the next rule is tried; ``Fallback`` (every spatial loop
fused and bound to blockIdx.x/threadIdx.x) is the last resort.  Scheduled functions get
``qc.scheduled = True``, ``qc.schedule_rule`` (``gpu.<Rule>``) and ``tirx.is_scheduled`` (so a
later ``dl.ApplyDefaultSchedule`` leaves them alone).

Rules run inside ``with target:`` (dlight reads thread limits from the current target).  A
CUDA target should carry its ``arch`` (``{"kind": "cuda", "arch": "sm_90"}``); the limits dlight
needs (``max_threads_per_block``, ``max_shared_memory_per_block``, ``thread_warp_size``) come
with the cuda target kind's defaults.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm.ir import IRModule
from tvm.target import Target

from .cpu_default import (
    RULE_ATTR,
    SCHEDULED_ATTR,
    CPUScheduleReport,
    ScheduleWarning,
    is_scheduled,
)

logger = logging.getLogger("qcompiler")

GPUScheduleReport = CPUScheduleReport  # same fields: mod, applied, skipped, failed, warnings


def default_gpu_rules():
    """(name, rule) pairs, tried in order (the Relax CUDA pipeline's dlight list)."""
    from tvm.s_tir import dlight as dl  # pylint: disable=import-outside-toplevel

    return [
        ("gpu.Matmul", dl.gpu.Matmul()),
        ("gpu.GEMV", dl.gpu.GEMV()),
        ("gpu.Reduction", dl.gpu.Reduction()),
        ("gpu.GeneralReduction", dl.gpu.GeneralReduction()),
        ("gpu.CrossThreadReduction", CrossThreadReduction()),
        ("gpu.Fallback", dl.gpu.Fallback()),
    ]


class CrossThreadReduction:  # pylint: disable=too-few-public-methods
    """One reduction block over >= ``min_extent`` points (a max/min/sum that dlight's
    Reduction, which only matches ``X = X + Y``, and GeneralReduction leave to Fallback, where
    one thread would walk a whole row): the spatial loops fused on ``blockIdx.x``, the
    reduction loops fused and split over ``threadIdx.x`` (TVM lowers the cross-thread
    combination for any commutative reducer); injective epilogue blocks get Fallback's
    block/thread mapping of their spatial loops. Small windows (pooling) stay with Fallback:
    one thread per output is right there."""

    def __init__(self, threads: int = 256, min_extent: int = 64):
        self.threads = threads
        self.min_extent = min_extent

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        # pylint: disable=import-outside-toplevel
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline

        if not isinstance(func, tirx.PrimFunc) or "gpu" not in list(target.keys):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        reductions = [i for i in infos if not i.is_injective()]
        if len(reductions) != 1 or reductions[0] is not infos[0]:
            return None
        red = reductions[0]
        if any(k not in "SR" for k in red.dom_kind()) or any(
            not isinstance(d, int) for d in red.dom()
        ):
            return None
        r_extent = 1
        for it in red.iters:
            if it.kind == "R":
                r_extent *= it.dom
        if r_extent < self.min_extent:
            return None
        max_threads = int(target.attrs.get("max_num_threads", 1024))
        threads = min(self.threads, max_threads)
        while threads > 32 and threads > r_extent:
            threads //= 2
        loops = sch.get_loops(red.block_rv)
        s_loops = [lp for lp, it in zip(loops, red.iters) if it.kind == "S"]
        r_loops = [lp for lp, it in zip(loops, red.iters) if it.kind == "R"]
        sch.reorder(*s_loops, *r_loops)
        bx = sch.fuse(*s_loops) if s_loops else sch.add_unit_loop(red.block_rv)
        r = sch.fuse(*r_loops) if len(r_loops) > 1 else r_loops[0]
        _, tx = sch.split(r, factors=[None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        for info in infos[1:]:
            eloops = sch.get_loops(info.block_rv)
            if any(sch.get(lp).thread_binding is not None for lp in eloops):
                continue
            e = sch.fuse(*eloops) if len(eloops) > 1 else eloops[0] if eloops else None
            if e is None:
                e = sch.add_unit_loop(info.block_rv)
            ebx, etx = sch.split(e, factors=[None, min(max_threads, 256)])
            sch.bind(ebx, "blockIdx.x")
            sch.bind(etx, "threadIdx.x")
        return sch


def schedule_gpu_default(
    mod: IRModule, target: Target | dict | str, *, validate: bool = True
) -> IRModule:
    """Schedule every PrimFunc of ``mod`` lacking ``qc.scheduled`` with dlight."""
    return schedule_gpu_default_report(mod, target, validate=validate).mod


def schedule_gpu_default_report(
    mod: IRModule, target: Target | dict | str, *, validate: bool = True
) -> GPUScheduleReport:
    """As :func:`schedule_gpu_default`, and say which rule scheduled what and what failed."""
    target = target if isinstance(target, Target) else Target(target)
    if "gpu" not in list(target.keys):
        raise ValueError(f"schedule_gpu_default needs a GPU target, got {target.kind.name!r}")
    rules = default_gpu_rules()
    applied, skipped, failed, warnings = [], [], [], []
    updates = {}
    with target:
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            name = gvar.name_hint
            if is_scheduled(func) or not isinstance(func.body, s_tir.SBlockRealize):
                skipped.append(name)
                continue
            new_func, rule_name = None, None
            for rname, rule in rules:
                try:
                    sch = rule.apply(func, target, False)
                    if sch is None:
                        continue
                    if isinstance(sch, list):
                        sch = sch[0]
                    candidate = sch.mod["main"]
                    if validate:
                        _validate(candidate, target)
                    new_func, rule_name = candidate, rname
                    break
                except Exception as err:  # pylint: disable=broad-except
                    lines = str(err).strip().splitlines()
                    msg = lines[-1] if lines else type(err).__name__
                    warnings.append(ScheduleWarning(name, rname, f"{type(err).__name__}: {msg}"))
            if new_func is None:
                failed.append(name)
                continue
            updates[gvar] = (
                new_func.with_attr(SCHEDULED_ATTR, True)
                .with_attr(RULE_ATTR, rule_name)
                .with_attr("tirx.is_scheduled", True)
            )
            applied.append((name, rule_name))
    if updates:
        mod = mod.clone()
        for gvar, func in updates.items():
            mod[gvar] = func
    for w in warnings:
        logger.warning("gpu_default schedule: %s", w)
    for name in failed:
        logger.warning("gpu_default schedule: %s: no dlight rule applied; left unscheduled", name)
    return GPUScheduleReport(
        mod=mod,
        applied=tuple(applied),
        skipped=tuple(skipped),
        failed=tuple(failed),
        warnings=tuple(warnings),
    )


@tvm.transform.module_pass(opt_level=0, name="qc.GPUDefaultSchedule")
class GPUDefaultSchedule:  # pylint: disable=too-few-public-methods
    """Module pass: :func:`schedule_gpu_default` with a fixed target (in place of the
    ``dl.ApplyDefaultSchedule`` step of the Relax CUDA pipeline, after ``FuseTIR``)."""

    def __init__(self, target: Target | dict | str, *, validate: bool = True):
        self.target = target if isinstance(target, Target) else Target(target)
        self.validate = validate

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return schedule_gpu_default(mod, self.target, validate=self.validate)


_VALIDATE_PASSES = None


def _validate(func: tirx.PrimFunc, target: Target) -> None:
    """Lower ``func`` through the s_tir passes up to ``VerifyMemory`` (no code generation)."""
    global _VALIDATE_PASSES  # pylint: disable=global-statement
    if _VALIDATE_PASSES is None:
        _VALIDATE_PASSES = tvm.transform.Sequential(
            [
                s_tir.transform.CanonicalizeLoop(),
                s_tir.transform.LowerCrossThreadReduction(),
                s_tir.transform.LowerInitBlock(),
                s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
                s_tir.transform.ConvertBlocksToOpaque(),
                s_tir.transform.LiftThreadBinding(),
                s_tir.transform.CompactBufferAllocation(),
                s_tir.transform.UnifyThreadBinding(),
                s_tir.transform.LowerMatchBuffer(),
                s_tir.transform.LowerOpaqueBlock(),
                tirx.transform.FlattenBuffer(),
                tirx.transform.NarrowDataType(32),
                tirx.transform.VectorizeLoop(True),
                tirx.transform.VerifyMemory(),
            ]
        )
    host = Target({"kind": "llvm"})
    tgt = Target(target, host) if target.host is None else target
    mod = IRModule({"main": func.with_attr("target", tgt).with_attr("global_symbol", "main")})
    _VALIDATE_PASSES(mod)
