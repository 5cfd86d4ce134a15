"""qcompiler.tir_scan: scheduled / float-touching PrimFuncs, from a module and from its text.

Real lowered modules: Relax functions legalized and fused by TVM's own passes (with and without
the default CPU schedule), a quantize -> integer ops -> dequantize sandwich (integer-only) and the
same with a float op in the middle (not integer-only); each scanned from the IRModule, from
``module_to_text``, from ``mod.script()`` of the whole Relax module, and by the text-only scanner.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax import op as R  # noqa: E402

from qcompiler.kernels.cpu_default import schedule_cpu_default  # noqa: E402
from qcompiler.tir_scan import (  # noqa: E402
    TRIVIAL_TRIP_COUNT,
    FuncScan,
    _prim_func_chunks,
    _scan_chunk_regex,
    describe_float_functions,
    float_ops,
    is_float_dtype,
    module_to_text,
    scan_text,
    scan_tir,
)
from tests.kernels.test_cpu_default import (  # noqa: E402
    _dequantize,
    _quantize,
    _requant,
    legalize_and_fuse,
)

TARGET = {"kind": "llvm", "mcpu": "znver5"}


def build(fn, params):
    bb = relax.BlockBuilder()
    vs = [relax.Var(n, relax.TensorType(shape=s, dtype=d)) for n, s, d in params]
    with bb.function("main", vs):
        with bb.dataflow():
            gv = bb.emit_output(fn(bb, *vs))
        bb.emit_func_output(gv)
    return legalize_and_fuse(bb.get())


def sandwich(float_middle: bool, per_channel_const: bool = False):
    """float x -> quantize -> int8 max pool -> (float op?) -> int32 sum -> requant -> dequantize.
    The pool and the sum are fusion barriers, so the boundaries stay functions of their own."""

    def fn(bb, x):
        q = bb.emit(_quantize(bb, x))
        p = bb.emit(R.nn.max_pool2d(q, (3, 3), (2, 2), (1, 1, 1, 1)))
        if float_middle:
            f = bb.emit(R.multiply(R.astype(p, "float32"), relax.const(np.array(0.5, "float32"), "float32")))
            p = bb.emit(R.astype(R.clip(R.round(f), -128, 127), "int8"))
        s = bb.emit(R.sum(R.astype(p, "int32"), axis=[2, 3]))
        if per_channel_const:  # a tensor constant: printed as metadata by mod.script()
            s = bb.emit(R.add(s, relax.const(np.arange(8, dtype="int32").reshape(1, 8), "int32")))
        r = bb.emit(_requant(bb, s, 1 << 20, 24))
        return _dequantize(bb, r)

    return build(fn, [("x", (1, 8, 16, 16), "float32")])


@pytest.fixture(scope="module")
def target():
    return tvm.target.Target(TARGET)


# ---- float boundaries ---------------------------------------------------------------------------


def test_quantize_dequantize_sandwich_is_integer_only():
    report = scan_tir(sandwich(float_middle=False))
    kinds = {f.kind for f in report.functions}
    assert kinds == {"entry_quantize", "exit_dequantize", "integer"}
    assert len(report.entry_quantize) == 1 and len(report.exit_dequantize) == 1
    assert report.float_ops_between_boundaries == 0 and report.integer_only
    entry = report.get(report.entry_quantize[0])
    assert entry.float_params == ("x",) and entry.read_params == ("x",)
    assert entry.float_dtypes == ("float32",)
    exit_ = report.get(report.exit_dequantize[0])
    assert exit_.float_params == exit_.written_params
    for f in report.functions:
        if f.kind == "integer":
            assert not f.float_dtypes and not f.float_params
    assert "integer-only: yes" in report.summary()
    # no qc.boundary marker (hand-made Relax, not the compiler's lowering): told by signatures
    assert report.boundary_source == "heuristic" and "boundaries heuristic" in report.summary()
    assert all(f.boundary is None for f in report.functions)


def test_float_op_in_the_middle_is_not_integer_only():
    report = scan_tir(sandwich(float_middle=True))
    assert not report.integer_only
    assert report.float_ops_between_boundaries == 1
    (middle,) = [f for f in report.functions if f.kind == "float"]
    assert "max_pool2d" in middle.name and middle.float_dtypes == ("float32",)
    assert not middle.float_params  # int8 in, int8 out: the float is inside
    assert "integer-only: NO" in report.summary() and middle.name in report.summary()
    assert report.float_islands == (middle.name,)
    mod = sandwich(float_middle=True)
    func = next(f for gv, f in mod.functions_items() if gv.name_hint == middle.name)
    ops = float_ops(func)
    assert {"cast", "multiply", "nearbyint"} <= set(ops) and "right_shift" not in ops
    assert describe_float_functions(mod) == f"{middle.name} (float32: {', '.join(ops)})"


def test_float_reading_int_and_float_params_is_a_float_op():
    """A boundary that also reads an integer tensor is not a pure quantize: counted."""
    mod = build(
        lambda bb, x, y: R.add(_quantize(bb, x), y),
        [("x", (4, 64), "float32"), ("y", (4, 64), "int8")],
    )
    report = scan_tir(mod)
    assert report.float_ops_between_boundaries == 1 and not report.integer_only


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_float_dtypes_detected(dtype):
    mod = build(lambda bb, x: R.astype(R.astype(x, dtype), "int32"), [("x", (4, 64), "int32")])
    (f,) = scan_tir(mod).functions
    assert dtype in f.float_dtypes and f.kind == "float" and not f.float_params


def test_is_float_dtype():
    assert all(map(is_float_dtype, ["float32", "float16x4", "bfloat16", "e4m3_float8", "float8_e4m3fn"]))
    assert not any(map(is_float_dtype, ["int8", "uint8", "int64", "bool", "handle"]))


# ---- scheduled / trip counts ----------------------------------------------------------------------


def test_unscheduled_vs_scheduled(target):
    fused = sandwich(float_middle=False)
    before = scan_tir(fused)
    assert not before.all_scheduled
    after = scan_tir(schedule_cpu_default(fused, target))
    assert after.all_scheduled, after.unscheduled
    # the schedule fuses/splits loops but keeps every innermost statement's count or less
    assert after.total_trip_count <= before.total_trip_count


def test_trip_count_and_trivially_small():
    mod = build(lambda bb, a, b: R.add(a, b), [("a", (4, 8), "int32"), ("b", (4, 8), "int32")])
    (f,) = scan_tir(mod).functions
    assert f.trip_count == 32 and f.trivially_small and f.scheduled and not f.schedule_marks
    big = build(lambda bb, a: R.sum(a, axis=[1]), [("a", (64, 128), "int32")])
    (g,) = scan_tir(big).functions
    assert g.trip_count == 64 * 128 > TRIVIAL_TRIP_COUNT and not g.scheduled


def test_vectorized_loops_still_scheduled_after_lowering(target):
    """After VectorizeLoop there are no vectorized loops left, only vector expressions."""
    from tvm import s_tir, tirx

    fused = build(lambda bb, x: _requant(bb, x), [("x", (1, 64, 56, 56), "int32")])
    mod = schedule_cpu_default(fused, target)
    tir = tvm.IRModule({gv: f.with_attr("target", target) for gv, f in mod.functions_items()
                        if isinstance(f, tvm.tirx.PrimFunc)})
    lowered = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
        tirx.transform.VectorizeLoop(True),
    ])(tir)
    (f,) = scan_tir(lowered).functions
    assert f.scheduled and "vector" in f.schedule_marks


def test_funcscan_validates_kind():
    with pytest.raises(ValueError):
        FuncScan(name="f", scheduled=True, schedule_marks=(), trip_count=1, trivially_small=True,
                 float_dtypes=(), param_dtypes=(), float_params=(), read_params=(),
                 written_params=(), kind="float")
    with pytest.raises(ValueError, match="boundary"):
        FuncScan(name="f", scheduled=True, schedule_marks=(), trip_count=1, trivially_small=True,
                 float_dtypes=(), param_dtypes=(), float_params=(), read_params=(),
                 written_params=(), kind="integer", boundary="requantize")


# ---- from text ----------------------------------------------------------------------------------


@pytest.mark.parametrize("float_middle", [False, True])
@pytest.mark.parametrize("scheduled", [False, True])
def test_scan_text_round_trip(float_middle, scheduled, target):
    mod = sandwich(float_middle)
    if scheduled:
        mod = schedule_cpu_default(mod, target)
    direct = scan_tir(mod)
    from_text = scan_text(module_to_text(mod))
    assert from_text.source == "text"
    assert from_text.functions == direct.functions
    assert from_text.integer_only == (not float_middle)


def test_scan_text_of_relax_module_with_metadata(target):
    """mod.script() of a Relax module with tensor constants does not parse as a whole (metadata
    omitted): the PrimFuncs are parsed one by one."""
    mod = schedule_cpu_default(sandwich(float_middle=True, per_channel_const=True), target)
    text = mod.script()
    assert "metadata[" in text
    report = scan_text(text)
    assert report.source == "text:per-function"
    assert report.functions == scan_tir(mod).functions
    assert not report.integer_only


@pytest.mark.parametrize("float_middle", [False, True])
@pytest.mark.parametrize("scheduled", [False, True])
def test_regex_scanner_agrees(float_middle, scheduled, target):
    """The text-only fallback (for a definition from_source rejects) on real printed modules."""
    mod = sandwich(float_middle)
    if scheduled:
        mod = schedule_cpu_default(mod, target)
    direct = {f.name: f for f in scan_tir(mod).functions}
    chunks = _prim_func_chunks(mod.script())
    assert sorted(n for n, _ in chunks) == sorted(direct)
    for name, chunk in chunks:
        got, want = _scan_chunk_regex(name, chunk), direct[name]
        assert not got.parsed
        for field in ("kind", "scheduled", "trip_count", "float_params", "read_params",
                      "written_params", "param_dtypes", "float_dtypes"):
            assert getattr(got, field) == getattr(want, field), (name, field)
        assert set(got.schedule_marks) == set(want.schedule_marks), name


def test_scan_text_unparseable_function_uses_regex():
    text = '''
@I.ir_module
class Module:
    @T.prim_func(private=True, s_tir=True)
    def broken(x: T.Buffer((T.int64(64),), "float32"), y: T.Buffer((T.int64(64),), "int8")):
        for i in T.parallel(T.int64(64)):
            y[i] = T.Cast("int8", x[i] * T.float32(3.0)) + undefined_name
'''
    report = scan_text(text)
    (f,) = report.functions
    assert not f.parsed and f.kind == "entry_quantize" and f.scheduled and f.trip_count == 64


@pytest.mark.parametrize("marked", [False, True])
def test_scan_text_unparseable_reads_the_boundary_marker(marked):
    """The text-only scanner reads ``qc.boundary`` from T.func_attr; with a marked boundary in
    the module, an unmarked float -> int function is a float op (exact mode)."""
    attr = '        T.func_attr({"op_pattern": 8, "qc.boundary": "quantize"})\n' if marked else ""
    text = f'''
@I.ir_module
class Module:
    @T.prim_func(private=True, s_tir=True)
    def qc_quantize(x: T.Buffer((T.int64(64),), "float32"), y: T.Buffer((T.int64(64),), "int8")):
{attr}        for i in T.parallel(T.int64(64)):
            y[i] = T.Cast("int8", x[i] * T.float32(3.0)) + undefined_name

    @T.prim_func(private=True, s_tir=True)
    def other(x: T.Buffer((T.int64(64),), "float32"), y: T.Buffer((T.int64(64),), "int8")):
        for i in T.parallel(T.int64(64)):
            y[i] = T.Cast("int8", x[i]) + undefined_name
'''
    report = scan_text(text)
    q, other = report.get("qc_quantize"), report.get("other")
    assert not q.parsed and q.boundary == ("quantize" if marked else None) and q.kind == "entry_quantize"
    assert other.boundary is None
    assert report.boundary_source == ("marked" if marked else "heuristic")
    assert other.kind == ("float" if marked else "entry_quantize")
    assert report.integer_only == (not marked)
