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
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from qcompiler.errors import TargetError


def f_build(mod, target, _params=None):
    import tvm

    return tvm.tirx.build(mod, target=target)


def f_export(rt_mod) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="qc_tune_"), "cand.so")
    rt_mod.export_library(path)
    return path


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
