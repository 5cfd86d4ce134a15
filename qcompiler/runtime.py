"""Load and run a compiled library with the TVM runtime alone (no compiler import).

``Library(path)(x=array)`` validates inputs against model.json (names, dtypes, shapes, finite
values, integer ranges), runs the Relax VM and returns {onnx output name: array}.  A batch larger
than the compiled one is split into compiled-size chunks (the last chunk padded by repetition)
and the results concatenated, so a batch-1 library serves any batch.

Before anything is loaded, model.json is checked against the library (``artifact.read_metadata``:
SHA-256 and size of model.so, TVM release) and against this host (``artifact.check_host``: the
CPU features or GPU arch the code was generated for); a mismatch is one ``ArtifactError``.

Threads: one ``Library`` may be called from many threads at once (a web server's workers).  The
Relax VM keeps per-call state (registers, frames), so each calling thread gets its own
``VirtualMachine`` over the one loaded module (created on the thread's first call, kept in a
``threading.local``); the module, its constants and the metadata are shared and read-only.
``tests/test_reliability_threads.py`` checks 8 threads against the single-threaded results.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from . import guards, shape_spec
from .artifact import check_host, read_metadata
from .errors import InputError


class Library:
    def __init__(self, path: str | os.PathLike, device: str | None = None):
        self.path = str(path)
        self.meta = read_metadata(path)
        import tvm
        import tvm.runtime.vm  # noqa: F401  (not imported by tvm.runtime itself)

        kind = device or self.meta["target"]["kind"]
        self.on_cpu = kind in ("cpu", "llvm")
        self.dev = tvm.cpu(0) if self.on_cpu else tvm.cuda(0)
        if not self.dev.exist:
            raise InputError(f"{self.path}: built for {kind}, but no {kind} device is present here")
        check_host(self.path, self.meta, None if self.on_cpu else self.dev)  # before its code can run
        try:
            self.module = tvm.runtime.load_module(self.path)
        except Exception as e:
            raise InputError(f"{self.path}: the TVM runtime cannot load this library ({str(e).splitlines()[0]})") from None
        self._vm_lock = threading.Lock()
        self._local = threading.local()
        self._local.vm = tvm.runtime.vm.VirtualMachine(self.module, self.dev)
        self.inputs = self.meta["inputs"]
        self.outputs = self.meta["outputs"]
        self._tvm = tvm

    @property
    def vm(self):
        """This thread's Relax VM over the shared module (see the module docstring: threads)."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            with self._vm_lock:
                vm = self._tvm.runtime.vm.VirtualMachine(self.module, self.dev)
            self._local.vm = vm
        return vm

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """The model's outputs (without the run-time guards of qcompiler/guards.py)."""
        hidden = guards.guard_outputs(self.meta)
        return [o["name"] for o in self.outputs if o["name"] not in hidden]

    def _named(self, outs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """One run's outputs by name, its guards checked and dropped."""
        return guards.check(self.meta, dict(zip([o["name"] for o in self.outputs], outs)))

    @property
    def batch(self) -> int:
        return int(self.meta.get("batch", 1))

    # ---- input checking -----------------------------------------------------------------------
    def _feeds(self, args, kwargs) -> dict[str, np.ndarray]:
        if args:
            if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
                kwargs = dict(args[0])
            elif len(args) > len(self.inputs):
                raise InputError(f"{len(args)} positional inputs; the model takes {self.input_names}")
            else:
                kwargs = {**{i["name"]: a for i, a in zip(self.inputs, args)}, **kwargs}
        missing = [n for n in self.input_names if n not in kwargs]
        extra = [k for k in kwargs if k not in self.input_names]
        if missing or extra:
            raise InputError(f"inputs {sorted(kwargs)} do not match the model's {self.input_names}"
                             + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else ""))
        feeds = {}
        for spec in self.inputs:
            a = np.asarray(kwargs[spec["name"]])
            want = spec["dtype"]
            if want.startswith("float"):
                if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                    raise InputError(f"input '{spec['name']}' has dtype {a.dtype}; expected {want}")
                a = a.astype(np.float32)
                if not np.all(np.isfinite(a)):
                    raise InputError(f"input '{spec['name']}' contains NaN or Inf")
            else:
                if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                    raise InputError(f"input '{spec['name']}' has dtype {a.dtype}; expected {want}")
                rng = spec.get("valid_range")
                if rng is not None and a.size and (a.min() < rng[0] or a.max() > rng[1]):
                    bad = a[(a < rng[0]) | (a > rng[1])].ravel()[:3].tolist()
                    raise InputError(f"input '{spec['name']}' has values {bad} outside the valid range "
                                     f"[{rng[0]}, {rng[1]}] (e.g. token ids beyond the embedding table)")
                a = a.astype(want)
            feeds[spec["name"]] = a
            if self.symbolic:  # checked below, all inputs together (qcompiler/shape_spec.py)
                continue
            shape = tuple(spec["shape"])
            ax = self._batch_axis(spec)
            rest = [d for k, d in enumerate(shape) if k != ax]
            if a.ndim != len(shape) or [d for k, d in enumerate(a.shape) if k != ax] != rest:
                raise InputError(f"input '{spec['name']}' has shape {a.shape}; the library was compiled for "
                                 f"{shape}" + (f" (any size along axis {ax}, the batch)" if ax is not None else
                                              " (it has no batch axis)"))
            feeds[spec["name"]] = a
        if self.symbolic:  # a fixed batch axis takes any size (run in chunks, __call__)
            shape_spec.check_feeds(self.meta, feeds, skip=self._chunk_axes())
        if self.symbolic and not self._chunk_axes():
            return feeds
        sizes = {feeds[k].shape[ax] for k, ax in self._chunk_axes().items()}
        if len(sizes) > 1:
            raise InputError(f"inputs disagree in batch size: {sorted(sizes)}")
        return feeds

    @property
    def symbolic(self) -> bool:
        """Whether the library has symbolic dims (one library for a range of shapes, model.json
        ``symbolic_dims``): it runs any shape in range as it is, never in chunks."""
        return bool(self.meta.get("symbolic_dims"))

    def _chunk_axes(self) -> dict:
        """The inputs' batch axes along which a request is run in chunks of the compiled batch: every
        batch axis of a static library; those of a symbolic library whose batch stays fixed (only its
        other dims symbolic: ``shape_spec.add_declared``)."""
        out = {}
        for s in self.inputs:
            ax = self._batch_axis(s)
            if ax is not None and (not self.symbolic or isinstance(s["shape"][ax], int)):
                out[s["name"]] = ax
        return out

    @staticmethod
    def _batch_axis(spec: dict):
        """The input's batch axis (model.json ``batch_axis``; libraries before it: axis 0)."""
        return spec.get("batch_axis", 0) if spec.get("shape") else None

    # ---- running --------------------------------------------------------------------------------
    def _run_exact(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tvm = self._tvm
        args = [tvm.runtime.tensor(np.require(feeds[n], requirements="C"), self.dev) for n in self.input_names]  # keeps 0-d
        res = self.vm["main"](*args)
        if len(self.outputs) == 1:
            return [res.numpy()]
        return [r.numpy() for r in res]

    def __call__(self, *args, **kwargs) -> dict[str, np.ndarray]:
        feeds = self._feeds(args, kwargs)
        axes = self._chunk_axes()
        if self.symbolic and not axes:
            return self._named(self._run_exact(feeds))
        batched = list(axes)
        n = feeds[batched[0]].shape[axes[batched[0]]] if batched else self.batch
        b = self.batch
        if n == b:
            return self._named(self._run_exact(feeds))
        elif any(axes[k] != 0 for k in batched):
            raise InputError(f"this library runs {b} sample(s) at a time along a batch axis other than the first; "
                             f"got {n}: call it with batches of {b}")
        else:  # chunks of the compiled batch along axis 0 (inputs without a batch axis go whole)
            parts = []
            for s in range(0, n, b):
                idx = np.arange(s, s + b) % n
                parts.append(self._named(self._run_exact({k: (v[idx] if k in batched else v) for k, v in feeds.items()})))
            return {k: np.concatenate([p[k] for p in parts])[:n] for k in self.output_names}

    def example_inputs(self, seed: int = 0, shapes: dict | None = None) -> dict[str, np.ndarray]:
        """Random inputs at the compiled shapes (symbolic dims at their calibrated size) or ``shapes``."""
        rng = np.random.default_rng(seed)
        sym = self.meta.get("symbolic_dims") or {}
        out = {}
        for spec in self.inputs:
            shape = tuple(sym[d]["calibrated"] if isinstance(d, str) else d for d in spec["shape"])
            if shapes and spec["name"] in shapes:
                shape = tuple(shapes[spec["name"]])
            if spec["dtype"].startswith("float"):
                out[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
            else:
                lo, hi = spec.get("valid_range", [0, 1])
                out[spec["name"]] = rng.integers(lo, hi + 1, shape).astype(spec["dtype"])
        return out

    def bench(self, inputs: dict[str, np.ndarray] | None = None, repeats: int = 30, min_repeat_ms: int = 50,
              warmup: int = 3) -> dict:
        """Median and spread of the library's latency at its compiled batch (TVM time_evaluator)."""
        feeds = self._feeds((), inputs) if inputs else self.example_inputs()
        axes = self._chunk_axes()
        feeds = {k: (v if axes.get(k) is None else  # the compiled batch along each fixed batch axis
                     np.take(v, np.arange(self.batch) % max(v.shape[axes[k]], 1), axis=axes[k]))
                 for k, v in feeds.items()}
        tvm = self._tvm
        args = [tvm.runtime.tensor(np.require(feeds[n], requirements="C"), self.dev) for n in self.input_names]  # keeps 0-d
        for _ in range(warmup):
            self.vm["main"](*args)
        f = self.vm.time_evaluator("main", self.dev, number=1, repeat=repeats, min_repeat_ms=min_repeat_ms)
        r = f(*args)
        ms = np.asarray(r.results) * 1e3
        return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
                "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
                "repeats": int(len(ms)), "batch": self.batch, "device": str(self.dev),
                **({"threads": cpu_threads()} if self.on_cpu else {})}


def cpu_threads() -> int:
    """Worker threads of the TVM runtime's CPU thread pool (``TVM_NUM_THREADS``, else its default: on
    x86 half the logical CPUs, assuming two hyper-threads per core)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
