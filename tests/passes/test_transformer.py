"""Transformer plumbing through the whole pipeline (float passes exact, quantized close to float,
TVM == NumPy reference element for element): embedding lookup, attention with an additive mask
and the 1/sqrt(d) scale folded into the Q.K^T requantization, masked mean pooling with an integer
division, padded sequences of different lengths at batch > 1."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from qcompiler import reference
from tests.helpers import attention_and_mean_pool, check_pipeline, make_model, tensor

R = np.random.default_rng(7)
B, S, D, H = 2, 8, 16, 2


def _mask(n, lens):
    m = np.zeros((n, S), np.int64)
    for i, L in enumerate(lens):
        m[i, :L] = 1
    return m


def _attention_model():
    dh = D // H
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Add", ["emb", "pos"], ["x"]),
        helper.make_node("MatMul", ["x", "Wq"], ["q0"]), helper.make_node("Add", ["bq", "q0"], ["q1"]),
        helper.make_node("MatMul", ["x", "Wk"], ["k0"]),
        helper.make_node("MatMul", ["x", "Wv"], ["v0"]),
        helper.make_node("Unsqueeze", ["mask", "ax1"], ["m1"]), helper.make_node("Unsqueeze", ["m1", "ax1"], ["m2"]),
        helper.make_node("Cast", ["m2"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mf"], ["inv"]), helper.make_node("Mul", ["inv", "big"], ["madd"]),
        *attention_and_mean_pool("q1"),
    ]
    f = np.float32
    inits = [tensor("table", R.standard_normal((50, D)).astype(f)), tensor("pos", (0.1 * R.standard_normal((1, S, D))).astype(f)),
             tensor("Wq", (R.standard_normal((D, D)) / 4).astype(f)), tensor("bq", (0.1 * R.standard_normal(D)).astype(f)),
             tensor("Wk", (R.standard_normal((D, D)) / 4).astype(f)), tensor("Wv", (R.standard_normal((D, D)) / 4).astype(f)),
             tensor("shp4", np.array([B, S, H, dh], np.int64)), tensor("shp3", np.array([B, S, D], np.int64)),
             tensor("sqrtd", np.array(np.sqrt(dh), f)), tensor("ax1", np.array([1], np.int64)),
             tensor("axm1", np.array([-1], np.int64)),
             tensor("one", np.array(1.0, f)), tensor("big", np.array(np.finfo(np.float32).min, f)),
             tensor("eps", np.array(1e-9, f))]
    return make_model(nodes, [("ids", [B, S], TensorProto.INT64), ("mask", [B, S], TensorProto.INT64)],
                      [("res", None), ("pooled", None)], inits)


def test_attention_mask_embedding_and_masked_mean_pool():
    m = _attention_model()
    calib = {"ids": R.integers(0, 50, (16, S)).astype(np.int64),
             "mask": np.concatenate([_mask(8, R.integers(3, S + 1, 8)), np.ones((8, S), np.int64)])}
    test = {"ids": R.integers(0, 50, (B, S)).astype(np.int64), "mask": _mask(B, [3, S])}
    prep, tv, ref = check_pipeline(m, calib, test, min_cos=0.99, opts_kw={"batch": B})
    ig = prep.int_graph
    ops = {n.op for n in ig.nodes}
    assert {"embedding", "maskadd", "div", "int_cast", "matmul"} <= ops, ops
    # the 1/sqrt(d) went into the scores' requantization: the Q.K^T matmul writes the Div's output
    # directly (no node of its own for the Div), with a multiplier of S_q * S_k / sqrt(d) / S_out
    qk = next(n for n in ig.nodes if n.op == "matmul" and n.inputs == ["q", "kT"])
    assert qk.outputs == ["s1"] and not any("s0" in n.inputs or "s0" in n.outputs for n in ig.nodes)
    assert not any(n.op in ("div", "requant", "mul") and n.inputs[:1] == ["s1"] for n in ig.nodes)
    sq, sk = qk.attrs["in_scales"]
    real = float(np.asarray(qk.attrs["mult"])) * 2.0 ** -float(np.asarray(qk.attrs["shift"]))
    want = sq * sk / np.sqrt(D // H) / qk.attrs["out_scale"]
    assert abs(real / want - 1) < 1e-6, (real, want)  # (without the fold it would be sqrt(d) = 2.83x this)
    # padded positions get exactly zero attention: other ids there change nothing on the real tokens
    garbage = test["ids"].copy()
    garbage[test["mask"] == 0] = (garbage[test["mask"] == 0] + 17) % 50
    assert not np.array_equal(garbage, test["ids"])
    ref2 = reference.execute(ig, {"ids": garbage, "mask": test["mask"]})
    assert np.array_equal(ref2["pooled"], ref["pooled"])
    real_tok = test["mask"].astype(bool)
    assert np.array_equal(ref2["res"][real_tok], ref["res"][real_tok])
    assert not np.array_equal(ref2["res"][~real_tok], ref["res"][~real_tok])  # the padding itself did change


def test_padding_does_not_change_the_unpadded_tokens():
    """Same sentence, once alone and once padded with garbage ids: identical integer results on the
    real tokens (the mask removes the padding from every softmax row exactly)."""
    m = _attention_model()
    calib = {"ids": R.integers(0, 50, (16, S)).astype(np.int64),
             "mask": np.concatenate([_mask(8, R.integers(3, S + 1, 8)), np.ones((8, S), np.int64)])}
    ids = R.integers(0, 50, (1, S)).astype(np.int64)
    ids2 = ids.copy()
    ids2[0, 5:] = R.integers(0, 50, S - 5)
    test = {"ids": np.concatenate([ids, ids2]), "mask": _mask(B, [5, 5])}
    prep, tv, ref = check_pipeline(m, calib, test, min_cos=0.99, opts_kw={"batch": B})
    assert np.array_equal(tv["pooled"][0], tv["pooled"][1])
    assert np.array_equal(tv["res"][0, :5], tv["res"][1, :5])


def test_padding_invariance_with_different_lengths_in_one_batch():
    """Two sentences of different lengths (3 and 6 of 8 tokens) in one batch, padded with two
    different sets of garbage ids: the library's results on the real tokens are identical."""
    from qcompiler.lowering.build import build
    from tests.helpers import run_tvm

    prep, rng = _prepared_attention()
    ig = prep.int_graph
    mask = _mask(B, [3, 6])
    ids = rng.integers(0, 50, (B, S)).astype(np.int64)
    other = ids.copy()
    other[mask == 0] = (ids[mask == 0] + 1 + rng.integers(0, 48, int((mask == 0).sum()))) % 50
    assert np.all(other[mask == 0] != ids[mask == 0]) and np.array_equal(other[mask == 1], ids[mask == 1])
    from qcompiler.targets import parse_target

    res = build(ig, parse_target("cpu").tvm_target())
    outs = [run_tvm(res.executable, ig, {"ids": x, "mask": mask}) for x in (ids, other)]
    for x, o in zip((ids, other), outs):
        r = reference.execute(ig, {"ids": x, "mask": mask})
        assert all(np.array_equal(o[k], r[k]) and o[k].shape == r[k].shape for k in ig.outputs)
    real = mask.astype(bool)
    assert np.array_equal(outs[0]["pooled"], outs[1]["pooled"])
    assert np.array_equal(outs[0]["res"][real], outs[1]["res"][real])
    assert not np.array_equal(outs[0]["res"][~real], outs[1]["res"][~real])


