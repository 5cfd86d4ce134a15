"""16-bit activations chosen from the calibration statistics (passes/auto_wide.py): a 1x1 conv whose
output channels differ by 2000x, a hard-swish, a depthwise conv (ppocrv3-rec's SVTR-LCNet blocks).
One per-tensor 8-bit scale leaves the small channels no level; the pass gives the depthwise conv a
16-bit input, the hard-swish and the 1x1 conv's output follow, and the library stays bit-exact
(the direct depthwise kernel takes int16, qcompiler/kernels/cpu_vnni.py DIRECT_ACT_DTYPES)."""

import dataclasses
import tempfile

import numpy as np
from onnx import helper

from qcompiler import reference
from qcompiler.driver import CompileOptions, prepare
from qcompiler.lowering.build import build
from qcompiler.targets import parse_target
from tests.helpers import check_pipeline, cosine, make_model, ort_run, save, tensor


def _model():
    rng = np.random.default_rng(7)
    C, M = 8, 16
    s = np.geomspace(0.05, 100.0, M)                       # per output channel of the 1x1 conv
    w1 = rng.standard_normal((M, C, 1, 1)) * 0.3 * s[:, None, None, None]
    wd = rng.standard_normal((M, 1, 3, 3)) * 0.3 / s[:, None, None, None]
    w3 = rng.standard_normal((4, M, 1, 1)) * 0.3
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], kernel_shape=[1, 1]),
             helper.make_node("HardSwish", ["a"], ["h"]),
             helper.make_node("Conv", ["h", "Wd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=M),
             helper.make_node("Conv", ["d", "W3"], ["y"], kernel_shape=[1, 1])]
    inits = [tensor("W1", w1.astype(np.float32)), tensor("Wd", wd.astype(np.float32)),
             tensor("W3", w3.astype(np.float32))]
    m = make_model(nodes, [("x", [1, C, 9, 9])], [("y", None)], inits)
    x = np.random.default_rng(1).standard_normal((8, C, 9, 9)).astype(np.float32)
    return m, {"x": x}


def test_small_channels_get_16_bits_and_stay_bit_exact():
    m, calib = _model()
    prep, tv, ref = check_pipeline(m, calib, min_cos=0.995)
    ig = prep.int_graph
    convs = [n for n in ig.nodes if n.op == "conv"]
    assert [ig.dtypes[n.inputs[0]] for n in convs] == ["int8", "int16", "int8"]
    assert ig.dtypes[convs[0].outputs[0]] == "int16"      # hard-swish (fused) follows its consumer
    res = build(ig, parse_target("cpu").tvm_target())
    assert not res.fallbacks, res.fallbacks                 # the depthwise kernel took the int16 input


def test_without_the_pass_the_small_channels_are_lost():
    """The same model all-8-bit (QuantConfig.auto_wide = 0: off): what the pass repairs."""
    import passes.quantize as Q

    m, calib = _model()
    with tempfile.TemporaryDirectory() as d:
        path = save(m, d)
        prep = prepare(path, calib, CompileOptions(target=parse_target("cpu")))
        test = {"x": calib["x"][:1]}
        want = ort_run(path, test)[0]
    st = prep.state
    ig = Q.quantize(st.fg, st.stats, st.nonneg, dataclasses.replace(st.cfg, auto_wide=0.0), st.fr.model)
    off = cosine(reference.execute(ig, test)["y"], want)
    on = cosine(reference.execute(prep.int_graph, test)["y"], want)
    assert off < 0.95 < 0.995 < on, (off, on)


def _log_spectrum_model():
    """A log-power front end (nemo80-frontend's shape): pre-emphasis (Slice, Mul, Sub, Concat), a
    1-D conv with windowed DFT kernels (stride = hop), power (Mul), a mel-like filter bank (MatMul)
    and Log.  The signal is band-limited, so the high DFT bins carry 1e-3 of the low bins' power:
    at 8 bits their relative noise is large, and the log reads every bin's relative error."""
    rng = np.random.default_rng(3)
    N, K, hop, B = 1024, 64, 32, 17
    t = np.arange(K)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * t / K)
    f = np.arange(B)[:, None]
    dft = np.concatenate([np.cos(2 * np.pi * f * t / K), -np.sin(2 * np.pi * f * t / K)]) * win   # [2B, K]
    mel = np.abs(rng.standard_normal((2 * B, 8))) * (rng.random((2 * B, 8)) < 0.3) + 1e-3
    nodes = [helper.make_node("Slice", ["x", "s1", "e1", "ax"], ["xa"]),
             helper.make_node("Slice", ["x", "s0", "em", "ax"], ["xb"]),
             helper.make_node("Mul", ["xb", "pre"], ["xc"]),
             helper.make_node("Sub", ["xa", "xc"], ["xd"]),
             helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["x0"]),
             helper.make_node("Concat", ["x0", "xd"], ["xe"], axis=2),
             helper.make_node("Conv", ["xe", "Wd"], ["spec"], kernel_shape=[K], strides=[hop]),
             helper.make_node("Mul", ["spec", "spec"], ["pw"]),
             helper.make_node("Transpose", ["pw"], ["pt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["pt", "Mel"], ["m"]),
             helper.make_node("Add", ["m", "eps"], ["me"]),
             helper.make_node("Log", ["me"], ["y"])]
    i64 = lambda name, v: tensor(name, np.array(v, np.int64))
    inits = [tensor("Wd", dft[:, None, :].astype(np.float32)), tensor("Mel", mel.astype(np.float32)),
             tensor("pre", np.array(0.97, np.float32)), tensor("eps", np.array(1e-6, np.float32)),
             i64("s0", [0]), i64("s1", [1]), i64("e1", [N]), i64("em", [N - 1]), i64("ax", [2])]
    m = make_model(nodes, [("x", [1, 1, N])], [("y", None)], inits)
    # band-limited (1/f^4: a twice-integrated noise) with a quiet half, as speech with pauses
    noise = np.cumsum(np.cumsum(rng.standard_normal((6, N)), axis=1), axis=1)
    noise -= noise.mean(axis=1, keepdims=True)
    lp = (noise / np.abs(noise).max(axis=1, keepdims=True) * np.where(np.arange(N) < N // 2, 1.0, 0.02))[:, None]
    return m, {"x": lp.astype(np.float32)}


def test_a_log_power_front_end_gets_16_bits_and_stays_bit_exact():
    """passes/auto_wide.py ``feeds_log``: the DFT conv whose output a Log reads is judged by its worst
    bin and takes a 16-bit input; the pre-emphasis chain (Mul, Sub, Concat, Slice) follows it."""
    import passes.quantize as Q

    m, calib = _log_spectrum_model()
    # what remains is the log of a linearly coded 16-bit input in the quiet half
    prep, tv, ref = check_pipeline(m, calib, min_cos=0.975)
    ig = prep.int_graph
    conv = next(n for n in ig.nodes if n.op == "conv")
    assert ig.dtypes[conv.inputs[0]] == "int16"
    st = prep.state
    off = Q.quantize(st.fg, st.stats, st.nonneg, dataclasses.replace(st.cfg, auto_wide=0.0), st.fr.model)
    test = {"x": calib["x"][:1]}
    with tempfile.TemporaryDirectory() as d:
        want = ort_run(save(m, d), test)[0]
    c_off = cosine(reference.execute(off, test)["y"], want)
    c_on = cosine(reference.execute(ig, test)["y"], want)
    assert c_on > c_off, (c_off, c_on)


def _head_model():
    """A small CNN classifier: two convs, global pooling, a 2-layer Dense head (its 512 + 64
    multiply-adds far under 1% of the model's)."""
    rng = np.random.default_rng(11)
    inits = [tensor("W1", (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)),
             tensor("W2", (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)),
             tensor("G1", (rng.standard_normal((32, 16)) * 0.5).astype(np.float32)),
             tensor("G2", (rng.standard_normal((16, 4)) * 0.5).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "G1"], ["h"]),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("MatMul", ["hr", "G2"], ["logits"])]
    return make_model(nodes, [("x", [1, 3, 32, 32])], [("logits", None)], inits)


def test_a_classifier_head_gets_16_bits_and_headroom():
    """passes/auto_wide.py SMALL_MACS / SMALL_SHARE: the head's Dense layers take 16-bit inputs; their
    16-bit inputs and the logits get SMALL_HEADROOM (passes/quantize.py), so a held-out sample whose
    head activations pass the calibrated maximum (here: an input 3x brighter than any calibration
    sample) is not saturated; the convs of the body stay 8-bit; bit-exact throughout."""
    import passes.quantize as Q

    m = _head_model()
    rng = np.random.default_rng(2)
    calib = {"x": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)}
    bright = {"x": 3.0 * np.abs(rng.standard_normal((1, 3, 32, 32))).astype(np.float32)}
    prep, _tv, _ref = check_pipeline(m, calib, test=bright, min_cos=0.999)
    ig = prep.int_graph
    dense = [n for n in ig.nodes if n.op == "dense"]
    convs = [n for n in ig.nodes if n.op == "conv"]
    assert dense and all(ig.dtypes[n.inputs[0]] == "int16" for n in dense)
    assert convs and all(ig.dtypes[n.inputs[0]] in ("int8", "uint8") for n in convs)
    calibrated = max(abs(prep.state.stats["logits"].lo), abs(prep.state.stats["logits"].hi))
    qp = ig.qparams["logits"]
    assert qp.dtype == "int16" and qp.scale * 32767 >= 0.99 * Q.SMALL_HEADROOM * calibrated
