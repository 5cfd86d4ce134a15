"""qc tune / qc measure: records, resumability after SIGKILL, --status, the offline cycle, RPC, bad input.

Everything runs on this host's CPU (AVX-512 VNNI kernels, AVX2 on a CPU without VNNI) with a handful
of trials.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompiler.cli import main
from qcompiler.targets import host_amx_usable, host_has_avx2, host_has_vnni
from qcompiler.tune import records as R
from tests.helpers import small_cnn

pytestmark = pytest.mark.skipif(not (host_has_vnni() or host_has_avx2()),
                                reason="the tuned CPU kernels need AVX-512 VNNI or AVX2")
BACKEND = "cpu_vnni" if host_has_vnni() else "cpu_avx2"
# the 8-bit layers of a static model run on AMX where the host has it (its small convs stay on BACKEND)
BACKENDS = {BACKEND, "cpu_amx"} if host_amx_usable() else {BACKEND}
ROOT = Path(__file__).resolve().parents[1]
QC = [sys.executable, "-m", "qcompiler.cli"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    r = np.random.default_rng(0)
    m = small_cnn(r, [1, 8, 6, 6], 16, 32, pool=False)
    onnx.save(m, d / "m.onnx")
    np.savez(d / "calib.npz", x=r.standard_normal((8, 8, 6, 6)).astype(np.float32))
    return d


_TASKS = {}


def _task_keys(d):
    if d not in _TASKS:
        from qcompiler.targets import parse_target
        from qcompiler.tune.tuner import extract_tasks

        _TASKS[d] = [t.workload.key for t in extract_tasks([str(d / "m.onnx")], parse_target("cpu"))]
    return _TASKS[d]


def _lines(log):
    return [json.loads(x) for x in Path(log, "records.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def tuned(model):
    log = model / "log"
    assert main(["-q", "tune", str(model / "m.onnx"), "--trials", "5", "--log", str(log), "--repeats", "3"]) == 0
    return log


def test_records_valid(tuned):
    recs = _lines(tuned)
    assert len(recs) == 5
    for r in recs:
        assert set(R.REQUIRED) <= set(r)
        assert r["schema"] == R.SCHEMA and r["error"] is None and len(r["latencies_s"]) == 3
        assert r["median_s"] == sorted(r["latencies_s"])[1]
        assert r["target"]["kind"] == "cpu" and r["target"]["cores"] >= 1 and r["target"]["device"]
        assert r["workload"]["backend"] in BACKENDS and r["workload_key"].endswith("cpu:" + r["target"]["arch"])
        amx = r["workload"]["backend"] == "cpu_amx"   # AmxConfig adds ng (column blocks per call)
        assert set(r["config"]) == {"mr", "nr", "kc", "n_outer", "parallel"} | ({"ng"} if amx else set())
    keys = {r["workload_key"] for r in recs}
    # the tasks are the VNNI conv/dense kernels of the quantized graph (a layer whose dtypes have no VNNI
    # kernel is lowered generically and is no task)
    assert keys == set(_task_keys(tuned.parent)) and len(keys) >= 1
    assert all(sum(r["is_default"] for r in recs if r["workload_key"] == k) == 1 for k in keys)  # baseline first


def test_compile_uses_best_config(model, tuned, tmp_path, monkeypatch):
    """qc compile with the log applies the best record per layer (metadata says so); output == reference,
    also for a non-default config forced through a synthetic best record."""
    from qcompiler import reference
    from qcompiler.driver import CompileOptions, prepare
    from qcompiler.lowering.build import build
    from qcompiler.targets import parse_target
    from qcompiler.tune.apply import activate
    from tests.helpers import run_tvm

    monkeypatch.setenv("QC_TUNE_LOG", str(tuned))
    assert main(["-q", "compile", str(model / "m.onnx"), "-o", str(tmp_path / "m.so"), "--calib",
                 str(model / "calib.npz")]) == 0
    meta = json.loads((tmp_path / "m.json").read_text())
    best = R.best_by_workload(_lines(tuned))
    used = meta["tuning"]["tuned_layers"]
    assert len(used) == len(best) >= 1 and meta["tuning"]["log"].startswith(str(tuned))
    for u in used:
        assert u["config"] == best[u["workload_key"]]["config"]

    # force a non-default config for every layer and check bit-exactness against the NumPy reference
    log2 = tmp_path / "log2"
    recs = _lines(tuned)
    with R.RecordWriter(log2) as w:
        for key, b in best.items():
            base = next(r for r in recs if r["workload_key"] == key)
            cfg = {"mr": 16 if key.startswith("cpu_amx.") else 2, "nr": 1, "kc": 0, "n_outer": False}
            w.append({**base, "config": cfg, "is_default": False, "median_s": 1e-9, "latencies_s": [1e-9]})
    spec = parse_target("cpu")
    calib = dict(np.load(model / "calib.npz"))
    prep = prepare(str(model / "m.onnx"), calib, CompileOptions(target=spec))
    with activate(spec, str(log2)) as tc:
        res = build(prep.int_graph, spec.tvm_target())
    assert len(tc.used) == len(best) and all(u["config"]["mr"] == (16 if u["workload_key"].startswith("cpu_amx.") else 2)
                                             for u in tc.used)
    test = {"x": calib["x"][:1]}
    tv, ref = run_tvm(res.executable, prep.int_graph, test), reference.execute(prep.int_graph, test)
    for o in prep.int_graph.outputs:
        np.testing.assert_array_equal(tv[o], ref[o])


def test_resume_after_sigkill(model, tmp_path):
    log = tmp_path / "log"
    cmd = QC + ["-q", "tune", str(model / "m.onnx"), "--trials", "7", "--log", str(log), "--repeats", "2",
                "--batch-size", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    f = log / "records.jsonl"
    t0 = time.time()
    while time.time() - t0 < 60 and not (f.exists() and f.read_bytes().count(b"\n") >= 1):
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # qc tune and its build/run workers
    p.wait()
    first = f.read_bytes().count(b"\n")
    assert 1 <= first < 7
    with open(f, "ab") as fh:  # a record cut in the middle, as a kill inside write() would leave it
        fh.write(b'{"schema": "qc-tune/1", "workload_key": "cpu_vnni.dense/1x32')
    assert main(["-q", "tune", str(model / "m.onnx"), "--trials", "7", "--log", str(log), "--repeats", "2"]) == 0
    recs = _lines_skipping(f)
    assert len(recs) == 7
    pairs = [(r["workload_key"], json.dumps(r["config"], sort_keys=True)) for r in recs]
    assert len(set(pairs)) == len(pairs)
    rr = R.read(log)
    assert rr.corrupt == 1 and len(rr.records) == 7


def _lines_skipping(f):
    out = []
    for x in Path(f).read_text().splitlines():
        try:
            out.append(json.loads(x))
        except ValueError:
            pass
    return out


def test_status(tuned, capsys):
    capsys.readouterr()
    assert main(["-q", "tune", "--status", str(tuned)]) == 0
    out = capsys.readouterr().out
    n = len(_task_keys(tuned.parent))
    assert f"{n} task(s), 5 trial(s)" in out and f"{BACKEND}." in out and "default" in out
    assert main(["-q", "tune", "--status", str(tuned), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["trials"] == 5 and len(st["tasks"]) == n
    for t in st["tasks"]:
        assert t["best_s"] <= t["default_s"] and t["best_config"]


def test_foreign_records_skipped(tuned, tmp_path):
    recs = _lines(tuned)
    f = tmp_path / "records.jsonl"
    other = [{**recs[0], "tvm_version": "0.0.1"}, {**recs[1], "target": {**recs[1]["target"], "device": "other-cpu"}}]
    f.write_text("\n".join(json.dumps(r) for r in recs + other) + "\nnot json\n")
    rr = R.read(tmp_path, recs[0]["target"], recs[0]["tvm_version"])
    assert (len(rr.records), rr.corrupt, rr.foreign_tvm, rr.foreign_target) == (5, 1, 1, 1)


def test_export_measure_import(model, tuned, tmp_path, capsys):
    import shutil

    log = tmp_path / "log"
    shutil.copytree(tuned, log)
    batch = tmp_path / "batch"
    args = ["-q", "tune", str(model / "m.onnx"), "--export-candidates", str(batch), "--candidates", "3",
            "--log", str(log), "--repeats", "2"]
    assert main(args) == 0
    man = json.loads((batch / "manifest.json").read_text())
    assert len(man["candidates"]) == 3 and all((batch / c["file"]).is_file() for c in man["candidates"])
    # measure in a fresh process with the TVM runtime alone (as on a device without the compiler)
    code = ("import sys, tvm; assert tvm.base._RUNTIME_ONLY; from qcompiler.cli import main; "
            f"sys.exit(main(['-q', 'measure', {str(batch)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    assert r.returncode == 0, r.stderr
    res = [json.loads(x) for x in (batch / "results.jsonl").read_text().splitlines()]
    assert len(res) == 3 and all(x["error"] is None and len(x["latencies_s"]) == 2 for x in res)
    capsys.readouterr()
    assert main(args) == 2  # measured results not imported yet: exporting over them is refused
    assert "not imported" in capsys.readouterr().err
    assert main(["-q", "tune", "--import", str(batch), "--log", str(log)]) == 0
    recs = _lines(log)
    assert len(recs) == 8 and sum(r["measured_by"].startswith("offline:") for r in recs) == 3
    pairs = {(r["workload_key"], json.dumps(r["config"], sort_keys=True)) for r in recs}
    assert len(pairs) == 8
    assert main(["-q", "tune", "--import", str(batch), "--log", str(log)]) == 0  # idempotent
    assert len(_lines(log)) == 8
    assert main(args) == 0  # the next batch: only configs not measured yet
    man2 = json.loads((batch / "manifest.json").read_text())
    assert not {(c["workload_key"], json.dumps(c["config"], sort_keys=True)) for c in man2["candidates"]} & pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rpc_tracker_two_servers(model, tmp_path):
    import importlib.util

    for mod in ("tvm.exec.rpc_tracker", "tvm.exec.rpc_server", "tornado"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (the RPC tracker needs tornado)")
    port = _free_port()
    py = [sys.executable, "-m"]
    procs = [subprocess.Popen(py + ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                                    "--port-end", str(port + 1), "--silent"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        t0 = time.time()
        while time.time() - t0 < 20:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        for _ in range(2):
            sp = _free_port()
            procs.append(subprocess.Popen(py + ["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key",
                                                "qc-test", "--host", "127.0.0.1", "--port", str(sp), "--port-end",
                                                str(sp + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        from qcompiler.tune.measure import RpcSpec

        spec = RpcSpec("127.0.0.1", port, "qc-test")
        t0 = time.time()
        while True:
            try:
                if spec.check(timeout=2) >= 2:
                    break
            except Exception:  # noqa: BLE001 - servers still registering
                pass
            assert time.time() - t0 < 30, "the RPC servers did not register"
            time.sleep(0.3)
        log = tmp_path / "log"
        assert main(["-q", "tune", str(model / "m.onnx"), "--trials", "3", "--log", str(log), "--repeats", "2",
                     "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "qc-test"]) == 0
        recs = _lines(log)
        assert len(recs) == 3 and all(r["measured_by"] == f"rpc:qc-test@127.0.0.1:{port}" for r in recs)
        assert all(r["error"] is None and r["median_s"] > 0 for r in recs)
    finally:
        for p in reversed(procs):  # each in its own session: the servers' session workers go too
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.parametrize("args, needle", [
    (["m.onnx", "--target", "tpu"], "unknown target"),
    (["m.onnx", "--trials", "0"], "--trials"),
    (["missing.onnx", "--trials", "2"], "no such file"),
    (["m.onnx", "--rpc-tracker", "127.0.0.1:1", "--rpc-key", "k"], "unreachable"),
    (["m.onnx", "--rpc-tracker", "nonsense", "--rpc-key", "k"], "HOST:PORT"),
    (["--status", "nowhere"], "no tuning log"),
    (["m.onnx", "--trials", "2", "--cost-model", "nothere.json"], "no such cost model file"),
])
def test_bad_input(model, tmp_path, capsys, args, needle):
    args = [str(model / a) if a.endswith(".onnx") else a for a in args]
    capsys.readouterr()
    assert main(["-q", "tune", *args, "--log", str(tmp_path / "log")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qc tune: error:") and needle in err[0], err
    assert not (tmp_path / "log").exists()


def test_cuda_export_without_gpu(model, tmp_path, capsys):
    """CUDA candidates cross-compile here (library + nvcc cubin); tuning/measuring needs the GPU."""
    import shutil

    from qcompiler.tune.device import gpu_info

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on the PATH")
    batch = tmp_path / "cb"
    assert main(["-q", "tune", str(model / "m.onnx"), "--target", "cuda", "--arch", "sm_90", "--export-candidates",
                 str(batch), "--candidates", "2", "--log", str(tmp_path / "clog")]) == 0
    man = json.loads((batch / "manifest.json").read_text())
    assert man["target"]["arch"] == "sm_90" and len(man["candidates"]) == 2
    for c in man["candidates"]:
        assert c["workload"]["backend"] == "cuda_mma" and (batch / c["file"]).is_file()
        assert c["cubins"] and all((batch / cb["file"]).read_bytes()[:4] == b"\x7fELF" for cb in c["cubins"])
    if gpu_info() is None:
        capsys.readouterr()
        assert main(["-q", "measure", str(batch)]) == 2
        assert main(["-q", "tune", str(model / "m.onnx"), "--target", "cuda", "--trials", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and "no CUDA device" in err[0] and "no CUDA GPU" in err[1]


def test_measure_bad_dir(tmp_path, capsys):
    assert main(["-q", "measure", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0]


def test_disturbed_timings_rerun_and_left_out_of_training(tmp_path):
    """A timing whose repeats say another process disturbed the machine (median > 1.1 x fastest) is
    re-run by the measurer (the steadiest kept) and never used as a cost-model label while the
    config has an undisturbed record."""
    from types import SimpleNamespace

    from costmodel import data as D
    from qcompiler.tune import records as R
    from qcompiler.tune.measure import Measurer
    from qcompiler.tune.workload import Workload

    assert not R.disturbed([1.0, 1.01, 1.0, 1.02, 1.0]) and not R.disturbed([1.0, 1.0, 1.0, 3.0, 2.0])
    assert R.disturbed([1.0, 1.5, 1.4, 1.6, 1.0]) and not R.disturbed([1.0]) and not R.disturbed(None)

    runs = iter([[1.0, 1.6, 1.5, 1.7, 1.0], [1.0, 1.15, 1.12, 1.0, 1.14], [1.0, 1.01, 1.0, 1.0, 1.02]])

    class Runner:
        calls = 0

        def run(self, _inputs):
            Runner.calls += 1
            return [SimpleNamespace(result=lambda t=next(runs): SimpleNamespace(error_msg=None, run_secs=t))]

    m = Measurer.__new__(Measurer)
    m.runner = Runner()
    first = SimpleNamespace(error_msg=None, run_secs=[2.0, 2.5, 2.4, 2.6, 2.0])
    out = m._steady(None, first)
    assert Runner.calls == 2 and out.run_secs == [1.0, 1.15, 1.12, 1.0, 1.14]  # steadier than the first re-run
    steady = SimpleNamespace(error_msg=None, run_secs=[1.0, 1.0, 1.01, 1.0, 1.0])
    assert m._steady(None, steady) is steady and Runner.calls == 2

    w = Workload("cpu_vnni", "dense", (8, 32, 64), "uint8", "uint8", 0, 255, "cpu:rocketlake")
    tgt = {"kind": "cpu", "arch": "rocketlake", "device": "x", "cores": 2}
    cfg = {"mr": 2, "nr": 1, "kc": 0, "n_outer": True}
    with R.RecordWriter(tmp_path) as wr:
        wr.append(R.make_record(w, tgt, cfg, [3e-6, 5e-6, 5e-6, 5e-6, 3e-6], None, "local"))  # disturbed
        wr.append(R.make_record(w, tgt, cfg, [3e-6] * 5, None, "local"))
        wr.append(R.make_record(w, tgt, dict(cfg, mr=1), [4e-6, 6e-6, 6e-6, 6e-6, 4e-6], None, "local"))
    samples, _ = D.samples_from(tmp_path)
    assert [(s["config"]["mr"], s["latency_s"]) for s in samples] == [(2, 3e-6)]
    # a second session's undisturbed timing: the label is the faster, both timings kept in log order
    with R.RecordWriter(tmp_path) as wr:
        wr.append(R.make_record(w, tgt, cfg, [2.8e-6] * 5, None, "local"))
    samples, _ = D.samples_from(tmp_path)
    assert [(s["latency_s"], s["sessions_s"]) for s in samples] == [(2.8e-6, [3e-6, 2.8e-6])]


def test_parallel_field_keeps_older_records_and_joins_small_spaces():
    """VnniConfig.parallel came after the first records: a record without it is the config at the
    legacy True (same key, so it is not measured again); serial variants join only small GEMMs'
    spaces; a one-tile config normalizes to the legacy value."""
    from qcompiler.kernels.cpu_vnni import VnniConfig
    from qcompiler.tune.workload import Workload, config_key, normalize_config

    old = {"mr": 3, "nr": 1, "kc": 0, "n_outer": True}
    assert config_key(old) == config_key(VnniConfig(3, 1)) == config_key({**old, "parallel": True})
    assert config_key(VnniConfig(3, 1, parallel=False)) != config_key(old)
    small = Workload("cpu_avx2", "dense", (4, 64, 256), "int8", "int8", -128, 127, "cpu:znver2")
    large = Workload("cpu_avx2", "dense", (512, 512, 1024), "int8", "int8", -128, 127, "cpu:znver2")
    assert {c.parallel for c in small.config_space()} == {True, False}
    assert {c.parallel for c in large.config_space()} == {True}
    assert not small.default_config().parallel and large.default_config().parallel
    one = Workload("cpu_avx2", "dense", (2, 16, 64), "int8", "int8", -128, 127, "cpu:znver2")
    assert normalize_config(one, VnniConfig(2, 2, parallel=False)).parallel
    assert not normalize_config(one, VnniConfig(1, 2, parallel=False)).parallel


def test_host_cores_ignores_the_pinned_thread():
    """TVM's thread pool pins the calling thread to one core after its first parallel kernel; the
    host's core count (records' target, the cost model's target features) must not follow it."""
    import os

    from qcompiler.targets import host_cores

    before, mask = host_cores(), os.sched_getaffinity(0)  # (earlier tests may have pinned it already)
    try:
        os.sched_setaffinity(0, {min(mask)})
        assert host_cores() == before >= len(mask)
    finally:
        os.sched_setaffinity(0, mask)


