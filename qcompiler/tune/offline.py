"""Tuning where the compiler is not: export a batch of candidates, time them there, import the results.

    qc tune MODEL --target cuda --arch sm_90 --export-candidates DIR [--candidates N]   # here
    qc measure DIR                                                                      # on the device
    qc tune --import DIR [--log LOGDIR]                                                 # here again

``DIR`` holds ``manifest.json`` and one library per candidate: CPU ``cand_NNNN.so``; CUDA
``cand_NNNN.so`` (host code + the kernel's CUDA source, which the TVM runtime compiles at load
through ``tvm_callback_cuda_compile``) plus ``cand_NNNN.K.cubin`` compiled here with nvcc, which
``qc measure`` hands to that callback (matched by the source's SHA-256) so the device needs no
compiler.  ``qc measure`` imports only the TVM runtime and NumPy, writes ``DIR/results.jsonl`` one
line per candidate (fsync'd; a rerun skips the ids already there), and ``--import`` turns the
results into records of the measured device (its name from the device itself) in the log.  The
next ``--export-candidates`` reads that log, so it proposes configs not yet measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from qcompiler import progress
from qcompiler.errors import InputError, QCError

from . import records as R

MANIFEST = "manifest.json"
RESULTS = "results.jsonl"
BATCH_SCHEMA = "qc-tune-batch/1"


def _ready_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if (out / MANIFEST).is_file() and not (out / RESULTS).exists():
            raise InputError(f"{out} already holds an unmeasured batch; run `qc measure {out}` and "
                             f"`qc tune --import {out}`, or choose an empty folder")
        if (out / MANIFEST).is_file() and not (out / ".imported").exists():
            raise InputError(f"{out} holds measured results that were not imported; run `qc tune --import {out}` first")
        if not (out / MANIFEST).is_file():
            raise InputError(f"{out} is not empty and is not a candidate folder; choose an empty folder")
        for p in out.iterdir():
            if p.name.startswith("cand_") or p.name in (MANIFEST, RESULTS, ".imported"):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def export_candidates(tasks, spec, log_dir, out_dir, count: int, repeats: int = 5, min_repeat_ms: int = 20,
                      cost_model=None) -> dict:
    """Propose ``count`` configs (spread over tasks as ``qc tune`` would), build them here, write the manifest."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput, LocalBuilder

    import tvm

    from qcompiler.targets import host_cores

    from .device import describe
    from .measure import f_build, f_export
    from .tuner import load_states
    from .workload import config_key, tir_hash

    if count < 1:
        raise QCError("--candidates must be >= 1")
    rep = progress.get()
    out = Path(out_dir)
    _ready_dir(out)
    target = describe(spec, probe_gpu=False) if spec.kind == "cuda" else describe(spec)
    if spec.kind == "cpu" and spec.mattr:  # the host's feature changes (targets.host_mattr): qc measure checks them
        target = {**target, "mattr": list(spec.mattr)}
    states, rr = load_states(tasks, log_dir, target, cost_model)
    pending = {id(s): set() for s in states}
    chosen = []
    # proposals: pending ones count as trials so that the batch spreads as a tuning run would
    for _ in range(count):
        s = pick_pending(states, pending)
        if s is None:
            break
        props = s.propose(1, pending[id(s)])
        if not props:
            continue
        c, f = props[0]
        pending[id(s)].add(config_key(c))
        chosen.append((s, c, f))
    if not chosen:
        raise QCError("nothing left to propose: every task's config space is measured")
    t0 = time.perf_counter()
    with rep.timed(f"building {len(chosen)} candidate(s) for {spec.kind} {spec.arch}"):
        if spec.kind == "cpu":  # MetaSchedule's LocalBuilder, in parallel
            mods = [tvm.IRModule({"main": f.with_attr("global_symbol", "main")}) for _, _, f in chosen]
            builder = LocalBuilder(max_workers=host_cores(), timeout_sec=300, f_build=f_build, f_export=f_export)
            built = [(b.artifact_path, b.error_msg)
                     for b in builder.build([BuilderInput(m, spec.tvm_target()) for m in mods])]
        else:  # here, so that the cubins are compiled from the very source the library carries
            built = [(None, None)] * len(chosen)
    cands = []
    for i, ((s, c, f), (art, err)) in enumerate(zip(chosen, built)):
        if err:
            rep.warn(f"{s.w.key} {config_key(c)}: build failed ({err.strip().splitlines()[-1][:200]})")
            continue
        name = f"cand_{i:04d}"
        cubins = None
        if spec.kind == "cpu":
            shutil.move(art, out / f"{name}.so")
            shutil.rmtree(os.path.dirname(art), ignore_errors=True)
            so_sha = hashlib.sha256((out / f"{name}.so").read_bytes()).hexdigest()
        else:
            try:
                cubins = _export_cuda(f, spec.arch, out, name)
            except Exception as e:  # noqa: BLE001 - TargetError from nvcc, build errors
                rep.warn(f"{s.w.key} {config_key(c)}: build failed ({str(e).strip().splitlines()[-1][:200]})")
                continue
        entry = {"id": name, "file": f"{name}.so", "workload_key": s.w.key, "workload": s.w.fields(),
                 "config": dataclasses.asdict(c), "is_default": config_key(c) == config_key(s.default),
                 "tir_sha256": tir_hash(f), "args": [[list(map(int, j[2])), str(j[1])]
                                                     for j in (ai.as_json() for ai in ArgInfo.from_prim_func(f))]}
        if cubins is not None:
            entry["cubins"] = cubins
        if spec.kind == "cpu":
            entry["sha256"] = so_sha  # qc measure checks it before loading (a truncated .so dies of SIGBUS)
        cands.append(entry)
    manifest = {"schema": BATCH_SCHEMA, "target": target, **R.versions(), "created": R.now(),
                "log": str(R.log_file(log_dir)), "repeats": repeats, "min_repeat_ms": min_repeat_ms,
                "candidates": cands}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    rep.stage(f"exported {len(cands)} candidate(s) to {out} in {time.perf_counter() - t0:.1f} s; "
              f"next: `qc measure {out}` on the device, then `qc tune --import {out}`")
    return manifest


