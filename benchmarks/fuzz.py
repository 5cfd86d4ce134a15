"""Fuzz `qc compile` with mutations of real zoo models, as a new user would, and count the outcomes.

Every run is a fresh `qc compile` process (so a segfault or an out-of-memory kill is counted, not
fatal to the benchmark) with a private TMPDIR and a time limit.  A run ends in one of:
  ok                 exit 0, model.so + model.json written, nothing else left behind
  error:<Class>      exit 2, exactly one stderr line, no traceback, nothing left behind
                     (Class = the QCError subclass; InternalError is a bug, but a clean one)
  traceback / crash / not-one-line / leftovers / missing-output / timeout   -- failures

The mutations are tests/test_fuzz.py's (corrupt bytes, truncation, wrong/missing attributes,
dangling inputs, NaN/Inf and hostile weights, wrong dtypes and shapes, absurd and zero dims, no or
duplicated outputs, cycles, unknown ops and domains, bad calibration data ...), mutation i of the
run being kind i mod #kinds on model i mod #models, seeded.

    python benchmarks/fuzz.py --n 2000            # writes benchmarks/results/fuzz.json
    python benchmarks/fuzz.py --n 200 --keep DIR  # keep the inputs of every failing run in DIR
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_fuzz import KINDS, judge, mutations  # noqa: E402

MODELS = ("mtcnn-rnet", "mtcnn-onet", "ppocr-cls")

# the child: `qc compile` with its error line tagged by the QCError class (for counting only)
CHILD = """
import sys
from tests.test_fuzz import record_error_class
from qcompiler.cli import main
with record_error_class():
    rc = main(sys.argv[1:])
sys.exit(rc)
"""


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        ram = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "ram_gib": ram, "python": platform.python_version(),
            "platform": platform.platform()}


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + ("+dirty" if dirty else "") if r.returncode == 0 else None
    except Exception:
        return None


def bases(models) -> dict:
    import onnx

    from qcompiler import zoo

    out = {}
    for name in models:
        m = onnx.load(str(zoo.model_path(name)))
        out[name] = (m, zoo.calibration_inputs(name, 8))
    return out


def run_one(case, d: Path, timeout: float) -> tuple[str, str, float]:
    argv = case.write(d)
    tmp = d / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "1")}
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {timeout:.0f} s", time.perf_counter() - t
    dt = time.perf_counter() - t
    if r.returncode < 0:
        return "crash", f"killed by signal {-r.returncode}: {r.stderr[-1500:]}", dt
    outcome, detail = judge(r.returncode, r.stdout, r.stderr, d / "out", tmp)
    return outcome, detail, dt


def write_results(a, models, counts, by_kind, by_model, samples, failures, internal, seconds, t0, complete):
    """Write the counts so far (atomically): every 25 runs and at the end, so a cut-off run leaves its counts."""
    ok = counts["ok"]
    clean_err = sum(v for k, v in counts.items() if k.startswith("error:"))
    n = sum(counts.values())
    res = {
        "benchmark": "fuzz", "complete": complete, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "commit": a.commit or git_commit(),
        "config": {"n": a.n, "start": a.start, "seed": a.seed, "models": models, "timeout_s": a.timeout,
                   "kinds": [f.__name__[2:] for f in KINDS]},
        "summary": {"runs": n, "clean_compile": ok, "clean_error": clean_err, "failures": n - ok - clean_err,
                    "internal_errors": counts["error:InternalError"],
                    "failure_rate": round((n - ok - clean_err) / max(n, 1), 4)},
        "outcomes": dict(sorted(counts.items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "by_model": {k: dict(sorted(v.items())) for k, v in sorted(by_model.items())},
        "seconds_per_run": {"median": round(sorted(seconds)[len(seconds) // 2], 2) if seconds else None,
                            "max": round(max(seconds), 2) if seconds else None},
        "wall_s": round(time.time() - t0, 1),
        "messages": {k: dict(sorted(v.items())) for k, v in sorted(samples.items())},
        "failures": failures[:200],
        "internal_errors": internal[:200],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="number of runs (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per run before it counts as a timeout")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fuzz.json"))
    ap.add_argument("--keep", default=None, metavar="DIR", help="copy the inputs of failing runs here")
    ap.add_argument("--start", type=int, default=0, help="first mutation index (to replay a range)")
    ap.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD of this checkout)")
    a = ap.parse_args(argv)

    models = [m.strip() for m in a.models.split(",") if m.strip()]
    t0 = time.time()
    base = bases(models)
    counts: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_model: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures, internal, seconds = [], [], []
    samples: dict[str, dict[str, str]] = collections.defaultdict(dict)  # kind -> outcome -> first message
    root = Path(tempfile.mkdtemp(prefix="qc-fuzz-"))
    try:
        for k, case in enumerate(mutations(a.start + a.n, base, a.seed)):
            if k < a.start:
                continue
            d = root / f"r{k}"
            outcome, detail, dt = run_one(case, d, a.timeout)
            seconds.append(dt)
            kind = case.name.split(" ", 2)[1].rstrip(":")
            model = case.name.split("#", 1)[0]
            counts[outcome] += 1
            by_kind[kind][outcome.split(":")[0]] += 1
            by_model[model][outcome.split(":")[0]] += 1
            bad = not (outcome == "ok" or outcome.startswith("error:"))
            if outcome.startswith("error:") and outcome not in samples[kind]:
                samples[kind][outcome] = f"{case.name}: {detail[:400]}"
            if bad:
                failures.append({"case": case.name, "outcome": outcome, "detail": detail[-1500:]})
                if a.keep:
                    dst = Path(a.keep) / f"r{k}"
                    shutil.copytree(d, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("out", "tmp"))
            elif outcome == "error:InternalError":
                internal.append({"case": case.name, "message": detail[:500]})
            print(f"[{k - a.start + 1:5d}/{a.n}] {dt:6.1f}s {outcome:24s} {case.name[:80]}"
                  + (f"\n        {detail[:400]}" if bad or outcome == "error:InternalError" else ""), flush=True)
            shutil.rmtree(d, ignore_errors=True)
            if (k - a.start + 1) % 25 == 0:
                write_results(a, models, counts, by_kind, by_model, samples, failures, internal, seconds, t0, False)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    res = write_results(a, models, counts, by_kind, by_model, samples, failures, internal, seconds, t0, True)
    print(json.dumps(res["summary"]), f"-> {a.out}")
    return 0 if res["summary"]["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
