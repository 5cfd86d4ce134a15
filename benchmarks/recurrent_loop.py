"""Recurrences over a symbolic time axis (issue 17): one library with the LSTM / GRU as an integer
loop (qcompiler/intops/recurrent.py) against a static library unrolled for each exact length and
ONNX Runtime FP32 at the same lengths, side by side in one process.

    .venv/bin/python benchmarks/recurrent_loop.py [--models tashkeel-bilstm,ar-romanizer-enc] [--repeats 20]

Corpus models (bash scripts/install_corpus.sh): tashkeel-bilstm (a 2-layer BiLSTM tagger, shipped
as ONNX Runtime dynamic int8, read back to float), ar-romanizer-enc (a bidirectional GRU encoder).
Both libraries are calibrated on the same token sequences (the dynamic one at the corpus length, the
static one repeated / cut to each timed length, at which it is compiled (``dims="static"``: its recurrence unrolled, a few scales per role);
the dynamic one once, with the default dims (the time axis symbolic, one scale per role).  Also:
each library's cosine to FP32 at that length, and the compile times.  Writes
benchmarks/results/recurrent_loop.json (machine, date) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import corpus  # noqa: E402
from benchmarks.cpu_int8 import _ort_best  # noqa: E402
from benchmarks.dynamic_shapes import record, run_models  # noqa: E402
from qcompiler.targets import host_cores, parse_target  # noqa: E402

CASES = {"tashkeel-bilstm": (8, 32, 128), "ar-romanizer-enc": (8, 16, 64)}


def _feeds(name: str, L: int, rng) -> dict:
    out = {}
    for inp in corpus.get(name).inputs:
        if inp.gen == "ids":
            out[inp.name] = rng.integers(inp.args["lo"], inp.args["hi"], (1, L)).astype(inp.dtype)
        else:  # masks
            out[inp.name] = np.ones((1, L), inp.dtype)
    return out


def _compile(name, path, calib, **kw) -> float:
    from qcompiler.driver import CompileOptions, compile_model

    t = time.perf_counter()
    compile_model(str(corpus.model_path(name)), path, calib, CompileOptions(target=parse_target("cpu"), **kw))
    return time.perf_counter() - t


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def bench(name: str, repeats: int, d: str) -> list[dict]:
    from qcompiler.runtime import Library

    calib = corpus.make_inputs(name, "calib", 8)
    dyn_path = os.path.join(d, f"{name}.dyn.so")
    dyn_s = _compile(name, dyn_path, calib)
    dyn = Library(dyn_path)
    meta = json.loads(Path(dyn_path).with_suffix(".json").read_text())
    rng = np.random.default_rng(0)
    rows = []
    for L in CASES[name]:
        feeds = _feeds(name, L, rng)
        st_path = os.path.join(d, f"{name}.st{L}.so")
        # the same token streams, repeated / cut to this length (a static library calibrates at its own)
        st_calib = {k: np.concatenate([v] * -(-L // v.shape[1]), axis=1)[:, :L] for k, v in calib.items()}
        st_s = _compile(name, st_path, st_calib, dims="static")
        st = Library(st_path)
        ref = corpus.run_fp32(name, feeds)
        r = {"model": name, "length": L, "symbolic_dims": meta.get("symbolic_dims"),
             "dynamic": dyn.bench(feeds, repeats=repeats, min_repeat_ms=20)["median_ms"],
             "static": st.bench(feeds, repeats=repeats, min_repeat_ms=20)["median_ms"],
             "ort_fp32": _ort_best(str(corpus.model_path(name)), host_cores(), feeds, repeats)["median_ms"],
             "cos_dynamic": round(_cos(list(dyn(feeds).values())[0], ref[0]), 5),
             "cos_static": round(_cos(list(st(feeds).values())[0], ref[0]), 5),
             "compile_s_dynamic": round(dyn_s, 1), "compile_s_static": round(st_s, 1)}
        r["dynamic_vs_static"] = r["static"] / r["dynamic"]
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/recurrent_loop.json"))
    a = ap.parse_args(argv)
    rows, load = run_models(bench, a.models.split(","), a.repeats)
    print(f"\n{'model':<18}{'T':>5}{'dynamic':>9}{'static':>9}{'ORT fp32':>9}   dyn/static   cos dyn / static"
          "   compile s (dyn / static)")
    for r in rows:
        print(f"{r['model']:<18}{r['length']:>5}{r['dynamic']:>9.3f}{r['static']:>9.3f}{r['ort_fp32']:>9.3f}"
              f"   {r['static'] / r['dynamic']:>9.2f}x   {r['cos_dynamic']:.4f} / {r['cos_static']:.4f}"
              f"   {r['compile_s_dynamic']} / {r['compile_s_static']}")
    out = record(rows, load, "median ms per call at batch 1; dynamic = one library, the time axis symbolic (an integer "
                             "loop per direction); static = a library compiled for that length (the recurrence unrolled); "
                             "both calibrated on the same samples; cos = cosine of the first output to ORT FP32")
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
