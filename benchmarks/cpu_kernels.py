"""Throughput of the CPU INT8 kernels (qcompiler.kernels.cpu_vnni) against NumPy FP32 and the VNNI peak.

    python benchmarks/cpu_kernels.py [--quick] [--repeats 7] [--min-repeat-ms 200]

GEMMs (LLM-like and conv-like shapes, M from 1 to 1024; int8 activations, int8 outputs, the full
bias + requantization epilogue), attention batch matmuls of two activations (``batch_matmul``, each
compiled as a one-op integer graph through the whole lowering, against the generic Relax int path of
the same graph: int16 matmul -> int32 + requantization ops, legalized, fused and scheduled by
cpu_default), ResNet-50 convolutions (batch 1, through ``conv2d_nhwc``), and
depthwise / grouped convolutions.  Each kernel is timed with ``time_evaluator`` (``repeat`` runs of
at least ``min_repeat_ms`` each); we report the median and the spread (min, max) of the repeats.
NumPy FP32 ``matmul`` (its BLAS, all threads) is timed the same way on the same shapes in a separate
process without TVM (see ``time_numpy_all``); the table compares our median with NumPy's best repeat
(conservative on a shared machine).

Peak.  ``peak = cores x GHz x vpdpbusd(zmm) per cycle x 64 MACs x 2 ops``.  The clock is read from
/proc/cpuinfo ("cpu MHz"); on a KVM guest that is the nominal TSC rate, not the boost clock, so the
script also measures the running clock (a chain of dependent 1-cycle adds, compiled with the system C
compiler when there is one) and the register-only ``vpdpbusd`` throughput (16 independent
accumulators on every core: the real roofline).  The per-cycle rate is derived from those two.

Prints a table and writes benchmarks/results/cpu_kernels.json.  Depthwise convs run both kernels,
interleaved, bit-compared: the one the lowering takes on a VNNI CPU (``depthwise_conv2d_taps``,
``vpdpbusd`` over kernel rows) and the int32-lane one (``depthwise_conv2d_nhwc``); ``--direct-only``
runs just the peak and those (-> benchmarks/results/cpu_kernels_direct.json).

``--lowbit`` (issue 18) instead compares the low-bit backends of ``qcompiler/kernels/backends/``
with the INT8 kernel of the same ISA, for every ISA the machine has (AVX-512 VNNI: the host's LLVM
CPU; AVX2: compiled for ``znver2``, so that LLVM cannot fuse ``vpmaddwd`` + ``vpaddd`` into the
AVX-VNNI ``vpdpwssd`` of a newer host): W4A8 vs INT8 GOPS on compute-bound convolutions / GEMMs
and on M = 1..8 dense layers whose weights are larger than L2 (4096^2: in L3; 8192^2: beyond it),
plus W8A16.  Peers run interleaved in one process (``--rounds`` rounds, each a ``time_evaluator``
of at least ``min_repeat_ms``), medians reported.  Beside each figure the machine's measured peak:
register-only loops of the ISA's multiply instruction (``vpdpbusd zmm`` 64 MACs; ``vpmaddwd ymm``
16 MACs (+ ``vpaddd``); ``vpmaddubsw ymm`` 32 MACs (+ ``vpaddw``)) and, for the dense layers, the
read bandwidth of a working set of the weights' size, as the GOPS at which the weights stream
(``2 M N K / (weight bytes / bandwidth)``).  Writes benchmarks/results/cpu_kernels_lowbit.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tvm  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from qcompiler.kernels import cpu_vnni as cv  # noqa: E402
from qcompiler.tune.device import cpu_model_name  # noqa: E402

GEMMS = [  # name, M, N, K
    ("llm decode 1x4096x4096", 1, 4096, 4096),
    ("llm 16x4096x4096", 16, 4096, 4096),
    ("llm prefill 128x4096x4096", 128, 4096, 4096),
    ("llm prefill 1024x4096x4096", 1024, 4096, 4096),
    ("square 1024^3", 1024, 1024, 1024),
    ("square 256^3", 256, 256, 256),
    ("conv-like 3136x64x576", 3136, 64, 576),
    ("conv-like 3136x256x64", 3136, 256, 64),
    ("conv-like 784x128x1152", 784, 128, 1152),
    ("conv-like 49x2048x512", 49, 2048, 512),
    ("bert 128x768x768", 128, 768, 768),
]
CONVS = [  # name, (N, H, W, C, OC, KH, KW, strides, pads, dilations), a_dtype
    ("resnet50 conv1 224x224x3->64 7x7/2", (1, 224, 224, 3, 64, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1)), "int8"),
    ("resnet50 56x56x64->64 3x3", (1, 56, 56, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "uint8"),
    ("resnet50 56x56x64->256 1x1", (1, 56, 56, 64, 256, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)), "uint8"),
    ("resnet50 56x56x256->64 1x1", (1, 56, 56, 256, 64, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)), "uint8"),
    ("resnet50 28x28x128->128 3x3", (1, 28, 28, 128, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "uint8"),
    ("resnet50 56x56x128->128 3x3/2", (1, 56, 56, 128, 128, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)), "uint8"),
    ("resnet50 14x14x256->256 3x3", (1, 14, 14, 256, 256, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "uint8"),
    ("resnet50 7x7x512->512 3x3", (1, 7, 7, 512, 512, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), "uint8"),
    ("resnet50 7x7x512->2048 1x1", (1, 7, 7, 512, 2048, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)), "uint8"),
    ("resnet50 7x7x2048->512 1x1", (1, 7, 7, 2048, 512, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)), "uint8"),
]
BATCH_MATMULS = [  # name, batch, M, N, K, A dtype, B stored transposed ([batch, N, K], a Transpose in the graph)
    ("minilm seq128 Q.K^T 12x128x128x32", 12, 128, 128, 32, "int8", True),
    ("minilm seq128 P.V 12x128x32x128", 12, 128, 32, 128, "uint8", False),
]
DIRECT = [  # name, kind, (N, H, W, C, OC, KH, KW, strides, pads, dilations, groups)[, input dtype (uint8)]
    ("dw 112x112x32 3x3", "dw", (1, 112, 112, 32, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 32)),
    ("dw 112x112x32 3x3/2 int8", "dw", (1, 112, 112, 32, 32, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 32), "int8"),
    ("dw 112x112x64 3x3/2", "dw", (1, 112, 112, 64, 64, 3, 3, (2, 2), (0, 0, 1, 1), (1, 1), 64)),
    ("dw 56x56x64 3x3 int8", "dw", (1, 56, 56, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 64), "int8"),
    ("dw 56x56x128 3x3", "dw", (1, 56, 56, 128, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 128)),
    ("dw 56x56x144 3x3/2", "dw", (1, 56, 56, 144, 144, 3, 3, (2, 2), (0, 0, 1, 1), (1, 1), 144)),
    ("dw 56x56x256 3x3 int8", "dw", (1, 56, 56, 256, 256, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 256), "int8"),
    ("dw 56x56x256 3x3/2", "dw", (1, 56, 56, 256, 256, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 256)),
    ("dw 28x28x72 3x3 (C % 16 = 8)", "dw", (1, 28, 28, 72, 72, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 72)),
    ("dw 14x14x256 5x5", "dw", (1, 14, 14, 256, 256, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 256)),
    ("dw 14x14x960 5x5", "dw", (1, 14, 14, 960, 960, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 960)),
    ("grouped 56x56x128 g32 3x3 (ResNeXt)", "grp", (1, 56, 56, 128, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 32)),
    ("grouped 56x56x64 g4 3x3", "grp", (1, 56, 56, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4)),
    ("dw x2 56x56x32->64 3x3", "grp", (1, 56, 56, 32, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 32)),
]


# ---- machine ----------------------------------------------------------------------------------
def cpuinfo_ghz() -> float | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1e3
    except OSError:
        pass
    return None


_CLOCK_C = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
  struct timespec t0, t1; long n = 100000000L; long x = 0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long i = 0; i < n; i++)
    __asm__ volatile("add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\t"
                     "add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0" : "+r"(x));
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("%f\n", 8.0 * n / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9) / 1e9);
  return x == 0;
}
"""


