"""The ``qc`` command line: compile, run, inspect, bench (tune, predict, costmodel: see their modules).

Every user-facing problem is a ``QCError`` raised where it is found; here it becomes one line on
stderr and exit code 2.  Anything else (a bug) becomes one ``InternalError`` line, exit code 2, never
a traceback; Python warnings go to the progress reporter (silent with -q).  Outputs are written
atomically, so an error or Ctrl-C leaves no partial file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from . import progress
from .errors import InputError, QCError, internal
from .interrupt_guard import SIGNALLED as _SIGNALLED  # the signals received while a command runs



def _dim_range(r: dict) -> str:
    """A symbolic dim's range as ``--shape`` writes it: lo..hi, with :step where sizes are multiples of a step."""
    return f"{r['min']}..{r['max']}" + (f":{r['step']}" if r.get("step", 1) > 1 else "")

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qc", description="qcompiler: ONNX -> integer-only TVM libraries")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile an ONNX model to model.so + model.json")
    c.add_argument("model", help="the .onnx file")
    c.add_argument("-o", "--output", required=True, help="library path, e.g. model.so (model.json goes beside it)")
    c.add_argument("--target", default="cpu", help="cpu (this host, LLVM) or cuda")
    c.add_argument("--arch", default=None, help="CUDA arch: sm_75, sm_80, sm_86, sm_89, sm_90; for --target cpu an LLVM CPU name (default: this host's)")
    c.add_argument("--precision", default="int8", choices=["int8", "w4a8", "mixed", "int4"],
                   help="int8 (default); w4a8: 4-bit weights (GPTQ rounding), 8-bit activations; mixed: per "
                        "layer W8A8 / W4A8 / W8A16 chosen by an ILP (latency / size budgets); int4: W4A4 where "
                        "the target has native s4")
    from .mixed.cli import add_compile_flags

    add_compile_flags(c)
    c.add_argument("--calib", default=None, help=".npz keyed by input names, or a folder of them (which axis holds the samples: README, --calib)")
    c.add_argument("--calib-method", default="percentile", choices=["minmax", "percentile", "mse"])
    c.add_argument("--batch", type=int, default=1, help="batch size the library is compiled for (default 1)")
    c.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS",
                   help="input dims: 1..32 keeps a dim symbolic over that range (one library for every size), "
                        "a number fixes it, ? as declared; e.g. input_ids=1..32x1..256 (repeatable). Without it, "
                        "dims the model declares symbolic (other than the batch) stay symbolic over 1..2048 or the "
                        "bound the model sets, where they can")
    c.add_argument("--static-shapes", action="store_true",
                   help="fix every dim --shape leaves open at its size in the calibration samples (one shape)")
    c.add_argument("--io", default="float", choices=["float", "int"],
                   help="float: quantize/dequantize inside the library (default); int: integer inputs/outputs")
    c.add_argument("--softmax", default="iexp", choices=["iexp", "shift"], help="integer softmax: I-BERT i-exp or I-ViT Shiftmax")
    c.add_argument("--gelu", default="igelu", choices=["igelu", "shift", "lut"],
                   help="integer GELU: I-BERT i-GELU (default), I-ViT ShiftGELU, or an exact table (8-bit inputs)")
    c.add_argument("--smooth", type=float, default=0.5, metavar="ALPHA",
                   help="per-channel smoothing of Dense inputs (SmoothQuant alpha, default 0.5; 0 = off)")
    c.add_argument("--allow-float", action="store_true",
                   help="keep ops without an integer form in float islands (dequantize -> float op -> quantize); "
                        "the library is then not integer-only (model.json and qc inspect list the islands)")
    c.add_argument("--no-kernels", action="store_true", help="generic schedules only (debugging)")
    c.add_argument("--dump", default=None, metavar="DIR", help="write the integer graph, TIR, generated source and cubins")
    c.add_argument("--json", action="store_true", help="print the metadata summary as JSON")

    r = sub.add_parser("run", help="run a compiled library on inputs from an .npz")
    r.add_argument("library")
    r.add_argument("--inputs", required=True, help=".npz keyed by input names")
    r.add_argument("-o", "--output", required=True, help=".npz to write, keyed by ONNX output names")

    i = sub.add_parser("inspect", help="show a library's metadata and prove it integer-only from its TIR")
    i.add_argument("library")
    i.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="time a library with the TVM runtime")
    b.add_argument("library")
    b.add_argument("--batch", type=int, default=None, help="must equal the compiled batch (recompile otherwise)")
    b.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS",
                   help="a library with symbolic dims: time random inputs of this shape (e.g. input_ids=4x128)")
    b.add_argument("--repeats", type=int, default=30)
    b.add_argument("--inputs", default=None, help=".npz of inputs (default: random)")
    b.add_argument("--threads", type=int, default=None,
                   help="CPU worker threads (sets TVM_NUM_THREADS; default: the TVM runtime's, which on x86 is "
                        "half the logical CPUs; tuning records and qc predict are at that default)")
    b.add_argument("--profile", action="store_true",
                   help="per-kernel table: category, layer, ms, share, GOPS / bytes; time by category (qcompiler/bench_profile.py)")
    b.add_argument("--json", action="store_true")

    _tune_parsers(sub)
    _costmodel_parsers(sub)
    from .mixed.cli import add_parsers as _mixed_parsers

    _mixed_parsers(sub)
    return p


