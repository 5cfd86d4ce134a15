"""Default CPU schedule (qcompiler.kernels.cpu_default) on every op family of an integer model.

For each family: a small Relax function with integer dtypes, legalized and fused by TVM's own
passes, built twice on llvm -- unscheduled (TVM's scalar loop nests, the reference) and with the
default schedule -- and run on the same inputs: the outputs must agree element for element, and
``tir_scan`` must find every PrimFunc scheduled.  ``test_speedups`` times a few representative
ops (printed with ``pytest -s``; timings on shared 2-core machines are noisy, docs/design.md §5).

``FAMILIES`` and the helpers are shared with test_gpu_default.py and test_tir_scan.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax import op as R  # noqa: E402
import tvm_ffi  # noqa: E402

from qcompiler.kernels import cpu_default  # noqa: E402
from qcompiler.kernels.cpu_default import (  # noqa: E402
    CPUDefaultSchedule,
    CPUScheduleOptions,
    schedule_cpu_default,
    schedule_cpu_default_report,
)
from qcompiler.tir_scan import scan_tir  # noqa: E402

# ---- op families ------------------------------------------------------------------------------


def c64(v):
    return relax.const(np.array(v, dtype="int64"), "int64")


def _requant(bb, x, mult=1234567, shift=21, lo=-128, hi=127, out="int8"):
    a = bb.emit(R.astype(x, "int64"))
    a = bb.emit(R.multiply(a, c64(mult) if isinstance(mult, int) else mult))
    rnd = c64(1 << (shift - 1)) if isinstance(shift, int) else R.left_shift(c64(1), R.subtract(shift, c64(1)))
    a = bb.emit(R.add(a, rnd))
    a = bb.emit(R.right_shift(a, c64(shift) if isinstance(shift, int) else shift))
    return R.astype(R.clip(a, lo, hi), out)


def _softmax_like(bb, x):
    """Integer softmax-like row: max, subtract, a shift 'exp', row sum, one floor division."""
    m = bb.emit(R.max(x, axis=-1, keepdims=True))
    d = bb.emit(R.subtract(x, m))
    e = bb.emit(R.right_shift(R.multiply(R.astype(d, "int64"), c64(3)), c64(1)))
    e = bb.emit(R.add(R.astype(e, "int32"), relax.const(np.array(1 << 12, "int32"), "int32")))
    e = bb.emit(R.maximum(e, relax.const(np.array(1, "int32"), "int32")))
    s = bb.emit(R.sum(e, axis=-1, keepdims=True))
    q = R.floor_divide(R.left_shift(e, relax.const(np.array(8, "int32"), "int32")), s)
    return R.astype(R.clip(q, 0, 255), "uint8")


def _quantize(bb, x):
    q = bb.emit(R.round(R.multiply(x, relax.const(np.array(12.5, "float32"), "float32"))))
    return R.astype(R.clip(q, -128, 127), "int8")


def _dequantize(bb, q):
    return R.multiply(R.astype(q, "float32"), relax.const(np.array(0.08, "float32"), "float32"))


# name -> (builder, [(param, shape, dtype, (lo, hi) or None)])
FAMILIES = {
    "requant_chain": (_requant, [("x", (1, 32, 112, 112), "int32", None)]),
    "requant_per_channel_nchw": (
        lambda bb, x, m, s: _requant(bb, x, m, s),
        [("x", (1, 32, 28, 28), "int32", None), ("m", (1, 32, 1, 1), "int64", (1, 1 << 20)),
         ("s", (1, 32, 1, 1), "int64", (1, 30))],
    ),
    "requant_per_channel_nhwc": (
        lambda bb, x, m, s: _requant(bb, x, m, s, lo=0, hi=255, out="uint8"),
        [("x", (1, 28, 28, 64), "int32", None), ("m", (64,), "int64", (-(1 << 20), 1 << 20)),
         ("s", (64,), "int64", (1, 30))],
    ),
    "residual_add_int16": (
        lambda bb, a, b: R.astype(
            R.clip(R.add(R.astype(a, "int32"), R.astype(b, "int32")), -32768, 32767), "int16"
        ),
        [("a", (1, 64, 28, 28), "int16", None), ("b", (1, 64, 28, 28), "int16", None)],
    ),
    "maxpool_nchw": (
        lambda bb, x: R.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1), layout="NCHW"),
        [("x", (1, 16, 56, 56), "int8", None)],
    ),
    "maxpool_nchw_s1": (
        lambda bb, x: R.nn.max_pool2d(x, (3, 3), (1, 1), (1, 1, 1, 1), layout="NCHW"),
        [("x", (1, 16, 28, 28), "uint8", None)],
    ),
    "maxpool_nhwc": (
        lambda bb, x: R.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1), layout="NHWC"),
        [("x", (1, 56, 56, 64), "int8", None)],
    ),
    "sumpool_nchw": (
        lambda bb, x: R.nn.avg_pool2d(x, (3, 3), (1, 1), (1, 1, 1, 1), layout="NCHW"),
        [("x", (1, 16, 28, 28), "int32", None)],
    ),
    "sumpool_nhwc": (
        lambda bb, x: R.nn.avg_pool2d(x, (2, 2), (2, 2), layout="NHWC"),
        [("x", (1, 28, 28, 64), "int32", None)],
    ),
    "global_sum_nchw": (
        lambda bb, x: R.sum(x, axis=[2, 3], keepdims=True),
        [("x", (1, 128, 14, 14), "int32", None)],
    ),
    "global_sum_nhwc": (
        lambda bb, x: R.sum(R.astype(x, "int32"), axis=[1, 2]),
        [("x", (1, 14, 14, 128), "int8", None)],
    ),
    "max_last_axis": (lambda bb, x: R.max(x, axis=-1), [("x", (64, 384), "int32", None)]),
    "min_first_axis": (lambda bb, x: R.min(x, axis=0), [("x", (64, 384), "int16", None)]),
    "transpose_nchw_nhwc": (
        lambda bb, x: R.permute_dims(x, [0, 2, 3, 1]),
        [("x", (1, 64, 28, 28), "int8", None)],
    ),
    "transpose_2d": (lambda bb, x: R.permute_dims(x, [1, 0]), [("x", (384, 128), "int32", None)]),
    "concat_channels": (
        lambda bb, a, b: R.concat([a, b], axis=1),
        [("a", (1, 32, 28, 28), "int8", None), ("b", (1, 64, 28, 28), "int8", None)],
    ),
    "concat_last": (
        lambda bb, a, b: R.concat([a, b], axis=-1),
        [("a", (8, 100), "int32", None), ("b", (8, 60), "int32", None)],
    ),
    "strided_slice": (
        lambda bb, x: R.strided_slice(x, [2, 3], [1, 1], [55, 55], [2, 2]),
        [("x", (1, 32, 56, 56), "int8", None)],
    ),
    "slice_channels": (
        lambda bb, x: R.strided_slice(x, [1], [16], [48]),
        [("x", (1, 64, 28, 28), "int8", None)],
    ),
    "take_rows": (
        lambda bb, w, i: R.take(w, i, axis=0),
        [("w", (1000, 64), "int8", None), ("i", (128,), "int32", (0, 1000))],
    ),
    "pad_nchw": (
        lambda bb, x: R.nn.pad(x, (0, 0, 0, 0, 1, 1, 1, 1), pad_value=0),
        [("x", (1, 32, 56, 56), "int8", None)],
    ),
    "pad_nhwc": (
        lambda bb, x: R.nn.pad(x, (0, 0, 1, 1, 1, 1, 0, 0), pad_value=-128),
        [("x", (1, 56, 56, 32), "int8", None)],
    ),
    "floor_divide_rows": (
        lambda bb, x, y: R.floor_divide(x, y),
        [("x", (64, 384), "int32", None), ("y", (64, 1), "int32", (1, 50))],
    ),
    "where_select": (
        lambda bb, a, b: R.where(R.greater(a, b), a, b),
        [("a", (1, 32, 28, 28), "int8", None), ("b", (1, 32, 28, 28), "int8", None)],
    ),
    "softmax_like_rows": (_softmax_like, [("x", (64, 384), "int32", (-3000, 3000))]),
    "quantize_entry": (_quantize, [("x", (1, 16, 28, 28), "float32", None)]),
    "dequantize_exit": (_dequantize, [("q", (1, 16, 28, 28), "int8", None)]),
}


def relax_module(name):
    builder, params = FAMILIES[name]
    bb = relax.BlockBuilder()
    vars_ = [relax.Var(p, relax.TensorType(shape=s, dtype=d)) for p, s, d, _ in params]
    with bb.function("main", vars_):
        with bb.dataflow():
            gv = bb.emit_output(builder(bb, *vars_))
        bb.emit_func_output(gv)
    return bb.get()


def legalize_and_fuse(mod):
    """TVM's CPU legalization stage (docs/design.md §5): LegalizeOps ... FuseTIR."""
    from tvm.relax.backend.cpu_generic import pipeline as cp

    return tvm.transform.Sequential(cp.legalize_passes(None))(mod)


