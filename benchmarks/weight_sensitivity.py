"""What the weights' bits alone cost a model: ONNX Runtime FP32 with the Conv (or MatMul / Gemm /
LSTM / GRU) weights rounded to ``--bits`` per output channel (S_w = max|W[oc]| / (2^(b-1) - 1), as
``qcompiler/qtypes.py`` ``quantize_weights``), everything else in float.

Measured by the corpus entry's own measure against unmodified FP32 on its eval inputs: for CTC
recognisers the lines whose greedy decode equals FP32's (``benchmarks/coverage.py`` ``ctc_decode``),
else the output cosine.  ``--per-layer`` rounds one layer at a time (the others stay float), which
names the layers whose 8-bit weights cost the most (ppocrv2-rec: its first depthwise conv, zero-sum
3x3 filters followed by a BatchNorm of variance 1e-4).

    .venv/bin/python benchmarks/weight_sensitivity.py ppocrv2-rec [--bits 8] [--ops Conv] [--per-layer] [--n 32]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import onnx
from onnx import numpy_helper

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import corpus  # noqa: E402
import coverage  # noqa: E402
from qcompiler.ort_util import session  # noqa: E402


def _weight_tensors(m: onnx.ModelProto, ops: set[str]) -> list[tuple[str, onnx.TensorProto]]:
    """(layer name, the TensorProto of its weight: an initializer or a Constant's value) per layer."""
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant" and n.attribute}
    inits = {i.name: i for i in m.graph.initializer}
    out = []
    for n in m.graph.node:
        if n.op_type in ops and len(n.input) > 1:
            for w in n.input[1:3 if n.op_type in ("LSTM", "GRU") else 2]:
                t = inits.get(w, consts.get(w))
                if t is not None and len(t.dims) >= 2:
                    out.append((n.name or w, t))
    return out


def round_weight(t: onnx.TensorProto, bits: int) -> None:
    """``t`` in place, rounded per output channel (Conv [O, ...]: axis 0; MatMul [K, N]: axis 1;
    LSTM / GRU [dirs, G*H, K]: per row)."""
    a = numpy_helper.to_array(t).astype(np.float64)
    qmax = 2 ** (bits - 1) - 1
    red = (0,) if a.ndim == 2 else ((2,) if a.ndim == 3 else tuple(range(1, a.ndim)))
    s = np.abs(a).max(axis=red, keepdims=True) / qmax
    s[s == 0] = 1.0
    t.CopyFrom(numpy_helper.from_array((np.round(a / s) * s).astype(np.float32), t.name))


def measure(e: corpus.Entry, sess_ref, sess, feeds: dict, n: int) -> str:
    eq, coss = [], []
    for i in range(n):
        f = corpus.sample(corpus.layout(e), feeds, i)
        a, b = sess_ref.run(None, f), sess.run(None, f)
        if e.ctc is not None:
            j, blank, ta = e.ctc
            eq.append(coverage.ctc_decode(a[j], blank, ta) == coverage.ctc_decode(b[j], blank, ta))
        coss.append(float(coverage.cosine(a[e.score_output].reshape(1, -1), b[e.score_output].reshape(1, -1))[0]))
    s = f"cos {np.mean(coss):.5f} (min {np.min(coss):.5f})"
    return (f"CTC strings = FP32 {sum(eq)}/{n}; " + s) if eq else s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a corpus model name")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--ops", default="Conv", help="comma-separated op types whose weights are rounded")
    ap.add_argument("--per-layer", action="store_true", help="one layer at a time")
    ap.add_argument("--n", type=int, default=32, help="eval samples")
    a = ap.parse_args(argv)
    e = corpus.get(a.model)
    base = onnx.load(str(corpus.model_path(a.model)))
    feeds = corpus.make_inputs(a.model, "eval", a.n)
    n = corpus.n_samples(corpus.layout(e), feeds)
    ref = session(base)
    ops = set(a.ops.split(","))
    if not a.per_layer:
        m = onnx.ModelProto()
        m.CopyFrom(base)
        layers = _weight_tensors(m, ops)
        for _, t in layers:
            round_weight(t, a.bits)
        print(f"{a.model}: {len(layers)} weights of {a.ops} at {a.bits} bits: {measure(e, ref, session(m), feeds, n)}")
        return 0
    for k in range(len(_weight_tensors(base, ops))):
        m = onnx.ModelProto()
        m.CopyFrom(base)
        name, t = _weight_tensors(m, ops)[k]
        shape = list(t.dims)
        round_weight(t, a.bits)
        print(f"{k:3d} {name[-40:]:40s} {str(shape):18s} {measure(e, ref, session(m), feeds, n)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
