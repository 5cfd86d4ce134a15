"""Kernels over symbolic dims, bit-exact to the NumPy reference at every size tried, on both sides of
their run-time serial / parallel branch (qcompiler/kernels/branch.py):

* the GEMM kernels of qcompiler/kernels/cpu_vnni.py over a symbolic row count: ``dense`` and
  ``batch_matmul`` (symbolic batch / M / N / K) store exactly the valid rows and branch serial /
  parallel at run time (``_par_branch``), ``dense`` with and without a fused epilogue;
  ``conv2d_nhwc`` over a symbolic batch / width takes its row tiles per output row as an argument,
  with and without a fused epilogue;
* ``depthwise_conv2d_nhwc`` over a symbolic height / width, with and without a fused epilogue;
* the default schedule over symbolic extents: its size branch (qcompiler/kernels/cpu_default.py ``_size_branch``): an
  elementwise kernel and a row reduction over a symbolic axis.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import tirx  # noqa: E402

from qcompiler.kernels import cpu_vnni as cv  # noqa: E402
from qcompiler.tune.workload import rows_at  # noqa: E402

from .test_cpu_vnni import AddClip, build, dense_acc_ref, isa, rand_requant, requant_ref, target  # noqa: E402,F401


def _rows(M, N, K, a_dtype, out_dtype, lo, hi, isa, post=None, rep=64):
    Ms = tirx.Var("s", "int64")
    with rows_at({"s": rep}):
        f = cv.dense(Ms * 1, N, K, a_dtype, out_dtype, lo, hi, isa=isa, post=post)
    return f


@pytest.mark.parametrize("N,K", [(64, 48), (384, 384)])
def test_dense_symbolic_rows_every_size(target, isa, N, K):
    rng = np.random.default_rng(N + K)
    f = _rows(None, N, K, "int8", "int8", -128, 127, isa)
    m_s = f.attrs.get("qc.rows_serial_max") if f.attrs is not None else None
    lib = build(f, target)
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, N)
    wp, be = cv.pack_dense(w, bias, a_signed=True, isa=isa)
    sizes = {1, 2, 7, 13, 64, 97}
    if m_s:  # both sides of the serial / parallel branch
        sizes |= {int(m_s), int(m_s) + 1}
    # both sides of each row bucket's tile (cpu_vnni.ROW_BUCKETS, below the representative 64 rows)
    buckets = cv._row_buckets(cv.default_config(64, N, K, isa=isa), 64,
                              lambda r: cv.default_config(r, N, K, isa=isa))
    sizes |= {u for u, _ in buckets} | {u + 1 for u, _ in buckets}
    for M in sorted(sizes):
        a = rng.integers(-128, 128, (M, K)).astype(np.int8)
        out = tvm.runtime.tensor(np.zeros((M, N), np.int8))
        lib(*[tvm.runtime.tensor(x) for x in (a, wp, be, mult, shift)], out)
        want = requant_ref(dense_acc_ref(a, w, bias), mult, shift, -128, 127, "int8")
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"dense M={M} (serial up to {m_s})")


def test_dense_symbolic_rows_fused_epilogue(target, isa):
    rng = np.random.default_rng(7)
    N, K = 128, 96
    f = _rows(None, N, K, "uint8", "int8", -100, 100, isa, post=AddClip())
    lib = build(f, target)
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, N)
    wp, be = cv.pack_dense(w, bias, a_signed=False, isa=isa)
    c = np.asarray([3], np.int64)
    m_s = int(f.attrs.get("qc.rows_serial_max") or 0) if f.attrs is not None else 0
    for M in sorted({1, 5, 31, m_s, m_s + 1} - {0}):
        a = rng.integers(0, 256, (M, K)).astype(np.uint8)
        r = rng.integers(-128, 128, (M, N)).astype(np.int8)
        out = tvm.runtime.tensor(np.zeros((M, N), np.int8))
        lib(*[tvm.runtime.tensor(x) for x in (a, wp, be, mult, shift, r, c)], out)
        y = requant_ref(dense_acc_ref(a, w, bias), mult, shift, -100, 100, "int64")
        want = np.clip(y + r.astype(np.int64) * 3, -128, 127).astype(np.int8)
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"dense + epilogue M={M}")


def test_serial_rows_threshold():
    cyc = lambda m: cv.gemm_cycles(m, 384, 384)  # noqa: E731
    m_s = cv._serial_rows(cyc)
    assert m_s >= 1 and cyc(m_s) < cv.SERIAL_CYCLES <= cyc(m_s + 1)
    assert cv._serial_rows(lambda m: cv.SERIAL_CYCLES) == 0


@pytest.mark.parametrize("b_trans", [False, True])
def test_batch_matmul_symbolic_dims(target, isa, b_trans):
    """Attention-like [b*h, s, d] x [b*h, d, s] (and P.V: [b*h, s, s] x [b*h, s, d]) with symbolic b
    and s: exact rows; symbolic columns padded to whole tiles (the caller keeps N)."""
    rng = np.random.default_rng(3)
    b, s = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    with rows_at({"b": 2, "s": 24}):
        qk = cv.batch_matmul(b * 4, s, s, 32, "int8", "int8", "int8", -128, 127, b_trans=b_trans, isa=isa)
        pv = cv.batch_matmul(b * 4, s, 32, s, "uint8", "int8", "int8", -128, 127, b_trans=b_trans, isa=isa)
    assert [list(map(str, t)) for t in qk.attrs["qc.sym_tiles"]][0][0] == "N"
    assert pv.attrs is None or "qc.sym_tiles" not in pv.attrs  # static N: the exact output
    tile = int(qk.attrs["qc.sym_tiles"][0][1])
    lqk, lpv = build(qk, target), build(pv, target)
    mult, shift = np.asarray([1 << 20], np.int64), np.asarray([26], np.int64)
    for bb, ss in [(1, 1), (1, 7), (3, 13), (2, 40), (1, 300)]:  # the last past the serial branch
        B = 4 * bb
        for lib, (M, N, K), adt in ((lqk, (ss, ss, 32), "int8"), (lpv, (ss, 32, ss), "uint8")):
            a = (rng.integers(-128, 128, (B, M, K)) if adt == "int8" else rng.integers(0, 256, (B, M, K))).astype(adt)
            w = rng.integers(-128, 128, (B, K, N)).astype(np.int8)
            wt = np.ascontiguousarray(w.transpose(0, 2, 1)) if b_trans else w
            cols = -(-N // tile) * tile if lib is lqk else N
            out = tvm.runtime.tensor(np.zeros((B, M, cols), np.int8))
            lib(*[tvm.runtime.tensor(x) for x in (a, wt, mult, shift)], out)
            acc = np.einsum("bmk,bkn->bmn", a.astype(np.int64), w.astype(np.int64))
            want = requant_ref(acc, mult, shift, -128, 127, "int8")
            np.testing.assert_array_equal(out.numpy()[:, :, :N], want, err_msg=f"batch_matmul {B}x{M}x{N}x{K}")


@pytest.mark.parametrize("geo", [((1, 1), (0, 0, 0, 0), 1), ((2, 2), (1, 1, 1, 1), 3)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("C", [8, 3])
def test_conv_symbolic_batch_and_width(target, isa, geo, fused, C):
    """A conv over symbolic N and W: whole row tiles per output row, their count OWt an argument,
    the exact NHWC output, with and without a fused epilogue, on both sides of the serial branch;
    few channels (a stem conv: its padded input in vectors of whole column groups)."""
    from .test_cpu_vnni import conv_acc_ref

    strides, pads, k = geo
    rng = np.random.default_rng(11)
    n, w_ = tirx.Var("n", "int64"), tirx.Var("w", "int64")
    OC, H = 32, 6
    post = AddClip() if fused else None
    with rows_at({"n": 2, "w": 64}):
        f = cv.conv2d_nhwc(n, H, w_ * 2, C, OC, k, k, strides, pads, (1, 1), "int8", "int8", -128, 127, isa=isa,
                           post=post)
    mr = int(f.attrs["qc.ow_tiles"])
    lib = build(f, target)
    w = rng.integers(-128, 128, (OC, C, k, k)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, OC)
    wp, be = cv.pack_conv(w, bias, a_signed=True, isa=isa)
    for N, W in [(1, 2), (1, 14), (3, 6), (2, 26), (2, 250)]:  # the last past the serial branch
        x = rng.integers(-128, 128, (N, H, W, C)).astype(np.int8)
        want = requant_ref(conv_acc_ref(x, w, strides, pads, (1, 1)) + bias, mult, shift, -128, 127, "int8")
        extra = []
        if fused:
            r = rng.integers(-128, 128, want.shape).astype(np.int8)
            extra = [r, np.asarray([3], np.int64)]
            want = np.clip(want.astype(np.int64) + r.astype(np.int64) * 3, -128, 127).astype(np.int8)
        out = tvm.runtime.tensor(np.zeros(want.shape, np.int8))
        lib(*[tvm.runtime.tensor(a) for a in (x, wp, be, mult, shift, *extra)], -(-want.shape[2] // mr), out)
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"conv N={N} W={W} {geo} fused={fused}")


@pytest.mark.parametrize("a_dtype,C,k", [("int16", 24, 3), ("int16", 64, 5), ("int8", 20, 3)])
@pytest.mark.parametrize("fused", [False, True])
def test_depthwise_lanes_symbolic_height_and_width(target, a_dtype, C, k, fused):
    """The int32-lane depthwise kernel (int16 inputs, channel counts the tap kernel does not take)
    over a symbolic height and width: column tiles (``qc.ow_tiles``, their count an argument), the
    exact output equal to the reference, with and without a fused epilogue."""
    from .test_cpu_vnni import conv_acc_ref

    rng = np.random.default_rng(C + k + fused)
    strides, pads, dil = (1, 1), (k // 2,) * 4, (1, 1)
    w = rng.integers(-128, 128, (C, 1, k, k)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, C)
    post = AddClip() if fused else None
    with rows_at({"h": 12, "w": 80}):
        f = cv.depthwise_conv2d_nhwc(1, tirx.Var("h", "int64"), tirx.Var("w", "int64"), C, k, k, strides, pads, dil,
                                     a_dtype, "int8", -128, 127, post=post)
    tw = int(f.attrs["qc.ow_tiles"])
    assert tw == cv.direct_max_tw(C)
    lib = build(f, target)
    wd = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))
    lo, hi = (-(2**15), 2**15) if a_dtype == "int16" else (-128, 128)
    for H, W in [(1, 1), (5, 7), (12, 16), (7, 37)]:
        x = rng.integers(lo, hi, (1, H, W, C)).astype(a_dtype)
        want = requant_ref(conv_acc_ref(x, w, strides, pads, dil, groups=C) + bias, mult, shift, -128, 127, "int8")
        owt = -(-W // tw)
        extra = []
        if fused:
            r = rng.integers(-128, 128, (1, H, W, C)).astype(np.int8)
            extra = [r, np.asarray([3], np.int64)]
            want = np.clip(want.astype(np.int64) + r.astype(np.int64) * 3, -128, 127).astype(np.int8)
        out = tvm.runtime.tensor(np.zeros((1, H, W, C), np.int8))
        lib(*[tvm.runtime.tensor(a) for a in (x, wd, bias, mult, shift, *extra)], owt, out)
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"H={H} W={W} fused={fused}")


def _fused_and_scheduled(mod, target, rows: dict):
    """A Relax module legalized, fused and given the default CPU schedule at the dims' ``rows``."""
    from tvm import relax

    from qcompiler.kernels.cpu_default import schedule_cpu_default

    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    with rows_at(rows):
        return schedule_cpu_default(mod, target)


