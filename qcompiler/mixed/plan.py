"""Choices, pins, ties and the per-layer plan a compile consumes (``QuantConfig.plan``).

Choices per conv/dense layer (weight bits, activation bits of its input):
    w8a8   the default INT8 layer
    w4a8   4-bit weights in [-8, 7] (per-output-channel scales, GPTQ rounding), int8 activations
    w8a16  int8 weights, int16 input activations (where its producer can emit int16 and the int32
           accumulator bound holds)
    w16a8  16-bit weights (two int8 halves, two INT8 kernels, ``qcompiler/intops/gemm.py``), int8
           activations: for layers whose 8-bit weights lose accuracy (about twice the INT8 cost)

``make_plan`` turns ``--precision`` / ``--pin`` / budgets into a ``QuantConfig`` with the plan:
int8 (pins only), w4a8 (every layer 4-bit unless pinned), mixed (the ILP of ``ilp.py`` over the
sensitivities of ``sensitivity.py`` and the latencies of ``latency.py``).  See
``docs/mixed_precision.md``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import numpy as np

from qcompiler.errors import QCError

CHOICES = {"w8a8": (8, 8), "w4a8": (4, 8), "w8a16": (8, 16), "w16a8": (16, 8)}
PIN_VALUES = {"8": "w8a8", "4": "w4a8", "a16": "w8a16", "16": "w16a8", "w8a8": "w8a8", "w4a8": "w4a8",
              "w8a16": "w8a16", "w16a8": "w16a8"}
# choices that spend latency on precision: their omega is the change of the distance to FP32
# (negative where the layer's extra bits help; ``sensitivity.py``)
SPEND = ("w8a16", "w16a8")
TIE_KEY = tuple(ab for _, ab in CHOICES.values())   # tied layers share their activation bits
PASSTHROUGH = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}


class PlanError(QCError):
    """A precision request that cannot be met: a bad pin, a budget no configuration reaches."""


@dataclass(frozen=True)
class MixedOptions:
    pins: tuple = ()                      # ("NODE", "8"|"4"|"a16") pairs (--pin NODE=8)
    latency_budget: float | None = None   # fraction of the all-INT8 predicted latency
    latency_budget_ms: float | None = None
    size_budget: str | None = None        # "12MB", "800KB" or a fraction of the all-INT8 weight bytes
    bops_budget: float | None = None      # fraction of the all-INT8 BOPS
    rounding: str = "auto"                # auto (GPTQ below 8 bits) | gptq (all layers) | rtn
    samples: int = 16                     # calibration samples for Hessians and sensitivity
    cost_model: str | None = None


def parse_pin(text: str) -> tuple[str, str]:
    name, sep, val = str(text).rpartition("=")
    if not sep or not name or val.lower() not in PIN_VALUES:
        raise PlanError(f"--pin {text}: give NODE=8, NODE=4, NODE=16 (weight bits) or NODE=a16 (16-bit activations)")
    return name, PIN_VALUES[val.lower()]


def gemm_layers(fg) -> list:
    """The float graph's conv/dense nodes that become conv/dense integer layers, in graph order."""
    out = []
    for n in fg.nodes:
        if n.op == "Dense" or (n.op == "Conv" and len(n.inputs) > 1 and n.inputs[1] in fg.consts):
            out.append(n)
    return out


def check_pins(fg, pins) -> dict[str, str]:
    """{node: choice}; a pin naming no conv/dense layer is one line listing near matches."""
    names = [n.name for n in gemm_layers(fg)]
    out = {}
    for text in pins:
        name, choice = parse_pin(text) if isinstance(text, str) else (text[0], PIN_VALUES[str(text[1])])
        if name not in names:
            near = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
            raise PlanError(f"--pin {name}: no GEMM/conv layer of that name; "
                            + (f"near matches: {', '.join(near)}" if near else
                               f"{len(names)} layers, e.g. {', '.join(names[:4])} (qc inspect lists them)"))
        out[name] = choice
    return out


