"""``qc bench model.so --profile``: where a library's time goes, kernel by kernel.

Every packed call of the model's ``main`` is timed inside the running model (the Relax VM's
instrument hook, ``costmodel/profile.py`` ``time_calls``) and, for the kernels, alone on the
model's own arguments just before the model calls them (``time_isolated_in_run``: ``time_evaluator``,
no hook in the way).  The table lists each call in
execution order with

  kernel     the PrimFunc (or VM builtin) name
  category   gemm/conv | depthwise | requant/elementwise | layout | nonlinear | boundary | vm-builtin
  layer      for GEMM-like kernels, the integer graph's conv / dense / matmul layer they run (the
             k-th GEMM call of the run is the k-th layer of model.json ``layers``: the lowering
             emits them in graph order and the VM runs them in that order)
  ms         median time of the call inside the running model less the hook's cost, where that is
             at least ``IN_MODEL_MIN_S`` (the hook's cost is then a few percent of it); the call
             timed alone on the model's arguments for shorter calls, where the hook would dominate
             (measured 2026-12-06, open-nsfw on a 2-core Zen 5: conv + residual-add kernels ran
             1.7-2.9x longer timed alone than inside the model -- e.g. 71 vs 40 us for a kernel
             whose code is identical to one timed at 41 us both ways -- so the in-model time is the
             one the model pays; ``isolated_ms`` keeps the other)
  GOPS       2 x MACs / time for GEMM-like calls (MACs from the layer's shapes)
  bytes      bytes the call reads and writes (its arguments' sizes) for the others

VM builtins (allocations, shape checks) are shorter than the hook's own cost: where the calls'
times would add up to more than the measured latency, the builtins' times are scaled down to what
the kernels leave (``builtin_scale``; a recurrence run as a loop makes ~50 builtin calls per step).

The time by category: ``VM call overhead`` is the measured whole-model median (``bench``)
minus the sum of the calls' times: the interpreter, argument checks and thread wake-ups between
kernels; so the categories add up to the measured latency by construction, and the table says
how large that remainder is (negative when the calls timed alone take longer than inside the
model -- a warm cache in the model run, or the timer's resolution on a model of a few
microseconds).
"""

from __future__ import annotations

import statistics

import numpy as np

IN_MODEL_MIN_S = 20e-6
CATEGORIES = ("gemm/conv", "depthwise", "requant/elementwise", "layout", "nonlinear", "boundary", "vm-builtin",
              "VM call overhead")
_LAYOUT = {"reshape", "transpose", "concatenate", "concat", "split", "strided", "slice", "pad", "take", "copy",
           "squeeze", "expand", "dims", "layout", "transform", "qc"}
_NONLINEAR = ("softmax", "layernorm", "layer_norm", "gelu", "exp", "isqrt", "sqrt", "lut", "table", "argmax",
              "topk", "sort")


def categorize(name: str) -> str:
    """The category of a kernel from its name (TVM's fused names list the ops they fuse)."""
    n = name.lower()
    if n.startswith("vm.builtin") or n.startswith("vm."):
        return "vm-builtin"
    if n.startswith("qc_quantize") or n.startswith("qc_dequantize"):
        return "boundary"
    if "dwconv" in n or "depthwise" in n:
        return "depthwise"
    if any(k in n for k in ("conv2d", "conv1d", "matmul", "dense")) or (
            not n.startswith("fused_") and any(k in n for k in ("vnni", "avx2", "_mma", "gemm", "conv"))):
        return "gemm/conv"
    if any(k in n for k in _NONLINEAR):
        return "nonlinear"
    tokens = {t.rstrip("0123456789") for t in n.split("_")} - {"fused", ""}
    if tokens and tokens <= _LAYOUT:
        return "layout"
    return "requant/elementwise"


def _nbytes(a) -> int:
    try:
        shape = [int(d) for d in a.shape]
        bits = a.dtype.bits * a.dtype.lanes if hasattr(a.dtype, "bits") else np.dtype(str(a.dtype)).itemsize * 8
        return int(np.prod(shape)) * bits // 8
    except Exception:  # noqa: BLE001 - a scalar / shape argument of a builtin
        return 0


def _macs(layer: dict) -> int:
    """Multiply-accumulates of one conv / dense / matmul layer of model.json ``layers``."""
    out = int(np.prod(layer["out_shape"]))
    w = layer.get("weight_shape")
    if layer["op"] == "conv" and w:
        return out * int(np.prod(w[1:]))          # each output: C/g * KH * KW MACs
    if layer["op"] == "dense" and w:
        return out * int(w[0])                     # weights [K, N]: each output K MACs
    k = layer["in_shape"][-1]                      # matmul of two activations: the contracted dim
    return out * int(k)