def test_default_schedule_branches_on_size(target):
    """An elementwise kernel over a symbolic dim whose range spans the serial / parallel threshold
    (qcompiler/kernels/cpu_default.py ``_size_branch``): one function, both loop nests, exact on
    both sides."""
    from tvm import relax

    s = tirx.Var("s", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([s, 1024], "int32"))
    with bb.function("main", [x], attrs={"tir_var_upper_bound": {"s": 4096}}):
        with bb.dataflow():
            t = bb.emit(relax.op.right_shift(relax.op.add(relax.op.multiply(
                x, relax.const(3, "int32")), relax.const(5, "int32")), relax.const(2, "int32")))
            y = bb.emit_output(relax.op.astype(relax.op.clip(t, -128, 127), "int8"))
        bb.emit_func_output(y)
    mod = _fused_and_scheduled(bb.get(), target, {"s": 8})
    kernels = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and "T.parallel" in kernels[0].script() and "if " in kernels[0].script()
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    rng = np.random.default_rng(5)
    for n in (1, 7, 255, 256, 3001):  # 256 x 1024 = the threshold (16 * min_parallel_work)
        a = rng.integers(-2000, 2000, (n, 1024)).astype(np.int32)
        want = np.clip((a * 3 + 5) >> 2, -128, 127).astype(np.int8)
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(a)).numpy(), want, err_msg=f"s={n}")


