"""Quantization rules for pooling and reductions: integers only, no run-time division.

MaxPool / ReduceMax   max of integers on the input's own scale (padding = the dtype's minimum)
AveragePool           s = window sum (int32);  y = rq(s; S_x / (S_y * count[p]))  with the ONNX
                      divisor count[p] of every output position p folded into per-position
                      dyadic constants at compile time (count_include_pad, ceil_mode handled)
ReduceMean/Sum        s = sum over axes (int32);  y = rq(s; S_x / (S_y * n))  (n = 1 for Sum)
                      (GlobalAveragePool is ReduceMean over the spatial axes)
"""

from __future__ import annotations

import numpy as np

from qcompiler.qtypes import dyadic

from .quantize import Quantizer, rule


@rule("MaxPool")
def maxpool(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    a = {k: n.attrs[k] for k in ("kernel", "strides", "pads", "dilations")}
    qz.emit("maxpool", [qz.iname(x)], out, a, qx.dtype, qz.fg.shape(out), qx, out, node_name=n.name)


@rule("AveragePool")
def avgpool(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    shape = qz.fg.shape(out)
    a = {k: n.attrs[k] for k in ("kernel", "strides", "pads")}
    s = qz.emit("sumpool", [qz.iname(x)], qz.fresh(out + "/sum"), a, "int32", shape, None, node_name=n.name + "/sum")
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    count = np.asarray(n.attrs["count"], np.float64)
    dy = dyadic((qx.scale / qy.scale) / count[None, None], f"node '{n.name}'")
    qz.emit("requant", [s], out, {"mult": dy.mult, "shift": dy.shift, "lo": lo, "hi": hi, "dtype": qy.dtype,
                                  "acc_scale": qx.scale},
            qy.dtype, shape, qy, out, node_name=n.name)


def _reduce(qz: Quantizer, n, mean: bool):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    shape_in = qz.fg.shape(x)
    axes, keep = tuple(n.attrs["axes"]), bool(n.attrs["keepdims"])
    count = int(np.prod([shape_in[a] for a in axes]))
    s = qz.emit("reduce_sum", [qz.iname(x)], qz.fresh(out + "/sum"), {"axes": axes, "keepdims": keep}, "int32",
                qz.fg.shape(out), None, node_name=n.name + "/sum")
    qy = qz.out_qparams(out)
    lo, hi = qz.clamp(qy, n.attrs.get("act"))
    dy = dyadic(np.asarray(qx.scale / qy.scale / (count if mean else 1)), f"node '{n.name}'")
    qz.emit("requant", [s], out, {"mult": dy.mult, "shift": dy.shift, "lo": lo, "hi": hi, "dtype": qy.dtype,
                                  "acc_scale": qx.scale},
            qy.dtype, qz.fg.shape(out), qy, out, node_name=n.name)


@rule("ReduceMean")
def reduce_mean(qz: Quantizer, n):
    _reduce(qz, n, mean=True)


@rule("ReduceSum")
def reduce_sum(qz: Quantizer, n):
    _reduce(qz, n, mean=False)


@rule("ReduceMax")
def reduce_max(qz: Quantizer, n):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x)
    qz.emit("reduce_max", [qz.iname(x)], out, {"axes": tuple(n.attrs["axes"]), "keepdims": bool(n.attrs["keepdims"])},
            qx.dtype, qz.fg.shape(out), qx, out, node_name=n.name)
