"""16-bit states of unrolled recurrences (passes/quantize.py ``RECURRENT_WIDE``, after TFLite's integer
LSTM): gate pre-activations, gates, cell states and their products int16, Sigmoid / Tanh of 16-bit
inputs as 513-knot interpolated tables (qcompiler/intops/interp_table.py); the hidden state stays 8-bit
where the recurrent MatMul reads it.  Three-way checked (float passes, reference vs onnxruntime, TVM
== reference bit for bit) like every graph."""

import numpy as np
import pytest

import passes.quantize as Q
from qcompiler import reference
from qcompiler.intops.interp_table import INTERP_BITS, LutInterpOp, knots
from tests.helpers import check_pipeline, cosine, ort_run
from tests.passes.test_recurrent import feeds, rnn_model


def _by_role(ig, what):
    """Integer tensors of the time steps whose role name ends with ``what`` (e.g. '/c_2')."""
    return [t for t in ig.dtypes if "/step" in t and t.endswith(what)]


@pytest.mark.parametrize("kw", [dict(op="LSTM", direction="bidirectional"),
                                dict(op="LSTM", peep=True, outputs=("Y", "Y_h", "Y_c")),
                                dict(op="GRU", lbr=1), dict(op="GRU", direction="reverse")],
                         ids=["lstm-bi", "lstm-peep", "gru-lbr", "gru-reverse"])
def test_gates_and_cell_state_are_16_bit_and_bit_exact(kw):
    m = rnn_model(T=6, **kw)
    prep, _, _ = check_pipeline(m, feeds(m, n=16, seed=1), test=feeds(m, n=1, seed=2), min_cos=0.98)
    ig = prep.int_graph
    interp = [n for n in ig.nodes if n.op == "lut_interp"]
    assert interp and all(ig.dtypes[n.inputs[0]] == "int16" for n in interp)
    assert all(n.attrs["table"].size == (65536 >> INTERP_BITS) + 1 for n in interp)   # 513 knots, not 65536
    assert not any(n.op == "lut" and n.attrs["table"].size > 256 for n in ig.nodes)
    sig = _by_role(ig, "/sigmoid_1")
    assert sig and all(ig.dtypes[t] == "int16" for t in sig)
    if kw["op"] == "LSTM":
        cells = [t for t in _by_role(ig, "/c_2") if t in ig.qparams]
        assert cells and all(ig.dtypes[t] == "int16" for t in cells)
    # the hidden state is read by the 8-bit recurrent MatMul: it stays 8-bit
    hs = _by_role(ig, "/h_1" if kw["op"] == "LSTM" else "/h_2")   # (a GRU's "h_1" is its candidate gate)
    assert hs and all(ig.dtypes[t] in ("int8", "uint8") for t in hs)


def _rel_err(m, calib, test, monkeypatch=None, off=False):
    from qcompiler.driver import CompileOptions, prepare
    from qcompiler.targets import parse_target
    import tempfile
    from tests.helpers import save

    if off:
        monkeypatch.setattr(Q, "role", lambda t: None)    # no tensor counts as a step: 8-bit gates and state
        monkeypatch.setattr(Q.Quantizer, "_small_table", lambda self, u: False)   # (nor as a small table's input)
    with tempfile.TemporaryDirectory() as d:
        path = save(m, d)
        prep = prepare(path, calib, CompileOptions(target=parse_target("cpu")))
        f = ort_run(path, test)[0]
    q = reference.execute(prep.int_graph, test)[m.graph.output[0].name]
    if off:
        monkeypatch.undo()
    return float(np.linalg.norm(q - f) / np.linalg.norm(f)), cosine(q, f)


def test_16_bit_states_are_closer_to_float_over_a_long_sequence(monkeypatch):
    """A 48-step LSTM whose forget gate stays near 1 (the cell state integrates the input): with 8-bit
    gate pre-activations and cell states the rounding compounds over the steps."""
    m = rnn_model("LSTM", T=48, H=8, I=6, seed=7)
    calib, test = feeds(m, n=16, seed=1), feeds(m, n=1, seed=2)
    wide, cos_wide = _rel_err(m, calib, test)
    narrow, _ = _rel_err(m, calib, test, monkeypatch, off=True)
    assert cos_wide > 0.995 and wide < 0.7 * narrow, (wide, narrow)


def test_interpolated_table_error_bound():
    """Against the function itself: the interpolation error h^2/8 max|f''| plus one output step."""
    rng = np.random.default_rng(0)
    s_x, s_y = 12 / 32768, 1 / 32767
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    t = knots(sig, -32768, 32767, s_x, s_y, -32768, 32767)
    x = rng.integers(-32768, 32768, size=20000).astype(np.int16)
    y = LutInterpOp.reference(x, {"table": t, "offset": 32768, "k": INTERP_BITS, "lo": -32768, "hi": 32767,
                                  "dtype": "int16"})
    h = (1 << INTERP_BITS) * s_x
    err = np.abs(y * s_y - sig(x.astype(np.float64) * s_x))
    assert err.max() <= h * h / 8 * 0.0963 + s_y
