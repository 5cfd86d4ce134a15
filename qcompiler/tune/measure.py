"""Build and time candidates with MetaSchedule's Builder and Runner (local or through RPC).

The builder is ``LocalBuilder`` with our own ``f_build`` (``tvm.tirx.build`` of the one-kernel
module: the default build imports ``tvm.s_tir.tensor_intrin`` in every worker, ~100 s, docs/design.md §5)
and ``f_export`` (a shared library through ``export_library``; CUDA modules keep their source, as
TVM 0.27 builds them).  The runner is ``LocalRunner`` or ``RPCRunner`` (``RPCConfig(tracker host,
port, key)``: TVM's tracker hands each candidate to a free server with that key); both allocate
random arguments and run ``time_evaluator`` with our ``EvaluatorConfig`` (``repeat`` timings of
``number`` runs each, at least ``min_repeat_ms`` per timing).  Argument values do not change the
speed of these kernels (no data-dependent control flow), so random weights/scales are fine.

This module is imported by the builder's worker processes (``f_build`` / ``f_export`` are pickled
by reference): keep it light.

Temporary files: every candidate library goes into one scratch folder of the tuning process,
``<tmp>/qc_tune_<pid>_<random>/`` (``scratch()``; the workers find it in ``$QC_TUNE_SCRATCH`` and
use it as their ``TMPDIR``), removed when ``qc tune`` ends, however it ends (an error, Ctrl-C,
SIGTERM: the workers are killed first).  A run killed with
SIGKILL cannot clean up: the next ``qc tune`` removes the scratch folders whose process is gone
(``remove_stale``), and those of the older naming (``qc_tune_<random>``) once they are an hour old.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from qcompiler import interrupt_guard
from qcompiler.errors import TargetError


def f_build(mod, target, _params=None):
    import tvm

    return tvm.tirx.build(mod, target=target)


SCRATCH_ENV = "QC_TUNE_SCRATCH"
_SCRATCH_RE = re.compile(r"^qc_tune_(\d+)_")
_LEGACY_RE = re.compile(r"^qc_tune_[a-z0-9_]{8}$")
LEGACY_AGE_S = 3600


def f_export(rt_mod) -> str:
    parent = os.environ.get(SCRATCH_ENV)
    if parent is None:  # not under scratch(): a folder of its own, named after the owning process
        parent = tempfile.gettempdir()
        d = tempfile.mkdtemp(prefix=f"qc_tune_{os.getppid()}_", dir=parent)
    else:  # the scratch folder gone (the tuner ended): fail this build, leave nothing behind
        d = tempfile.mkdtemp(prefix="cand_", dir=parent)
    path = os.path.join(d, "cand.so")
    rt_mod.export_library(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(tmp: str | None = None) -> list[str]:
    """Remove the scratch folders of tuning runs that are gone (killed with SIGKILL, or a crash):
    ``qc_tune_<pid>_*`` whose process no longer exists, and the older ``qc_tune_<random>`` ones more
    than an hour old.  Returns what was removed."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        p = os.path.join(tmp, name)
        m = _SCRATCH_RE.match(name)
        try:
            if m:
                stale = int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))
            else:
                stale = bool(_LEGACY_RE.match(name)) and now - os.path.getmtime(p) > LEGACY_AGE_S
            if stale and os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def scratch():
    """The tuning run's scratch folder (see the module docstring), removed on the way out; stale
    folders of dead runs are removed first."""
    from qcompiler import progress

    gone = remove_stale()
    if gone:
        progress.get().stage(f"removed {len(gone)} temporary folder(s) of earlier tuning runs that were killed")
    d = tempfile.mkdtemp(prefix=f"qc_tune_{os.getpid()}_")
    interrupt_guard.register(d)  # removed even if an interruption cannot unwind (its module doc)
    old = {k: os.environ.get(k) for k in (SCRATCH_ENV, "TMPDIR")}
    # inherited by the builder's / runner's worker processes, started after this: their candidate
    # libraries and every temporary file of theirs (TVM's export_library) land in the scratch folder
    os.environ[SCRATCH_ENV] = d
    os.environ["TMPDIR"] = d
    try:
        yield d
    except BaseException:  # an error, Ctrl-C, SIGTERM: stop the workers mid-task before cleaning up
        _kill_children()
        raise
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(d, ignore_errors=True)
        interrupt_guard.unregister(d)


def _kill_children(timeout: float = 3.0) -> None:
    """Kill this process's worker processes (MetaSchedule's popen pools), waiting for them to go."""
    interrupt_guard.kill_children(timeout)


