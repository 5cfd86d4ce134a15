"""Profile records: every kernel of a compiled library timed inside the running model.

``python -m costmodel.profile [--models all|zoo|synth|a,b] [--precision int8,w4a8] [--runs 30]
[--out autotune_logs/<device>/profiles.jsonl]``
compiles the zoo models and the synthetic encoders of ``costmodel.synth_models`` (tuned configs of
the device's log applied, as ``qc compile`` does),
runs each library with the Relax VM instrument hook (``vm.set_instrument(f)``: ``f`` is called
before and after every packed call) and writes, one JSON line each (schema ``qc-profile/1``):

* ``{"type": "tir", "tir_sha256", "tir": gzip+base64 TVMScript}`` once per distinct kernel TIR;
* ``{"type": "kernel", "model", "kernel", "call_index", "tir_sha256", "median_s", "latencies_s",
  "in_model_median_s", "timing", "target"}`` per kernel call in execution order: ``median_s`` /
  ``latencies_s`` time the kernel alone on the model's own arguments (``time_evaluator``, as the
  tuner times its candidates; ``timing: "isolated"``), ``in_model_median_s`` is its median time
  inside the running model (includes the instrument's ~1 us Python callback);
* ``{"type": "model", "model", "target", "bench": {median_ms, p10_ms, p90_ms} (qc bench's
  measurement of the same library), "kernel_sum_ms", "n_kernel_calls", "n_builtin_calls",
  "builtin_sum_ms", "workload_keys"}`` per library (the GEMM workloads it runs, for splits by model).

The file is rewritten (atomically) after each model profiled, so an interrupted run keeps what it
measured; lines of other models are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import PROFILE_SCHEMA


def split_functions(module_text: str) -> dict[str, str]:
    """name -> TVMScript of each PrimFunc of a printed module (as stored in model.json)."""
    from qcompiler.tir_scan import _prim_func_chunks

    return dict(_prim_func_chunks(module_text))


RELAX_CALLS = ("rec_run_", "rec_step_")
"""Relax functions a model's ``main`` calls (a loop over a symbolic time axis,
qcompiler/lowering/relax_loop.py): the instrument sees their calls around their kernels' own."""


def time_calls(lib, runs: int = 30, warmup: int = 3, feeds: dict | None = None) -> list[tuple[str, list[float], list]]:
    """(name, per-run seconds inside the running model, the call's arguments) of every packed call
    of ``main`` in execution order, on ``feeds`` (default: the library's example inputs).  The
    in-model times include the instrument's Python callback (~1 us per call here);
    :func:`time_isolated` times a kernel alone with ``time_evaluator``."""
    import numpy as np  # noqa: F401
    import tvm

    vm = lib.vm
    feeds = feeds or lib.example_inputs()
    args = [tvm.runtime.tensor(np.require(feeds[n], requirements="C"), lib.dev) for n in lib.input_names]
    calls: list[list] = []
    state = {"i": 0, "rec": False}
    open_calls: list = []  # (index or None, start): the VM's calls of Relax functions nest kernel calls

    def instrument(func, name, before_run, ret, *a):
        if before_run:
            k = None
            if not str(name).startswith(RELAX_CALLS):  # a kernel or builtin (a loop's functions: their kernels)
                k = state["i"]
                state["i"] += 1
                if state["rec"] and k >= len(calls):
                    calls.append([str(name), [], list(a)])
            open_calls.append((k, time.perf_counter_ns()))
        else:
            k, t0 = open_calls.pop()
            if state["rec"] and k is not None:
                calls[k][1].append((time.perf_counter_ns() - t0) * 1e-9)
        return 0

    with _instrumented(vm, instrument):
        for r in range(warmup + runs):
            state["rec"], state["i"] = r >= warmup, 0
            vm["main"](*args)
    return [(n, ts, a) for n, ts, a in calls]


@contextlib.contextmanager
def _instrumented(vm, instrument):
    """``vm`` with the instrument hook ``instrument`` set for the block, then removed."""
    vm.set_instrument(instrument)
    try:
        yield
    finally:
        try:
            vm.set_instrument(None)
        except Exception:  # noqa: BLE001 - this runtime wants a function: a pass-through one
            vm.set_instrument(lambda *a: 0)