def family_inputs(name, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _, shape, dtype, rng_ in FAMILIES[name][1]:
        if dtype.startswith("float"):
            out.append(rng.normal(0, 4, size=shape).astype(dtype))
            continue
        info = np.iinfo(dtype)
        lo, hi = rng_ if rng_ is not None else (max(info.min, -(1 << 20)), min(info.max, 1 << 20))
        out.append(rng.integers(lo, hi, size=shape, endpoint=False).astype(dtype))
    return out


@pytest.fixture(scope="module")
def target():
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def build_fused(fused, target):
    """Build a legalized+fused module with the rest of TVM's CPU pipeline."""
    from tvm.relax.backend.cpu_generic import pipeline as cp

    rest = tvm.transform.Sequential(cp.dataflow_lower_passes(target) + cp.finalize_passes(target))
    return tvm.compile(fused, target, relax_pipeline=rest)


def run(ex, args):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    return out.numpy()


# ---- correctness and coverage -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_bit_exact_and_scheduled(name, target):
    fused = legalize_and_fuse(relax_module(name))
    report = schedule_cpu_default_report(fused, target)
    assert not report.failed, report.warnings
    assert report.applied, "no PrimFunc was scheduled"
    scan = scan_tir(report.mod)
    assert scan.all_scheduled, f"unscheduled: {scan.unscheduled}"
    for func in report.mod.functions.values():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert bool(func.attrs["qc.scheduled"])
    args = family_inputs(name)
    expect = run(build_fused(fused, target), args)
    got = run(build_fused(report.mod, target), args)
    assert got.dtype == expect.dtype and got.shape == expect.shape
    np.testing.assert_array_equal(got, expect)


def test_unscheduled_families_are_reported_unscheduled(target):
    """The scan must see the problem the schedule solves: TVM's legalized loop nests are scalar."""
    scan = scan_tir(legalize_and_fuse(relax_module("requant_chain")))
    assert not scan.all_scheduled


def test_vectorizes_and_parallelizes_requant_chain(target):
    fused = legalize_and_fuse(relax_module("requant_chain"))
    scan = scan_tir(schedule_cpu_default(fused, target))
    (f,) = scan.functions
    assert {"parallel", "vectorized"} <= set(f.schedule_marks)


def test_nhwc_pool_vectorizes_channels_inside_window(target):
    mod = schedule_cpu_default(legalize_and_fuse(relax_module("maxpool_nhwc")), target)
    text = mod.script()
    assert "T.vectorized" in text and "T.unroll" in text


def test_already_scheduled_functions_are_left_alone(target):
    fused = legalize_and_fuse(relax_module("requant_chain"))
    (gv,) = [g for g, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    fused[gv] = fused[gv].with_attr("qc.scheduled", True)
    report = schedule_cpu_default_report(fused, target)
    assert report.skipped == (gv.name_hint,) and not report.applied
    assert report.mod[gv].same_as(fused[gv])


def test_idempotent(target):
    once = schedule_cpu_default(legalize_and_fuse(relax_module("maxpool_nchw")), target)
    report = schedule_cpu_default_report(once, target)
    assert not report.applied and report.skipped


def test_input_module_not_mutated(target):
    fused = legalize_and_fuse(relax_module("where_select"))
    before = fused.script()
    schedule_cpu_default(fused, target)
    assert fused.script() == before


def test_failing_rule_falls_back_and_warns(target, monkeypatch, caplog):
    def broken(sch, options):
        raise RuntimeError("rule exploded")

    monkeypatch.setattr(cpu_default, "_rule_default", broken)
    fused = legalize_and_fuse(relax_module("maxpool_nchw"))
    with caplog.at_level(logging.WARNING, logger="qcompiler"):
        report = schedule_cpu_default_report(fused, target)
    assert [rule for _, rule in report.applied] == ["cpu_default.parallel"]
    assert any(w.rule == "cpu_default" and "rule exploded" in w.message for w in report.warnings)
    assert any("rule exploded" in r.getMessage() for r in caplog.records)
    args = family_inputs("maxpool_nchw")
    np.testing.assert_array_equal(run(build_fused(report.mod, target), args),
                                  run(build_fused(fused, target), args))


def test_every_rule_failing_leaves_function_unscheduled(target, monkeypatch):
    def broken(sch, options):
        raise RuntimeError("no")

    for rule in ("_rule_default", "_rule_parallel", "_rule_outer"):
        monkeypatch.setattr(cpu_default, rule, broken)
    fused = legalize_and_fuse(relax_module("pad_nchw"))
    report = schedule_cpu_default_report(fused, target)
    assert report.failed and not report.applied and len(report.warnings) == 3
    assert report.mod.script() == fused.script()


def test_options_validate():
    with pytest.raises(ValueError):
        CPUScheduleOptions(vector_bits=96)
    zen5 = tvm.target.Target({"kind": "llvm", "mcpu": "znver5"})
    assert CPUScheduleOptions.for_target(zen5).vector_bits == 512


def test_rejects_non_llvm_target():
    with pytest.raises(ValueError):
        schedule_cpu_default(tvm.IRModule({}), tvm.target.Target({"kind": "cuda", "arch": "sm_80"}))


def test_pass_in_relax_pipeline(target):
    """CPUDefaultSchedule as a step of TVM's CPU pipeline, after FuseTIR."""
    from tvm.relax.backend.cpu_generic import pipeline as cp

    name = "softmax_like_rows"
    pipe = tvm.transform.Sequential(
        cp.library_dispatch_passes(target)
        + cp.legalize_passes(target)
        + [CPUDefaultSchedule(target)]
        + cp.dataflow_lower_passes(target)
        + cp.finalize_passes(target)
    )
    ex = tvm.compile(relax_module(name), target, relax_pipeline=pipe)
    args = family_inputs(name)
    expect = run(build_fused(legalize_and_fuse(relax_module(name)), target), args)
    np.testing.assert_array_equal(run(ex, args), expect)


# ---- speed --------------------------------------------------------------------------------------

SPEED_CASES = {
    "requant chain 1x64x112x112 int32->int8": (_requant, [("x", (1, 64, 112, 112), "int32", None)]),
    "maxpool 3x3/2 NHWC 1x112x112x64 int8": (
        lambda bb, x: R.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1), layout="NHWC"),
        [("x", (1, 112, 112, 64), "int8", None)],
    ),
    "maxpool 3x3/2 NCHW 1x64x112x112 int8": (
        lambda bb, x: R.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1), layout="NCHW"),
        [("x", (1, 64, 112, 112), "int8", None)],
    ),
    "global sum pool NCHW 1x256x56x56 int32": (
        lambda bb, x: R.sum(x, axis=[2, 3], keepdims=True),
        [("x", (1, 256, 56, 56), "int32", None)],
    ),
    "global sum pool NHWC 1x56x56x256 int32": (
        lambda bb, x: R.sum(x, axis=[1, 2]),
        [("x", (1, 56, 56, 256), "int32", None)],
    ),
}