def find_ties(fg, layers) -> list[tuple[int, ...]]:
    """Groups (indices into ``layers``) of layers reading one tensor (through reshapes)."""
    prod = {o: n for n in fg.nodes for o in n.outputs}

    def root(t):
        while t in prod and prod[t].op in PASSTHROUGH and prod[t].inputs:
            t = prod[t].inputs[0]
        return t

    by: dict[str, list[int]] = {}
    for i, n in enumerate(layers):
        by.setdefault(root(n.inputs[0]), []).append(i)
    return [tuple(g) for g in by.values() if len(g) > 1]


def weight_elems(n) -> int:
    w = n.attrs.get("weight") if n.op == "Dense" else None
    return int(np.prod(w.shape)) if w is not None else 0


def plan_tuple(assign: dict[str, str]) -> tuple:
    return tuple((name, *CHOICES[c]) for name, c in assign.items() if c != "w8a8")


def parse_size(text: str, int8_bytes: float) -> float:
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            try:
                v = float(s[:-len(u)]) * f
            except ValueError:
                break
            if v > 0:
                return v
            break
    else:
        try:
            v = float(s)
        except ValueError:
            v = -1.0
        if 0 < v <= 1:
            return v * int8_bytes
    raise PlanError(f"--size-budget {text}: give a size (e.g. 12MB, 800KB) or a fraction in (0, 1] of the "
                    "all-INT8 weight bytes")


