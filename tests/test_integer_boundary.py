"""The integer-only contract at compile time: boundary kernels of their own, and a strict proof.

A CRNN-like model (input normalisation Mul/Add -> Conv -> Transpose -> Reshape -> MatMul) used to
compile into a kernel fusing the input quantize with the requant and transpose after it
(``fused_multiply_tir_round_tir_clip_cast_..._right_shift_..._transpose``): the library read
exactly what FP32 reads, yet the TIR scan could not tell the boundary and ``qc inspect`` said
``integer_only: false`` while the compile said nothing.  Now the quantize and dequantize are
PrimFuncs of their own (``qc_quantize`` / ``qc_dequantize``, marked ``qc.boundary``), the scan
knows them by the marker, and a float kernel between the boundaries fails the build in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

tvm = pytest.importorskip("tvm")
from tvm import te, tirx  # noqa: E402

from qcompiler import reference  # noqa: E402
from qcompiler.errors import QuantizationError  # noqa: E402
from qcompiler.intops.boundary import DequantizeOp, QuantizeOp, boundary_func  # noqa: E402
from qcompiler.lowering.build import build, check_integer_only  # noqa: E402
from qcompiler.targets import parse_target  # noqa: E402
from qcompiler.tir_scan import (  # noqa: E402
    _prim_func_chunks,
    _scan_chunk_regex,
    float_ops,
    module_to_text,
    scan_text,
    scan_tir,
)
from tests.helpers import check_pipeline, make_model, run_tvm, tensor  # noqa: E402

R = np.random.default_rng(7)
SHAPE = (1, 3, 8, 16)


def crnn_like():
    """x -> Mul/Add (input normalisation, per channel) -> Conv -> Relu -> Transpose -> Reshape ->
    MatMul -> y (sequence logits); and the conv features as a second output (NHWC inside, so
    the layout goes back to NCHW before the output dequantize)."""
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"]),
        helper.make_node("Add", ["xs", "b"], ["xn"]),
        helper.make_node("Conv", ["xn", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["f"]),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 3, 1, 2]),   # N, W, C, H
        helper.make_node("Reshape", ["t", "sh"], ["r"]),                  # N, W, C*H
        helper.make_node("MatMul", ["r", "M"], ["y"]),
    ]
    inits = [
        tensor("s", np.float32(0.5)),
        tensor("b", np.array([0.1, -0.2, 0.3], np.float32).reshape(1, 3, 1, 1)),
        tensor("W", (R.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)),
        tensor("B", (R.standard_normal(4) * 0.1).astype(np.float32)),
        tensor("sh", np.array([1, 16, 32], np.int64)),
        tensor("M", (R.standard_normal((32, 6)) * 0.3).astype(np.float32)),
    ]
    return make_model(nodes, [("x", list(SHAPE))], [("y", None), ("f", None)], inits)


@pytest.fixture(scope="module")
def crnn():
    calib = {"x": np.random.default_rng(1).standard_normal((8, *SHAPE[1:])).astype(np.float32)}
    prep, _, _ = check_pipeline(crnn_like(), calib, build=False)
    return prep.int_graph, calib


@pytest.fixture(scope="module")
def target():
    return parse_target("cpu").tvm_target()


def test_boundaries_are_kernels_of_their_own(crnn, target):
    ig, calib = crnn
    assert [n.op for n in ig.nodes][:2] == ["quantize", "requant"]  # the quantize feeds integer ops
    res = build(ig, target)
    report = res.scan
    assert report is not None and report.integer_only and res.float_islands == []
    assert report.boundary_source == "marked"
    assert report.entry_quantize == ("qc_quantize",)
    deq = report.exit_dequantize
    assert len(deq) == 2 and all(d.startswith("qc_dequantize") for d in deq)  # two output shapes
    tir = {gv.name_hint: f for gv, f in res.tir.functions_items()}
    assert float_ops(tir["qc_quantize"]) == ("cast", "max", "min", "multiply", "nearbyint")
    for name in report.exit_dequantize:
        assert float_ops(tir[name]) == ("cast", "multiply")
    for f in report.functions:  # every other kernel is integer, the boundary ops fused nowhere
        if f.name not in report.entry_quantize + report.exit_dequantize:
            assert f.kind == "integer" and not f.float_dtypes, f.name
            assert f.boundary is None
        else:
            assert f.boundary in ("quantize", "dequantize")
    q = report.get("qc_quantize")
    assert q.read_params == q.float_params == ("x",) and len(q.written_params) == 1
    # bit for bit the integer reference
    feeds = {"x": calib["x"][:1]}
    tv, ref = run_tvm(res.executable, ig, feeds), reference.execute(ig, feeds)
    for o in ig.outputs:
        assert tv[o].dtype == ref[o].dtype and np.array_equal(tv[o], ref[o]), o


def test_quantize_rounds_ties_to_even(crnn, target):
    """x * inv_scale exactly halfway between two integers rounds to the even one, as the
    reference (np.round) does: inv_scale set to 2 and x on quarter steps."""
    import copy

    ig, _ = crnn
    ig = copy.deepcopy(ig)
    (q,) = [n for n in ig.nodes if n.op == "quantize"]
    q.attrs["inv_scale"] = np.float32(2.0)
    x = ((np.arange(np.prod(SHAPE)) % 64 - 32) / 4).astype(np.float32).reshape(SHAPE)
    assert np.any((x * 2) % 2 == 0.5) and np.any((x * 2) % 2 == 1.5)  # ties both ways
    res = build(ig, target)
    tv, ref = run_tvm(res.executable, ig, {"x": x}), reference.execute(ig, {"x": x})
    for o in ig.outputs:
        assert np.array_equal(tv[o], ref[o]), o


def test_boundary_markers_survive_the_stored_text(crnn, target):
    ig, _ = crnn
    res = build(ig, target)
    direct = scan_tir(res.tir)
    from_text = scan_text(module_to_text(res.tir))
    assert from_text.functions == direct.functions and from_text.integer_only
    assert from_text.boundary_source == "marked"
    for name, chunk in _prim_func_chunks(res.tir.script()):  # the regex fallback reads the marker
        assert _scan_chunk_regex(name, chunk).boundary == direct.get(name).boundary, name


def _fusable_quantize(lw, n, x):
    """The earlier lowering of quantize: plain Relax ops, which FuseOps fuses with what follows."""
    from tvm import relax

    from qcompiler.lowering.relax_lower import Value, const

    a = n.attrs
    e = lw.emit(relax.op.multiply(x.expr, const(a["inv_scale"], "float32")))
    e = lw.emit(relax.op.clip(lw.emit(relax.op.round(e)), int(a["lo"]), int(a["hi"])))
    return Value(lw.cast(e, a["dtype"]), x.perm, x.shape, a["dtype"])


def _fusable_dequantize(lw, n, x):
    from tvm import relax

    from qcompiler.lowering.relax_lower import Value, const

    e = lw.emit(relax.op.multiply(lw.cast(x.expr, "float32"), const(n.attrs["scale"], "float32")))
    return Value(e, x.perm, x.shape, "float32")


def test_fused_boundary_fails_the_build_in_one_line(crnn, target, monkeypatch):
    """The old lowering (boundary ops left to FuseOps) reproduces the CRNN fusion; the proof
    now rejects it, naming the kernel and its float ops."""
    ig, _ = crnn
    monkeypatch.setattr(QuantizeOp, "lower", staticmethod(_fusable_quantize))
    monkeypatch.setattr(DequantizeOp, "lower", staticmethod(_fusable_dequantize))
    with pytest.raises(QuantizationError) as err:
        build(ig, target)
    msg = str(err.value)
    assert "\n" not in msg and "not be integer-only" in msg
    fused = msg.split("compute in float: ")[1].split(" (")[0]
    assert "round" in fused and "right_shift" in fused and "transpose" in fused
    assert "float32: cast, max, min, multiply, nearbyint" in msg
    # allowed: built, the island listed and warned about
    res = build(ig, target, allow_float=True)
    assert res.float_islands == [fused] and not res.scan.integer_only
    assert any(fused in w for w in res.warnings)


# ---- the proof on hand-made modules ----------------------------------------------------------


def _float_middle(shape=(4, 8)):
    """int8 -> float multiply -> int8: a float op in the integer region."""
    x = te.placeholder(shape, "int8", "x")
    half = tirx.const(0.5, "float32")
    y = te.compute(shape, lambda *i: tirx.Cast("int8", tirx.round(tirx.Cast("float32", x(*i)) * half)), name="y")
    return te.create_prim_func([x, y]).without_attr("global_symbol")


def _looks_like_quantize(shape=(4, 8)):
    """float -> int8, unmarked: a quantize by its signature."""
    x = te.placeholder(shape, "float32", "x")
    y = te.compute(shape, lambda *i: tirx.Cast("int8", x(*i)), name="y")
    return te.create_prim_func([x, y]).without_attr("global_symbol")


def _boundaries(shape=(4, 8)):
    q = boundary_func("quantize", shape, "float32", "int8", lambda v: tirx.Cast("int8", tirx.round(v)))
    d = boundary_func("dequantize", shape, "int8", "float32", lambda v: tirx.Cast("float32", v))
    return {"qc_quantize": q, "qc_dequantize": d}


def test_float_op_between_marked_boundaries_raises():
    mod = tvm.IRModule({**_boundaries(), "fused_cast_multiply_round": _float_middle()})
    with pytest.raises(QuantizationError) as err:
        check_integer_only(mod)
    msg = str(err.value)
    assert "\n" not in msg
    assert "fused_cast_multiply_round (float32: cast, multiply, round)" in msg
    assert "qc_quantize" not in msg and "qc_dequantize" not in msg
    report = check_integer_only(mod, allow_float=True)
    assert report.float_islands == ("fused_cast_multiply_round",)
    assert check_integer_only(tvm.IRModule(_boundaries())).integer_only


def test_markers_make_the_scan_exact():
    """With markers, an unmarked kernel with a quantize's signature is a float op; without any
    marker (a library from before them) the signature heuristic still calls it a quantize."""
    marked = scan_tir(tvm.IRModule({**_boundaries(), "cast": _looks_like_quantize()}))
    assert marked.boundary_source == "marked" and not marked.integer_only
    assert marked.float_islands == ("cast",)
    old = scan_tir(tvm.IRModule({"cast": _looks_like_quantize()}))
    assert old.boundary_source == "heuristic" and old.integer_only and old.entry_quantize == ("cast",)


def test_marker_must_agree_with_the_signature():
    """A kernel marked quantize that writes a float tensor is a float op, marker or not."""
    shape = (4, 8)
    bad = boundary_func("quantize", shape, "int8", "float32", lambda v: tirx.Cast("float32", v))
    report = scan_tir(tvm.IRModule({"qc_quantize": bad}))
    assert report.get("qc_quantize").boundary == "quantize"
    assert report.float_islands == ("qc_quantize",)
    with pytest.raises(QuantizationError, match="qc_quantize"):
        check_integer_only(tvm.IRModule({"qc_quantize": bad}))
