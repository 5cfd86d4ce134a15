"""MiniLM (paraphrase-MiniLM-L3-v2) INT8 vs FP32 for each integer softmax / GELU family, so a user
can choose with numbers in hand.  Sentence embeddings (mean pooling over the attention mask) of
held-out real sentences (not used for calibration), padded to the batch's longest at seq 64.

    python benchmarks/transformer_variants.py [--n-eval 64] [--n-calib 32]

Runs the NumPy integer reference executor, which the TVM library equals bit for bit (tests), so
the numbers are those of the compiled library.  Writes benchmarks/results/minilm_variants.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompiler import reference, zoo  # noqa: E402
from qcompiler.driver import CompileOptions, prepare  # noqa: E402
from qcompiler.targets import parse_target  # noqa: E402


def run(softmax: str, gelu: str, smooth: float, n_calib: int, n_eval: int, batch: int = 8) -> dict:
    calib = zoo.calibration_inputs("minilm", n_calib)
    feeds, labels = zoo.eval_set("minilm", n_eval)
    opts = CompileOptions(target=parse_target("cpu"), batch=batch, softmax=softmax, gelu=gelu, smooth=smooth)
    ig = prepare(zoo.model_path("minilm"), calib, opts).int_graph
    outs = []
    for i in range(0, n_eval, batch):
        x = {k: v[i:i + batch] for k, v in feeds.items()}
        if len(x["input_ids"]) < batch:  # pad the last batch with copies, dropped below
            x = {k: np.concatenate([v, np.repeat(v[-1:], batch - len(v), 0)]) for k, v in x.items()}
        outs.append(reference.execute(ig, x))
    q = [np.concatenate([o[name] for o in outs])[:n_eval] for name in ig.outputs]
    f = zoo.run_fp32("minilm", feeds)
    r = zoo.reference_metric("minilm", q, labels, feeds=feeds, reference=f)
    r["fp32_paraphrase_recall"] = zoo.reference_metric("minilm", f, labels, feeds=feeds)["paraphrase_recall"]
    return {"softmax": softmax, "gelu": gelu, "smooth": smooth, **r}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/minilm_variants.json"))
    a = ap.parse_args(argv)
    rows = []
    combos = [("iexp", "igelu", 0.5), ("shift", "igelu", 0.5), ("iexp", "shift", 0.5), ("shift", "shift", 0.5),
              ("iexp", "lut", 0.5), ("iexp", "igelu", 0.0)]
    for sm, ge, al in combos:
        rows.append(run(sm, ge, al, a.n_calib, a.n_eval))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{'softmax':<8}{'gelu':<7}{'smooth':>7}{'cos mean':>10}{'cos min':>9}{'token cos':>11}{'NN agree':>10}"
          f"{'recall int8':>12}{'recall fp32':>12}")
    for r in rows:
        print(f"{r['softmax']:<8}{r['gelu']:<7}{r['smooth']:>7.2f}{r['cos_mean']:>10.4f}{r['cos_min']:>9.4f}"
              f"{r['token_cos_mean']:>11.4f}{r['nn_agreement']:>10.3f}{r['paraphrase_recall']:>12.3f}"
              f"{r['fp32_paraphrase_recall']:>12.3f}")
    Path(a.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "model": "paraphrase-MiniLM-L3-v2",
                                       "n_eval": a.n_eval, "n_calib": a.n_calib, "results": rows}, indent=1))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
