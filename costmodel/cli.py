"""Handlers of ``qc costmodel train|eval`` and ``qc predict`` (argument checks, then the modules)."""

from __future__ import annotations

import json
from pathlib import Path

from .predict import CostModelError

_FAMILIES = {"all": ["target", "cfg", "tir", "ms", "text"], "structural": ["target", "cfg", "tir", "ms"],
             "text": ["text"]}


def _data_error(e) -> CostModelError:
    return CostModelError(str(e))


def run_costmodel(a) -> int:
    from . import data as D

    if a.cm_cmd == "train":
        from .train import train_from_logs

        out = Path(a.output)
        if out.suffix != ".json":
            raise CostModelError(f"{out}: the model file must be a .json file")
        try:
            doc = train_from_logs(a.logs, out, _FAMILIES[a.families])
        except D.DataError as e:
            raise _data_error(e) from None
        info = {"model": str(out), "target": doc["target"], **doc["trained"], "calibration": doc["calibration"]}
        print(json.dumps(info, indent=1) if a.json else
              f"wrote {out}: {info['samples']} samples ({info['tuning_samples']} tuning, {info['profile_samples']} "
              f"profiled kernels, {info['workloads']} groups) for {doc['target'].get('device')}")
        return 0
    # eval
    from . import evaluate as E

    if a.folds < 2:
        raise CostModelError(f"--folds must be >= 2, got {a.folds}")
    try:
        samples, _ = D.samples_from(a.logs)
    except D.DataError as e:
        raise _data_error(e) from None
    if len({s["group"] for s in samples}) < a.folds:
        raise CostModelError(f"{a.logs}: fewer workloads than folds ({a.folds}); nothing to hold out")
    X, y = D.matrix(samples)
    fam = _FAMILIES[a.families]
    out = E.oof(samples, X, y, E.group_folds([s["group"] for s in samples], a.folds), fam)
    r = E.report(samples, y, out)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        rk = r["rank_by_ranker"] or {}
        print(f"{a.folds}-fold by workload, {len(samples)} samples, families {a.families}")
        for k in ("top1", "top5", "pairwise", "spearman"):
            v = rk.get(k)
            print(f"  {k:<10} {'-' if v is None else f'{v:.3f}'}")
        for k in ("mape_tune", "mape_profile", "mape_all"):
            if k in r:
                print(f"  {k:<12} {r[k] * 100:.1f}%")
    return 0


def _calib(a):
    from qcompiler.errors import InputError

    if a.batch < 1:
        raise InputError(f"--batch must be >= 1, got {a.batch}")
    if a.calib is not None:
        from qcompiler import calibrate

        return calibrate.load_calibration(a.calib)
    from qcompiler.errors import ModelError

    if not Path(a.model).is_file():
        raise ModelError(f"{a.model}: no such file (give the path of an .onnx model)")
    from qcompiler.tune.tuner import random_calibration

    shapes = None
    if getattr(a, "shape", None):  # latency at this shape (a dynamic library at one of its sizes)
        from qcompiler.shape_spec import DimRange, parse

        shapes = {}
        for name, dims in parse(a.shape).items():
            if any(d is None or isinstance(d, DimRange) for d in dims):
                raise InputError(f"--shape {name}: give every dim a size to predict at (e.g. {name}=1x128)")
            shapes[name] = tuple(dims)
        if a.batch == 1:  # the batch a shape gives (axis 0 of the first input named) is the compiled batch
            a.batch = shapes[next(iter(shapes))][0]
    return random_calibration(a.model, a.batch, shapes=shapes)


def run_predict(a) -> int:
    from qcompiler import progress
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import describe

    from .predict import load_for
    from .whole import lower_kernels, predict_kernels

    spec = parse_target(a.target, a.arch)
    target = describe(spec, probe_gpu=False) if spec.kind == "cuda" else describe(spec)
    model, why = load_for(target, a.cost_model)  # bad file / other target: CostModelError, exit 2
    if a.plot and not str(a.plot).endswith(".png"):
        raise CostModelError(f"{a.plot}: --plot writes a .png file")
    if model is None:
        progress.get().warn(f"{why}: falling back to the roofline estimate (nominal peaks, not measured)")
    elif not target.get("device"):  # another CPU than this host's: the machine the model was trained on
        target = {**target, **{k: v for k, v in model.target.items() if k in ("device", "cores")}}
    kernels = lower_kernels(a.model, spec, _calib(a), a.batch, a.precision)
    res = predict_kernels(kernels, target, model)
    res = {"model": str(a.model), "target": target, "cost_model": model.path if model else None,
           "note": None if model else f"roofline estimate ({why})", **res}
    if a.plot:
        _plot(res, a.plot)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    label = "learned model" if model else "ROOFLINE ESTIMATE (no cost model for this target)"
    print(f"{a.model} on {target.get('kind')} {target.get('arch')} ({target.get('device')}): {label}")
    print(f"  {'#':>3} {'op':<40} {'in':>6} {'output':<20} {'pred ms':>9} {'band ms':>21}")
    for layer in res["layers"]:
        band = f"[{layer['band_ms'][0]:.4g}, {layer['band_ms'][1]:.4g}]"
        dt = (layer["input_dtypes"] or ["-"])[0]
        print(f"  {layer['index']:>3} {layer['op'][:40]:<40} {dt:>6} {str(layer['output'])[:20]:<20} "
              f"{layer['predicted_ms']:>9.4g} {band:>21}")
    print(f"total {res['total_ms']:.3f} ms (band {res['band_ms'][0]:.3f}..{res['band_ms'][1]:.3f}; "
          f"{res['kernels']} kernels + {res['overhead_ms']:.3f} ms runtime overhead) [{res['source']}]")
    return 0


def _plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qcompiler.artifact import atomic_paths, check_writable

    out = check_writable(path)
    ls = res["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(ls) + 2), 4))
    x = range(len(ls))
    mu = [l_["predicted_ms"] for l_ in ls]
    err = [[m - l_["band_ms"][0] for m, l_ in zip(mu, ls)], [l_["band_ms"][1] - m for m, l_ in zip(mu, ls)]]
    ax.bar(x, mu, yerr=err, color=["C1" if "vnni" in l_["op"] or "conv" in l_["op"] or "dense" in l_["op"] else "C0"
                                   for l_ in ls], ecolor="gray", capsize=1)
    ax.set_xlabel("kernel (execution order)")
    ax.set_ylabel("predicted ms")
    ax.set_title(f"{Path(res['model']).name}: total {res['total_ms']:.2f} ms ({res['source']})")
    fig.tight_layout()
    with atomic_paths(out) as (tmp,):
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
