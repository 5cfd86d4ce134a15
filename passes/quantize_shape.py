"""Quantization rules for data movement: the integers move, the scale passes through unchanged.

Reshape, Transpose, Slice, Gather (constant indices), Pad (value -> round(value / S)) keep the
input's QParams.  Concat needs one scale for all inputs: when they already agree the inputs are
concatenated as they are; otherwise each input is requantized to the output's calibrated scale
(y_i = rq(x_i; S_i / S_y)) first.  Constant inputs (a ViT class token) are quantized at the
output's scale at compile time: q = clip(round(c / S_y)).
"""

from __future__ import annotations

import numpy as np

from qcompiler.qtypes import dyadic

from .quantize import Quantizer, rule


def _passthrough(qz: Quantizer, n, op: str, attrs: dict):
    x, out = n.inputs[0], n.outputs[0]
    qx = qz.qp(x) if qz.iname(x) in qz.ig.qparams else None
    dtype = qx.dtype if qx else qz.ig.dtypes[qz.iname(x)]
    qz.emit(op, [qz.iname(x)], out, attrs, dtype, qz.fg.shape(out), qx, out, node_name=n.name)


@rule("Reshape")
def reshape(qz, n):
    _passthrough(qz, n, "reshape", {"shape": tuple(qz.fg.shape(n.outputs[0]))})


@rule("Transpose")
def transpose(qz, n):
    _passthrough(qz, n, "transpose", {"perm": tuple(n.attrs["perm"])})


@rule("Slice")
def slice_(qz, n):
    _passthrough(qz, n, "slice", {k: list(n.attrs[k]) for k in ("starts", "ends", "axes", "steps")})


def _gather_check(g, n):
    if "indices" not in n.attrs:
        return "non-constant indices into a non-embedding tensor"
    return None


@rule("Gather", check=_gather_check)
def gather(qz, n):
    _passthrough(qz, n, "gather", {"indices": np.asarray(n.attrs["indices"], np.int64), "axis": int(n.attrs["axis"])})


@rule("Pad")
def pad(qz, n):
    qx = qz.qp(n.inputs[0])
    v = int(np.clip(np.round(n.attrs["value"] / qx.scale), qx.qmin, qx.qmax))
    _passthrough(qz, n, "pad", {"pads": list(n.attrs["pads"]), "value": v})


@rule("Concat")
def concat(qz, n):
    out = n.outputs[0]
    ins = list(n.inputs)
    consts = [i for i in ins if i in qz.fg.consts]
    if consts:  # constant pieces (a class token): quantized at the output's calibrated scale
        qy = qz.out_qparams(out)
        for c in consts:
            q = np.clip(np.round(qz.fg.consts[c].astype(np.float64) / qy.scale), qy.qmin, qy.qmax).astype(qy.dtype)
            name = qz.fresh(c + "/q")
            qz.ig.add_const(name, q)
            qz.ig.qparams[name] = qy
            qz.int_name[c] = name
    qps = [qz.qp(i) for i in ins]
    if all(q == qps[0] for q in qps):
        qy = qps[0]
        srcs = [qz.iname(i) for i in ins]
    else:
        qy = qz.out_qparams(out)
        srcs = []
        for i, q in zip(ins, qps):
            if q == qy:
                srcs.append(qz.iname(i))
                continue
            dy = dyadic(np.asarray(q.scale / qy.scale), f"node '{n.name}'")
            srcs.append(qz.emit("requant", [qz.iname(i)], qz.fresh(f"{out}/in_{i}"),
                                {"mult": dy.mult, "shift": dy.shift, "lo": qy.qmin, "hi": qy.qmax, "dtype": qy.dtype},
                                qy.dtype, qz.fg.shape(i), qy, node_name=f"{n.name}/requant_{i}"))
    qz.emit("concat", srcs, out, {"axis": int(n.attrs["axis"])}, qy.dtype, qz.fg.shape(out), qy, out,
            node_name=n.name)
