"""Search experiment: trials to 95% of the best, cold start vs warm start, on workloads not in training.

    .venv/bin/python benchmarks/costmodel_search.py collect [--pool 40]   # measure the pools (~10 min)
    .venv/bin/python benchmarks/costmodel_search.py synth --n 60 --pool 20  # random training workloads
    .venv/bin/python benchmarks/costmodel_search.py synth --small --n 30 --pool 20  # small ones
    .venv/bin/python benchmarks/costmodel_search.py eval                  # replay the strategies
    .venv/bin/python benchmarks/costmodel_search.py tune --budget 12      # real qc tune runs, cold vs warm
    .venv/bin/python benchmarks/costmodel_search.py pick                  # compile-time pick: sampled vs whole space
    .venv/bin/python benchmarks/costmodel_search.py serial                # serial twins of small workloads' best
    .venv/bin/python benchmarks/costmodel_search.py remeasure --sessions 2  # a second timing of every config (~1 h)
    .venv/bin/python benchmarks/costmodel_search.py twins   # serial vs parallel of each workload's best, re-timed together

``collect`` measures, for each held-out workload below (GEMM/conv shapes of models that are not in
the zoo: BERT-base, ViT-S/16, a 7B LLM decode step, ResNet-50, VGG, odd sizes), the default config and
``--pool - 1`` configs drawn uniformly from its config space, with the tuner's own measurer
(MetaSchedule LocalBuilder/LocalRunner, 5 timings), appending ``qc-tune/1`` records to the device log
(resumable: configs already measured are skipped).

``eval`` trains on every other workload of the log (never on these), then replays each strategy on
each pool: a strategy is an order in which it would have asked for the pool's configs; the score is
the number of measurements until one within 5% of the pool's best (latency <= best / 0.95) is found.

* random: the cold start of a config-space search with no model (mean over 500 permutations);
* MetaSchedule XGBModel, cold (``num_warmup_samples=0``, the most favourable setting; its default
  predicts at random for the first 100): a random first batch of 8, then after every batch
  ``update`` with the measured results and the next 8 are its top predictions among the rest
  (mean over 20 seeds);
* MetaSchedule's loop with our model as its cost model (``costmodel.ms_adapter``: pretrained
  prediction + online residual correction), first batch by prediction;
* ours, warm: the pretrained ranker (trained on the other workloads) orders the pool once, no
  measurement feedback; and the config-only booster that ``qc tune`` uses for its warm start;
* default first: the tuner's cold order (default config, then random).

``tune`` is the same question asked of the real tuner instead of a replay: ``qc tune``'s loop
(default config first, then proposals, neighbours of the best) runs on each held-out workload with a
fresh log, once cold (``--cost-model off``: random proposals) and once warm (the model trained without
these workloads), ``--budget`` measurements each, cold and warm back to back per workload; the score
is the trial at which the run's best came within 5% of the best latency seen for that workload
anywhere (its pool and both runs), every config scored with the median of all its measurements
(the same config measured in both runs gets one latency, so machine noise cannot favour a run).

``pick`` asks the same of ``qc compile``'s pick without measurement (:func:`pick_experiment`).

``synth`` measures random GEMM/conv workloads (TenSet-style training data) into the same log;
``remeasure`` times again the configs whose records were all taken while the machine was disturbed
(``--sessions 2``: every config of the log a second time, hours later; the labels take the faster);
``serial`` times the serial twins (``VnniConfig.parallel=False``) of each small workload's fastest
configs and its current default, for a log made before that field existed.

Writes ``benchmarks/results/costmodel_search_cpu_<device>.json``; ``--log`` picks the device log
(default: this host's), whose records name the CPU and the GEMM backend (VNNI or AVX2) of its workloads.  The pools are a uniform sample of each
space (not the full space), so "the best" is the pool's best; every latency is a real measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the device log, its CPU (workload target "cpu:<arch>") and GEMM backend: set by use_log() from
# --log (default: this host's log); the experiment's workloads are of that backend
LOG = ROOT / "autotune_logs" / "rocketlake-avx512vnni-2c"
TARGET, BACKEND = "cpu:rocketlake", "cpu_vnni"
S1, P0, P1, D1 = (1, 1), (0, 0, 0, 0), (1, 1, 1, 1), (1, 1)
U8 = ("uint8", "uint8", 0, 255)
I8 = ("int8", "int8", -128, 127)
I16 = ("int8", "int16", -32768, 32767)

# (name, kind, shape, (a_dtype, out_dtype, lo, hi), strides, pads): none of these shapes is in the zoo
HELD_OUT = [
    ("bert-base qkv", "dense", (128, 768, 768), I8, (), ()),
    ("bert-base ffn1", "dense", (128, 3072, 768), I8, (), ()),
    ("bert-base ffn2", "dense", (128, 768, 3072), I16, (), ()),
    ("vit-s/16 qkv", "dense", (197, 1152, 384), I8, (), ()),
    ("vit-s/16 mlp2", "dense", (197, 384, 1536), I16, (), ()),
    ("llm decode b8", "dense", (8, 4096, 4096), I8, (), ()),
    ("llm decode b1 ffn", "dense", (1, 11008, 4096), I8, (), ()),
    ("classifier", "dense", (16, 1000, 2048), I16, (), ()),
    ("resnet50 conv2_x 3x3", "conv2d", (1, 56, 56, 64, 64, 3, 3), U8, S1, P1),
    ("resnet50 conv3_x 3x3", "conv2d", (1, 28, 28, 128, 128, 3, 3), U8, S1, P1),
    ("resnet50 conv4_x 1x1", "conv2d", (1, 14, 14, 256, 1024, 1, 1), U8, S1, P0),
    ("resnet50 conv5_x 3x3", "conv2d", (1, 7, 7, 512, 512, 3, 3), U8, S1, P1),
    ("vgg conv 3x3", "conv2d", (1, 32, 32, 96, 192, 3, 3), U8, S1, P1),
    ("odd conv 5x5", "conv2d", (2, 19, 23, 36, 72, 5, 5), I8, (2, 2), (2, 2, 2, 2)),
]


def _draw(n: int, seed: int, label: str, macs: tuple[float, float], make) -> list:
    """``n`` distinct workloads ``make(rng)`` draws with ``macs[0] <= MACs <= macs[1]``, none equal to a
    held-out shape."""
    rng = random.Random(seed)
    held = {w.key for _, w in workloads()}
    out, keys = [], set()
    while len(out) < n:
        w = make(rng)
        if not macs[0] <= w.macs <= macs[1] or w.key in held or w.key in keys:
            continue
        keys.add(w.key)
        out.append((f"{label} {len(out)}", w))
    return out


def synthetic(n: int, seed: int = 1):
    """Random GEMM / conv workloads (TenSet-style training data; none equals a held-out shape):
    dense M in 1..512, N and K in 16..4096 (ragged sizes included), convs 1x1..5x5, stride 1-2,
    7..56 pixels, 8..512 channels; at most 3e8 MACs so one measurement stays under ~5 ms."""
    from qcompiler.tune.workload import Workload

    def make(rng):
        dt = rng.choice([U8, I8, I16, ("uint8", "int16", -32768, 32767), ("int8", "uint8", 0, 255)])
        if rng.random() < 0.5:
            M = rng.choice([1, 2, 4, 8, 16, 24, 32, 50, 64, 96, 128, 197, 256, 384, 512])
            N = rng.choice([16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1000, 1024, 1536, 2048, 3072, 4096])
            K = rng.choice([16, 36, 64, 128, 256, 384, 512, 576, 768, 1024, 1152, 2048, 3072, 4096])
            return Workload(BACKEND, "dense", (M, N, K), *dt, TARGET)
        k = rng.choice([1, 1, 3, 3, 5])
        s = rng.choice([1, 1, 2])
        H = rng.choice([7, 10, 14, 20, 28, 40, 56])
        C = rng.choice([8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512])
        OC = rng.choice([16, 24, 32, 48, 64, 96, 128, 192, 256, 512])
        p = k // 2
        return Workload(BACKEND, "conv2d", (1, H, H, C, OC, k, k), *dt, TARGET, (s, s), (p, p, p, p), D1)

    return _draw(n, seed, "synthetic", (2e4, 3e8), make)


def synthetic_small(n: int, seed: int = 3):
    """Random small GEMM / conv workloads (2.5e2..2e5 MACs: the M=1 dense heads and 3-channel first
    convs of small CNNs, which :func:`synthetic` leaves out), none equal to a held-out shape."""
    from qcompiler.tune.workload import Workload

    def make(rng):
        dt = rng.choice([U8, I8, I16, ("int8", "uint8", 0, 255)])
        if rng.random() < 0.6:
            M = rng.choice([1, 1, 1, 2, 4, 8])
            N = rng.choice([2, 4, 10, 16, 32, 48, 64, 96, 128, 256])
            K = rng.choice([16, 32, 64, 96, 128, 256, 320, 576, 1152])
            return Workload(BACKEND, "dense", (M, N, K), *dt, TARGET)
        k = rng.choice([1, 2, 3, 3])
        H = rng.choice([4, 6, 8, 12, 16, 24])
        C = rng.choice([3, 3, 4, 8, 16, 28, 32])
        OC = rng.choice([8, 16, 28, 32, 48, 64])
        p = rng.choice([0, k // 2])
        return Workload(BACKEND, "conv2d", (1, H, H, C, OC, k, k), *dt, TARGET, (1, 1), (p, p, p, p), D1)

    return _draw(n, seed, "small", (256, 2e5), make)


def workloads():
    from qcompiler.tune.workload import Workload

    out = []
    for name, kind, shape, (a, o, lo, hi), st, pd in HELD_OUT:
        conv = kind == "conv2d"
        out.append((name, Workload(BACKEND, kind, tuple(shape), a, o, lo, hi, TARGET, tuple(st) if conv else (),
                                   tuple(pd) if conv else (), D1 if conv else ())))
    return out


def use_log(path) -> None:
    """Point the experiment at the log ``path``: its records' CPU and GEMM backend (this host's when
    the log is empty or new)."""
    import collections

    from qcompiler.lowering.gemm_cpu import target_isa
    from qcompiler.targets import parse_target
    from qcompiler.tune import records as R

    global LOG, TARGET, BACKEND
    LOG = Path(path)
    seen = collections.Counter((r["target"]["arch"], r["workload"].get("backend")) for r in R.read(LOG).records)
    if seen:
        arch, backend = seen.most_common(1)[0][0]
    else:
        spec = parse_target("cpu", None)
        isa = target_isa(spec.tvm_target())
        if isa is None:
            raise SystemExit("this CPU has neither AVX-512 VNNI nor AVX2: no INT8 GEMM kernels to tune")
        arch, backend = spec.arch, isa.backend
    TARGET, BACKEND = f"cpu:{arch}", backend


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- collect ---------------------------------------------------------------------------------------
def collect(pool: int, seed: int = 0, which=None) -> None:
    from qcompiler.targets import parse_target
    from qcompiler.tune import records as R
    from qcompiler.tune.device import describe
    from qcompiler.tune.measure import Candidate, Measurer
    from qcompiler.tune.workload import config_key, distinct_configs, normalize_config, tir_hash

    spec = parse_target("cpu", None)
    target = describe(spec)
    have = {}
    for r in R.read(LOG, target).records:
        have.setdefault(r["workload_key"], set()).add(config_key(r["config"]))
    meas = Measurer(spec, repeats=5, min_repeat_ms=20)
    vers = R.versions()
    t0 = time.time()
    with R.RecordWriter(LOG) as wr:
        wls = which if which is not None else workloads()
        for wi, (name, w) in enumerate(wls):
            rng = random.Random(seed * 1000 + wi)
            uniq = distinct_configs(w, w.config_space())
            dflt = normalize_config(w, w.default_config())
            picks = [dflt] + [c for c in rng.sample(uniq, min(len(uniq), pool + 8)) if config_key(c) != config_key(dflt)]
            done = have.get(w.key, set())
            cands = []
            for c in picks:
                if len(cands) + len(done) >= pool:
                    break
                if config_key(c) in done:
                    continue
                try:
                    f = w.make_func(c)
                except Exception:  # noqa: BLE001 - outside the generator's valid space
                    continue
                cands.append(Candidate(w, c, f, tir_hash(f)))
            log(f"[{wi + 1}/{len(wls)}] {name}: space {len(uniq)}, measuring {len(cands)} (have {len(done)})")
            for i in range(0, len(cands), 4):
                for m in meas.measure(cands[i:i + 4]):
                    cfg = dataclasses.asdict(m.candidate.config)
                    wr.append(R.make_record(w, target, cfg, m.latencies, m.error, meas.measured_by,
                                            is_default=config_key(cfg) == config_key(dflt),
                                            tir_sha256=m.candidate.tir_sha256, vers=vers))
            log(f"  done, {time.time() - t0:.0f} s so far")


def remeasure(sessions: int = 1) -> None:
    """Measure again every config of the log with fewer than ``sessions`` undisturbed records
    (``records.disturbed``; 1: the configs timed only while the machine was disturbed; 2: a second,
    independent timing of every config, which the cost model's labels take the faster of, since a
    neighbour's burst that outlasts one record's repeats only slows it).  Configs are re-timed one
    workload after the other (its candidates close in time, as the tuner measures them); the new
    records are appended one by one, so an interrupted run resumes where it stopped."""
    from qcompiler.targets import parse_target
    from qcompiler.tune import records as R
    from qcompiler.tune.device import describe
    from qcompiler.tune.workload import Workload, config_key

    spec = parse_target("cpu", None)
    target = describe(spec)
    by_cfg: dict[tuple, list] = {}
    rd = R.read(LOG, target)
    if not rd.records and rd.foreign_target:
        sys.exit(f"{LOG}: its {rd.foreign_target} records are of another device than this host "
                 f"({target['device']}, {target['arch']}); re-time them on that machine")
    for r in rd.records:
        if r.get("error") is None:
            by_cfg.setdefault((r["workload_key"], config_key(r["config"])), []).append(r)
    todo = [rs[0] for rs in by_cfg.values() if sum(not R.disturbed(r["latencies_s"]) for r in rs) < sessions]
    todo.sort(key=lambda r: r["workload_key"])  # stable: a workload's configs in log order, together
    log(f"{len(todo)} of {len(by_cfg)} configs have fewer than {sessions} undisturbed timing(s): measuring them again")
    jobs = []
    for r in todo:
        w = Workload.from_fields(r["workload"])
        jobs.append((w, w.config_from_dict(r["config"]), r["config"], bool(r.get("is_default"))))
    _time_into_log(jobs, spec, target, "re-timed")


def _time_into_log(jobs: list, spec, target: dict, done_word: str = "timed") -> None:
    """Time ``jobs`` ((workload, config, the record's config dict, is_default)) with the tuner's
    measurer, 4 at a time, appending each record to the log as soon as it is measured (resumable)."""
    from qcompiler.tune import records as R
    from qcompiler.tune.measure import Candidate, Measurer
    from qcompiler.tune.workload import tir_hash

    t0 = time.time()
    meas, vers = Measurer(spec, repeats=5, min_repeat_ms=20), R.versions()
    with R.RecordWriter(LOG) as wr:
        for i in range(0, len(jobs), 4):
            job_of = {}
            for w, cfg, d, is_d in jobs[i:i + 4]:
                f = w.make_func(cfg)
                c = Candidate(w, cfg, f, tir_hash(f))
                job_of[id(c)] = (c, d, is_d)
            for m in meas.measure([c for c, _, _ in job_of.values()]):
                _, d, is_d = job_of[id(m.candidate)]
                wr.append(R.make_record(m.candidate.workload, target, d, m.latencies, m.error, meas.measured_by,
                                        is_default=is_d, tir_sha256=m.candidate.tir_sha256, vers=vers))
            if (i // 4) % 25 == 24:
                done = i + 4
                log(f"{done}/{len(jobs)} {done_word}, {(time.time() - t0) / done * (len(jobs) - done) / 60:.0f} min left")


def _records_by_workload(target: dict, keep=lambda r: True) -> dict[str, list]:
    """The log's error-free records of ``target`` that ``keep`` accepts, by workload key."""
    from qcompiler.tune import records as R

    by_w: dict[str, list] = {}
    for r in R.read(LOG, target).records:
        if r.get("error") is None and keep(r):
            by_w.setdefault(r["workload_key"], []).append(r)
    return by_w


def serial(top: int = 4) -> None:
    """Records for ``VnniConfig.parallel`` (added after the log was made): for every workload of the
    log whose space has serial configs (``SERIAL_SPACE_CYCLES``), time its ``top`` fastest configs
    run serially and its default config (serial below ``SERIAL_CYCLES``), skipping configs measured
    already (a one-tile config is the same kernel either way).  Appended one by one (resumable)."""
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import describe
    from qcompiler.tune.workload import Workload, config_key, normalize_config, tries_serial

    spec = parse_target("cpu", None)
    target = describe(spec)
    by_w = _records_by_workload(target)
    jobs = []
    for key in sorted(by_w):
        w = Workload.from_fields(by_w[key][0]["workload"])
        if not tries_serial(w):
            continue
        best: dict[str, tuple] = {}  # config key -> (fastest median, config)
        for r in by_w[key]:
            k = config_key(r["config"])
            if k not in best or r["median_s"] < best[k][0]:
                best[k] = (r["median_s"], r["config"])
        have = set(best)
        dflt = normalize_config(w, w.default_config())
        fastest = sorted(best.values(), key=lambda t: t[0])[:top]
        for c in [dflt] + [dataclasses.replace(w.config_from_dict(d), parallel=False) for _, d in fastest]:
            c = normalize_config(w, c)
            if config_key(c) not in have:
                have.add(config_key(c))
                jobs.append((w, c, dataclasses.asdict(c), config_key(c) == config_key(dflt)))
    log(f"{len(jobs)} serial / new-default configs to time on {len({w.key for w, *_ in jobs})} workloads")
    _time_into_log(jobs, spec, target)


def twins(min_s: float = 10e-6) -> None:
    """Re-time, now and side by side, every workload's fastest config together with its twin of the
    other ``parallel`` setting (its fastest serial and fastest parallel config), for workloads whose
    best takes >= ``min_s``.  Serial vs parallel is the one choice a neighbour's load decides
    wrongly: with a second process on the other core a parallel kernel waits for it, so a log tuned
    under load keeps serial kernels that a quiet machine runs ~2x faster in parallel (open-nsfw on the
    2-core Zen 5, 2026-12-06: 2.33 ms with the log's choices, 1.61 ms with every kernel parallel).
    The new records are appended (the lookup takes each config's fastest record)."""
    from qcompiler.targets import parse_target
    from qcompiler.tune.device import describe
    from qcompiler.tune.workload import Workload, config_key, normalize_config

    spec = parse_target("cpu", None)
    target = describe(spec)
    by_w = _records_by_workload(target, lambda r: "parallel" in (r.get("config") or {}))
    jobs = []
    for key in sorted(by_w):
        rs = sorted(by_w[key], key=lambda r: r["median_s"])
        if rs[0]["median_s"] < min_s:
            continue
        w = Workload.from_fields(rs[0]["workload"])
        seen = set()
        for par in (True, False):
            side = [r for r in rs if bool(r["config"]["parallel"]) == par]
            if side:
                c = normalize_config(w, w.config_from_dict(side[0]["config"]))
            else:   # the best config's twin, never measured
                c = normalize_config(w, dataclasses.replace(w.config_from_dict(rs[0]["config"]), parallel=par))
            if config_key(c) not in seen:
                seen.add(config_key(c))
                jobs.append((w, c, dataclasses.asdict(c), False))
    log(f"{len(jobs)} serial / parallel twins to re-time on {len(by_w)} workloads (best >= {min_s * 1e6:.0f} us)")
    _time_into_log(jobs, spec, target, "re-timed")


# ---- eval ------------------------------------------------------------------------------------------
def _first_hit(good: np.ndarray, order) -> int:
    return int(np.flatnonzero(good[np.asarray(order)])[0]) + 1


def _ms_context(w):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    stub = "tvm.s_tir.tensor_intrin" not in sys.modules
    if stub:
        sys.modules["tvm.s_tir.tensor_intrin"] = types.ModuleType("tvm.s_tir.tensor_intrin")
    try:
        tgt = tvm.target.Target({"kind": "llvm", "mcpu": TARGET.split(":", 1)[1], "num-cores": 2})
        return ms.TuneContext(mod=tvm.IRModule({"main": w.make_func(None)}), target=tgt)
    finally:
        if stub:
            del sys.modules["tvm.s_tir.tensor_intrin"]


def ms_loop_order(model, ctx, funcs, lat, batch: int, seed: int, random_first: bool) -> list[int]:
    """The order a MetaSchedule-style loop measures the pool in with cost model ``model``: the first
    batch random (``random_first``) or the model's top predictions, then after every batch
    ``model.update`` with the measured results and the next batch = its top predictions of the rest."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    rng = np.random.default_rng(seed)
    cands = [ms.MeasureCandidate(tvm.s_tir.Schedule(f.with_attr("global_symbol", "main")), []) for f in funcs]
    order: list[int] = []
    left = list(range(len(funcs)))
    while left:
        if order:
            done = order[-batch:]
            model.update(ctx, [cands[i] for i in done], [ms.runner.RunnerResult([float(lat[i])], None) for i in done])
        if not order and random_first:
            nxt = [int(i) for i in rng.permutation(left)[:batch]]
        else:
            sc = np.asarray(model.predict(ctx, [cands[i] for i in left]))
            nxt = [left[j] for j in np.argsort(-sc, kind="stable")[:batch]]
        order += nxt
        left = [i for i in left if i not in nxt]
    return order


def ms_xgb(seed: int):
    """MetaSchedule's XGBModel, cold, with ``num_warmup_samples=0`` (its default of 100 would keep it
    at random predictions for the whole pool)."""
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBConfig, XGBModel

    return XGBModel(num_warmup_samples=0, adaptive_training=False, verbose_eval=0,
                    config=XGBConfig(max_depth=10, gamma=0.001, min_child_weight=0, eta=0.2, seed=seed, nthread=2))


def evaluate(ms_seeds: int = 20, batch: int = 8) -> dict:
    from costmodel import data as D
    from costmodel import features as F
    from costmodel import train as T
    from costmodel.ms_adapter import ms_cost_model

    held = {w.key: name for name, w in workloads()}
    samples, _ = D.samples_from(LOG)
    X, y = D.matrix(samples)
    is_held = np.asarray([s["source"] == "tune" and s["query"] in held for s in samples])
    pools = sorted({samples[i]["query"] for i in np.flatnonzero(is_held)})
    if not pools:
        raise SystemExit("no held-out pools in the log: run `benchmarks/costmodel_search.py collect` first")
    tr = np.flatnonzero(~is_held)
    qids = np.asarray([s["query"] for s in samples])
    log(f"training on {len(tr)} samples ({len({qids[i] for i in tr if samples[i]['source'] == 'tune'})} "
        f"workloads), {len(pools)} held-out pools")
    cm = train_without_held_out([samples[i] for i in tr], X[tr], y[tr])
    cc = F.columns(T.CFG)
    rng = np.random.default_rng(0)
    rows = []
    for key in pools:
        ii = np.flatnonzero(is_held & (qids == key))
        lat = np.exp(y[ii])
        good = lat <= lat.min() / 0.95
        rank_order = np.argsort(-cm.score(X[ii]), kind="stable")
        cfg_order = np.argsort(cm.predict_cfg(X[ii][:, cc]), kind="stable")
        pred = cm.predict(X[ii])[0]
        dflt = [k for k, i in enumerate(ii) if samples[i].get("is_default")]
        rand = [_first_hit(good, rng.permutation(len(ii))) for _ in range(500)]
        dfirst = [_first_hit(good, dflt + [k for k in rng.permutation(len(ii)) if k not in dflt]) for _ in range(500)]
        from qcompiler.tune.workload import Workload

        w = Workload.from_fields(samples[ii[0]]["workload"])
        ctx = _ms_context(w)
        funcs = [samples[i]["func"] for i in ii]
        ms_hits = [_first_hit(good, ms_loop_order(ms_xgb(s), ctx, funcs, lat, batch, s, True)) for s in range(ms_seeds)]
        ours_ms = _first_hit(good, ms_loop_order(ms_cost_model(cm), ctx, funcs, lat, batch, 0, False))
        best_k = {k: float(lat.min() / lat[rank_order[:k]].min()) for k in (1, 2, 4, 8)}
        row = {"workload": held[key], "key": key, "pool": int(len(ii)), "good_in_pool": int(good.sum()),
               "best_ms": float(lat.min() * 1e3), "default_over_best": float(lat[dflt[0]] / lat.min()) if dflt else None,
               "random": float(np.mean(rand)), "metaschedule_xgb_cold": float(np.mean(ms_hits)),
               "metaschedule_with_ours": ours_ms,
               "default_first": float(np.mean(dfirst)), "ours_ranker_warm": _first_hit(good, rank_order),
               "ours_cfg_warm": _first_hit(good, cfg_order), "ours_best_of_k": best_k,
               "mape": float(np.mean(np.abs(pred - lat) / lat))}
        rows.append(row)
        log(f"{held[key]:24s} pool {len(ii):3d} good {good.sum():3d}: random {row['random']:.1f}  MS-cold "
            f"{row['metaschedule_xgb_cold']:.1f}  MS+ours {ours_ms}  default-first {row['default_first']:.1f}  ours "
            f"{row['ours_ranker_warm']} (cfg-only {row['ours_cfg_warm']})  mape {row['mape']:.3f}")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in
            ("random", "metaschedule_xgb_cold", "metaschedule_with_ours", "default_first", "ours_ranker_warm",
             "ours_cfg_warm", "mape")}
    summ = {"workloads": len(rows), "mean_pool": float(np.mean([r["pool"] for r in rows])), "mean_trials": mean,
            "ratio_ms_cold_over_ours": mean["metaschedule_xgb_cold"] / mean["ours_ranker_warm"],
            "ratio_ms_cold_over_ms_with_ours": mean["metaschedule_xgb_cold"] / mean["metaschedule_with_ours"],
            "ratio_random_over_ours": mean["random"] / mean["ours_ranker_warm"],
            "ratio_default_first_over_ours": mean["default_first"] / mean["ours_ranker_warm"],
            "ours_first_try_hits": float(np.mean([r["ours_ranker_warm"] == 1 for r in rows])),
            "ours_top1_score": float(np.mean([r["ours_best_of_k"][1] for r in rows]))}
    return {"summary": summ, "rows": rows, "ms_batch": batch, "ms_seeds": ms_seeds}


# ---- real tuner runs -----------------------------------------------------------------------------
def tune_real(budget: int, model_path: str, work: Path) -> dict:
    """``qc tune``'s own loop on each held-out workload, cold (``--cost-model off``) then warm (the
    model trained without these workloads), ``budget`` measurements each, fresh logs; trials to 95%
    of the best latency seen for the workload anywhere (its pool and both runs)."""
    from qcompiler.targets import parse_target
    from qcompiler.tune import records as R
    from qcompiler.tune.device import describe
    from qcompiler.tune.tuner import tune
    from qcompiler.tune.workload import Task

    from qcompiler.tune.workload import config_key

    spec = parse_target("cpu", None)
    target = describe(spec)
    seen: dict = {}  # (workload, config) -> every median measured for it (pool + both runs)
    for r in R.read(LOG, target).records:
        if r["median_s"] is not None:
            seen.setdefault((r["workload_key"], config_key(r["config"])), []).append(r["median_s"])
    from costmodel.predict import CostModel

    warm = CostModel.load(model_path, target)
    rows = []
    for name, w in workloads():
        seqs = {}
        for arm, cm in (("cold", "off"), ("warm", warm)):
            d = work / arm / w.key.replace("/", "_").replace(">", "").replace("[", "").replace("]", "")
            tune([Task(w, [], 1)], spec, d, budget, cost_model=cm)  # returns at once when d holds the budget
            recs = R.read(d, target).records[:budget]
            seqs[arm] = [config_key(r["config"]) for r in recs]
            for r in recs:
                if r["median_s"] is not None:
                    seen.setdefault((w.key, config_key(r["config"])), []).append(r["median_s"])
        # one latency per config (the median of all its measurements): the same config measured in
        # both runs must not count as faster in one of them because the machine was quieter then
        lat = {k: float(np.median(v)) for (wk, k), v in seen.items() if wk == w.key}
        curves = {arm: np.minimum.accumulate([lat.get(k, np.inf) for k in seq]).tolist() for arm, seq in seqs.items()}
        ref = min(lat.values())
        hit = {arm: next((i + 1 for i, v in enumerate(c) if v <= ref / 0.95), None) for arm, c in curves.items()}
        row = {"workload": name, "key": w.key, "best_ms": ref * 1e3,
               "trials_to_95": hit, "best_after": {arm: {k: ref / c[min(k, len(c)) - 1] for k in (1, 2, 4, 8, budget)}
                                                  for arm, c in curves.items()}}
        rows.append(row)
        log(f"{name:24s} trials to 95%: cold {hit['cold']}  warm {hit['warm']}   best/found after 4: "
            f"cold {row['best_after']['cold'][4]:.3f} warm {row['best_after']['warm'][4]:.3f}")
    cen = budget + 1  # a run that never got within 5% counts as budget + 1 (a lower bound)
    mean = {arm: float(np.mean([r["trials_to_95"][arm] or cen for r in rows])) for arm in ("cold", "warm")}
    return {"budget": budget, "rows": rows, "mean_trials_to_95": mean,
            "never_reached": {arm: int(sum(r["trials_to_95"][arm] is None for r in rows)) for arm in ("cold", "warm")},
            "ratio_cold_over_warm": mean["cold"] / mean["warm"],
            "mean_best_after": {arm: {k: float(np.mean([r["best_after"][arm][k] for r in rows]))
                                      for k in (1, 2, 4, 8, budget)} for arm in ("cold", "warm")},
            "note": f"never within 5% in {budget} trials counts as {cen}"}


def train_without_held_out(samples, X, y, calibration=None):
    """The deployed model's boosters trained on ``samples`` (every record but the held-out ones)."""
    from costmodel import train as T
    from costmodel.predict import CostModel

    return CostModel(T.train(samples, X, y, calibration=calibration, calibrate_band=False))


