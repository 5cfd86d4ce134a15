"""The ops real exporters emit beyond the zoo's (qcompiler/intops/compare.py, resample.py, the
elementwise Sub / Pow rules, canonicalize's ConvTranspose / Max / Min / Clip forms), end to end on
random data: float passes exact vs onnxruntime, integer reference close to float, TVM == reference
bit for bit (tests/helpers.py check_pipeline)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.helpers import check_pipeline, make_model, ort_run, tensor

R = np.random.default_rng(3)


def x_data(shape, n=8, scale=1.0, seed=1):
    return {"x": (np.random.default_rng(seed).standard_normal((n, *shape[1:])) * scale).astype(np.float32)}


def conv(name, inp, out, C, OC, k=3):
    W = (R.standard_normal((OC, C, k, k)) * 0.3).astype(np.float32)
    return helper.make_node("Conv", [inp, name], [out], kernel_shape=[k, k], pads=[k // 2] * 4), tensor(name, W)


def test_clip_with_one_element_tensor_bounds():
    """Clip whose min/max inputs have shape [1] (a PyTorch/TF export form)."""
    c, wt = conv("W", "x", "c", 4, 6)
    nodes = [c, helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    m = make_model(nodes, [("x", [1, 4, 7, 7])], [("y", None)],
                   [wt, tensor("lo", np.array([0.0], np.float32)), tensor("hi", np.array([3.0], np.float32))])
    check_pipeline(m, x_data((1, 4, 7, 7)))


@pytest.mark.parametrize("form", ["pow", "mul", "pow_sub_neg"])
def test_decomposed_layernorm_forms(form):
    """x - ReduceMean(x) as a Sub of two activations, squared by Pow(., 2) or Mul, eps before Sqrt."""
    C = 24
    g, b = (R.standard_normal(C) * 0.2 + 1).astype(np.float32), (R.standard_normal(C) * 0.1).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "Wi"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1])]
    if form == "pow_sub_neg":   # h + (-mu)
        nodes += [helper.make_node("Neg", ["mu"], ["nmu"]), helper.make_node("Add", ["h", "nmu"], ["d"])]
    else:
        nodes += [helper.make_node("Sub", ["h", "mu"], ["d"])]
    sq = helper.make_node("Pow", ["d", "two"], ["sq"]) if form != "mul" else helper.make_node("Mul", ["d", "d"], ["sq"])
    nodes += [sq, helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
              helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
              helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "g"], ["ng"]),
              helper.make_node("Add", ["ng", "b"], ["y"])]
    inits = [tensor("Wi", (R.standard_normal((16, C)) * 0.3).astype(np.float32)), tensor("two", np.float32(2)),
             tensor("eps", np.float32(1e-5)), tensor("g", g), tensor("b", b)]
    m = make_model(nodes, [("x", [1, 5, 16])], [("y", None)], inits, opset=17)
    prep, _, _ = check_pipeline(m, x_data((1, 5, 16)), min_cos=0.98)
    if form != "pow_sub_neg":
        assert any(n.op == "layernorm" for n in prep.int_graph.nodes)


def test_sub_of_two_activations_and_pow_table():
    """A box-decoding style head: Sub of two activations, Pow by a constant (a table), Max/Min."""
    c1, w1 = conv("W1", "x", "a", 3, 4)
    c2, w2 = conv("W2", "x", "b", 3, 4)
    nodes = [c1, c2, helper.make_node("Sub", ["a", "b"], ["d"]),
             helper.make_node("Pow", ["d", "p"], ["dp"]),
             helper.make_node("Max", ["a", "b", "cmax"], ["mx"]),
             helper.make_node("Min", ["a", "dp"], ["mn"]),
             helper.make_node("Add", ["mx", "mn"], ["y"])]
    inits = [w1, w2, tensor("p", np.float32(3.0)), tensor("cmax", np.float32(-0.5))]
    m = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", None), ("d", None)], inits)
    check_pipeline(m, x_data((1, 3, 8, 8)), min_cos=0.98)


def test_max_min_with_constants_become_clamps():
    nodes = [helper.make_node("Max", ["x", "lo"], ["m"]), helper.make_node("Min", ["m", "hi"], ["y"])]
    m = make_model(nodes, [("x", [1, 6, 5])], [("y", None)],
                   [tensor("lo", np.array([-0.3], np.float32)), tensor("hi", np.float32(0.8))])
    prep, _, _ = check_pipeline(m, x_data((1, 6, 5)))
    ops = [n.op for n in prep.int_graph.nodes]
    assert "clip" in ops and "minmax" not in ops


def test_masked_fill_where_equal_and_comparisons():
    """PyTorch masked_fill: Where(Equal(mask, 0), -inf, scores) -> Softmax; Less/Greater/Not/And/
    Or feeding a Cast; comparisons of two activations."""
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["s"]),
             helper.make_node("Equal", ["mask", "zero"], ["pad"]),
             helper.make_node("Where", ["pad", "ninf", "s"], ["sm"]),
             helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
             helper.make_node("Less", ["s", "thr"], ["lt"]),
             helper.make_node("Greater", ["x", "s8"], ["gt"]),
             helper.make_node("Not", ["lt"], ["nlt"]),
             helper.make_node("And", ["nlt", "gt"], ["both"]),
             helper.make_node("Or", ["both", "pad"], ["any"]),
             helper.make_node("Cast", ["any"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["p", "f"], ["y"])]
    inits = [tensor("Wq", (R.standard_normal((8, 8)) * 0.5).astype(np.float32)), tensor("zero", np.int64(0)),
             tensor("ninf", np.float32(-np.inf)), tensor("thr", np.float32(0.1)),
             tensor("s8", (R.standard_normal(8) * 0.3).astype(np.float32))]
    m = make_model(nodes, [("x", [1, 8, 8]), ("mask", [1, 8, 8], TensorProto.INT64)], [("y", None)], inits)
    rng = np.random.default_rng(5)
    calib = {"x": rng.standard_normal((8, 8, 8)).astype(np.float32),
             "mask": (rng.random((8, 8, 8)) > 0.3).astype(np.int64)}
    prep, tv, ref = check_pipeline(m, calib, min_cos=0.97)
    ops = {n.op for n in prep.int_graph.nodes}
    assert {"compare", "where", "logic"} <= ops


@pytest.mark.parametrize("kw", [
    dict(s=2, k=4, pads=[1, 1, 1, 1]),                      # the usual 2x upsampler
    dict(s=2, k=3, pads=[1, 1, 1, 1], output_padding=[1, 1]),
    dict(s=3, k=3, pads=[0, 2, 1, 0], group=2),
    dict(s=1, k=3, pads=[1, 1, 1, 1], dilations=[2, 2]),
    dict(s=2, k=2, auto_pad="SAME_UPPER"),
])
def test_conv_transpose(kw):
    C, OC, g = 4, 6, kw.pop("group", 1)
    k, s = kw.pop("k"), kw.pop("s")
    W = (R.standard_normal((C, OC // g, k, k)) * 0.3).astype(np.float32)
    B = (R.standard_normal(OC) * 0.2).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], kernel_shape=[k, k], strides=[s, s], group=g,
                              **kw),
             helper.make_node("Relu", ["c"], ["y"])]
    m = make_model(nodes, [("x", [1, C, 5, 6])], [("y", None)], [tensor("W", W), tensor("B", B)])
    prep, _, _ = check_pipeline(m, x_data((1, C, 5, 6)))
    assert not any(n.op.lower() == "convtranspose" for n in prep.float_graph.nodes)


@pytest.mark.parametrize("k,oc,bias,follow", [
    ([2, 2], 6, True, "Relu"),          # a 2x upsampler: kernel = stride
    ([2, 3], 5, False, None),           # anisotropic strides
    ([2, 2], 1, False, "Sigmoid"),      # a DBNet head's last layer: one output channel
    ([3, 3], 4, True, "BatchNormalization"),  # a BN after it, folded into the conv first
])
def test_conv_transpose_kernel_equals_stride_is_a_1x1_conv(k, oc, bias, follow):
    """passes/subpixel_deconv.py: no GatherFill, a 1x1 conv of oc * k0 * k1 channels + pixel shuffle;
    equal to ONNX Runtime within quantization and bit-exact to the reference (check_pipeline)."""
    r = np.random.default_rng(7)  # its own generator: the module's R stays as the later tests expect
    C = 4
    W = (r.standard_normal((C, oc) + tuple(k)) * 0.3).astype(np.float32)
    inits = [tensor("W", W)] + ([tensor("B", (r.standard_normal(oc) * 0.2).astype(np.float32))] if bias else [])
    nodes = [helper.make_node("ConvTranspose", ["x", "W"] + (["B"] if bias else []), ["c"], kernel_shape=k,
                              strides=k)]
    if follow == "BatchNormalization":
        inits += [tensor(n_, np.asarray(v, np.float32)) for n_, v in (("g", r.uniform(0.5, 2, oc)), ("b", r.standard_normal(oc) * 0.1),
                                               ("m", r.standard_normal(oc) * 0.1), ("v", r.uniform(0.5, 2, oc)))]
        nodes.append(helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]))
    elif follow:
        nodes.append(helper.make_node(follow, ["c"], ["y"]))
    out = "y" if follow else "c"
    m = make_model(nodes, [("x", [1, C, 5, 7])], [(out, None)], inits)
    prep, _, _ = check_pipeline(m, x_data((1, C, 5, 7)))
    fg = prep.float_graph
    assert not any(n.op == "GatherFill" for n in fg.nodes)
    conv = next(n for n in fg.nodes if n.op == "Conv")
    assert list(conv.attrs["kernel_shape"]) == [1, 1] and fg.shape(conv.outputs[0])[1] == oc * k[0] * k[1]


def test_conv_transpose_1d_kernel_equals_stride():
    W = (np.random.default_rng(8).standard_normal((3, 5, 2)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["y"], kernel_shape=[2], strides=[2])]
    m = make_model(nodes, [("x", [1, 3, 9])], [("y", None)], [tensor("W", W)])
    prep, _, _ = check_pipeline(m, x_data((1, 3, 9)))
    assert not any(n.op == "GatherFill" for n in prep.float_graph.nodes)


def test_conv_transpose_1d():
    W = (R.standard_normal((3, 5, 4)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["y"], kernel_shape=[4], strides=[2], pads=[1, 1])]
    m = make_model(nodes, [("x", [1, 3, 9])], [("y", None)], [tensor("W", W)])
    check_pipeline(m, x_data((1, 3, 9)))


@pytest.mark.parametrize("mode,ctm,extra", [
    ("linear", "half_pixel", {}),
    ("linear", "align_corners", {}),
    ("linear", "asymmetric", {}),
    ("linear", "pytorch_half_pixel", {}),
    ("cubic", "half_pixel", {"cubic_coeff_a": -0.75}),
    ("linear", "half_pixel", {"antialias": 1}),                 # a downscale with antialias
])
def test_resize_linear_and_cubic(mode, ctm, extra):
    down = extra.get("antialias")
    sizes = np.array([1, 4, 4, 3] if down else [1, 4, 14, 17], np.int64)
    nodes = [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode,
                              coordinate_transformation_mode=ctm, **extra)]
    m = make_model(nodes, [("x", [1, 4, 7, 6])], [("y", None)], [tensor("sizes", sizes)], opset=19)
    prep, _, _ = check_pipeline(m, x_data((1, 4, 7, 6)), min_cos=0.995)
    assert any(n.op == "resample" for n in prep.int_graph.nodes)


def test_resize_by_scales_after_conv():
    c, wt = conv("W", "x", "c", 3, 5)
    nodes = [c, helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="linear")]
    m = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", None)],
                   [wt, tensor("scales", np.array([1, 1, 2, 2], np.float32))], opset=19)
    check_pipeline(m, x_data((1, 3, 6, 6)), min_cos=0.995)


def test_log_softmax_and_argmax_ctc_head():
    """A CTC head: MatMul -> LogSoftmax (a log table over the 2^-15 integer softmax) -> ArgMax."""
    nodes = [helper.make_node("MatMul", ["x", "Wc"], ["z"]),
             helper.make_node("LogSoftmax", ["z"], ["lp"], axis=-1),
             helper.make_node("ArgMax", ["lp"], ["ids"], axis=2, keepdims=0),
             helper.make_node("ArgMin", ["z"], ["lo"], axis=1, keepdims=1, select_last_index=1)]
    m = make_model(nodes, [("x", [1, 12, 16])], [("lp", None), ("ids", None, TensorProto.INT64), ("lo", None, TensorProto.INT64)],
                   [tensor("Wc", (R.standard_normal((16, 9)) * 0.8).astype(np.float32))])
    prep, tv, ref = check_pipeline(m, x_data((1, 12, 16)), min_cos=0.9)  # indices: near-ties may flip
    from tests.helpers import ort_run
    want = ort_run(m, {"x": x_data((1, 12, 16))["x"][:1]})[1]
    assert (tv["ids"] == want).mean() >= 0.9


@pytest.mark.parametrize("op", ["InstanceNormalization", "GroupNormalization"])
def test_instance_and_group_norm(op):
    """Decomposed before calibration (passes/decompose_onnx.py) into the fused integer LayerNorm."""
    c, wt = conv("W", "x", "c", 3, 8)
    C = 8
    sc, bi = (R.standard_normal(C) * 0.3 + 1).astype(np.float32), (R.standard_normal(C) * 0.2).astype(np.float32)
    attrs = {"num_groups": 2} if op == "GroupNormalization" else {}
    opset = 21 if op == "GroupNormalization" else 17
    nodes = [c, helper.make_node(op, ["c", "s", "b"], ["y"], epsilon=1e-5, **attrs)]
    m = make_model(nodes, [("x", [1, 3, 9, 7])], [("y", [1, 8, 9, 7])], [wt, tensor("s", sc), tensor("b", bi)],
                   opset=opset)
    prep, _, _ = check_pipeline(m, x_data((1, 3, 9, 7)), min_cos=0.98)
    assert any(n.op == "layernorm" for n in prep.int_graph.nodes)


@pytest.mark.parametrize("op", ["ReduceSumSquare", "ReduceL2", "ReduceL1", "ReduceMin", "ReduceLogSumExp"])
def test_reductions_decomposed(op):
    c, wt = conv("W", "x", "c", 3, 6)
    nodes = [c, helper.make_node(op, ["c", "axes"], ["y"], keepdims=1)]
    m = make_model(nodes, [("x", [1, 3, 6, 5])], [("y", None)], [wt, tensor("axes", np.array([2, 3], np.int64))],
                   opset=18)
    check_pipeline(m, x_data((1, 3, 6, 5)), min_cos=0.98)


def test_gather_elements_nd_and_compress_with_constant_indices():
    idx = np.random.default_rng(2).integers(0, 5, (1, 3, 4)).astype(np.int64)
    nd = np.array([[0, 1], [0, 2]], np.int64)
    nodes = [helper.make_node("GatherElements", ["x", "ie"], ["a"], axis=2),
             helper.make_node("GatherND", ["x", "ind"], ["b"]),
             helper.make_node("Compress", ["x", "keep"], ["c"], axis=1)]
    m = make_model(nodes, [("x", [1, 3, 5])], [("a", None), ("b", None), ("c", None)],
                   [tensor("ie", idx), tensor("ind", nd), tensor("keep", np.array([1, 0, 1], bool))])
    check_pipeline(m, x_data((1, 3, 5)))


def test_bool_mask_input_and_logic_with_constants():
    """A bool model input (a padding mask) feeding Not / And with a constant / Where / Cast."""
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["s"]),
             helper.make_node("Not", ["mask"], ["pad"]),
             helper.make_node("And", ["pad", "on"], ["pad2"]),
             helper.make_node("Where", ["pad2", "big", "s"], ["y0"]),
             helper.make_node("Where", ["mask", "y0", "bias"], ["y1"]),
             helper.make_node("Where", ["pad", "bias", "big"], ["sel"]),
             helper.make_node("Add", ["y1", "sel"], ["y"]),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["y", "mf"], ["z"])]
    inits = [tensor("Wq", (R.standard_normal((8, 8)) * 0.5).astype(np.float32)), tensor("on", np.array(True)),
             tensor("big", np.float32(-0.5)), tensor("bias", (R.standard_normal((6, 8)) * 0.3).astype(np.float32))]
    m = make_model(nodes, [("x", [1, 6, 8]), ("mask", [1, 6, 8], TensorProto.BOOL)], [("z", None)], inits)
    rng = np.random.default_rng(7)
    calib = {"x": rng.standard_normal((8, 6, 8)).astype(np.float32), "mask": rng.random((8, 6, 8)) > 0.3}
    check_pipeline(m, calib, min_cos=0.97)


def test_integer_data_arithmetic_and_float_mod():
    """int64 widths / positions computed exactly (Add, Sub, Div, Mod, Neg, Max -> Equal -> Cast) beside a
    float Mod by a constant (a table)."""
    nodes = [helper.make_node("Add", ["w", "c3"], ["a"]), helper.make_node("Div", ["a", "c4"], ["d"]),
             helper.make_node("Mod", ["d", "c5"], ["m"]), helper.make_node("Neg", ["m"], ["nm"]),
             helper.make_node("Max", ["nm", "w"], ["mx"]), helper.make_node("Cast", ["mx"], ["mx32"], to=TensorProto.INT32),
             helper.make_node("Cast", ["mx32"], ["mx64"], to=TensorProto.INT64),
             helper.make_node("Equal", ["mx64", "w"], ["eq"]),
             helper.make_node("Cast", ["eq"], ["eqf"], to=TensorProto.FLOAT),
             helper.make_node("Mod", ["x", "fm"], ["xm"], fmod=1),
             helper.make_node("Add", ["xm", "eqf"], ["y"])]
    inits = [tensor("c3", np.int64(3)), tensor("c4", np.int64(-4)), tensor("c5", np.int64(5)),
             tensor("fm", np.float32(0.7))]
    m = make_model(nodes, [("x", [1, 6]), ("w", [1, 6], TensorProto.INT64)], [("y", None), ("d", None, TensorProto.INT64)],
                   inits)
    rng = np.random.default_rng(3)
    calib = {"x": rng.standard_normal((8, 6)).astype(np.float32), "w": rng.integers(-40, 40, (8, 6)).astype(np.int64)}
    prep, tv, ref = check_pipeline(m, calib, min_cos=0.97)
    assert "int_arith" in {n.op for n in prep.int_graph.nodes}


def test_constant_operand_broadcasting_the_activation_up():
    """x [1, 1, 8] + pos [1, 5, 8] (a learned positional table added to a pooled vector), then * c."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "pos"], ["a"]),
             helper.make_node("Mul", ["a", "c"], ["y"])]
    inits = [tensor("W", (R.standard_normal((8, 8)) * 0.5).astype(np.float32)),
             tensor("pos", (R.standard_normal((1, 5, 8)) * 0.5).astype(np.float32)),
             tensor("c", (R.standard_normal((2, 1, 1, 1)) + 1).astype(np.float32))]
    m = make_model(nodes, [("x", [1, 1, 8])], [("y", None)], inits)
    check_pipeline(m, x_data((1, 1, 8)))


