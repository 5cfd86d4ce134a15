"""Float (unquantized) build through TVM's own ONNX importer: the "TVM float" peer of the
benchmarks and the `--precision fp32` debugging path.

The frontend freezes and folds the model (same as the integer path), ``relax.frontend.onnx``
imports it, and the same build pipeline (legalize, fuse, default schedules) compiles it.
"""

from __future__ import annotations

import datetime

import tvm

from . import __version__, artifact, frontend
from .targets import TargetSpec


def compile_float(model_path, out_path, spec: TargetSpec, batch: int = 1,
                  shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    from tvm.relax.frontend.onnx import from_onnx

    from .lowering.build import _backend_stages, _schedule_pass

    out = artifact.check_library_path(out_path)  # before any work
    fr = frontend.load(model_path, batch=batch, shapes=shapes or {})
    mod = from_onnx(fr.model, keep_params_in_input=False)
    target = spec.tvm_target()
    stages = _backend_stages(target)
    warnings: list[str] = []
    sched = _schedule_pass(target, warnings)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(m, _ctx):
        with target:
            m = tvm.transform.Sequential(stages.library_dispatch_passes(target) + stages.legalize_passes(target))(m)
            m = sched(m)
            m = tvm.transform.Sequential(stages.dataflow_lower_passes(target) + stages.finalize_passes(target))(m)
        return m

    ex = tvm.compile(mod, target, relax_pipeline=pipeline)
    g = fr.graph
    meta = {
        "format": artifact.FORMAT, "format_version": artifact.FORMAT_VERSION, "qcompiler_version": __version__,
        "tvm_version": tvm.__version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "target": spec.describe(), "precision": "fp32", "io": "float", "batch": batch,
        "inputs": [{"name": i, "shape": list(g.shapes[i]), "dtype": g.dtypes[i]} for i in g.inputs],
        "outputs": [{"name": o, "shape": list(g.shapes[o]), "dtype": g.dtypes[o]} for o in g.outputs],
        "layers": [], "kernels": {"count": 0}, "warnings": warnings,
    }
    with artifact.atomic_paths(out, artifact.metadata_path(out)) as (tmp_so, tmp_json):
        ex.export_library(str(tmp_so))
        artifact.write_json(tmp_json, artifact.seal(meta, tmp_so))
    return meta
