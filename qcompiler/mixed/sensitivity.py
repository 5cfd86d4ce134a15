"""Per-layer sensitivity from forward passes only, with the exact quantizer that ships.

Every variant is quantized by ``passes/quantize.py`` with a one-layer plan (GPTQ rounding for 4-bit
weights, as the compile does) and run by the integer NumPy reference executor
(``qcompiler/reference.py``: the library's semantics bit for bit, not a float simulation) on
calibration samples.  Nodes before the first one the plan changes are shared with the all-INT8
run, so a variant only re-executes the graph from its layer on.

Divergence D(ref, out) per graph output: mean KL(ref || out) over samples for probability outputs
(non-negative, rows summing to 1: classifier heads), else the normalised MSE
sum (out - ref)^2 / sum ref^2; several outputs add.  Two measures per layer i and choice c:

    omega_int8[i, c] = D(M_8, M_i(c))                         (vs the all-INT8 model)
    omega[i, c]      = what the ILP minimises:
                       W4A8:  omega_int8[i, c]
                       W8A16, W16A8: D(FP32, M_i(c)) - D(FP32, M_8)  (negative where it helps)

Why two forms: with e the INT8 model's output error and d_i the change layer i's choice makes,
||e + sum d_i||^2 ~ ||e||^2 + sum_i (||d_i||^2 + 2 e.d_i) when the layers' changes are
uncorrelated.  For 4-bit weights the rounding change d_i is independent of e, so E[2 e.d_i] = 0
and the cross term measured on a few calibration samples is noise that does not carry over to
other inputs (measured: Spearman against held-out configurations fell from ~0.5 to ~0.1 with it):
omega is ||d_i||^2 = omega_int8.  A 16-bit input removes that layer's share of e (d_i ~ -e_i), so
there the cross term is the signal: omega = ||e + d_i||^2 - ||e||^2 < 0, which lets the solver
spend latency on precision where the model needs it.

Cache: ``$QC_CACHE_DIR`` (default ``~/.cache/qcompiler``)/``sensitivity-<key>.json`` with key =
sha256 of (model file, calibration samples used, quantization config, the all-INT8 graph's digest
(scales, attributes: calibration ranges, smoothing, batch), layers, ties, version).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .plan import CHOICES

VERSION = 4
EPS = 1e-8


def cache_dir() -> Path:
    return Path(os.environ.get("QC_CACHE_DIR") or Path.home() / ".cache" / "qcompiler")


@dataclass
class Sensitivity:
    names: list[str]
    omega: np.ndarray                # [layers, choices]
    omega_int8: np.ndarray           # [layers, choices]
    available: np.ndarray            # [layers, choices] bool
    reasons: dict = field(default_factory=dict)   # "name/choice" -> why unavailable
    base_fp32: float = 0.0           # D(FP32, all-INT8)
    samples: int = 0
    evaluator: str = "integer reference executor (qcompiler/reference.py)"
    cached: bool = False

    def to_json(self) -> dict:
        return {"version": VERSION, "names": self.names, "choices": list(CHOICES),
                "omega": self.omega.tolist(), "omega_int8": self.omega_int8.tolist(),
                "available": self.available.tolist(), "reasons": self.reasons,
                "base_fp32": self.base_fp32, "samples": self.samples, "evaluator": self.evaluator}

    @classmethod
    def from_json(cls, d: dict) -> Sensitivity:
        return cls(list(d["names"]), np.array(d["omega"], float), np.array(d["omega_int8"], float),
                   np.array(d["available"], bool), dict(d["reasons"]), float(d["base_fp32"]),
                   int(d["samples"]), d.get("evaluator", ""), True)


def is_probability(a: np.ndarray) -> bool:
    a = np.asarray(a, np.float64)
    return a.ndim >= 1 and a.shape[-1] > 1 and bool(np.all(a >= -1e-6)) and \
        bool(np.allclose(a.sum(-1), 1.0, atol=2e-3))


def divergence(ref: dict, out: dict, prob: dict) -> float:
    """Sum over outputs of mean KL (probability outputs) or normalised MSE."""
    total = 0.0
    for k, r in ref.items():
        r = np.asarray(r, np.float64)
        o = np.asarray(out[k], np.float64)
        if prob.get(k):
            p = np.clip(r, EPS, None)
            p = p / p.sum(-1, keepdims=True)
            q = np.clip(o, EPS, None)
            q = q / q.sum(-1, keepdims=True)
            total += float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))
        else:
            total += float(np.sum((o - r) ** 2) / max(float(np.sum(r ** 2)), 1e-30))
    return total


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and \
            a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable attribute values: treat as changed
        return False


def first_change(g0, g1) -> int:
    """Index of the first node of ``g1`` that differs from ``g0`` (op, wiring, dtype or attributes)."""
    for i, (a, b) in enumerate(zip(g0.nodes, g1.nodes)):
        if a.op != b.op or a.inputs != b.inputs or a.outputs != b.outputs or \
                g0.dtypes.get(a.outputs[0]) != g1.dtypes.get(b.outputs[0]) or a.attrs.keys() != b.attrs.keys() or \
                not all(_same(a.attrs[k], b.attrs[k]) for k in a.attrs):
            return i
    return min(len(g0.nodes), len(g1.nodes))


class Evaluator:
    """The all-INT8 model and its variants on calibration batches (reference executor, prefix reuse)."""

    def __init__(self, fg, stats, nonneg, cfg, onnx_model, feeds: list[dict], fp32: list[dict] | None,
                 hessian_rows: int = 4096, hessians=None, keep_envs: bool = True):
        from passes.quantize import quantize
        from qcompiler import reference

        from .gptq import HessianStore

        self.fg, self.stats, self.nonneg, self.cfg, self.onnx_model = fg, stats, nonneg, cfg, onnx_model
        self.feeds = feeds
        self.ig8 = quantize(fg, stats, nonneg, cfg, onnx_model)
        # GPTQ's Hessians come from these feeds unless given (an evaluation set reuses the calibration's)
        self.hessians = hessians if hessians is not None else HessianStore()
        gemms = set() if hessians is not None else {n.name for n in self.ig8.nodes if n.op in ("conv", "dense")}
        per_batch = max(64, hessian_rows // max(len(feeds), 1))
        # every tensor of the INT8 run, and what a node that rewrites a name (a graph output's
        # dequantize reads and writes the output name) overwrote: run() restores those
        self.envs, self.overwrites = [], []
        for f in feeds:
            env = dict(self.ig8.consts)
            env.update(f)
            over = []
            for i, node in enumerate(self.ig8.nodes):
                args = [env[t] for t in node.inputs]
                if node.name in gemms and node.op in ("conv", "dense"):
                    self.hessians.add(node, args[0], per_batch)
                o = node.outputs[0]
                if o in env:
                    over.append((i, o, env[o]))
                env[o] = reference.run_node(node, args)
            if keep_envs:  # every tensor, for run(); without: the Hessians and outputs only
                self.envs.append(env)
                self.overwrites.append(over)
            else:
                self.envs.append({o: env[o] for o in self.ig8.outputs})
                self.overwrites.append([])
        self.keep_envs = keep_envs
        self.outs8 = [{o: env[o] for o in self.ig8.outputs} for env in self.envs]
        self.fp32 = fp32
        ref = fp32 if fp32 is not None else self.outs8
        self.prob = {o: is_probability(np.concatenate([r[o] for r in ref])) for o in self.ig8.outputs}
        self.d8_fp32 = self.d_fp32(self.outs8)

    def cfg_with(self, plan: tuple, rounding: str | None = None):
        from dataclasses import replace

        return replace(self.cfg, plan=tuple(plan), hessians=self.hessians,
                       rounding=rounding or self.cfg.rounding)

    def quantize(self, plan: tuple, rounding: str | None = None):
        from passes.quantize import quantize

        return quantize(self.fg, self.stats, self.nonneg, self.cfg_with(plan, rounding), self.onnx_model)

    def run(self, ig) -> list[dict]:
        """Outputs of ``ig`` on every batch, re-executing only from its first change."""
        from qcompiler.reference import run_node

        if not self.keep_envs:
            raise RuntimeError("Evaluator built with keep_envs=False cannot run variants")
        k = first_change(self.ig8, ig)
        outs = []
        for env0, over in zip(self.envs, self.overwrites):
            env = dict(env0)
            for i, name, prev in reversed(over):  # the values as they were before node k
                if i >= k:
                    env[name] = prev
            for node in ig.nodes[k:]:
                env[node.outputs[0]] = run_node(node, [env[i] for i in node.inputs])
            outs.append({o: env[o] for o in ig.outputs})
        return outs

    @staticmethod
    def _cat(outs: list[dict]) -> dict:
        return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}

    def d_fp32(self, outs: list[dict]) -> float:
        if self.fp32 is None:
            return float("nan")
        return divergence(self._cat(self.fp32), self._cat(outs), self.prob)

    def d_int8(self, outs: list[dict]) -> float:
        return divergence(self._cat(self.outs8), self._cat(outs), self.prob)

    def agreement(self, outs: list[dict]) -> float | None:
        """Top-1 agreement with FP32 over the probability outputs (None: no classifier output)."""
        if self.fp32 is None or not any(self.prob.values()):
            return None
        ref, o = self._cat(self.fp32), self._cat(outs)
        vals = [float(np.mean(np.argmax(ref[k], -1) == np.argmax(o[k], -1))) for k, p in self.prob.items() if p]
        return float(np.mean(vals))


def input_dtype(ig, name: str) -> str | None:
    for n in ig.nodes:
        if n.name == name and n.op in ("conv", "dense"):
            return ig.dtypes[n.inputs[0]]
    return None


def measure(ev: Evaluator, names: list[str], ties: list[tuple[int, ...]], progress=None) -> Sensitivity:
    """Omega of every layer and choice (groups of tied layers take W8A16 together)."""
    from passes.overflow import check_overflow
    from qcompiler.errors import QCError

    L, C = len(names), len(CHOICES)
    omega, om8 = np.zeros((L, C)), np.zeros((L, C))
    avail = np.ones((L, C), bool)
    reasons = {}
    cidx = {c: i for i, c in enumerate(CHOICES)}
    for li, name in enumerate(names):
        for c, (wb, ab) in CHOICES.items():
            if c == "w8a8" or ab > 8:
                continue
            try:
                ig = ev.quantize(((name, wb, ab),))
                check_overflow(ig)
            except QCError as e:
                avail[li, cidx[c]] = False
                reasons[f"{name}/{c}"] = str(e)
                continue
            outs = ev.run(ig)
            om8[li, cidx[c]] = omega[li, cidx[c]] = ev.d_int8(outs)
            if wb > 8 and ev.fp32 is not None:   # 16-bit weights remove the layer's share of the error
                omega[li, cidx[c]] = ev.d_fp32(outs) - ev.d8_fp32
        if progress:
            progress(li + 1, L)
    grouped = {i for g in ties for i in g}
    groups = list(ties) + [(i,) for i in range(L) if i not in grouped]
    for c, (wb, ab) in CHOICES.items():
        if ab <= 8:
            continue
        ci = cidx[c]
        for g in groups:
            plan = tuple((names[i], wb, ab) for i in g)
            why = None
            try:
                ig = ev.quantize(plan)
                bad = [names[i] for i in g if input_dtype(ig, names[i]) != f"int{ab}"]
                if bad:
                    why = (f"its input cannot be int{ab} (the producer or another reader of the tensor needs "
                           f"8 bits)")
                else:
                    check_overflow(ig)
            except QCError as e:
                why = str(e)
            if why:
                for i in g:
                    avail[i, ci] = False
                    reasons[f"{names[i]}/{c}"] = why
                continue
            outs = ev.run(ig)
            d8 = ev.d_int8(outs) / len(g)
            df = (ev.d_fp32(outs) - ev.d8_fp32) / len(g) if ev.fp32 is not None else d8
            for i in g:
                om8[i, ci], omega[i, ci] = d8, df
    return Sensitivity(names, omega, om8, avail, reasons, float(ev.d8_fp32), sum(len(next(iter(f.values())))
                                                                              for f in ev.feeds))


def graph_digest(ig) -> str:
    """Digest of the all-INT8 graph (every tensor's scale and dtype, every node's attributes): it
    changes with the calibration ranges, SmoothQuant, the batch, anything the compile changes."""
    h = hashlib.sha256()
    for t in sorted(ig.qparams):
        h.update(f"{t}:{ig.qparams[t].scale!r}:{ig.qparams[t].dtype};".encode())
    for n in ig.nodes:
        h.update(f"{n.op}|{n.name}|{n.inputs}|{n.outputs}|{ig.shapes.get(n.outputs[0])}".encode())
        for k in sorted(n.attrs):
            v = n.attrs[k]
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray) else repr(v).encode())
    return h.hexdigest()


def cache_key(model_path, feeds: list[dict], cfg, extra: dict) -> str:
    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    for fd in feeds:
        for k in sorted(fd):
            a = np.ascontiguousarray(fd[k])
            h.update(k.encode())
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.tobytes())
    conf = {"method": cfg.method, "percentile": cfg.percentile, "bits": cfg.bits, "io": cfg.io,
            "softmax": cfg.softmax, "gelu": cfg.gelu, "wide_bits": cfg.wide_bits, "rounding": cfg.rounding,
            "allow_float": cfg.allow_float, "version": VERSION, **extra}
    h.update(json.dumps(conf, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def load_cached(key: str) -> Sensitivity | None:
    p = cache_dir() / f"sensitivity-{key}.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
        if d.get("version") != VERSION or d.get("choices") != list(CHOICES):
            return None
        return Sensitivity.from_json(d)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_cached(key: str, s: Sensitivity) -> Path | None:
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"sensitivity-{key}.json"
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(s.to_json()))
        os.replace(tmp, p)
        return p
    except OSError:  # a read-only home: the plan is still made, just not cached
        return None
