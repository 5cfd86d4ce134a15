"""INT8 / W4A8 tensor-core kernels (qcompiler.kernels.cuda_mma) on a GPU, against cuBLASLt and FP16.

Two steps, so that the GPU machine needs no TVM compiler:

    # here (TVM + nvcc, no GPU): build every kernel for sm_90, export .so + cubin + manifest
    python benchmarks/gpu_kernels.py --build build/gpu_kernels [--arch sm_90] [--sweep] [--quick]

    # on the GPU machine: load, check bit-exactly against a float64 reference, time, compare
    python benchmarks/gpu_kernels.py --run build/gpu_kernels [--quick] [--json PATH]

    # where the full compiler and a GPU are in one place
    python benchmarks/gpu_kernels.py --build DIR --run DIR

What ``--run`` needs.  PyTorch (inputs, CUDA-event timing, the cuBLASLt ``torch._int_mm`` and FP16
``torch.matmul`` / ``conv2d`` baselines, the float64 reference) and either the ``tvm`` package, or
only ``tvm_ffi`` (apache-tvm-ffi 0.1.14.post1 for the machine's Python) plus the TVM runtime
libraries that ``--build`` copies into ``DIR/runtime`` (libtvm_runtime.so, libtvm_runtime_cuda.so:
a few MB, versus 260 MB for the compiler).  Libraries from ``tvm.compile`` keep CUDA *source* that
the CUDA runtime compiles when they load (``tvm_callback_cuda_compile``); ``--run`` registers a
callback that hands back the cubins ``--build`` compiled with nvcc (matched by the source's
SHA-256), and falls back to nvcc on the GPU machine.  On this workplace's lent H100 (Python 3.12,
torch, no TVM, nothing reachable), from the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 -d .whl apache-tvm-ffi==0.1.14.post1
    python benchmarks/gpu_kernels.py --build build/gpu_kernels          # build/ is git-ignored
    # run(carry=[".whl", "build/gpu_kernels"], command=
    #   "python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    #    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py --run build/gpu_kernels")

Cases.  LLM-like GEMMs (N x K = 4096x4096, 11008x4096, 4096x11008; M = batch*tokens from 1 to
4096), W4A8 against INT8 at small M, ResNet-50-like convolutions (implicit GEMM, batch 1 and 32),
and one dense kernel over a symbolic row count (what ``--shape`` ranges build) run at M = 1, 17, 64
and 1000.
Every kernel has the full fused epilogue (bias, dyadic requantization, clip, int8 out); the
cuBLASLt INT8 baseline is a bare int32 GEMM, FP16 a bare fp16 GEMM / cuDNN conv (channels-last), so
the comparison favours the baselines.  TOPS = 2*M*N*K / time.  Weights rotate through enough
copies to exceed the L2 cache (memory-bound small-M cases measure HBM, not L2).  Each time is the
median of several CUDA-event samples; the spread (max/min - 1) is reported.

Correctness: every output is poisoned first, then compared element for element with the contract's
epilogue applied to float64 accumulators (exact for these magnitudes), computed by torch on the GPU.

Prints a table last and writes JSON to $OUT/gpu_kernels.json (if $OUT is set) or
benchmarks/results/gpu_kernels_<device>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import glob
import hashlib
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

from qcompiler.kernels.int4_pack import pack_int4  # noqa: E402  (pure NumPy)

LLM_NK = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = [1, 16, 64, 256, 1024, 4096]
W4A8_BATCHES = [1, 16, 64, 256]
CONVS = [  # name, (N, H, W, C, OC, KH, KW, strides, pads, dilations)
    ("r50 stem 224x224x4->64 7x7/2", (None, 224, 224, 4, 64, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1))),
    ("r50 56x56x64->64 3x3", (None, 56, 56, 64, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))),
    ("r50 56x56x64->256 1x1", (None, 56, 56, 64, 256, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))),
    ("r50 28x28x128->128 3x3", (None, 28, 28, 128, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))),
    ("r50 14x14x256->256 3x3", (None, 14, 14, 256, 256, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))),
    ("r50 14x14x256->1024 1x1", (None, 14, 14, 256, 1024, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))),
    ("r50 7x7x512->512 3x3", (None, 7, 7, 512, 512, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))),
]
CONV_BATCHES = [1, 32]


def sweep_configs(kind, M):
    """Extra configurations timed with --sweep (besides the default)."""
    from qcompiler.kernels.cuda_mma import MmaConfig as C

    if M <= 16:
        return [C(bm=16, bn=16, bk=256, warps_m=1, warps_n=1, warps_k=4, stages=6),
                C(bm=16, bn=32, bk=512, warps_m=1, warps_n=2, warps_k=2, stages=4),
                C(bm=16, bn=16, bk=512, warps_m=1, warps_n=1, warps_k=8, stages=3),
                C(bm=16, bn=32, bk=256, warps_m=1, warps_n=2, stages=4)]
    if M <= 64:
        return [C(bm=64, bn=64, bk=128, warps_m=2, warps_n=2, stages=3),
                C(bm=32, bn=32, bk=256, warps_m=2, warps_n=1, warps_k=2, stages=3),
                C(bm=64, bn=32, bk=256, warps_m=2, warps_n=1, warps_k=4, stages=3)]
    if M <= 256:
        return [C(bm=128, bn=128, bk=64, warps_m=2, warps_n=2, stages=3),
                C(bm=64, bn=64, bk=128, warps_m=2, warps_n=2, stages=3),
                C(bm=64, bn=64, bk=128, warps_m=2, warps_n=2, warps_k=2, stages=3)]
    return [C(bm=128, bn=256, bk=64, warps_m=2, warps_n=4, stages=3),
            C(bm=256, bn=128, bk=64, warps_m=4, warps_n=2, stages=3),
            C(bm=128, bn=128, bk=64, warps_m=2, warps_n=2, stages=4),
            C(bm=128, bn=128, bk=128, warps_m=2, warps_n=2, stages=3)]


# ---- build (here) --------------------------------------------------------------------------------
def plan(quick: bool, sweep: bool):
    """Every case: dict(name, kind, group, shape..., config or None)."""
    cases = []
    nks = LLM_NK[:1] if quick else LLM_NK
    batches = [1, 64, 1024] if quick else BATCHES
    for N, K in nks:
        for M in batches:
            group = f"gemm {M}x{N}x{K}"
            cases.append(dict(kind="dense", M=M, N=N, K=K, group=group, config=None))
            if sweep:
                cases += [dict(kind="dense", M=M, N=N, K=K, group=group, config=c) for c in sweep_configs("dense", M)]
            if M in W4A8_BATCHES:
                cases.append(dict(kind="w4a8", M=M, N=N, K=K, group=group, config=None))
                if sweep and M <= 64:
                    cases += [dict(kind="w4a8", M=M, N=N, K=K, group=group, config=c)
                              for c in sweep_configs("w4a8", M) if c.bk % (64 * c.warps_k) == 0]
    # one kernel over a symbolic row count (``--shape`` ranges: batch x tokens), run at every M of "Ms"
    cases.append(dict(kind="dense_sym", M=64, N=4096, K=4096, Ms=[1, 17, 64, 1000], group="gemm symbolic M 4096x4096",
                      config=None))
    convs = CONVS[1:3] if quick else CONVS
    for name, geom in convs:
        for B in ([32] if quick else CONV_BATCHES):
            g = (B,) + geom[1:]
            cases.append(dict(kind="conv2d", geom=g, group=f"{name} b{B}", config=None))
    for c in cases:
        c["name"] = case_name(c)
    return cases


def case_name(c):
    cfg = c["config"]
    tag = ("default" if cfg is None else
           f"{cfg.bm}x{cfg.bn}x{cfg.bk}w{cfg.warps_m}x{cfg.warps_n}x{cfg.warps_k}s{cfg.stages}")
    if c["kind"] == "conv2d":
        N, H, W, C, OC, KH, KW, st, pads, dil = c["geom"]
        return f"conv_{N}x{H}x{W}x{C}_{OC}_{KH}x{KW}s{st[0]}_{tag}"
    return f"{c['kind']}_{c['M']}x{c['N']}x{c['K']}_{tag}"


def build(out_dir: Path, arch: str, quick: bool, sweep: bool) -> None:
    import tvm

    from qcompiler.kernels import cuda_mma as cm

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = dict(arch=arch, tvm=tvm.__version__, built=datetime.datetime.now().isoformat(timespec="seconds"),
                    cases=[])
    cases = plan(quick, sweep)
    t0 = time.time()
    for i, c in enumerate(cases):
        cfg = c["config"]
        if c["kind"] == "dense":
            f = cm.dense(c["M"], c["N"], c["K"], "int8", -128, 127, arch, cfg)
        elif c["kind"] == "dense_sym":  # M a variable of the kernel, its config the one at c["M"]
            from tvm import tirx

            from qcompiler.tune.workload import rows_at

            rows = tirx.Var("rows", "int64")
            with rows_at({"rows": c["M"]}):
                f = cm.dense(rows, c["N"], c["K"], "int8", -128, 127, arch, cfg)
        elif c["kind"] == "w4a8":
            f = cm.dense_w4a8(c["M"], c["N"], c["K"], "int8", -128, 127, arch, cfg)
        else:
            N, H, W, C, OC, KH, KW, st, pads, dil = c["geom"]
            f = cm.conv2d_nhwc(N, H, W, C, OC, KH, KW, st, pads, dil, "int8", -128, 127, arch, cfg)
        lib = cm.build(f, arch)
        so = out_dir / f"{c['name']}.so"
        lib.export_library(str(so))
        srcs = cm.cuda_sources(lib)
        cubins = []
        for j, src in enumerate(srcs):
            cub = cm.compile_cubin(src, arch)
            path = out_dir / f"{c['name']}.{j}.cubin"
            path.write_bytes(cub)
            cubins.append(dict(file=path.name, source_sha256=hashlib.sha256(src.encode()).hexdigest()))
        entry = {k: v for k, v in c.items() if k != "config"}
        entry["geom"] = list(c["geom"]) if "geom" in c else None
        entry.update(so=so.name, cubins=cubins, config=str(f.attrs["qc.config"]), default=cfg is None)
        manifest["cases"].append(entry)
        print(f"[{time.time() - t0:6.1f}s] {i + 1}/{len(cases)} {c['name']}  {entry['config']}", flush=True)
    rt = out_dir / "runtime"
    rt.mkdir(exist_ok=True)
    libdir = Path(tvm.__file__).parent / "lib"
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy2(libdir / name, rt / name)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"built {len(cases)} kernels for {arch} into {out_dir} ({size / 2**20:.1f} MiB)")


# ---- run (on the GPU) -----------------------------------------------------------------------------
class Runtime:
    """Loads exported libraries with tvm (if importable) or with tvm_ffi + DIR/runtime."""

    def __init__(self, out_dir: Path, manifest: dict):
        self.cubins = {}
        for c in manifest["cases"]:
            for cb in c["cubins"]:
                self.cubins[cb["source_sha256"]] = (out_dir / cb["file"]).read_bytes()
        self.jit_fallbacks = 0
        self.source_mismatches = 0
        self.current = None
        try:
            import tvm  # noqa: F401

            self.mode = "tvm"
            import tvm_ffi
        except ImportError:
            self.mode = "tvm_ffi"
            _preload_cuda_runtime()
            import tvm_ffi

            for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
                ctypes.CDLL(str(out_dir / "runtime" / name), mode=ctypes.RTLD_GLOBAL)
        self.ffi = tvm_ffi
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", self._compile, override=True)

    def _compile(self, code, *_):
        code = str(code)
        key = hashlib.sha256(code.encode()).hexdigest()
        if key in self.cubins:
            return bytes(self.cubins[key])
        if self.current is not None and len(self.current) == 1:
            # the loader handed over a differently serialized copy of the one source of the
            # library being loaded: its prebuilt cubin is still the right one
            self.source_mismatches += 1
            return bytes(self.cubins[self.current[0]])
        self.jit_fallbacks += 1
        return _nvcc_here(code)

    def load(self, path: Path, case: dict | None = None):
        self.current = [cb["source_sha256"] for cb in case["cubins"]] if case else None
        if self.mode == "tvm":
            import tvm

            return tvm.runtime.load_module(str(path))["main"]
        return self.ffi.load_module(str(path))["main"]

    def wrap(self, t):
        return self.ffi.from_dlpack(t)


def _preload_cuda_runtime():
    """libtvm_runtime_cuda.so needs libcudart.so.13 (torch's wheels carry it) and libcuda.so.1."""
    import torch

    torch.cuda.init()           # loads libcuda.so.1 (and torch's CUDA libraries) into the process

    for pat in ("libcudart.so.13", "libcudart.so.12"):
        try:
            ctypes.CDLL(pat, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            pass
    roots = [p for p in sys.path if p and os.path.isdir(p)] + ["/usr/local/cuda/lib64"]
    for root in roots:
        for hit in glob.glob(os.path.join(root, "nvidia", "**", "libcudart.so.1*"), recursive=True) + \
                glob.glob(os.path.join(root, "libcudart.so.1*")):
            ctypes.CDLL(hit, mode=ctypes.RTLD_GLOBAL)
            return
    raise RuntimeError("libcudart.so.13 not found; set LD_LIBRARY_PATH to the CUDA runtime")


def _nvcc_here(code: str) -> bytes:
    import torch

    major, minor = torch.cuda.get_device_capability()
    with tempfile.TemporaryDirectory() as tmp:
        cu, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.cubin")
        Path(cu).write_text(code)
        subprocess.run(["nvcc", "-cubin", "-O3", f"-arch=sm_{major}{minor}", "-w", "-o", out, cu], check=True)
        return Path(out).read_bytes()


def cuda_time(fn, n_rot, min_ms=100.0, samples=7):
    """Median and spread (max/min - 1) of per-call device times in ms; fn(i) with rotating i.

    The calls are captured into a CUDA graph (launch gaps would dominate the microsecond kernels of
    the small-M cases) and the graph replays are timed with CUDA events; TVM's launches follow the
    capture stream through ``tvm_ffi.use_torch_stream``.  Falls back to a plain launch loop on the
    current torch stream when capture fails."""
    import torch
    import tvm_ffi

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), tvm_ffi.use_torch_stream():
        for i in range(3):
            fn(i % n_rot)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with tvm_ffi.use_torch_stream():
        for i in range(5):
            fn(i % n_rot)
    torch.cuda.synchronize()
    one = max((time.perf_counter() - t0) / 5, 1e-6) * 1e3          # upper bound: includes launch gaps
    n = int(min(max(min_ms / 4 / one, 8), 500))
    n = max(n - n % n_rot, n_rot)
    graph = torch.cuda.CUDAGraph()
    try:
        with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
            for i in range(n):
                fn(i % n_rot)
        run, per = graph.replay, n
    except Exception:                                               # noqa: BLE001
        torch.cuda.synchronize()

        def run():
            with tvm_ffi.use_torch_stream():
                for i in range(n):
                    fn(i % n_rot)

        per = n
    run()
    torch.cuda.synchronize()
    reps = max(1, int(min_ms / max(one * n, 1e-3)))
    times = []
    for _ in range(samples):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for _ in range(reps):
            run()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) / (reps * per))
    times.sort()
    return times[len(times) // 2], times[-1] / times[0] - 1


def n_copies(bytes_one: int, l2: int = 50 << 20) -> int:
    return int(min(16, max(1, -(-3 * l2 // max(bytes_one, 1)))))


def epilogue_ref(acc64, bias, mult, shift):
    import torch

    acc = (acc64 + bias.to(torch.int64)).to(torch.int32).to(torch.int64)
    t = acc * mult + torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    return torch.clamp(torch.bitwise_right_shift(t, shift), -128, 127).to(torch.int8)


def run(out_dir: Path, quick: bool, json_path: str | None, min_ms: float) -> None:
    import torch

    manifest = json.loads((out_dir / "manifest.json").read_text())
    rt = Runtime(out_dir, manifest)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    print(f"device {name} sm_{cap[0]}{cap[1]}, torch {torch.__version__}, loader {rt.mode}, built for {manifest['arch']}")
    torch.backends.cudnn.benchmark = True
    cases = manifest["cases"]
    if quick:
        cases = [c for c in cases if c["default"]]
    results, baselines = [], {}
    for c in cases:
        seed = int(hashlib.sha256(c["name"].encode()).hexdigest()[:8], 16)
        g = torch.Generator(device="cpu").manual_seed(seed)
        r = dict(name=c["name"], kind=c["kind"], group=c["group"], config=c["config"], default=c["default"])
        try:
            if c["kind"] == "conv2d":
                r.update(_run_conv(rt, out_dir, c, g, dev, min_ms, baselines))
            elif c["kind"] == "dense_sym":  # bit-exact and timed at every M of the one kernel
                per = [_run_gemm(rt, out_dir, dict(c, M=m), g, dev, min_ms, baselines) for m in c["Ms"]]
                r.update(per[-1], ok=all(p["ok"] for p in per), per_M=per)
            else:
                r.update(_run_gemm(rt, out_dir, c, g, dev, min_ms, baselines))
        except Exception as e:  # keep going: one failure must not lose the other numbers
            r.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        results.append(r)
        status = "ok" if r.get("ok") else f"FAIL {r.get('error', 'mismatch')}"
        print(f"{c['name']:<52} {r.get('ms', float('nan')):9.4f} ms {r.get('tops', float('nan')):8.1f} TOPS  {status}",
              flush=True)
    report = dict(device=name, capability=f"sm_{cap[0]}{cap[1]}", torch=torch.__version__, loader=rt.mode,
                  built_for=manifest["arch"], jit_fallbacks=rt.jit_fallbacks,
                  source_mismatches=rt.source_mismatches,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), results=results, baselines=baselines)
    out = json_path or (os.path.join(os.environ["OUT"], "gpu_kernels.json") if os.environ.get("OUT")
                        else str(ROOT / "benchmarks" / "results" / f"gpu_kernels_{name.replace(' ', '_')}.json"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))
    print_table(results, baselines)
    print(f"wrote {out}")


def _rand_i8(g, shape, lo=-128, hi=128):
    import torch

    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int8)


def _epilogue_params(g, n, k):
    import torch

    bias = torch.randint(-5000, 5000, (n,), generator=g, dtype=torch.int32)
    mult = torch.randint(1 << 29, 1 << 31, (n,), generator=g, dtype=torch.int64)
    s = int(np.log2(np.sqrt(k) * 5500)) + 24
    shift = torch.randint(s - 1, s + 2, (n,), generator=g, dtype=torch.int64)
    return bias, mult, shift


def _run_gemm(rt, out_dir, c, g, dev, min_ms, baselines):
    import torch

    M, N, K = c["M"], c["N"], c["K"]
    A = _rand_i8(g, (M, K))
    Wt = _rand_i8(g, (N, K), -8, 8) if c["kind"] == "w4a8" else _rand_i8(g, (N, K))
    bias, mult, shift = _epilogue_params(g, N, K)
    Wdev = (torch.from_numpy(pack_int4(Wt.numpy(), "mma_k32")) if c["kind"] == "w4a8" else Wt).to(dev)
    A, bias, mult, shift = A.to(dev), bias.to(dev), mult.to(dev), shift.to(dev)
    out = torch.full((M, N), 0x5A, dtype=torch.int8, device=dev)          # poisoned
    f = rt.load(out_dir / c["so"], c)
    wrap = rt.wrap
    args = [wrap(A), wrap(Wdev), wrap(bias), wrap(mult), wrap(shift), wrap(out)]
    f(*args)
    torch.cuda.synchronize()
    acc = A.double() @ Wt.to(dev).double().T
    ref = epilogue_ref(acc.to(torch.int64), bias, mult, shift)
    ok = bool(torch.equal(out, ref))
    res = dict(M=M, N=N, K=K, ok=ok, mismatches=int((out != ref).sum()))
    wbytes = Wdev.numel() * Wdev.element_size()
    rot = n_copies(wbytes)
    ws = [wrap(Wdev.clone()) for _ in range(rot)]
    ms, spread = cuda_time(lambda i: f(args[0], ws[i], args[2], args[3], args[4], args[5]), rot, min_ms)
    res.update(ms=ms, spread=spread, tops=2 * M * N * K / ms / 1e9,
               gbps=(wbytes + M * K + M * N) / ms / 1e6)
    key = f"{M}x{N}x{K}"
    if key not in baselines:
        baselines[key] = _gemm_baselines(A, Wt.to(dev), min_ms)
    res["baseline"] = key
    return res


def _gemm_baselines(A, W, min_ms):
    import torch

    M, K = A.shape
    N = W.shape[0]
    b = {}
    rot = n_copies(N * K)
    wts = [W.clone() for _ in range(rot)]
    try:                     # cuBLASLt INT8 (column-major B = W^T view)
        ms, sp = cuda_time(lambda i: torch._int_mm(A, wts[i].t()), rot, min_ms)
        b["int_mm"] = dict(ms=ms, spread=sp, tops=2 * M * N * K / ms / 1e9)
    except RuntimeError as e:
        Ap = torch.zeros((32, K), dtype=torch.int8, device=A.device)   # cuBLASLt wants M > 16
        Ap[:M] = A
        try:
            ms, sp = cuda_time(lambda i: torch._int_mm(Ap, wts[i].t()), rot, min_ms)
            b["int_mm"] = dict(ms=ms, spread=sp, tops=2 * M * N * K / ms / 1e9, note="M padded to 32")
        except RuntimeError:
            b["int_mm"] = dict(error=str(e)[:200])
    a16 = A.half()
    w16 = [w.half() for w in wts[: max(1, rot // 2)]]
    ms, sp = cuda_time(lambda i: torch.matmul(a16, w16[i].t()), len(w16), min_ms)
    b["fp16"] = dict(ms=ms, spread=sp, tops=2 * M * N * K / ms / 1e9)
    return b


def _run_conv(rt, out_dir, c, g, dev, min_ms, baselines):
    import torch

    N, H, W, C, OC, KH, KW, st, pads, dil = c["geom"]
    st, pads, dil = tuple(st), tuple(pads), tuple(dil)
    OH = (H + pads[0] + pads[2] - dil[0] * (KH - 1) - 1) // st[0] + 1
    OW = (W + pads[1] + pads[3] - dil[1] * (KW - 1) - 1) // st[1] + 1
    X = _rand_i8(g, (N, H, W, C)).to(dev)
    Wk = _rand_i8(g, (OC, KH * KW * C)).to(dev)
    bias, mult, shift = (t.to(dev) for t in _epilogue_params(g, OC, KH * KW * C))
    out = torch.full((N, OH, OW, OC), 0x5A, dtype=torch.int8, device=dev)
    f = rt.load(out_dir / c["so"], c)
    wrap = rt.wrap
    args = [wrap(X), wrap(Wk), wrap(bias), wrap(mult), wrap(shift), wrap(out)]
    f(*args)
    torch.cuda.synchronize()
    w4 = Wk.view(OC, KH, KW, C).permute(0, 3, 1, 2).double()
    xp = torch.nn.functional.pad(X.permute(0, 3, 1, 2).double(), (pads[1], pads[3], pads[0], pads[2]))
    cudnn = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False            # exact float64 reference (no FFT/Winograd)
    acc = torch.nn.functional.conv2d(xp, w4, stride=st, dilation=dil).permute(0, 2, 3, 1)
    torch.backends.cudnn.enabled = cudnn
    ref = epilogue_ref(acc.to(torch.int64), bias, mult, shift)
    ok = bool(torch.equal(out, ref))
    M, Kg = N * OH * OW, KH * KW * C
    res = dict(M=M, N=OC, K=Kg, ok=ok, mismatches=int((out != ref).sum()))
    xbytes = X.numel()
    rot = n_copies(xbytes)
    xs = [wrap(X.clone()) for _ in range(rot)]
    ms, spread = cuda_time(lambda i: f(xs[i], args[1], args[2], args[3], args[4], args[5]), rot, min_ms)
    res.update(ms=ms, spread=spread, tops=2 * M * OC * Kg / ms / 1e9)
    key = c["group"]
    if key not in baselines:
        b = {}
        x16 = [X.permute(0, 3, 1, 2).half().contiguous(memory_format=torch.channels_last) for _ in range(min(rot, 4))]
        w16 = w4.half().contiguous(memory_format=torch.channels_last)
        pad_sym = pads[0] == pads[2] and pads[1] == pads[3]
        if pad_sym:
            ms16, sp = cuda_time(lambda i: torch.nn.functional.conv2d(x16[i], w16, stride=st, padding=(pads[0], pads[1]),
                                                                       dilation=dil), len(x16), min_ms)
            b["fp16_conv"] = dict(ms=ms16, spread=sp, tops=2 * M * OC * Kg / ms16 / 1e9)
        gb = _gemm_baselines(torch.zeros((M, Kg), dtype=torch.int8, device=dev).random_(-128, 127), Wk, min_ms)
        b["int_mm_same_gemm"] = gb["int_mm"]          # cuBLASLt on the im2col GEMM, im2col not counted
        baselines[key] = b
    res["baseline"] = key
    return res


def print_table(results, baselines):
    rows = []
    groups = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    hdr = f"{'case':<34} {'ours int8':>18} {'ours w4a8':>18} {'cuBLASLt int8':>18} {'fp16':>18} {'int8/cuBLASLt':>13}  ok"
    print()
    print(hdr)
    print("-" * len(hdr))
    def best(rs, kind):
        c = [r for r in rs if r["kind"] == kind and r.get("ok") and "ms" in r]
        return min(c, key=lambda r: r["ms"]) if c else None

    for grp, rs in groups.items():
        d = best(rs, "dense") or best(rs, "conv2d") or best(rs, "dense_sym")
        w = best(rs, "w4a8")
        b = baselines.get(rs[0].get("baseline", ""), {})
        lt = b.get("int_mm") or b.get("int_mm_same_gemm") or {}
        fp = b.get("fp16") or b.get("fp16_conv") or {}

        def cell(x):
            return f"{x['ms']:8.4f}ms {x['tops']:6.1f}T" if x and "ms" in x else f"{'-':>18}"

        ratio = f"{lt['ms'] / d['ms']:12.2f}x" if d and lt.get("ms") else f"{'-':>13}"
        allok = all(r.get("ok") for r in rs)
        rows.append(f"{grp:<34} {cell(d)} {cell(w)} {cell(lt)} {cell(fp)} {ratio}  {'yes' if allok else 'NO'}")
    print("\n".join(rows))
    n_bad = sum(not r.get("ok") for r in results)
    print(f"\n{len(results)} kernels, {n_bad} failed; TOPS = 2MNK/time; 'ours' = best configuration timed; "
          f"ratio > 1 means ours is faster than cuBLASLt")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", metavar="DIR", help="build and export the kernels into DIR (needs TVM + nvcc)")
    ap.add_argument("--run", metavar="DIR", help="load, check and time the kernels in DIR (needs a GPU + torch)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--sweep", action="store_true", help="also build alternative tile configurations")
    ap.add_argument("--quick", action="store_true", help="a few shapes only (build) / default configs only (run)")
    ap.add_argument("--json", default=None, help="where --run writes its JSON")
    ap.add_argument("--min-ms", type=float, default=100.0, help="minimum time per timing sample")
    a = ap.parse_args(argv)
    if not (a.build or a.run):
        ap.error("give --build DIR and/or --run DIR")
    if a.build:
        build(Path(a.build), a.arch, a.quick, a.sweep)
    if a.run:
        run(Path(a.run), a.quick, a.json, a.min_ms)


if __name__ == "__main__":
    main()
