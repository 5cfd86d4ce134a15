"""The search: tasks from models, per-task proposals, trials spread by expected gain, records.

Per task (one workload), proposals come from its config space in this order: the default config
(so every task has its baseline), then alternately a random untried point and a neighbour of one of
the three best points so far (one field changed).  A proposal the generator rejects is skipped (not
a trial).  Configs already in the log are never proposed again.

Across tasks (``--trials N`` is the total over the tasks of this run, old records included):
every task first gets ``WARMUP`` trials, round robin; after that each batch goes to the task with
the largest

    weight = best latency so far x uses (layers running this kernel in the given models)
             x chance of improvement,  chance = (improvements + 1) / (trials + 2)

(an "improvement" is a trial that lowered the task's best by more than 1%; the Laplace estimate
decays as a task stops improving).  A task whose space is exhausted gets weight 0.

Warm start: with a cost model (``qc tune --cost-model FILE``; by default ``$QC_TUNE_COSTMODEL`` or
``costmodels/<device>.json`` when it exists for this target; ``--cost-model off`` for a cold start),
the "random untried point" becomes the next point in the model's predicted order of the task's
whole config space (its config-only booster: no TIR is built to rank; at most ``MODEL_POOL``
points, a random sample of larger spaces), so a new workload starts from the model's knowledge of
the others instead of from chance.  The measured points still feed the neighbour moves.
"""

from __future__ import annotations

import dataclasses
import random
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from qcompiler import progress
from qcompiler.errors import InputError, ModelError, QCError, TargetError

from . import records as R
from .workload import Task, Workload, config_key, distinct_configs, normalize_config, tir_hash

WARMUP = 2
BATCH = 4


@dataclass
class TaskState:
    task: Task
    measured: dict = field(default_factory=dict)    # config key -> median seconds (None: failed)
    rejected: set = field(default_factory=set)      # config keys the generator refused
    improvements: int = 0
    best: float | None = None
    best_config: dict | None = None
    default_median: float | None = None
    space: list | None = None
    rng: random.Random | None = None
    exhausted: bool = False
    model: object = None                            # a costmodel.predict.CostModel (warm start) or None
    order: list | None = None                       # the space in the model's predicted order

    @property
    def w(self) -> Workload:
        return self.task.workload

    @property
    def trials(self) -> int:
        return len(self.measured)

    def add(self, rec: dict) -> bool:
        """Fold a record in; True when it improved the best."""
        k = config_key(rec["config"])
        med = rec.get("median_s") if rec.get("error") is None else None
        self.measured[k] = med
        if rec.get("is_default") and med is not None:
            self.default_median = med
        if med is not None and (self.best is None or med < self.best):
            improved = self.best is None or med < self.best * 0.99
            self.best, self.best_config = med, rec["config"]
            if improved and self.trials > 1:
                self.improvements += 1
            return True
        return False

    def weight(self) -> float:
        if self.exhausted:
            return 0.0
        est = self.best if self.best is not None else self.w.macs / 5e11
        return est * max(1, self.task.uses) * (self.improvements + 1) / (self.trials + 2)

    def _ensure_space(self):
        if self.space is None:
            self.space = self.w.config_space()
            self.rng = random.Random(zlib.crc32(self.w.key.encode()) ^ self.trials)
            self.default = normalize_config(self.w, self.w.default_config())

    def _taken(self, c) -> bool:
        k = config_key(c)
        return k in self.measured or k in self.rejected

    def propose(self, n: int, pending: set) -> list:
        """Up to n new valid (config, func) pairs."""
        self._ensure_space()
        out = []
        tries = 0
        while len(out) < n and tries < 50 * n + 50:
            tries += 1
            c = self._next(pending, len(out) + tries)
            if c is None:
                break
            k = config_key(c)
            pending.add(k)
            try:
                func = self.w.make_func(c)
            except Exception:  # noqa: BLE001 - ValueError / KernelUnsupported: outside the valid space
                self.rejected.add(k)
                continue
            out.append((c, func))
        if not out and self._next(pending, 0) is None:
            self.exhausted = True
        return out

    def _next(self, pending: set, salt: int):
        free = lambda c: not self._taken(c) and config_key(c) not in pending  # noqa: E731
        if free(self.default):
            return self.default
        if salt % 2 == 0 and self.best_config is not None:
            tops = sorted(((m, k) for k, m in self.measured.items() if m is not None))[:3]
            import json

            for _, k in self.rng.sample(tops, len(tops)):
                base = json.loads(k)
                nb = [c for c in self._neighbours(base) if free(c)]
                if nb:
                    return self.rng.choice(nb)
        if self.model is not None:
            if self.order is None:
                self.order = model_order(self.model, self.w, self.space, self.rng)
            return next((c for c in self.order if free(c)), None)
        rest = [c for c in self.space if free(normalize_config(self.w, c))]
        if not rest:
            return None
        return normalize_config(self.w, self.rng.choice(rest))

    def _neighbours(self, base: dict) -> list:
        out = []
        for c in self.space:
            d = dataclasses.asdict(c)
            if sum(d[f] != base.get(f) for f in d) == 1:
                out.append(normalize_config(self.w, c))
        return out