def measured_ghz() -> float | None:
    """Running core clock: 8e8 dependent 1-cycle adds, best of 5 (other load on the machine can only
    make it look slower); None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "clk.c"), os.path.join(d, "clk")
        Path(src).write_text(_CLOCK_C)
        if subprocess.run([cc, "-O2", src, "-o", exe], capture_output=True).returncode:
            return None
        runs = [float(subprocess.run([exe], capture_output=True, text=True).stdout) for _ in range(5)]
    return max(runs)


def vnni_peak_kernel(cores: int, iters: int):
    """16 independent vpdpbusd accumulators per core, no memory traffic in the loop."""

    @T.prim_func
    def peak(A: T.Buffer((64,), "int8"), B: T.Buffer((64,), "int8"), Out: T.Buffer((cores, 256), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(cores):
            acc = T.alloc_buffer((16,), "int32x16")
            for i in T.unroll(16):
                acc[i] = T.broadcast(i, 16)
            for _ in range(iters):
                for i in T.unroll(16):
                    acc[i] = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[i],
                                                     A.vload([0], "int8x64"), B.vload([0], "int8x64"))
            for i in T.unroll(16):
                Out[t, i * 16: i * 16 + 16] = acc[i]

    return peak


# ---- timing -----------------------------------------------------------------------------------------
def stats(seconds: list[float], ops: float) -> dict:
    s = np.asarray(seconds)
    return {"median_ms": float(np.median(s) * 1e3), "min_ms": float(s.min() * 1e3), "max_ms": float(s.max() * 1e3),
            "gops_median": float(ops / np.median(s) / 1e9), "gops_best": float(ops / s.min() / 1e9),
            "gops_worst": float(ops / s.max() / 1e9), "repeats": len(s)}


def time_lib(lib, args, ops, repeats, min_repeat_ms):
    ev = lib.time_evaluator(lib.entry_name if hasattr(lib, "entry_name") else "main", tvm.cpu(), number=1,
                            repeat=repeats, min_repeat_ms=min_repeat_ms)
    return stats(list(ev(*args).results), ops)


_NUMPY_SCRIPT = r"""
import json, sys, time
import numpy as np
shapes, repeats, min_repeat_ms = json.load(sys.stdin)
out = []
for M, N, K in shapes:
    a = np.random.default_rng(0).standard_normal((M, K), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((K, N), dtype=np.float32)
    np.matmul(a, b)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_repeat_ms / 1e3 or n < 1:
        np.matmul(a, b)
        n += 1
    res = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            np.matmul(a, b)
        res.append((time.perf_counter() - t) / n)
    out.append(res)
json.dump(out, sys.stdout)
"""


def time_numpy_all(shapes, repeats, min_repeat_ms) -> dict:
    """NumPy FP32 matmul (its BLAS, all threads) in a fresh process that never imports TVM: with TVM
    loaded in the process OpenBLAS ran 256^3 at 2 GFLOPS instead of ~80, and TVM's worker threads
    spin after every parallel kernel, stealing the cores from the BLAS threads."""
    shapes = sorted(shapes)
    proc = subprocess.run([sys.executable, "-c", _NUMPY_SCRIPT], input=json.dumps([shapes, repeats, min_repeat_ms]),
                          capture_output=True, text=True, check=True)
    return {tuple(shape): stats(res, 2.0 * shape[0] * shape[1] * shape[2])
            for shape, res in zip(shapes, json.loads(proc.stdout))}


def build(func, target):
    t = time.perf_counter()
    lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=target)
    return lib, time.perf_counter() - t


def tensors(*arrays):
    return [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]


def requant_args(rng, n):
    return (rng.integers(-(2**16), 2**16, n).astype(np.int32), rng.integers(2**29, 2**30, n).astype(np.int64),
            np.full(n, 40, np.int64))


# ---- benchmarks -----------------------------------------------------------------------------------------
def numpy_baselines(gemms, convs, repeats, mrm) -> dict:
    """NumPy FP32 matmul on every GEMM shape (a conv as its im2col GEMM)."""
    shapes = {(M, N, K) for _, M, N, K in gemms}
    for _, (N, H, W, C, OC, KH, KW, s, p, d), _ in convs:
        OH, OW = cv._out_shape(H, W, KH, KW, s, p, d)
        shapes.add((N * OH * OW, OC, C * KH * KW))
    return time_numpy_all(shapes, repeats, mrm)


def bench_gemms(target, shapes, repeats, mrm, rng, baseline):
    rows = []
    for name, M, N, K in shapes:
        t = time.perf_counter()
        func = cv.dense(M, N, K, "int8", "int8", -128, 127)
        gen_s = time.perf_counter() - t
        lib, build_s = build(func, target)
        w = rng.integers(-128, 128, (K, N)).astype(np.int8)
        bias, mult, shift = requant_args(rng, N)
        wp, be = cv.pack_dense(w, bias, a_signed=True)
        args = tensors(rng.integers(-128, 128, (M, K)).astype(np.int8), wp, be, mult, shift, np.zeros((M, N), np.int8))
        ops = 2.0 * M * N * K
        rows.append({"name": name, "M": M, "N": N, "K": K, "config": repr(cv.default_config(M, N, K)),
                     "gen_s": gen_s, "build_s": build_s, "int8": time_lib(lib, args, ops, repeats, mrm),
                     "numpy_fp32": baseline[(M, N, K)]})
    return rows


def bench_convs(target, convs, repeats, mrm, rng, baseline):
    rows = []
    for name, (N, H, W, C, OC, KH, KW, s, p, d), a_dtype in convs:
        t = time.perf_counter()
        func = cv.conv2d_nhwc(N, H, W, C, OC, KH, KW, s, p, d, a_dtype, "int8", -128, 127)
        gen_s = time.perf_counter() - t
        lib, build_s = build(func, target)
        OH, OW = cv._out_shape(H, W, KH, KW, s, p, d)
        w = rng.integers(-128, 128, (OC, C, KH, KW)).astype(np.int8)
        bias, mult, shift = requant_args(rng, OC)
        wp, be = cv.pack_conv(w, bias, a_signed=a_dtype == "int8")
        lo = -128 if a_dtype == "int8" else 0
        x = rng.integers(lo, lo + 256, (N, H, W, C)).astype(a_dtype)
        args = tensors(x, wp, be, mult, shift, np.zeros((N, OH, OW, OC), np.int8))
        ops = 2.0 * N * OH * OW * OC * C * KH * KW
        rows.append({"name": name, "a_dtype": a_dtype, "gen_s": gen_s, "build_s": build_s,
                     "int8": time_lib(lib, args, ops, repeats, mrm),
                     "numpy_fp32_same_gemm": baseline[(N * OH * OW, OC, C * KH * KW)]})
    return rows


def bench_direct(target, cases, repeats, mrm, rng):
    """Depthwise / grouped convs.  A depthwise case runs the kernel the lowering takes on this target
    (``depthwise_conv2d_taps``: vpdpbusd over kernel rows) as "int8" and the int32-lane kernel
    (``depthwise_conv2d_nhwc``, the one before; int16 inputs, a symbolic height / width and C % 8 != 0
    still take it) as
    "int8_lanes", interleaved (``repeats`` rounds of one ``time_evaluator`` each, so both see the same
    load), with their outputs compared bit for bit."""
    rows = []
    for name, kind, (N, H, W, C, OC, KH, KW, s, p, d, g), *dt in cases:
        a_dtype = dt[0] if dt else "uint8"
        lo = -128 if a_dtype == "int8" else 0
        x = rng.integers(lo, lo + 256, (N, H, W, C)).astype(a_dtype)
        OH, OW = cv._out_shape(H, W, KH, KW, s, p, d)
        bias, mult, shift = requant_args(rng, OC)
        ops = 2.0 * N * OH * OW * OC * (C // g) * KH * KW
        t = time.perf_counter()
        peers = {}
        if kind == "dw":
            w = rng.integers(-128, 128, (KH, KW, C)).astype(np.int8)
            peers["int8_lanes"] = (cv.depthwise_conv2d_nhwc(N, H, W, C, KH, KW, s, p, d, a_dtype, "int8", -128, 127),
                                   [x, w, bias, mult, shift])
            if cv.depthwise_taps_ok(N, H, W, C, KH, KW, a_dtype, cv.VNNI):
                w4, rc = cv.pack_depthwise_taps(w, bias, a_dtype, mult, shift)
                peers["int8"] = (cv.depthwise_conv2d_taps(N, H, W, C, KH, KW, s, p, d, a_dtype, "int8", -128, 127),
                                 [x, w4, rc, mult, shift])
        else:
            w = rng.integers(-128, 128, (OC, C // g, KH, KW)).astype(np.int8)
            peers["int8"] = (cv.grouped_conv2d_nhwc(N, H, W, C, OC, KH, KW, s, p, d, g, a_dtype, "int8", -128, 127),
                             [x, w, bias, mult, shift])
        gen_s = time.perf_counter() - t
        row = {"name": name, "a_dtype": a_dtype, "gen_s": gen_s, "build_s": 0.0}
        evs, outs = {}, {}
        for key, (func, arrays) in peers.items():
            lib, b_s = build(func, target)
            row["build_s"] += b_s
            args = tensors(*arrays, np.zeros((N, OH, OW, OC), np.int8))
            lib(*args)
            outs[key] = args[-1].numpy()
            ev = lib.time_evaluator(lib.entry_name if hasattr(lib, "entry_name") else "main", tvm.cpu(), number=1,
                                    repeat=1, min_repeat_ms=mrm)
            evs[key] = (ev, args, [])
        for _ in range(repeats):
            for ev, args, times in evs.values():
                times.append(float(ev(*args).results[0]))
        for key, (_, _, times) in evs.items():
            row[key] = stats(times, ops)
        if "int8" not in row:
            row["int8"] = row["int8_lanes"]
        if len(outs) == 2:
            row["bit_equal"] = bool(np.array_equal(outs["int8"], outs["int8_lanes"]))
            row["taps_over_lanes"] = row["int8"]["gops_median"] / row["int8_lanes"]["gops_median"]
        rows.append(row)
    return rows


def _matmul_graph(batch, M, N, K, a_dtype, b_trans):
    """A one-op integer graph: out = requant(a @ b), b given [batch, N, K] plus a Transpose if b_trans."""
    from qcompiler.graph import Graph, Node

    shapes = {"a": (batch, M, K), "out": (batch, M, N)}
    nodes = []
    if b_trans:
        shapes.update(bt=(batch, N, K), b=(batch, K, N))
        nodes.append(Node("transpose", "kT", ["bt"], ["b"], {"perm": (0, 2, 1)}))
    else:
        shapes["b"] = (batch, K, N)
    nodes.append(Node("matmul", "mm", ["a", "b"], ["out"],
                      {"mult": np.int64(1 << 30), "shift": np.int64(40 if K > 64 else 38), "lo": -128, "hi": 127,
                       "dtype": "int8"}))
    ins = ["a", "bt" if b_trans else "b"]
    dtypes = {"a": a_dtype, "b": "int8", "bt": "int8", "out": "int8"}
    return Graph(nodes, ins, ["out"], shapes, dtypes)


def bench_batch_matmuls(target, cases, repeats, mrm, rng):
    """Each case through qcompiler.lowering.build with and without our kernels (same graph, same VM)."""
    from tvm import relax

    from qcompiler.lowering.build import build as qc_build

    rows = []
    for name, batch, M, N, K, a_dtype, b_trans in cases:
        ig = _matmul_graph(batch, M, N, K, a_dtype, b_trans)
        lo = -128 if a_dtype == "int8" else 0
        a = rng.integers(lo, lo + 256, (batch, M, K)).astype(a_dtype)
        b = rng.integers(-128, 128, ig.shapes[ig.inputs[1]]).astype(np.int8)
        ops = 2.0 * batch * M * N * K
        row = {"name": name, "batch": batch, "M": M, "N": N, "K": K, "a_dtype": a_dtype, "b_transposed": b_trans}
        outs = {}
        for key, use in (("kernel", True), ("generic", False)):
            t = time.perf_counter()
            res = qc_build(ig, target, use_kernels=use)
            row[f"{key}_build_s"] = time.perf_counter() - t
            row[f"{key}_gemm_kernels"] = res.gemm_kernels
            vm = relax.VirtualMachine(res.executable, tvm.cpu())
            args = tensors(a, b)
            outs[key] = vm["main"](*args).numpy()
            ev = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeats, min_repeat_ms=mrm)
            row[key] = stats(list(ev(*args).results), ops)
        row["bit_equal"] = bool(np.array_equal(outs["kernel"], outs["generic"]))
        row["int8"] = row["kernel"]
        row["gen_s"], row["build_s"] = 0.0, row["kernel_build_s"]
        rows.append(row)
    return rows


def machine(target, repeats, mrm) -> dict:
    cores = os.cpu_count() or 1
    iters = 1 << 16
    lib, _ = build(vnni_peak_kernel(cores, iters), target)
    args = tensors(np.ones(64, np.int8), np.ones(64, np.int8), np.zeros((cores, 256), np.int32))
    peak = time_lib(lib, args, 2.0 * cores * iters * 16 * 64, repeats, mrm)
    ghz_info, ghz_run = cpuinfo_ghz(), measured_ghz()
    ghz = ghz_run or ghz_info
    per_cycle = peak["gops_best"] / (cores * ghz * 64 * 2) if ghz else None  # a ceiling: best repeat
    rate = round(per_cycle) if per_cycle and per_cycle > 0.75 else per_cycle  # an integer issue rate
    return {
        "device": cpu_model_name(), "llvm_cpu": tvm.target.codegen.llvm_get_system_cpu(), "cores": cores,
        "ghz_cpuinfo": ghz_info, "ghz_measured": ghz_run,
        "vpdpbusd_zmm_per_cycle_per_core": per_cycle,
        "peak_gops_formula": (f"{cores} cores x {ghz:.3f} GHz ({'measured' if ghz_run else '/proc/cpuinfo'}) x "
                              f"{rate} vpdpbusd/cycle x 64 MACs x 2 ops") if ghz else None,
        "peak_gops": cores * ghz * rate * 64 * 2 if ghz and rate else None,
        "peak_gops_at_cpuinfo_clock": cores * ghz_info * rate * 64 * 2 if ghz_info and rate else None,
        "vpdpbusd_register_only": peak,
    }


# ---- low-bit backends (W4A8, W8A16) vs INT8, per ISA ------------------------------------------------
LOWBIT_COMPUTE = [  # name, kind, shape (dense: M, N, K; conv: N, H, W, C, OC, KH, KW, strides, pads, dilations)
    ("gemm 512x512x1024", "dense", (512, 512, 1024)),
    ("gemm 3136x64x576 (conv-like)", "dense", (3136, 64, 576)),
    ("resnet50 56x56x64->64 3x3", "conv", (1, 56, 56, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))),
    ("resnet50 28x28x128->128 3x3", "conv", (1, 28, 28, 128, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))),
    ("resnet50 14x14x256->256 3x3", "conv", (1, 14, 14, 256, 256, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))),
    ("resnet50 56x56x256->64 1x1", "conv", (1, 56, 56, 256, 64, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))),
]
LOWBIT_SMALL_M = [(M, N, K) for N, K in ((4096, 4096), (8192, 8192)) for M in (1, 2, 4, 8)]
LOWBIT_ISAS = {  # ISA -> (LLVM cpu, INT8 backend, W4A8 backend, W8A16 backend, host flag)
    "avx512vnni": (None, "cpu_vnni", "cpu_vnni_w4", "cpu_vnni_a16", "vnni"),
    "avx2": ("znver2", "cpu_avx2", "cpu_avx2_w4", "cpu_avx2_a16", "avx2"),
}


def _reg_peak_kernel(cores: int, iters: int, kind: str):
    """Register-only throughput loop of one multiply instruction, 12 independent accumulators per core."""
    if kind == "vpdpbusd":
        return vnni_peak_kernel(cores, iters)
    acc_t, op_t, intr = {"vpmaddwd": ("int32x8", "int16x16", "llvm.x86.avx2.pmadd.wd"),
                         "vpmaddubsw": ("int16x16", "int8x32", "llvm.x86.avx2.pmadd.ub.sw")}[kind]

    @T.prim_func
    def peak(A: T.Buffer((32,), "int8"), B: T.Buffer((32,), "int8"), Out: T.Buffer((cores, 12 * 32), "int8")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(cores):
            acc = T.alloc_buffer((12,), acc_t)
            for i in T.unroll(12):
                acc[i] = T.reinterpret(T.broadcast(T.int32(i), 8), dtype=acc_t)
            for _ in range(iters):
                for i in T.unroll(12):
                    acc[i] = acc[i] + T.call_llvm_pure_intrin(acc_t, intr, T.reinterpret(A.vload([0], "int8x32"), dtype=op_t),
                                                              T.reinterpret(B.vload([0], "int8x32"), dtype=op_t))
            for i in T.unroll(12):
                Out[t, i * 32: i * 32 + 32] = T.reinterpret(acc[i], dtype="int8x32")

    return peak


_PEAK_MACS = {"vpdpbusd": 64, "vpmaddwd": 16, "vpmaddubsw": 32}


def measured_peak(target, kind: str, repeats: int, mrm: int) -> dict:
    cores, iters = os.cpu_count() or 1, 1 << 16
    n_acc = 16 if kind == "vpdpbusd" else 12
    lib, _ = build(_reg_peak_kernel(cores, iters, kind), target)
    out = (cores, 256) if kind == "vpdpbusd" else (cores, 12 * 32)
    args = tensors(np.ones(64, np.int8)[: 64 if kind == "vpdpbusd" else 32], np.ones(64 if kind == "vpdpbusd" else 32,
                   np.int8), np.zeros(out, np.int32 if kind == "vpdpbusd" else np.int8))
    st = time_lib(lib, args, 2.0 * cores * iters * n_acc * _PEAK_MACS[kind], repeats, mrm)
    return {"instruction": kind, "macs_per_instruction": _PEAK_MACS[kind], "gops_best": st["gops_best"],
            "gops_median": st["gops_median"]}


def read_bandwidth(target, nbytes: int, repeats: int, mrm: int) -> float:
    """GB/s of a parallel vectorized int32 sum over ``nbytes`` (the weights' working set)."""
    cores = os.cpu_count() or 1
    n = max(cores * 64, nbytes // 4 // (cores * 64) * cores * 64)
    per = n // cores

    @T.prim_func
    def rd(A: T.Buffer((n,), "int32"), Out: T.Buffer((cores, 16), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(cores):
            acc = T.alloc_buffer((4,), "int32x16")
            for i in T.unroll(4):
                acc[i] = T.broadcast(0, 16)
            for j in range(per // 64):
                for i in T.unroll(4):
                    acc[i] = acc[i] + A.vload([t * per + j * 64 + i * 16], "int32x16")
            Out[t, 0:16] = acc[0] + acc[1] + acc[2] + acc[3]

    lib, _ = build(rd, target)
    args = tensors(np.ones(n, np.int32), np.zeros((cores, 16), np.int32))
    ev = lib.time_evaluator("main", tvm.cpu(), number=1, repeat=repeats, min_repeat_ms=mrm)
    return 4.0 * n / float(np.min(ev(*args).results)) / 1e9  # a ceiling: the best repeat


def _lowbit_case(be, kind, shape, rng):
    """(time function, ops, weight bytes) of backend ``be`` on one dense / conv shape (default config)."""
    ad = "int16" if be.isa.a_operand == "int16" else "uint8"
    lo_w, hi_w = (-8, 8) if be.weight_bits == 4 else (-128, 128)
    if kind == "dense":
        M, N, K = shape
        w = rng.integers(lo_w, hi_w, (K, N)).astype(np.int8)
        bias, mult, shift = requant_args(rng, N)
        wp, beff = be.pack_dense(w, bias, ad)
        func = be.dense(M, N, K, ad, "int8", -128, 127)
        x = rng.integers(0, 100, (M, K)).astype(ad)
        out = np.zeros((M, N), np.int8)
        ops = 2.0 * M * N * K
    else:
        N, H, W, C, OC, KH, KW, s, p, d = shape
        OH, OW = cv._out_shape(H, W, KH, KW, s, p, d)
        w = rng.integers(lo_w, hi_w, (OC, C, KH, KW)).astype(np.int8)
        bias, mult, shift = requant_args(rng, OC)
        wp, beff = be.pack_conv(w, bias, ad)
        func = be.conv2d(N, H, W, C, OC, KH, KW, s, p, d, ad, "int8", -128, 127)
        x = rng.integers(0, 100, (N, H, W, C)).astype(ad)
        out = np.zeros((N, OH, OW, OC), np.int8)
        ops = 2.0 * N * OH * OW * OC * C * KH * KW
    return func, tensors(x, wp, beff, mult, shift, out), ops, wp.nbytes


def bench_lowbit_isa(isa: str, rounds: int, mrm: int, rng, quick: bool) -> dict:
    from qcompiler.kernels import backends as KB

    mcpu, b8, b4, b16, _ = LOWBIT_ISAS[isa]
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu or tvm.target.codegen.llvm_get_system_cpu()})
    kinds = ("vpdpbusd",) if isa == "avx512vnni" else ("vpmaddwd", "vpmaddubsw")
    # peaks are ceilings: the best repeat of 15, measured before and after the section (other jobs
    # on a shared machine only ever lower them)
    peaks = {k: measured_peak(target, k, 15, 50) for k in kinds}
    compute = LOWBIT_COMPUTE[::2] if quick else LOWBIT_COMPUTE
    small = [s for s in LOWBIT_SMALL_M if s[1] == 4096 or not quick]
    bw_cache: dict[int, float] = {}
    rows = []
    for section, cases in (("compute", [(n, k, s) for n, k, s in compute]),
                           ("small_m", [(f"dense M={M} {N}x{K}", "dense", (M, N, K)) for M, N, K in small])):
        for name, kind, shape in cases:
            peers = {}
            for label, bname in (("int8", b8), ("w4a8", b4), ("w8a16", b16)):
                be = KB.get(bname)
                func, args, ops, wbytes = _lowbit_case(be, kind, shape, rng)
                lib, _ = build(func, target)
                ev = lib.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=mrm)
                cfg = be.default_config(*(shape if kind == "dense" else
                                          (shape[0] * np.prod(cv._out_shape(*shape[1:3], *shape[5:7], *shape[7:])),
                                           shape[4], be.gemm_k(shape[3], shape[5], shape[6]))))
                peers[label] = {"backend": bname, "ev": ev, "args": args, "ops": ops, "weight_bytes": wbytes,
                                "config": repr(cfg), "times": []}
            for _ in range(rounds):  # interleaved: every peer sees the same machine load
                for p in peers.values():
                    p["times"].append(float(p["ev"](*p["args"]).results[0]))
            row = {"name": name, "section": section, "kind": kind, "shape": [list(v) if isinstance(v, tuple) else v
                                                                              for v in shape]}
            for label, p in peers.items():
                st = stats(p["times"], p["ops"])
                st.update(backend=p["backend"], config=p["config"], weight_bytes=p["weight_bytes"])
                if section == "small_m":
                    nb = p["weight_bytes"]
                    if nb not in bw_cache:
                        bw_cache[nb] = read_bandwidth(target, nb, 9, mrm)
                    st["read_gbs_at_weight_size"] = bw_cache[nb]
                    st["bandwidth_roof_gops"] = p["ops"] / (nb / (bw_cache[nb] * 1e9)) / 1e9
                row[label] = st
            row["w4a8_over_int8"] = row["w4a8"]["gops_median"] / row["int8"]["gops_median"]
            row["w8a16_over_int8"] = row["w8a16"]["gops_median"] / row["int8"]["gops_median"]
            rows.append(row)
            print(f"  [{isa}] {name:34s} INT8 {row['int8']['gops_median']:7.1f}  W4A8 {row['w4a8']['gops_median']:7.1f} "
                  f"(x{row['w4a8_over_int8']:.2f})  W8A16 {row['w8a16']['gops_median']:7.1f} GOPS", flush=True)
    for k in kinds:
        again = measured_peak(target, k, 15, 50)
        if again["gops_best"] > peaks[k]["gops_best"]:
            peaks[k] = again
    int8_peak, w4_peak = peaks[kinds[0]]["gops_best"], peaks[kinds[-1]]["gops_best"]
    return {"isa": isa, "llvm_cpu": str(target.attrs.get("mcpu")), "peaks": peaks, "int8_peak_gops": int8_peak,
            "w4a8_instruction_peak_gops": w4_peak, "rows": rows}


def main_lowbit(args) -> None:
    from qcompiler.targets import host_has_avx2, host_has_vnni

    has = {"avx512vnni": host_has_vnni(), "avx2": host_has_avx2()}
    isas = [i for i in LOWBIT_ISAS if has[i] and (not args.isa or i in args.isa)]
    if not isas:
        sys.exit("this CPU has neither AVX-512 VNNI nor AVX2: nothing to benchmark")
    rng = np.random.default_rng(0)
    rounds, mrm = (3, 50) if args.quick else (args.rounds, args.min_repeat_ms)
    load_start = os.getloadavg()
    ghz_info, ghz_run = cpuinfo_ghz(), measured_ghz()
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "tvm": tvm.__version__,
           "device": cpu_model_name(), "host_llvm_cpu": tvm.target.codegen.llvm_get_system_cpu(),
           "cores": os.cpu_count(), "ghz_cpuinfo": ghz_info, "ghz_measured": ghz_run, "rounds": rounds,
           "min_repeat_ms": mrm, "threads": os.environ.get("TVM_NUM_THREADS"), "isas": {}}
    for isa in isas:
        print(f"{isa}:", flush=True)
        res["isas"][isa] = bench_lowbit_isa(isa, rounds, mrm, rng, args.quick)
    res["loadavg_1_5_15_start"], res["loadavg_1_5_15_end"] = load_start, os.getloadavg()
    print(f"\n{res['device']} ({res['host_llvm_cpu']}), {res['cores']} cores, clock measured {ghz_run} GHz; "
          f"load average {load_start} -> {res['loadavg_1_5_15_end']}; TVM_NUM_THREADS={res['threads']}")
    for isa, r in res["isas"].items():
        pk = ", ".join(f"{k} {v['gops_best']:.0f}" for k, v in r["peaks"].items())
        print(f"\n{isa} (llvm cpu {r['llvm_cpu']}); measured register-only peaks (GOPS): {pk}")
        hdr = (f"{'layer':34s} {'INT8 GOPS':>10s} {'W4A8 GOPS':>10s} {'W4/INT8':>8s} {'W8A16':>8s} "
               f"{'roof INT8':>10s} {'roof W4':>8s}")
        print(hdr)
        print("-" * len(hdr))
        for row in r["rows"]:
            i8, w4 = row["int8"], row["w4a8"]
            if row["section"] == "small_m":
                roofs = f"{i8['bandwidth_roof_gops']:10.0f} {w4['bandwidth_roof_gops']:8.0f}"
            else:
                roofs = f"{r['int8_peak_gops']:10.0f} {r['w4a8_instruction_peak_gops']:8.0f}"
            print(f"{row['name']:34s} {i8['gops_median']:10.1f} {w4['gops_median']:10.1f} "
                  f"{row['w4a8_over_int8']:8.2f} {row['w8a16']['gops_median']:8.1f} {roofs}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-repeat-ms", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="a few shapes, fewer repeats (smoke run)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--lowbit", action="store_true", help="W4A8 / W8A16 backends vs INT8, per ISA (issue 18)")
    ap.add_argument("--isa", action="append", choices=list(LOWBIT_ISAS), help="--lowbit: only this ISA")
    ap.add_argument("--rounds", type=int, default=7, help="--lowbit: interleaved timing rounds per peer")
    ap.add_argument("--direct-only", action="store_true",
                    help="only the peak and the depthwise / grouped convs (-> cpu_kernels_direct.json)")
    args = ap.parse_args()
    if args.lowbit:
        args.out = args.out or str(ROOT / "benchmarks" / "results" / "cpu_kernels_lowbit.json")
        return main_lowbit(args)
    args.out = args.out or str(ROOT / "benchmarks" / "results" /
                               ("cpu_kernels_direct.json" if args.direct_only else "cpu_kernels.json"))
    if not cv.host_has_vnni():
        sys.exit("this CPU has no AVX-512 VNNI: nothing to benchmark")
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    rng = np.random.default_rng(0)
    reps, mrm = (3, 50) if args.quick else (args.repeats, args.min_repeat_ms)
    gemms, convs, direct = (GEMMS[::4], CONVS[::4], DIRECT[::3]) if args.quick else (GEMMS, CONVS, DIRECT)
    if args.direct_only:
        gemms, convs = [], []

    load_start = os.getloadavg()
    baseline = numpy_baselines(gemms, convs, reps, mrm)
    mach = machine(target, reps, mrm)
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "tvm": tvm.__version__,
           "numpy": np.__version__, "target": str(target), "repeats": reps, "min_repeat_ms": mrm,
           "machine": mach, "gemm": bench_gemms(target, gemms, reps, mrm, rng, baseline),
           "conv": bench_convs(target, convs, reps, mrm, rng, baseline),
           "batch_matmul": [] if args.direct_only else bench_batch_matmuls(target, BATCH_MATMULS, reps, mrm, rng),
           "direct": bench_direct(target, direct, reps, mrm, rng)}
    # other work on this shared machine shows up as load: recorded so a noisy run can be recognized
    res["loadavg_1_5_15_start"], res["loadavg_1_5_15_end"] = load_start, os.getloadavg()

    peak = mach["peak_gops"]
    meas = mach["vpdpbusd_register_only"]["gops_best"]
    print(f"{mach['device']} ({mach['llvm_cpu']}), {mach['cores']} cores; clock /proc/cpuinfo "
          f"{mach['ghz_cpuinfo']} GHz, measured {mach['ghz_measured']} GHz")
    print(f"VNNI peak: {mach['peak_gops_formula']} = {peak:.0f} GOPS; register-only vpdpbusd loop "
          f"{meas:.0f} GOPS best ({mach['vpdpbusd_zmm_per_cycle_per_core']:.2f}/cycle/core)")
    hdr = (f"{'kernel':40s} {'INT8 GOPS med [min..max]':>27s} {'%peak':>6s} {'np FP32 best':>13s} {'x np':>6s} "
           f"{'gen+build s':>12s}")
    print(f"load average at start {load_start}, at end {res['loadavg_1_5_15_end']} (2 cores; other jobs add noise)")
    print(hdr)
    print("-" * len(hdr))
    for r in res["gemm"] + res["conv"] + res["direct"]:
        i = r["int8"]
        npf = r.get("numpy_fp32") or r.get("numpy_fp32_same_gemm")
        npg = f"{npf['gops_best']:13.1f}" if npf else f"{'':13s}"  # NumPy's best repeat: conservative
        ratio = f"{i['gops_median'] / npf['gops_best']:6.1f}" if npf else f"{'':6s}"
        print(f"{r['name']:40s} {i['gops_median']:8.1f} [{i['gops_worst']:7.1f}..{i['gops_best']:7.1f}] "
              f"{100 * i['gops_median'] / peak:5.0f}% {npg} {ratio} {r['gen_s']:5.3f}+{r['build_s']:5.3f}")
    print(f"\n{'batch matmul (whole lowering, VM call)':40s} {'kernel GOPS med [min..max]':>27s} "
          f"{'generic GOPS med':>17s} {'x generic':>9s} {'equal':>6s}")
    for r in res["batch_matmul"]:
        k, g = r["kernel"], r["generic"]
        print(f"{r['name']:40s} {k['gops_median']:8.1f} [{k['gops_worst']:7.1f}..{k['gops_best']:7.1f}] "
              f"{g['gops_median']:17.2f} {k['gops_median'] / g['gops_median']:9.1f} {str(r['bit_equal']):>6s}")
    print(f"\n{'depthwise: taps vs int32 lanes (interleaved)':40s} {'taps GOPS %peak':>16s} {'lanes GOPS %peak':>17s} "
          f"{'x lanes':>8s} {'equal':>6s}")
    for r in res["direct"]:
        if "int8_lanes" in r and "taps_over_lanes" in r:
            t, ln = r["int8"]["gops_median"], r["int8_lanes"]["gops_median"]
            print(f"{r['name']:40s} {t:9.1f} {100 * t / peak:5.1f}% {ln:10.1f} {100 * ln / peak:5.1f}% "
                  f"{r['taps_over_lanes']:8.2f} {str(r['bit_equal']):>6s}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