def test_tuned_serial_kernel_runs_parallel_where_its_default_does(monkeypatch):
    """qcompiler/tune/apply.py ``parallel_as_default``: a record's serial choice (timed alone, where a
    parallel kernel pays the pool's wake-up) becomes parallel where the workload's default is
    parallel; kept where the default is serial too, or with QC_TUNED_PARALLEL=record."""
    import dataclasses
    from types import SimpleNamespace

    from qcompiler.kernels.cpu_vnni import VnniConfig
    from qcompiler.tune.apply import parallel_as_default

    serial = VnniConfig(mr=4, nr=2, kc=0, n_outer=True, parallel=False)
    big = SimpleNamespace(default_config=lambda: dataclasses.replace(serial, parallel=True))
    small = SimpleNamespace(default_config=lambda: serial)
    assert parallel_as_default(big, serial).parallel is True
    assert parallel_as_default(small, serial).parallel is False
    assert parallel_as_default(big, dataclasses.replace(serial, parallel=True)).parallel is True
    monkeypatch.setenv("QC_TUNED_PARALLEL", "record")
    assert parallel_as_default(big, serial).parallel is False


def test_dense_kernels_over_symbolic_rows_are_tasks_at_each_row_bucket(tmp_path):
    """A model whose dims stay symbolic: each dense layer is a task at its calibrated row count and
    at each row bucket below it (``cpu_vnni.ROW_BUCKETS``), whose records the symbolic kernel's
    buckets take (``cpu_vnni.dense`` ``bucket_config``); a model of fixed shapes has no bucket tasks."""
    from qcompiler.kernels.cpu_vnni import ROW_BUCKETS
    from qcompiler.targets import parse_target
    from qcompiler.tune.tuner import extract_tasks
    from qcompiler.tune.workload import Workload
    from tests.test_symbolic_shapes import _encoder, _text_feeds

    onnx.save(_encoder(), tmp_path / "enc.onnx")
    calib = _text_feeds(1, 40, np.random.default_rng(0))
    tasks = extract_tasks([str(tmp_path / "enc.onnx")], parse_target("cpu"), calib=calib)
    rows = {t.workload.shape[0] for t in tasks if t.workload.kind == "dense"}
    assert rows == {40, *(r for _u, r in ROW_BUCKETS if r < 40)}
    assert all(Workload.from_fields(t.workload.fields()).key == t.workload.key for t in tasks)


def test_a_model_of_fixed_shapes_has_no_row_bucket_tasks(model):
    from qcompiler.targets import parse_target
    from qcompiler.tune.tuner import extract_tasks

    tasks = extract_tasks([str(model / "m.onnx")], parse_target("cpu"))
    assert {t.workload.shape[0] for t in tasks if t.workload.kind == "dense"} == {1}
