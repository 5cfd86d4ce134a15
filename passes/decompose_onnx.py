"""Rewrite ONNX ops that have an exact decomposition into ops the integer pipeline already has.

Runs on the ONNX model in the frontend, before calibration (like ``unroll_recurrent.py``), so every
tensor of the decomposition is calibrated by name.  Every rewrite is exact in float:

  InstanceNormalization(x; scale, B, eps)   x [N, C, *S] -> Reshape [N, C, prod S] -> LayerNorm over
      the last axis written out (ReduceMean, Sub, Mul, ReduceMean, Add eps, Sqrt, Div: the form
      ``fuse_nonlinear`` fuses into the integer layernorm) -> Reshape back -> Mul scale -> Add B
      (per channel: one requantization)
  GroupNormalization(x; scale, bias, groups, eps)   the same over [N, G, C/G * prod S]
  BatchNormalization / LpNormalization are not here (BN folds into convs or becomes an Affine).
  ReduceSumSquare(x) = ReduceSum(x * x);  ReduceL2(x) = Sqrt(ReduceSum(x * x));
  ReduceL1(x) = ReduceSum(Abs(x));  ReduceMin(x) = -ReduceMax(-x);
  ReduceLogSumExp(x) = Log(ReduceSum(Exp(x)))  (the tables' range is the calibrated one)
  STFT(x [B, N(, 1)]; frame_step, window w [L], frame_length L)  a strided 1-D Conv whose 2 * bins
      output channels are the windowed DFT basis: Re_k = sum_n x[t*step + n] w[n] cos(2 pi k n / L),
      Im_k = -sum_n x[t*step + n] w[n] sin(2 pi k n / L), k < L/2 + 1 (onesided) or L; the output
      [B, bins, frames] pairs are transposed to ONNX's [B, frames, bins, 2].  Constant frame_step,
      window and frame_length; real signals only.
  DFT(x [..., N, 1]; dft_length L, axis, onesided)  a MatMul by the constant [N, 2 * bins] basis
      (cos, -sin; rows past L zero, a signal shorter than L zero-padded: the rows it has) along the
      axis moved last, the [..., 2, bins] pairs transposed to ONNX's [..., bins, 2] and the axis put
      back (PyTorch's torch.stft of framed audio exports as this).  Real signals, forward only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qcompiler.errors import UnsupportedOpError

from .onnx_rewrite import NodeBuilder, initializer_value, replace_nodes

REDUCE_OPS = ("ReduceSumSquare", "ReduceL2", "ReduceL1", "ReduceMin", "ReduceLogSumExp")
NORM_OPS = ("InstanceNormalization", "GroupNormalization")
SIGNAL_OPS = ("STFT", "DFT")


class _B(NodeBuilder):
    def __init__(self, node: onnx.NodeProto, k: int, opset: int):
        super().__init__(node, k)
        self.opset = opset

    def reduce(self, op_type, x, axes, keepdims, what, out=None):
        """A Reduce* node in the form of the model's opset (axes an attribute before 18, an input from 18)."""
        if self.opset >= 18 or (op_type == "ReduceSum" and self.opset >= 13):
            return self.op(op_type, [x, self.const("axes", np.asarray(axes, np.int64))], what, out, keepdims=keepdims)
        return self.op(op_type, [x], what, out, axes=list(axes), keepdims=keepdims)


def _shape(shapes, name):
    s = shapes.get(name)
    if s is None:
        raise ValueError(name)
    return s