def pick_pending(states, pending):
    from .tuner import WARMUP

    live = [s for s in states if not s.exhausted]
    if not live:
        return None
    n = lambda s: s.trials + len(pending[id(s)])  # noqa: E731
    cold = [s for s in live if n(s) < WARMUP]
    if cold:
        return min(cold, key=n)
    return max(live, key=lambda s: s.weight() * (s.trials + 2) / (n(s) + 2))


def _export_cuda(func, arch, out: Path, name: str) -> list:
    """Cross-compile one CUDA candidate: the library (with its CUDA source) and nvcc cubins of that source."""
    from qcompiler.kernels import cuda_mma as K

    lib = K.build(func, arch)
    lib.export_library(str(out / f"{name}.so"))
    res = []
    for j, src in enumerate(K.cuda_sources(lib)):
        p = out / f"{name}.{j}.cubin"
        p.write_bytes(K.compile_cubin(src, arch))
        res.append({"file": p.name, "source_sha256": hashlib.sha256(src.encode()).hexdigest()})
    return res


# ---- qc measure (TVM runtime + NumPy only) ----------------------------------------------------------
def _device_info(kind: str, dev, arch: str | None = None) -> dict:
    if kind == "cpu":  # device key as in qcompiler/tune/device.py, for the batch's LLVM CPU ``arch``
        from .device import cpu_key, cpu_model_name, host_llvm_features, isa_class, machine_cores, sanitize

        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        isa = isa_class(host_llvm_features(arch))
        mc = machine_cores()
        return {"kind": "cpu", "device": cpu_key(arch, isa, mc) if arch else f"{isa}-{mc}c",
                "isa": isa, "cores": cores, "model": sanitize(cpu_model_name())}
    from .device import sanitize

    arch = "sm_" + str(dev.compute_version).replace(".", "")
    return {"kind": "cuda", "arch": arch, "device": f"{arch}-{sanitize(str(dev.device_name))}",
            "sm_count": int(dev.multi_processor_count)}