def _costmodel_parsers(sub) -> None:
    cm = sub.add_parser("costmodel", help="train / evaluate the learned latency model (costmodel/)")
    cs = cm.add_subparsers(dest="cm_cmd", required=True)
    tr = cs.add_parser("train", help="train on tuning logs: qc costmodel train autotune_logs/<device>/ -o costmodels/<device>.json")
    tr.add_argument("logs", help="a log folder (records.jsonl + profiles.jsonl) or a records.jsonl")
    tr.add_argument("-o", "--output", required=True, help="model file (JSON: XGBoost models + feature schema)")
    tr.add_argument("--families", default="structural", choices=["all", "structural", "text"],
                    help="feature families (default structural: the best of the ablation in "
                         "benchmarks/results/costmodel_cpu_intel-xeon-processor.json; all adds the TIR-text n-grams)")
    tr.add_argument("--json", action="store_true")
    ev = cs.add_parser("eval", help="group k-fold (by workload) metrics of the model's recipe on a log")
    ev.add_argument("logs", help="a log folder or records.jsonl")
    ev.add_argument("--folds", type=int, default=5)
    ev.add_argument("--families", default="structural", choices=["all", "structural", "text"])
    ev.add_argument("--json", action="store_true")

    pr = sub.add_parser("predict", help="predict per-kernel and whole-model latency without running the model")
    pr.add_argument("model", help="the .onnx file")
    pr.add_argument("--target", default="cpu", help="cpu or cuda")
    pr.add_argument("--arch", default=None, help="CUDA arch: sm_75, sm_80, sm_86, sm_89, sm_90; for --target cpu an LLVM CPU name (default: this host's)")
    pr.add_argument("--precision", default="int8", help="int8 (default), w4a8 or mixed, as in qc compile")
    pr.add_argument("--calib", default=None, help="as in qc compile (default: random data of the input shapes)")
    pr.add_argument("--batch", type=int, default=1)
    pr.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS",
                    help="predict at these input shapes (e.g. input_ids=1x128; random data of that shape)")
    pr.add_argument("--cost-model", default=None, metavar="FILE",
                    help="model file (default costmodels/<device>.json; none: roofline estimate)")
    pr.add_argument("--json", action="store_true", help='print {"total_ms": ..., "layers": [...], ...}')
    pr.add_argument("--plot", default=None, metavar="OUT.png", help="bar chart of the per-kernel predictions")