def test_default_schedule_row_reduction_over_symbolic_axis(target):
    """A softmax row's max over a symbolic axis: spatial loops parallel at the large sizes, exact."""
    from tvm import relax

    s = tirx.Var("s", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([12, s, s], "int64"))
    with bb.function("main", [x], attrs={"tir_var_upper_bound": {"s": 512}}):
        with bb.dataflow():
            y = bb.emit_output(relax.op.max(x, axis=[2], keepdims=True))
        bb.emit_func_output(y)
    mod = _fused_and_scheduled(bb.get(), target, {"s": 16})
    (f,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert "T.parallel" in f.script() and "if " in f.script()
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    rng = np.random.default_rng(9)
    for n in (1, 13, 200):
        a = rng.integers(-(2**40), 2**40, (12, n, n)).astype(np.int64)
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(a)).numpy(), a.max(axis=2, keepdims=True))


def test_default_schedule_sum_over_symbolic_height_and_width(target):
    """A global pool's sum over an NHWC image of symbolic height and width (a squeeze-excite block
    of a detector): the cast inlined into the sum (no int64 copy of the image), the channels
    vector lanes inside the reduction loops, as for a static image; exact on both sides of the
    size branch."""
    from tvm import relax

    h, w = tirx.Var("h", "int64"), tirx.Var("w", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, h, w, 96], "int16"))
    with bb.function("main", [x], attrs={"tir_var_upper_bound": {"h": 2048, "w": 2048}}):
        with bb.dataflow():
            y = bb.emit_output(relax.op.sum(relax.op.astype(x, "int64"), axis=[1, 2], keepdims=True))
        bb.emit_func_output(y)
    mod = _fused_and_scheduled(bb.get(), target, {"h": 320, "w": 320})
    (f,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    script = f.script()
    assert "alloc_buffer" not in script and "T.vectorized" in script and "T.parallel" in script
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    rng = np.random.default_rng(4)
    for hh, ww in ((1, 1), (3, 5), (640, 640)):
        a = rng.integers(-(2**15), 2**15, (1, hh, ww, 96)).astype(np.int16)
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(a)).numpy(),
                                      a.astype(np.int64).sum(axis=(1, 2), keepdims=True))