def test_topk_values_and_indices():
    """TopK on the integers: values keep the input's scale, indices equal the float op's (ties by
    the lower index), with both largest and smallest."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"]),
             helper.make_node("TopK", ["z", "k"], ["v", "i"], axis=-1),
             helper.make_node("TopK", ["z", "k"], ["vs", "is"], axis=1, largest=0)]
    m = make_model(nodes, [("x", [1, 7, 12])], [("v", None), ("i", None, TensorProto.INT64),
                                                ("vs", None), ("is", None, TensorProto.INT64)],
                   [tensor("W", (R.standard_normal((12, 10)) * 0.8).astype(np.float32)),
                    tensor("k", np.array([3], np.int64))])
    prep, tv, ref = check_pipeline(m, x_data((1, 7, 12)), min_cos=0.9)  # indices: near-ties may flip
    want = ort_run(m, {"x": x_data((1, 7, 12))["x"][:1]})
    assert (tv["i"] == want[1]).mean() >= 0.8 and (tv["is"] == want[3]).mean() >= 0.8


def test_split_into_many_pieces_is_one_kernel():
    """A tensor cut into >= 8 pieces (qcompiler/intops/shape.py SPLIT_MIN): one multi-output kernel,
    the pieces' consumers identical kernels; bit-exact like any slice."""
    c, wt = conv("W", "x", "c", 3, 10)
    outs = [f"p{k}" for k in range(10)]
    nodes = [c, helper.make_node("Split", ["c", "sizes"], outs, axis=1)]
    nodes += [helper.make_node("Sigmoid", [o], [o + "s"]) for o in outs]
    nodes += [helper.make_node("Concat", [o + "s" for o in outs], ["y"], axis=1)]
    m = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", None)], [wt, tensor("sizes", np.ones(10, np.int64))])
    check_pipeline(m, x_data((1, 3, 6, 6)))