def _tune_parsers(sub) -> None:
    t = sub.add_parser("tune", help="tune the conv/dense kernels of models for a target (records in autotune_logs/)",
                       description="qc tune MODEL... [--trials N] | --status DIR | MODEL... --export-candidates DIR | "
                                   "--import DIR")
    t.add_argument("models", nargs="*", help=".onnx files (their distinct kernels are the tasks)")
    t.add_argument("--target", default="cpu", help="cpu (this host) or cuda")
    t.add_argument("--arch", default=None, help="CUDA arch: sm_75, sm_80, sm_86, sm_89, sm_90; for --target cpu an LLVM CPU name (default: this host's)")
    t.add_argument("--precision", default="int8",
                   help="int8 (default), w4a8, w8a16 (every layer at that choice) or mixed (all three kernels of every layer)")
    t.add_argument("--calib", default=None, help="as in qc compile (default: random data; scales do not change speed)")
    t.add_argument("--batch", type=int, default=1, help="batch size the models are compiled for (default 1)")
    t.add_argument("--trials", type=int, default=200, help="total measured configs over all tasks, old records included")
    t.add_argument("--log", default=None, metavar="DIR", help="tuning log folder (default autotune_logs/<device-name>/)")
    t.add_argument("--repeats", type=int, default=5, help="timings per candidate (the median is used)")
    t.add_argument("--min-repeat-ms", type=int, default=20, help="minimum duration of one timing")
    t.add_argument("--batch-size", type=int, default=4, help="candidates built in parallel per round")
    t.add_argument("--cost-model", default=None, metavar="FILE|off",
                   help="warm start: propose configs in this model's predicted order (default "
                        "$QC_TUNE_COSTMODEL or costmodels/<device>.json when present; off: cold start)")
    t.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="measure through a TVM RPC tracker")
    t.add_argument("--rpc-key", default=None, help="key of the RPC servers to use")
    t.add_argument("--status", default=None, metavar="DIR", help="show tasks, trials, best vs default per kernel of a log")
    t.add_argument("--export-candidates", default=None, metavar="DIR", help="build a batch of candidates into DIR")
    t.add_argument("--candidates", type=int, default=32, help="batch size of --export-candidates")
    t.add_argument("--import", dest="import_dir", default=None, metavar="DIR",
                   help="append the results of `qc measure DIR` to the log")
    t.add_argument("--json", action="store_true")

    m = sub.add_parser("measure", help="time exported tuning candidates with the TVM runtime (writes DIR/results.jsonl)")
    m.add_argument("dir", help="folder made by qc tune --export-candidates")
    m.add_argument("--repeats", type=int, default=None, help="timings per candidate (default: the manifest's)")
    m.add_argument("--json", action="store_true")


def cmd_tune(a) -> int:
    from .tune import cli as tune_cli

    return tune_cli.run_tune(a)


def cmd_measure(a) -> int:
    from .tune import cli as tune_cli

    return tune_cli.run_measure(a)


def cmd_compile(a) -> int:
    from .driver import CompileOptions, compile_model
    from .targets import parse_target

    from .mixed.cli import mixed_options

    spec = parse_target(a.target, a.arch)
    opts = CompileOptions(target=spec, precision=a.precision, batch=a.batch, method=a.calib_method, io=a.io,
                          softmax=a.softmax, gelu=a.gelu, smooth=a.smooth, use_kernels=not a.no_kernels,
                          dump_dir=a.dump, allow_float=a.allow_float, mixed=mixed_options(a),
                          shapes=tuple(a.shape), dims="static" if a.static_shapes else "auto")
    meta = compile_model(a.model, a.output, a.calib, opts)
    summary = {"library": str(a.output), "metadata": str(Path(a.output).with_suffix(".json")),
               "target": meta["target"], "layers": len(meta["layers"]), "kernels": meta["kernels"]["count"],
               "integer_only": meta["integer_only"], "float_islands": meta["float_islands"],
               "precision": meta["precision"], "weight_bytes": meta["weight_bytes"],
               "mixed_precision": meta.get("mixed_precision"), "symbolic_dims": meta.get("symbolic_dims"),
               "fixed_dims": meta.get("fixed_dims"), "timings_s": meta["timings_s"]}
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        islands = [r for r in meta["float_islands"] if r["node"]]
        from .mixed.cli import precision_summary

        print(f"wrote {a.output} ({meta['kernels']['count']} kernels, {len(meta['layers'])} GEMM/conv layers, "
              + precision_summary(meta)
              + (f"{len(islands)} float island(s), " if islands else "")
              + "".join(f"dim {k} {_dim_range(r)}, " for k, r in (meta.get("symbolic_dims") or {}).items())
              + "".join(f"dim {k} fixed at {r['size']}, " for k, r in (meta.get("fixed_dims") or {}).items())
              + f"{meta['timings_s']['total']:.1f} s)")
    return 0


