"""``qc tune`` / ``qc measure`` handlers (argument checks, then the tuner / offline modules)."""

from __future__ import annotations

import json
import os

from qcompiler.errors import InputError, QCError


def _spec(a):
    from qcompiler.targets import parse_target

    return parse_target(a.target, a.arch)


def _log_dir(a, spec) -> str:
    if a.log:
        return a.log
    from .apply import find_log
    from .device import default_log_dir

    if spec.kind == "cuda":  # reuse the log of this arch's GPU when this host cannot name it
        found = find_log(spec, None) if os.environ.get("QC_TUNE_LOG") is None else os.environ["QC_TUNE_LOG"]
        if found:
            return found
    return default_log_dir(spec)


def _tasks(a, spec):
    from .tuner import extract_tasks

    if not a.models:
        raise InputError("qc tune needs at least one model (or --status DIR / --import DIR)")
    if a.batch < 1:
        raise InputError(f"--batch must be >= 1, got {a.batch}")
    calib = None
    if a.calib is not None:
        from qcompiler import calibrate

        calib = calibrate.load_calibration(a.calib)
    return extract_tasks(a.models, spec, calib=calib, batch=a.batch, precision=a.precision)


def _print_rows(rows, out: dict) -> None:
    from .tuner import _fmt

    print(f"log {out['log']}: {len(rows)} task(s), {out['trials']} trial(s)")
    print(f"  {'trials':>6} {'err':>4} {'best':>11} {'default':>11} {'speedup':>7}  workload")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"  {r['trials']:>6} {r['errors']:>4} {_fmt(r['best_s']):>11} {_fmt(r['default_s']):>11} {sp:>7}  "
              f"{r['workload_key']}")


def run_tune(a) -> int:
    modes = [x for x in (a.status, a.export_candidates, a.import_dir) if x is not None]
    if len(modes) > 1:
        raise InputError("give one of --status, --export-candidates, --import")
    if a.status is not None:
        from .tuner import status

        out = status(a.status)
        if a.json:
            print(json.dumps(out, indent=1))
        else:
            _print_rows(out["tasks"], out)
            if out["corrupt_lines"]:
                print(f"  ({out['corrupt_lines']} corrupt line(s) skipped)")
            if out["other_tvm_versions"]:
                print(f"  (records of other TVM versions: {', '.join(out['other_tvm_versions'])}; not applied)")
        return 0
    if a.import_dir is not None:
        from .offline import import_dir

        out = import_dir(a.import_dir, a.log)
        print(json.dumps(out, indent=1) if a.json else
              f"imported {out['added']} record(s) into {out['log']} ({out['duplicates']} already there)")
        return 0
    if a.trials < 1:
        raise InputError(f"--trials must be >= 1, got {a.trials}")
    if a.repeats < 1 or a.batch_size < 1:
        raise InputError("--repeats and --batch-size must be >= 1")
    spec = _spec(a)
    rpc = None
    if a.rpc_tracker or a.rpc_key:
        from .measure import RpcSpec

        if not a.rpc_tracker:
            raise InputError("--rpc-key needs --rpc-tracker HOST:PORT")
        rpc = RpcSpec.parse(a.rpc_tracker, a.rpc_key)
        rpc.check()  # before the (slow) model preparation
    from .tuner import check_target

    if a.export_candidates is None or spec.kind == "cpu":
        check_target(spec)
    if spec.kind == "cuda" and rpc is None and a.export_candidates is None:
        from .device import gpu_info

        if gpu_info() is None:
            raise QCError("no CUDA GPU here: tune on the GPU machine, through --rpc-tracker, or with "
                          "--export-candidates DIR / qc measure DIR / --import DIR")
    cost_model = a.cost_model
    if cost_model and cost_model.lower() not in ("auto", "off", "none", "0"):
        from .device import describe
        from .tuner import resolve_cost_model

        # a named model file is checked (and loaded, once) before the slow model preparation
        cost_model, _ = resolve_cost_model(cost_model, describe(spec, probe_gpu=False) if spec.kind == "cuda"
                                           else describe(spec))
    from .measure import scratch

    # every candidate library goes into one scratch folder, removed however the run ends (error,
    # Ctrl-C, SIGTERM: qcompiler/cli.py); scratch folders of killed runs are removed first
    with scratch():
        tasks = _tasks(a, spec)
        log = _log_dir(a, spec)
        if a.export_candidates is not None:
            from .offline import export_candidates

            man = export_candidates(tasks, spec, log, a.export_candidates, a.candidates, a.repeats,
                                    a.min_repeat_ms, cost_model)
            print(json.dumps({"dir": a.export_candidates, "candidates": len(man["candidates"])}) if a.json else
                  f"exported {len(man['candidates'])} candidate(s) to {a.export_candidates}")
            return 0
        from .tuner import tune

        out = tune(tasks, spec, log, a.trials, rpc=rpc, repeats=a.repeats, batch=a.batch_size,
                   min_repeat_ms=a.min_repeat_ms, cost_model=cost_model)
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        _print_rows(out["tasks"], out)
    return 0


def run_measure(a) -> int:
    from .offline import measure_dir

    if a.repeats is not None and a.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {a.repeats}")
    out = measure_dir(a.dir, a.repeats)
    print(json.dumps(out, indent=1) if a.json else
          f"measured {out['measured']} candidate(s) ({out['ok']} ok) on {out['device']['device']}; "
          f"results in {os.path.join(a.dir, 'results.jsonl')}")
    return 0
