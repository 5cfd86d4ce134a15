"""Default GPU schedules (qcompiler.kernels.gpu_default): every op family of the CPU test, with
its integer dtypes, scheduled by dlight and compiled for CUDA sm_80 and sm_90.

No GPU is needed: TVM 0.27's ``tvm.compile`` for cuda emits CUDA source and leaves compilation
to module load time (NVRTC or nvcc, on the device), so a build here proves little by itself; the
tests hand the generated source to nvcc (``tvm.support.nvcc.compile_cuda``, skipped where nvcc is
missing) for each architecture.  All families go into one Relax module, so nvcc runs once per
architecture.
"""

from __future__ import annotations

import shutil

import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from qcompiler.kernels.gpu_default import (  # noqa: E402
    GPUDefaultSchedule,
    schedule_gpu_default,
    schedule_gpu_default_report,
)
from qcompiler.tir_scan import scan_tir  # noqa: E402
from tests.kernels.test_cpu_default import FAMILIES, legalize_and_fuse, relax_module  # noqa: E402

ARCHS = ("sm_80", "sm_90")


def all_families_module():
    """One Relax function computing every family on its own inputs; a tuple of all outputs."""
    bb = relax.BlockBuilder()
    params, specs = [], []
    for name in sorted(FAMILIES):
        builder, ps = FAMILIES[name]
        vs = [relax.Var(f"{name}__{p}", relax.TensorType(shape=s, dtype=d)) for p, s, d, _ in ps]
        params += vs
        specs.append((builder, vs))
    with bb.function("main", params):
        with bb.dataflow():
            outs = [bb.emit(builder(bb, *vs)) for builder, vs in specs]
            gv = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv)
    return bb.get()


def cuda_target(arch):
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def _rest_of_cuda_pipeline(target):
    from tvm.relax.backend.cuda import pipeline as cp

    return tvm.transform.Sequential(cp.dataflow_lower_passes(target) + cp.finalize_passes(target))


def _cuda_source(executable) -> str:
    def walk(mod):
        if mod.kind == "cuda":
            return mod.inspect_source()
        for sub in mod.imports:
            found = walk(sub)
            if found:
                return found
        return None

    src = walk(executable.mod)
    assert src, "no CUDA module in the build"
    return src


@pytest.fixture(scope="module")
def fused():
    return legalize_and_fuse(all_families_module())


@pytest.fixture(scope="module", params=ARCHS)
def built(request, fused):
    target = cuda_target(request.param)
    report = schedule_gpu_default_report(fused, target)
    ex = tvm.compile(report.mod, target, relax_pipeline=_rest_of_cuda_pipeline(target))
    return request.param, target, report, ex


def test_every_family_scheduled(built):
    _, _, report, _ = built
    assert not report.failed, report.warnings
    assert not report.warnings, report.warnings
    scan = scan_tir(report.mod)
    assert scan.all_scheduled, scan.unscheduled
    for scan_f in scan.functions:
        assert "thread_binding" in scan_f.schedule_marks, scan_f.name
    rules = {rule for _, rule in report.applied}
    assert {"gpu.Fallback", "gpu.Reduction", "gpu.CrossThreadReduction"} <= rules


def test_cuda_source_compiles_with_nvcc(built):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    from tvm.support import nvcc

    arch, target, _, ex = built
    src = _cuda_source(ex)
    assert "__global__" in src and "int8_t" in src
    with target:  # compile_cuda reads the compute version from the current target
        cubin = nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc")
    assert len(cubin) > 1000


def test_scheduled_functions_marked_and_skipped_next_time(fused):
    target = cuda_target("sm_90")
    once = schedule_gpu_default(fused, target)
    for func in once.functions.values():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert bool(func.attrs["qc.scheduled"]) and bool(func.attrs["tirx.is_scheduled"])
    again = schedule_gpu_default_report(once, target)
    assert not again.applied and again.skipped


def test_rejects_cpu_target(fused):
    with pytest.raises(ValueError):
        schedule_gpu_default(fused, tvm.target.Target({"kind": "llvm"}))


def test_pass_in_relax_pipeline():
    """GPUDefaultSchedule in place of dlight in TVM's CUDA pipeline (build only)."""
    from tvm.relax.backend.cuda import pipeline as cp

    target = cuda_target("sm_80")
    legalize = [p for p in cp.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"]
    assert len(legalize) == len(cp.legalize_passes(target)) - 1
    mod = relax_module("softmax_like_rows")
    seen = {}

    @tvm.transform.module_pass(opt_level=0)
    def capture(m, _ctx):
        seen["tir"] = m
        return m

    pipe = tvm.transform.Sequential(
        cp.library_dispatch_passes(target)
        + legalize
        + [GPUDefaultSchedule(target), capture]
        + cp.dataflow_lower_passes(target)
        + cp.finalize_passes(target)
    )
    with target:
        ex = tvm.compile(mod, target, relax_pipeline=pipe)
    assert "__global__" in _cuda_source(ex)
    rules = [f.attrs["qc.schedule_rule"] for f in seen["tir"].functions.values()
             if isinstance(f, tvm.tirx.PrimFunc)]
    assert rules and all(r.startswith("gpu.") for r in rules)
