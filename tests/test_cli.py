"""The qc command line: the happy path, and every kind of bad input -> one line, exit 2, no output."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import helper

from qcompiler.cli import main
from tests.helpers import make_model, one_line_error, tensor

R = np.random.default_rng(0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=-1)]
    inits = [tensor("W", (R.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)),
             tensor("B", np.zeros(8, np.float32)), tensor("W2", (R.standard_normal((8, 4))).astype(np.float32))]
    m = make_model(nodes, [("x", ["N", 3, 16, 16])], [("prob", None)], inits)
    import onnx

    onnx.save(m, d / "m.onnx")
    x = R.standard_normal((8, 3, 16, 16)).astype(np.float32)
    np.savez(d / "calib.npz", x=x)
    np.savez(d / "in.npz", x=x[:3])
    rc = main(["-q", "compile", str(d / "m.onnx"), "-o", str(d / "m.so"), "--calib", str(d / "calib.npz")])
    assert rc == 0
    return d


def test_compile_run_inspect_bench(small, capsys):
    d = small
    assert (d / "m.so").exists() and (d / "m.json").exists()
    assert main(["-q", "run", str(d / "m.so"), "--inputs", str(d / "in.npz"), "-o", str(d / "out.npz")]) == 0
    y = np.load(d / "out.npz")["prob"]
    assert y.shape == (3, 4) and np.allclose(y.sum(1), 1, atol=0.02)
    capsys.readouterr()
    assert main(["-q", "inspect", str(d / "m.so"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["integer_only"] is True and rep["kernels"] > 0
    assert main(["-q", "bench", str(d / "m.so"), "--json", "--repeats", "5"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert {"median_ms", "p10_ms", "p90_ms", "repeats"} <= set(b) and b["median_ms"] > 0
    assert b["threads"] >= 1


def test_bench_threads(small):
    """--threads sets the runtime's CPU pool (in a subprocess: TVM_NUM_THREADS is read once per process)."""
    r = subprocess.run([sys.executable, "-m", "qcompiler.cli", "-q", "bench", str(small / "m.so"), "--threads", "1",
                        "--repeats", "3", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threads"] == 1


def test_compile_progress_is_live(small, tmp_path):
    """The stage lines reach stderr while the compile runs: native code's stderr is held back during a
    compile (``cli._native_stderr_held``), the progress lines must not be held with it.  Held, they
    would all arrive in one write at the end; live, the first precedes the build's end by the build."""
    import time

    p = subprocess.Popen([sys.executable, "-m", "qcompiler.cli", "compile", str(small / "m.onnx"), "-o",
                          str(tmp_path / "m.so"), "--calib", str(small / "calib.npz"), "--target", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = [(time.perf_counter(), line) for line in p.stderr]
        p.wait(timeout=300)
    finally:
        p.kill()
    first = seen[0]
    built = next(t for t, line in seen if "building for llvm: done" in line)
    assert p.returncode == 0 and "reading and folding the model" in first[1]
    assert built - first[0] > 0.2, seen


def test_runtime_only_subprocess(small):
    """The library loads and runs with the TVM runtime alone (TVM_USE_RUNTIME_LIB=1)."""
    code = ("import numpy as np, qcompiler, tvm; assert tvm.base._RUNTIME_ONLY; "
            f"m = qcompiler.load({str(small / 'm.so')!r}); x = np.load({str(small / 'in.npz')!r})['x']; "
            "y = m(x=x)['prob']; import sys; "
            "assert 'qcompiler.driver' not in sys.modules and 'passes' not in sys.modules; print(y.shape)")
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(3, 4)" in r.stdout


def _bad(capsys, argv, *needles, out=None):
    one_line_error(capsys, argv, *needles)
    if out is not None:
        assert not os.path.exists(out), f"partial output {out} left behind"
        meta = os.path.splitext(out)[0] + ".json"
        if out.endswith(".so"):
            assert not os.path.exists(meta), f"partial output {meta} left behind"
        stems = ("." + os.path.basename(out), "." + os.path.basename(meta))
        leftovers = [f for f in os.listdir(os.path.dirname(out)) if f.startswith(stems)]
        assert not leftovers, leftovers


def test_bad_model_files(small, tmp_path, capsys):
    out = str(tmp_path / "o.so")
    calib = str(small / "calib.npz")
    _bad(capsys, ["compile", str(tmp_path / "nope.onnx"), "-o", out, "--calib", calib], "no such file", out=out)
    _bad(capsys, ["compile", str(tmp_path), "-o", out, "--calib", calib], "not a file", out=out)
    (tmp_path / "text.onnx").write_text("hello, not a protobuf")
    _bad(capsys, ["compile", str(tmp_path / "text.onnx"), "-o", out, "--calib", calib], "text.onnx", out=out)
    raw = (small / "m.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(raw[: len(raw) // 2])
    _bad(capsys, ["compile", str(tmp_path / "trunc.onnx"), "-o", out, "--calib", calib], "trunc.onnx", out=out)


def test_bad_calibration(small, tmp_path, capsys):
    m, out = str(small / "m.onnx"), str(tmp_path / "o.so")
    _bad(capsys, ["compile", m, "-o", out], "calibration data is required", out=out)
    np.savez(tmp_path / "wrongname.npz", y=np.zeros((2, 3, 16, 16), np.float32))
    _bad(capsys, ["compile", m, "-o", out, "--calib", str(tmp_path / "wrongname.npz")], "lacks input(s) ['x']",
         out=out)
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 4, 16, 16), np.float32))
    _bad(capsys, ["compile", m, "-o", out, "--calib", str(tmp_path / "shape.npz")], "shape", out=out)
    np.savez(tmp_path / "dtype.npz", x=np.zeros((2, 3, 16, 16), np.int32))
    _bad(capsys, ["compile", m, "-o", out, "--calib", str(tmp_path / "dtype.npz")], "int32", out=out)
    nan = np.zeros((2, 3, 16, 16), np.float32)
    nan[1, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan)
    _bad(capsys, ["compile", m, "-o", out, "--calib", str(tmp_path / "nan.npz")], "nan", out=out)


def test_bad_target_and_output(small, tmp_path, capsys):
    m, calib = str(small / "m.onnx"), str(small / "calib.npz")
    out = str(tmp_path / "o.so")
    _bad(capsys, ["compile", m, "-o", out, "--calib", calib, "--target", "tpu"], "unknown target", out=out)
    _bad(capsys, ["compile", m, "-o", out, "--calib", calib, "--target", "cuda", "--arch", "sm_61"], "sm_61", out=out)
    _bad(capsys, ["compile", m, "-o", out, "--calib", calib, "--target", "cpu", "--arch", "pentium9000"], "pentium9000",
         out=out)
    _bad(capsys, ["compile", m, "-o", str(tmp_path / "missing_dir" / "o.so"), "--calib", calib], "does not exist")
    for name in ("model", "model.bin"):  # the runtime loads a library by its suffix: refused before any work
        _bad(capsys, ["compile", m, "-o", str(tmp_path / name), "--calib", calib], "must end in .so",
             out=str(tmp_path / name))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits (CI runs as root): the OS says no instead
            import qcompiler.artifact as art

            real = os.access
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(art.os, "access", lambda p, mode, *a, **k: False if str(p) == str(ro) and mode == os.W_OK
                           else real(p, mode, *a, **k))
                _bad(capsys, ["compile", m, "-o", str(ro / "o.so"), "--calib", calib], str(ro), "not writable",
                     out=str(ro / "o.so"))
        else:
            _bad(capsys, ["compile", m, "-o", str(ro / "o.so"), "--calib", calib], str(ro), "not writable",
                 out=str(ro / "o.so"))
    finally:
        ro.chmod(0o700)


def test_export_failing_midway_publishes_nothing(small, tmp_path, capsys, monkeypatch):
    """The disk fills up after model.so is written, while model.json is: neither file appears, no
    temporary file stays, one line says what happened (qcompiler/artifact.py atomic_paths)."""
    import errno

    import qcompiler.artifact as art

    real_open = open
    state = {"json": 0}

    def full_disk_open(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(".json") and os.path.basename(str(path)).startswith(".o."):
            state["json"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_disk_open)
    out = str(tmp_path / "o.so")
    _bad(capsys, ["compile", str(small / "m.onnx"), "-o", out, "--calib", str(small / "calib.npz")],
         "No space left on device", "nothing was published", out=out)
    assert state["json"] == 1 and os.listdir(tmp_path) == []
    assert art.metadata_path(out).name == "o.json"


def test_bad_run_inputs(small, tmp_path, capsys):
    lib = str(small / "m.so")
    out = str(tmp_path / "y.npz")
    np.savez(tmp_path / "wrong.npz", z=np.zeros((1, 3, 16, 16), np.float32))
    _bad(capsys, ["run", lib, "--inputs", str(tmp_path / "wrong.npz"), "-o", out], "['z']", "['x']", "missing",
         out=out)
    np.savez(tmp_path / "shape.npz", x=np.zeros((1, 3, 15, 16), np.float32))
    _bad(capsys, ["run", lib, "--inputs", str(tmp_path / "shape.npz"), "-o", out], "shape", out=out)
    _bad(capsys, ["run", str(tmp_path / "none.so"), "--inputs", str(tmp_path / "shape.npz"), "-o", out], "no such library")
    _bad(capsys, ["bench", lib, "--batch", "8"], "recompile")
    _bad(capsys, ["bench", lib, "--threads", "0"], "threads")


def test_console_script_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qcompiler.cli", "compile", str(tmp_path / "x.onnx"), "-o",
                        str(tmp_path / "o.so")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr


def test_unexpected_exception_is_one_internal_error_line(small, tmp_path, capsys, monkeypatch):
    """A bug anywhere (here: in a lowering step and in `qc inspect`) is one line, exit 2, no output."""
    import qcompiler.cli as cli
    import qcompiler.lowering.build as lb

    def broken_build(*a, **k):
        raise IndexError("list index out of range\n  more detail")

    monkeypatch.setattr(lb, "build", broken_build)
    out = str(tmp_path / "o.so")
    _bad(capsys, ["compile", str(small / "m.onnx"), "-o", out, "--calib", str(small / "calib.npz")],
         "internal error in lowering and build at node", "IndexError: list index out of range; please report", out=out)
    monkeypatch.setattr(cli, "cmd_inspect", lambda a: {}["missing"])
    monkeypatch.setitem(cli.COMMANDS, "inspect", cli.cmd_inspect)
    _bad(capsys, ["inspect", str(small / "m.so")], "internal error in qc inspect", "KeyError")


def test_nonfinite_weights_and_no_outputs(small, tmp_path, capsys):
    import onnx

    calib = str(small / "calib.npz")
    m = onnx.load(str(small / "m.onnx"))
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.nan
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    onnx.save(m, tmp_path / "nan.onnx")
    out = str(tmp_path / "o.so")
    _bad(capsys, ["compile", str(tmp_path / "nan.onnx"), "-o", out, "--calib", calib], "initializer 'W'", "Conv", "NaN",
         out=out)
    m = onnx.load(str(small / "m.onnx"))
    del m.graph.output[:]
    onnx.save(m, tmp_path / "noout.onnx")
    _bad(capsys, ["compile", str(tmp_path / "noout.onnx"), "-o", out, "--calib", calib], "no outputs", out=out)


def test_absurd_sizes_refused_before_running(small, tmp_path, capsys, monkeypatch):
    import onnx

    monkeypatch.setenv("QC_MEMORY_LIMIT", "256M")
    m = onnx.load(str(small / "m.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 100000   # a fixed batch of 100000
    onnx.save(m, tmp_path / "big.onnx")
    out = str(tmp_path / "o.so")
    _bad(capsys, ["compile", str(tmp_path / "big.onnx"), "-o", out, "--calib", str(small / "calib.npz")],
         "100000", "memory", out=out)
    np.savez(tmp_path / "zero.npz", x=np.zeros((2, 3, 16, 16), np.float32)[:, :, :0])
    m = onnx.load(str(small / "m.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    onnx.save(m, tmp_path / "sym.onnx")
    _bad(capsys, ["compile", str(tmp_path / "sym.onnx"), "-o", out, "--calib", str(tmp_path / "zero.npz")],
         "dim 2 = 0", out=out)


def test_corrupt_names_are_a_model_error(small, tmp_path, capsys):
    """Found by benchmarks/fuzz.py: a byte flipped inside a node name leaves invalid UTF-8 that the ONNX
    checker passes and protobuf returns as bytes; it used to surface as a TypeError in quantize."""
    raw = (small / "m.onnx").read_bytes()
    out = str(tmp_path / "o.so")
    for word in (b"prob", b"logits"):
        i = raw.index(word)
        (tmp_path / "bad.onnx").write_bytes(raw[:i] + b"\xee" + raw[i + 1:])
        _bad(capsys, ["compile", str(tmp_path / "bad.onnx"), "-o", out, "--calib", str(small / "calib.npz")],
             "not valid UTF-8", out=out)


def test_overflow_that_cannot_be_widened(tmp_path, capsys):
    """A reduction too long for the int32 accumulator (K = 140000 of 8-bit x 8-bit products: up to
    4.6e9): passes/overflow.py's proof fails, one line naming the node, exit 2, nothing written."""
    import onnx

    K = 140000
    r = np.random.default_rng(1)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", ["N", K])], [("y", None)],
                   [tensor("W", np.sign(r.standard_normal((K, 4))).astype(np.float32))])
    onnx.save(m, tmp_path / "long.onnx")
    np.savez(tmp_path / "c.npz", x=np.sign(r.standard_normal((2, K))).astype(np.float32))
    out = str(tmp_path / "o.so")
    _bad(capsys, ["compile", str(tmp_path / "long.onnx"), "-o", out, "--calib", str(tmp_path / "c.npz")],
         "overflow at node 'MatMul_0'", "int32 accumulator", "too wide", out=out)
