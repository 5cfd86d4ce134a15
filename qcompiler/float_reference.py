"""NumPy float64 executor of the canonical float graph (after the float passes).

It lets every float pass be checked against onnxruntime on the original model: a pass is correct
when this executor on the rewritten graph matches onnxruntime on the ONNX file (allclose).
Unary functions are evaluated through onnxruntime itself, as the quantizer's tables are.
"""

from __future__ import annotations

import math

import numpy as np

from . import intops
from .intops.intdata import INT_OPS, IntArithOp, is_int_data
from .intops.pool import windows
from .graph import Graph, Node


def _act(y, n):
    a = n.attrs.get("act")
    return np.clip(y, a[0], a[1]) if a is not None else y


def _conv(x, n, g: Graph):
    W = g.consts[n.inputs[1]].astype(np.float64)
    b = g.consts[n.inputs[2]].astype(np.float64) if len(n.inputs) > 2 and n.inputs[2] else None
    nd = W.ndim - 2
    from .intops.gemm import _conv_pads

    k = list(W.shape[2:])
    s = list(n.attrs.get("strides", [1] * nd))
    d = list(n.attrs.get("dilations", [1] * nd))
    pads = _conv_pads(g, n, k, s, d)
    if nd == 1:
        x, W = x[:, :, None, :], W[:, :, None, :]
        k, s, d, pads = [1] + k, [1] + s, [1] + d, [0, pads[0], 0, pads[1]]
    y = _conv2d_f(x, W, s, pads, d, int(n.attrs.get("group", 1)))
    if b is not None:
        y = y + b[None, :, None, None]
    return y[:, :, 0, :] if nd == 1 else y