def _median_time(ex, args, rounds=3):
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    targs = [tvm.runtime.tensor(a) for a in args]
    ev = vm.time_evaluator("main", dev, number=5, repeat=3, min_repeat_ms=20)
    return min(float(np.median(ev(*targs).results)) for _ in range(rounds))


def test_speedups(target, monkeypatch):
    rows = []
    for label, spec in SPEED_CASES.items():
        monkeypatch.setitem(FAMILIES, label, spec)
        fused = legalize_and_fuse(relax_module(label))
        args = family_inputs(label)
        base = build_fused(fused, target)
        sched = build_fused(schedule_cpu_default(fused, target), target)
        np.testing.assert_array_equal(run(sched, args), run(base, args))
        tb, ts = _median_time(base, args), _median_time(sched, args)
        rows.append((label, tb * 1e6, ts * 1e6, tb / ts))
    print("\ndefault CPU schedule vs unscheduled (median us):")
    for label, tb, ts, x in rows:
        print(f"  {label:42s} {tb:9.1f} -> {ts:8.1f}  x{x:5.1f}")
    # only the robust one is asserted: the requant chain measured 8-10x (timing noise ~50%)
    assert rows[0][3] > 1.5


def test_scalarized_vector_loop_is_left_to_llvm(target):
    """TVM cannot vectorize ``round`` (a quantize): the loop is rescheduled without TVM vectors."""
    report = schedule_cpu_default_report(legalize_and_fuse(relax_module("quantize_entry")), target)
    assert [rule for _, rule in report.applied] == ["cpu_default.novector"]
    assert report.notes and not report.warnings


