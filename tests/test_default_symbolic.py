"""Issue 17: the dims an ONNX model declares symbolic stay symbolic by default.

Without ``--shape`` a declared-symbolic dim other than the batch stays symbolic over 1..AUTO_MAX, or
up to the bound the model sets (a position table), found and stated (``shape_spec.add_declared``,
``driver.keep_symbolic``); a dim that cannot stay symbolic (an image width through strided convs, a
model that branches on its input) stays at its calibration size with one warning naming it and the
flag that keeps it; ``--static-shapes`` fixes every dim.  The batch stays ``--batch``: requests of
other sizes run in chunks.  At every shape the library equals the NumPy reference of that shape
bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import qcompiler
from qcompiler import driver
from qcompiler.cli import main
from qcompiler.errors import InputError
from qcompiler.shape_spec import AUTO_MAX
from qcompiler.targets import parse_target
from tests.helpers import make_model, tensor
from tests.test_symbolic_shapes import MAXPOS, R, _cnn_with_strides, _encoder, _text_feeds, against_reference


def _compile(tmp_path, model, calib, name, *extra, quiet=True):
    onnx.save(model, tmp_path / f"{name}.onnx")
    if isinstance(calib, dict):
        np.savez(tmp_path / f"{name}.npz", **calib)
        calib_path = tmp_path / f"{name}.npz"
    else:
        calib_path = calib
    out = tmp_path / f"{name}.so"
    assert main(["-q"] * quiet + ["compile", str(tmp_path / f"{name}.onnx"), "-o", str(out), "--calib",
                                  str(calib_path), *extra]) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def test_sequence_stays_symbolic_up_to_the_models_bound(tmp_path):
    """The encoder's sequence is symbolic without --shape, bounded at its 40-row position table; the
    batch stays 1 and a batch of 3 runs as three calls."""
    calib = _text_feeds(2, 12, np.random.default_rng(1))
    out, meta = _compile(tmp_path, _encoder(), calib, "enc")
    assert meta["symbolic_dims"] == {"seq": {"min": 1, "max": MAXPOS, "calibrated": 12,
                                             "where": [["ids", 1], ["mask", 1]]}}
    assert meta["inputs"][0]["shape"] == [1, "seq"] and not meta.get("fixed_dims")
    lib = qcompiler.load(str(out))
    rng = np.random.default_rng(3)
    against_reference(tmp_path / "enc.onnx", calib, lib, [_text_feeds(1, s, rng) for s in (1, 7, 12, 29, MAXPOS)])
    three = _text_feeds(3, 9, rng)
    got = lib(three)
    for i in range(3):
        one = lib({k: v[i:i + 1] for k, v in three.items()})
        assert all(np.array_equal(got[k][i:i + 1], one[k]) for k in one)
    with pytest.raises(InputError, match=f"must be in 1..{MAXPOS}") as e:
        lib(_text_feeds(1, MAXPOS + 1, rng))
    assert "\n" not in str(e.value)


def test_static_shapes_fixes_every_dim(tmp_path):
    calib = _text_feeds(2, 12, np.random.default_rng(1))
    out, meta = _compile(tmp_path, _encoder(), calib, "enc", "--static-shapes")
    assert not meta.get("symbolic_dims") and meta["inputs"][0]["shape"] == [1, 12]
    with pytest.raises(InputError, match="compiled for"):
        qcompiler.load(str(out))(_text_feeds(1, 13, np.random.default_rng(0)))


def test_an_image_width_through_strided_convs_stays_symbolic_on_its_stride_lattice(tmp_path, capsys):
    """No polynomial in W, but one in W / 4: the width stays symbolic on the lattice found by tracing,
    4..2048:4 (step 2 is ruled out; the mean's count, (W / 4) * 4, is a polynomial of u and needs no
    table: ``pool.MeanRequantOp``), stated in the progress output; the library is bit-exact to the
    reference at every width tried and equals the --static-shapes library at the calibration width."""
    calib = {"x": R.standard_normal((6, 3, 16, 32)).astype(np.float32)}
    model = _cnn_with_strides()  # weights drawn once: both compiles below take this model
    capsys.readouterr()
    out, meta = _compile(tmp_path, model, calib, "cnnw", quiet=False)
    err = capsys.readouterr().err
    assert "dim 'W' stays symbolic in steps of 4" in err and "Traceback" not in err and "warning" not in err
    assert meta["symbolic_dims"]["W"] == {"min": 4, "max": AUTO_MAX, "calibrated": 32, "where": [["x", 3]], "step": 4}
    assert not meta.get("fixed_dims")
    lib = qcompiler.load(str(out))
    rng = np.random.default_rng(5)
    against_reference(tmp_path / "cnnw.onnx", calib, lib,
                      [{"x": rng.standard_normal((1, 3, 16, w)).astype(np.float32)} for w in (4, 32, 28, 52, 1500, AUTO_MAX)])
    static, _ = _compile(tmp_path, model, calib, "cnnw_static", "--static-shapes")
    x = R.standard_normal((2, 3, 16, 32)).astype(np.float32)
    a, b = lib(x=x), qcompiler.load(str(static))(x=x)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="multiple of 4"):
        lib(x=np.zeros((1, 3, 16, 42), np.float32))
    assert main(["inspect", str(out)]) == 0
    assert "symbolic dim W: 4..2048:4" in capsys.readouterr().out


def _lstm_model():
    hid, feat = 3, 4
    w = (R.standard_normal((1, 4 * hid, feat)) * 0.3).astype(np.float32)
    r = (R.standard_normal((1, 4 * hid, hid)) * 0.3).astype(np.float32)
    return make_model([helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hid)],
                      [("x", ["T", 1, feat])], [("y", None)], [tensor("W", w), tensor("R", r)])


def test_a_recurrence_over_time_stays_symbolic(tmp_path):
    """An LSTM's time axis: one Scan-derived loop, symbolic (tests/test_recurrent_loop.py checks it
    bit for bit, with the final cell state read too)."""
    out, meta = _compile(tmp_path, _lstm_model(), {"x": R.standard_normal((6, 1, 4)).astype(np.float32)}, "lstm")
    assert meta["symbolic_dims"]["T"]["calibrated"] == 6 and not meta.get("fixed_dims")
    assert qcompiler.load(str(out))(x=np.zeros((9, 1, 4), np.float32))["y"].shape[0] == 9


def _two_inputs():
    """A sequence through a MatMul (symbolic) and an image width through a strided conv (not): the
    two are tried together, then one by one."""
    f = np.float32
    nodes = [helper.make_node("MatMul", ["s", "Wm"], ["m"]), helper.make_node("Relu", ["m"], ["y1"]),
             helper.make_node("Conv", ["x", "Wc"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["y2"])]
    inits = [tensor("Wm", (R.standard_normal((8, 4)) * 0.3).astype(f)),
             tensor("Wc", (R.standard_normal((4, 3, 3, 3)) * 0.3).astype(f))]
    return make_model(nodes, [("s", ["N", "L", 8]), ("x", ["N", 3, 9, "W"])], [("y1", None), ("y2", None)], inits)


def test_of_two_default_dims_the_one_that_can_stays_symbolic(tmp_path):
    calib = {"s": R.standard_normal((4, 6, 8)).astype(np.float32), "x": R.standard_normal((4, 3, 9, 15)).astype(np.float32)}
    out, meta = _compile(tmp_path, _two_inputs(), calib, "two")
    assert meta["symbolic_dims"]["L"]["max"] == AUTO_MAX and list(meta["fixed_dims"]) == ["W"]
    lib = qcompiler.load(str(out))
    x = R.standard_normal((1, 3, 9, 15)).astype(np.float32)
    feeds = [{"s": R.standard_normal((1, n, 8)).astype(np.float32), "x": x} for n in (1, 6, 13, 300)]
    against_reference(tmp_path / "two.onnx", calib, lib, feeds)


def test_calibration_files_of_different_lengths_need_no_flag(tmp_path):
    """A folder of .npz files of different sequence lengths is normal input; the library is
    calibrated at the largest group's length and takes every length."""
    rng = np.random.default_rng(5)
    (tmp_path / "calib").mkdir()
    for i, (b, s) in enumerate(((2, 10), (1, 14), (2, 14))):
        np.savez(tmp_path / "calib" / f"{i}.npz", **_text_feeds(b, s, rng))
    out, meta = _compile(tmp_path, _encoder(), tmp_path / "calib", "encv")
    assert meta["symbolic_dims"]["seq"]["calibrated"] == 14 and meta["calibration"]["samples"] == 5
    got = qcompiler.load(str(out))(_text_feeds(1, 10, rng))
    assert got["res"].shape == (1, 10, 16)


