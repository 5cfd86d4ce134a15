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

import dataclasses
import datetime
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import __version__, artifact, calibrate, frontend, progress
from .errors import (CalibrationError, ModelError, QCError, QuantizationError, TargetError, UnsupportedOpError, at_node,
                     stage)
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
    shapes: tuple = ()             # --shape NAME=DIMS (qcompiler/shape_spec.py): fixed dims, symbolic ranges
    dims: str = "auto"             # auto: declared-symbolic dims stay symbolic where they can (shape_spec.add_declared);
                                   # static: every dim at its calibration size (--static-shapes)
    fuse_epilogue: bool = True     # residual adds / hard-swish into the conv / dense node (passes/fuse_epilogue.py)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ModelError(f"precision '{self.precision}' is not available; choose from {', '.join(PRECISIONS)}")
        if self.precision == "int4":
            where = "CPUs have none" if self.target.kind == "cpu" else f"{self.target.arch} has none"
            if self.target.kind == "cpu" or self.target.arch == "sm_90":
                raise TargetError(f"--precision int4 (4-bit weights and activations) needs native s4 tensor cores "
                                  f"and {where}; use --precision w4a8 (4-bit weights, 8-bit activations)")
            # the s4 kernels exist (qcompiler/kernels/backends/cuda_int4.py) but passes/quantize.py emits
            # no 4-bit activation codes yet
            raise TargetError(f"--precision int4 (W4A4) on {self.target.arch} is not available yet: the quantizer "
                              "produces no 4-bit activations; use --precision w4a8 (4-bit weights, 8-bit activations)")
        if self.batch < 1:
            raise ModelError(f"batch must be >= 1, got {self.batch}")
        if self.dims not in ("auto", "static"):
            raise ModelError(f"dims must be 'auto' or 'static', got '{self.dims}'")
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
    calib_stats: dict | None = None  # calibration statistics before smoothing (retrace at other shapes)
    qcfg: object = None              # the QuantConfig the integer graph was made with (plan included)
    input_shapes: dict = field(default_factory=dict)  # compiled input shapes
    sym_vars: list = field(default_factory=list)      # dims kept symbolic (qcompiler/symbolic.SymVar)
    traces: dict | None = None      # retraces by input shapes, while keep_symbolic runs (each shape traced once)


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
    from passes.subpixel_deconv import subpixel_deconv

    def canon(graph):
        return canonicalize(graph, keep_unsupported=allow_float)

    for name, p in (("canonicalize", canon), ("fold_batchnorm", fold_batchnorm),
                    ("fuse_nonlinear", fuse_nonlinear), ("fuse_patterns", fuse_patterns),
                    ("fuse_attention", fuse_attention), ("fuse_activation", fuse_activation),
                    ("subpixel_deconv", subpixel_deconv)):
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
        # read once per compile: the load(reuse=True) calls below take this read's model
        specs = frontend.input_specs(frontend.read_upgraded(model_path))
        frontend.check_input_specs(specs, str(model_path))
    if calib is None:
        raise CalibrationError("calibration data is required: pass --calib data.npz (keys = input names; "
                               "which axis holds the samples: see qcompiler/calibrate.py); a data-free mode is "
                               "not available yet")
    with stage("reading calibration data"):
        shape_res = resolve_shapes(specs, opts)
        varied = set(shape_res.ranges)  # symbolic dims: samples may differ in them
        groups = calibrate.calibration_groups(calibrate.load_calibration(calib), specs, opts.batch, varied)
        data = groups[0]
    batch = data.batch
    with stage("input shapes"):
        sym_vars = symbolic_vars(shape_res, data.shapes)
    if opts.target.kind != "cpu":  # the dims kept symbolic by default stay at their calibration sizes
        sym_vars = [v for v in sym_vars if not v.auto]  # (--shape ranges: lowering/gemm_cuda.py)
    with rep.timed("reading and folding the model"), stage("frontend"):
        # reuse: the read above, and its checks serve the loads at other shapes below (calibration
        # groups, the traces of symbolic dims: driver.retrace)
        fr = frontend.load(model_path, batch=batch, shapes=data.shapes, samples=data, reuse=True)
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
    rounding = opts.mixed.rounding if opts.mixed else "auto"
    hess = None
    if rounding == "gptq":  # GPTQ for every layer: Hessians from this same run (qcompiler/calib_hessians.py)
        from .calib_hessians import FloatHessians

        hess = FloatHessians(fg, len(range(0, n, batch)))
    with stage("calibration"):
        stats = calibrate.collect(fr.model, data, tensors, batch, tap=hess)
        for g in groups[1:]:  # samples of other sizes of the symbolic dims, each run at its own shape
            rep.stage(f"calibrating on {g.n} samples of shape(s) " + ", ".join(f"{k} {tuple(v)}" for k, v in g.shapes.items()))
            fr_g = frontend.load(model_path, batch=batch, shapes=g.shapes, samples=g, reuse=True)
            more = calibrate.collect(fr_g.model, g, [t for t in tensors if t in fr_g.graph.shapes], batch)
            merge_rng = np.random.default_rng(0)
            stats = {t: calibrate.merge_stats(st, more[t], merge_rng) if t in more else st for t, st in stats.items()}
            n += g.n
        from passes.shared_steps import share_step_ranges

        stats = share_step_ranges(stats)  # unrolled recurrences: one range per role over the steps
    calib_stats = stats
    from passes.smooth import smooth

    with stage("smooth"):
        fg, stats = smooth(fg, stats, opts.smooth, hess.store if hess else None)
    t["calibrate"] = time.perf_counter() - t1
    from .kernels.backends import takes_a16

    # a head is widened where the target has W8A16 kernels, and not past a mixed-precision plan (the
    # ILP's choice among W4A8 / W8A8 / W8A16 sets every layer's bits)
    cfg = QuantConfig(method=opts.method, io=opts.io, softmax=opts.softmax, gelu=opts.gelu,
                      head_a16=takes_a16(opts.target.kind) and opts.precision == "int8",
                      allow_float=opts.allow_float, rounding=rounding, hessians=hess.store if hess else None)
    with stage("sign analysis"):
        nonneg = nonnegative(fg)
    plan_report = None
    state = QuantState(fr, fg, stats, nonneg, cfg, data)
    if opts.precision != "int8" or (opts.mixed and opts.mixed.pins):
        from .mixed.plan import make_plan

        with stage("mixed precision"):
            cfg, plan_report = make_plan(fr, fg, stats, nonneg, cfg, data, opts, model_path)
    # the size-dependent choices of every trace are those of the calibration shapes (_retrace)
    cfg = dataclasses.replace(cfg, calib_shapes=dict(fg.shapes))
    with stage("quantize"):
        ig = quantize(fg, stats, nonneg, cfg, fr.model)
    if plan_report:
        from .mixed.plan import check_applied

        check_applied(ig, plan_report)
    if opts.fuse_epilogue:
        from passes.fuse_epilogue import fuse_epilogue

        with stage("fuse epilogues"):
            ig = fuse_epilogue(ig)
    with stage("overflow check"):
        intervals = check_overflow(ig)
    t["quantize"] = time.perf_counter() - t1 - t["calibrate"]
    return Prepared(fr, fg, ig, intervals, n, t, batch, dict(data.axes), plan_report, state, calib_stats, cfg,
                    dict(data.shapes), sym_vars)