def fp32_outputs(onnx_model, feeds: list[dict], names: list[str]) -> list[dict]:
    """ONNX Runtime FP32 outputs of the frozen model on each batch of feeds."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(onnx_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = [i.name for i in sess.get_inputs()]
    outs = []
    for f in feeds:
        r = sess.run(names, {k: f[k] for k in want if k in f})
        outs.append(dict(zip(names, r)))
    return outs


def _macs(ig, names) -> np.ndarray:
    from .latency import _gemm_mnk

    by = {n.name: n for n in ig.nodes if n.op in ("conv", "dense")}
    return np.array([float(np.prod(_gemm_mnk(ig, by[m]))) for m in names])


def _elems(ig, names) -> np.ndarray:
    by = {n.name: n for n in ig.nodes if n.op in ("conv", "dense")}
    return np.array([float(np.asarray(by[m].attrs["weight"]).size) for m in names])


def sensitivity_for(ev, names, ties, model_path, feeds, cfg, mo: MixedOptions, use_cache: bool = True):
    """Cached sensitivity (``sensitivity.py``): measured once per model + calibration + config."""
    from qcompiler import progress

    from . import sensitivity as S

    key = S.cache_key(model_path, feeds, cfg, {"rounding": mo.rounding, "names": names,
                                                "ties": [list(t) for t in ties], "int8_graph": S.graph_digest(ev.ig8)})
    s = S.load_cached(key) if use_cache else None
    if s is not None and s.names == names:
        progress.get().stage(f"sensitivity: cached ({S.cache_dir() / f'sensitivity-{key}.json'})")
        return s, key
    rep = progress.get()
    rep.stage(f"sensitivity of {len(names)} layers x {len(CHOICES) - 1} choices on {len(feeds)} batch(es) "
              "(integer reference executor)")
    s = S.measure(ev, names, ties)
    if use_cache:
        S.save_cached(key, s)
    return s, key


def make_plan(fr, fg, stats, nonneg, cfg, data, opts, model_path):
    """(QuantConfig with the per-layer plan, report for model.json) for ``opts.precision``."""
    from qcompiler import progress

    from .sensitivity import Evaluator

    mo: MixedOptions = opts.mixed or MixedOptions()
    layers = gemm_layers(fg)
    names = [n.name for n in layers]
    pins = check_pins(fg, mo.pins)
    if (opts.precision == "int8" and not pins) or not names:  # nothing to choose
        return cfg, None
    ties = find_ties(fg, layers)
    rep = progress.get()
    n_s = max(1, min(mo.samples, data.n))
    feeds = [data.feeds(s) for s in range(0, n_s, data.batch)]
    # GPTQ's Hessians come with the calibration run (driver.prepare); the INT8 run makes them only
    # for a caller that did not gather them
    need_h = ((opts.precision in ("w4a8", "mixed") or "w4a8" in pins.values()) and cfg.hessians is None
              and mo.rounding != "rtn")
    fp32 = fp32_outputs(fr.model, feeds, list(fg.outputs)) if opts.precision == "mixed" else None
    if need_h or fp32:
        rep.stage(f"mixed precision: INT8 reference run on {n_s} calibration sample(s)"
                  + (" for the layer Hessians" if need_h else ""))
    ev = Evaluator(fg, stats, nonneg, replace(cfg, rounding=mo.rounding), fr.model, feeds, fp32,
                   hessians=cfg.hessians, keep_envs=fp32 is not None) if need_h or fp32 else None
    report = {"precision": opts.precision, "pins": pins, "rounding": mo.rounding, "samples": n_s,
              "ties": [[names[i] for i in g] for g in ties]}
    if opts.precision != "mixed":
        base = "w4a8" if opts.precision == "w4a8" else "w8a8"
        assign = {m: base for m in names}
        for m, c in pins.items():
            assign[m] = c
        for g in ties:  # a16 on one reader of a tensor makes the tensor int16 for all its readers
            if any(assign[names[i]] == "w8a16" for i in g):
                for i in g:
                    assign[names[i]] = "w8a16"
    else:
        assign, rep_ilp = _solve(ev, names, ties, pins, fr, feeds, cfg, mo, opts, model_path)
        report.update(rep_ilp)
    report["layers"] = assign
    out = replace(cfg, plan=plan_tuple(assign), hessians=ev.hessians if ev else cfg.hessians, rounding=mo.rounding)
    return out, report


def _solve(ev, names, ties, pins, fr, feeds, cfg, mo, opts, model_path):
    from qcompiler import progress

    from . import ilp
    from .latency import predict_layers

    rep = progress.get()
    sens, key = sensitivity_for(ev, names, ties, model_path, feeds, replace(cfg, rounding=mo.rounding), mo)
    rep.stage("mixed precision: per-layer latency of each choice (cost model)")
    lat = predict_layers(ev.ig8, opts.target, opts.tune_log, mo.cost_model, src=ev, fuse=opts.fuse_epilogue)
    if lat.names != names:
        raise PlanError("internal: the lowered layers do not match the graph's conv/dense nodes; please report")
    sens = for_target(sens, opts.target)
    prob = build_problem(ev.ig8, names, sens, lat, ties, pins, mo)
    try:
        sol = ilp.solve(prob)
    except ilp.Infeasible as e:
        raise budget_error(e, lat, prob, mo) from None
    assign = {m: list(CHOICES)[c] for m, c in zip(names, sol.choice)}
    total = lat.total(sol.choice)
    return assign, {"objective": sol.objective, "predicted_ms": total, "int8_predicted_ms": lat.int8_total_ms,
                    "latency_source": lat.source, "weight_bytes": sol.totals["size"],
                    "sensitivity": {"cache_key": key, "evaluator": sens.evaluator, "samples": sens.samples,
                                    "d_fp32_int8": sens.base_fp32},
                    "budgets": {k: v for k, v in prob.budgets.items()}}


# choices a target runs only on generic (unscheduled Relax) kernels: not offered to the ILP there
# (the roofline ratio would price them as if a tuned kernel ran them)
NO_KERNEL = {"cuda": {"w8a16": "no tensor-core kernel takes 16-bit activations (qcompiler/kernels/cuda_mma.py)"}}


def for_target(sens, target):
    """``sens`` with the choices ``target`` has no kernel for marked unavailable (``NO_KERNEL``)."""
    from dataclasses import replace as _replace

    missing = NO_KERNEL.get(getattr(target, "kind", None), {})
    if not missing:
        return sens
    avail, reasons = sens.available.copy(), dict(sens.reasons)
    for c, why in missing.items():
        ci = list(CHOICES).index(c)
        avail[:, ci] = False
        for m in sens.names:
            reasons[f"{m}/{c}"] = why
    return _replace(sens, available=avail, reasons=reasons)


def build_problem(ig8, names, sens, lat, ties, pins, mo: MixedOptions):
    from . import ilp

    elems, macs = _elems(ig8, names), _macs(ig8, names)
    wb = np.array([w for w, _ in CHOICES.values()], float)
    ab = np.array([a for _, a in CHOICES.values()], float)
    size = elems[:, None] * wb[None, :] / 8
    bops = macs[:, None] * (wb * ab)[None, :]
    budgets = {}
    if mo.latency_budget_ms is not None:
        budgets["latency"] = mo.latency_budget_ms - lat.const_ms
    else:
        frac = 1.0 if mo.latency_budget is None else mo.latency_budget
        budgets["latency"] = frac * lat.int8_total_ms - lat.const_ms
    if mo.size_budget is not None:
        budgets["size"] = parse_size(mo.size_budget, float(size[:, 0].sum()))
    if mo.bops_budget is not None:
        budgets["bops"] = mo.bops_budget * float(bops[:, 0].sum())
    idx = {c: i for i, c in enumerate(CHOICES)}
    pin_idx = {}
    for m, c in pins.items():
        li = names.index(m)
        if not sens.available[li, idx[c]]:
            raise PlanError(f"--pin {m}={c}: not possible for this layer: "
                            + sens.reasons.get(f"{m}/{c}", "unavailable"))
        pin_idx[li] = idx[c]
    return ilp.Problem(sens.omega, lat.ms, size, bops, sens.available, budgets, pin_idx, list(ties), TIE_KEY)


def budget_error(e, lat, prob, mo: MixedOptions) -> PlanError:
    if e.resource is None:
        return PlanError("the --pin choices contradict each other: layers reading one tensor need equal "
                         "activation bits (pin all of them to a16, or none)")
    if e.resource == "latency":
        lo = e.smallest + lat.const_ms
        return PlanError(f"latency budget {e.budget + lat.const_ms:.4g} ms "
                         f"({(e.budget + lat.const_ms) / lat.int8_total_ms:.3g} of all-INT8 predicted "
                         f"{lat.int8_total_ms:.4g} ms) is below the smallest achievable {lo:.4g} ms "
                         f"({lo / lat.int8_total_ms:.3g}); give --latency-budget >= {lo / lat.int8_total_ms:.3g}")
    if e.resource == "size":
        full = float(prob.size[:, 0].sum())
        return PlanError(f"size budget {e.budget / 1e6:.4g} MB is below the smallest achievable "
                         f"{e.smallest / 1e6:.4g} MB ({e.smallest / full:.3g} of all-INT8 {full / 1e6:.4g} MB); "
                         f"give --size-budget >= {e.smallest / full:.3g}")
    full = float(prob.bops[:, 0].sum())
    return PlanError(f"BOPS budget {e.budget / full:.3g} of all-INT8 is below the smallest achievable "
                     f"{e.smallest / full:.3g}; give --bops-budget >= {e.smallest / full:.3g}")


def check_applied(ig, report: dict) -> None:
    """Every W8A16 layer of the plan really reads int16 (its producer may be unable to emit it)."""
    dt = {n.name: ig.dtypes[n.inputs[0]] for n in ig.nodes if n.op in ("conv", "dense")}
    for name, c in (report.get("layers") or {}).items():
        if c == "w8a16" and dt.get(name) != "int16":
            raise PlanError(f"layer {name}: 16-bit activations are not possible here (its input is produced "
                            f"as {dt.get(name)} by an op that cannot emit int16, or another reader of the "
                            "tensor needs 8 bits); pin it to 8 or 4 instead")
