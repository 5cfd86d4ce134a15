"""NumPy reference executor of the integer graph: the semantics of every integer op, bit-exact.

Tensors are NCHW as in ONNX.  Arithmetic is done in int64 (GEMM/conv sums in float64, which is
exact: every product of two 8/16-bit integers and every sum of up to 2^20 of them is far below
2^53) and each op's result is cast to the op's declared dtype after clamping, exactly as the
lowered TVM code does.  The TVM library must equal this executor element for element.

Dyadic step (DESIGN.md §2):  rq(x; mult, shift, add) = (x * mult + add + 2^(shift-1)) >> shift.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .graph import Graph, Node
from .qtypes import requant_ref

OPS: dict[str, Callable] = {}


def op(name):
    def deco(f):
        OPS[name] = f
        return f
    return deco


def _clip(t: np.ndarray, a: dict) -> np.ndarray:
    return np.clip(t, a["lo"], a["hi"]).astype(a["dtype"])


def _rq(x, a, mult_key="mult", shift_key="shift"):
    return requant_ref(x, a[mult_key], a[shift_key], a.get("add"))


# ---- boundary ----------------------------------------------------------------------------
@op("quantize")
def quantize(x, a):
    """q = clip(round_half_even(float32(x) * inv_scale), lo, hi)."""
    v = np.round(x.astype(np.float32) * np.float32(a["inv_scale"]))
    return np.clip(v, a["lo"], a["hi"]).astype(a["dtype"])


@op("dequantize")
def dequantize(x, a):
    """y = float32(q) * scale."""
    return x.astype(np.float32) * np.float32(a["scale"])


# ---- GEMM-like ----------------------------------------------------------------------------
def conv_acc(x: np.ndarray, w: np.ndarray, strides, pads, dilations, group) -> np.ndarray:
    """int64 accumulators of a 2-D convolution (NCHW, weight [OC, C/g, KH, KW]), zero padding."""
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


@op("conv")
def conv(x, a):
    acc = conv_acc(x, a["weight"], a["strides"], a["pads"], a["dilations"], a["group"])
    acc = acc + a["bias"].astype(np.int64)[None, :, None, None]
    m, s = a["mult"][None, :, None, None], a["shift"][None, :, None, None]
    return _clip(requant_ref(acc, m, s), a)


@op("dense")
def dense(x, a):
    acc = (x.astype(np.float64) @ a["weight"].astype(np.float64)).astype(np.int64) + a["bias"].astype(np.int64)
    return _clip(requant_ref(acc, a["mult"], a["shift"]), a)


@op("matmul")
def matmul(x, y, a):
    acc = np.matmul(x.astype(np.float64), y.astype(np.float64)).astype(np.int64)
    return _clip(requant_ref(acc, a["mult"], a["shift"]), a)


# ---- elementwise --------------------------------------------------------------------------
@op("requant")
def requant(x, a):
    return _clip(_rq(x, a), a)


@op("add")
def add(x, y, a):
    """clip((x * mult_a + y * mult_b + 2^(shift-1)) >> shift)."""
    s = a["shift"].astype(np.int64)
    t = x.astype(np.int64) * a["mult_a"] + y.astype(np.int64) * a["mult_b"] + (np.int64(1) << (s - 1))
    return _clip(t >> s, a)


@op("mul")
def mul(x, y, a):
    return _clip(requant_ref(x.astype(np.int64) * y.astype(np.int64), a["mult"], a["shift"]), a)


@op("clip")
def clip(x, a):
    return np.clip(x, a["lo"], a["hi"]).astype(x.dtype)


@op("prelu")
def prelu(x, a):
    """rq(x; mult_pos) where x >= 0 else rq(x; mult_neg), shared shift."""
    xi = x.astype(np.int64)
    m = np.where(xi >= 0, a["mult_pos"], a["mult_neg"])
    return _clip(requant_ref(xi, m, a["shift"]), a)


@op("lut")
def lut(x, a):
    """y = table[x - offset] (any unary function tabulated at compile time)."""
    return a["table"][x.astype(np.int64) + a["offset"]].astype(a["dtype"])


@op("cast")
def cast(x, a):
    return x.astype(a["dtype"])


@op("int_cast")
def int_cast(x, a):
    """Integer data used as numbers (scale 1): clip to the calibrated range, narrow the type."""
    return np.clip(x.astype(np.int64), a["lo"], a["hi"]).astype(a["dtype"])


@op("maskadd")
def maskadd(x, m, a):
    """clip(x + clip(m, +-2^20) * A + B) (additive attention mask, passes/quantize_transformer.py)."""
    mm = np.clip(m.astype(np.int64), -(2**20), 2**20)
    t = x.astype(np.int64) + mm * np.int64(a["A"]) + np.int64(a["B"])
    return np.clip(t, a["lo"], a["hi"]).astype(a["dtype"])


@op("embedding")
def embedding(ids, a):
    """table[clip(ids, 0, V-1)] (the runtime rejects out-of-range ids before the library runs)."""
    t = a["table"]
    return t[np.clip(ids.astype(np.int64), 0, t.shape[0] - 1)]


@op("div")
def div(x, d, a):
    """Integer division by a positive activation, rounding half up (passes/quantize_transformer.py)."""
    sh = int(a["shift"])
    t = x.astype(np.int64) * np.int64(a["mult"])
    if sh > 31:
        s1 = sh - 31
        t = (t + (np.int64(1) << (s1 - 1))) >> s1
    D = np.maximum(d.astype(np.int64), 1) << min(sh, 31)
    return np.clip((t + (D >> 1)) // D, a["lo"], a["hi"]).astype(a["dtype"])


# ---- pooling / reductions ------------------------------------------------------------------
def _windows(x, kernel, strides, pads, dilations, fill):
    n, c, h, w = x.shape
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilations
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]


@op("maxpool")
def maxpool(x, a):
    fill = np.iinfo(x.dtype).min
    out = None
    for win in _windows(x, a["kernel"], a["strides"], a["pads"], a["dilations"], fill):
        out = win.copy() if out is None else np.maximum(out, win)
    return out


@op("sumpool")
def sumpool(x, a):
    out = None
    for win in _windows(x.astype(np.int64), a["kernel"], a["strides"], a["pads"], (1, 1), 0):
        out = win.copy() if out is None else out + win
    return out.astype(np.int32)


@op("reduce_sum")
def reduce_sum(x, a):
    return np.sum(x.astype(np.int64), axis=tuple(a["axes"]), keepdims=a["keepdims"]).astype(np.int32)


@op("reduce_max")
def reduce_max(x, a):
    return np.max(x, axis=tuple(a["axes"]), keepdims=a["keepdims"])


@op("softmax")
def softmax(x, a):
    """Integer softmax (passes/quantize_softmax.py gives the math), step for step in int64."""
    ax = a["axis"]
    xi = x.astype(np.int64)
    diff = xi - xi.max(axis=ax, keepdims=True)
    d = diff << a["u"] if a["u"] >= 0 else diff >> -a["u"]
    if a["variant"] == "iexp":
        z = (-d) // a["q_ln2"]
        p = d + z * a["q_ln2"]
        e = ((p + a["q_b"]) * (p + a["q_b"]) + a["q_c"]) >> np.minimum(z, 31)
    else:
        v = d + (d >> 1) - (d >> 4)
        z = (-v) // a["q_1"]
        r = v + z * a["q_1"]
        e = (((r >> 1) + a["q_1"]) << a["N"]) >> np.minimum(z, 62)  # 2^-z decay, 0 once z >= 31
    s = e.sum(axis=ax, keepdims=True)
    k = (np.int64(1) << a["R"]) // s
    return np.clip((e * k) >> (a["R"] - a["ob"]), a["lo"], a["hi"]).astype(a["dtype"])


# ---- data movement ------------------------------------------------------------------------
@op("reshape")
def reshape(x, a):
    return x.reshape(a["shape"])


@op("transpose")
def transpose(x, a):
    return np.transpose(x, a["perm"])


@op("concat")
def concat(*xs):
    *xs, a = xs
    return np.concatenate(xs, axis=a["axis"])


@op("slice")
def slice_(x, a):
    idx = [slice(None)] * x.ndim
    for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
        idx[ax] = slice(st, en, sp)
    return x[tuple(idx)]


@op("gather")
def gather(x, a):
    return np.take(x, a["indices"], axis=a["axis"])


@op("pad")
def pad(x, a):
    p = a["pads"]
    r = x.ndim
    return np.pad(x, [(p[i], p[i + r]) for i in range(r)], constant_values=a["value"])


# ---- execution ----------------------------------------------------------------------------
def run_node(node: Node, args: list[np.ndarray]) -> np.ndarray:
    f = OPS.get(node.op)
    if f is None:
        raise KeyError(f"reference: no integer op '{node.op}' (node {node.name})")
    return f(*args, node.attrs)


def execute(graph: Graph, feeds: dict[str, np.ndarray], keep: bool = False) -> dict[str, np.ndarray]:
    """Run the integer graph; returns the graph outputs (all tensors when ``keep``)."""
    env: dict[str, np.ndarray] = dict(graph.consts)
    env.update(feeds)
    consumers = graph.consumers()
    remaining = {k: len(v) for k, v in consumers.items()}
    outs = set(graph.outputs)
    for node in graph.nodes:
        y = run_node(node, [env[i] for i in node.inputs])
        env[node.outputs[0]] = y
        if not keep:
            for i in node.inputs:
                remaining[i] -= 1
                if remaining[i] == 0 and i not in outs and i not in graph.consts:
                    env.pop(i, None)
    return env if keep else {o: env[o] for o in graph.outputs}


from . import ref_nonlinear  # noqa: E402,F401  (registers the transformer nonlinearities)