SCAN_SRC = '''
@T.prim_func(s_tir=True)
def scan(x: T.Buffer((64, 4096), "int32"), y: T.Buffer((64, 4096), "int32")):
    for i, j in T.grid(64, 4096):
        with T.sblock("s"):
            T.reads(x[i, j], y[i, j - 1])
            T.writes(y[i, j])
            y[i, j] = T.if_then_else(j == 0, x[i, j], y[i, j - 1] + x[i, j])
'''


def test_loop_carried_dependence_is_never_parallelized(target):
    """A prefix sum written as an opaque loop nest: TVM refuses every parallel/vectorize, the
    fallbacks end with the function unchanged in meaning and reported unscheduled by the scan."""
    func = tvm.script.from_source(SCAN_SRC)
    opts = CPUScheduleOptions.for_target(target, min_parallel_work=0)
    report = schedule_cpu_default_report(tvm.IRModule({"main": func}), target, opts)
    out = report.mod["main"]
    assert "T.parallel" not in out.script() and "T.vectorized" not in out.script()
    assert not scan_tir(report.mod).all_scheduled
    x = np.random.default_rng(0).integers(-100, 100, (64, 4096)).astype("int32")
    lib = tvm.compile(tvm.IRModule({"main": out.with_attr("global_symbol", "main")}), target)
    y = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), np.cumsum(x, axis=1))


