"""Whole-model prediction: lower a model as ``qc compile`` does (tuned configs applied, default
schedules), stop before code generation, and predict every kernel of the Relax ``main`` in
execution order.  Total = sum of the kernel predictions + the per-call runtime overhead fitted on
the profiled libraries (``calibration.per_call_ms`` of the model file)."""

from __future__ import annotations

import re

import numpy as np

from . import features as F
from .data import kernel_tags
from .predict import CostModel, analytic_seconds, roofline_samples


def lower_kernels(model_path, spec, calib, batch: int = 1, precision: str = "int8", tune_log=None) -> list[dict]:
    """[{name, text, func, inputs: [(shape, dtype)], output: (shape, dtype)}] in execution order."""
    from qcompiler.driver import CompileOptions, prepare

    opts = CompileOptions(target=spec, precision=precision, batch=batch)
    prep = prepare(model_path, calib, opts)
    return graph_kernels(prep.int_graph, spec, tune_log)


def graph_kernels(ig, spec, tune_log=None) -> list[dict]:
    """The kernels of integer graph ``ig`` lowered as ``qc compile`` lowers it (tuned configs of
    ``tune_log`` applied, default schedules), in execution order: [{name, text, func, inputs:
    [(shape, dtype)], output: (shape, dtype)}]."""
    import tvm

    from qcompiler.lowering.build import _backend_stages, _schedule_pass
    from qcompiler.lowering.gemm import gemm_for
    from qcompiler.lowering.relax_lower import Lowering
    from qcompiler.tir_scan import module_to_text
    from qcompiler.tune.apply import activate

    from .profile import split_functions

    target = spec.tvm_target()
    with activate(spec, tune_log):
        mod = Lowering(ig, target, gemm_for(target, True)).build()
        stages = _backend_stages(target)
        with target:
            legalize = [p for p in stages.legalize_passes(target) if p.info.name != "ApplyDefaultSchedule"]
            mod = tvm.transform.Sequential(stages.library_dispatch_passes(target) + legalize)(mod)
            mod = _schedule_pass(target, [])(mod)
    tir = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
    texts = split_functions(module_to_text(tir))
    funcs = {gv.name_hint: f for gv, f in tir.functions.items()}
    out = []
    for call in _calls(mod["main"]):
        name = call.args[0].name_hint
        if name not in funcs:
            continue
        ins = [(_shape(_ty(a)), _dt(_ty(a).dtype)) for a in _tuple_fields(call.args[1]) if hasattr(_ty(a), "dtype")]
        o = _ty(call)
        if o is None or not (hasattr(o, "dtype") or hasattr(o, "fields")):
            sargs = getattr(call, "sinfo_args", None) or getattr(call, "ty_args", None) or []
            o = sargs[0] if len(sargs) else None
        outs = ([(_shape(o), _dt(o.dtype))] if hasattr(o, "dtype") else
                [(_shape(f), _dt(f.dtype)) for f in getattr(o, "fields", []) if hasattr(f, "dtype")])
        out.append({"name": name, "text": texts.get(name) or str(funcs[name]), "func": funcs[name],
                    "inputs": ins, "output": outs[0] if outs else ([], "")})
    return out


def _calls(fn):
    from tvm import relax

    found = []

    def visit(e):
        if isinstance(e, relax.Call):
            op = getattr(e.op, "name", "")
            if op.startswith("relax.call_tir") and isinstance(e.args[0], relax.GlobalVar):
                found.append(e)

    relax.analysis.post_order_visit(fn.body, visit)
    return found


def _dt(d) -> str:
    s = str(d)
    return s[2:] if s.startswith("T.") else s


def _ty(e):
    for attr in ("ty", "struct_info", "struct_info_", "checked_type"):
        try:
            t = getattr(e, attr, None)
        except Exception:  # noqa: BLE001 - an accessor that raises for this node kind
            t = None
        if t is not None:
            return t
    return None


def _tuple_fields(e):
    from tvm import relax

    return list(e.fields) if isinstance(e, relax.Tuple) else [e]


def _shape(si) -> list:
    try:
        shp = si.shape
        shp = getattr(shp, "values", shp)
        return [int(v) for v in shp]
    except Exception:  # noqa: BLE001 - symbolic / unknown
        return []


def op_label(name: str) -> str:
    s = re.sub(r"_\d+$", "", name)
    return s[6:] if s.startswith("fused_") else s


def _bits(dtype: str) -> int:
    m = re.search(r"(\d+)", dtype or "")
    return int(m.group(1)) if m else 0


def predict_kernels(kernels: list[dict], target: dict, model: CostModel | None) -> dict:
    """{"source": "model"|"roofline", "total_ms", "band_ms", "layers": [...]} for lowered kernels."""
    samples = [{"target": target, "text": k["text"], "func": k["func"], "in_model": True} for k in kernels]
    for s, k in zip(samples, kernels):
        s["workload"], s["config"] = kernel_tags(k["func"], k["text"])
    sources = None
    if model is not None:
        X = F.featurize(samples)
        mu, lo, hi = model.predict(X)
        source, per_call = "model", model.per_call_ms
        # kernels of a backend the model never learned (AMX on a model trained on VNNI records):
        # the backend's own analytic model, labelled so
        sources = [source] * len(samples)
        for i, s in enumerate(samples):
            w = s.get("workload")
            knows = getattr(model, "knows", None)  # (a duck-typed model without it knows everything)
            if w is not None and knows is not None and not knows(w.get("backend")):
                est = analytic_seconds(w, s.get("config"), target)
                if est is not None:
                    mu[i], lo[i], hi[i], sources[i] = est, est * 0.5, est * 2.0, "analytic"
    else:
        mu = roofline_samples(samples)
        lo, hi = mu * 0.5, mu * 2.0  # a nominal-peak estimate: no band can be measured without records
        source, per_call = "roofline", 0.0
    layers = []
    for i, (k, m, a, b) in enumerate(zip(kernels, mu, lo, hi)):
        in_bits = [_bits(d) for _, d in k["inputs"][:1]]  # the data operand (weights/scales follow)
        layers.append({"index": i, "kernel": k["name"], "op": op_label(k["name"]),
                       "inputs": [list(s) for s, _ in k["inputs"]], "input_dtypes": [d for _, d in k["inputs"]],
                       "output": list(k["output"][0]), "output_dtype": k["output"][1],
                       "bits": max([b_ for b_ in in_bits if b_] or [0]),
                       "predicted_ms": float(m * 1e3), "band_ms": [float(a * 1e3), float(b * 1e3)],
                       "source": sources[i] if sources else source})
    n = len(layers)
    total = float(np.sum(mu) * 1e3 + per_call * n)
    return {"source": source, "total_ms": total,
            "band_ms": [float(np.sum(lo) * 1e3 + per_call * n), float(np.sum(hi) * 1e3 + per_call * n)],
            "overhead_ms": per_call * n, "kernels": n, "layers": layers}