def test_default_schedule_vectorizes_a_symbolic_innermost_axis(target):
    """An elementwise kernel over attention-score shapes [12, s, s] (the innermost axis symbolic):
    whole vectors of one register plus a scalar tail (cpu_default ``_tail_vector``), exact at sizes
    below, at and between whole vectors."""
    from tvm import relax

    from qcompiler.kernels.cpu_default import TAIL_VECTOR

    s = tirx.Var("s", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([12, s, s], "int32"))
    m = relax.Var("m", relax.TensorType([12, s, 1], "int32"))
    with bb.function("main", [x, m], attrs={"tir_var_upper_bound": {"s": 512}}):
        with bb.dataflow():
            d = bb.emit(relax.op.astype(relax.op.subtract(x, m), "int64"))
            t = bb.emit(relax.op.right_shift(relax.op.add(relax.op.multiply(
                d, relax.const(1234567, "int64")), relax.const(1 << 20, "int64")), relax.const(21, "int64")))
            y = bb.emit_output(relax.op.astype(relax.op.clip(t, -32768, 32767), "int16"))
        bb.emit_func_output(y)
    mod = _fused_and_scheduled(bb.get(), target, {"s": 128})
    (f,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert TAIL_VECTOR in f.script() and "T.vectorized" in f.script()
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    rng = np.random.default_rng(11)
    for n in (1, 7, 8, 9, 64, 509):
        a = rng.integers(-40000, 40000, (12, n, n)).astype(np.int32)
        b = rng.integers(-40000, 40000, (12, n, 1)).astype(np.int32)
        want = np.clip(((a.astype(np.int64) - b) * 1234567 + (1 << 20)) >> 21, -32768, 32767).astype(np.int16)
        got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"s={n}")