def _save_npz(path: str, arrays: dict) -> None:
    import numpy as np

    from .artifact import atomic_paths, check_writable

    out = check_writable(path)
    if out.suffix != ".npz":
        raise InputError(f"{out}: the output must be an .npz file")
    with atomic_paths(out) as (tmp,):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _load_npz(path: str) -> dict:
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such input file (give an .npz keyed by input names)")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise InputError(f"{p}: not a readable .npz ({type(e).__name__})") from None


def cmd_run(a) -> int:
    from .runtime import Library

    lib = Library(a.library)
    outs = lib(**_load_npz(a.inputs))
    _save_npz(a.output, outs)
    progress.get().stage(f"wrote {a.output}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in outs.items()))
    return 0


def cmd_inspect(a) -> int:
    from .inspect_lib import inspect_library

    rep = inspect_library(a.library)
    if a.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(f"library      {a.library}")
    print(f"target       {rep['target']['kind']} {rep['target']['arch']}")
    print(f"precision    {rep['precision']}  (io: {rep['io']}, batch {rep['batch']})")
    for side in ("inputs", "outputs"):
        for e in rep[side]:
            sc = f" scale={e['scale']:.6g} ({e.get('quant_dtype')})" if "scale" in e else ""
            print(f"{side[:-1]:<12} {e['name']}: {e['dtype']}{e['shape']}{sc}")
    for name, r in (rep.get("symbolic_dims") or {}).items():
        print(f"symbolic dim {name}: {_dim_range(r)} (calibrated at {r['calibrated']}; "
              + ", ".join(f"{i} axis {ax}" for i, ax in r["where"]) + ")")
    for name, r in (rep.get("fixed_dims") or {}).items():
        print(f"fixed dim    {name} = {r['size']} (declared symbolic; " + ", ".join(f"{i} axis {ax}" for i, ax in r["where"])
              + f"): {r['reason']}")
    print(f"integer-only {'yes' if rep['integer_only'] else 'NO'}  ({rep['kernels']} kernels scanned, "
          f"{rep['float_kernels_between_boundaries']} with float ops between the entry quantize and exit dequantize)")
    if rep["float_kernels"]:
        print("float kernels: " + ", ".join(rep["float_kernels"][:10]))
    for r in rep["float_islands"]:
        what = f"{r['node']} ({r['op']}: {r.get('reason') or 'no integer form'})" if r["node"] else "(no node)"
        print(f"float island {what}: kernels {', '.join(r['kernels']) or '-'}")
    print(f"unscheduled  {len(rep['unscheduled'])}" + (": " + ", ".join(rep["unscheduled"][:10]) if rep["unscheduled"] else ""))
    if all("weight_bytes" in r for r in rep["layers"]):
        print(f"weights      {sum(r['weight_bytes'] for r in rep['layers'])} bytes (conv/dense weights at their bits)")
    print("layers:")
    for layer in rep["layers"]:
        print(f"  {layer['name']:<48} {layer['op']:<7} {layer['input_dtype']:>6} x int{layer['weight_bits'] or 8} -> "
              f"{layer['output_dtype']:<6} {layer['out_shape']}")
    return 0


def cmd_bench(a) -> int:
    if a.threads is not None:
        if a.threads < 1:
            raise InputError(f"--threads {a.threads}: give a positive number of CPU threads")
        os.environ["TVM_NUM_THREADS"] = str(a.threads)  # read when the runtime's thread pool starts
    from .runtime import Library

    lib = Library(a.library)
    if a.batch is not None and a.batch != lib.batch:
        raise InputError(f"{a.library} is compiled for batch {lib.batch}; recompile with --batch {a.batch} "
                         "to time that batch")
    inputs = _load_npz(a.inputs) if a.inputs else None
    if a.shape:
        if inputs is not None:
            raise InputError("give --inputs or --shape, not both")
        inputs = lib.example_inputs(shapes=_bench_shapes(a.shape))
    if a.profile:
        from .bench_profile import format_table, profile

        p = profile(lib, lib._feeds((), inputs) if inputs else None, runs=max(5, min(a.repeats, 30)),
                    bench_repeats=a.repeats)
        print(json.dumps(p, indent=1) if a.json else format_table(p))
        return 0
    r = lib.bench(inputs, repeats=a.repeats)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{a.library}: median {r['median_ms']:.3f} ms  (p10 {r['p10_ms']:.3f}, p90 {r['p90_ms']:.3f}, "
              f"{r['repeats']} repeats, batch {r['batch']}, {r['device']}"
              + (f", {r['threads']} thread{'s' * (r['threads'] > 1)})" if r.get("threads") else ")"))
    return 0


def _bench_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    from .shape_spec import DimRange, parse

    out = {}
    for name, dims in parse(specs).items():
        if any(d is None or isinstance(d, DimRange) for d in dims):
            raise InputError(f"--shape {name}: give every dim a size to time (e.g. {name}=4x128)")
        out[name] = tuple(dims)
    return out


def cmd_costmodel(a) -> int:
    from costmodel import cli as cm_cli

    return cm_cli.run_costmodel(a)


def cmd_predict(a) -> int:
    from costmodel import cli as cm_cli

    return cm_cli.run_predict(a)


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "inspect": cmd_inspect, "bench": cmd_bench,
            "tune": cmd_tune, "measure": cmd_measure, "costmodel": cmd_costmodel, "predict": cmd_predict,
            "mixed-precision": lambda a: __import__("qcompiler.mixed.cli", fromlist=["run"]).run(a)}