def test_concat_with_an_empty_piece():
    """A Concat with an empty input (a zero-length slice: eeg-spindle's head): the piece is dropped,
    and the library loads (an empty constant cannot be serialized by the TVM runtime)."""
    c, wt = conv("W", "x", "c", 3, 4)
    nodes = [c, helper.make_node("Slice", ["c", "s0", "s0", "ax"], ["empty"]),
             helper.make_node("Concat", ["c", "empty"], ["y"], axis=2)]
    m = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", None)],
                   [wt, tensor("s0", np.array([0], np.int64)), tensor("ax", np.array([2], np.int64))])
    check_pipeline(m, x_data((1, 3, 6, 6)))


def test_per_channel_affine_folded_into_tables():
    """Fourier features (trueocr-order): sin / cos of x * f_k with 12 frequencies spanning 2^11.  One
    per-tensor 8-bit scale for x * f_k rounds every low-frequency channel to 0 (output cosine ~0.1
    before qcompiler/intops/tables.py); folded into per-channel tables of x's codes it is exact up to
    the output rounding.  Also a per-channel Mul + Add + Relu (an Affine with a fused clamp) before a
    Sigmoid.  The inputs lie on the 8-bit grid (multiples of 1/127, |x| = 1 reached), so the input
    quantization is exact and the high frequencies must agree too."""
    freqs = (np.pi / 2 * 2.0 ** np.arange(12)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["xu"]), helper.make_node("Mul", ["xu", "f"], ["xf"]),
             helper.make_node("Sin", ["xf"], ["s"]), helper.make_node("Cos", ["xf"], ["c"]),
             helper.make_node("Concat", ["s", "c"], ["y"], axis=-1),
             helper.make_node("Mul", ["x", "k"], ["xk"]), helper.make_node("Add", ["xk", "o"], ["xo"]),
             helper.make_node("Relu", ["xo"], ["xr"]), helper.make_node("Sigmoid", ["xr"], ["zs"]),
             helper.make_node("Add", ["zs", "zs"], ["z"])]  # not a graph output itself (that takes int16)
    inits = [tensor("ax", np.array([-1], np.int64)), tensor("f", freqs),
             tensor("k", np.array([0.01, 1.0, 30.0, 800.0], np.float32)),
             tensor("o", np.array([0.5, -0.2, 0.0, -300.0], np.float32))]
    m = make_model(nodes, [("x", [1, 6, 4])], [("y", None), ("z", None)], inits)
    rng = np.random.default_rng(5)
    x = rng.integers(-127, 128, (8, 6, 4)).astype(np.float32) / 127
    x[:, 0, 0], x[:, 0, 1] = 1.0, -1.0
    prep, tv, ref = check_pipeline(m, {"x": x}, min_cos=0.999)
    ops = [n.op for n in prep.int_graph.nodes]
    assert ops.count("lut_ch") == 3 and "lut" not in ops


