"""``qc compile --allow-float``: ops without an integer form kept in float islands.

Strict integer-only is the default: a model with such an op fails in one line naming the op and the
flag (exit code 2, no output).  With the flag the library builds, runs, says ``integer_only:
false`` in model.json and ``qc inspect``, lists every island (node, op, reason, kernels), and its
outputs are close to ONNX Runtime FP32 and within one quantization step of the integer reference
(the island's float semantics are ONNX Runtime's in the reference and TVM's in the library).

The three ways a node becomes an island: an op canonicalization has no form for (Trilu, CumSum; a
custom domain), a rule whose check refuses the node (PRelu with an activation slope), an op
without a quantization rule (Cos with its rule removed).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler import reference
from qcompiler.cli import main
from qcompiler.driver import CompileOptions, compile_model, prepare
from qcompiler.errors import UnsupportedOpError
from qcompiler.targets import parse_target
from tests.helpers import cosine, make_model, ort_run, tensor

RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _silent_reporter():
    """``qc`` commands install a reporter on the (captured) stderr; the next test gets a silent one."""
    from qcompiler import progress

    progress.set_reporter(progress.Reporter())
    yield
    progress.set_reporter(progress.Reporter())
D = (RNG.standard_normal((16, 16)) * 0.3).astype(np.float32)


def _topk_model():
    """x -> MatMul -> TopK (integer: values keep the scale, indices int64) -> values * 0.5; MatMul ->
    CumSum and Trilu (the islands)."""
    nodes = [helper.make_node("MatMul", ["x", "D"], ["h"], name="fc"),
             helper.make_node("TopK", ["h", "k"], ["topv", "topi"], axis=1, name="topk"),
             helper.make_node("Mul", ["topv", "half"], ["scaled"], name="scale"),
             helper.make_node("CumSum", ["h", "ax"], ["cs"], name="cumsum"),
             helper.make_node("Trilu", ["h"], ["tri"], name="trilu")]
    return make_model(nodes, [("x", [2, 16])],
                      [("topv", [2, 4]), ("topi", [2, 4], TensorProto.INT64), ("scaled", [2, 4]), ("cs", [2, 16]),
                       ("tri", [2, 16])],
                      [tensor("D", D), tensor("k", np.array([4], np.int64)), tensor("half", np.float32(0.5)),
                       tensor("ax", np.array(1, np.int64))])


def _calib(n=64):
    return {"x": np.random.default_rng(1).standard_normal((n, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("islands")
    onnx.save(_topk_model(), str(d / "m.onnx"))
    np.savez(d / "calib.npz", **_calib())
    return d


def _steps(meta, name):
    return next(o for o in meta["outputs"] if o["name"] == name).get("scale")


def test_strict_error_names_the_op_and_the_flag(files, capsys):
    out = files / "strict.so"
    rc = main(["-q", "compile", str(files / "m.onnx"), "-o", str(out), "--calib", str(files / "calib.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert "Trilu: trilu" in err and "CumSum: cumsum" in err and "--allow-float" in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_allow_float_builds_runs_and_lists_the_islands(files, capsys):
    so = files / "m.so"
    rc = main(["-q", "compile", str(files / "m.onnx"), "-o", str(so), "--calib", str(files / "calib.npz"),
               "--allow-float", "--json"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["integer_only"] is False
    meta = json.loads(so.with_suffix(".json").read_text())
    assert meta["integer_only"] is False
    islands = {r["node"]: r for r in meta["float_islands"]}
    assert set(islands) == {"trilu", "cumsum"}, meta["float_islands"]
    assert islands["trilu"]["op"] == "Trilu" and islands["cumsum"]["op"] == "CumSum"
    assert all(r["kernels"] for r in islands.values())
    assert summary["float_islands"] == meta["float_islands"]

    rc = main(["-q", "inspect", str(so), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["integer_only"] is False
    assert {r["node"] for r in rep["float_islands"]} == {"trilu", "cumsum"}
    kernels = {k for r in rep["float_islands"] for k in r["kernels"]}
    assert set(rep["float_kernels"]) <= kernels  # every float kernel belongs to an island
    assert main(["-q", "inspect", str(so)]) == 0
    text = capsys.readouterr().out
    assert "integer-only NO" in text and "float island trilu (Trilu" in text

    from qcompiler.runtime import Library

    lib = Library(str(so))
    prep = prepare(str(files / "m.onnx"), str(files / "calib.npz"),
                   CompileOptions(target=parse_target("cpu"), allow_float=True))
    names = ["topv", "topi", "scaled", "cs", "tri"]
    for seed in range(3):
        x = np.random.default_rng(100 + seed).standard_normal((2, 16)).astype(np.float32)
        got = lib(x=x)
        ref = reference.execute(prep.int_graph, {"x": x})
        fp32 = dict(zip(names, ort_run(str(files / "m.onnx"), {"x": x})))
        np.testing.assert_array_equal(got["topi"], ref["topi"])
        assert got["topi"].dtype == np.int64
        for name in ("topv", "scaled", "cs", "tri"):
            step = _steps(meta, name)
            assert np.abs(got[name].astype(np.float64) - ref[name]).max() <= step * 1.0001, name
            assert cosine(got[name], fp32[name]) >= 0.99, (name, cosine(got[name], fp32[name]))
        # the island picks the same entries as FP32, up to near-ties the quantized input reorders
        agree = np.mean([set(a) == set(b) for a, b in zip(got["topi"], fp32["topi"])])
        assert agree >= 0.5


def test_custom_domain_and_refused_check_become_islands(tmp_path):
    """com.microsoft.FastGelu (canonicalization refuses custom domains) and PRelu whose slope is an
    activation (the PRelu rule's check refuses it); FastGelu's float output feeds integer ops."""
    nodes = [helper.make_node("MatMul", ["x", "D"], ["h"], name="fc"),
             helper.make_node("FastGelu", ["h"], ["g"], name="fastgelu", domain="com.microsoft"),
             helper.make_node("MatMul", ["g", "D"], ["y"], name="fc2"),
             helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
             helper.make_node("PRelu", ["y", "s"], ["p"], name="prelu")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 16])], [tensor("D", D)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    path = str(tmp_path / "ms.onnx")
    onnx.save(m, path)
    opts = CompileOptions(target=parse_target("cpu"))
    with pytest.raises(UnsupportedOpError) as err:
        prepare(path, _calib(), opts)
    assert "com.microsoft.FastGelu" in str(err.value) and "--allow-float" in str(err.value)

    opts = CompileOptions(target=parse_target("cpu"), allow_float=True)
    meta = compile_model(path, tmp_path / "ms.so", _calib(), opts)
    islands = {r["node"]: r for r in meta["float_islands"]}
    assert set(islands) == {"fastgelu", "prelu"}
    assert islands["fastgelu"]["op"] == "com.microsoft.FastGelu" and islands["prelu"]["op"] == "PRelu"
    assert "slope must be constant" in islands["prelu"]["reason"]
    assert not meta["integer_only"]

    from qcompiler.runtime import Library

    lib = Library(str(tmp_path / "ms.so"))
    prep = prepare(path, _calib(), opts)
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    got, ref = lib(x=x)["p"], reference.execute(prep.int_graph, {"x": x})["p"]
    assert np.abs(got.astype(np.float64) - ref).max() <= 2 * _steps(meta, "p")  # FastGelu's step, then fc2
    assert cosine(got, ort_run(path, {"x": x})[0]) >= 0.99


def test_op_without_a_rule_becomes_an_island(tmp_path, monkeypatch):
    """Cos passes canonicalization; without its rule (as a new op would) it is kept in float."""
    from qcompiler import intops

    monkeypatch.delitem(intops.RULES, "Cos")
    nodes = [helper.make_node("MatMul", ["x", "D"], ["h"], name="fc"),
             helper.make_node("Cos", ["h"], ["c"], name="cos"),
             helper.make_node("MatMul", ["c", "D"], ["y"], name="fc2")]
    m = make_model(nodes, [("x", [2, 16])], [("y", [2, 16])], [tensor("D", D)])
    path = str(tmp_path / "cos.onnx")
    onnx.save(m, path)
    with pytest.raises(UnsupportedOpError, match="Cos: cos .*--allow-float"):
        prepare(path, _calib(), CompileOptions(target=parse_target("cpu")))
    opts = CompileOptions(target=parse_target("cpu"), allow_float=True)
    meta = compile_model(path, tmp_path / "cos.so", _calib(), opts)
    assert [r["node"] for r in meta["float_islands"]] == ["cos"] and not meta["integer_only"]
    from qcompiler.runtime import Library

    x = np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)
    got = Library(str(tmp_path / "cos.so"))(x=x)["y"]
    ref = reference.execute(prepare(path, _calib(), opts).int_graph, {"x": x})["y"]
    assert np.abs(got.astype(np.float64) - ref).max() <= 2 * _steps(meta, "y")
    assert cosine(got, ort_run(path, {"x": x})[0]) >= 0.99


def test_allow_float_without_islands_stays_integer_only(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "D"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    path = str(tmp_path / "plain.onnx")
    onnx.save(make_model(nodes, [("x", [2, 16])], [("y", [2, 16])], [tensor("D", D)]), path)
    meta = compile_model(path, tmp_path / "plain.so", _calib(),
                         CompileOptions(target=parse_target("cpu"), allow_float=True))
    assert meta["integer_only"] is True and meta["float_islands"] == []
    assert os.path.exists(tmp_path / "plain.so")


def test_island_attributes_without_the_model_node_and_non_onnx_nodes():
    """Without the model's NodeProto the attributes are rebuilt with the schema's types; a node of
    our own canonical forms (Dense) or one the passes gave new attributes cannot be an island."""
    from onnx import AttributeProto

    from qcompiler.graph import Graph, Node
    from qcompiler.intops import island

    opsets = (("", 17),)
    n = Node("TopK", "t", ["x", "k"], ["v", "i"], {"axis": 1, "largest": 1, "act": (0.0, 6.0)})
    got = island.onnx_attributes(n, {}, opsets)
    attrs = {}
    for b in got:
        a = AttributeProto()
        a.ParseFromString(b)
        attrs[a.name] = helper.get_attribute_value(a)
    assert attrs == {"axis": 1, "largest": 1}
    fg = Graph([], ["x"], [], {"x": (2, 4), "y": (2, 4)}, {"x": "float32", "y": "float32"})
    assert "no ONNX form" in island.island_problem(fg, Node("Dense", "d", ["x"], ["y"], {}), {}, opsets)
    rewritten = Node("MatMul", "m", ["x", "x"], ["y"], {"alpha": 0.5})
    assert "alpha" in island.island_problem(fg, rewritten, {}, opsets)


def _islands_between_layernorms(blocks=3, rows=12, c=64):
    """minimol's pattern (issue 16): ``blocks`` x [MatMul -> LayerNorm -> GELU (erf) -> ScatterElements
    (the island: reduction mul, which has no integer form; minimol's add has one since, intops/indexed.py)],
    each island's float output quantized again for the next MatMul."""
    rng = np.random.default_rng(16)
    nodes, inits, x = [], [tensor("sq2", np.float32(np.sqrt(2))), tensor("one", np.float32(1)),
                           tensor("half", np.float32(0.5)),
                           tensor("idx", np.tile(rng.permutation(rows)[:, None], (1, c)).astype(np.int64))], "x"
    for b in range(blocks):
        inits += [tensor(f"W{b}", (rng.standard_normal((c, c)) * 0.2).astype(np.float32)),
                  tensor(f"g{b}", (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)),
                  tensor(f"b{b}", (0.1 * rng.standard_normal(c)).astype(np.float32))]
        nodes += [helper.make_node("MatMul", [x, f"W{b}"], [f"h{b}"], name=f"fc{b}"),
                  helper.make_node("LayerNormalization", [f"h{b}", f"g{b}", f"b{b}"], [f"ln{b}"], axis=-1,
                                   name=f"ln{b}"),
                  helper.make_node("Div", [f"ln{b}", "sq2"], [f"d{b}"]), helper.make_node("Erf", [f"d{b}"], [f"e{b}"]),
                  helper.make_node("Add", [f"e{b}", "one"], [f"e1{b}"]),
                  helper.make_node("Mul", [f"ln{b}", f"e1{b}"], [f"m{b}"]),
                  helper.make_node("Mul", [f"m{b}", "half"], [f"gelu{b}"]),
                  helper.make_node("ScatterElements", [f"gelu{b}", "idx", f"gelu{b}"], [f"s{b}"], axis=0,
                                   reduction="mul", name=f"scatter{b}")]
        x = f"s{b}"
    return make_model(nodes, [("x", [rows, c])], [(x, [rows, c])], inits, opset=18), x


def test_islands_between_integer_layernorms_build_fast_and_bit_exact(tmp_path):
    """Issue 16 (minimol: 80 islands, 54 I-LayerNorms, most followed by i-GELU): the default CPU
    schedule inlined the LayerNorm's Newton square root (each step reads the previous one three
    times: 3^steps copies per element) and the i-GELU after it (three reads again) into one
    expression of ~10^5 nodes per kernel, and TVM's TIR simplification of 54 such kernels ran past
    10 minutes.  Now every kernel stays small (``qcompiler/kernels/cpu_default.py``
    ``_inline_stays_small``), the build takes seconds and the library equals the reference."""
    import tvm_ffi
    from tvm import tirx

    from qcompiler.kernels.cpu_default import CPUScheduleOptions, _expr_size
    from qcompiler.lowering.build import build
    from tests.helpers import assert_bit_exact, run_tvm

    model, out = _islands_between_layernorms()
    path = str(tmp_path / "ln_islands.onnx")
    onnx.save(model, path)
    calib = {"x": np.random.default_rng(2).standard_normal((8, 12, 64)).astype(np.float32)}
    opts = CompileOptions(target=parse_target("cpu"), allow_float=True)
    prep = prepare(path, calib, opts)
    ops = [n.op for n in prep.int_graph.nodes]
    assert ops.count("layernorm") == 3 and ops.count("gelu") == 3 and ops.count("float_island") == 3, ops
    res = build(prep.int_graph, opts.target.tvm_target(), allow_float=True)
    assert set(res.island_kernels) == {"scatter0", "scatter1", "scatter2"}
    biggest = 0
    for f in res.tir.functions.values():
        sizes = []
        tvm_ffi.structural_walk(f.body, (tirx.BufferStore, lambda s: sizes.append(_expr_size(s.value))))
        biggest = max([biggest] + sizes)
    assert biggest <= 2 * CPUScheduleOptions().max_inline_expr, biggest    # was ~55k per LayerNorm kernel
    for seed in range(2):
        x = np.random.default_rng(50 + seed).standard_normal((12, 64)).astype(np.float32)
        got = run_tvm(res.executable, prep.int_graph, {"x": x})
        ref = reference.execute(prep.int_graph, {"x": x})
        assert_bit_exact(got, ref, [out])
        assert cosine(got[out], ort_run(path, {"x": x})[0]) >= 0.98