MODEL_POOL = 4096


def model_order(model, w: Workload, space: list, rng: random.Random) -> list:
    """The (normalised, distinct) points of ``space`` sorted by the model's predicted latency."""
    import numpy as np

    uniq = distinct_configs(w, space)
    if len(uniq) > MODEL_POOL:
        uniq = rng.sample(uniq, MODEL_POOL)
    if not uniq:
        return []
    pred = model.predict_configs(w.fields(), [dataclasses.asdict(c) for c in uniq])
    return [uniq[i] for i in np.argsort(pred, kind="stable")]


def resolve_cost_model(arg, target: dict):
    """(CostModel or None, what was chosen): ``arg`` a file, ``off``, None/``auto`` (then
    ``$QC_TUNE_COSTMODEL``, else ``costmodels/<device>.json`` when it exists), or a CostModel
    already loaded.  A named file that is unusable (another schema, another target) is an error;
    an auto-found one that does not fit this target is skipped with the reason."""
    import os

    from costmodel.predict import CostModel, CostModelError, find_model

    if isinstance(arg, CostModel):
        return arg, f"warm start from {arg.path}"
    if arg is None or arg == "auto":
        arg = os.environ.get("QC_TUNE_COSTMODEL") or "auto"
    if arg.lower() in ("off", "none", "0"):
        return None, "cold start (--cost-model off)"
    if arg != "auto":
        return CostModel.load(arg, target), f"warm start from {arg}"
    p = find_model(target.get("device") or target.get("arch") or "")
    if p is None:
        return None, f"cold start (no costmodels/{target.get('device')}.json)"
    try:
        return CostModel.load(p, target), f"warm start from {p}"
    except CostModelError as e:
        return None, f"cold start ({e})"


# ---- models -> tasks -----------------------------------------------------------------------------
def random_calibration(model_path: str, batch: int = 1, samples: int = 4, seed: int = 0,
                       shapes: dict | None = None) -> dict:
    """Calibration data of the model's input shapes (random floats, zero integers): scales do not
    change kernel speed, and the kernels' shapes and dtypes do not depend on the values.  ``shapes``:
    complete input shapes for the dims the model leaves symbolic (``qc predict --shape``)."""
    from qcompiler import frontend

    model = frontend.read_model(model_path)
    specs = frontend.input_specs(frontend.upgrade(model, str(model_path)))
    shapes = frontend.concrete_shapes(specs, batch, shapes or {})
    rng = np.random.default_rng(seed)
    data = {}
    for s in specs:
        shp = (samples, *shapes[s.name][1:]) if shapes[s.name] else (samples,)
        if s.dtype.startswith("float"):
            data[s.name] = rng.standard_normal(shp).astype(s.dtype)
        else:
            data[s.name] = np.zeros(shp, dtype=s.dtype if s.dtype != "unknown" else "int64")
    return data


TUNE_PRECISIONS = {"int8": ("w8a8",), "w4a8": ("w4a8",), "w8a16": ("w8a16",), "mixed": ("w8a8", "w4a8", "w8a16")}
"""``qc tune --precision``: the per-layer choices (``qcompiler/mixed/plan.py`` CHOICES) whose kernels are
tuned.  ``mixed`` tunes every choice a ``--precision mixed`` compile may give each layer (the ILP's
latency of a choice is the cost model's prediction of that choice's kernel, ``qcompiler/mixed/latency.py``)."""