def _prepared_attention():
    import tempfile

    from qcompiler.driver import CompileOptions, prepare
    from qcompiler.targets import parse_target
    from tests.helpers import save

    rng = np.random.default_rng(11)
    calib = {"ids": rng.integers(0, 50, (16, S)).astype(np.int64),
             "mask": np.concatenate([_mask(8, rng.integers(3, S + 1, 8)), np.ones((8, S), np.int64)])}
    with tempfile.TemporaryDirectory() as d:
        path = save(_attention_model(), d)
        prep = prepare(path, calib, CompileOptions(target=parse_target("cpu"), batch=B))
    return prep, rng


def test_attention_matmuls_run_on_the_vnni_kernel():
    """Q.K^T (int8 x int8) and P.V (uint8 x int8) are batched VNNI kernels with the requantization
    fused (no generic fallback), and the library equals the NumPy reference element for element."""
    import pytest

    from qcompiler import reference
    from qcompiler.kernels.cpu_vnni import host_has_vnni
    from qcompiler.lowering.build import build
    from tests.helpers import run_tvm

    if not host_has_vnni():
        pytest.skip("CPU without AVX-512 VNNI")
    import tvm

    prep, rng = _prepared_attention()
    res = build(prep.int_graph, tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}))
    assert res.gemm_name == "cpu_vnni"
    assert res.fallbacks == []
    assert res.gemm_kernels.get("matmul_vnni") == 2, res.gemm_kernels
    # the matmul kernels are opaque call_tir's: no Relax matmul is left in the lowered module
    assert "R.matmul" not in res.relax_mod.script()
    test = {"ids": rng.integers(0, 50, (B, S)).astype(np.int64), "mask": _mask(B, [3, S])}
    tv, ref = run_tvm(res.executable, prep.int_graph, test), reference.execute(prep.int_graph, test)
    for name in ("res", "pooled"):
        np.testing.assert_array_equal(tv[name], ref[name])


def test_attention_matmuls_compile_on_the_mma_kernel():
    """The same graph for CUDA (compile only): both matmuls are batched tensor-core kernels."""
    import re

    from qcompiler.kernels import cuda_mma as cm
    from qcompiler.lowering.build import build

    prep, _ = _prepared_attention()
    res = build(prep.int_graph, cm.cuda_target("sm_80"))
    assert res.gemm_name == "cuda_mma" and res.fallbacks == []
    assert res.gemm_kernels.get("matmul_mma") == 2, res.gemm_kernels
    src = cm.cuda_source(res.executable)
    kernels = set(re.findall(r"void __launch_bounds__\(\d+\) (matmul_mma\w*)\(", src))
    assert len(kernels) == 2, kernels
    assert "mma.sync.aligned.m16n8k32" in src


def test_out_of_range_token_ids_are_refused(tmp_path):
    """Token ids beyond the embedding table: a clear error from the runtime, not garbage or a crash."""
    import onnx
    import pytest

    from qcompiler import load
    from qcompiler.driver import CompileOptions, compile_model
    from qcompiler.errors import QCError
    from qcompiler.targets import parse_target

    m = _attention_model()
    onnx.save(m, tmp_path / "m.onnx")
    calib = {"ids": R.integers(0, 50, (8, S)).astype(np.int64), "mask": _mask(8, R.integers(3, S + 1, 8))}
    compile_model(tmp_path / "m.onnx", tmp_path / "m.so", calib, CompileOptions(target=parse_target("cpu"), batch=B))
    lib = load(str(tmp_path / "m.so"))
    ok = {"ids": R.integers(0, 50, (B, S)).astype(np.int64), "mask": _mask(B, [3, S])}
    lib(**ok)
    bad = dict(ok, ids=ok["ids"].copy())
    bad["ids"][1, 2] = 50
    with pytest.raises(QCError, match="outside the valid range"):
        lib(**bad)
    bad["ids"][1, 2] = -1
    with pytest.raises(QCError, match="outside the valid range"):
        lib(**bad)


def _t5_attention(bias_kind: str):
    """One T5-style self-attention: scores + (position bias + mask term), the mask term
    (1 - mask) * finfo.min sliced to the key length (HF T5's export); ``bias_kind``: "const" (the
    relative position bias folded at fixed shapes: an Affine's per-element offset) or "act" (a bias
    computed from the input)."""
    r = np.random.default_rng(21)
    f, dh = np.float32, D // H
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q0"]), helper.make_node("MatMul", ["x", "Wk"], ["k0"]),
             helper.make_node("MatMul", ["x", "Wv"], ["v0"])]
    for t in ("q", "k", "v"):
        nodes += [helper.make_node("Reshape", [t + "0", "hs"], [t + "1"]),
                  helper.make_node("Transpose", [t + "1"], [t + "2"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k2"], ["kT"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q2", "kT"], ["scores"]),
              helper.make_node("Unsqueeze", ["mask", "ax12"], ["m4"]),
              helper.make_node("Cast", ["m4"], ["mf"], to=TensorProto.FLOAT),
              helper.make_node("Sub", ["one", "mf"], ["inv"]),
              helper.make_node("Mul", ["inv", "big"], ["mterm"]),
              helper.make_node("Slice", ["mterm", "s0", "sS", "ax3"], ["mslice"])]
    inits = [tensor(n_, (r.standard_normal((D, D)) * 0.4).astype(f)) for n_ in ("Wq", "Wk", "Wv")]
    inits += [tensor("hs", np.array([B, S, H, dh], np.int64)), tensor("ax12", np.array([1, 2], np.int64)),
              tensor("one", np.array(1.0, f)), tensor("big", np.array(np.finfo(np.float32).min, f)),
              tensor("s0", np.array([0], np.int64)), tensor("sS", np.array([S], np.int64)),
              tensor("ax3", np.array([3], np.int64))]
    if bias_kind == "const":
        inits.append(tensor("pb", (r.standard_normal((1, H, S, S)) * 0.5).astype(f)))
    else:
        nodes += [helper.make_node("MatMul", ["x", "Wb"], ["b0"]),
                  helper.make_node("Reshape", ["b0", "bs"], ["b1"]),
                  helper.make_node("Transpose", ["b1"], ["pb"], perm=[0, 2, 1, 3])]
        inits += [tensor("Wb", (r.standard_normal((D, H * S)) * 0.2).astype(f)),
                  tensor("bs", np.array([B, S, H, S], np.int64))]
    nodes += [helper.make_node("Add", ["pb", "mslice"], ["bias"]),
              helper.make_node("Add", ["scores", "bias"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v2"], ["y"])]
    return make_model(nodes, [("x", [B, S, D]), ("mask", [B, S], TensorProto.INT64)], [("y", None)], inits)


def test_t5_mask_added_to_a_position_bias_is_a_mask_add():
    """passes/fuse_attention.py: scores + (bias + sliced mask term) -> MaskAdd(scores + bias, mask),
    for a constant and a computed bias; the finfo.min fills stay out of every calibrated range
    (qcompiler/calibrate.py FILL_MAGNITUDE), padded keys get exactly zero weight (the outputs at
    kept queries equal those of the unpadded sequence), bit-exact (check_pipeline)."""
    for kind in ("const", "act"):
        m = _t5_attention(kind)
        calib = {"x": R.standard_normal((8, S, D)).astype(np.float32),
                 "mask": np.concatenate([_mask(4, [8, 6, 5, 3]), np.ones((4, S), np.int64)])}
        test = {"x": calib["x"][:B], "mask": _mask(B, [5, 8])}
        prep, tv, _ = check_pipeline(m, calib, test=test, min_cos=0.98)
        fg = prep.float_graph
        assert sum(n.op == "MaskAdd" for n in fg.nodes) == 1, kind
        assert not any(n.op == "Affine" and np.abs(np.asarray(n.attrs["scale"])).max() > 1e30 for n in fg.nodes)
        # a padded key changes nothing at the kept queries ([B, H, S, dh]): garbage past the mask
        x2 = test["x"].copy()
        x2[0, 5:] = 7.0
        got = reference.execute(prep.int_graph, {"x": x2, "mask": test["mask"]})["y"]
        ref = reference.execute(prep.int_graph, test)["y"]
        if kind == "const":  # (a computed bias reads the garbage too, at the kept queries' rows)
            assert np.array_equal(got[0, :, :5], ref[0, :, :5])


def test_causal_fill_folded_into_a_bias_saturates():
    """A decoder's causal mask folded with its position bias into one constant offset holding
    finfo.min (no mask input): the Affine's offset saturates the output (intops/elementwise.py
    affine), so a future position gets the lowest code and no int64 overflow; bit-exact."""
    r = np.random.default_rng(3)
    f = np.float32
    causal = np.triu(np.full((S, S), np.finfo(f).min, f), 1)
    pb = (r.standard_normal((1, H, S, S)) * 0.5).astype(f) + causal
    nodes = [helper.make_node("MatMul", ["x", "W"], ["s0"]), helper.make_node("Reshape", ["s0", "sh"], ["scores"]),
             helper.make_node("Add", ["scores", "pb"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["p"], axis=-1)]
    inits = [tensor("W", (r.standard_normal((D, H * S)) * 0.4).astype(f)), tensor("pb", pb),
             tensor("sh", np.array([B, H, S, S], np.int64))]
    m = make_model(nodes, [("x", [B, S, D])], [("p", None)], inits)
    x = {"x": R.standard_normal((8, S, D)).astype(np.float32)}
    prep, tv, ref = check_pipeline(m, x, test={"x": x["x"][:B]}, min_cos=0.98)
    iu = np.triu_indices(S, 1)
    assert np.all(ref["p"][..., iu[0], iu[1]] == 0)  # a future position: exactly zero weight