def _wide_table_vs_8_bits(monkeypatch, m, x, min_cos, narrow):
    """The table of ``m`` takes a 16-bit input through 65536 entries; with ``narrow`` (attribute
    patches of passes.quantize) it takes 8 bits.  Returns the output cosines vs onnxruntime of the
    16-bit and the 8-bit integer graphs, one per sample of ``x``."""
    import tempfile

    import passes.quantize as Q
    from qcompiler import reference
    from qcompiler.driver import CompileOptions, prepare
    from qcompiler.targets import parse_target
    from tests.helpers import cosine, save

    prep, tv, ref = check_pipeline(m, {"x": x}, min_cos=min_cos)
    ig = prep.int_graph
    lut = next(n for n in ig.nodes if n.op == "lut")
    assert ig.dtypes[lut.inputs[0]] == "int16" and lut.attrs["table"].size == 65536
    for obj, name, value in narrow(Q):
        monkeypatch.setattr(obj, name, value)
    out = m.graph.output[0].name
    with tempfile.TemporaryDirectory() as d:
        path = save(m, d)
        ig8 = prepare(path, {"x": x}, CompileOptions(target=parse_target("cpu"))).int_graph
        want = [ort_run(path, {"x": x[i:i + 1]})[0] for i in range(len(x))]
    return ([cosine(reference.execute(g, {"x": x[i:i + 1]})[out], want[i]) for i in range(len(x))]
            for g in (ig, ig8))


