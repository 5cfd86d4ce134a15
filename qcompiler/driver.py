"""The compile driver: ONNX file + calibration data -> model.so + model.json.

frontend (check, upgrade, freeze, fold) -> float passes (canonicalize, fold BN, fuse patterns and
activations) -> support check (every unsupported op at once, before any work) -> calibration
(onnxruntime) -> quantization (integer graph) -> scale and overflow checks -> Relax lowering and
build -> atomic export.

``allow_float`` (``qc compile --allow-float``): the nodes without an integer form stay in float
islands (``qcompiler/intops/island.py``) instead of failing the support check; the library is then
not integer-only, and model.json says so (``integer_only``, ``float_islands``).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, artifact, calibrate, frontend, progress
from .errors import CalibrationError, ModelError, TargetError, UnsupportedOpError, at_node, stage
from .graph import Graph
from .mixed.plan import MixedOptions
from .targets import TargetSpec

# int8: every layer W8A8; w4a8: 4-bit weights everywhere (GPTQ rounding); mixed: per layer, by the
# ILP of qcompiler/mixed/ (docs/mixed_precision.md); int4 (W4A4) needs native s4 tensor cores
PRECISIONS = ("int8", "w4a8", "mixed", "int4")


@dataclass(frozen=True)
class CompileOptions:
    target: TargetSpec
    precision: str = "int8"
    batch: int = 1
    method: str = "percentile"
    io: str = "float"
    softmax: str = "iexp"
    gelu: str = "igelu"
    smooth: float = 0.5               # SmoothQuant alpha for Dense inputs (passes/smooth.py); 0 = off
    use_kernels: bool = True
    dump_dir: str | None = None
    tune_log: str | None = None    # tuning log dir (None: $QC_TUNE_LOG or autotune_logs/<device>/; "off": none)
    allow_float: bool = False      # keep nodes without an integer form in float islands (not integer-only)
    mixed: MixedOptions | None = None  # pins, budgets, rounding of --precision w4a8|mixed (qcompiler/mixed/)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ModelError(f"precision '{self.precision}' is not available; choose from {', '.join(PRECISIONS)}")
        if self.precision == "int4":
            where = "CPUs have none" if self.target.kind == "cpu" else f"{self.target.arch} has none"
            if self.target.kind == "cpu" or self.target.arch == "sm_90":
                raise TargetError(f"--precision int4 (4-bit weights and activations) needs native s4 tensor cores "
                                  f"and {where}; use --precision w4a8 (4-bit weights, 8-bit activations)")
            raise TargetError(f"--precision int4 (W4A4) on {self.target.arch} is not available yet; use --precision w4a8 "
                              "(4-bit weights, 8-bit activations)")
        if self.batch < 1:
            raise ModelError(f"batch must be >= 1, got {self.batch}")
        if self.method not in calibrate.METHODS:
            raise CalibrationError(f"unknown calibration method '{self.method}'; choose from {', '.join(calibrate.METHODS)}")


@dataclass
class Prepared:
    """Everything up to (not including) the TVM build: reusable by tests, tuning and prediction."""
    fr: frontend.FrontendResult
    float_graph: Graph
    int_graph: Graph
    intervals: dict
    calib_samples: int
    timings: dict = field(default_factory=dict)
    batch: int = 1                  # samples per run of the compiled library
    batch_axes: dict = field(default_factory=dict)  # input name -> its batch axis (None: it has none)
    mixed: dict | None = None       # the per-layer precision plan and how it was chosen (model.json)
    state: QuantState | None = None  # what quantization started from (re-quantize with another plan)


@dataclass
class QuantState:
    """The inputs of ``passes.quantize.quantize``: the mixed-precision search re-quantizes from here."""
    fr: frontend.FrontendResult
    fg: Graph
    stats: dict
    nonneg: set
    cfg: object                     # the all-INT8 QuantConfig
    data: calibrate.CalibSet


def float_passes(g: Graph, allow_float: bool = False) -> Graph:
    """The float rewrites in order; each runs as its own stage (an unexpected failure names it).
    ``allow_float``: canonicalization keeps the nodes it cannot take, unchanged and marked as float
    islands, instead of raising."""
    from passes.canonicalize import canonicalize
    from passes.fold_batchnorm import fold_batchnorm
    from passes.fuse_activation import fuse_activation
    from passes.fuse_attention import fuse_attention
    from passes.fuse_nonlinear import fuse_nonlinear
    from passes.fuse_patterns import fuse_patterns

    def canon(graph):
        return canonicalize(graph, keep_unsupported=allow_float)

    for name, p in (("canonicalize", canon), ("fold_batchnorm", fold_batchnorm),
                    ("fuse_nonlinear", fuse_nonlinear), ("fuse_patterns", fuse_patterns),
                    ("fuse_attention", fuse_attention), ("fuse_activation", fuse_activation)):
        with stage(name):
            g = p(g)
    return g


def prepare(model_path: str | os.PathLike, calib: dict[str, np.ndarray] | str | os.PathLike,
            opts: CompileOptions) -> Prepared:
    from passes.overflow import check_overflow
    from passes.quantize import QuantConfig, plan_islands, quantize, unsupported, unsupported_error
    from passes.sign import nonnegative

    rep = progress.get()
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    with stage("frontend"):
        model = frontend.read_model(model_path)
        specs = frontend.input_specs(frontend.upgrade(model, str(model_path)))
        frontend.check_input_specs(specs, str(model_path))
    if calib is None:
        raise CalibrationError("calibration data is required: pass --calib data.npz (keys = input names; "
                               "which axis holds the samples: see qcompiler/calibrate.py); a data-free mode is "
                               "not available yet")
    with stage("reading calibration data"):
        data = calibrate.calibration_set(calibrate.load_calibration(calib), specs, opts.batch)
    batch = data.batch
    with rep.timed("reading and folding the model"), stage("frontend"):
        fr = frontend.load(model_path, batch=batch, shapes=data.shapes, samples=data)
    t["frontend"] = time.perf_counter() - t0
    try:
        fg = float_passes(fr.graph, opts.allow_float)
    except UnsupportedOpError as e:  # strict: the one line names the way out
        raise unsupported_error(e.items, hint=not opts.allow_float) from None
    with stage("support check"):
        bad = unsupported(fg)
        if opts.allow_float:
            islands, bad = plan_islands(fg, bad, fr.model)
            if islands:
                rep.stage(f"keeping {len(islands)} node(s) in float (--allow-float): "
                          + ", ".join(f"{n} ({why})" for n, why in list(islands.items())[:6])
                          + (" ..." if len(islands) > 6 else ""))
    if bad:
        raise unsupported_error(bad, hint=not opts.allow_float)
    t1 = time.perf_counter()
    tensors = [o for n in fr.model.graph.node for o in n.output if o and fr.graph.dtypes.get(o, "").startswith("float")]
    tensors += [s.name for s in specs if s.dtype.startswith("float")]
    tensors = [t for t in tensors if 0 not in tuple(fr.graph.shapes.get(t, (1,)))]  # empty: no range to find
    n = data.n
    with stage("calibration"):
        calibrate.check_memory(fr.graph, tensors, data, batch)
    rep.stage(f"calibrating on {n} samples ({len(tensors)} tensors, method {opts.method})")
    with stage("calibration"):
        stats = calibrate.collect(fr.model, data, tensors, batch)
        from passes.shared_steps import share_step_ranges

        stats = share_step_ranges(stats)  # unrolled recurrences: one range per role over the steps
    from passes.smooth import smooth

    with stage("smooth"):
        fg, stats = smooth(fg, stats, opts.smooth)
    t["calibrate"] = time.perf_counter() - t1
    cfg = QuantConfig(method=opts.method, io=opts.io, softmax=opts.softmax, gelu=opts.gelu,
                      allow_float=opts.allow_float)
    with stage("sign analysis"):
        nonneg = nonnegative(fg)
    plan_report = None
    state = QuantState(fr, fg, stats, nonneg, cfg, data)
    if opts.precision != "int8" or (opts.mixed and opts.mixed.pins):
        from .mixed.plan import make_plan

        with stage("mixed precision"):
            cfg, plan_report = make_plan(fr, fg, stats, nonneg, cfg, data, opts, model_path)
    with stage("quantize"):
        ig = quantize(fg, stats, nonneg, cfg, fr.model)
    if plan_report:
        from .mixed.plan import check_applied

        check_applied(ig, plan_report)
    with stage("overflow check"):
        intervals = check_overflow(ig)
    t["quantize"] = time.perf_counter() - t1 - t["calibrate"]
    return Prepared(fr, fg, ig, intervals, n, t, batch, dict(data.axes), plan_report, state)


def layer_table(ig: Graph) -> list[dict]:
    rows = []
    for n in ig.nodes:
        if n.op in ("conv", "dense", "matmul"):
            w = n.attrs.get("weight")
            with at_node(n):
                wb = int(n.attrs.get("weight_bits", 8)) if w is not None else None
                rows.append({"name": n.name, "op": n.op, "input_dtype": ig.dtypes[n.inputs[0]],
                             "weight_bits": wb,
                             "act_bits": int("".join(ch for ch in ig.dtypes[n.inputs[0]] if ch.isdigit())),
                             "weight_bytes": (int(np.asarray(w).size) * wb + 7) // 8 if w is not None else 0,
                             "output_dtype": n.attrs["dtype"],
                             "in_shape": list(ig.shapes[n.inputs[0]]), "out_shape": list(ig.shapes[n.outputs[0]]),
                             "weight_shape": list(w.shape) if w is not None else None})
    return rows


def float_island_table(ig: Graph, res) -> list[dict]:
    """One entry per float island (``--allow-float``): the ONNX node, its op, why it has no integer
    form and the kernels it runs; float kernels of no island (none expected) in an entry of their own."""
    rows: dict[str, dict] = {}
    for n in ig.nodes:
        if n.op != "float_island":
            continue
        a = n.attrs
        node = a["island"]
        if node not in rows:
            op = f"{a['domain']}.{a['onnx_op']}" if a.get("domain") else a["onnx_op"]
            rows[node] = {"node": node, "op": op, "reason": a.get("reason", ""),
                          "kernels": list(res.island_kernels.get(node, []))}
    out = list(rows.values())
    seen = {k for r in out for k in r["kernels"]}
    stray = [k for k in res.float_islands if k not in seen]
    if stray:
        out.append({"node": None, "op": None, "reason": "float kernels of no island", "kernels": stray})
    return out


def island_warning(islands: list[dict]) -> str:
    """The one-line warning of a compile that kept nodes in float."""
    named = [f"{r['node']} ({r['op']})" for r in islands if r["node"]]
    stray = sum(len(r["kernels"]) for r in islands if not r["node"])
    return (f"the library is not integer-only: {len(named)} node(s) kept in float (--allow-float): "
            + ", ".join(named[:8]) + (" ..." if len(named) > 8 else "")
            + (f"; {stray} other float kernel(s)" if stray else ""))


def _io_entries(ig: Graph, names, fg_dtypes: dict, opts: CompileOptions, side: str) -> list[dict]:
    out = []
    for name in names:
        with at_node((name, side)):
            out.append(_io_entry(ig, name, fg_dtypes, side))
    return out


def _io_entry(ig: Graph, name: str, fg_dtypes: dict, side: str) -> dict:
    e = {"name": name, "shape": list(ig.shapes[name]), "dtype": ig.dtypes[name]}
    if side == "input":
        q = ig.qparams.get(name) or ig.qparams.get(name + "/q")
    else:
        src = next((n.inputs[0] for n in ig.nodes if n.outputs[0] == name), name)
        q = ig.qparams.get(src) or ig.qparams.get(name)
    if q is not None:
        e["scale"] = q.scale
        e["quant_dtype"] = q.dtype
    e["onnx_dtype"] = fg_dtypes.get(name)
    return e


def compile_model(model_path: str | os.PathLike, out_path: str | os.PathLike,
                  calib: dict[str, np.ndarray] | str | os.PathLike | None, opts: CompileOptions) -> dict:
    """Compile and export; returns the metadata written (plus timings)."""
    from .lowering.build import build

    rep = progress.get()
    out = artifact.check_writable(out_path)
    t0 = time.perf_counter()
    prep = prepare(model_path, calib, opts)
    ig = prep.int_graph
    with stage("target setup"):
        target = opts.target.tvm_target()
    t1 = time.perf_counter()
    from .tune.apply import activate

    with stage("lowering and build"):
        with activate(opts.target, opts.tune_log) as tuned:
            res = build(ig, target, use_kernels=opts.use_kernels, allow_float=opts.allow_float)
    t_build = time.perf_counter() - t1
    from .tir_scan import module_to_text

    with stage("TIR scan"):
        tir_text = module_to_text(res.tir)
    import tvm

    with stage("metadata"):
        meta = {
            "format": artifact.FORMAT, "format_version": artifact.FORMAT_VERSION,
            "qcompiler_version": __version__, "tvm_version": tvm.__version__,
            "created_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {"source_path": str(Path(model_path).resolve()), "sha256": _sha256(model_path),
                      "opset": prep.fr.opset},
            "target": {**opts.target.describe(), "tvm": str(target)},
            "precision": opts.precision, "io": opts.io,
            "batch": prep.batch,
            "calibration": {"method": opts.method, "samples": prep.calib_samples},
            "softmax": opts.softmax,
            "gelu": opts.gelu,
            "inputs": [{**e, "batch_axis": prep.batch_axes.get(e["name"])}
                       for e in _io_entries(ig, ig.inputs, prep.fr.graph.dtypes, opts, "input")],
            "outputs": _io_entries(ig, ig.outputs, prep.fr.graph.dtypes, opts, "output"),
            "layers": layer_table(ig),
            "mixed_precision": prep.mixed,
            "integer_only": bool(res.scan.integer_only) if res.scan is not None else not res.float_islands,
            "float_islands": float_island_table(ig, res),
            "guards": [g.as_json() for g in prep.fr.guards],
            "kernels": {"count": len(res.tir.functions), "generic_fallbacks": res.fallbacks,
                        "gemm": res.gemm_name, "gemm_kernels": res.gemm_kernels},
            "tuning": tuned.summary(),
            "warnings": res.warnings,
            "timings_s": {**{k: round(v, 3) for k, v in prep.timings.items()}, "build": round(t_build, 3)},
            "tir": artifact.encode_text(tir_text),
        }
        meta["weight_bytes"] = int(sum(r["weight_bytes"] for r in meta["layers"]))  # conv/dense weights
        for inp in meta["inputs"]:
            rng = _int_input_range(ig, inp["name"])
            if rng is not None:
                inp["valid_range"] = rng
    if meta["float_islands"]:
        rep.warn(island_warning(meta["float_islands"]))
    if opts.dump_dir:
        with stage("dump"):
            dump(opts.dump_dir, ig, res, tir_text, opts)
    meta_path = artifact.metadata_path(out)
    with rep.timed(f"writing {out}"):
        with artifact.atomic_paths(out, meta_path) as (tmp_so, tmp_json), stage("export"):
            res.executable.export_library(str(tmp_so))
            artifact.write_json(tmp_json, artifact.seal(meta, tmp_so))  # model.so's SHA-256, ISA
    meta["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    return meta


def _int_input_range(ig: Graph, name: str):
    """Valid value range of an integer input consumed as indices (embedding tables)."""
    for n in ig.nodes:
        if name in n.inputs and n.op == "embedding":
            return [0, int(n.attrs["table"].shape[0]) - 1]
    return None


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dump(d: str | os.PathLike, ig: Graph, res, tir_text: str, opts: CompileOptions) -> None:
    """Write what was generated: integer graph, Relax module, scheduled TIR, LLVM/CUDA source, cubins."""
    from .dump import write_dump

    write_dump(Path(d), ig, res, tir_text, opts)
