"""Compile-time overflow bounds for every integer op (interval arithmetic over the integer graph).

Each tensor gets an interval [lo, hi] (from its dtype, tightened by clamps).  Per op we prove:
  conv/dense   int32 accumulator: max|x| * sum_k |W[k, n]| + |bias[n]| < 2^31 for every channel n,
               also with max|x| + 128 (the VNNI kernels add 128 to signed activations)
  matmul       K * max|a| * max|b| < 2^31
  sums         (pool window or reduced count) * max|x| < 2^31
  dyadic step  |acc| * |mult| + |add| + 2^(shift-1) < 2^63   (int64)
  add          |a| * |mult_a| + |b| * |mult_b| + 2^(shift-1) < 2^63
  mul          |a * b| * |mult| + 2^(shift-1) < 2^63
  layernorm    y = C*q - sum q, V = sum y^2 + eps_int <= C^3*(span/2)^2 + eps_int < 2^62 (variance
               <= (span/2)^2 for values in an interval of width span);  |y*k| <= 2^R;
               |f*mult| + |bias| + 2^(shift-1) < 2^63   (passes/quantize_nonlinear.py)
  gelu         |q * s| (s = 1 + erf poly, or the sigmoid numerator) * |mult| + 2^(shift-1) < 2^63;
               ShiftGELU: (E0 << K) < 2^63
A violated bound fails compilation with the node's name (no silent wrap-around).
"""

from __future__ import annotations

import numpy as np

from qcompiler.errors import QuantizationError
from qcompiler.graph import Graph
from qcompiler.qtypes import int_range

I32 = 2**31 - 1
I64 = 2**63 - 1


def _mag(iv):
    return max(abs(iv[0]), abs(iv[1]))


def _dyadic_bound(acc: float, a: dict, mk="mult") -> float:
    m = np.abs(np.asarray(a[mk], dtype=np.float64)).max()
    s = np.asarray(a["shift"]).max()
    add = np.abs(np.asarray(a["add"], dtype=np.float64)).max() if a.get("add") is not None else 0.0
    return acc * m + add + 2.0 ** (s - 1)


