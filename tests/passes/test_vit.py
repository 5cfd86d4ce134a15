"""A ViT structure built here (patch-embedding conv, class token, position embedding, pre-norm
blocks with attention and a GELU MLP, final LayerNorm, class-token head): float passes exact, the
integer model close to float, TVM == NumPy reference element for element at batch 2, and the
library integer-only by the TIR scan."""

from __future__ import annotations

import numpy as np
from onnx import helper

from tests.helpers import check_pipeline, make_model, tensor

R = np.random.default_rng(11)
B, IMG, P, D, H, F = 2, 16, 4, 32, 4, 64
T = (IMG // P) ** 2 + 1


def _f(*shape, s=1.0):
    return (s * R.standard_normal(shape)).astype(np.float32)


def vit_model(blocks=2):
    dh = D // H
    nodes = [helper.make_node("Conv", ["img", "Wp", "bp"], ["pe"], kernel_shape=[P, P], strides=[P, P]),
             helper.make_node("Reshape", ["pe", "s_bdn"], ["pe2"]),
             helper.make_node("Transpose", ["pe2"], ["tok"], perm=[0, 2, 1]),
             helper.make_node("Expand", ["cls", "s_b1d"], ["clsb"]),
             helper.make_node("Concat", ["clsb", "tok"], ["seq"], axis=1),
             helper.make_node("Add", ["seq", "pos"], ["x0"])]
    inits = [tensor("Wp", _f(D, 3, P, P, s=0.2)), tensor("bp", _f(D, s=0.1)),
             tensor("s_bdn", np.array([B, D, -1], np.int64)), tensor("s_b1d", np.array([B, 1, D], np.int64)),
             tensor("cls", _f(1, 1, D, s=0.5)), tensor("pos", _f(1, T, D, s=0.2)),
             tensor("s4", np.array([B, T, H, dh], np.int64)), tensor("s3", np.array([B, T, D], np.int64)),
             tensor("sq", np.array(np.sqrt(dh), np.float32)), tensor("half", np.array(0.5, np.float32)),
             tensor("one", np.array(1.0, np.float32)), tensor("r2", np.array(np.sqrt(2.0), np.float32))]
    x = "x0"
    for i in range(blocks):
        p = f"b{i}_"
        inits += [tensor(p + "g1", 1 + _f(D, s=0.1)), tensor(p + "be1", _f(D, s=0.1)),
                  tensor(p + "g2", 1 + _f(D, s=0.1)), tensor(p + "be2", _f(D, s=0.1))]
        for w, shape in (("Wq", (D, D)), ("Wk", (D, D)), ("Wv", (D, D)), ("Wo", (D, D)), ("W1", (D, F)), ("W2", (F, D))):
            inits.append(tensor(p + w, _f(*shape, s=1 / np.sqrt(shape[0]))))
        inits += [tensor(p + "b1", _f(F, s=0.1)), tensor(p + "b2", _f(D, s=0.1))]
        nodes += [
            helper.make_node("LayerNormalization", [x, p + "g1", p + "be1"], [p + "ln1"], axis=-1, epsilon=1e-6),
            helper.make_node("MatMul", [p + "ln1", p + "Wq"], [p + "q"]),
            helper.make_node("MatMul", [p + "ln1", p + "Wk"], [p + "k"]),
            helper.make_node("MatMul", [p + "ln1", p + "Wv"], [p + "v"]),
            helper.make_node("Reshape", [p + "q", "s4"], [p + "q4"]),
            helper.make_node("Transpose", [p + "q4"], [p + "qt"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "k", "s4"], [p + "k4"]),
            helper.make_node("Transpose", [p + "k4"], [p + "kt"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [p + "v", "s4"], [p + "v4"]),
            helper.make_node("Transpose", [p + "v4"], [p + "vt"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [p + "qt", p + "kt"], [p + "s"]),
            helper.make_node("Div", [p + "s", "sq"], [p + "ss"]),
            helper.make_node("Softmax", [p + "ss"], [p + "a"], axis=-1),
            helper.make_node("MatMul", [p + "a", p + "vt"], [p + "o"]),
            helper.make_node("Transpose", [p + "o"], [p + "ot"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "ot", "s3"], [p + "o3"]),
            helper.make_node("MatMul", [p + "o3", p + "Wo"], [p + "proj"]),
            helper.make_node("Add", [x, p + "proj"], [p + "r1"]),
            helper.make_node("LayerNormalization", [p + "r1", p + "g2", p + "be2"], [p + "ln2"], axis=-1, epsilon=1e-6),
            helper.make_node("MatMul", [p + "ln2", p + "W1"], [p + "h0"]),
            helper.make_node("Add", [p + "h0", p + "b1"], [p + "h1"]),
            helper.make_node("Div", [p + "h1", "r2"], [p + "gd"]),
            helper.make_node("Erf", [p + "gd"], [p + "ge"]),
            helper.make_node("Add", [p + "ge", "one"], [p + "gp"]),
            helper.make_node("Mul", [p + "h1", p + "gp"], [p + "gm"]),
            helper.make_node("Mul", [p + "gm", "half"], [p + "g"]),
            helper.make_node("MatMul", [p + "g", p + "W2"], [p + "m0"]),
            helper.make_node("Add", [p + "m0", p + "b2"], [p + "m1"]),
            helper.make_node("Add", [p + "r1", p + "m1"], [p + "out"]),
        ]
        x = p + "out"
    inits += [tensor("gf", 1 + _f(D, s=0.1)), tensor("bf", _f(D, s=0.1)), tensor("idx0", np.array([0], np.int64)),
              tensor("Wh", _f(D, 10, s=1 / np.sqrt(D))), tensor("bh", _f(10, s=0.1))]
    nodes += [helper.make_node("LayerNormalization", [x, "gf", "bf"], ["lnf"], axis=-1, epsilon=1e-6),
              helper.make_node("Gather", ["lnf", "idx0"], ["c0"], axis=1),
              helper.make_node("Reshape", ["c0", "s_bd"], ["c"]),
              helper.make_node("Gemm", ["c", "Wh", "bh"], ["logits"])]
    inits.append(tensor("s_bd", np.array([B, D], np.int64)))
    return make_model(nodes, [("img", [B, 3, IMG, IMG])], [("logits", None)], inits)


def test_vit_structure_bit_exact_and_integer_only():
    from qcompiler.lowering.build import build
    from qcompiler.tir_scan import scan_tir

    m = vit_model()
    calib = {"img": R.standard_normal((16, 3, IMG, IMG)).astype(np.float32)}
    test = {"img": R.standard_normal((B, 3, IMG, IMG)).astype(np.float32)}
    prep, tv, ref = check_pipeline(m, calib, test, min_cos=0.99, opts_kw={"batch": B})
    ops = {n.op for n in prep.int_graph.nodes}
    assert {"conv", "layernorm", "gelu", "softmax", "matmul", "dense", "concat"} <= ops, ops
    res = build(prep.int_graph, prep_target())
    rep = scan_tir(res.tir)
    assert rep.integer_only, rep


def prep_target():
    from qcompiler.targets import parse_target

    return parse_target("cpu").tvm_target()
