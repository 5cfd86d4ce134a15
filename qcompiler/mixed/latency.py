"""Per-layer latency of every precision choice, from the learned cost model (``costmodel/``).

The INT8 model is lowered as ``qc predict`` lowers it (tuned configs applied, default schedules,
no code generation) and every kernel is predicted by the device's cost model (roofline estimate
without one).  Each conv/dense layer's INT8 latency is the prediction of its kernel (matched by
execution order: the lowering emits one kernel per GEMM/conv node, in node order); the rest of
the kernels and the fitted per-call overhead form the constant part.  So the all-INT8 total here
is ``qc predict``'s total.

Other choices, with a cost model for the device (:func:`predict_layers`): the model is re-quantized
with every layer at the choice (:func:`uniform_graph`) and lowered, and each layer's W4A8 / W8A16
column is the prediction of its own kernel there (``cpu_vnni_w4`` / ``cpu_vnni_a16`` / ``cpu_avx2_*``
workloads: the kernels ``qc tune --precision mixed`` tunes and the cost model learns), so the ILP's
total is ``qc predict`` of the chosen configuration (``docs/mixed_precision.md`` §4).

Fallback without a model (``source`` ``roofline/roofline-ratio``), ``variant_ratio``: the INT8
prediction scaled by the ratio of the layer's roofline times at the target's nominal peaks
(``costmodel.features.target_info``):

    t(choice) / t(INT8) = max(C * f_c, B(choice)) / max(C, B(INT8))
    C = 2 MNK / peak,  B = (MK a_bits + NK w_bits + MN out_bits) / 8 / bandwidth

with f_c = 1 for W4A8 (the same int8 dot products after unpacking) and 2 for W8A16 on x86
(``vpdpwssd`` does half the MACs of ``vpdpbusd``).  Memory-bound layers (small M: dense heads,
late small-spatial convs) gain from 4-bit weights, compute-bound ones do not.  The same ratio
prices a W8A16 layer whose int16 form has no GEMM backend kernel (depthwise / grouped convs).
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


def uniform_graph(state, choice: str, fuse: bool = True):
    """The integer graph of ``state`` (a ``driver.QuantState`` or a ``sensitivity.Evaluator``) with
    every conv/dense layer at ``choice`` where it can take it (a W8A16 layer whose producer cannot
    emit int16 stays W8A8), weights rounded to nearest (a kernel's speed does not depend on the
    weight values, so GPTQ is not run), epilogues fused as ``qc compile`` fuses them.  Its GEMM
    kernels are the workloads a compile gives each layer at that choice (``qc tune --precision``,
    :func:`predict_layers`)."""
    from dataclasses import replace

    from passes.quantize import quantize

    from .plan import gemm_layers, plan_tuple

    plan = plan_tuple({n.name: choice for n in gemm_layers(state.fg)})
    cfg = replace(state.cfg, plan=plan, rounding="rtn", hessians=None)
    onnx_model = state.onnx_model if hasattr(state, "onnx_model") else state.fr.model
    ig = quantize(state.fg, state.stats, state.nonneg, cfg, onnx_model)
    if fuse:
        from passes.fuse_epilogue import fuse_epilogue

        ig = fuse_epilogue(ig)
    return ig


def variant_ratio(ig, node, choice: str, target: dict) -> float:
    """Predicted latency of ``choice`` over INT8 for one layer (see the module docstring)."""
    from costmodel.features import target_info

    if choice == "w8a8":
        return 1.0
    M, N, K = _gemm_mnk(ig, node)
    t = target_info(target)
    wb, ab = CHOICES[choice]
    ob = 16 if node.attrs["dtype"].endswith("16") else 8
    # W8A16 on CPUs: half the multiply rate
    cf = 2.0 if (ab > 8 and target.get("kind") == "cpu") else 1.0

    def roof(w_bits, a_bits, f, o_bits=ob):
        comp = f * 2.0 * M * N * K / (t["peak_gops"] * 1e9)
        mem = (M * K * a_bits + N * K * w_bits + M * N * o_bits) / 8 / (t["bw_gbs"] * 1e9)
        return max(comp, mem) + t["launch_s"]

    if wb == 16:   # two INT8 GEMMs with int32 outputs, then the int64 combine reading both (lower_w16)
        combine = M * N * (2 * 32 + ob) / 8 / (t["bw_gbs"] * 1e9) + t["launch_s"]
        return (2 * roof(8, ab, cf, 32) + combine) / roof(8, 8, 1.0)
    return roof(wb, ab, cf) / roof(8, 8, 1.0)


def predict_layers(ig, spec, tune_log=None, cost_model=None, src=None, fuse: bool = True) -> LayerLatency:
    """Predict every conv/dense layer of ``ig`` (the all-INT8 integer graph) at every choice for ``spec``.

    With a cost model for the device and ``src`` (what ``ig`` was quantized from: a
    ``driver.QuantState`` or a ``sensitivity.Evaluator``), each choice's column is the model's
    prediction of that layer's own kernel in the uniform graph of the choice (:func:`uniform_graph`:
    the W4A8 / W8A16 kernel workloads a compile gives the layer, e.g. ``cpu_vnni_w4`` /
    ``cpu_vnni_a16``), and the INT8 graph is the one ``qc compile`` lowers (epilogues fused when
    ``fuse``), so ``const_ms + sum of the chosen columns`` is ``qc predict`` of the chosen
    configuration exactly for W8A8 / W4A8 mixes (``tests/test_mixed_latency.py``).  A W8A16 layer
    also widens its producer's output to int16; that kernel's change is not charged (it stays in
    the constant); a W8A16 layer without a GEMM backend kernel (depthwise / grouped conv) is
    estimated by the roofline ratio.  Without a model (or without ``src``) the non-INT8 columns are
    the INT8 prediction times :func:`variant_ratio` (``source`` ends in ``/roofline-ratio``)."""
    from costmodel.data import kernel_tags
    from costmodel.predict import load_for
    from costmodel.whole import graph_kernels, predict_kernels
    from qcompiler.tune.device import describe

    target_desc = describe(spec, probe_gpu=False) if spec.kind == "cuda" else describe(spec)
    model, _why = load_for(target_desc, cost_model)
    if model is not None and not target_desc.get("device"):
        target_desc = {**target_desc, **{k: v for k, v in model.target.items() if k in ("device", "cores")}}
    direct = model is not None and src is not None
    nodes = [n for n in ig.nodes if n.op in ("conv", "dense")]
    names = list(CHOICES)

    def gemm_ms(g):
        kernels = graph_kernels(g, spec, tune_log)
        res = predict_kernels(kernels, target_desc, model)
        per_kernel = [layer["predicted_ms"] for layer in res["layers"]]
        g_nodes = {n.name: n for n in g.nodes if n.op in ("conv", "dense")}
        order = [g_nodes[n.name] for n in nodes]
        idx = _match_gemm_kernels(kernels, g, order)
        ms = np.array([per_kernel[i] if i >= 0 else 0.0 for i in idx])
        dts = [g.dtypes[n.inputs[0]] for n in order]
        # a register-tiled GEMM kernel (tuning workload attached): what the tuner and the model learn
        tuned = [i >= 0 and kernel_tags(kernels[i]["func"], kernels[i]["text"])[0] is not None for i in idx]
        return ms, float(res["total_ms"]), res["source"], (dts, tuned)

    base = uniform_graph(src, "w8a8", fuse) if src is not None else ig
    int8, total, source, dts8 = gemm_ms(base)
    ms = np.empty((len(nodes), len(names)))
    for ci, c in enumerate(names):
        if c == "w8a8":
            ms[:, ci] = int8
            continue
        if direct and CHOICES[c][0] <= 8:   # a W16A8 layer runs two INT8 kernels: the roofline ratio
            var, _, _, (dts, tuned) = gemm_ms(uniform_graph(src, c, fuse))
            for li, n in enumerate(nodes):
                # W8A16 is predicted directly where it runs a GEMM backend's kernel (cpu_*_a16); a layer
                # that cannot take int16, or whose int16 form is a generic kernel (depthwise / grouped
                # convs: no tuning records of it), gets the INT8 prediction x the roofline ratio
                took = c != "w8a16" or (dts[li] == "int16" and tuned[li])
                ms[li, ci] = var[li] if took else int8[li] * variant_ratio(ig, n, c, target_desc)
        else:
            for li, n in enumerate(nodes):
                ms[li, ci] = int8[li] * variant_ratio(ig, n, c, target_desc)
    const = float(total - int8.sum())
    return LayerLatency([n.name for n in nodes], ms, const, total,
                        source if direct else source + "/roofline-ratio")


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