def _random_args(args, dev, rng):
    import numpy as np
    import tvm

    out = []
    for shape, dtype in args:
        if dtype.startswith("float"):
            a = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            a = rng.integers(max(info.min, -100), min(info.max, 100), size=shape, dtype=dtype)
        out.append(tvm.runtime.tensor(a, dev))
    return out


def measure_dir(d, repeats: int | None = None, number: int = 1) -> dict:
    """Time every candidate of an exported folder on this machine; append to DIR/results.jsonl."""
    import numpy as np

    import tvm

    d = Path(d)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise InputError(f"{d}: no {MANIFEST} here (make one with `qc tune MODEL --export-candidates {d}`)")
    try:
        man = json.loads(mpath.read_text())
        assert man.get("schema") == BATCH_SCHEMA
    except (ValueError, AssertionError):
        raise InputError(f"{mpath}: not a candidate manifest of this qcompiler") from None
    kind = man["target"]["kind"]
    rep = progress.get()
    dev = tvm.cpu(0) if kind == "cpu" else tvm.cuda(0)
    current: dict = {}
    if kind == "cuda":
        if not dev.exist:
            raise InputError("no CUDA device here: `qc measure` of a CUDA batch runs on the GPU machine")
        _register_cubins(d, man, current)
    info = _device_info(kind, dev, man["target"].get("arch") if kind == "cpu" else None)
    if kind == "cpu":  # code for CPU features this one lacks would die of an illegal instruction
        from qcompiler.artifact import cpu_features, missing_cpu_features

        from .device import ISA_FEATURES

        miss = missing_cpu_features(cpu_features(man["target"].get("arch"), man["target"].get("mattr", ()))
                                    or ISA_FEATURES.get(man["target"].get("isa"), []))
        if miss:
            raise InputError(f"{d} was built for CPU '{man['target'].get('arch')}', whose instructions this CPU "
                             f"lacks ({', '.join(miss[:6])}); measure it on such a CPU")
    if kind == "cuda" and info["arch"] != man["target"]["arch"]:
        raise InputError(f"{d} was built for {man['target']['arch']}, this GPU is {info['arch']}")
    done = set()
    rpath = d / RESULTS
    if rpath.is_file():
        for line in rpath.read_bytes().splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                pass
    reps = int(repeats or man.get("repeats", 5))
    rng = np.random.default_rng(0)
    writer = R.RecordWriter(rpath)
    todo = [c for c in man["candidates"] if c["id"] not in done]
    n_ok = 0
    try:
        for c in rep.iterate(todo, len(todo), "measuring"):
            lat, err = None, None
            try:
                current["cand"] = c
                _check_candidate_file(d / c["file"], c)
                mod = tvm.runtime.load_module(str(d / c["file"]))
                args = _random_args(c["args"], dev, rng)
                ev = mod.time_evaluator("main", dev, number=number, repeat=reps,
                                        min_repeat_ms=int(man.get("min_repeat_ms", 20)))
                lat = [float(x) for x in ev(*args).results]
                n_ok += 1
            except Exception as e:  # noqa: BLE001 - recorded as the candidate's error; the rest go on
                err = "run: " + (str(e).strip().splitlines() or [type(e).__name__])[-1][:400]
                rep.warn(f"{d / c['file']}: candidate {c['id']} failed ({err[:200]}); measuring the others")
            writer.append({"id": c["id"], "latencies_s": lat, "error": err, "device": info, "timestamp": R.now(),
                           "tvm_version": tvm.__version__})
    finally:
        writer.close()
    rep.stage(f"measured {len(todo)} candidate(s) ({n_ok} ok) on {info['device']}; results in {rpath}")
    return {"dir": str(d), "measured": len(todo), "ok": n_ok, "skipped_done": len(done), "device": info}