def time_isolated_in_run(lib, feeds: dict | None = None, want=lambda name: True, repeats: int = 10,
                         min_repeat_ms: int = 5) -> dict[int, list[float] | None]:
    """call index (as :func:`time_calls` counts) -> seconds per repeat of that kernel called alone,
    for the calls whose name ``want`` accepts; one run of the model, each kernel timed just before
    the model calls it, on its live arguments.

    Timed there, not after the run: the arguments a call was given are views of the VM's planned
    storage, which later calls overwrite, so after the run a kernel would read another kernel's
    data -- wrong for timing, and a trap where the data decides a divisor (an I-LayerNorm's integer
    square root divides by its Newton iterate: from an overwritten variance that reaches 0, SIGFPE).
    Calls of the same kernel on the same shapes are timed once (the first one's times serve)."""
    import numpy as np  # noqa: F401
    import tvm

    vm = lib.vm
    feeds = feeds or lib.example_inputs()
    args = [tvm.runtime.tensor(np.require(feeds[n], requirements="C"), lib.dev) for n in lib.input_names]
    out: dict[int, list[float] | None] = {}
    seen: dict[tuple, list[float] | None] = {}
    state = {"i": 0}

    def instrument(func, name, before_run, ret, *a):
        name = str(name)
        if before_run and not name.startswith(RELAX_CALLS):
            k = state["i"]
            state["i"] += 1
            if want(name):
                key = (name, tuple(tuple(int(d) for d in getattr(x, "shape", ())) for x in a))
                if key not in seen:
                    seen[key] = time_isolated(lib, name, list(a), repeats, min_repeat_ms)
                out[k] = seen[key]
        return 0

    with _instrumented(vm, instrument):
        vm["main"](*args)
    return out


def time_isolated(lib, name: str, args: list, repeats: int = 10, min_repeat_ms: int = 5) -> list[float] | None:
    """Seconds per repeat of one kernel called alone on ``args`` (which must hold the data the model
    gives it: :func:`time_isolated_in_run` times every kernel of a run that way)."""
    mods, found = [lib.module], None
    while mods:
        m = mods.pop()
        if m.implements_function(name):
            found = m
            break
        mods += list(m.imports)
    if found is None:
        return None
    f = found.time_evaluator(name, lib.dev, number=1, repeat=repeats, min_repeat_ms=min_repeat_ms)
    return [float(t) for t in f(*args).results]


def profile_library(lib_path: str, model: str, runs: int = 30) -> tuple[list[dict], dict[str, str]]:
    from qcompiler.artifact import decode_text, read_metadata
    from qcompiler.runtime import Library
    from qcompiler.tune.workload import text_hash

    meta = read_metadata(lib_path)
    funcs = split_functions(decode_text(meta["tir"]))
    lib = Library(lib_path)
    bench = lib.bench(repeats=30)
    calls = time_calls(lib, runs)
    iso_at = time_isolated_in_run(lib, want=lambda name: name in funcs)
    target = _target(meta)
    out, tirs = [], {}
    ksum = bsum = 0.0
    nk = nb = 0
    for i, (name, ts, args) in enumerate(calls):
        med = statistics.median(ts)
        if name in funcs:
            sha = text_hash(funcs[name])
            tirs[sha] = funcs[name]
            iso = iso_at.get(i)
            out.append({"schema": PROFILE_SCHEMA, "type": "kernel", "model": model, "kernel": name, "call_index": i,
                        "tir_sha256": sha, "median_s": statistics.median(iso) if iso else med,
                        "latencies_s": [round(t, 10) for t in iso] if iso else [round(t, 9) for t in ts],
                        "in_model_median_s": med, "timing": "isolated" if iso else "in-model",
                        "target": target})
            ksum += out[-1]["median_s"]
            nk += 1
        else:
            bsum += med
            nb += 1
    summary = {"schema": PROFILE_SCHEMA, "type": "model", "model": model, "target": target,
               "bench": {k: bench[k] for k in ("median_ms", "p10_ms", "p90_ms")}, "kernel_sum_ms": ksum * 1e3,
               "n_kernel_calls": nk, "n_builtin_calls": nb, "builtin_sum_ms": bsum * 1e3,
               "tuned_layers": len(meta.get("tuning", {}).get("tuned_layers", []))}
    return [summary] + out, tirs


def _target(meta: dict) -> dict:
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import describe

    t = meta["target"]
    return describe(parse_target(t.get("kind", "cpu"), t.get("arch") if t.get("kind") == "cuda" else None))


def workload_keys(model_path: str, calib, precision: str = "int8") -> list[str]:
    from qcompiler.driver import CompileOptions, prepare
    from qcompiler.mixed.plan import MixedOptions
    from qcompiler.targets import parse_target
    from qcompiler.tune.workload import tasks_from_graph

    spec = parse_target("cpu", None)
    prep = prepare(model_path, calib, CompileOptions(target=spec, precision=precision,
                                                     mixed=MixedOptions(rounding="rtn")))
    return sorted(t.workload.key for t in tasks_from_graph(prep.int_graph, spec))


