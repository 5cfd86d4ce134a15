"""Training data: tuning records (``records.jsonl``) and profile records (``profiles.jsonl``) ->
samples -> feature matrix.

A *sample* is ``{"target", "text", "func", "workload", "config", "latency_s", "group", "query",
"source", "models"}``: ``group`` is the unit of every split (a workload key for tuning records and
for profiled GEMM/conv kernels tagged with their workload, the kernel's TIR hash for the others),
``query`` the ranking group (candidates of one workload),
``source`` "tune" or "profile", ``models`` the zoo models that run it (for leave-one-model-out).
A tuning sample's label is the fastest of its config's undisturbed timings (one per session that
timed it); ``sessions_s`` keeps each of them in log order (the test-retest noise floor).
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
from pathlib import Path

import numpy as np

from qcompiler.tune.apply import CONFIG_ATTR, WORKLOAD_ATTR
from qcompiler.tune.records import disturbed

from . import PROFILE_SCHEMA
from . import features as F

TUNE_SCHEMA = "qc-tune/1"


class DataError(Exception):
    pass


def encode_tir(text: str) -> str:
    return base64.b64encode(gzip.compress(text.encode(), 6)).decode()


def decode_tir(blob: str) -> str:
    return gzip.decompress(base64.b64decode(blob)).decode()


def _lines(path: Path):
    with open(path) as f:
        for ln in f:
            try:
                r = json.loads(ln)
            except ValueError:
                continue  # a partial last line of a killed run
            if isinstance(r, dict):
                yield r


def log_paths(src) -> tuple[Path | None, Path | None]:
    """(records.jsonl, profiles.jsonl) of a log folder (or of a records.jsonl / profiles.jsonl path)."""
    p = Path(src)
    if p.is_dir():
        rec, prof = p / "records.jsonl", p / "profiles.jsonl"
        return (rec if rec.is_file() else None), (prof if prof.is_file() else None)
    if p.is_file():
        if p.name.startswith("profiles"):
            return None, p
        return p, None
    raise DataError(f"{src}: no such tuning log folder or records file")


def read_tuning(path: Path | None) -> list[dict]:
    if path is None:
        return []
    return [r for r in _lines(path) if r.get("schema") == TUNE_SCHEMA and r.get("error") is None
            and r.get("median_s")]


def read_profiles(path: Path | None) -> tuple[list[dict], list[dict], dict[str, str]]:
    """(kernel records, model records, tir_sha256 -> TVMScript)."""
    if path is None:
        return [], [], {}
    kern, models, tirs = [], [], {}
    for r in _lines(path):
        if r.get("schema") != PROFILE_SCHEMA:
            continue
        t = r.get("type")
        if t == "kernel" and r.get("median_s"):
            kern.append(r)
        elif t == "model":
            models.append(r)
        elif t == "tir":
            tirs[r["tir_sha256"]] = decode_tir(r["tir"])
    return kern, models, tirs


def _parse_func(text: str):
    try:
        import tvm

        f = tvm.script.from_source(text)
        return f if isinstance(f, tvm.tirx.PrimFunc) else None
    except Exception:  # noqa: BLE001 - a text the parser refuses still has text/tir features
        return None


def kernel_tags(func, text: str = "") -> tuple[dict | None, dict | None]:
    """(workload fields, config) a compiled GEMM/conv kernel was built from: its ``qc.workload`` /
    ``qc.config`` string attributes (read from the PrimFunc, else from its TVMScript); (None, None)
    for every other kernel."""
    vals = {}
    attrs = getattr(func, "attrs", None) if func is not None else None
    for key in (WORKLOAD_ATTR, CONFIG_ATTR):
        v = None
        if attrs is not None and key in attrs:
            v = str(attrs[key])
        elif text:
            m = re.search(re.escape(json.dumps(key)) + r': ("(?:[^"\\]|\\.)*")', text)
            v = json.loads(m.group(1)) if m else None
        try:
            vals[key] = json.loads(v) if v else None
        except ValueError:
            vals[key] = None
    w, c = vals[WORKLOAD_ATTR], vals[CONFIG_ATTR]
    return (w, c) if isinstance(w, dict) and isinstance(c, dict) else (None, None)


def _workload_key(fields: dict | None) -> str | None:
    """The tuning workload key of a tagged kernel: it and that workload's tuning records are one
    group of every split (an in-model GEMM is never tested on a model that saw its isolated timings)."""
    if fields is None:
        return None
    try:
        from qcompiler.tune.workload import Workload

        return Workload.from_fields(fields).key
    except Exception:  # noqa: BLE001 - fields of another version
        return None


def tuning_sample(rec: dict, func_cache: dict | None = None) -> dict | None:
    """Sample of a tuning record; its scheduled TIR is rebuilt from (workload, config)."""
    from qcompiler.tune.workload import Workload, config_key, normalize_config

    try:
        w = Workload.from_fields(rec["workload"])
        cfg = w.config_from_dict(rec["config"])
        func = w.make_func(cfg)
    except Exception as e:  # noqa: BLE001 - a config this generator version rejects
        from qcompiler.interrupt_guard import reraise_if_signalled

        reraise_if_signalled(e)
        return None
    try:  # the config the compiler ships today without a record (the record's flag: at its time)
        is_default = config_key(normalize_config(w, cfg)) == config_key(normalize_config(w, w.default_config()))
    except Exception:  # noqa: BLE001
        is_default = bool(rec.get("is_default"))
    return {"target": rec["target"], "text": str(func), "func": func, "workload": rec["workload"],
            "config": rec["config"], "latency_s": float(rec["median_s"]), "group": rec["workload_key"],
            "query": rec["workload_key"], "source": "tune", "is_default": is_default,
            "latencies_s": rec.get("latencies_s") or []}


def samples_from(src, models_of: dict[str, list[str]] | None = None, profiles: bool = True) -> tuple[list[dict], list[dict]]:
    """All samples of a log folder, and its model records.  ``models_of``: workload key -> models
    (default: from the profiles' model records)."""
    rec_p, prof_p = log_paths(src)
    recs = read_tuning(rec_p)
    kern, mrecs, tirs = read_profiles(prof_p) if profiles else ([], [], {})
    if models_of is None:
        models_of = {}
        for m in mrecs:
            for k in m.get("workload_keys", []):
                models_of.setdefault(k, []).append(m["model"])
    out = []
    # dedupe repeated measurements of one config: the fastest of the medians of its undisturbed
    # records (a neighbour's burst that outlasts one record's repeats only slows it); a config
    # measured only while the machine was disturbed is left out
    by_cfg: dict[tuple, list] = {}
    for r in recs:
        if not disturbed(r.get("latencies_s")):
            by_cfg.setdefault((r["workload_key"], json.dumps(r["config"], sort_keys=True)), []).append(r)
    for (_, _), rs in by_cfg.items():
        sessions = [float(x["median_s"]) for x in rs]  # each timing, in log order
        r = dict(rs[0], median_s=min(sessions))
        s = tuning_sample(r)
        if s is not None:
            s["models"] = models_of.get(r["workload_key"], [])
            s["sessions_s"] = sessions
            out.append(s)
    parsed: dict[str, object] = {}
    by_kernel: dict[tuple, list] = {}
    cb = {m["model"]: callback_s(m) for m in mrecs}
    for k in kern:
        k = dict(k, median_s=in_model_s(k, cb.get(k["model"], 0.0)))
        by_kernel.setdefault((k["model"], k["tir_sha256"]), []).append(k)
    for m in mrecs:
        m["kernel_sum_in_model_ms"] = 1e3 * sum(in_model_s(k, cb[m["model"]]) for k in kern if k["model"] == m["model"])
    for (model, sha), ks in by_kernel.items():
        if sha not in tirs:
            continue
        if sha not in parsed:
            parsed[sha] = _parse_func(tirs[sha])
        lat = float(np.median([k["median_s"] for k in ks]))  # the same kernel called several times
        wl, cfg = kernel_tags(parsed[sha], tirs[sha])
        out.append({"target": ks[0]["target"], "text": tirs[sha], "func": parsed[sha], "workload": wl,
                    "config": cfg, "latency_s": lat, "group": _workload_key(wl) or "tir:" + sha,
                    "query": "tir:" + sha,
                    "source": "profile", "models": [model], "kernel": ks[0]["kernel"], "calls": len(ks),
                    "in_model": True})
    return out, mrecs


def callback_s(mrec: dict) -> float:
    """The instrument's own cost per call (s): the mean in-model time of the VM builtin calls
    (shape checks, allocations: near-empty), an upper bound of the Python callback's share."""
    n = mrec.get("n_builtin_calls") or 0
    return mrec.get("builtin_sum_ms", 0.0) / 1e3 / n if n else 0.0


def in_model_s(k: dict, cb: float) -> float:
    """A profiled kernel's time inside the running model, the callback's cost removed, never below
    its time alone (warm operands)."""
    if k.get("in_model_median_s") is None:
        return float(k["median_s"])
    return max(float(k["in_model_median_s"]) - cb, float(k["median_s"]))


def matrix(samples: list[dict], with_ms: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(X full feature matrix, y = log seconds)."""
    X = F.featurize(samples, with_ms=with_ms)
    y = np.log(np.asarray([s["latency_s"] for s in samples], dtype=np.float64))
    return X, y


def target_of(samples: list[dict]) -> dict:
    ts = {json.dumps({k: s["target"].get(k) for k in ("kind", "arch", "device")}, sort_keys=True) for s in samples}
    if len(ts) != 1:
        raise DataError(f"the records hold {len(ts)} targets; train one model per device folder")
    t = samples[0]["target"]
    return {k: t.get(k) for k in ("kind", "arch", "device", "cores", "sm_count") if k in t}


def fit_overhead(mrecs: list[dict]) -> dict:
    """Per-call runtime overhead (VM dispatch, allocation; ms) from the profiled libraries:
    median over models of (qc bench total - sum of in-model kernel times) / kernel calls."""
    per = []
    for m in mrecs:
        if m.get("n_kernel_calls"):
            ks = m.get("kernel_sum_in_model_ms", m["kernel_sum_ms"])
            per.append(max(0.0, m["bench"]["median_ms"] - ks) / m["n_kernel_calls"])
    return {"per_call_ms": float(np.median(per)) if per else 0.0, "models": len(per)}


def finite(x: float) -> bool:
    return x == x and not math.isinf(x)