def _newton_rows(bb, v, y):
    """I-LayerNorm's tail (qcompiler/intops/nonlinear.py ``lower_isqrt``, ``LayerNormOp``): a per-row
    integer sqrt by 6 unrolled Newton steps, each reading the previous step three times, broadcast
    over the row, then an i-GELU-like tail that reads the normalized value three times."""
    e = bb.emit(R.sum(R.astype(R.greater_equal(v, c64(np.int64(4) ** np.arange(31))), "int64"),
                      axis=[-1], keepdims=True))
    x = bb.emit(R.left_shift(c64(1), e))
    for _ in range(6):
        q = bb.emit(R.floor_divide(v, bb.emit(R.maximum(x, c64(1)))))
        x = bb.emit(R.minimum(x, bb.emit(R.right_shift(bb.emit(R.add(x, q)), c64(1)))))
    k = bb.emit(R.floor_divide(c64(1 << 40), x))
    f = bb.emit(R.right_shift(R.multiply(y, k), c64(20)))
    a = bb.emit(R.minimum(R.abs(f), c64(4000)))
    g = bb.emit(R.where(R.less(f, c64(0)), R.negative(a), a))
    return R.astype(R.clip(R.right_shift(R.multiply(g, f), c64(12)), -32768, 32767), "int16")


def test_values_read_many_times_stay_blocks_of_their_own(target):
    """Inlining every injective block copied the Newton chain 3^6 times into each output element and
    the i-GELU tail tripled it again: a PrimFunc of ~10^5 expression nodes whose TIR simplification
    took minutes (issue 16).  Values read more than once stay blocks once their readers would
    exceed ``max_inline_expr`` nodes; the result is unchanged."""
    FAMILIES["newton_rows"] = (_newton_rows, [("v", (12, 1), "int64", (1, 1 << 50)),
                                              ("y", (12, 64), "int64", (-(1 << 25), 1 << 25))])
    try:
        fused = legalize_and_fuse(relax_module("newton_rows"))
        args = family_inputs("newton_rows")
    finally:
        FAMILIES.pop("newton_rows")
    opts = CPUScheduleOptions.for_target(target)
    report = schedule_cpu_default_report(fused, target, opts)
    assert not report.failed, report.warnings
    biggest = 0
    for func in report.mod.functions.values():
        if isinstance(func, tvm.tirx.PrimFunc):
            sizes = []
            tvm_ffi.structural_walk(func.body, (tvm.tirx.BufferStore, lambda s: sizes.append(
                cpu_default._expr_size(s.value))))
            biggest = max([biggest] + sizes)
    assert biggest <= 2 * opts.max_inline_expr, biggest      # inlined everything: ~93k nodes
    np.testing.assert_array_equal(run(build_fused(report.mod, target), args), run(build_fused(fused, target), args))
