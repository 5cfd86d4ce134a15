"""LSTM / GRU / RNN unrolled into plain ONNX ops (passes/unroll_recurrent.py): exact against
onnxruntime's own recurrent ops, then quantized and built like any graph (three-way check)."""

import numpy as np
import onnx
import pytest
from onnx import helper

from passes.unroll_recurrent import unroll_recurrent
from tests.helpers import check_pipeline, cosine, make_model, ort_run, tensor

R = np.random.default_rng(11)


def rnn_model(op="LSTM", T=6, N=1, I=5, H=4, direction="forward", layout=0, init=False, bias=True, peep=False,
              lbr=0, outputs=("Y", "Y_h"), seed=None):
    R = np.random.default_rng(seed) if seed is not None else globals()["R"]
    dirs = 2 if direction == "bidirectional" else 1
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    W = (R.standard_normal((dirs, G * H, I)) * 0.5).astype(np.float32)
    Rr = (R.standard_normal((dirs, G * H, H)) * 0.5).astype(np.float32)
    inits = [tensor("W", W), tensor("R", Rr)]
    ins = ["x", "W", "R"]
    if bias:
        inits.append(tensor("B", (R.standard_normal((dirs, 2 * G * H)) * 0.3).astype(np.float32)))
    ins.append("B" if bias else "")
    ins.append("")  # sequence_lens
    xshape = [N, T, I] if layout else [T, N, I]
    sshape = [N, dirs, H] if layout else [dirs, N, H]
    graph_in = [("x", xshape)]
    if init:
        graph_in.append(("h0", sshape))
        ins.append("h0")
        if op == "LSTM":
            graph_in.append(("c0", sshape))
            ins.append("c0")
    if peep:
        ins += [""] * (7 - len(ins)) + ["P"]
        inits.append(tensor("P", (R.standard_normal((dirs, 3 * H)) * 0.3).astype(np.float32)))
    outs = list(outputs) if op == "LSTM" else [o for o in outputs if o != "Y_c"]
    attrs = dict(hidden_size=H, direction=direction)
    if layout:
        attrs["layout"] = 1
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(op, ins, outs, **attrs)
    post = [helper.make_node("Relu", [outs[0]], ["out"])]
    return make_model([node] + post, graph_in, [("out", None)] + [(o, None) for o in outs[1:]], inits, opset=14)


def feeds(m, n=1, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for vi in m.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal([n * shape[0]] + shape[1:]).astype(np.float32)
    return out


CASES = [
    dict(op="LSTM"), dict(op="LSTM", direction="reverse"), dict(op="LSTM", direction="bidirectional", init=True),
    dict(op="LSTM", peep=True, outputs=("Y", "Y_h", "Y_c")), dict(op="LSTM", bias=False, N=2),
    dict(op="GRU"), dict(op="GRU", lbr=1, init=True), dict(op="GRU", direction="bidirectional", lbr=1),
    dict(op="RNN"), dict(op="RNN", direction="bidirectional", init=True),
]


@pytest.mark.parametrize("loop", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_unrolled_equals_onnxruntime(kw, loop):
    """Unrolled, and as one Scan per direction whose body is one step (``loop``: the form of a
    symbolic time axis, qcompiler/intops/recurrent.py; Y_c is the Scan's final cell state)."""
    m = rnn_model(**kw)
    u = unroll_recurrent(m, loop=loop)
    assert not any(n.op_type in ("LSTM", "GRU", "RNN") for n in u.graph.node)
    assert sum(n.op_type == "Scan" for n in u.graph.node) == (2 if "bidirectional" in kw.values() else 1) * loop
    onnx.checker.check_model(u)
    f = feeds(m)
    for a, b in zip(ort_run(m, f), ort_run(u, f)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_first_layout(op):
    """layout = 1 (onnxruntime has no kernel for it): equals the layout-0 op on transposed data."""
    m0 = rnn_model(op, direction="bidirectional", init=True, N=2, seed=4, outputs=("Y", "Y_h"))
    m1 = rnn_model(op, direction="bidirectional", init=True, N=2, seed=4, layout=1, outputs=("Y", "Y_h"))
    f0 = feeds(m0, seed=3)
    f1 = {k: np.ascontiguousarray(np.swapaxes(v, 0, 1)) for k, v in f0.items()}
    y0, h0 = ort_run(m0, f0)
    y1, h1 = ort_run(unroll_recurrent(m1), f1)
    np.testing.assert_allclose(y1, np.transpose(y0, (2, 0, 1, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h1, np.swapaxes(h0, 0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(op="LSTM", direction="bidirectional"), dict(op="GRU", lbr=1),
                                dict(op="RNN")], ids=["lstm-bi", "gru-lbr", "rnn"])
def test_recurrent_compiles_integer_only_and_bit_exact(kw):
    m = unroll_recurrent(rnn_model(T=5, **kw))
    calib = feeds(m, n=16, seed=1)
    check_pipeline(m, calib, test=feeds(m, n=1, seed=2), min_cos=0.97)


def test_lstm_model_compiles_as_shipped():
    """The frontend unrolls the recurrent op itself: an LSTM model compiles without a manual step."""
    m = rnn_model("LSTM", T=4, direction="bidirectional")
    prep, _, _ = check_pipeline(m, feeds(m, n=16, seed=1), test=feeds(m, n=1, seed=2), min_cos=0.97)
    assert not any(n.op in ("LSTM", "GRU", "RNN") for n in prep.float_graph.nodes)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_steps_share_scales_per_role(op):
    """passes/shared_steps.py: the time steps' gate / state tensors of one role share a scale where
    their ranges fall in one sqrt(2) bucket, so fewer distinct scales than steps (and kernels shared);
    bit-exact like any graph (TVM == reference)."""
    import re

    m = rnn_model(op, T=7, direction="bidirectional", seed=5)
    prep, _, _ = check_pipeline(m, feeds(m, n=16, seed=1), test=feeds(m, n=1, seed=2), min_cos=0.95)
    roles: dict[str, list] = {}
    for t, q in prep.int_graph.qparams.items():
        if re.search(r"/step\d+/", t):
            roles.setdefault(re.sub(r"/step\d+/", "/step*/", t), []).append(q.scale)
    multi = [v for v in roles.values() if len(v) > 1]
    assert len(multi) >= 8 and sum(len(set(v)) for v in multi) < sum(len(v) for v in multi)


def test_step_ranges_merge_within_a_bucket():
    from passes.shared_steps import share_step_ranges
    from qcompiler.calibrate import TensorStats

    def st(hi):
        return TensorStats(-hi, hi, np.linspace(-hi, hi, 11).astype(np.float32), count=11)

    stats = {f"L/d0/step{t}/c_1": st(hi) for t, hi in enumerate([1.0, 1.1, 1.3, 3.0, 3.5])}
    stats["other"] = st(9.0)
    out = share_step_ranges(stats)
    his = [out[f"L/d0/step{t}/c_1"].hi for t in range(5)]
    assert his == [1.0, 1.3, 1.3, 3.5, 3.5] and out["other"].hi == 9.0