def profile(lib, feeds: dict | None = None, runs: int = 20, bench_repeats: int = 30) -> dict:
    """The per-call table and the time by category of ``lib`` (a ``qcompiler.runtime.Library``)."""
    from costmodel.profile import time_calls, time_isolated_in_run

    feeds = feeds or lib.example_inputs()
    bench = lib.bench(feeds, repeats=bench_repeats)
    calls = time_calls(lib, runs=runs, feeds=feeds)
    hook = _hook_cost(lib, feeds)
    isolated = time_isolated_in_run(lib, feeds, want=lambda name: categorize(name) != "vm-builtin", repeats=5,
                                    min_repeat_ms=2)
    gemm_layers = list(lib.meta.get("layers", []))
    rows, k_gemm = [], 0
    for i, (name, ts, args) in enumerate(calls):
        cat = categorize(name)
        in_model = statistics.median(ts) if ts else 0.0
        r = isolated.get(i)
        t = statistics.median(r) if r else None
        iso, how = t, "isolated"
        if t is None or in_model - hook >= IN_MODEL_MIN_S:
            t, how = max(in_model - hook, 0.0), "in-model"
        row = {"kernel": name, "category": cat, "ms": t * 1e3, "in_model_ms": in_model * 1e3, "timing": how,
               "isolated_ms": iso * 1e3 if iso is not None else None, "bytes": int(sum(_nbytes(a) for a in args))}
        if cat in ("gemm/conv", "depthwise") and k_gemm < len(gemm_layers):
            layer = gemm_layers[k_gemm]
            k_gemm += 1
            macs = _macs(layer)
            row.update({"layer": layer["name"], "op": layer["op"], "macs": macs,
                        "gops": 2 * macs / t / 1e9 if t > 0 else None})
        rows.append(row)
    total_ms = float(bench["median_ms"])
    scale = _scale_builtins(rows, total_ms)
    kernel_ms = sum(r["ms"] for r in rows)
    by_cat = {c: 0.0 for c in CATEGORIES}
    for r in rows:
        by_cat[r["category"]] += r["ms"]
    by_cat["VM call overhead"] = total_ms - kernel_ms
    for r in rows:
        r["share"] = r["ms"] / total_ms if total_ms > 0 else None
    return {"library": lib.path, "total_ms": total_ms, "bench": bench, "kernel_sum_ms": kernel_ms,
            "calls": len(rows), "hook_cost_us": hook * 1e6, "builtin_scale": scale,
            "by_category_ms": by_cat,
            "gemm_layers_matched": k_gemm, "gemm_layers": len(gemm_layers), "rows": rows}


def _scale_builtins(rows: list, total_ms: float) -> float:
    """Scale the VM builtins' in-model times so that the calls add up to no more than the measured
    latency; returns the factor (1.0: unchanged).  A builtin (an allocation, a shape check) takes a
    fraction of a microsecond, less than the hook's own cost and its spread, so its in-model time is
    mostly the hook's: a model of many such calls (a recurrence run as a loop: 67k calls, 5x the
    measured latency) would show a large negative VM call overhead.  The kernels' times are kept; the
    builtins share what the measured latency leaves, in proportion to their measured times."""
    builtin = [r for r in rows if r["category"] == "vm-builtin" and r["timing"] == "in-model"]
    b_ms = sum(r["ms"] for r in builtin)
    rest = sum(r["ms"] for r in rows) - b_ms
    if b_ms <= 0 or rest + b_ms <= total_ms:
        return 1.0
    f = max(total_ms - rest, 0.0) / b_ms
    for r in builtin:
        r["ms"] *= f
        r["timing"] = "in-model, scaled"
    return f


def _hook_cost(lib, feeds) -> float:
    """Seconds the instrument hook adds per call: (model time with the hook - without) / calls."""
    from costmodel.profile import time_calls

    calls = time_calls(lib, runs=5, feeds=feeds)
    with_hook = sum(statistics.median(ts) for _, ts, _ in calls if ts)
    plain = float(lib.bench(feeds, repeats=10)["median_ms"]) * 1e-3
    return max((with_hook - plain) / max(len(calls), 1), 0.0) if with_hook > plain else 0.0


def format_table(p: dict, top: int = 40) -> str:
    lines = [f"{p['library']}: {p['total_ms']:.3f} ms median ({p['calls']} calls; kernels {p['kernel_sum_ms']:.3f} ms, "
             f"VM call overhead {p['by_category_ms']['VM call overhead']:.3f} ms)"
             + (f"; VM builtins' times scaled by {p['builtin_scale']:.2f} to fit the measured latency"
                if p.get("builtin_scale", 1.0) < 1.0 else ""), "",
             f"{'category':22s} {'ms':>9s} {'share':>7s}"]
    for c, v in sorted(p["by_category_ms"].items(), key=lambda kv: -kv[1]):
        if v:
            lines.append(f"{c:22s} {v:9.3f} {v / p['total_ms']:7.1%}")
    lines += ["", f"{'#':>4s} {'kernel':44s} {'category':20s} {'ms':>8s} {'share':>6s} {'GOPS':>7s} {'MB':>7s}  layer"]
    order = sorted(range(len(p["rows"])), key=lambda i: -p["rows"][i]["ms"])[:top]
    for i in sorted(order):
        r = p["rows"][i]
        g = f"{r['gops']:7.1f}" if r.get("gops") else "      -"
        lines.append(f"{i:4d} {r['kernel'][:44]:44s} {r['category']:20s} {r['ms']:8.4f} {r['share']:6.1%} {g} "
                     f"{r['bytes'] / 1e6:7.3f}  {r.get('layer', '')}")
    if len(p["rows"]) > top:
        lines.append(f"     ({len(p['rows']) - top} shorter calls not shown; --json lists all)")
    return "\n".join(lines)
