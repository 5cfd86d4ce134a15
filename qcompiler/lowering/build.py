"""Build the lowered Relax module: legalize, fuse, schedule every PrimFunc, prove, compile.

Pipeline (TVM's own Relax passes where they fit, docs/design.md §5):
  LegalizeOps -> AnnotateTIROpPattern -> FoldConstant -> FuseOps -> FuseTIR
  -> default schedules for every PrimFunc our kernels did not schedule (CPU: parallel +
     vectorized loops; CUDA: dlight rules)
  -> on CPUs, each recurrence's steps folded into one kernel (``loop_kernel.py``)
  -> the integer-only proof (``tir_scan.scan_tir`` on the scheduled TIR)
  -> TVM's dataflow lowering and finalization passes -> tvm.compile.
The scheduled TIR is kept (``BuildResult.tir``) so ``qc inspect`` can scan it for float ops and
unscheduled loop nests.

Boundaries (docs/design.md §2).  The model's input quantize and output dequantize are each emitted as one
``call_tir`` of a PrimFunc of their own (``qc_quantize`` / ``qc_dequantize``), marked
``op_pattern`` = opaque so FuseOps never merges them with the integer ops around them, and
``qc.boundary`` = ``"quantize"`` / ``"dequantize"`` so the scan knows them exactly instead of
guessing from signatures (the lowering of ``qcompiler/intops/boundary.py``).  Left to FuseOps, the elementwise float
ops of a quantize fuse with the requant / transpose after it into one kernel that reads integer
constants, which no scan can tell from a float op in the integer region.

The proof is strict: a library with a float function between the boundaries fails the build with
a one-line :class:`~qcompiler.errors.QuantizationError` naming each such kernel and its float
ops, unless ``allow_float`` accepts them (float islands; listed in
``BuildResult.float_islands`` and warned about).  The float islands the quantizer made on purpose
(``--allow-float``, ``qcompiler/intops/island.py``) are Relax functions of their own
(``qc_island_<node>``); ``BuildResult.island_kernels`` maps each island's node to the kernels its
function calls, so the metadata names the node, op and kernels of every island.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import tvm

from qcompiler import progress
from qcompiler.errors import QuantizationError
from qcompiler.graph import Graph
from qcompiler.tir_scan import ScanReport, describe_float_functions, scan_tir

from .gemm import gemm_for
from .loop_kernel import fuse_loop_kernels
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
    float_islands: list[str] = field(default_factory=list)  # float kernels between the boundaries
    scan: ScanReport | None = None    # the integer-only proof over ``tir``
    island_kernels: dict = field(default_factory=dict)  # float-island node -> the kernels it calls
    loops: dict = field(default_factory=dict)  # recurrences: {"kernel": [...], "recursion": [...]} (loop_kernel.py)


def _island_kernels(m: tvm.IRModule, funcs: dict[str, str]) -> dict[str, list[str]]:
    """node name -> names of the PrimFuncs the island's Relax function (``funcs``: node -> function
    name) calls, after legalization and fusion."""
    from tvm import relax

    out: dict[str, list[str]] = {}
    by_name = {gv.name_hint: f for gv, f in m.functions_items()}
    for node, fname in funcs.items():
        f = by_name.get(fname)
        found: list[str] = []
        if isinstance(f, relax.Function):
            def visit(e, found=found):
                if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
                    gv = e.args[0]
                    if isinstance(gv, tvm.ir.GlobalVar) and gv.name_hint not in found:
                        found.append(gv.name_hint)
            relax.analysis.post_order_visit(f.body, visit)
        out[node] = found
    return out


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


def check_integer_only(tir: tvm.IRModule, allow_float: bool = False) -> ScanReport:
    """The integer-only proof over the scheduled TIR: raises a one-line QuantizationError naming
    each float kernel between the boundaries and its float ops, unless ``allow_float``."""
    report = scan_tir(tir)
    if not report.integer_only and not allow_float:
        raise QuantizationError(
            f"the library would not be integer-only: {len(report.float_islands)} kernel(s) between the input "
            f"quantize and the output dequantize compute in float: {describe_float_functions(tir, report)} "
            "(a compiler bug unless the model needs float islands: please file an issue with the model, "
            "or compile with --allow-float to accept them)")
    return report


BUILD_STACK = 1 << 30
"""Stack of the thread that builds: TVM's passes recurse along the dataflow chain, and a long
unrolled recurrence (3 bidirectional LSTM layers over 200 steps: ~24k ops) overflowed the main
thread's 8 MB stack (a segfault)."""