def test_cuda_keeps_default_dims_at_their_calibration_size(tmp_path):
    """Symbolic dims are CPU-only: for --target cuda the default ones are fixed (no error)."""
    onnx.save(_encoder(), tmp_path / "enc.onnx")
    calib = _text_feeds(2, 12, np.random.default_rng(1))
    prep = driver.prepare(str(tmp_path / "enc.onnx"), calib,
                          driver.CompileOptions(target=parse_target("cuda", "sm_80")))
    assert prep.sym_vars == [] and prep.input_shapes["ids"] == (1, 12)
    cpu = driver.prepare(str(tmp_path / "enc.onnx"), calib, driver.CompileOptions(target=parse_target("cpu")))
    assert [(v.name, v.auto) for v in cpu.sym_vars] == [("seq", True)]


def test_host_target_claims_only_features_the_host_has():
    """A VM may hide features of its CPU model (an Emerald Rapids guest without AMX): the host target
    turns them off, so a library built here is never refused here (artifact.check_host)."""
    from qcompiler import artifact, targets

    spec = parse_target("cpu")
    assert artifact.missing_cpu_features(artifact.cpu_features(spec.arch, spec.mattr)) == []
    assert spec.describe().get("mattr", []) == list(targets.host_mattr())


def _last_token_and_masked_fill():
    """The last time step (Gather at Shape - 1: a size only in the index map's constant, no dim of
    its kernel's buffers) and a masked_fill (Where of a constant Expanded to the input's shape: a
    graph constant of symbolic shape) -- two forms that once failed to build symbolic."""
    f, i64 = np.float32, np.int64
    nodes = [helper.make_node("Shape", ["x"], ["sh"]), helper.make_node("Gather", ["sh", "i1"], ["t"], axis=0),
             helper.make_node("Sub", ["t", "one"], ["last"]),
             helper.make_node("Gather", ["x", "last"], ["xl"], axis=1),            # [N, 8]
             helper.make_node("MatMul", ["xl", "W"], ["y1"]),
             helper.make_node("Shape", ["m"], ["msh"]),
             helper.make_node("Expand", ["fill", "msh"], ["fillx"]),
             helper.make_node("Equal", ["m", "zero"], ["pad"]),
             helper.make_node("Where", ["pad", "fillx", "s"], ["sm"]),
             helper.make_node("Softmax", ["sm"], ["y2"], axis=-1)]
    inits = [tensor("i1", np.array(1, i64)), tensor("one", np.array(1, i64)), tensor("zero", np.array(0, i64)),
             tensor("W", (R.standard_normal((8, 4)) * 0.3).astype(f)), tensor("fill", np.array([-30.0], f))]
    return make_model(nodes, [("x", ["N", "T", 8]), ("m", ["N", "T"], onnx.TensorProto.INT64), ("s", ["N", "T"])],
                      [("y1", None), ("y2", None)], inits)