def resolve_shapes(specs, opts: CompileOptions):
    """``--shape`` checked against the model's inputs, plus (``dims="auto"``) the declared-symbolic
    dims it leaves open (``shape_spec.add_declared``)."""
    from .shape_spec import add_declared, parse, resolve

    res = resolve(specs, parse(list(opts.shapes)))
    return add_declared(specs, res) if opts.dims == "auto" else res


def symbolic_vars(res, calib_shapes: dict) -> list:
    """The dims kept symbolic (``--shape`` ranges and, by default, the declared ones; ``resolve_shapes``)
    as ``symbolic.SymVar`` s; a dim ``--shape`` fixes must be the size the calibration samples (or
    --batch) give it."""
    from .symbolic import SymVar

    for inp, axes in res.fixed.items():
        for ax, size in axes.items():
            have = calib_shapes[inp][ax]
            if have != size:
                raise ModelError(f"--shape {inp}: dim {ax} = {size}, but the calibration samples (or --batch) give "
                                 f"it {have}; give samples of that size (a range, {min(size, have)}..{max(size, have)},"
                                 " keeps the dim symbolic)")
    out = []
    for var, r in res.ranges.items():
        sizes = {calib_shapes[inp][ax] for inp, ax in res.where[var]}
        if var in res.auto and (len(sizes) != 1 or min(sizes) < 1):
            continue  # a default dim the samples do not size consistently stays as they give it
        if len(sizes) != 1:
            raise ModelError(f"dim '{var}' has sizes {sorted(sizes)} in the calibration samples of "
                             f"{sorted({i for i, _ in res.where[var]})}; they must agree")
        size = sizes.pop()
        if var in res.auto:
            out.append(SymVar(var, r.lo, max(r.hi, size), list(res.where[var]), size, r.step, auto=True))
            continue
        if not r.lo <= size <= r.hi or size % r.step:
            raise ModelError(f"--shape: dim '{var}' is {size} in the calibration samples, outside the range "
                             f"{r.lo}..{r.hi}" + (f" or not a multiple of {r.step}" if r.step > 1 else "")
                             + "; widen the range or calibrate inside it")
        out.append(SymVar(var, r.lo, r.hi, list(res.where[var]), size, r.step))
    return out


