"""Reliability scenarios of issue 20, run N times each, counted (benchmarks/results/reliability.json).

    .venv/bin/python benchmarks/reliability.py [--n 50] [--n-slow 10] [--only interrupt,threads,append,repro]

* interrupt: ``qc compile``, ``qc tune``, ``qc measure`` and ``qc costmodel train`` started in a
  subprocess and sent SIGINT or SIGTERM (alternating) after a random delay (uniform over the
  command's typical run time, from 0.3 s: the Python interpreter's own start-up, before any code of
  qc runs, is outside the scenario).  A run is clean when it ends within 30 s of the signal with
  exit 130 / 143 (or killed by that signal after printing its line: ``killed_by_signal``, which a
  shell reports as the same 130 / 143) and one stderr line without a traceback (or finished before
  the signal: counted apart), leaves nothing in its private TMPDIR
  (onnxruntime's ``.ses`` session file excepted), no process of its session, and no partial output:
  no half-written library / model file, every tuning record and measure result a whole JSON line,
  none twice.
* threads: one ``qcompiler.load`` object, 8 threads x 100 calls each, compared with the
  single-threaded results.
* append: two processes appending 100 records each to one log at once (tests/test_reliability_tune.py).
* repro: the same model compiled in two fresh folders: model.so bytes and model.json (fields whose
  names say time/date/host/path excepted) compared.

Every count of a failure should be 0.  ``--n`` sets the runs of the fast scenarios and of each
interruption point of ``qc compile``; ``--n-slow`` those of ``qc tune`` / ``qc measure`` /
``qc costmodel train`` (each run starts TVM, ~5-20 s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import call_concurrently  # noqa: E402
from tests.test_reliability import stable_view  # noqa: E402  (fields named time/date/host/path dropped)
QC = [sys.executable, "-m", "qcompiler.cli", "-q"]
THIRD_PARTY_TMP = {".ses"}  # onnxruntime's session id file (tests/test_fuzz.py)


def _model(d: Path, hw: int = 16, oc: int = 16) -> Path:
    import onnx
    from onnx import helper

    from tests.helpers import make_model, tensor

    r = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W2"], ["y"])]
    inits = [tensor("W", (r.standard_normal((oc, 8, 3, 3)) * 0.3).astype(np.float32)),
             tensor("B", (r.standard_normal(oc) * 0.1).astype(np.float32)),
             tensor("W2", r.standard_normal((oc, 10)).astype(np.float32))]
    onnx.save(make_model(nodes, [("x", ["N", 8, hw, hw])], [("y", None)], inits), d / "m.onnx")
    np.savez(d / "calib.npz", x=r.standard_normal((8, 8, hw, hw)).astype(np.float32))
    return d / "m.onnx"


def _env(tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), "QC_COSTMODEL": "off",
            "QC_TUNE_COSTMODEL": "off", "QC_TUNE_LOG": "off"}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json_lines(f: Path) -> tuple[list, int]:
    """(parsed lines, torn lines)"""
    if not f.exists():
        return [], 0
    out, torn = [], 0
    for line in f.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            torn += 1
    return out, torn


# ---- interruption ------------------------------------------------------------------------------------

class Counts(dict):
    def add(self, key, n=1):
        self[key] = self.get(key, 0) + n


def _interrupt_once(cmd, cwd: Path, tmp: Path, delay: float, sig, check_outputs) -> dict:
    p = subprocess.Popen(cmd, cwd=cwd, env=_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < delay and p.poll() is None:
        time.sleep(0.01)
    res = {"finished_first": p.poll() is not None}
    if not res["finished_first"]:
        p.send_signal(sig)
    try:
        rc = p.wait(timeout=30)
        res["slow"] = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait()
        res["slow"] = True
    err = p.stderr.read().decode(errors="replace").strip()
    time.sleep(0.3)
    res["orphans"] = _group_alive(p.pid)
    if res["orphans"]:
        os.killpg(p.pid, signal.SIGKILL)
    want = 143 if sig == signal.SIGTERM else 130
    word = "terminated" if sig == signal.SIGTERM else "interrupted"
    one_line = err.count("\n") == 0 and word in err and "Traceback" not in err
    # killed by the signal itself (default action): a shell reports 128 + signal, as for our exit code;
    # counted apart, clean only with our one line (the handler ran and reported first)
    res["killed_by_signal"] = rc == -sig
    # rc 0 although signalled: the command had finished and reported when the signal came (qc ignores
    # signals while the interpreter tears down); its outputs are checked complete below
    res["signal_after_finish"] = not res["finished_first"] and rc == 0
    if res["finished_first"] or res["signal_after_finish"]:
        res["clean_exit"] = rc == 0
    else:
        res["clean_exit"] = (rc == want or rc == -sig) and one_line
    res["rc"], res["stderr"] = rc, err[-300:]
    res["leftovers"] = sorted(x.name for x in tmp.iterdir() if x.name not in THIRD_PARTY_TMP)
    res.update(check_outputs())
    return res


def interrupt(n_fast: int, n_slow: int, seed: int = 0, points: set | None = None) -> dict:
    from qcompiler.targets import host_has_avx2, host_has_vnni

    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="qc_rel_"))
    out = {}
    try:
        model = _model(work)
        calib = work / "calib.npz"
        scen = {}

        # qc compile: a library pair or nothing
        def compile_case(run_dir):
            o = run_dir / "m.so"

            def check():
                names = sorted(x.name for x in run_dir.iterdir())
                pair = names == ["m.json", "m.so"]
                return {"partial_output": 0 if (pair or names == []) else 1, "files": names}

            return QC + ["compile", str(model), "-o", str(o), "--calib", str(calib)], check

        scen["compile"] = (compile_case, (0.3, 4.0), n_fast)

        can_tune = host_has_vnni() or host_has_avx2()
        if can_tune:
            def tune_case(run_dir):
                log = run_dir / "log"

                def check():
                    recs, torn = _json_lines(log / "records.jsonl")
                    pairs = [(r.get("workload_key"), json.dumps(r.get("config"), sort_keys=True)) for r in recs]
                    return {"torn_records": torn, "duplicated_records": len(pairs) - len(set(pairs)),
                            "records": len(recs)}

                return QC + ["tune", str(model), "--trials", "40", "--log", str(log), "--repeats", "2",
                             "--min-repeat-ms", "5", "--batch-size", "2", "--cost-model", "off"], check

            scen["tune"] = (tune_case, (0.5, 12.0), n_slow)

            batch = work / "batch"
            r = subprocess.run(QC + ["tune", str(model), "--export-candidates", str(batch), "--candidates", "12",
                                     "--log", str(work / "exportlog"), "--repeats", "20", "--min-repeat-ms", "30",
                                     "--cost-model", "off"], cwd=ROOT, env=_env(work / "tmp_export"),
                               capture_output=True, text=True, timeout=900)
            if r.returncode == 0:
                def measure_case(run_dir):
                    b = run_dir / "batch"
                    shutil.copytree(batch, b)

                    def check():
                        res, torn = _json_lines(b / "results.jsonl")
                        ids = [x.get("id") for x in res]
                        return {"torn_records": torn, "duplicated_records": len(ids) - len(set(ids)),
                                "records": len(ids)}

                    return QC + ["measure", str(b)], check

                scen["measure"] = (measure_case, (0.3, 8.0), n_slow)
            else:
                out["measure_skipped"] = r.stderr.strip()[-300:]

        log = ROOT / "autotune_logs" / "znver2-avx2-2c"
        if log.is_dir():
            def train_case(run_dir):
                o = run_dir / "cm.json"

                def check():
                    names = sorted(x.name for x in run_dir.iterdir())
                    return {"partial_output": 0 if names in ([], ["cm.json"]) else 1, "files": names}

                return QC + ["costmodel", "train", str(log), "-o", str(o)], check

            scen["costmodel_train"] = (train_case, (0.5, 15.0), n_slow)

        for name, (case, (lo, hi), n) in scen.items():
            if points is not None and name not in points:
                continue
            c = Counts(runs=0)
            examples = []
            for i in range(n):
                run_dir = work / f"{name}_{i}"
                run_dir.mkdir()
                cmd, check = case(run_dir)
                sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
                delay = rng.uniform(lo, hi)
                tmp = work / f"{name}_{i}_tmp"  # the run's TMPDIR, beside (not in) its output folder
                r = _interrupt_once(cmd, ROOT, tmp, delay, sig, check)
                c.add("runs")
                c.add("finished_before_signal", int(r["finished_first"]))
                c.add("signal_after_finish", int(r["signal_after_finish"]))
                c.add("clean_exits", int(r["clean_exit"]))
                c.add("unclean_exits", int(not r["clean_exit"]))
                c.add("slow_to_stop", int(r["slow"]))
                c.add("killed_by_signal", int(r["killed_by_signal"]))
                c.add("orphan_processes", int(r["orphans"]))
                c.add("leftovers", int(bool(r["leftovers"])))
                for k in ("partial_output", "torn_records", "duplicated_records"):
                    if k in r:
                        c.add(k, r[k])
                if not r["clean_exit"] or r["leftovers"] or r.get("partial_output") or r.get("torn_records") \
                        or r.get("duplicated_records") or r["orphans"] or r["slow"]:
                    examples.append({"delay_s": round(delay, 2), "signal": sig.name, **{k: v for k, v in r.items()}})
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.rmtree(tmp, ignore_errors=True)
                print(f"[interrupt] {name} {i + 1}/{n}: rc {r['rc']} after {delay:.1f} s ({sig.name})", flush=True)
            out[name] = {**c, "delay_s": [lo, hi], "failures": examples[:5]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# ---- concurrency ---------------------------------------------------------------------------------------

def threads(n: int, nthreads: int = 8, calls: int = 100) -> dict:
    import qcompiler
    from qcompiler.cli import main

    work = Path(tempfile.mkdtemp(prefix="qc_rel_thr_"))
    try:
        model = _model(work)
        assert main(["-q", "compile", str(model), "-o", str(work / "m.so"), "--calib", str(work / "calib.npz")]) == 0
        c = Counts(rounds=0, calls=0, mismatches=0, errors=0)
        for rnd in range(n):
            m = qcompiler.load(str(work / "m.so"))
            r = np.random.default_rng(rnd)
            xs = [(r.standard_normal((1, 8, 16, 16)) * (0.5 + k % 7)).astype(np.float32) for k in range(nthreads * calls)]
            want = [m(x=x)["y"] for x in xs]
            got, errs = call_concurrently(lambda x: m(x=x)["y"], xs, nthreads)
            c.add("rounds")
            c.add("calls", len(xs))
            c.add("errors", len(errs))
            c.add("mismatches", sum(1 for g, w in zip(got, want) if g is None or not np.array_equal(g, w)))
        return {**c, "threads": nthreads, "calls_per_thread": calls}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def append(n: int, per: int = 100) -> dict:
    from tests.test_reliability_tune import WRITER

    c = Counts(rounds=0, records_written=0, torn=0, lost=0, duplicated=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for rnd in range(n):
        d = Path(tempfile.mkdtemp(prefix="qc_rel_app_"))
        try:
            ps = [subprocess.Popen([sys.executable, "-c", WRITER, str(d), t, str(per)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env) for t in ("a", "b")]
            for p in ps:
                p.stdout.readline()
            for p in ps:
                p.stdin.write("go\n")
                p.stdin.flush()
            for p in ps:
                p.wait(timeout=300)
            recs, torn = _json_lines(d / "records.jsonl")
            ids = [(r["config"]["tag"], r["config"]["i"]) for r in recs]
            c.add("rounds")
            c.add("records_written", 2 * per)
            c.add("torn", torn)
            c.add("duplicated", len(ids) - len(set(ids)))
            c.add("lost", 2 * per - len(set(ids)))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return {**c, "processes": 2, "records_per_process": per}


def repro(n: int) -> dict:
    c = Counts(rounds=0, so_mismatches=0, json_mismatches=0, failed_compiles=0)
    work = Path(tempfile.mkdtemp(prefix="qc_rel_rep_"))
    try:
        model = _model(work)
        first = None
        for rnd in range(n):
            d = work / f"r{rnd}"
            d.mkdir()
            shutil.copy(model, d / "model.onnx")
            shutil.copy(work / "calib.npz", d / "calib.npz")
            r = subprocess.run(QC + ["compile", "model.onnx", "-o", "out.so", "--calib", "calib.npz"], cwd=d,
                               env=_env(d / "tmp"), capture_output=True, text=True, timeout=600)
            c.add("rounds")
            if r.returncode != 0:
                c.add("failed_compiles")
                continue
            got = ((d / "out.so").read_bytes(), stable_view(json.loads((d / "out.json").read_text())))
            if first is None:
                first = got
            else:
                c.add("so_mismatches", int(got[0] != first[0]))
                c.add("json_mismatches", int(got[1] != first[1]))
            shutil.rmtree(d, ignore_errors=True)
        return dict(c)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="runs of the fast scenarios and of qc compile interruptions")
    ap.add_argument("--n-slow", type=int, default=50, help="runs of each slow interruption (tune, measure, train)")
    ap.add_argument("--only", default="interrupt,threads,append,repro")
    ap.add_argument("--points", default="compile,tune,measure,costmodel_train",
                    help="the interruption scenarios to run")
    ap.add_argument("--merge", action="store_true",
                    help="update only the scenarios run in the existing --out file (same machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    a = ap.parse_args()
    from qcompiler.tune.device import cpu_model_name, device_name
    from qcompiler.targets import parse_target

    only = set(a.only.split(","))
    t0 = time.time()
    res = {"date": datetime.date.today().isoformat(), "machine": {"cpu": cpu_model_name(),
                                                                 "device": device_name(parse_target("cpu"))},
           "n": a.n, "n_slow": a.n_slow}
    if "repro" in only:
        res["repro"] = repro(a.n)
        print("[repro]", res["repro"], flush=True)
    if "append" in only:
        res["append"] = append(a.n)
        print("[append]", res["append"], flush=True)
    if "threads" in only:
        res["threads"] = threads(a.n)
        print("[threads]", res["threads"], flush=True)
    if "interrupt" in only:
        res["interrupt"] = interrupt(a.n, a.n_slow, points=set(a.points.split(",")))
    res["seconds"] = round(time.time() - t0, 1)
    if a.merge and Path(a.out).is_file():
        old = json.loads(Path(a.out).read_text())
        runs = old.setdefault("runs", [{k: old.get(k) for k in ("date", "n", "n_slow", "seconds")}])
        runs.append({"date": res["date"], "n": a.n, "n_slow": a.n_slow, "seconds": res["seconds"],
                     "updated": sorted((only - {"interrupt"}) | ({f"interrupt.{p}" for p in a.points.split(",")}
                                                                 if "interrupt" in only else set()))})
        for k in ("repro", "append", "threads"):
            if k in res:
                old[k] = res[k]
        old.setdefault("interrupt", {}).update(res.get("interrupt", {}))
        res = old
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