@pytest.mark.parametrize("k", [1, 2])
def test_conv_symbolic_width_reads_its_input_in_place(target, isa, k):
    """A uint8 conv without padding over a symbolic height and width reads X itself (no padded copy):
    the last row tile's padded rows clamped to the last column, the exact output at every size."""
    from .test_cpu_vnni import conv_acc_ref

    rng = np.random.default_rng(k)
    C, OC = 24, 16
    h_, w_ = tirx.Var("h", "int64"), tirx.Var("w", "int64")
    with rows_at({"h": 20, "w": 20}):
        f = cv.conv2d_nhwc(1, h_ + 1, w_ + 1, C, OC, k, k, (1, 1), (0, 0, 0, 0), (1, 1), "uint8", "int16",
                           -32768, 32767, isa=isa)
    assert 'sblock("prep")' not in f.script()
    mr = int(f.attrs["qc.ow_tiles"])
    lib = build(f, target)
    w = rng.integers(-128, 128, (OC, C, k, k)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, OC)
    wp, be = cv.pack_conv(w, bias, a_signed=False, isa=isa)
    for H, W in [(2, 2), (3, 17), (9, 33), (21, 21)]:
        x = rng.integers(0, 256, (1, H, W, C)).astype(np.uint8)
        want = requant_ref(conv_acc_ref(x, w, (1, 1), (0, 0, 0, 0), (1, 1)) + bias, mult, shift, -32768, 32767,
                           "int16")
        out = tvm.runtime.tensor(np.zeros(want.shape, np.int16))
        lib(*[tvm.runtime.tensor(a) for a in (x, wp, be, mult, shift)], -(-want.shape[2] // mr), out)
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"conv k={k} H={H} W={W}")


def test_dense_row_buckets_take_their_tuned_tiles(target, isa):
    """``bucket_config(rows)`` (the tuning log's record at a bucket's representative rows) gives
    that bucket's tile: the kernel changes and stays exact on both sides of the bucket."""
    N, K = 64, 48
    default = _rows(None, N, K, "int8", "int8", -128, 127, isa)
    seen = []

    def tuned(r):
        seen.append(r)
        return cv.VnniConfig(mr=1, nr=1, kc=0, n_outer=False, parallel=False) if r == 8 else None

    Ms = tirx.Var("s", "int64")
    with rows_at({"s": 64}):
        f = cv.dense(Ms * 1, N, K, "int8", "int8", -128, 127, isa=isa, bucket_config=tuned)
    assert 8 in seen
    assert f.script() != default.script()
    lib = build(f, target)
    rng = np.random.default_rng(5)
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    bias, mult, shift = rand_requant(rng, N)
    wp, be = cv.pack_dense(w, bias, a_signed=True, isa=isa)
    for M in (1, 2, 3, 8, 12, 13, 40):
        a = rng.integers(-128, 128, (M, K)).astype(np.int8)
        out = tvm.runtime.tensor(np.zeros((M, N), np.int8))
        lib(*[tvm.runtime.tensor(x) for x in (a, wp, be, mult, shift)], out)
        want = requant_ref(dense_acc_ref(a, w, bias), mult, shift, -128, 127, "int8")
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"M={M}")