def _norm(b: _B, model, n, shapes) -> None:
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    x, out = n.input[0], n.output[0]
    shp = _shape(shapes, x)
    N, C = shp[0], shp[1]
    G = int(a.get("num_groups", C)) if n.op_type == "GroupNormalization" else C
    scale, bias = initializer_value(model, n.input[1]), initializer_value(model, n.input[2])
    if scale is None or bias is None or C % G:
        raise UnsupportedOpError([(n.op_type, b.prefix, "scale and bias must be constants, C a multiple of groups")])
    eps = float(a.get("epsilon", 1e-5))
    dt = scale.dtype
    r = b.op("Reshape", [x, b.const("shape", np.array([N, G, -1], np.int64))], "rows")
    mu = b.reduce("ReduceMean", r, [-1], 1, "mean")
    d = b.op("Sub", [r, mu], "d")
    var = b.reduce("ReduceMean", b.op("Mul", [d, d], "sq"), [-1], 1, "var")
    sd = b.op("Sqrt", [b.op("Add", [var, b.const("eps", np.asarray(eps, dt))], "ve")], "sd")
    y = b.op("Div", [d, sd], "norm")
    y = b.op("Reshape", [y, b.const("shape", np.asarray(shp, np.int64))], "back")
    if scale.size != C:  # GroupNormalization-18 took per-group scale and bias
        scale, bias = np.repeat(scale.reshape(-1), C // scale.size), np.repeat(bias.reshape(-1), C // bias.size)
    cshape = (C,) + (1,) * (len(shp) - 2)
    y = b.op("Mul", [y, b.const("scale", scale.reshape(cshape).astype(dt))], "scaled")
    b.op("Add", [y, b.const("bias", bias.reshape(cshape).astype(dt))], "out", out=out)


def _reduce(b: _B, model, n, shapes) -> None:
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    x, out = n.input[0], n.output[0]
    rank = len(_shape(shapes, x))
    axes = a.get("axes")
    if axes is None and len(n.input) > 1 and n.input[1]:
        axes = initializer_value(model, n.input[1])
        if axes is None:
            raise UnsupportedOpError([(n.op_type, b.prefix, "axes must be a constant")])
    if axes is None or len(axes) == 0:
        if a.get("noop_with_empty_axes", 0):
            b.op("Identity", [x], "id", out=out)
            return
        axes = list(range(rank))
    axes = [int(v) for v in np.asarray(axes).reshape(-1)]
    keep = int(a.get("keepdims", 1))
    op = n.op_type
    if op in ("ReduceSumSquare", "ReduceL2"):
        s = b.reduce("ReduceSum", b.op("Mul", [x, x], "sq"), axes, keep, "sum",
                     out=out if op == "ReduceSumSquare" else None)
        if op == "ReduceL2":
            b.op("Sqrt", [s], "l2", out=out)
    elif op == "ReduceL1":
        b.reduce("ReduceSum", b.op("Abs", [x], "abs"), axes, keep, "sum", out=out)
    elif op == "ReduceMin":
        m = b.reduce("ReduceMax", b.op("Neg", [x], "neg"), axes, keep, "max")
        b.op("Neg", [m], "min", out=out)
    else:  # ReduceLogSumExp: max-free (the Exp table covers the calibrated range)
        b.op("Log", [b.reduce("ReduceSum", b.op("Exp", [x], "exp"), axes, keep, "sum")], "lse", out=out)


def _stft(b: _B, model, n, shapes) -> None:
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    ins = list(n.input) + [""] * (4 - len(n.input))
    x, out = ins[0], n.output[0]
    shp = _shape(shapes, x)
    step = initializer_value(model, ins[1])
    win = initializer_value(model, ins[2]) if ins[2] else None
    flen = initializer_value(model, ins[3]) if ins[3] else None
    if step is None or (ins[2] and win is None) or (ins[3] and flen is None):
        raise UnsupportedOpError([("STFT", b.prefix, "frame_step, window and frame_length must be constants")])
    if len(shp) == 3 and shp[2] != 1:
        raise UnsupportedOpError([("STFT", b.prefix, "complex input signals (last dim 2)")])
    L = int(np.asarray(flen).reshape(-1)[0]) if flen is not None else len(win)
    w = np.ones(L) if win is None else np.asarray(win, np.float64).reshape(-1)
    if len(w) != L:
        raise UnsupportedOpError([("STFT", b.prefix, "window length differs from frame_length")])
    bins = L // 2 + 1 if int(a.get("onesided", 1)) else L
    ang = 2 * np.pi * np.outer(np.arange(bins), np.arange(L)) / L
    basis = np.concatenate([np.cos(ang) * w, -np.sin(ang) * w])[:, None, :]   # [2 * bins, 1, L]
    dt = np.float32 if win is None else win.dtype
    B, N = shp[0], shp[1]
    sig = b.op("Reshape", [x, b.const("shape", np.array([B, 1, N], np.int64))], "signal")
    y = b.op("Conv", [sig, b.const("dft", basis.astype(dt))], "dft", kernel_shape=[L],
             strides=[int(np.asarray(step).reshape(-1)[0])])               # [B, 2 * bins, frames]
    y = b.op("Reshape", [y, b.const("shape", np.array([B, 2, bins, -1], np.int64))], "pairs")
    b.op("Transpose", [y], "stft", out=out, perm=[0, 3, 2, 1])


def _dft(b: _B, model, n, shapes) -> None:
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    ins = list(n.input) + [""] * (3 - len(n.input))
    x, out = ins[0], n.output[0]
    shp = _shape(shapes, x)
    rank = len(shp)
    if b.opset >= 20:
        ax = initializer_value(model, ins[2]) if ins[2] else -2
        if ax is None:
            raise UnsupportedOpError([("DFT", b.prefix, "the axis must be a constant")])
        ax = int(np.asarray(ax).reshape(-1)[0])
    else:
        ax = int(a.get("axis", 1))
    ax = ax + rank if ax < 0 else ax
    if shp[-1] != 1:
        raise UnsupportedOpError([("DFT", b.prefix, "complex input signals (last dim 2)")])
    if int(a.get("inverse", 0)):
        raise UnsupportedOpError([("DFT", b.prefix, "inverse transforms")])
    if not 0 <= ax < rank - 1:
        raise UnsupportedOpError([("DFT", b.prefix, f"axis {ax} of a rank-{rank} signal")])
    N = shp[ax]
    L = N
    if ins[1]:
        dl = initializer_value(model, ins[1])
        if dl is None:
            raise UnsupportedOpError([("DFT", b.prefix, "dft_length must be a constant")])
        L = int(np.asarray(dl).reshape(-1)[0])
    bins = L // 2 + 1 if int(a.get("onesided", 0)) else L
    n_idx = np.arange(N)
    ang = 2 * np.pi * np.outer(n_idx, np.arange(bins)) / L
    keep = (n_idx < L)[:, None]
    basis = np.concatenate([np.cos(ang) * keep, -np.sin(ang) * keep], axis=1)     # [N, 2 * bins]
    lead = list(shp[:-1])
    sig = b.op("Reshape", [x, b.const("shape", np.array(lead, np.int64))], "signal")   # [..., N, ...]
    perm = [i for i in range(rank - 1) if i != ax] + [ax]
    moved = [lead[i] for i in perm]
    if perm != list(range(rank - 1)):
        sig = b.op("Transpose", [sig], "last", perm=perm)
    y = b.op("MatMul", [sig, b.const("dft", basis.astype(np.float32))], "dft")         # [..., 2 * bins]
    y = b.op("Reshape", [y, b.const("shape", np.array(moved[:-1] + [2, bins], np.int64))], "pairs")
    # [moved[:-1]..., 2, bins] -> [..., bins at the signal axis' place, ..., 2]: one transpose (the
    # pair axis last, then the moved axes back to their places)
    r = rank - 2
    order = list(range(r)) + [r + 1, r]                                                 # [moved..., bins, 2]
    back = [int(i) for i in np.argsort(perm)] + [rank - 1]
    b.op("Transpose", [y], "bins", out=out, perm=[order[i] for i in back])


def decompose(model: onnx.ModelProto, strict: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with the ops of the module docstring rewritten (``model`` itself if none).
    ``strict=False`` leaves a node whose input shape is not known yet (the frontend runs it once
    before onnxruntime's folding, which would inline GroupNormalization into Shape arithmetic, and
    once after, strict)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    shapes: dict | None = None

    def expand(m, n, k):
        nonlocal shapes
        if shapes is None:  # the static shapes inference knows, once per model
            shapes = {}
            for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
                t = vi.type.tensor_type
                if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
                    shapes[vi.name] = tuple(d.dim_value for d in t.shape.dim)
        b = _B(n, k, opset)
        try:
            rewrite = {"STFT": _stft, "DFT": _dft}.get(n.op_type, _norm if n.op_type in NORM_OPS else _reduce)
            rewrite(b, m, n, shapes)
        except ValueError:
            if not strict:
                return None
            raise UnsupportedOpError([(n.op_type, b.prefix, "input shape unknown")]) from None
        return b.nodes, b.inits

    return replace_nodes(model, REDUCE_OPS + NORM_OPS + SIGNAL_OPS, expand)