def _choice_graphs(prep, precision: str) -> list:
    """The integer graphs whose kernels ``precision`` tunes: the compiled INT8 graph for ``int8``, else
    one uniform-plan graph per choice (``qcompiler.mixed.latency.uniform_graph``: every layer at the
    choice where it can take it, round-to-nearest weights: kernel speed does not depend on values)."""
    from qcompiler.mixed.latency import uniform_graph

    if precision == "int8":
        return [prep.int_graph]
    return [prep.int_graph if c == "w8a8" else uniform_graph(prep.state, c) for c in TUNE_PRECISIONS[precision]]


def extract_tasks(models: list[str], spec, calib=None, batch: int = 1, precision: str = "int8") -> list[Task]:
    """The distinct tunable kernels of ``models`` compiled at ``precision`` (:data:`TUNE_PRECISIONS`)."""
    from pathlib import Path

    from qcompiler.driver import CompileOptions, prepare

    from qcompiler.kernels.cpu_vnni import ROW_BUCKETS

    from .workload import tasks_from_graph

    if precision not in TUNE_PRECISIONS:
        raise InputError(f"qc tune --precision {precision}: choose from {', '.join(TUNE_PRECISIONS)}")

    rep = progress.get()
    merged: dict[str, Task] = {}
    for m in models:
        if not Path(m).is_file():
            raise ModelError(f"{m}: no such file (give the path of an .onnx model)")
        data = calib if calib is not None else random_calibration(m, batch)
        prep = prepare(m, data, CompileOptions(target=spec, precision="int8", batch=batch))
        # dims the compile keeps symbolic: the dense kernels over them are tuned at each row bucket too
        buckets = [r for _upper, r in ROW_BUCKETS] if prep.sym_vars and spec.kind == "cpu" else []
        for ig in _choice_graphs(prep, precision):
            for t in tasks_from_graph(ig, spec, model=Path(m).name, row_buckets=buckets):
                if t.workload.key in merged:
                    merged[t.workload.key].layers += t.layers
                    merged[t.workload.key].uses += t.uses
                else:
                    merged[t.workload.key] = t
        rep.stage(f"{m}: {len(merged)} distinct tunable kernel(s) so far")
    if not merged:
        raise ModelError("no tunable conv/dense kernels in " + ", ".join(models) +
                         " (only the VNNI / AVX2 / tensor-core GEMM kernels have a config space)")
    return list(merged.values())


def check_target(spec) -> None:
    if spec.kind == "cpu":
        from qcompiler.targets import host_cpu, host_has_avx2, host_has_vnni

        if not (host_has_vnni() or host_has_avx2()):
            raise TargetError("tuning the CPU kernels needs a CPU with AVX-512 VNNI or AVX2 (this host has neither)")
        if spec.arch != host_cpu():
            raise TargetError(f"tuning measures on this machine ({host_cpu()}): leave --arch out, or tune "
                              f"on a {spec.arch} machine")


# ---- the loop ------------------------------------------------------------------------------------
def load_states(tasks: list[Task], log_dir, target: dict, cost_model=None) -> tuple[list[TaskState], R.ReadResult]:
    """Task states with the log's records folded in (skipped lines warned about) and the cost model
    of :func:`resolve_cost_model` attached (what was chosen is reported)."""
    import tvm

    rep = progress.get()
    rr = R.read(log_dir, target, tvm.__version__)
    R.refuse_foreign(rr, log_dir, target)  # never append to another device's log
    msg = rr.skipped_message()
    if msg:
        rep.warn(f"{R.log_file(log_dir)}: {msg}")
    model, why = resolve_cost_model(cost_model, target)
    rep.stage(why)
    states = [TaskState(t, model=model) for t in tasks]
    by_key = {s.w.key: s for s in states}
    for rec in rr.records:
        s = by_key.get(rec["workload_key"])
        if s is not None:
            s.add(rec)
    return states, rr


def pick(states: list[TaskState]) -> TaskState | None:
    live = [s for s in states if not s.exhausted]
    if not live:
        return None
    cold = [s for s in live if s.trials < WARMUP]
    if cold:
        return min(cold, key=lambda s: s.trials)
    return max(live, key=lambda s: s.weight())


def _fmt(sec) -> str:
    return "-" if sec is None else (f"{sec * 1e3:.3f} ms" if sec >= 1e-4 else f"{sec * 1e6:.1f} us")


