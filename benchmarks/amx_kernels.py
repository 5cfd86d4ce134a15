"""AMX INT8 kernels against the AVX-512 VNNI ones, side by side in one process, with the machine's peaks.

  .venv/bin/python benchmarks/amx_kernels.py [--repeats 7] [--threads 2]   (sets TVM_NUM_THREADS)

Measures (on a CPU with AMX-INT8 whose Linux grants the tile state; elsewhere it says so and exits 0):
* the peaks: ``tdpbusd`` from tile registers (4 independent accumulators, all cores), and ``vpdpbusd``
  (``benchmarks/cpu_kernels.measured_peak``), in GOPS (2 x MACs);
* conv / dense layers of the zoo models (ResNet-50 / open-nsfw stages, MiniLM projections) on the AMX
  kernels (``qcompiler/kernels/cpu_amx.py``) and on the VNNI kernels (``cpu_vnni.py``), default
  configs, median microseconds and GOPS, the AMX share of its peak;
and writes ``benchmarks/results/amx_kernels.json`` with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the runtime's pool size is read when TVM starts: --threads must be in the environment first
_THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "2"
os.environ["TVM_NUM_THREADS"] = _THREADS

import tvm  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from qcompiler.kernels import cpu_amx as A  # noqa: E402
from qcompiler.kernels import cpu_vnni as V  # noqa: E402
from qcompiler.targets import (ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL, XFEATURE_XTILEDATA,  # noqa: E402
                               host_amx_usable, parse_target)
from qcompiler.tune.device import cpu_model_name  # noqa: E402

SHAPES = [  # (kind, shape, where)
    ("conv", (1, 56, 56, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "ResNet-50 stage 1 3x3"),
    ("conv", (1, 28, 28, 128, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "ResNet-50 stage 2 3x3"),
    ("conv", (1, 14, 14, 256, 256, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "ResNet-50 stage 3 3x3"),
    ("conv", (1, 7, 7, 512, 512, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "ResNet-50 stage 4 3x3"),
    ("dense", (3136, 64, 256), "ResNet-50 stage 1 1x1 256->64 (as dense)"),
    ("dense", (3136, 256, 64), "ResNet-50 stage 1 1x1 64->256 (as dense)"),
    ("dense", (128, 384, 384), "MiniLM Q/K/V/O 128 tokens"),
    ("dense", (128, 1536, 384), "MiniLM FFN up 128 tokens"),
    ("dense", (1024, 1024, 1024), "square 1024"),
]


def _peak_kernel(cores: int, iters: int):
    @T.prim_func
    def peak(A_: T.Buffer((64, 64), "uint8"), C: T.Buffer((cores, 16, 16), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        T.evaluate(T.call_extern("int64", "syscall", T.int64(SYS_ARCH_PRCTL), T.int64(ARCH_REQ_XCOMP_PERM),
                                 T.int64(XFEATURE_XTILEDATA)))
        for t in T.parallel(cores):
            cfg = T.alloc_buffer((16,), "int32", scope="local")
            for w in range(16):
                cfg[w] = 0
            cfg[0] = 1
            for w in range(4):
                cfg[4 + w] = 64 | (64 << 16)
            cfg[12] = 0x10101010
            cfg[13] = 0x10101010
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))
            for r in T.unroll(4):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(r)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(4), T.address_of(A_[0, 0]), T.int64(64)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(5), T.address_of(A_[16, 0]), T.int64(64)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(6), T.address_of(A_[32, 0]), T.int64(64)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(7), T.address_of(A_[48, 0]), T.int64(64)))
            for i in range(iters):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(0), T.int8(4), T.int8(6)))
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(1), T.int8(4), T.int8(7)))
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(2), T.int8(5), T.int8(6)))
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.int8(3), T.int8(5), T.int8(7)))
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(0), T.address_of(C[t, 0, 0]), T.int64(64)))

    return peak


def _compile(func, target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _median_us(fn, args, repeats: int) -> float:
    fn(*args)
    ts = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < 0.05:
            fn(*args)
            n += 1
        ts.append((time.perf_counter() - t0) / n)
    return float(np.median(ts)) * 1e6


def amx_peak(target, cores: int, repeats: int) -> float:
    iters = 1 << 15
    fn = _compile(_peak_kernel(cores, iters), target)
    args = [tvm.runtime.tensor(np.ones((64, 64), np.uint8)), tvm.runtime.tensor(np.zeros((cores, 16, 16), np.int32))]
    us = min(_median_us(fn, args, 1) for _ in range(repeats))
    return 2.0 * cores * iters * 4 * 16 * 16 * 64 / (us * 1e-6) / 1e9


def _case(mod, kind, shape, rng):
    if kind == "dense":
        M, N, K = shape
        w = rng.integers(-128, 128, (K, N)).astype(np.int8)
        x = rng.integers(0, 128, (M, K)).astype(np.uint8)
        wp, be = mod.pack_dense(w, None, False)
        f = mod.dense(M, N, K, "uint8", "int8", -128, 127)
        out, ops = (M, N), 2.0 * M * N * K
    else:
        N, H, W, C, OC, KH, KW, s, p, d = shape
        OH, OW = V._out_shape(H, W, KH, KW, s, p, d)
        w = rng.integers(-128, 128, (OC, C, KH, KW)).astype(np.int8)
        x = rng.integers(-128, 128, (N, H, W, C)).astype(np.int8)
        wp, be = mod.pack_conv(w, None, True)
        f = mod.conv2d_nhwc(N, H, W, C, OC, KH, KW, s, p, d, "int8", "int8", -128, 127)
        out, ops = (N, OH, OW, OC), 2.0 * N * OH * OW * OC * C * KH * KW
    n = out[-1]
    args = [x, wp, be, np.full(n, 1 << 20, np.int64), np.full(n, 30, np.int64), np.zeros(out, np.int8)]
    return f, [tvm.runtime.tensor(a) for a in args], ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "amx_kernels.json"))
    a = ap.parse_args(argv)
    if not host_amx_usable():
        print("amx_kernels: this CPU / OS has no usable AMX-INT8; nothing to measure")
        return 0
    target = parse_target("cpu").tvm_target()
    from cpu_kernels import measured_peak  # noqa: E402  (benchmarks/ on the path when run as a script)

    peaks = {"tdpbusd_gops": amx_peak(target, a.threads, a.repeats),
             "vpdpbusd_gops": measured_peak(target, "vpdpbusd", repeats=a.repeats, mrm=50)["gops_best"]}
    print(f"peaks ({a.threads} cores): tdpbusd {peaks['tdpbusd_gops']:.0f} GOPS, vpdpbusd {peaks['vpdpbusd_gops']:.0f} GOPS")
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'layer':<42}{'AMX us':>9}{'VNNI us':>9}{'AMX/VNNI':>9}{'AMX GOPS':>10}{'% tdpbusd':>10}")
    for kind, shape, where in SHAPES:
        r = {"kind": kind, "shape": [list(x) if isinstance(x, tuple) else x for x in shape], "layer": where}
        for key, mod in (("amx", A), ("vnni", V)):
            f, args, ops = _case(mod, kind, shape, rng)
            r[f"{key}_us"] = _median_us(_compile(f, target), args, a.repeats)
            r[f"{key}_gops"] = ops / (r[f"{key}_us"] * 1e-6) / 1e9
        r["speedup"] = r["vnni_us"] / r["amx_us"]
        r["amx_share_of_peak"] = r["amx_gops"] / peaks["tdpbusd_gops"]
        rows.append(r)
        print(f"{where:<42}{r['amx_us']:9.1f}{r['vnni_us']:9.1f}{r['speedup']:8.2f}x{r['amx_gops']:10.0f}"
              f"{100 * r['amx_share_of_peak']:9.1f}%")
    res = {"machine": {"cpu": cpu_model_name(), "platform": platform.platform(), "threads": a.threads,
                       "llvm_target": str(target)},
           "date": datetime.date.today().isoformat(), "peaks": peaks, "rows": rows,
           "note": "median us per call, default configs, int8 NHWC conv inputs (uint8 for dense), 2 x MACs"}
    pathlib.Path(a.out).write_text(json.dumps(res, indent=1))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.exit(main())
