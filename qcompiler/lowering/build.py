"""Build the lowered Relax module: legalize, fuse, schedule every PrimFunc, compile.

Pipeline (TVM's own Relax passes where they fit, DESIGN §7):
  LegalizeOps -> AnnotateTIROpPattern -> FoldConstant -> FuseOps -> FuseTIR
  -> default schedules for every PrimFunc our kernels did not schedule (CPU: parallel +
     vectorized loops; CUDA: dlight rules)
  -> TVM's dataflow lowering and finalization passes -> tvm.compile.
The scheduled TIR is kept (``BuildResult.tir``) so ``qc inspect`` can scan it for float ops and
unscheduled loop nests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from qcompiler import progress
from qcompiler.graph import Graph

from .gemm import gemm_for
from .relax_lower import Lowering


@dataclass
class BuildResult:
    executable: object
    tir: tvm.IRModule                 # scheduled PrimFuncs, as built
    relax_mod: tvm.IRModule           # the lowered Relax module before legalization
    fallbacks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    gemm_name: str = "generic"        # which conv/dense lowering ran (generic | cpu_vnni | cuda_mma)
    gemm_kernels: dict = field(default_factory=dict)   # kernel kind -> layers using it


def _schedule_pass(target, warnings: list[str]):
    kind = target.kind.name
    try:
        if kind == "llvm":
            from qcompiler.kernels.cpu_default import schedule_cpu_default as f
        else:
            from qcompiler.kernels.gpu_default import schedule_gpu_default as f
    except ImportError:
        f = None

    def run(mod):
        if f is None:
            warnings.append("no default schedule module: PrimFuncs left unscheduled")
            return mod
        return f(mod, target)

    return run


def _backend_stages(target):
    """TVM's per-backend pipeline stages (the package __init__ of 0.27 omits dataflow_lower_passes)."""
    import importlib

    name = {"llvm": "cpu_generic", "cuda": "cuda"}.get(target.kind.name, "gpu_generic")
    return importlib.import_module(f"tvm.relax.backend.{name}.pipeline")


def build(ig: Graph, target: tvm.target.Target, use_kernels: bool = True, schedule: bool = True) -> BuildResult:
    rep = progress.get()
    gemm = gemm_for(target, use_kernels)
    with rep.timed("lowering to Relax"):
        mod = Lowering(ig, target, gemm).build()
    warnings: list[str] = []
    captured: dict = {}
    sched = _schedule_pass(target, warnings) if schedule else (lambda m: m)
    stages = _backend_stages(target)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(m: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            # our default schedules replace dlight's ApplyDefaultSchedule of the CUDA pipeline
            legalize = [p for p in stages.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"]
            m = tvm.transform.Sequential(stages.library_dispatch_passes(target) + legalize)(m)
            m = sched(m)
            captured["tir"] = tvm.IRModule({gv: f for gv, f in m.functions.items()
                                            if isinstance(f, tvm.tirx.PrimFunc)})
            m = tvm.transform.Sequential(stages.dataflow_lower_passes(target) + stages.finalize_passes(target))(m)
        return m
    with rep.timed(f"building for {target.kind.name}"):
        ex = tvm.compile(mod, target, relax_pipeline=pipeline)
    return BuildResult(ex, captured["tir"], mod, list(getattr(gemm, "fallbacks", [])), warnings,
                       gemm.name, dict(getattr(gemm, "kernels", {})))
