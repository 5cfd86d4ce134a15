"""Issue 20, bad calibration data: each kind is one line naming the input (or file) and what to do,
exit 2, no output; or a documented handling, checked here.

Handled (README, ``--calib``): a tensor whose calibration range is zero (constant-zero input) gets
the range [-1, 1] (``qcompiler/qtypes.py`` activation_qparams: scale 1/127), so the library is
exact on the calibrated constant and saturates beyond; float16 / float64 arrays are read as float32;
one sample is enough (the library's shapes come from the declared dims, not the sample count).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import qcompiler
from qcompiler.cli import main
from tests.helpers import ort_run
from tests.test_reliability import _model

HW = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    m, _ = _model(d, HW)
    return m


def _x(n, fill=None, dtype=np.float32):
    if fill is None:
        return np.random.default_rng(n).standard_normal((n, 3, HW, HW)).astype(dtype)
    return np.full((n, 3, HW, HW), fill, dtype)


def _compile(model, tmp_path, calib, capsys):
    out = tmp_path / "o.so"
    rc = main(["-q", "compile", str(model), "-o", str(out), "--calib", str(calib)])
    err = capsys.readouterr().err.strip()
    return rc, err, out


def _bad(model, tmp_path, capsys, calib, *needles):
    rc, err, out = _compile(model, tmp_path, calib, capsys)
    assert rc == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for n in needles:
        assert n.lower() in err.lower(), err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".o.")], "temporary output left"


def _npz(tmp_path, name, **arrays):
    p = tmp_path / f"{name}.npz"
    np.savez(p, **arrays)
    return p


def test_nonfinite_values(model, tmp_path, capsys):
    for name, fill in (("nan", np.nan), ("inf", np.inf), ("ninf", -np.inf)):
        x = _x(3)
        x[1, 2, 3, 4] = fill
        _bad(model, tmp_path, capsys, _npz(tmp_path, name, x=x), "'x'", "NaN or Inf", "remove those samples")
    # finite inputs the float model overflows on (|x| ~ 3e38): named, with what to check
    _bad(model, tmp_path, capsys, _npz(tmp_path, "huge", x=_x(2, 3e38)), "NaN/Inf", "overflows", "scaled")


def test_empty_data(model, tmp_path, capsys):
    _bad(model, tmp_path, capsys, _npz(tmp_path, "empty", x=_x(0)), "no samples", "'x'")
    d = tmp_path / "nofiles"
    d.mkdir()
    _bad(model, tmp_path, capsys, d, "nofiles", "no .npz files")
    (d / "junk.npz").write_bytes(b"not a zip file")
    _bad(model, tmp_path, capsys, d, "junk.npz", "not a readable .npz")


def test_wrong_dtypes(model, tmp_path, capsys):
    for name, arr, needle in (("bool", _x(2).astype(bool), "bool"), ("int", _x(2).astype(np.int32), "int32"),
                              ("complex", _x(2).astype(np.complex64), "complex64")):
        _bad(model, tmp_path, capsys, _npz(tmp_path, name, x=arr), "'x'", needle, "float32")
    _bad(model, tmp_path, capsys, _npz(tmp_path, "str", x=np.array(["a", "b"])), "'x'", "shape (2,)")


def test_float16_and_float64_are_read_as_float32(model, tmp_path, capsys):
    x = _x(4)
    libs = []
    for name, arr in (("f32", x), ("f64", x.astype(np.float64))):
        rc, err, out = _compile(model, tmp_path, _npz(tmp_path, name, x=arr), capsys)
        assert rc == 0, err
        libs.append(out.read_bytes())
    assert libs[0] == libs[1]  # float64 copies of the same values: the same library
    rc, err, _ = _compile(model, tmp_path, _npz(tmp_path, "f16", x=x.astype(np.float16)), capsys)
    assert rc == 0, err


def test_zero_range_and_constant_inputs(model, tmp_path, capsys):
    """A constant-zero calibration input gets the range [-1, 1] (scale 1/127): the library runs, is
    exact on zeros (only the biases remain) and saturates beyond 1; a constant non-zero input is an
    ordinary range [-c, c]."""
    rc, err, out = _compile(model, tmp_path, _npz(tmp_path, "zero", x=_x(4, 0.0)), capsys)
    assert rc == 0, err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["inputs"][0]["scale"] == pytest.approx(1 / 127)
    lib = qcompiler.load(str(out))
    y0 = lib(x=_x(1, 0.0))["y"]
    ref = ort_run(str(model), {"x": _x(1, 0.0)})[0]
    assert np.isfinite(y0).all() and np.allclose(y0, ref, atol=0.05 * (1 + np.abs(ref).max()))
    big, sat = lib(x=_x(1, 5.0))["y"], lib(x=_x(1, 1.0))["y"]
    assert np.array_equal(big, sat)  # saturated at the calibrated range's end
    rc, err, out = _compile(model, tmp_path, _npz(tmp_path, "const", x=_x(4, 3.0)), capsys)
    assert rc == 0, err
    assert json.loads(out.with_suffix(".json").read_text())["inputs"][0]["scale"] == pytest.approx(3 / 127)


def test_one_sample(model, tmp_path, capsys):
    for name, arr in (("one", _x(1)), ("unbatched", _x(1)[0])):
        rc, err, out = _compile(model, tmp_path, _npz(tmp_path, name, x=arr), capsys)
        assert rc == 0, err
        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["calibration"]["samples"] == 1 and meta["inputs"][0]["shape"] == [1, 3, HW, HW]


def test_folder_with_mixed_keys(model, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    np.savez(d / "a.npz", x=_x(2))
    np.savez(d / "b.npz", z=_x(2))
    _bad(model, tmp_path, capsys, d, "b.npz", "lacks input(s) ['x']")
    (d / "b.npz").unlink()
    np.savez(d / "c.npz", x=_x(2), extra=_x(2))
    _bad(model, tmp_path, capsys, d, "c.npz", "'extra'", "not model inputs")
    (d / "c.npz").unlink()
    np.savez(d / "d.npz", x=_x(2)[:, :, :5])
    _bad(model, tmp_path, capsys, d, "d.npz", "'x'", f"(2, 3, 5, {HW})")


def test_calibration_data_larger_than_memory(model, tmp_path, capsys, monkeypatch):
    """Sized from the .npz headers before anything is loaded: one line naming the size."""
    monkeypatch.setenv("QC_MEMORY_LIMIT", "200K")
    big = _npz(tmp_path, "big", x=_x(40))   # 40 x 3 x 12 x 12 float32 = 69 KB > 200K / 4
    _bad(model, tmp_path, capsys, big, "big.npz", "67.5 KB", "fewer samples")
    d = tmp_path / "many"
    d.mkdir()
    for k in range(40):
        np.savez(d / f"{k:02d}.npz", x=_x(1))
    _bad(model, tmp_path, capsys, d, "many", "40 file(s)", "fewer samples")


def test_statistics_memory_does_not_grow_with_samples():
    """The subsample of a tensor is a uniform sample of all its values, of at most RESERVOIR values
    whatever the number of batches (bottom-k reservoir), and the same for the same seed."""
    from qcompiler.calibrate import Reservoir

    def run(seed, batches, m, size):
        r = Reservoir(size, np.random.default_rng(seed))
        for b in range(batches):
            r.add(np.arange(b * m, (b + 1) * m, dtype=np.float32), lambda i: (i % 3).astype(np.int32))
        return r

    small = run(0, 3, 10, 100)
    assert sorted(small.values) == list(range(30))          # fewer values than the size: all of them
    many = run(0, 2000, 50, 1000)                            # 100000 values through a 1000-value sample
    assert len(many.values) == len(many.chans) == 1000 and len(np.unique(many.values)) == 1000
    np.testing.assert_array_equal(many.chans, many.values.astype(np.int64) % 50 % 3)
    # uniform over the stream: each tenth of it holds ~100 of the 1000 (binomial sd ~9.5)
    per_tenth = np.bincount((many.values // 10000).astype(int), minlength=10)
    assert per_tenth.min() > 60 and per_tenth.max() < 140, per_tenth
    again = run(0, 2000, 50, 1000)
    np.testing.assert_array_equal(again.values, many.values)
