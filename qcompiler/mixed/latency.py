"""Per-layer latency of every precision choice, from the learned cost model (``costmodel/``).

The INT8 model is lowered as ``qc predict`` lowers it (tuned configs applied, default schedules,
no code generation) and every kernel is predicted by the device's cost model (roofline estimate
without one).  Each conv/dense layer's INT8 latency is the prediction of its kernel (matched by
execution order: the lowering emits one kernel per GEMM/conv node, in node order); the rest of
the kernels and the fitted per-call overhead form the constant part.  So the all-INT8 total here
is ``qc predict``'s total.

Other choices (``variant_ratio``, the one function to replace when the cost model learns the W4A8 /
W8A16 CPU kernels): the INT8 prediction scaled by the ratio of the layer's roofline times at the
target's nominal peaks (``costmodel.features.target_info``):

    t(choice) / t(INT8) = max(C * f_c, B(choice)) / max(C, B(INT8))
    C = 2 MNK / peak,  B = (MK a_bits + NK w_bits + MN out_bits) / 8 / bandwidth

with f_c = 1 for W4A8 (the same int8 dot products after unpacking) and 2 for W8A16 on x86
(``vpdpwssd`` does half the MACs of ``vpdpbusd``).  Memory-bound layers (small M: dense heads,
late small-spatial convs) gain from 4-bit weights, compute-bound ones do not.  Until the W4A8 /
W8A16 CPU kernels are in the cost model's training data this is an estimate (``source`` says
``roofline-ratio``); on CUDA the W4A8 dense kernel is a cost-model feature already.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import CHOICES


@dataclass
class LayerLatency:
    names: list[str]                 # conv/dense node names, graph order
    ms: np.ndarray                   # [layers, choices] predicted ms
    const_ms: float                  # everything else (other kernels + per-call overhead)
    int8_total_ms: float             # = qc predict of the all-INT8 model
    source: str                      # "model" | "roofline" (+ "/roofline-ratio" for non-INT8 choices)

    def total(self, choice) -> float:
        return float(self.const_ms + self.ms[np.arange(len(choice)), np.asarray(choice)].sum())


def _gemm_mnk(ig, n) -> tuple[int, int, int]:
    w = np.asarray(n.attrs["weight"])
    if n.op == "dense":
        shp = ig.shapes[n.inputs[0]]
        return int(np.prod(shp[:-1])), int(w.shape[1]), int(shp[-1])
    out = ig.shapes[n.outputs[0]]
    return int(out[0] * out[2] * out[3]), int(w.shape[0]), int(np.prod(w.shape[1:]))


def variant_ratio(ig, node, choice: str, target: dict) -> float:
    """Predicted latency of ``choice`` over INT8 for one layer (see the module docstring)."""
    from costmodel.features import target_info

    if choice == "w8a8":
        return 1.0
    M, N, K = _gemm_mnk(ig, node)
    t = target_info(target)
    wb, ab = CHOICES[choice]
    ob = 16 if node.attrs["dtype"].endswith("16") else 8
    cf = 2.0 if (ab > 8 and target.get("kind") == "cpu") else 1.0

    def roof(w_bits, a_bits, f):
        comp = f * 2.0 * M * N * K / (t["peak_gops"] * 1e9)
        mem = (M * K * a_bits + N * K * w_bits + M * N * ob) / 8 / (t["bw_gbs"] * 1e9)
        return max(comp, mem) + t["launch_s"]

    return roof(wb, ab, cf) / roof(8, 8, 1.0)


def predict_layers(ig, spec, tune_log=None, cost_model=None) -> LayerLatency:
    """Lower ``ig`` (the all-INT8 integer graph) for ``spec`` and predict every layer's choices."""
    from costmodel.predict import load_for
    from costmodel.whole import graph_kernels, predict_kernels
    from qcompiler.tune.device import describe

    target_desc = describe(spec, probe_gpu=False) if spec.kind == "cuda" else describe(spec)
    model, _why = load_for(target_desc, cost_model)
    if model is not None and not target_desc.get("device"):
        target_desc = {**target_desc, **{k: v for k, v in model.target.items() if k in ("device", "cores")}}
    kernels = graph_kernels(ig, spec, tune_log)
    res = predict_kernels(kernels, target_desc, model)
    nodes = [n for n in ig.nodes if n.op in ("conv", "dense")]
    per_kernel = [layer["predicted_ms"] for layer in res["layers"]]
    gemm_idx = _match_gemm_kernels(kernels, ig, nodes)
    int8 = np.array([per_kernel[i] if i >= 0 else 0.0 for i in gemm_idx])
    names = list(CHOICES)
    ms = np.empty((len(nodes), len(names)))
    for li, n in enumerate(nodes):
        for ci, c in enumerate(names):
            ms[li, ci] = int8[li] * variant_ratio(ig, n, c, target_desc)
    const = float(res["total_ms"] - int8.sum())
    return LayerLatency([n.name for n in nodes], ms, const, float(res["total_ms"]),
                        res["source"] + "/roofline-ratio")


def _match_gemm_kernels(kernels, ig, nodes) -> list[int]:
    """Index of each conv/dense node's kernel: the lowering emits the GEMM kernels in node order;
    a kernel is a GEMM's when its output shape is the node's output (NHWC or NCHW for convs)."""
    out = []
    k = 0
    for n in nodes:
        shp = list(ig.shapes[n.outputs[0]])
        want = [shp, [shp[0], shp[2], shp[3], shp[1]]] if n.op == "conv" else \
            [shp, [int(np.prod(shp[:-1])), shp[-1]]]
        found = None
        for j in range(k, len(kernels)):
            name = kernels[j]["name"]
            if ("conv" in name or "dense" in name or "matmul" in name) and list(kernels[j]["output"][0]) in want:
                found = j
                break
        if found is None:  # no kernel of this shape (fused away?): charge nothing, keep the order
            out.append(-1)
            continue
        out.append(found)
        k = found + 1
    return out
