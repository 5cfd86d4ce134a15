"""Issue 20, tuning logs under concurrent writers: two processes appending to one records.jsonl at
once (as two ``qc tune`` runs sharing a log do) leave every record whole, once, in a parseable line
(``qcompiler/tune/records.py``: an fcntl lock around each append)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qcompiler.tune import records as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITER = r"""
import sys
from qcompiler.tune import records as R
from qcompiler.tune.workload import Workload
log, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = Workload("cpu_vnni", "dense", (8, 32, 64), "uint8", "uint8", 0, 255, "cpu:rocketlake")
tgt = {"kind": "cpu", "arch": "rocketlake", "device": "x", "cores": 2}
vers = {"tvm_version": "t", "qcompiler_version": "q"}
with R.RecordWriter(log) as wr:
    sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.readline()   # start together
    for i in range(n):
        # ~40 KB lines: far beyond what one write() is guaranteed to keep whole between writers
        rec = R.make_record(w, tgt, {"mr": 1, "nr": 1, "kc": 0, "n_outer": True, "tag": tag, "i": i},
                            [1e-6] * 5000, None, "local", vers=vers)
        wr.append(rec)
"""


def _run_writers(log, n, tags=("a", "b")):
    env = {**os.environ, "PYTHONPATH": ROOT}
    ps = [subprocess.Popen([sys.executable, "-c", WRITER, str(log), t, str(n)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env) for t in tags]
    for p in ps:
        assert p.stdout.readline().strip() == "ready"
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in ps:
        assert p.wait(timeout=300) == 0


def test_two_processes_append_without_torn_or_duplicated_records(tmp_path):
    n = 150
    _run_writers(tmp_path, n)
    raw = (tmp_path / R.FILENAME).read_bytes()
    lines = raw.split(b"\n")
    assert lines[-1] == b""
    recs = [json.loads(x) for x in lines[:-1]]  # every line parses: nothing torn or interleaved
    res = R.read(tmp_path)
    assert res.corrupt == 0 and len(res.records) == len(recs) == 2 * n
    ids = [(r["config"]["tag"], r["config"]["i"]) for r in recs]
    assert len(set(ids)) == len(ids) == 2 * n  # no record lost or written twice
    for tag in "ab":  # each writer's records in its own order
        assert [i for t, i in ids if t == tag] == list(range(n))


def test_append_after_a_partial_line_of_another_writer(tmp_path):
    """A writer killed mid-line leaves no newline; the next append (by any process) starts a new line."""
    _run_writers(tmp_path, 2, tags=("a",))
    with open(tmp_path / R.FILENAME, "ab") as f:
        f.write(b'{"schema": "qc-tune/1", "workload_key": "cut')
    _run_writers(tmp_path, 2, tags=("b",))
    res = R.read(tmp_path)
    assert res.corrupt == 1 and [r["config"]["tag"] for r in res.records] == ["a", "a", "b", "b"]


# ---- device identity ------------------------------------------------------------------------------

def test_device_key_is_cpu_isa_and_cores_not_the_marketing_name(monkeypatch):
    """A Zen 2 (AVX2) and a Zen 5 (AVX-512 VNNI) both call themselves "AMD EPYC": their keys differ."""
    from qcompiler import artifact
    from qcompiler.targets import TargetSpec
    from qcompiler.tune import device

    monkeypatch.setattr(device, "cpu_model_name", lambda: "AMD EPYC")
    monkeypatch.setattr(device, "machine_cores", lambda: 2)
    zen2_flags = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "sse4_1", "sse4_2", "ssse3"}
    zen5_flags = zen2_flags | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni"}
    keys = {}
    for arch, flags in (("znver2", zen2_flags), ("znver5", zen5_flags)):
        monkeypatch.setattr(device, "host_cpu", lambda a=arch: a)
        monkeypatch.setattr(artifact, "host_cpu_flags", lambda f=flags: set(f))
        keys[arch] = device.device_name(TargetSpec("cpu", arch))
        assert device.describe(TargetSpec("cpu", arch))["device"] == keys[arch]
    assert keys == {"znver2": "znver2-avx2-2c", "znver5": "znver5-avx512vnni-2c"}
    # a VM hiding AVX-512 from a Zen 5: the class is what the host really has
    monkeypatch.setattr(artifact, "host_cpu_flags", lambda: set(zen2_flags))
    assert device.device_name(TargetSpec("cpu", "znver5")) == "znver5-avx2-2c"
    monkeypatch.setattr(device, "machine_cores", lambda: 16)
    assert device.device_name(TargetSpec("cpu", "znver5")) == "znver5-avx2-16c"
    # another CPU than the host's (cross-compile): no core count
    monkeypatch.setattr(device, "host_cpu", lambda: "znver2")
    assert device.device_name(TargetSpec("cpu", "cascadelake")) == "cascadelake-avx512vnni"
    assert R.is_device_key("znver2", "znver2-avx2-2c") and not R.is_device_key("znver2", "amd-epyc")
    # the machine's cores, not a thread's affinity (a child of a thread TVM pinned to one core)
    assert device._cpu_list_count("0-1") == 2 and device._cpu_list_count("0-3,8,10-11") == 7
    # GPUs: arch, name and SM count (an H100 SXM, its PCIe card and a MIG slice differ); a host
    # without that GPU knows the arch only
    for name, sms, key in (("NVIDIA H100 80GB HBM3", 132, "sm_90-nvidia-h100-80gb-hbm3-132sm"),
                           ("NVIDIA H100 PCIe", 114, "sm_90-nvidia-h100-pcie-114sm"),
                           ("NVIDIA H100 80GB HBM3", 16, "sm_90-nvidia-h100-80gb-hbm3-16sm")):
        monkeypatch.setattr(device, "gpu_info", lambda n=name, k=sms: {"name": n, "sm_count": k, "arch": "sm_90"})
        assert device.device_name(TargetSpec("cuda", "sm_90")) == key
        assert device.describe(TargetSpec("cuda", "sm_90")) == {"kind": "cuda", "arch": "sm_90", "device": key,
                                                                 "sm_count": sms}
        assert device.device_name(TargetSpec("cuda", "sm_80")) == "sm_80"
    monkeypatch.undo()
    assert device.machine_cores() >= 1


def test_committed_logs_are_migrated_and_self_consistent():
    """Every committed log folder and cost model is named by the key its records' targets give."""
    from pathlib import Path

    from qcompiler.tune.device import cpu_isa, cpu_key

    root = Path(ROOT)
    dirs = sorted(p for p in (root / "autotune_logs").iterdir() if p.is_dir())
    assert {p.name for p in dirs} >= {"znver2-avx2-2c", "rocketlake-avx512vnni-2c"}
    assert not (root / "autotune_logs" / "amd-epyc").exists()
    for d in dirs:
        res = R.read(d)
        assert res.records and res.corrupt == 0
        targets = {json.dumps(r["target"], sort_keys=True) for r in res.records}
        assert len(targets) == 1, d
        t = res.records[0]["target"]
        assert t["device"] == d.name == cpu_key(t["arch"], cpu_isa(t["arch"], False), t["cores"])
        cm = json.loads((root / "costmodels" / f"{d.name}.json").read_text())
        assert cm["target"]["device"] == d.name and cm["target"]["arch"] == t["arch"]
    # the Zen 2's (AVX2) records were measured with the AVX2 kernels
    zen2 = R.read(root / "autotune_logs" / "znver2-avx2-2c").records
    assert {r["workload"]["backend"] for r in zen2} == {"cpu_avx2"}