def _warning_to_reporter(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).splitlines()[0] if str(message) else ""
    progress.get().warn(f"{category.__name__}: {text}")


@contextlib.contextmanager
def _native_stderr_held(quiet: bool):
    """Hold what native code (TVM's C++ log, onnxruntime's logger) writes to file descriptor 2 while a
    command runs, so a failure prints our one line and not also, say, TVM's "BlockBuilder destroyed
    with remaining blocks" warning from the half-built module.  Python's own stderr (progress, the
    error line) is unaffected.  The held text is written out after a success, and after a failure
    unless -q."""
    try:
        sys.stderr.flush()
        real_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr is not a file (captured, redirected in-process)
        yield
        return
    if real_fd != 2:
        yield
        return
    held = tempfile.TemporaryFile()
    saved = os.dup(2)
    py_err = sys.stderr
    sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=py_err.encoding or "utf-8", errors="replace")
    os.dup2(held.fileno(), 2)
    ok = False
    try:
        yield
        ok = True
    finally:
        try:
            sys.stderr.flush()
            sys.stderr.close()
        except OSError:
            pass
        sys.stderr = py_err
        os.dup2(saved, 2)
        os.close(saved)
        try:
            if ok or not quiet:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)
        finally:
            held.close()


def _error_line(cmd: str, e: QCError) -> str:
    msg = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return f"qc {cmd}: error: {msg}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so the same cleanup runs (exit 143)."""