def check_overflow(ig: Graph) -> dict[str, tuple[int, int]]:
    """Returns each tensor's interval; raises QuantizationError at the first unprovable bound."""
    iv: dict[str, tuple[int, int]] = {}
    for t in ig.inputs:
        dt = ig.dtypes[t]
        iv[t] = int_range(dt) if dt in ("int8", "uint8", "int16", "int32", "int64") else (0, 0)

    def fail(n, what, value, limit):
        raise QuantizationError(f"overflow at node '{n.name}' ({n.op}): {what} can reach {value:.3g} > {limit:.3g}; "
                                "the model's ranges are too wide for 8-bit arithmetic here")

    for n in ig.nodes:
        a = n.attrs
        ins = [iv.get(i, int_range(ig.dtypes[i]) if ig.dtypes[i] in ("int8", "uint8", "int16", "int32") else (0, 0))
               for i in n.inputs]
        op = n.op
        out_iv = None
        if op in ("conv", "dense"):
            w = np.abs(a["weight"].astype(np.int64))
            if op == "conv":
                colsum = w.reshape(w.shape[0], -1).sum(axis=1)
            else:
                colsum = w.sum(axis=0)
            xm = _mag(ins[0])
            xm_vnni = xm + (128 if ins[0][0] < 0 else 0)
            acc = float((xm_vnni * colsum + np.abs(a["bias"].astype(np.int64))).max())
            if acc > I32:
                fail(n, "the int32 accumulator", acc, I32)
            b = _dyadic_bound(float((xm * colsum + np.abs(a["bias"].astype(np.int64))).max()), a)
            if b > I64:
                fail(n, "the int64 requantization product", b, I64)
        elif op == "matmul":
            k = ig.shapes[n.inputs[0]][-1]
            acc = float(k) * _mag(ins[0]) * _mag(ins[1])
            if acc > I32:
                fail(n, "the int32 accumulator", acc, I32)
            if _dyadic_bound(acc, a) > I64:
                fail(n, "the int64 requantization product", _dyadic_bound(acc, a), I64)
        elif op in ("sumpool", "reduce_sum"):
            if op == "sumpool":
                cnt = int(np.prod(a["kernel"]))
            else:
                shp = ig.shapes[n.inputs[0]]
                cnt = int(np.prod([shp[x] for x in a["axes"]]))
            m = float(cnt) * _mag(ins[0])
            if m > I32:
                fail(n, "the int32 sum", m, I32)
            out_iv = (int(-m), int(m))
        elif op in ("requant", "prelu"):
            mk = "mult" if op == "requant" else "mult_pos"
            b = _dyadic_bound(float(_mag(ins[0])), a, mk)
            if op == "prelu":
                b = max(b, _dyadic_bound(float(_mag(ins[0])), a, "mult_neg"))
            if b > I64:
                fail(n, "the int64 requantization product", b, I64)
        elif op == "add":
            b = (_mag(ins[0]) * float(np.abs(a["mult_a"]).max()) + _mag(ins[1]) * float(np.abs(a["mult_b"]).max())
                 + 2.0 ** (np.max(a["shift"]) - 1))
            if b > I64:
                fail(n, "the int64 sum of requantized branches", b, I64)
        elif op == "maskadd":  # |x| + 2^20 * |A| + |B| <= 2^15 + 2^44 + 2^24 < 2^63 always
            pass
        elif op == "div":  # |x| * mult < 2^31 * 2^31; max(d,1) << min(shift, 31) < 2^31 * 2^31
            if _mag(ins[0]) * abs(float(a["mult"])) > 2.0**62 or _mag(ins[1]) * 2.0 ** min(int(a["shift"]), 31) > 2.0**62:
                fail(n, "the int64 division operands", max(_mag(ins[0]) * abs(float(a["mult"])), 0), 2.0**62)
        elif op == "mul":
            if _dyadic_bound(float(_mag(ins[0])) * _mag(ins[1]), a) > I64:
                fail(n, "the int64 product", _dyadic_bound(float(_mag(ins[0])) * _mag(ins[1]), a), I64)
        elif op == "layernorm":
            _check_layernorm(n, a, ins[0], ig.shapes[n.inputs[0]][-1], fail)
        elif op == "gelu":
            _check_gelu(n, a, ins[0], fail)
        if "lo" in a and "hi" in a:
            out_iv = (int(a["lo"]), int(a["hi"]))
        elif op == "clip":
            out_iv = (max(ins[0][0], a["lo"]), min(ins[0][1], a["hi"]))
        elif op == "lut":
            out_iv = (int(a["table"].min()), int(a["table"].max()))
        elif op == "pad":
            out_iv = (min(ins[0][0], a["value"]), max(ins[0][1], a["value"]))
        elif op == "concat":
            out_iv = (min(i[0] for i in ins), max(i[1] for i in ins))
        elif op == "embedding":
            out_iv = (int(a["table"].min()), int(a["table"].max()))
        elif out_iv is None and op in ("reshape", "transpose", "slice", "gather", "maxpool", "reduce_max", "cast"):
            out_iv = ins[0]
        if out_iv is None:
            dt = ig.dtypes[n.outputs[0]]
            out_iv = int_range(dt) if dt in ("int8", "uint8", "int16", "int32", "int64") else (0, 0)
        iv[n.outputs[0]] = out_iv
    return iv


def _check_layernorm(n, a, xin, C, fail) -> None:
    p = int(a["pre_shift"])
    span = (int(xin[1]) >> p) - (int(xin[0]) >> p)
    vmax = C**3 * span * span // 4 + int(a["eps_int"])
    if vmax >= 2**62:
        fail(n, "the int64 row variance sum", float(vmax), 2.0**62)
    if vmax > int(a.get("vmax", vmax)):
        fail(n, "the row variance (beyond the Newton step count's proof)", float(vmax), float(a["vmax"]))
    fmax = 2.0 ** a["F"] + 1
    b = (fmax * float(np.abs(a["mult"]).max()) + float(np.abs(a["bias"]).max())
         + 2.0 ** (int(np.max(a["shift"])) - 1))
    if b > I64:
        fail(n, "the int64 requantization of the normalised value", b, I64)


def _check_gelu(n, a, xin, fail) -> None:
    qm = float(_mag(xin))
    if a["variant"] == "igelu":
        smax = float(a["q_b"]) ** 2 + 2.0 * abs(a["q_c"])
    else:
        smax = 2.0 ** a["K"]
        if float(a["q_1"]) * 2.0 ** (a["N"] + a["K"]) > I64:
            fail(n, "the sigmoid numerator", float(a["q_1"]) * 2.0 ** (a["N"] + a["K"]), I64)
    b = qm * smax * abs(float(a["mult"])) + 2.0 ** (int(a["shift"]) - 1)
    if b > I64:
        fail(n, "the int64 product x * (1 + erf) / sigmoid", b, I64)