def _check_candidate_file(path: Path, cand: dict) -> None:
    """Refuse (an exception, recorded as the candidate's error) a candidate library that is missing,
    not the one exported (SHA-256 of the manifest) or, for manifests without one, a truncated ELF
    file: loading such a file kills the process (SIGBUS) instead of raising."""
    import struct

    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing from the batch")
    raw = path.read_bytes()
    want = cand.get("sha256")
    if want is not None:
        if hashlib.sha256(raw).hexdigest() != want:
            raise ValueError(f"{path.name} is corrupt or truncated (SHA-256 differs from the manifest's)")
        return
    if raw[:4] == b"\x7fELF" and len(raw) >= 64 and raw[4] == 2:  # ELF64: section headers at the end
        shoff, = struct.unpack_from("<Q", raw, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", raw, 0x3A)
        if shoff + shentsize * shnum > len(raw):
            raise ValueError(f"{path.name} is truncated ({len(raw)} bytes)")


def _register_cubins(d: Path, man: dict, current: dict) -> None:
    import tvm_ffi

    cubins = {}
    for c in man["candidates"]:
        for cb in c.get("cubins", []):
            cubins[cb["source_sha256"]] = (d / cb["file"]).read_bytes()

    def compile_cb(code, *_):
        key = hashlib.sha256(str(code).encode()).hexdigest()
        if key in cubins:
            return bytes(cubins[key])
        cur = current.get("cand", {}).get("cubins", [])
        if len(cur) == 1:  # a differently serialized copy of the one source of the library being loaded
            return bytes(cubins[cur[0]["source_sha256"]])
        import subprocess
        import tempfile

        arch = man["target"]["arch"]
        with tempfile.TemporaryDirectory() as tmp:
            cu, o = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.cubin")
            Path(cu).write_text(str(code))
            subprocess.run(["nvcc", "-cubin", "-O3", f"-arch={arch}", "-w", "-o", o, cu], check=True)
            return Path(o).read_bytes()

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cb, override=True)


# ---- qc tune --import ------------------------------------------------------------------------------
def import_dir(d, log_dir: str | None = None) -> dict:
    from .workload import Workload, config_key

    d = Path(d)
    mpath, rpath = d / MANIFEST, d / RESULTS
    if not mpath.is_file():
        raise InputError(f"{d}: no {MANIFEST} here (not a candidate folder)")
    if not rpath.is_file():
        raise InputError(f"{d}: no {RESULTS} yet; run `qc measure {d}` on the device first")
    man = json.loads(mpath.read_text())
    cands = {c["id"]: c for c in man.get("candidates", [])}
    results, corrupt = [], 0
    for line in rpath.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if r["id"] not in cands:
                raise KeyError(r["id"])
            results.append(r)
        except (ValueError, KeyError, TypeError):
            corrupt += 1
    if not results:
        raise InputError(f"{rpath}: no readable results")
    dev = results[0]["device"]
    target = {**man["target"], **{k: v for k, v in dev.items() if k != "kind"}}
    if target.get("kind") == "cpu":
        from .device import cpu_isa, cpu_key

        target["arch"] = man["target"]["arch"]
        if not R.is_device_key(target["arch"], target.get("device")):  # results of an older qc measure
            target["isa"] = target.get("isa") or cpu_isa(target["arch"], False)
            target["device"] = cpu_key(target["arch"], target["isa"], target.get("cores"))
    if log_dir is None:
        log_dir = str(Path("autotune_logs") / target["device"])
    rr = R.read(log_dir, None, None)
    have = {(r["workload_key"], config_key(r["config"])) for r in rr.records}
    added = dup = 0
    vers = {"tvm_version": results[0].get("tvm_version", man["tvm_version"]),
            "qcompiler_version": man["qcompiler_version"]}
    with R.RecordWriter(log_dir) as w:
        for r in results:
            c = cands[r["id"]]
            key = (c["workload_key"], config_key(c["config"]))
            if key in have:
                dup += 1
                continue
            have.add(key)
            rec = R.make_record(Workload.from_fields(c["workload"]), target, c["config"], r["latencies_s"],
                                r["error"], f"offline:{d.name}", c.get("is_default", False), c.get("tir_sha256"), vers)
            rec["timestamp"] = r.get("timestamp", rec["timestamp"])
            w.append(rec)
            added += 1
    (d / ".imported").write_text(R.now() + "\n")
    progress.get().stage(f"imported {added} record(s) into {R.log_file(log_dir)} ({dup} already there, "
                         f"{corrupt} unreadable result line(s)); export again for the next batch")
    return {"log": str(R.log_file(log_dir)), "added": added, "duplicates": dup, "corrupt": corrupt}
