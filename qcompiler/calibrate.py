"""Calibration: run the float model in onnxruntime and derive a real range per tensor.

Every intermediate tensor of the frontend's (frozen, folded) ONNX model is exposed as an output,
the calibration samples run through it batch by batch, and per tensor we keep min, max and a
uniform random subsample of values (a reservoir).  The clipping range then comes from one of:
  minmax      [min, max]
  percentile  amax = the p-th percentile of |x| (signed) or of x (non-negative); p = 99.99 default
  mse         amax minimising E[(x - Q(x; amax))^2] over 128 candidates in (0, max|x|] on the
              subsample, Q being the symmetric 8-bit quantizer the compiler will apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import progress
from .errors import CalibrationError, ModelError
from .ort_util import expose, session

METHODS = ("minmax", "percentile", "mse")
RESERVOIR = 1 << 16
TOPK = 4096  # exact tail of |x| kept per tensor: percentiles >= 1 - 4096/count come from it


@dataclass(frozen=True)
class TensorStats:
    lo: float
    hi: float
    sample: np.ndarray  # float32 subsample of the values
    chan_lo: np.ndarray | None = None     # per channel of the last axis (rank >= 2): min
    chan_hi: np.ndarray | None = None     #                                           max
    sample_chan: np.ndarray | None = None  # last-axis channel of each sampled value
    chan_ms: np.ndarray | None = None     # per channel of the last axis: mean of x^2 (all values)
    top_abs: np.ndarray | None = None     # the TOPK largest |x| over all values, descending (exact tail)
    top_chan: np.ndarray | None = None    # their last-axis channels (rank >= 2)
    count: int = 0                        # number of values seen

    def scaled(self, f: np.ndarray) -> "TensorStats":
        """The stats of x / f (f > 0 per channel of the last axis), exactly from the recorded ones."""
        f = np.asarray(f, np.float64)
        clo, chi = self.chan_lo / f, self.chan_hi / f
        smp = self.sample / f[self.sample_chan] if self.sample_chan is not None else self.sample
        ms = self.chan_ms / f**2 if self.chan_ms is not None else None
        top, tch = self.top_abs, self.top_chan
        if top is not None and tch is not None:
            # the largest |x/f| are among the largest |x| of each channel only approximately: keep the
            # exact extremes per channel (chan_lo/hi) in the list so the maximum stays exact
            ext = np.maximum(np.abs(clo), np.abs(chi))
            top = np.concatenate([top / f[tch], ext])
            tch = np.concatenate([tch, np.arange(len(f))])
            order = np.argsort(-top, kind="stable")[:TOPK]
            top, tch = top[order], tch[order]
        return TensorStats(float(clo.min()), float(chi.max()), smp.astype(np.float32), clo, chi, self.sample_chan, ms,
                           top, tch, self.count)


def load_calibration(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An .npz keyed by input names, or a folder of such .npz files (concatenated on axis 0)."""
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"{p}: calibration data not found (give an .npz keyed by input names, or a folder of them)")
    files = sorted(p.glob("*.npz")) if p.is_dir() else [p]
    if not files:
        raise CalibrationError(f"{p}: the folder holds no .npz files")
    parts: dict[str, list[np.ndarray]] = {}
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                for k in z.files:
                    parts.setdefault(k, []).append(z[k])
        except Exception as e:
            raise CalibrationError(f"{f}: not a readable .npz file ({type(e).__name__})") from None
    try:
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
    except ValueError as e:
        raise CalibrationError(f"{p}: calibration files disagree in shape ({e})") from None