def build(ig: Graph, target: tvm.target.Target, use_kernels: bool = True, schedule: bool = True,
          allow_float: bool = False) -> BuildResult:
    """Lower, legalize, fuse, schedule, prove integer-only (module docs) and compile ``ig``.
    ``allow_float`` accepts float kernels between the boundaries (float islands) instead of
    failing; they are listed in ``BuildResult.float_islands``.  Runs on a thread with a large
    stack (``BUILD_STACK``)."""
    import contextvars
    import threading

    result: dict = {}
    ctx = contextvars.copy_context()  # the node the errors name (qcompiler.errors) carries over

    def work():
        try:
            result["value"] = _build(ig, target, use_kernels, schedule, allow_float)
        except BaseException as e:  # re-raised on the calling thread
            result["error"] = e

    old = threading.stack_size()
    threading.stack_size(BUILD_STACK)
    try:
        t = threading.Thread(target=ctx.run, args=(work,), name="qc-build", daemon=True)
        t.start()
    finally:
        threading.stack_size(old)
    while t.is_alive():
        t.join(0.2)  # short joins: Ctrl-C still reaches the calling thread
    if "error" in result:
        raise result["error"]
    return result["value"]


def _close_blocks(bb) -> None:
    """End the blocks a failed lowering left open (a symbolic build that is retried with the dim
    fixed): TVM would print "BlockBuilder destroyed with remaining blocks!" on the user's stderr."""
    for _ in range(256):
        try:
            bb._end_block()
        except Exception:  # noqa: BLE001 - none left
            return


def _build(ig: Graph, target: tvm.target.Target, use_kernels: bool, schedule: bool,
           allow_float: bool) -> BuildResult:
    rep = progress.get()
    gemm = gemm_for(target, use_kernels)
    with rep.timed("lowering to Relax"):
        lw = Lowering(ig, target, gemm)
        try:
            mod = lw.build()
        except BaseException:
            _close_blocks(lw.bb)
            raise
    island_funcs = {node: fname for node, (fname, _call) in getattr(lw, "float_islands", {}).items()}
    warnings: list[str] = []
    sched = _schedule_pass(target, warnings) if schedule else (lambda m: m)
    stages = _backend_stages(target)

    with rep.timed(f"building for {target.kind.name}"):
        with target:
            # our default schedules replace dlight's ApplyDefaultSchedule of the CUDA pipeline
            legalize = [p for p in stages.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"]
            m = tvm.transform.Sequential(stages.library_dispatch_passes(target) + legalize)(mod)
            m = sched(m)
            if target.kind.name == "llvm" and os.environ.get("QC_LOOP_KERNEL", "1") != "0":
                # recurrences: one kernel per loop instead of the VM's recursion over the steps (a
                # GPU kernel cannot launch the step's kernels from a loop: the recursion stays)
                try:
                    m = fuse_loop_kernels(m)
                except Exception as e:  # noqa: BLE001 -- the recursion is correct, only slower
                    warnings.append(f"recurrences left as VM recursion (one kernel per loop failed: "
                                    f"{str(e).splitlines()[0][:160]})")
        tir = tvm.IRModule({gv: f for gv, f in m.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
        names = [gv.name_hint for gv in m.get_global_vars()]
        loops = {"kernel": sorted(x for x in names if x.startswith("rec_loop_")),
                 "recursion": sorted(x for x in names if x.startswith("rec_run_"))}
        report = check_integer_only(tir, allow_float)
        islands = list(report.float_islands)
        island_kernels = _island_kernels(m, island_funcs)
        if islands:
            msg = ("float islands (float kernels between the boundaries, allowed): "
                   + describe_float_functions(tir, report))
            warnings.append(msg)
            planned = {k for ks in island_kernels.values() for k in ks}
            if not set(islands) <= planned:  # the quantizer's islands are reported by the caller
                rep.warn(msg)

        @tvm.transform.module_pass(opt_level=0)
        def finish(m2: tvm.IRModule, _ctx) -> tvm.IRModule:
            from .vm_shapes import DedupHeapReads  # after VMShapeLower: one shape-heap read per value

            return tvm.transform.Sequential(stages.dataflow_lower_passes(target) + stages.finalize_passes(target)
                                            + [DedupHeapReads])(m2)

        ex = tvm.compile(m, target, relax_pipeline=finish)
    return BuildResult(ex, tir, mod, list(getattr(gemm, "fallbacks", [])), warnings,
                       gemm.name, dict(getattr(gemm, "kernels", {})), islands, report, island_kernels,
                       loops if any(loops.values()) else {})