def _on_signal(signum, frame):
    import signal

    _SIGNALLED.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _signals_raise(own_process: bool = False):
    """SIGINT / SIGTERM raise KeyboardInterrupt / Terminated in the main thread and are remembered:
    one that lands inside a TVM call comes back as that call's RuntimeError, still an interruption.
    ``own_process`` (the console script: the command is the process): afterwards the signals are
    ignored rather than restored, so one that lands while the interpreter tears TVM down does not
    kill a command that has already finished and reported."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGNALLED.clear()
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, signal.SIG_IGN if own_process else h)


def _quiet_teardown_after_interrupt() -> None:
    """After an interruption is reported, TVM objects torn down later may complain from their
    ``__del__`` (a MetaSchedule PopenPoolExecutor left mid-build is collected on one of its own
    threads: "cannot join current thread"); those lines would follow our one line, so they are
    dropped.  Anything else still reaches the previous hook."""
    prev = sys.unraisablehook

    def hook(u):
        if type(getattr(u, "object", None)).__module__.startswith("tvm") or \
                getattr(getattr(u, "object", None), "__module__", "").startswith("tvm"):
            return
        prev(u)

    sys.unraisablehook = hook


def _interruption(e: BaseException) -> KeyboardInterrupt | None:
    """The interruption ``e`` stands for (itself, or a failure caused by a signal received), or None."""
    import signal

    if isinstance(e, KeyboardInterrupt):
        return e
    if _SIGNALLED:
        return Terminated() if _SIGNALLED[0] == signal.SIGTERM else KeyboardInterrupt()
    return None


def main(argv: list[str] | None = None) -> int:
    # the signal handlers first: a Ctrl-C / SIGTERM even while the arguments are parsed is one line
    own = argv is None  # the console script: this command is the whole process
    if own:
        from . import interrupt_guard

        interrupt_guard.arm(next((a for a in sys.argv[1:] if not a.startswith("-")), "qc"))
    with _signals_raise(own_process=own):
        try:
            rc = _main(argv)
        except KeyboardInterrupt as e:  # before the command started
            _quiet_teardown_after_interrupt()
            term = isinstance(e, Terminated)
            print(f"qc: {'terminated' if term else 'interrupted'} (nothing was written)", file=sys.stderr)
            rc = 143 if term else 130
    if own and rc in (130, 143):
        # interrupted: the cleanup ran while the exception unwound and the line is printed; native
        # threads stopped mid-task (TVM's / LLVM's pools) would make the C++ static destructors abort
        # the exit ("terminate called without an active exception", SIGABRT), so leave at once
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(rc)
    return rc


_HEAVY = {"compile": ("numpy", "onnx", "onnxruntime", "tvm"), "tune": ("numpy", "onnx", "onnxruntime", "tvm"),
          "predict": ("numpy", "onnx", "onnxruntime", "tvm"), "costmodel": ("numpy", "tvm")}


def _import_shielded(cmd: str) -> None:
    """Import the native libraries a command needs with SIGINT / SIGTERM held back: a signal landing
    inside a native module's initialization can fail it oddly (onnxruntime: "ImportError:
    initialization failed"); held, it is delivered right after, as an ordinary interruption."""
    import importlib
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return
    mods = [m for m in _HEAVY.get(cmd, ("numpy", "tvm")) if m not in sys.modules]
    if not mods:
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for m in mods:
            try:
                importlib.import_module(m)
            except ImportError:  # a missing optional dependency is reported where it is used
                pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a held signal is delivered here


def _main(argv: list[str] | None = None) -> int:
    import warnings

    args = _parser().parse_args(argv)
    _import_shielded(args.cmd)
    old_reporter = progress.set_reporter(progress.Reporter() if args.quiet else progress.ConsoleReporter(
        bars=sys.stderr.isatty() or os.environ.get("QC_PROGRESS") == "1"))
    old_showwarning = warnings.showwarning
    warnings.showwarning = _warning_to_reporter
    try:
        try:
            with _signals_raise():
                if args.cmd != "compile":
                    return COMMANDS[args.cmd](args)
                with _native_stderr_held(args.quiet):
                    return COMMANDS[args.cmd](args)
        except (KeyboardInterrupt, BrokenPipeError):
            raise
        except (QCError, Exception) as e:  # a bug: one line naming where, never a traceback
            intr = _interruption(e)  # ... unless a signal made the call fail
            if intr is not None:
                raise intr from None
            if isinstance(e, QCError):
                raise
            raise internal(f"qc {args.cmd}", e) from e
    except QCError as e:
        print(_error_line(args.cmd, e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        _quiet_teardown_after_interrupt()
        term = isinstance(e, Terminated)
        print(f"qc {args.cmd}: {'terminated' if term else 'interrupted'} (no partial output was written)",
              file=sys.stderr)
        return 143 if term else 130
    except BrokenPipeError:  # `qc inspect x.so | head`: the reader left, not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    finally:
        warnings.showwarning = old_showwarning
        progress.set_reporter(old_reporter)  # main() called in-process (tests, notebooks): no reporter
        #                                      left writing to a stream that may be closed by then


if __name__ == "__main__":
    sys.exit(main())