@dataclass
class RpcSpec:
    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, tracker: str, key: str | None) -> RpcSpec:
        if not key:
            raise TargetError("--rpc-tracker needs --rpc-key KEY (the key the RPC servers registered with)")
        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise TargetError(f"--rpc-tracker '{tracker}': expected HOST:PORT")
        return cls(host, int(port), key)

    def __str__(self) -> str:
        return f"rpc:{self.key}@{self.host}:{self.port}"

    def check(self, timeout: float = 5.0) -> int:
        """Number of servers registered under the key; TargetError when the tracker is unreachable or has none."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                pass
        except OSError as e:
            raise TargetError(f"RPC tracker {self.host}:{self.port} is unreachable ({e.strerror or e}); "
                              "start it with `python -m tvm.exec.rpc_tracker --host HOST --port PORT`") from None
        from tvm.s_tir.meta_schedule.runner import RPCConfig

        try:
            n = RPCConfig(self.host, self.port, self.key, session_timeout_sec=int(timeout)).count_num_servers(
                allow_missing=True)
        except Exception as e:  # noqa: BLE001 - not a TVM tracker
            raise TargetError(f"RPC tracker {self.host}:{self.port} did not answer as a TVM tracker "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if n == 0:
            raise TargetError(f"RPC tracker {self.host}:{self.port} has no server with key '{self.key}'; start one with "
                              f"`python -m tvm.exec.rpc_server --tracker {self.host}:{self.port} --key {self.key}`")
        return n


@dataclass
class Candidate:
    workload: object
    config: object
    func: object              # the scheduled PrimFunc
    tir_sha256: str | None = None


@dataclass
class Measurement:
    candidate: Candidate
    latencies: list | None
    error: str | None


class Measurer:
    """Builds a batch in parallel, then times it (one candidate at a time locally; spread over the
    servers with RPC), yielding each measurement as soon as it is known."""

    def __init__(self, spec, rpc: RpcSpec | None = None, repeats: int = 5, number: int = 1,
                 min_repeat_ms: int = 20, build_timeout: float = 120.0, run_timeout: float = 60.0,
                 build_workers: int | None = None):
        from tvm.s_tir.meta_schedule.builder import LocalBuilder
        from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner, RPCConfig, RPCRunner

        from qcompiler.targets import host_cores

        self.spec = spec
        self.target = spec.tvm_target()
        self.device_type = "cpu" if spec.kind == "cpu" else "cuda"
        self.rpc = rpc
        self.measured_by = str(rpc) if rpc else "local"
        self.builder = LocalBuilder(max_workers=build_workers or host_cores(), timeout_sec=build_timeout,
                                    f_build=f_build, f_export=f_export)
        ev = EvaluatorConfig(number=number, repeat=repeats, min_repeat_ms=min_repeat_ms)
        if rpc:
            self.servers = rpc.check()
            cfg = RPCConfig(rpc.host, rpc.port, rpc.key, session_timeout_sec=int(run_timeout))
            self.runner = RPCRunner(cfg, ev, max_workers=self.servers)
        else:
            if spec.kind == "cuda":
                from qcompiler.kernels.cuda_mma import ensure_cuda_jit

                ensure_cuda_jit()
            self.servers = 1
            self.runner = LocalRunner(timeout_sec=run_timeout, evaluator_config=ev)

    def measure(self, cands: list[Candidate]) -> Iterator[Measurement]:
        import tvm
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.builder import BuilderInput
        from tvm.s_tir.meta_schedule.runner import RunnerInput

        if not cands:
            return
        mods = [tvm.IRModule({"main": c.func.with_attr("global_symbol", "main")}) for c in cands]
        built = self.builder.build([BuilderInput(m, self.target) for m in mods])
        todo = []
        for c, b in zip(cands, built):
            if b.error_msg:
                yield Measurement(c, None, "build: " + _last_line(b.error_msg))
                continue
            todo.append((c, RunnerInput(b.artifact_path, self.device_type, ArgInfo.from_prim_func(c.func)),
                         b.artifact_path))
        if self.rpc:
            futures = self.runner.run([t[1] for t in todo])
            for (c, ri, path), fut in zip(todo, futures):
                yield self._result(c, self._steady(ri, fut.result()), path)
        else:
            for c, ri, path in todo:
                (fut,) = self.runner.run([ri])
                yield self._result(c, self._steady(ri, fut.result()), path)

    RETRIES = 2

    def _steady(self, ri, res):
        """``res``, or when its repeats say the machine was disturbed (``records.disturbed``), the
        steadiest of up to ``RETRIES`` re-runs (lowest ``records.spread``; the first steady one ends it)."""
        from .records import disturbed, spread

        best = res
        for _ in range(self.RETRIES):
            if best.error_msg or not disturbed(best.run_secs):
                break
            (fut,) = self.runner.run([ri])
            again = fut.result()
            if not again.error_msg and spread(again.run_secs) < spread(best.run_secs):
                best = again
        return best

    @staticmethod
    def _result(c, res, artifact_path) -> Measurement:
        _cleanup(artifact_path)
        if res.error_msg:
            return Measurement(c, None, "run: " + _last_line(res.error_msg))
        return Measurement(c, [float(x) for x in res.run_secs], None)


def _last_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    return lines[-1][:400] if lines else "unknown error"


def _cleanup(path: str) -> None:
    try:
        os.remove(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass
