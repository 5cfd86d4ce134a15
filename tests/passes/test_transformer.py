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