def retrace(model_path: str | os.PathLike, prep: Prepared, opts: CompileOptions,
            shapes: dict[str, tuple[int, ...]]) -> Graph:
    """The integer graph of the same model at other input ``shapes``, quantized with the calibration
    statistics of ``prep`` (scales are per tensor: the same at every shape; ``qcompiler/symbolic.py``).
    While ``prep.traces`` is a dict (``keep_symbolic``) each shape is traced once, its failure too."""
    if prep.traces is None:
        return _retrace(model_path, prep, opts, shapes)
    key = tuple(sorted((k, tuple(v)) for k, v in shapes.items()))
    if key not in prep.traces:
        try:
            prep.traces[key] = _retrace(model_path, prep, opts, shapes)
        except QCError as e:
            prep.traces[key] = e
    got = prep.traces[key]
    if isinstance(got, QCError):
        raise got
    return got


def _retrace(model_path, prep: Prepared, opts: CompileOptions, shapes) -> Graph:
    from passes.quantize import quantize
    from passes.sign import nonnegative
    from passes.smooth import smooth

    fr = frontend.load(model_path, batch=None, shapes=shapes, samples=None, reuse=True, loop_recurrent=True)
    if fr.guards or prep.fr.guards:
        from .symbolic import SymbolicError

        raise SymbolicError("the model branches on its inputs (If specialized on the calibration data): its dims "
                            "cannot stay symbolic; fix them with --shape")
    fg = float_passes(fr.graph, opts.allow_float)
    fg, stats = smooth(fg, prep.calib_stats, opts.smooth, prep.qcfg.hessians)
    ig = quantize(fg, stats, nonnegative(fg), prep.qcfg, fr.model)
    if opts.fuse_epilogue:  # as prepare(): the dense kernels over a symbolic row count take the fused
        from passes.fuse_epilogue import fuse_epilogue  # steps (cpu_vnni.dense; convs lower them apart)

        ig = fuse_epilogue(ig)
    return ig