def test_a_size_only_in_an_index_and_a_constant_of_symbolic_shape_build(tmp_path):
    rng = np.random.default_rng(8)

    def feeds(n):
        m = np.ones((1, n), np.int64)
        m[0, rng.integers(1, n + 1):] = 0
        return {"x": rng.standard_normal((1, n, 8)).astype(np.float32), "m": m,
                "s": rng.standard_normal((1, n)).astype(np.float32)}

    calib = {k: np.concatenate([feeds(9)[k] for _ in range(4)]) for k in ("x", "m", "s")}
    out, meta = _compile(tmp_path, _last_token_and_masked_fill(), calib, "lt")
    assert "T" in meta["symbolic_dims"] and not meta.get("fixed_dims"), meta.get("fixed_dims")
    against_reference(tmp_path / "lt.onnx", calib, qcompiler.load(str(out)), [feeds(n) for n in (1, 2, 9, 17, 60)])


def test_a_failed_symbolic_build_falls_back_to_the_calibration_size(tmp_path, monkeypatch):
    """Dims symbolic only by default: a lowering / build failure of the symbolic graph rebuilds the
    static one (each dim named in model.json's fixed_dims); with --shape it stays an error."""
    from qcompiler.lowering import build as B

    real = B.build

    def build(graph, *a, **k):
        if getattr(graph, "dim_ranges", None):
            raise RuntimeError("no symbolic kernel for this op")
        return real(graph, *a, **k)

    monkeypatch.setattr(B, "build", build)
    calib = _text_feeds(2, 12, np.random.default_rng(1))
    out, meta = _compile(tmp_path, _encoder(), calib, "enc")
    assert not meta.get("symbolic_dims") and "no symbolic kernel" in meta["fixed_dims"]["seq"]["reason"]
    assert meta["inputs"][0]["shape"] == [1, 12]
    np.savez(tmp_path / "c.npz", **calib)
    assert main(["-q", "compile", str(tmp_path / "enc.onnx"), "-o", str(tmp_path / "x.so"), "--calib",
                 str(tmp_path / "c.npz"), "--shape", "ids=1x1..20"]) == 2
    assert not (tmp_path / "x.so").exists()


def test_unnamed_dims_are_candidates_and_an_image_dim_fails_fast(tmp_path, monkeypatch):
    """Exporters leave dims unnamed ("?"): the first is the batch, the others are default candidates
    like named ones (each its own variable, '<input>_<axis>'); an image width through strided convs
    is ruled out from the frontend's shapes alone at every step under which it is no polynomial
    (1 and 2 here, ``driver._shapes_fit``): no full trace runs at a width off the stride's lattice."""
    model = _cnn_with_strides()
    for d in model.graph.input[0].type.tensor_type.shape.dim:
        if d.dim_param:
            d.Clear()   # neither a size nor a name
    widths, real = [], driver.retrace
    monkeypatch.setattr(driver, "retrace", lambda *a, **k: widths.append(a[3]["x"][3]) or real(*a, **k))
    out, meta = _compile(tmp_path, model, {"x": R.standard_normal((4, 3, 16, 32)).astype(np.float32)}, "unnamed")
    assert not meta.get("fixed_dims") and meta["symbolic_dims"]["x_3"]["step"] == 4
    assert meta["inputs"][0]["shape"] == [1, 3, 16, "x_3"] and widths and all(w % 4 == 0 for w in widths)