def test_log_of_a_wide_ranged_input_takes_16_bits(monkeypatch):
    """Log of a power-like quantity spanning decades (a log-mel spectrogram): with an 8-bit input
    everything below 1/127 of the range is one code (output cosine ~0.83 here); Log takes a 16-bit
    input through a 65536-entry table (qcompiler/intops/elementwise.py WIDE_TABLES) and its producer
    emits int16 (~0.98, the rest is the 8-bit h the square is made of)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "h"], ["p"]),
             helper.make_node("Add", ["p", "eps"], ["pe"]), helper.make_node("Log", ["pe"], ["y"])]
    inits = [tensor("W", (rng.standard_normal((16, 12)) * 0.5).astype(np.float32)), tensor("eps", np.float32(1e-4))]
    m = make_model(nodes, [("x", [1, 6, 16])], [("y", None)], inits)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((8, 6, 16)) * np.exp(rng.uniform(-3, 1, (8, 6, 1)))).astype(np.float32)
    wide, narrow = _wide_table_vs_8_bits(
        monkeypatch, m, x, 0.95,
        lambda Q: [(Q, "WIDE_CONSUMERS", Q.WIDE_CONSUMERS - {"Log"}),            # the 8-bit table it replaces
                   (Q.Quantizer, "_output_table", lambda self, u: False),         # (a graph output's table too)
                   (Q.Quantizer, "_small_table", lambda self, u: False)])         # (and a small tensor's)
    assert narrow[0] < 0.9 < 0.95 <= wide[0]


def test_sqrt_of_a_small_power_spectrum_takes_16_bits(monkeypatch):
    """The magnitude of a short frame's spectrum, sqrt(re^2 + im^2), then a layer: the power spans
    decades, and at 8 bits every bin below 1/127 of the loudest is one code (silero-vad's STFT: the
    magnitude lost, output cosine 0.83).  A unary table of a small tensor (at most SMALL_TABLE_INPUT
    elements per sample, passes/quantize.py ``_small_table``) takes a 16-bit input."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "Wr"], ["re"]), helper.make_node("MatMul", ["x", "Wi"], ["im"]),
             helper.make_node("Mul", ["re", "re"], ["r2"]), helper.make_node("Mul", ["im", "im"], ["i2"]),
             helper.make_node("Add", ["r2", "i2"], ["p"]), helper.make_node("Sqrt", ["p"], ["mag"]),
             helper.make_node("MatMul", ["mag", "Wo"], ["y"])]
    inits = [tensor(k, (rng.standard_normal(s) * 0.5).astype(np.float32))
             for k, s in (("Wr", (16, 12)), ("Wi", (16, 12)), ("Wo", (12, 4)))]
    m = make_model(nodes, [("x", [1, 6, 16])], [("y", None)], inits)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((8, 6, 16)) * np.exp(rng.uniform(-4, 1, (8, 6, 1)))).astype(np.float32)
    wide, narrow = _wide_table_vs_8_bits(monkeypatch, m, x, 0.98,
                                         lambda Q: [(Q.Quantizer, "_small_table", lambda self, u: False)])
    assert min(narrow) < 0.99 <= min(wide), (narrow, wide)   # (0.975 vs 0.9995 measured)