def _zen5_target():
    return {"kind": "cpu", "arch": "znver5", "device": "znver5-avx512vnni-2c", "cores": 2, "isa": "avx512vnni"}


def test_foreign_log_and_cost_model_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """A Zen 5 never uses the Zen 2's log or cost model: named explicitly, each is refused in one
    line; found by default, neither exists under the Zen 5's key."""
    from pathlib import Path

    import pytest

    from costmodel.predict import CostModelError, load_for
    from qcompiler.errors import TargetError
    from qcompiler.tune import apply
    from qcompiler.tune.tuner import load_states

    root = Path(ROOT)
    zen2_log = root / "autotune_logs" / "znver2-avx2-2c"
    tgt = _zen5_target()
    with pytest.raises(TargetError, match=r"znver2-avx2-2c.*not of this target \(znver5-avx512vnni-2c\)") as e:
        apply.TunedConfigs(str(zen2_log), tgt)
    assert "\n" not in str(e.value)
    with pytest.raises(TargetError, match="znver2-avx2-2c"):
        load_states([], str(zen2_log), tgt, "off")
    with pytest.raises(CostModelError, match="znver2.*not for cpu znver5"):
        load_for(tgt, root / "costmodels" / "znver2-avx2-2c.json")
    # found by the device key: nothing for the Zen 5 (untuned defaults, no warm start), not the Zen 2's
    from qcompiler.targets import TargetSpec
    from qcompiler.tune import device

    monkeypatch.delenv("QC_TUNE_LOG", raising=False)
    monkeypatch.delenv("QC_COSTMODEL", raising=False)
    monkeypatch.setattr(device, "device_name", lambda spec, probe_gpu=True: tgt["device"])
    monkeypatch.setattr(device, "describe", lambda spec, probe_gpu=True: dict(tgt))
    if not (root / "autotune_logs" / tgt["device"]).exists():
        assert apply.find_log(TargetSpec("cpu", "znver5")) is None
        assert load_for(tgt)[0] is None
    # a log mixing devices keeps working: this device's records used, the others skipped
    mixed = tmp_path / "mixed"
    with open(zen2_log / R.FILENAME, "rb") as f:
        zen2_line = f.readline()
    rec = json.loads(zen2_line)
    (mixed).mkdir()
    (mixed / R.FILENAME).write_bytes(zen2_line + (json.dumps({**rec, "target": tgt}) + "\n").encode())
    rr = R.read(mixed, tgt)
    assert len(rr.records) == 1 and rr.foreign_target == 1
    R.refuse_foreign(rr, mixed, tgt)
    # the CLI edge: one line, exit 2
    from qcompiler.cli import main

    monkeypatch.setenv("QC_TUNE_LOG", str(zen2_log))
    monkeypatch.setattr(apply, "find_log", lambda spec, tune_log=None: str(zen2_log))
    m = tmp_path / "m.onnx"
    _tiny_model(m)
    rc = main(["-q", "compile", str(m), "-o", str(tmp_path / "o.so"), "--calib", str(tmp_path / "c.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "znver2-avx2-2c" in err, err
    assert not (tmp_path / "o.so").exists() and not (tmp_path / "o.json").exists()


def test_legacy_marketing_name_records_match_no_device_key():
    """A record of the older scheme does not say which ISA class measured it: it matches no key."""
    legacy = {"kind": "cpu", "arch": "znver2", "device": "amd-epyc", "cores": 2}
    assert not R.target_matches(legacy, {"kind": "cpu", "arch": "znver2", "device": "znver2-avx2-2c", "cores": 2})
    assert not R.target_matches(legacy, _zen5_target())  # a Zen 5 never takes a Zen 2's records
    assert R.target_matches({**legacy, "device": "znver2-avx2-2c"},
                            {"kind": "cpu", "arch": "znver2", "device": "znver2-avx2-2c", "cores": 2})
    # a target without a device (another CPU than the host's): any record of its arch
    assert R.target_matches(legacy, {"kind": "cpu", "arch": "znver2", "device": None, "cores": None})
    assert not R.target_matches({**legacy, "device": "znver2-avx2-2c"},
                                {"kind": "cpu", "arch": "znver2", "device": "znver2-avx512-2c", "cores": 2})


def _tiny_model(path):
    import numpy as np
    import onnx
    from onnx import helper

    from tests.helpers import make_model, tensor

    r = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    onnx.save(make_model(nodes, [("x", [1, 8, 6, 6])], [("y", None)],
                         [tensor("W", (r.standard_normal((16, 8, 3, 3)) * 0.3).astype(np.float32))]), path)
    np.savez(path.parent / "c.npz", x=r.standard_normal((4, 8, 6, 6)).astype(np.float32))