def check_inputs(data: dict[str, np.ndarray], specs, where: str = "calibration data") -> dict[str, np.ndarray]:
    """Validate names, ranks, dtypes and finiteness against the model's declared inputs."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in data]
    if missing:
        raise CalibrationError(f"{where} lacks input(s) {missing}; the model's inputs are {names}")
    extra = [k for k in data if k not in names]
    if extra:
        raise CalibrationError(f"{where} has key(s) {extra} that are not model inputs {names}")
    out = {}
    n0 = None
    for s in specs:
        a = np.asarray(data[s.name])
        if a.ndim != len(s.shape):
            raise CalibrationError(f"{where}: input '{s.name}' has shape {a.shape}; the model expects rank "
                                   f"{len(s.shape)} {tuple(s.shape)} (first axis = samples)")
        for k, d in enumerate(s.shape):
            if k > 0 and isinstance(d, int) and a.shape[k] != d:
                raise CalibrationError(f"{where}: input '{s.name}' has shape {a.shape}; dim {k} must be {d}")
        if s.dtype.startswith("float"):
            if not np.issubdtype(a.dtype, np.floating):
                raise CalibrationError(f"{where}: input '{s.name}' is {a.dtype}; the model expects {s.dtype}")
            if not np.all(np.isfinite(a)):
                raise CalibrationError(f"{where}: input '{s.name}' contains NaN or Inf values; remove those samples")
        elif not np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_:
            raise CalibrationError(f"{where}: input '{s.name}' is {a.dtype}; the model expects {s.dtype}")
        a = a.astype(s.dtype)
        if n0 is None:
            n0 = a.shape[0]
        elif a.shape[0] != n0:
            raise CalibrationError(f"{where}: inputs disagree in the number of samples ({n0} vs {a.shape[0]})")
        out[s.name] = a
    if not n0:
        raise CalibrationError(f"{where} holds no samples")
    return out


def check_memory(graph, tensors: list[str], data: dict[str, np.ndarray], batch: int) -> None:
    """Refuse (one line, ResourceError) a calibration whose tensors of one batch cannot be held together."""
    from .frontend import check_memory as check, tensor_bytes

    sizes = {t: tensor_bytes(graph.shapes[t], graph.dtypes.get(t, "float32")) for t in tensors if t in graph.shapes}
    shapes = {i: tuple(graph.shapes[i]) for i in graph.inputs if i in graph.shapes}
    feeds = sum(tensor_bytes((batch,) + v.shape[1:], str(v.dtype)) for v in data.values())
    # onnxruntime's buffers and the returned copies: twice the exposed tensors
    check({k: 2 * v for k, v in sizes.items()}, f"calibration (batch {batch})", shapes, extra=feeds)


def _ort_failure(e: Exception, start: int | None, model: onnx.ModelProto | None = None) -> Exception:
    from .frontend import is_ort_error, ort_message

    if not is_ort_error(e):
        return e
    where = "building the calibration session" if start is None else f"calibrating (samples {start}..)"
    return ModelError(f"onnxruntime fails {where}: {ort_message(e, model=model)}; check the node's weights, attributes and the "
                      "calibration data")


def collect(model: onnx.ModelProto, data: dict[str, np.ndarray], tensors: list[str],
            batch: int, seed: int = 0) -> dict[str, TensorStats]:
    """Run ``model`` (frozen to ``batch``) over ``data`` and gather stats of ``tensors``."""
    rep = progress.get()
    inputs = [t for t in tensors if t in data]
    tensors = [t for t in tensors if t not in data]
    try:
        sess = session(expose(model, tensors))
    except Exception as e:
        err = _ort_failure(e, None, model)
        if err is e:
            raise
        raise err from None
    n = next(iter(data.values())).shape[0]
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the exception carries onnxruntime's message; no second copy on stderr
    rng = np.random.default_rng(seed)
    lo = {t: np.inf for t in tensors + inputs}
    hi = {t: -np.inf for t in tensors + inputs}
    samples: dict[str, list[np.ndarray]] = {t: [] for t in tensors + inputs}
    chans: dict[str, list[np.ndarray]] = {t: [] for t in tensors + inputs}
    clo: dict[str, np.ndarray] = {}
    chi: dict[str, np.ndarray] = {}
    csq: dict[str, np.ndarray] = {}
    crows: dict[str, int] = {}
    tops: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    count: dict[str, int] = {}
    chunks = range(0, n, batch)
    per_batch = max(RESERVOIR // max(len(chunks), 1), 256)
    for start in rep.iterate(chunks, total=len(chunks), desc="calibrating"):
        idx = np.arange(start, start + batch) % n  # the last chunk repeats samples (ranges unaffected)
        feeds = {k: v[idx] for k, v in data.items()}
        try:
            outs = sess.run(tensors, feeds, quiet) + [feeds[t] for t in inputs]
        except Exception as e:
            err = _ort_failure(e, start, model)
            if err is e:
                raise
            raise err from None
        for t, v in zip(tensors + inputs, outs):
            v = np.asarray(v)
            if not np.issubdtype(v.dtype, np.floating):
                continue
            if not np.all(np.isfinite(v)):
                fin = np.isfinite(v)
                if np.isnan(v).any() or not fin.any():
                    raise CalibrationError(f"tensor '{t}' becomes NaN/Inf on the calibration data (samples {start}..)")
                # +-Inf from an explicit fill (masked_fill(-inf)): the range is the finite values'
                # (an infinite element saturates to the integer dtype's end)
                v = np.clip(v, v[fin].min(), v[fin].max())
            lo[t] = min(lo[t], float(v.min()))
            hi[t] = max(hi[t], float(v.max()))
            if v.ndim >= 2:
                c = v.shape[-1]
                vlo, vhi = v.reshape(-1, c).min(axis=0), v.reshape(-1, c).max(axis=0)
                clo[t] = np.minimum(clo[t], vlo) if t in clo else vlo
                chi[t] = np.maximum(chi[t], vhi) if t in chi else vhi
                sq = np.square(v.reshape(-1, c), dtype=np.float64).sum(axis=0)
                csq[t] = csq[t] + sq if t in csq else sq
                crows[t] = crows.get(t, 0) + v.size // c
            flat = v.reshape(-1)
            a = np.abs(flat.astype(np.float64))
            k = min(TOPK, a.size)
            sel = np.argpartition(-a, k - 1)[:k] if a.size > k else np.arange(a.size)
            ch = (sel % v.shape[-1]) if v.ndim >= 2 else np.zeros(len(sel), np.int64)
            if t in tops:
                a_old, c_old = tops[t]
                av, cv = np.concatenate([a_old, a[sel]]), np.concatenate([c_old, ch])
            else:
                av, cv = a[sel], ch
            order = np.argsort(-av, kind="stable")[:TOPK]
            tops[t] = (av[order], cv[order])
            count[t] = count.get(t, 0) + flat.size
            idx = np.arange(flat.size)
            if flat.size > per_batch:
                idx = rng.integers(0, flat.size, per_batch)
                flat = flat[idx]
            samples[t].append(flat.astype(np.float32))
            if v.ndim >= 2:
                chans[t].append((idx % v.shape[-1]).astype(np.int32))
    out = {}
    for t in tensors + inputs:
        if not np.isfinite(lo[t]):
            continue
        smp = np.concatenate(samples[t]) if samples[t] else np.zeros(0, np.float32)
        per = t in clo and len(chans[t]) == len(samples[t])
        out[t] = TensorStats(lo[t], hi[t], smp, clo.get(t) if per else None, chi.get(t) if per else None,
                             np.concatenate(chans[t]) if per else None,
                             csq[t] / max(crows[t], 1) if per else None,
                             tops[t][0] if t in tops else None, tops[t][1] if (t in tops and per) else None,
                             count.get(t, 0))
    return out


def clip_range(st: TensorStats, nonneg: bool, method: str, percentile: float = 99.99, bits: int = 8) -> tuple[float, float]:
    """The (lo, hi) real range the quantizer should represent."""
    if method == "minmax" or st.sample.size == 0:
        return st.lo, st.hi
    x = st.sample.astype(np.float64)
    if nonneg:
        x = np.maximum(x, 0)
    mag = x if nonneg else np.abs(x)
    full = max(st.hi, 0.0) if nonneg else max(abs(st.lo), abs(st.hi))
    if method == "percentile":
        k = int(np.floor((1 - percentile / 100) * st.count)) if st.count else -1
        if st.top_abs is not None and 0 <= k < len(st.top_abs) and (nonneg is False or st.lo >= 0):
            amax = float(st.top_abs[k])  # exact: the (k+1)-th largest |x| over all calibration values
        else:
            amax = float(np.percentile(mag, percentile))
    elif method == "mse":
        qmax = 2**bits - 1 if nonneg else 2 ** (bits - 1) - 1
        best, amax = np.inf, full
        for cand in np.linspace(full / 128, full, 128):
            s = cand / qmax
            q = np.clip(np.round(x / s), 0 if nonneg else -qmax - 1, qmax) * s
            err = float(np.mean((q - x) ** 2))
            if err < best:
                best, amax = err, cand
    else:
        raise CalibrationError(f"unknown calibration method '{method}' (choose from {', '.join(METHODS)})")
    amax = min(max(amax, full * 1e-3), full) if full > 0 else 0.0
    return (0.0 if nonneg else -amax), amax