def test_output_sigmoid_takes_a_16_bit_input():
    """A detector's score head: Conv -> Sigmoid -> Reshape -> graph output, logits mostly far below 0
    (scores ~1e-4): an 8-bit logit step leaves the tail a few codes (median relative error 2.8% here);
    a table that makes a graph output takes its input in 16 bits (65536 entries, passes/quantize.py
    ``_output_table``): 0.8%, the rest from the 8-bit model input."""
    c, wt = conv("W", "x", "c", 3, 4)
    nodes = [c, helper.make_node("Add", ["c", "b"], ["cb"]), helper.make_node("Sigmoid", ["cb"], ["s"]),
             helper.make_node("Reshape", ["s", "shp"], ["y"])]
    m = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", None)],
                   [wt, tensor("b", np.full((1, 4, 1, 1), -9.0, np.float32)),
                    tensor("shp", np.array([1, -1], np.int64))])
    data = x_data((1, 3, 6, 6))
    prep, tv, ref = check_pipeline(m, data, min_cos=0.999)
    ig = prep.int_graph
    lut = next(n for n in ig.nodes if n.op in ("lut", "lut_ch"))
    assert ig.dtypes[lut.inputs[0]] == "int16" and lut.attrs["table"].shape[-1] == 65536
    f = ort_run(m, {"x": data["x"][:1]})[0]
    assert np.median(np.abs(ref["y"] - f) / f) < 0.015


def test_an_output_folded_to_a_constant():
    """An output that is a constant at the frozen shapes (a feature length from
    ConstantOfShape(Shape(lens)), an onnx-asr front end's): the library returns it as it is; before,
    the quantizer stopped ("used before it is quantized")."""
    r = np.random.default_rng(31)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"]),
             helper.make_node("Shape", ["lens"], ["n"]),
             helper.make_node("ConstantOfShape", ["n"], ["y_lens"],
                              value=helper.make_tensor("v", TensorProto.INT64, [1], [300]))]
    m = make_model(nodes, [("x", [1, 4, 6]), ("lens", [1], TensorProto.INT64)],
                   [("y", None), ("y_lens", None, TensorProto.INT64)],
                   [tensor("W", (r.standard_normal((6, 5)) * 0.5).astype(np.float32))])
    calib = {"x": r.standard_normal((4, 4, 6)).astype(np.float32), "lens": np.full((4, 1), 4, np.int64)}
    prep, tv, ref = check_pipeline(m, calib, test={"x": calib["x"][:1], "lens": np.array([4], np.int64)})
    assert np.array_equal(ref["y_lens"], [300]) and np.array_equal(tv["y_lens"], [300])