def _conv2d_f(x, w, strides, pads, dilations, group):
    n, c, h, wd = x.shape
    oc, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = np.empty((n, oc, oh, ow))
    ocg = oc // group
    for gi in range(group):
        xs = xp[:, gi * cg:(gi + 1) * cg]
        cols = np.empty((n, cg, kh, kw, oh, ow))
        for i in range(kh):
            for j in range(kw):
                cols[:, :, i, j] = xs[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
        wg = w[gi * ocg:(gi + 1) * ocg].reshape(ocg, -1)
        out[:, gi * ocg:(gi + 1) * ocg] = np.einsum("ok,nkp->nop", wg, cols.reshape(n, -1, oh * ow)).reshape(n, ocg, oh, ow)
    return out


def run_node(n: Node, g: Graph, env: dict) -> np.ndarray:
    x = [env[i] if i in env else g.consts.get(i) for i in n.inputs]
    a = n.attrs
    op = n.op
    if is_int_data(g, n):  # integer arithmetic is exact: the integer op is its own float semantics
        a = {"mode": INT_OPS[op], "dtype": g.dtypes[n.outputs[0]], "fmod": int(a.get("fmod", 0))}
        return IntArithOp.reference(*[np.asarray(v) for v in x], a)
    if op in intops.FLOAT_REFS:
        return intops.FLOAT_REFS[op](x, n)
    if op == "Conv":
        return _act(_conv(x[0], n, g), n)
    if op == "Dense":
        y = x[0] @ a["weight"].astype(np.float64)
        if a.get("bias") is not None:
            y = y + a["bias"]
        return _act(y, n)
    if op == "MatMul":
        return _act(np.matmul(x[0], x[1]) * float(a.get("alpha", 1.0)), n)
    if op == "Cast":
        return np.asarray(x[0], np.float64)
    if op == "MaskAdd":
        return x[0] + (a["a"] * np.asarray(x[1], np.float64) + a["b"])
    if op == "Embedding":
        return a["table"].astype(np.float64)[np.asarray(x[0], np.int64)]
    if op == "Div":
        return _act(x[0] / x[1], n)
    if op == "Add":
        return _act(x[0] + x[1], n)
    if op == "Mul":
        return _act(x[0] * x[1], n)
    if op == "Affine":
        return _act(x[0] * a["scale"] + a["offset"], n)
    if op == "Clip":
        return np.clip(x[0], a["min"], a["max"])
    if op == "PRelu":
        slope = x[1].astype(np.float64)
        slope = slope.reshape((1,) * (x[0].ndim - slope.ndim) + slope.shape)
        return _act(np.where(x[0] >= 0, x[0], x[0] * slope), n)
    if op == "HardSigmoid":
        return _act(np.clip(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1), n)
    if op == "HardSwish":
        return _act(x[0] * np.clip(a.get("alpha", 1 / 6) * x[0] + a.get("beta", 0.5), 0, 1), n)
    if op == "MaxPool":
        return _maxpool_f(x[0], a)
    if op == "AveragePool":
        s = None
        for win in windows(x[0], a["kernel"], a["strides"], a["pads"], (1, 1), 0.0):
            s = win.copy() if s is None else s + win
        return _act(s / a["count"][None, None], n)
    if op in ("ReduceMean", "ReduceSum", "ReduceMax"):
        f = {"ReduceMean": np.mean, "ReduceSum": np.sum, "ReduceMax": np.max}[op]
        return _act(f(x[0], axis=tuple(a["axes"]), keepdims=bool(a["keepdims"])), n)
    if op == "Softmax":
        z = x[0] - x[0].max(axis=a["axis"], keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=a["axis"], keepdims=True)
    if op == "LayerNorm":  # over the last axis (passes/fuse_nonlinear.py)
        d = x[0] - x[0].mean(axis=-1, keepdims=True)
        y = d / np.sqrt((d * d).mean(axis=-1, keepdims=True) + a["epsilon"])
        return _act(y * a["gamma"] + a["beta"], n)
    if op == "Gelu":
        if a.get("approximate", "none") == "tanh":
            return _act(0.5 * x[0] * (1 + np.tanh(np.sqrt(2 / np.pi) * (x[0] + 0.044715 * x[0] ** 3))), n)
        return _act(0.5 * x[0] * (1 + _erf(x[0] / np.sqrt(2))), n)
    if op == "Pad":
        p = a["pads"]
        r = x[0].ndim
        return np.pad(x[0], [(p[i], p[i + r]) for i in range(r)], constant_values=a["value"])
    if op in ("Reshape", "Transpose", "Slice", "Gather", "Concat"):
        f = intops.get(op.lower()).reference
        aa = dict(a)
        if op == "Reshape":
            aa["shape"] = tuple(a["shape"])
        return f(*x, aa)
    if op == "BatchNormalization":
        gamma, beta, mean, var = (v.astype(np.float64) for v in x[1:5])
        sh = (1, -1) + (1,) * (x[0].ndim - 2)
        return (x[0] - mean.reshape(sh)) / np.sqrt(var.reshape(sh) + a.get("epsilon", 1e-5)) * gamma.reshape(sh) + beta.reshape(sh)
    from .intops.elementwise import UNARY, _eval_unary

    if op in UNARY:
        return _act(_eval_unary(n, x[0], g.consts), n)
    raise KeyError(f"float reference: no op {op}")


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _maxpool_f(x, a):
    out = None
    for win in windows(x, a["kernel"], a["strides"], a["pads"], a.get("dilations", (1, 1)), -np.inf):
        out = win.copy() if out is None else np.maximum(out, win)
    return out


def execute(g: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    env = {k: np.asarray(v, dtype=np.float64) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
           for k, v in feeds.items()}
    for n in g.nodes:
        y = run_node(n, g, env)
        for o, v in zip(n.outputs, y if isinstance(y, tuple) else (y,)):  # multi-output ops return a tuple
            if o:
                env[o] = v
    return {o: env[o] if o in env else np.asarray(g.consts[o]) for o in g.outputs}  # (an output folded to a constant)
