"""Issue 20: verified artifacts (checksum, versions, host ISA / GPU arch) and reproducible builds.

* A model.so that is not the one its model.json was written for (truncated, corrupt, the library of
  another compile) is refused in one line by ``qcompiler.load``, ``qc run``, ``qc bench`` and
  ``qc inspect``; so is a library of another TVM release and one whose CPU features the host lacks.
* The same model, calibration data and options compiled in two different folders give the same
  model.so bytes and the same model.json except the fields whose names say time/date/host/path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from qcompiler import artifact
from qcompiler.cli import main
from qcompiler.errors import ArtifactError
from tests.helpers import one_line_error, small_cnn

R = np.random.default_rng(3)

# flags of the AMD EPYC Zen 2 VM (AVX2, no AVX-512) that some of this project's machines are
ZEN2_FLAGS = set("fpu sse sse2 ssse3 sse4_1 sse4_2 sse4a avx avx2 fma f16c bmi1 bmi2 aes pclmulqdq sha_ni".split())


def _model(d, hw=12):
    m = small_cnn(R, ["N", 3, hw, hw], 8, 4, pool=True)
    onnx.save(m, d / "m.onnx")
    np.savez(d / "calib.npz", x=R.standard_normal((6, 3, hw, hw)).astype(np.float32))
    np.savez(d / "in.npz", x=R.standard_normal((2, 3, hw, hw)).astype(np.float32))
    return d / "m.onnx", d / "calib.npz"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    m, calib = _model(d)
    assert main(["-q", "compile", str(m), "-o", str(d / "m.so"), "--calib", str(calib), "--batch", "2"]) == 0
    return d


_one_line = one_line_error


def _copy(src, dst_dir, name="m"):
    dst_dir.mkdir(exist_ok=True)
    shutil.copy(src / "m.so", dst_dir / f"{name}.so")
    shutil.copy(src / "m.json", dst_dir / f"{name}.json")
    return dst_dir / f"{name}.so"


def test_metadata_records_checksum_and_versions(lib):
    import tvm

    import qcompiler

    meta = json.loads((lib / "m.json").read_text())
    assert meta["format_version"] == artifact.FORMAT_VERSION
    assert meta["library"]["sha256"] == artifact.file_sha256(lib / "m.so")
    assert meta["library"]["size"] == os.path.getsize(lib / "m.so")
    assert meta["qcompiler_version"] == qcompiler.__version__ and meta["tvm_version"] == tvm.__version__
    assert meta["target"]["kind"] == "cpu" and meta["target"]["isa"] == artifact.cpu_features(meta["target"]["arch"],
                                                                                   meta["target"].get("mattr", ()))
    assert qcompiler.load(str(lib / "m.so"))(x=np.zeros((2, 3, 12, 12), np.float32))["y"].shape == (2, 4)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "swapped", "appended"])
def test_mismatched_pair_is_refused_everywhere(lib, tmp_path, capsys, damage):
    import qcompiler

    so = _copy(lib, tmp_path / "bad")
    raw = so.read_bytes()
    if damage == "truncated":
        so.write_bytes(raw[: len(raw) // 2])
        needle = "truncated"
    elif damage == "flipped":  # same size, one byte changed
        i = len(raw) // 3
        so.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
        needle = "sha-256"
    elif damage == "appended":
        so.write_bytes(raw + b"\0" * 16)
        needle = "bytes"
    else:  # the model.so of another compile (another calibration set) beside this model.json
        other = tmp_path / "other"
        other.mkdir()
        np.savez(other / "calib.npz", x=(R.standard_normal((6, 3, 12, 12)) * 5).astype(np.float32))
        assert main(["-q", "compile", str(lib / "m.onnx"), "-o", str(other / "m.so"), "--calib",
                     str(other / "calib.npz"), "--batch", "2"]) == 0
        assert (other / "m.so").read_bytes() != raw
        shutil.copy(other / "m.so", so)
        needle = "another compile"
    out = tmp_path / "y.npz"
    _one_line(capsys, ["run", str(so), "--inputs", str(lib / "in.npz"), "-o", str(out)], str(so), needle)
    assert not out.exists()
    _one_line(capsys, ["bench", str(so), "--repeats", "2"], needle)
    _one_line(capsys, ["inspect", str(so)], needle)
    with pytest.raises(ArtifactError, match="(?i)" + re.escape(needle)):
        qcompiler.load(str(so))


def test_missing_checksum_and_other_tvm_release_refused(lib, tmp_path, capsys):
    so = _copy(lib, tmp_path / "v")
    meta = json.loads((lib / "m.json").read_text())
    no_hash = {k: v for k, v in meta.items() if k != "library"}
    (tmp_path / "v" / "m.json").write_text(json.dumps(no_hash))
    _one_line(capsys, ["inspect", str(so)], "no checksum", "recompile")
    (tmp_path / "v" / "m.json").write_text(json.dumps({**meta, "tvm_version": "0.19.0"}))
    _one_line(capsys, ["run", str(so), "--inputs", str(lib / "in.npz"), "-o", str(tmp_path / "y.npz")],
              "TVM 0.19.0", "recompile")
    (tmp_path / "v" / "m.json").write_text(json.dumps({**meta, "format_version": 1}))
    _one_line(capsys, ["bench", str(so)], "format 1", "recompile")
    (tmp_path / "v" / "m.json").write_text("{ not json")
    _one_line(capsys, ["inspect", str(so)], "unreadable metadata")


def test_library_for_a_cpu_the_host_lacks_is_refused_before_running(lib, tmp_path, capsys, monkeypatch):
    """An AVX-512 VNNI library on an AVX2 host (simulated: the host's flags are a Zen 2's) would die
    of an illegal instruction; it is refused in one line before the module is loaded."""
    import qcompiler

    meta = json.loads((lib / "m.json").read_text())
    so = _copy(lib, tmp_path / "isa")
    # the library as a cross-compile for an AVX-512 VNNI Xeon records that CPU's features
    vnni = {**meta, "target": {**meta["target"], "arch": "cascadelake",
                               "isa": artifact.cpu_features("cascadelake")}}
    assert "avx512vnni" in vnni["target"]["isa"] and "avx512f" in vnni["target"]["isa"]
    (tmp_path / "isa" / "m.json").write_text(json.dumps(vnni))
    monkeypatch.setattr(artifact, "host_cpu_flags", lambda: set(ZEN2_FLAGS))
    loaded = []
    import tvm

    real = tvm.runtime.load_module
    monkeypatch.setattr(tvm.runtime, "load_module", lambda *a, **k: loaded.append(a) or real(*a, **k))
    _one_line(capsys, ["run", str(so), "--inputs", str(lib / "in.npz"), "-o", str(tmp_path / "y.npz")],
              "cascadelake", "avx512f", "avx512vnni", "illegal instruction")
    _one_line(capsys, ["bench", str(so)], "cascadelake", "avx512vnni")
    with pytest.raises(ArtifactError, match="avx512vnni"):
        qcompiler.load(str(so))
    assert not loaded, "the library was loaded before the ISA check"
    assert main(["-q", "inspect", str(so), "--json"]) == 0  # inspecting runs nothing: allowed
    capsys.readouterr()
    # an AVX2 (Zen 2) library on that host passes; without the recorded list, the arch decides
    assert artifact.missing_cpu_features(artifact.cpu_features("znver2"), ZEN2_FLAGS) == []
    assert "avx512f" in artifact.missing_cpu_features(artifact.cpu_features("znver5"), ZEN2_FLAGS)
    legacy = {**vnni, "target": {k: v for k, v in vnni["target"].items() if k != "isa"}}
    with pytest.raises(ArtifactError, match="avx512"):
        artifact.check_host(so, legacy, host_flags=ZEN2_FLAGS)


def test_cuda_arch_compatibility():
    assert artifact.cuda_arch_runs_on("sm_80", "sm_86") and artifact.cuda_arch_runs_on("sm_90", "sm_90")
    assert not artifact.cuda_arch_runs_on("sm_90", "sm_80")
    assert not artifact.cuda_arch_runs_on("sm_80", "sm_90")
    assert not artifact.cuda_arch_runs_on("sm_86", "sm_80")

    class Dev:
        compute_version = "8.0"

    with pytest.raises(ArtifactError, match="sm_90.*sm_80"):
        artifact.check_host("m.so", {"target": {"kind": "cuda", "arch": "sm_90"}}, Dev())
    artifact.check_host("m.so", {"target": {"kind": "cuda", "arch": "sm_80"}}, Dev())


# ---- reproducible builds ------------------------------------------------------------------------

VOLATILE = re.compile(r"time|timing|date|host|path", re.I)  # timings_s: stage timings


def stable_view(obj):
    """model.json without the fields whose names say they hold a time, date, host or path."""
    if isinstance(obj, dict):
        return {k: stable_view(v) for k, v in obj.items() if not VOLATILE.search(k)}
    if isinstance(obj, list):
        return [stable_view(v) for v in obj]
    return obj


def _compile_in(folder, model_src, calib_src, extra=(), env=None):
    """Copy the inputs into ``folder`` and compile there (relative paths, cwd = folder), in a fresh
    process so no state of this one (caches, counters) is shared.  ``env``: extra environment
    (default: no tuning log)."""
    folder.mkdir()
    shutil.copy(model_src, folder / "model.onnx")
    if os.path.isdir(calib_src):
        shutil.copytree(calib_src, folder / "calib")
    else:
        shutil.copy(calib_src, folder / "calib.npz")
    calib = "calib" if os.path.isdir(calib_src) else "calib.npz"
    env = {**os.environ, "QC_TUNE_LOG": "off", "PYTHONPATH": os.getcwd(), **(env or {})}
    r = subprocess.run([sys.executable, "-m", "qcompiler.cli", "-q", "compile", "model.onnx", "-o", "out.so",
                        "--calib", calib, *extra], cwd=folder, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    return (folder / "out.so").read_bytes(), json.loads((folder / "out.json").read_text())


def _assert_same_build(a, b):
    so_a, meta_a = a
    so_b, meta_b = b
    assert so_a == so_b, "model.so differs between two compiles of the same inputs"
    assert meta_a["created_time"] and meta_a["model"]["source_path"] != meta_b["model"]["source_path"]
    sa, sb = stable_view(meta_a), stable_view(meta_b)
    diff = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
    assert not diff, f"model.json differs in {diff}"
    assert sa["tir"]["data"] == sb["tir"]["data"]  # gzip header without a timestamp


def test_reproducible_build_in_two_folders(tmp_path):
    m, calib = _model(tmp_path)
    a = _compile_in(tmp_path / "a", m, calib, ["--batch", "2"])
    b = _compile_in(tmp_path / "b", m, calib, ["--batch", "2"])
    _assert_same_build(a, b)


def test_reproducible_build_with_tuning_log_and_cost_model(tmp_path):
    """Reproducible with a tuning log and a cost model too: a model whose first conv has a record in
    the committed Zen 2 log (the tuned config is used) and whose second conv has none (the cost
    model picks its config), compiled for that CPU (--arch znver2) in two folders."""
    from onnx import helper

    from tests.helpers import make_model, tensor

    root = os.getcwd()
    log, cm = os.path.join(root, "autotune_logs", "znver2-avx2-2c"), os.path.join(root, "costmodels", "znver2-avx2-2c.json")
    r = np.random.default_rng(0)
    w1 = (r.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (r.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["c", "W2"], ["y"], kernel_shape=[1, 1])]
    m = make_model(nodes, [("x", [1, 3, 48, 192])], [("y", [1, 4, 24, 96])], [tensor("W1", w1), tensor("W2", w2)])
    onnx.save(m, tmp_path / "t.onnx")
    np.savez(tmp_path / "tc.npz", x=r.standard_normal((4, 3, 48, 192)).astype(np.float32))
    env = {"QC_TUNE_LOG": log, "QC_COSTMODEL": cm}
    a = _compile_in(tmp_path / "a", tmp_path / "t.onnx", tmp_path / "tc.npz", ["--arch", "znver2"], env)
    b = _compile_in(tmp_path / "b", tmp_path / "t.onnx", tmp_path / "tc.npz", ["--arch", "znver2"], env)
    tuning = a[1]["tuning"]
    assert [t["layer"] for t in tuning["tuned_layers"]] == ["Conv_0"]
    assert [p["layer"] for p in tuning["predicted_layers"]] == ["Conv_1"]
    assert all(p["model"] == cm for p in tuning["predicted_layers"])
    _assert_same_build(a, b)


@pytest.mark.zoo
def test_reproducible_zoo_build_in_two_folders(tmp_path):
    from qcompiler import zoo

    name = "mtcnn-rnet"
    if not zoo.available(name):
        pytest.skip(f"zoo package for {name} not installed: {zoo.install_command(name)}")
    calib = zoo.calibration_inputs(name, 8)
    np.savez(tmp_path / "calib.npz", **calib)
    a = _compile_in(tmp_path / "a", zoo.model_path(name), tmp_path / "calib.npz", ["--batch", "4"])
    b = _compile_in(tmp_path / "b", zoo.model_path(name), tmp_path / "calib.npz", ["--batch", "4"])
    _assert_same_build(a, b)


def test_encode_text_is_deterministic():
    a = artifact.encode_text("the same TIR")
    b = artifact.encode_text("the same TIR")
    assert a == b and artifact.decode_text(a) == "the same TIR"


def test_calibration_independent_of_file_order_and_batching(tmp_path):
    """The same 12 samples as one .npz, as 3 files of 4 (names in reverse order), and as 12 one-sample
    files in shuffled name order: the same model.so and the same stable model.json (mse calibration:
    the scale comes from the random subsample, the part that used to follow the sample order)."""
    m, _ = _model(tmp_path, hw=48)  # 8 x 48 x 48 values per sample and tensor: more than the subsample takes
    x = (R.standard_normal((12, 3, 48, 48)) * np.linspace(0.5, 3, 12)[:, None, None, None]).astype(np.float32)
    one = tmp_path / "one.npz"
    np.savez(one, x=x)
    split = tmp_path / "split"
    split.mkdir()
    for k in range(3):
        np.savez(split / f"{2 - k}.npz", x=x[4 * k: 4 * k + 4])
    single = tmp_path / "single"
    single.mkdir()
    for k, j in enumerate(np.random.default_rng(5).permutation(12)):
        np.savez(single / f"s{k:02d}.npz", x=x[j])  # one sample without its batch axis
    builds = []
    for name, calib in (("one", one), ("split", split), ("single", single)):
        out = tmp_path / f"{name}.so"
        assert main(["-q", "compile", str(m), "-o", str(out), "--calib", str(calib), "--calib-method", "mse"]) == 0
        builds.append((out.read_bytes(), stable_view(json.loads(out.with_suffix(".json").read_text()))))
    for so, meta in builds[1:]:
        assert so == builds[0][0]
        assert meta == builds[0][1]
    # and the order really mattered before: a different set of samples gives another library
    np.savez(tmp_path / "fewer.npz", x=x[:6])
    assert main(["-q", "compile", str(m), "-o", str(tmp_path / "fewer.so"), "--calib", str(tmp_path / "fewer.npz"),
                 "--calib-method", "mse"]) == 0
    assert (tmp_path / "fewer.so").read_bytes() != builds[0][0] or \
        stable_view(json.loads((tmp_path / "fewer.json").read_text())) != builds[0][1]


def test_bit_exact_check_does_not_broadcast():
    """tests/helpers.py compared with ``!=``, which broadcasts a (1, 4) against a (4, 1) into an
    all-equal (4, 4): the shapes are asserted now."""
    from tests.helpers import assert_bit_exact

    z = np.zeros((1, 4), np.int8)
    with pytest.raises(AssertionError, match="shape"):
        assert_bit_exact({"y": z}, {"y": z.T.copy()}, ["y"])
    with pytest.raises(AssertionError, match="differs"):
        assert_bit_exact({"y": z + 1}, {"y": z}, ["y"])
    assert_bit_exact({"y": z}, {"y": z.copy()}, ["y"])