def heldout_model(path: Path) -> None:
    """:func:`train_without_held_out` on the log, saved for the tuner runs."""
    from costmodel import data as D

    held = {w.key for _, w in workloads()}
    samples, mrecs = D.samples_from(LOG)
    keep = [s for s in samples if s["query"] not in held]
    X, y = D.matrix(keep)
    train_without_held_out(keep, X, y, D.fit_overhead(mrecs)).save(path)


def pick_experiment(model_path: str) -> dict:
    """The compile-time pick (no measurement) on the held-out workloads, with the model trained
    without them: the predicted fastest of 48 sampled configs (``qc compile``'s pick before this
    experiment) vs of the whole config space (its pick since); both picks and the default are measured
    and scored against the best config of the workload's measured pool (best / pick: 1.0 = as fast)."""
    from costmodel.predict import CostModel
    from qcompiler.targets import parse_target
    from qcompiler.tune import records as R
    from qcompiler.tune.apply import candidate_pool, pick_order
    from qcompiler.tune.device import describe
    from qcompiler.tune.measure import Candidate, Measurer

    spec = parse_target("cpu", None)
    target = describe(spec)
    cm = CostModel.load(model_path, target)
    pool_best: dict[str, float] = {}
    for r in R.read(LOG, target).records:
        if r.get("error") is None and not R.disturbed(r["latencies_s"]):
            pool_best[r["workload_key"]] = min(pool_best.get(r["workload_key"], 1.0), r["median_s"])
    meas = Measurer(spec, repeats=5, min_repeat_ms=20)
    rows = []
    for name, w in workloads():
        space = candidate_pool(w)
        picks = {"default": space[0]}
        for arm, cands in (("sampled", candidate_pool(w, 48)), ("whole_space", space)):  # 48: qc compile's old pick
            pred = cm.predict_configs(w.fields(), [dataclasses.asdict(c) for c in cands], target)
            picks[arm] = cands[pick_order(pred)[0]]
        cl = {arm: Candidate(w, c, w.make_func(c)) for arm, c in picks.items()}
        arm_of = {id(c): arm for arm, c in cl.items()}
        lat = {}
        for m in meas.measure(list(cl.values())):
            lat[arm_of[id(m.candidate)]] = float(np.median(m.latencies)) if m.latencies else float("nan")
        best = min([pool_best.get(w.key, np.inf)] + list(lat.values()))
        rows.append({"workload": name, "space": len(space), **{f"{k}_s": v for k, v in lat.items()},
                     **{f"{k}_score": best / v for k, v in lat.items()}})
        log(f"{name}: " + ", ".join(f"{k} {best / v:.3f}" for k, v in lat.items()))
    return {"rows": rows, **{f"mean_score_{k}": float(np.mean([r[f"{k}_score"] for r in rows]))
                            for k in ("default", "sampled", "whole_space")},
            "note": "score = best time seen for the workload (its measured pool and these picks) / the pick's "
                    "time; model trained without these workloads; no measurement in the pick itself"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["collect", "synth", "remeasure", "serial", "twins", "eval", "tune", "pick"])
    ap.add_argument("--budget", type=int, default=12, help="tune: measurements per workload and arm")
    ap.add_argument("--work", default=None, help="tune: folder of the runs' logs (reused when it holds them)")
    ap.add_argument("--n", type=int, default=60, help="synth: number of random workloads")
    ap.add_argument("--pool", type=int, default=40)
    ap.add_argument("--small", action="store_true", help="synth: small workloads (M=1 heads, first convs)")
    ap.add_argument("--sessions", type=int, default=1,
                    help="remeasure: re-time every config with fewer undisturbed timings than this")
    ap.add_argument("--log", default=None, help="device log (default: this host's, autotune_logs/<device>/)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/costmodel_search_cpu_<device>.json")
    a = ap.parse_args()
    if a.log is None:
        from qcompiler.targets import parse_target
        from qcompiler.tune.device import default_log_dir

        a.log = default_log_dir(parse_target("cpu", None), ROOT / "autotune_logs")
    use_log(a.log)
    a.out = a.out or str(ROOT / "benchmarks" / "results" / f"costmodel_search_cpu_{Path(a.log).name}.json")
    if a.mode == "collect":
        collect(a.pool)
        return
    if a.mode == "synth":
        collect(a.pool, seed=7, which=synthetic_small(a.n) if a.small else synthetic(a.n))
        return
    if a.mode == "remeasure":
        remeasure(a.sessions)
        return
    if a.mode == "serial":
        serial()
        return
    if a.mode == "twins":
        twins()
        return
    t0 = time.time()
    if a.mode in ("tune", "pick"):
        import tempfile

        work = Path(a.work or tempfile.mkdtemp(prefix="qc_search_"))
        mp = work / "heldout_model.json"
        if not mp.is_file():
            heldout_model(mp)
        log(f"model without the held-out workloads: {mp}")
        res = tune_real(a.budget, str(mp), work) if a.mode == "tune" else pick_experiment(str(mp))
        prev = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
        prev["qc_tune_runs" if a.mode == "tune" else "compile_time_pick"] = {
            **res, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - t0, 1)}
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(prev, indent=1) + "\n")
        os.replace(tmp, a.out)
        keys = (("mean_trials_to_95", "never_reached", "ratio_cold_over_warm", "mean_best_after") if a.mode == "tune"
                else ("mean_score_default", "mean_score_sampled", "mean_score_whole_space"))
        print(json.dumps({k: res[k] for k in keys}, indent=1))
        return
    res = evaluate()
    from qcompiler.tune.device import cpu_model_name

    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": cpu_model_name(), "cores": os.cpu_count()}, "log": os.path.relpath(LOG, ROOT),
           "criterion": "measurements until a config with latency <= pool best / 0.95 is found", **res,
           "seconds": round(time.time() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    for k in ("qc_tune_runs", "compile_time_pick"):  # measured runs (tune / pick modes): kept
        if k in old:
            doc[k] = old[k]
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, a.out)
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