def _detector() -> onnx.ModelProto:
    """A detector's neck in miniature: two stride-2 convs, the deeper map upsampled x2 (Resize,
    nearest) and added to the shallower one, a 1x1 head.  It runs only at heights and widths in
    multiples of 4 (the Add needs the upsampled map to match)."""
    f = np.float32
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Resize", ["r2", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Add", ["up", "r1"], ["s"]),
             helper.make_node("Conv", ["s", "W3", "B3"], ["y"], kernel_shape=[1, 1])]
    inits = [tensor("W1", (R.standard_normal((8, 3, 3, 3)) * 0.3).astype(f)), tensor("B1", (R.standard_normal(8) * 0.1).astype(f)),
             tensor("W2", (R.standard_normal((8, 8, 3, 3)) * 0.2).astype(f)), tensor("B2", (R.standard_normal(8) * 0.1).astype(f)),
             tensor("W3", (R.standard_normal((2, 8, 1, 1)) * 0.3).astype(f)), tensor("B3", (R.standard_normal(2) * 0.1).astype(f)),
             tensor("scales", np.array([1, 1, 2, 2], f))]
    return make_model(nodes, [("x", [1, 3, "H", "W"])], [("y", None)], inits)


def test_a_detectors_image_dims_stay_symbolic_through_its_upsampling(tmp_path, capsys):
    """A model that does not run at the probe sizes (7, 11, 13: its upsampled features would not
    match the strided ones) is tried on the stride lattice too; the nearest Resize's index map,
    o // 2 along each upsampled axis, is fitted (``symbolic.AffineMap`` with divisors) and checked
    at the largest sizes.  Height and width stay symbolic in steps of 4, bit-exact at every size
    tried (one step, non-square, the range's end) and equal to the static library at the
    calibration size."""
    calib = {"x": R.standard_normal((4, 3, 32, 48)).astype(np.float32)}
    model = _detector()
    capsys.readouterr()
    out, meta = _compile(tmp_path, model, calib, "det", quiet=False)
    err = capsys.readouterr().err
    assert "dim 'H' stays symbolic in steps of 4" in err and "dim 'W' stays symbolic in steps of 4" in err
    assert not meta.get("fixed_dims") and meta["symbolic_dims"]["W"]["step"] == 4
    lib = qcompiler.load(str(out))
    rng = np.random.default_rng(2)
    against_reference(tmp_path / "det.onnx", calib, lib,
                      [{"x": rng.standard_normal((1, 3, h, w)).astype(np.float32)}
                       for h, w in ((4, 4), (32, 48), (28, 60), (8, AUTO_MAX), (52, 44))])
    static, _ = _compile(tmp_path, model, calib, "det_static", "--static-shapes")
    x = R.standard_normal((1, 3, 32, 48)).astype(np.float32)
    a, b = lib(x=x), qcompiler.load(str(static))(x=x)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="multiple of 4"):
        lib(x=np.zeros((1, 3, 32, 42), np.float32))


def test_a_fractional_upsampling_stays_fixed_with_its_reason(tmp_path):
    """Nearest upsampling by 1.5 (an index map 2o // 3, of no form c * (o // d)): the dims stay at
    their calibration sizes, each with a reason, and the library runs there."""
    f = np.float32
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Resize", ["c1", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Conv", ["up", "W3", "B3"], ["y"], kernel_shape=[1, 1])]
    inits = [tensor("W1", (R.standard_normal((8, 3, 3, 3)) * 0.3).astype(f)), tensor("B1", (R.standard_normal(8) * 0.1).astype(f)),
             tensor("W3", (R.standard_normal((2, 8, 1, 1)) * 0.3).astype(f)), tensor("B3", (R.standard_normal(2) * 0.1).astype(f)),
             tensor("scales", np.array([1, 1, 1.5, 1.5], f))]
    model = make_model(nodes, [("x", [1, 3, "H", "W"])], [("y", None)], inits)
    calib = {"x": R.standard_normal((4, 3, 32, 48)).astype(np.float32)}
    out, meta = _compile(tmp_path, model, calib, "frac")
    assert set(meta["fixed_dims"]) == {"H", "W"}
    assert qcompiler.load(str(out))(x=calib["x"][:1])["y"].shape == (1, 2, 24, 36)
