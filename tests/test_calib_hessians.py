"""GPTQ rounding of 8-bit weights (``--rounding gptq``) from Hessians gathered in the calibration
run (qcompiler/calib_hessians.py): where they come from, how smoothing moves them, what the
default leaves alone, and that a GPTQ-rounded library equals its reference bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tests.helpers import check_pipeline, cosine, make_model, ort_run, save, tensor
from qcompiler import reference
from qcompiler.driver import CompileOptions, prepare
from qcompiler.mixed.gptq import HessianStore
from qcompiler.mixed.plan import MixedOptions
from qcompiler.qtypes import quantize_weights
from qcompiler.targets import parse_target

R = np.random.default_rng(7)


def _smooth_images(n: int, rng) -> np.ndarray:
    """Low-frequency images around 1.0: neighbouring pixels move together (what a 3x3 filter's
    Hessian sees in a real image, strongly so)."""
    coarse = rng.standard_normal((n, 1, 5, 5)) * 0.05
    up = np.kron(coarse, np.ones((1, 1, 4, 4)))[:, :, :16, :16]
    k = np.ones(3) / 3
    for ax in (2, 3):
        up = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), ax, up)
    return (1.0 + up).astype(np.float32)


def _edge_model() -> onnx.ModelProto:
    """One 3x3 conv of zero-sum filters (edge detectors): on smooth inputs its output is small, and
    the DC residue that round-to-nearest leaves in the filter sum (up to ~1 weight step times the
    image level) is of the same size."""
    w = R.standard_normal((8, 1, 3, 3))
    w -= w.mean(axis=(2, 3), keepdims=True)
    conv = helper.make_node("Conv", ["x", "W"], ["y"])
    return make_model([conv], [("x", ["N", 1, 16, 16])], [("y", None)], [tensor("W", w.astype(np.float32))])


def _prep(path, calib, rounding: str):
    return prepare(path, calib, CompileOptions(target=parse_target("cpu"), dims="static",
                                               mixed=MixedOptions(rounding=rounding)))


def test_gptq_keeps_the_dc_response_of_zero_sum_filters(tmp_path):
    m = _edge_model()
    path = save(m, tmp_path)
    calib = {"x": _smooth_images(32, R)}
    test = {"x": _smooth_images(16, np.random.default_rng(99))}
    (y,) = ort_run(path, test)
    cos = {}
    for r in ("rtn", "gptq"):
        prep = _prep(path, calib, r)
        cos[r] = cosine(reference.execute(prep.int_graph, test)["y"], y)
        conv = next(n for n in prep.int_graph.nodes if n.op == "conv")
        wq = conv.attrs["weight"].astype(np.int64)
        if r == "rtn":
            assert np.array_equal(wq, quantize_weights(onnx.numpy_helper.to_array(m.graph.initializer[0]), 0)[0])
            rtn_dc = np.abs(wq.sum(axis=(1, 2, 3))).max()
        else:
            assert prep.qcfg.hessians is not None and prep.qcfg.hessians.names()
            gptq_dc = np.abs(wq.sum(axis=(1, 2, 3))).max()
    assert gptq_dc == 0 < rtn_dc  # the float filters sum to 0: GPTQ's integers do too
    assert cos["gptq"] > cos["rtn"] + 0.005, cos  # 0.976 -> 0.990 here
    assert cos["gptq"] > cos["rtn"] + 0.005, cos


def test_default_rounding_is_round_to_nearest_at_8_bits(tmp_path):
    m = _edge_model()
    path = save(m, tmp_path)
    prep = prepare(path, {"x": _smooth_images(8, R)}, CompileOptions(target=parse_target("cpu"), dims="static"))
    conv = next(n for n in prep.int_graph.nodes if n.op == "conv")
    want = quantize_weights(onnx.numpy_helper.to_array(m.graph.initializer[0]), 0)[0]
    assert np.array_equal(conv.attrs["weight"], want)
    assert prep.qcfg.rounding == "auto" and prep.qcfg.hessians is None  # no Hessians gathered


def test_smoothing_moves_the_hessian_with_the_input():
    st = HessianStore()
    X = R.standard_normal((500, 6))
    st.add_rows("d", [X])
    H = st.get("d")[0]
    np.testing.assert_allclose(H, 2 * X.T @ X / 500)
    d = np.array([1.0, 2.0, 0.5, 1.0, 4.0, 0.25])
    st.set_input_scale("d", d)
    np.testing.assert_allclose(st.get("d")[0], 2 * (X * d).T @ (X * d) / 500)
    first = st.get("d")
    st.set_input_scale("d", d.copy())  # the same smoothing again (a retrace): the memo stays
    assert st.get("d") is first


def test_smoothed_dense_layers_get_the_scaled_hessian(tmp_path):
    """LayerNorm -> Dense with an outlier channel: smoothing divides the LN output by f and the
    Dense's Hessian follows (its recorded input scale is 1 / f)."""
    K, N = 16, 8
    gamma = np.ones(K, np.float32)
    gamma[3] = 30.0  # one outlier channel
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "W"], ["y"])]
    W = R.standard_normal((K, N)).astype(np.float32)
    m = make_model(nodes, [("x", ["N", 12, K])], [("y", None)],
                   [tensor("g", gamma), tensor("b", np.zeros(K, np.float32)), tensor("W", W)])
    path = save(m, tmp_path)
    prep = _prep(path, {"x": R.standard_normal((8, 12, K)).astype(np.float32)}, "gptq")
    dense = next(n for n in prep.float_graph.nodes if n.op == "Dense")
    store = prep.qcfg.hessians
    assert dense.name in store.scale, "the Dense input was not smoothed (the test needs it)"
    f = dense.attrs["weight"].astype(np.float64)[:, 0] / W[:, 0]
    np.testing.assert_allclose(store.scale[dense.name], 1.0 / f, rtol=1e-5)


def test_gptq_rounded_library_is_bit_exact():
    from tests.helpers import small_cnn

    m = small_cnn(R, (1, 3, 16, 16), 8, 5, pool=True)
    calib = {"x": R.standard_normal((8, 3, 16, 16)).astype(np.float32)}
    prep, _, _ = check_pipeline(m, calib, min_cos=0.98, opts_kw={"mixed": MixedOptions(rounding="gptq")})
    assert prep.qcfg.rounding == "gptq" and prep.qcfg.hessians.names()
