"""16-bit weights (``weight_bits`` 16, the ``w16a8`` choice; qcompiler/intops/gemm.py): W_q = 256 W_hi +
W_lo runs as two INT8 kernels and an int64 combination.  The library equals the NumPy reference bit
for bit (group-1 conv with bias and ReLU, a depthwise conv with a fused residual add, a dense), also
at worst-case weights (every weight at the 16-bit maximum) and inputs, and its weights err 256x less
than 8-bit ones."""

import dataclasses
import tempfile

import numpy as np
import pytest
from onnx import helper

from passes.overflow import check_overflow
from passes.quantize import quantize
from qcompiler import reference
from qcompiler.driver import CompileOptions, prepare
from qcompiler.intops.gemm import split_w16
from qcompiler.lowering.build import build
from qcompiler.qtypes import W16_QMAX
from qcompiler.targets import parse_target
from tests.helpers import assert_bit_exact, cosine, make_model, ort_run, run_tvm, save, tensor

LAYERS = ("conv", "dw", "fc")


def _model(rng, worst=False):
    C, M = 8, 16
    w1 = rng.standard_normal((M, C, 3, 3)) * 0.3
    wd = rng.standard_normal((M, 1, 3, 3)) * 0.3
    w3 = rng.standard_normal((M * 4 * 4, 10)) * 0.1
    if worst:   # every weight at its channel's maximum magnitude: |W_q| = 32639 everywhere
        w1, wd, w3 = (np.sign(w) * 0.5 for w in (w1, wd, w3))
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "Wd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=M,
                              strides=[2, 2], name="dw"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Add", ["d", "p"], ["s"]),
             helper.make_node("Flatten", ["s"], ["f"]),
             helper.make_node("MatMul", ["f", "W3"], ["y"], name="fc")]
    inits = [tensor("W1", w1.astype(np.float32)), tensor("B1", (rng.standard_normal(M) * 0.5).astype(np.float32)),
             tensor("Wd", wd.astype(np.float32)), tensor("W3", w3.astype(np.float32))]
    return make_model(nodes, [("x", [1, C, 8, 8])], [("y", None)], inits)


def test_split_is_exact_at_the_ends():
    q = np.array([-W16_QMAX - 1, -W16_QMAX, -129, -128, -1, 0, 1, 127, 128, 255, 256, W16_QMAX], np.int16)
    hi, lo = split_w16(q)
    assert hi.dtype == lo.dtype == np.int8
    np.testing.assert_array_equal(hi.astype(np.int64) * 256 + lo, q)


@pytest.mark.parametrize("worst", [False, True])
def test_w16_library_equals_reference(worst):
    rng = np.random.default_rng(11)
    m = _model(rng, worst)
    x = rng.standard_normal((4, 8, 8, 8)).astype(np.float32)
    if worst:
        x = np.sign(x) * 3.0
    with tempfile.TemporaryDirectory() as d:
        path = save(m, d)
        prep = prepare(path, {"x": x}, CompileOptions(target=parse_target("cpu")))
        want = ort_run(path, {"x": x[:1]})[0]
    st = prep.state
    ig = quantize(st.fg, st.stats, st.nonneg, dataclasses.replace(st.cfg, plan=tuple((n, 16, 8) for n in LAYERS)),
                  st.fr.model)
    layers = {n.name: n for n in ig.nodes if n.op in ("conv", "dense")}
    assert all(layers[k].attrs["weight_bits"] == 16 and layers[k].attrs["weight"].dtype == np.int16 for k in LAYERS)
    if worst:
        assert np.abs(layers["conv"].attrs["weight"]).max() == W16_QMAX
    check_overflow(ig)
    res = build(ig, parse_target("cpu").tvm_target())
    assert not res.fallbacks, res.fallbacks
    for i in range(len(x)):
        feed = {"x": x[i:i + 1]}
        assert_bit_exact(run_tvm(res.executable, ig, feed), reference.execute(ig, feed), ig.outputs, f"sample {i}")
    # the 16-bit weights are closer to float than the 8-bit ones
    c16 = cosine(reference.execute(ig, {"x": x[:1]})[ig.outputs[0]], want)
    c8 = cosine(reference.execute(prep.int_graph, {"x": x[:1]})[ig.outputs[0]], want)
    assert c16 >= c8 - 1e-4, (c8, c16)