def tune(tasks: list[Task], spec, log_dir, trials: int, rpc=None, repeats: int = 5, batch: int = BATCH,
         min_repeat_ms: int = 20, cost_model=None) -> dict:
    """Run until the tasks hold ``trials`` records in total (old ones count); returns a summary."""
    from .device import describe

    if trials < 1:
        raise QCError("--trials must be >= 1")
    rep = progress.get()
    target = describe(spec)
    states, rr = load_states(tasks, log_dir, target, cost_model)
    done0 = sum(s.trials for s in states)
    rep.stage(f"{len(states)} task(s), {done0} trial(s) in {R.log_file(log_dir)}, target {trials}")
    if done0 >= trials:
        return summary(states, log_dir, rr)
    from .measure import Candidate, Measurer

    meas = Measurer(spec, rpc=rpc, repeats=repeats, min_repeat_ms=min_repeat_ms)
    batch = max(batch, meas.servers)
    vers = R.versions()
    t0 = time.perf_counter()
    bar = rep.iterate(iter(range(done0, trials)), trials - done0, "tuning")
    with R.RecordWriter(log_dir) as writer:
        done = done0
        while done < trials:
            s = pick(states)
            if s is None:
                rep.stage("every task's config space is exhausted")
                break
            n = min(batch, trials - done, WARMUP - s.trials if s.trials < WARMUP else batch)
            props = s.propose(n, set())
            if not props:
                continue
            default_key = config_key(s.default)
            cands = [Candidate(s.w, c, f, tir_hash(f)) for c, f in props]
            for m in meas.measure(cands):
                cfg = dataclasses.asdict(m.candidate.config)
                rec = R.make_record(s.w, target, cfg, m.latencies, m.error, meas.measured_by,
                                    is_default=config_key(cfg) == default_key, tir_sha256=m.candidate.tir_sha256,
                                    vers=vers)
                writer.append(rec)
                s.add(rec)
                done += 1
                next(bar, None)
            el = time.perf_counter() - t0
            eta = el / max(1, done - done0) * (trials - done)
            rep.stage(f"[{states.index(s) + 1}/{len(states)}] {s.w.key}: {s.trials} trial(s), best "
                      f"{_fmt(s.best)} (default {_fmt(s.default_median)}); total {done}/{trials}, ETA {eta:.0f} s")
    for _ in bar:  # close the bar
        pass
    return summary(states, log_dir, rr)


def summary(states: list[TaskState], log_dir, rr: R.ReadResult | None = None) -> dict:
    rows = []
    for s in states:
        rows.append({"workload_key": s.w.key, "uses": s.task.uses, "trials": s.trials,
                     "errors": sum(1 for v in s.measured.values() if v is None),
                     "best_s": s.best, "default_s": s.default_median, "best_config": s.best_config,
                     "speedup": (s.default_median / s.best) if s.best and s.default_median else None})
    out = {"log": str(R.log_file(log_dir)), "tasks": rows, "trials": sum(r["trials"] for r in rows)}
    if rr is not None:
        out["skipped"] = {"corrupt": rr.corrupt, "foreign_target": rr.foreign_target, "foreign_tvm": rr.foreign_tvm}
    return out


def status(log_dir) -> dict:
    """Tasks, trials, best vs default latency per workload of a log (every target in it)."""
    import os

    import tvm

    path = R.log_file(log_dir)
    if not path.is_file():
        raise QCError(f"{path}: no tuning log here (run `qc tune MODEL --log {log_dir}` first)")
    rr = R.read(log_dir, None, None)
    groups: dict[str, list] = {}
    for r in rr.records:
        groups.setdefault(r["workload_key"], []).append(r)
    rows = []
    for key, recs in sorted(groups.items()):
        ok = [r for r in recs if r["error"] is None and r["median_s"] is not None]
        best = min(ok, key=lambda r: r["median_s"]) if ok else None
        dflt = next((r["median_s"] for r in ok if r.get("is_default")), None)
        tgt = recs[-1]["target"]
        rows.append({"workload_key": key, "trials": len(recs), "errors": len(recs) - len(ok),
                     "best_s": best["median_s"] if best else None, "default_s": dflt,
                     "best_config": best["config"] if best else None,
                     "speedup": dflt / best["median_s"] if best and dflt else None,
                     "device": tgt.get("device"),
                     "tvm_version": recs[-1]["tvm_version"]})
    other_tvm = sorted({r["tvm_version"] for r in rr.records} - {tvm.__version__})
    return {"log": str(path), "size_bytes": os.path.getsize(path), "tasks": rows,
            "trials": sum(r["trials"] for r in rows), "corrupt_lines": rr.corrupt, "other_tvm_versions": other_tvm}