def symbolic_graph(model_path: str | os.PathLike, prep: Prepared, opts: CompileOptions, sym_vars: list) -> Graph:
    """The integer graph with the dims of ``sym_vars`` symbolic (``qcompiler/symbolic.py``): traced at
    a grid of sizes and fitted."""
    from .symbolic import fit_graph, probe_points

    def shapes_at(point):
        return _shapes_at(prep, sym_vars, point)

    rep = progress.get()
    points = probe_points(sym_vars)
    traced: dict = {}

    def trace(point):  # one retrace per point: a table's sizes include the grid's and the largest ones
        key = tuple(sorted(point.items()))
        if key not in traced:
            traced[key] = retrace(model_path, prep, opts, shapes_at(point))
        return traced[key]

    traces = []
    for p in rep.iterate(points, total=len(points), desc="tracing symbolic dims"):
        try:
            traces.append(trace(p))
        except QCError as e:  # e.g. tensors the calibration never saw: steps of a recurrence unrolled over the dim
            from .symbolic import SymbolicError

            raise SymbolicError(f"the integer graph changes with {', '.join(repr(v.name) for v in sym_vars)} (traced at "
                                + ", ".join(f"{k}={x}" for k, x in p.items()) + f": {_clip(str(e).splitlines()[0], 160)}): "
                                "the model is unrolled or specialized over that dim; fix it with --shape") from None
    # the largest sizes, for per-position constants; a batch dim at its largest probe size (what
    # depends on the batch is a broadcast, and the whole model is run once at this shape)
    hi = {v.name: (max(p[v.name] for p in points) if _is_batch_var(v, prep) else v.hi // v.step) for v in sym_vars}

    def at_max_trace():
        try:
            return trace(hi)
        except QCError as e:
            raise _model_bound(model_path, prep, opts, sym_vars, shapes_at, e) from None

    def tabulate(name):  # every size of one variable, the others at their first grid value
        from .symbolic import TABLE_MAX, SymbolicError

        v = next(x for x in sym_vars if x.name == name)
        us = range(-(-v.lo // v.step), v.hi // v.step + 1)
        if len(us) > TABLE_MAX:
            raise SymbolicError(f"a constant follows dim '{name}' in no polynomial way (e.g. the divisor of a mean over "
                                f"it) and its range has {len(us)} sizes, more than the {TABLE_MAX} traced one by one; "
                                "give --shape a smaller range (or a step) for it")
        rep.stage(f"tabulating a constant over the {len(us)} sizes of '{name}'")
        return [(u, trace({**points[0], name: u})) for u in us]

    at_max = _Memo(lambda _: at_max_trace())
    graph = fit_graph(traces, points, [v.name for v in sym_vars], lambda: at_max(0), _Memo(tabulate), max_point=hi)
    # overflow bounds grow with some sizes (a sum over the sequence): proven at the largest ones
    from passes.overflow import check_overflow

    with stage("overflow check (largest sizes)"):
        try:
            check_overflow(at_max(0))
        except QuantizationError as e:  # a sum over the dim outgrows int32: the largest size that fits
            raise _model_bound(model_path, prep, opts, sym_vars, shapes_at, e, overflow=True) from None
    return graph


def _clip(text: str, n: int) -> str:
    """``text`` cut to at most ``n`` characters at a word boundary, "..." marking the cut."""
    if len(text) <= n:
        return text
    return text[: n - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def _shapes_at(prep: Prepared, sym_vars: list, point: dict) -> dict:
    """The input shapes at ``point`` (u per variable; a size is step * u), the other dims as compiled."""
    out = {k: list(v) for k, v in prep.input_shapes.items()}
    for v in sym_vars:
        for inp, ax in v.where:
            out[inp][ax] = point[v.name] * v.step
    return {k: tuple(v) for k, v in out.items()}


def _shapes_fit(model_path, prep: Prepared, sym_vars: list, loads: bool = False) -> bool:
    """Fail fast (``StrideError``) where a tensor dim of the float graph follows the variables in no
    polynomial way (a strided conv's output width): the frontend alone at the probe points costs a
    fraction of the full traces, which would fail the same way later (an image dim kept symbolic
    by default).  A point the frontend cannot load is left to the full trace to explain (False;
    ``loads``: the frontend's error is raised)."""
    from .symbolic import StrideError, fit_int, probe_points

    points = probe_points(sym_vars)
    shapes = []
    for p in points:
        try:
            shapes.append(frontend.load(model_path, batch=None, shapes=_shapes_at(prep, sym_vars, p), samples=None,
                                        reuse=True, loop_recurrent=True).graph.shapes)
        except QCError:
            if loads:
                raise
            return False
    names = [v.name for v in sym_vars]
    for t, shp in shapes[0].items():
        if any(len(g.get(t, ())) != len(shp) for g in shapes):
            continue
        for ax in range(len(shp)):
            vals = [g[t][ax] for g in shapes]
            if all(isinstance(x, (int, np.integer)) for x in vals) and fit_int(vals, points, names) is None:
                raise StrideError(f"dim {ax} of tensor '{t}' takes sizes {vals} at "
                                  + "; ".join(", ".join(f"{k}={x}" for k, x in p.items()) for p in points)
                                  + f": no polynomial in {', '.join(repr(n) for n in names)}")
    return True


class _Memo:
    def __init__(self, f):
        self.f, self.seen = f, {}

    def __call__(self, key):
        if key not in self.seen:
            self.seen[key] = self.f(key)
        return self.seen[key]


def _is_batch_var(v, prep: Prepared) -> bool:
    """Whether every occurrence of the symbolic dim ``v`` is an input's batch axis."""
    return all(prep.batch_axes.get(inp) == ax for inp, ax in v.where)


class DimBoundError(ModelError):
    """A symbolic dim's range reaches past what the model allows (``var`` is good up to ``bound``)."""

    def __init__(self, message: str, var: str, bound: int):
        super().__init__(message)
        self.var, self.bound = var, bound


def _model_bound(model_path, prep: Prepared, opts: CompileOptions, sym_vars: list, shapes_at, err,
                 overflow: bool = False) -> ModelError:
    """The model cannot be traced (``overflow``: its int32 bounds cannot be proven) at the largest
    sizes: find, per variable, the largest size it takes (a position-embedding table of 512 rows
    bounds the sequence at 512) and name it (``DimBoundError``)."""
    from passes.overflow import check_overflow

    def works(point) -> bool:
        try:
            g = retrace(model_path, prep, opts, shapes_at(point))
            if overflow:
                check_overflow(g)
            return True
        except QCError:
            return False

    def loads(point) -> bool:  # the frontend alone (shape inference, folding): where most bounds show
        try:
            frontend.load(model_path, batch=None, shapes=shapes_at(point), samples=None, reuse=True, loop_recurrent=True)
            return True
        except QCError:
            return False

    def largest(test, ok, bad, guesses=()):  # test(ok) holds, test(bad) fails
        # the pivots are first the sizes of the model's constants (and one past them) between ok and
        # bad: a bound is usually one of them (a table of 512 rows), and a bisection over those few
        # finds it in a few tests instead of log2(bad - ok); then halving, as the test is monotone
        cs = sorted({u for g in guesses for u in (g, g + 1) if ok < u < bad})
        while cs:
            mid = cs[len(cs) // 2]
            ok, bad = (mid, bad) if test(mid) else (ok, mid)
            cs = [u for u in cs if ok < u < bad]
        while bad - ok > 1:
            mid = (ok + bad) // 2
            ok, bad = (mid, bad) if test(mid) else (ok, mid)
        return ok, bad

    try:  # as written (folding slices the tables); only guesses: none without the file
        sizes = _constant_sizes(frontend.read_upgraded(model_path))
    except QCError:
        sizes = set()

    base = {v.name: v.calibrated // v.step for v in sym_vars}
    for v in sym_vars:
        ok, bad = v.calibrated // v.step, v.hi // v.step

        def at(test, name=v.name):  # the test at u for this variable, the others at their calibrated sizes
            return lambda u: test({**base, name: u})
        if at(works)(bad):
            continue
        guesses = {d // v.step for d in sizes if d % v.step == 0}
        if not overflow and not at(loads)(bad):
            # bisect on the cheap test, then confirm with whole traces (a bound from a later pass)
            ok2, bad = largest(at(loads), ok, bad, guesses)
            ok, bad = (ok2, bad) if at(works)(ok2) else (ok, ok2)
        ok, bad = largest(at(works), ok, bad, guesses)
        where = ", ".join(f"{i} axis {ax}" for i, ax in v.where)
        ok, bad = ok * v.step, (ok + 1) * v.step
        who = "its int32 accumulators bound" if overflow else "the model bounds"
        return DimBoundError(f"{who} dim '{v.name}' ({where}) at {ok}: at {bad} it fails "
                             f"({str(err).splitlines()[0][:160]}); give --shape a range up to {ok}", v.name, ok)
    # no dim fails alone: the bound is on their product (an int32 bound over height x width); the
    # largest dim narrowed first, the others at their largest sizes
    tops = {v.name: v.hi // v.step for v in sym_vars}
    for v in sorted(sym_vars, key=lambda x: -x.hi) if len(sym_vars) > 1 else []:
        def jointly(u, name=v.name):
            return works({**tops, name: u})
        lo_u = v.calibrated // v.step
        if not jointly(lo_u):
            continue
        ok, bad = largest(jointly, lo_u, v.hi // v.step)
        others = ", ".join(f"'{x.name}'" for x in sym_vars if x is not v)
        who = "its int32 accumulators bound" if overflow else "the model bounds"
        return DimBoundError(f"{who} dim '{v.name}' at {ok * v.step} with {others} at their largest sizes: at "
                             f"{bad * v.step} it fails ({_clip(str(err).splitlines()[0], 160)}); give --shape "
                             "smaller ranges", v.name, ok * v.step)
    return ModelError(f"the model cannot be traced at the largest sizes of its symbolic dims "
                      f"({', '.join(f'{k}={x}' for k, x in {v.name: v.hi for v in sym_vars}.items())}): "
                      f"{_clip(str(err).splitlines()[0], 200)}; give --shape smaller ranges")


def _constant_sizes(model) -> set[int]:
    """Every dim of the model's initializers and Constant tensors (the sizes a bound may take)."""
    out = {int(d) for i in model.graph.initializer for d in i.dims}
    for n in model.graph.node:
        if n.op_type == "Constant":
            out.update(int(d) for a in n.attribute if a.type == onnx.AttributeProto.TENSOR for d in a.t.dims)
    return out


def keep_symbolic(model_path, prep: Prepared, opts: CompileOptions):
    """The symbolic graph of ``prep.sym_vars`` -> (graph or None, the variables kept, the ones fixed).

    The dims ``--shape`` asks for stay symbolic or the compile fails (one line).  The dims kept
    symbolic by default (``SymVar.auto``) narrow to the bound the model sets (a position table) and,
    where they cannot stay symbolic at all (an image dim through a strided conv: no polynomial; a
    recurrence unrolled over time), stay at their calibration size: ``fixed`` is [(SymVar, reason)].
    Several such dims are tried together, then one by one."""
    prep.traces = {}
    try:
        return _keep_symbolic(model_path, prep, opts)
    finally:
        prep.traces = None


def _keep_symbolic(model_path, prep: Prepared, opts: CompileOptions):
    from .shape_spec import AUTO_STEPS
    from .symbolic import StrideError, SymbolicError

    user = [v for v in prep.sym_vars if not v.auto]
    auto = [v for v in prep.sym_vars if v.auto]
    fixed: list = []

    def attempt(vs):
        if any(v.auto for v in vs):
            _shapes_fit(model_path, prep, vs)
        while True:
            try:
                return symbolic_graph(model_path, prep, opts, vs), vs
            except DimBoundError as e:
                v = next((x for x in vs if x.name == e.var), None)
                if v is None or not v.auto or e.bound >= v.hi or e.bound < v.calibrated:
                    raise
                progress.get().stage(f"dim '{v.name}' stays symbolic up to {e.bound}, the bound the model sets")
                vs = [dataclasses.replace(x, hi=e.bound) if x is v else x for x in vs]

    lattice_tried: set = set()

    def reason(e: BaseException, v=None) -> str:
        if isinstance(e, StrideError) or (v is not None and v.name in lattice_tried):  # on_lattice found no step
            return _clip(str(e).splitlines()[0], 200) + f", nor in steps of {'/'.join(map(str, AUTO_STEPS))}"
        return _clip(str(e).splitlines()[0], 200) if isinstance(e, QCError) else \
            _clip(f"internal error ({type(e).__name__}: {e})", 200)

    def runs_at_probes(v) -> bool:
        try:
            _shapes_fit(model_path, prep, user + [v], loads=True)
            return True
        except QCError:
            return False

    def on_lattice(v, e):
        """``v`` kept symbolic in steps of the model's stride (an image width through strided convs:
        sizes step * u), the smallest step that divides its calibration size and under which every
        tensor dim is a polynomial in u; None if there is none, or if ``e`` was neither a stride
        failure nor one of a model that does not run at the probe sizes (a detector whose upsampled
        features must match the strided ones: sizes in multiples of its total stride only)."""
        if not isinstance(e, StrideError) and not (isinstance(e, SymbolicError) and not runs_at_probes(v)):
            return None
        lattice_tried.add(v.name)
        for st in AUTO_STEPS:
            if v.calibrated % st or v.hi // st < 16:
                continue
            w = dataclasses.replace(v, step=st, lo=st, hi=v.hi // st * st)
            try:
                _shapes_fit(model_path, prep, user + [w], loads=True)
            except QCError:  # not polynomial in u, or the model does not run at the probe sizes (too small)
                continue
            try:
                _, vs = attempt(user + [w])
            except SymbolicError:  # e.g. more sizes than a per-size constant can be tabulated for: a larger step
                continue
            except Exception:  # noqa: BLE001 -- the dim stays at its calibration size
                return None
            first = v.where[0][0]
            progress.get().stage(f"dim '{v.name}' stays symbolic in steps of {st} ({w.lo}..{w.hi}: the model's "
                                 f"stride); other sizes are refused at run time (for one size, --shape {first}=... "
                                 "with that size, or --static-shapes, builds the faster static library)")
            return next(x for x in vs if x.name == v.name)
        return None

    try:
        return (*attempt(user + auto), fixed)
    except Exception as e:  # noqa: BLE001 -- a default dim falls back to its calibration size, said in a warning
        if not auto:
            raise
        first = e
    ok = []
    for v in auto if len(auto) > 1 else []:
        try:
            _, vs = attempt(user + [v])
            ok.append(next(x for x in vs if x.name == v.name))
        except Exception as e:  # noqa: BLE001
            w = on_lattice(v, e)
            if w is not None:
                ok.append(w)
            else:
                fixed.append((v, reason(e, v)))
    if len(auto) == 1:
        w = on_lattice(auto[0], first)
        if w is not None:
            ok.append(w)
        else:
            fixed.append((auto[0], reason(first, auto[0])))
    if ok:
        try:
            return (*attempt(user + ok), fixed)
        except Exception as e:  # noqa: BLE001
            fixed += [(v, reason(e)) for v in ok]
    if user:
        return (*attempt(user), fixed)
    return None, [], fixed


def layer_table(ig: Graph, loop: str | None = None) -> list[dict]:
    """The GEMM-like layers; those of a loop's body (a recurrence over a symbolic dim) once, with
    ``loop`` naming the loop (they run once per step)."""
    rows = []
    for n in ig.nodes:
        if n.op == "loop":
            rows += layer_table(n.attrs["body"], n.name)
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
                             "weight_shape": list(w.shape) if w is not None else None,
                             **({"loop": loop} if loop else {})})
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
    out = artifact.check_library_path(out_path)
    t0 = time.perf_counter()
    prep = prepare(model_path, calib, opts)
    ig = prep.int_graph
    with stage("target setup"):
        target = opts.target.tvm_target()
    from .tune.apply import activate

    lower_graph, sg, fixed = ig, None, []
    if prep.sym_vars:  # one library for every size of these dims (qcompiler/symbolic.py)
        from .symbolic import tir_vars, to_tir

        t_sym = time.perf_counter()
        with rep.timed("tracing the symbolic dims"), stage("symbolic dims"):
            sg, prep.sym_vars, fixed = keep_symbolic(model_path, prep, opts)
        prep.timings["symbolic_dims"] = time.perf_counter() - t_sym
        for v, why in fixed:
            rep.warn(fixed_dim_warning(v, why))
    if sg is not None:
        lower_graph = to_tir(sg, tir_vars([v.name for v in prep.sym_vars]))
        lower_graph.dim_ranges = {v.name: (v.lo, v.hi, v.step) for v in prep.sym_vars}
    from .symbolic import tir_name
    from .tune.workload import rows_at

    def lower_and_build(graph):
        with stage("lowering and build"):
            with activate(opts.target, opts.tune_log) as tuned, rows_at({tir_name(v.name): v.calibrated // v.step
                                                                          for v in prep.sym_vars}):
                return build(graph, target, use_kernels=opts.use_kernels, allow_float=opts.allow_float), tuned

    t1 = time.perf_counter()
    try:
        res, tuned = lower_and_build(lower_graph)
    except Exception as e:  # noqa: BLE001 -- dims kept symbolic only by default fall back to their sizes
        if sg is None or not all(v.auto for v in prep.sym_vars):
            raise
        why = f"the symbolic build failed: {str(e).splitlines()[0][:160]}"
        for v in prep.sym_vars:
            fixed.append((v, why))
            rep.warn(fixed_dim_warning(v, why))
        prep.sym_vars, sg = [], None
        res, tuned = lower_and_build(ig)
    t_build = time.perf_counter() - t1
    layer_graph = ig  # a library whose recurrences are loops: its layers are the loop bodies'
    if sg is not None and any(n.op == "loop" for n in sg.nodes):
        layer_graph = retrace(model_path, prep, opts, {t: ig.shapes[t] for t in ig.inputs})
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
            "weight_rounding": getattr(prep.qcfg, "rounding", "auto"),
            "softmax": opts.softmax,
            "gelu": opts.gelu,
            "inputs": [{**e, "batch_axis": prep.batch_axes.get(e["name"])}
                       for e in _io_entries(ig, ig.inputs, prep.fr.graph.dtypes, opts, "input")],
            "outputs": _io_entries(ig, ig.outputs, prep.fr.graph.dtypes, opts, "output"),
            "layers": layer_table(layer_graph),
            "mixed_precision": prep.mixed,
            "integer_only": bool(res.scan.integer_only) if res.scan is not None else not res.float_islands,
            "float_islands": float_island_table(ig, res),
            "guards": [g.as_json() for g in prep.fr.guards],
            "kernels": {"count": len(res.tir.functions), "generic_fallbacks": res.fallbacks,
                        "gemm": res.gemm_name, "gemm_kernels": res.gemm_kernels,
                        # recurrences run as one kernel each, or as VM recursion over their steps
                        **({"loops": res.loops} if res.loops else {})},
            "tuning": tuned.summary(),
            "warnings": [fixed_dim_warning(v, why) for v, why in fixed] + list(res.warnings),
            "timings_s": {**{k: round(v, 3) for k, v in prep.timings.items()}, "build": round(t_build, 3)},
            "tir": artifact.encode_text(tir_text),
        }
        if sg is not None:
            _symbolic_meta(meta, sg, prep.sym_vars)
        if fixed:  # declared symbolic, kept at the calibration size (keep_symbolic)
            meta["fixed_dims"] = {v.name: {"size": v.calibrated, "where": [list(w) for w in v.where], "reason": why}
                                  for v, why in fixed}
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


def fixed_dim_warning(v, why: str) -> str:
    """One line: a dim the model declares symbolic that the library fixes at its calibration size."""
    where = ", ".join(f"{i} axis {ax}" for i, ax in v.where)
    first = v.where[0][0]
    return (f"dim '{v.name}' ({where}) is fixed at {v.calibrated}, its calibration size: it cannot stay symbolic "
            f"({why}); --shape {first}=... with a size fixes it without this warning (with a range, and a step "
            "such as 32..1280:32 for an image width, asks for it to stay symbolic)")


def _symbolic_meta(meta: dict, sg: Graph, sym_vars: list) -> None:
    """model.json of a library with symbolic dims: ``symbolic_dims`` and the inputs' / outputs' shapes
    naming them (``qcompiler/shape_spec.py``)."""
    meta["symbolic_dims"] = {v.name: {"min": v.lo, "max": v.hi, "calibrated": v.calibrated,
                                      "where": [list(w) for w in v.where], **({"step": v.step} if v.step > 1 else {})}
                             for v in sym_vars}
    steps = {v.name: v.step for v in sym_vars}

    def dim(d):  # a Poly in u = size / step, written in the sizes: 16*W_u with step 4 -> "4*W"
        if isinstance(d, (int, np.integer)):
            return int(d)
        parts = []
        for m, c in d.terms:
            div = int(np.prod([steps[v] for v in m])) if m else 1
            names = "*".join(sorted(m))
            if not m:
                parts.append(str(c))
            elif c % div == 0:
                parts.append(names if c == div else f"{c // div}*{names}")
            else:
                from math import gcd

                g = gcd(c, div)  # 2*W_u with step 4 -> "W/2"
                c, dv = c // g, div // g
                parts.append(f"{names}/{dv}" if c == 1 else f"{c}*{names}/{dv}")
        return " + ".join(parts).replace("+ -", "- ")
    for e in meta["inputs"] + meta["outputs"]:
        if e["name"] in sg.shapes:
            e["shape"] = [dim(d) for d in sg.shapes[e["name"]]]


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