def model_names(spec: str) -> list[str]:
    """Model names of a comma list where ``zoo``, ``synth`` and ``all`` stand for those sets."""
    from qcompiler import zoo

    from . import synth_models

    sets = {"zoo": zoo.names(), "synth": [e.name for e in synth_models.SUITE]}
    sets["all"] = sets["zoo"] + sets["synth"]
    out = []
    for n in (x.strip() for x in spec.split(",")):
        for m in sets.get(n, [n] if n else []):
            if m not in out:
                out.append(m)
    return out


def model_source(name: str, folder) -> tuple[str, dict]:
    """(ONNX path, 8 calibration inputs) of a zoo model or of a synthetic encoder (written to
    ``folder``)."""
    from qcompiler import zoo

    from . import synth_models

    if name.startswith(synth_models.PREFIX):
        e = synth_models.by_name(name)
        return synth_models.write(e, folder), synth_models.calibration(e, 8)
    return str(zoo.model_path(name)), zoo.calibration_inputs(name, 8)


def main(argv=None) -> int:
    from qcompiler import progress
    from qcompiler.driver import CompileOptions, compile_model
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import default_log_dir

    from .data import encode_tir

    ap = argparse.ArgumentParser(prog="python -m costmodel.profile")
    ap.add_argument("--models", default="all", help="comma list of zoo / synthetic model names, or zoo, synth, all")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--build-dir", default=None)
    ap.add_argument("--precision", default="int8",
                    help="comma list of qc compile precisions (int8, w4a8); a model compiled at another "
                         "precision than int8 is recorded as NAME@PRECISION")
    a = ap.parse_args(argv)
    progress.set_reporter(progress.ConsoleReporter(bars=False))
    spec = parse_target("cpu", None)
    out = Path(a.out or os.path.join(default_log_dir(spec), "profiles.jsonl"))
    precs = [p.strip() for p in a.precision.split(",") if p.strip()]
    runs = [(n, p) for n in model_names(a.models) for p in precs]
    names = [n if p == "int8" else f"{n}@{p}" for n, p in runs]
    keep, old, tir_lines, done = [], [], {}, set()
    if out.is_file():
        for ln in out.read_text().splitlines():
            try:
                r = json.loads(ln)
            except ValueError:
                continue
            if r.get("type") == "tir":
                tir_lines[r["tir_sha256"]] = r
            elif r.get("model") not in names:
                keep.append(r)
            else:
                old.append(r)
    bd = Path(a.build_dir or tempfile.mkdtemp(prefix="qc_prof_"))
    bd.mkdir(parents=True, exist_ok=True)
    new, n = [], 0
    from qcompiler.mixed.plan import MixedOptions

    for name, (base, prec) in zip(names, runs):
        path, calib = model_source(base, bd)
        lib = bd / f"{name}.so"
        if not lib.is_file():   # 4-bit weights rounded to nearest: kernel speed does not depend on values
            compile_model(path, str(lib), calib, CompileOptions(target=spec, precision=prec,
                                                                mixed=MixedOptions(rounding="rtn")))
        recs, tirs = profile_library(str(lib), name, a.runs)
        recs[0]["workload_keys"] = workload_keys(path, calib, prec)
        recs[0]["library"] = str(lib)
        for sha, text in tirs.items():
            tir_lines.setdefault(sha, {"schema": PROFILE_SCHEMA, "type": "tir", "tir_sha256": sha,
                                       "tir": encode_tir(text)})
        new += recs
        m = recs[0]
        print(f"{name}: {m['n_kernel_calls']} kernel calls, kernel sum {m['kernel_sum_ms']:.3f} ms, builtins "
              f"{m['builtin_sum_ms']:.3f} ms, bench {m['bench']['median_ms']:.3f} ms", file=sys.stderr, flush=True)
        # rewritten after every model, so an interrupted run keeps the models already profiled
        # (models not yet reached keep their old lines)
        done.add(name)
        n = _write(out, keep + new, tir_lines, [r for r in old if r.get("model") not in done])
    print(f"wrote {out} ({n} lines)", file=sys.stderr)
    return 0


def _write(out: Path, recs: list, tir_lines: dict, pending: list) -> int:
    from qcompiler import artifact

    rows = recs + pending
    used = {r["tir_sha256"] for r in rows if r.get("type") == "kernel"}
    lines = [json.dumps(r) for r in rows] + [json.dumps(t) for s, t in tir_lines.items() if s in used]
    out.parent.mkdir(parents=True, exist_ok=True)
    with artifact.atomic_paths(out) as (tmp,):
        Path(tmp).write_text("\n".join(lines) + "\n")
    return len(lines)


if __name__ == "__main__":
    sys.exit(main())
