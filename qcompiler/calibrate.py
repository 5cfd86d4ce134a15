"""Calibration: run the float model in onnxruntime and derive a real range per tensor.

Every intermediate tensor of the frontend's (frozen, folded) ONNX model is exposed as an output,
the calibration samples run through it batch by batch, and per tensor we keep min, max and a
uniform random subsample of values (a reservoir).  The clipping range then comes from one of:
  minmax      [min, max]
  percentile  amax = the p-th percentile of |x| (signed) or of x (non-negative); p = 99.99 default
  mse         amax minimising E[(x - Q(x; amax))^2] over 128 candidates in (0, max|x|] on the
              subsample, Q being the symmetric 8-bit quantizer the compiler will apply.

Calibration data (``--calib``): an .npz keyed by the model's input names, or a folder of them (one
sample or batch per file; the samples are then sorted by content, so the result does not depend on
file order or on how the samples are batched into files).  Which axis holds the samples is decided per input by
the model's declared input rank (``calibration_set``):
  * batch axis -- a symbolic first dim named like a batch (N, batch, batch_size, unk__3, ?, ...), and
    that same dim on another axis of another input (silero-vad's state [2, batch, 128]): an array of
    the declared rank holds its samples along that axis ([N, 3, 224, 224] as always); rank + 1 is a
    stack of such arrays; rank - 1 is one sample;
  * fixed first dim F: an array of exactly the declared shape is ONE sample (a state [2, 1, 128] is
    never split); the declared rank with another first size is samples along axis 0, F per run;
  * no batch axis (a scalar, a fixed-size state [25], a [time, features] stream, a graph's
    [num_nodes, 85]): an array of the declared rank is ONE sample, rank + 1 a stack of samples;
  * an input given once while the others give N samples is shared by all of them (a scalar sample
    rate, an initial state); otherwise all inputs give the same N.
The compiled input shapes come from the declared dims, never from the number of samples: the batch
axis gets --batch (default 1), other symbolic dims (time, sequence) the samples' common size.
Errors name the input, its declared shape, the array's shape and what was expected.
"""

from __future__ import annotations

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
    chan_lo: np.ndarray | None = None     # per channel of ``chan_axis`` (rank >= 2): min
    chan_hi: np.ndarray | None = None     #                                           max
    sample_chan: np.ndarray | None = None  # channel (of ``chan_axis``) of each sampled value
    chan_ms: np.ndarray | None = None     # per channel: mean of x^2 (all values)
    top_abs: np.ndarray | None = None     # the TOPK largest |x| over all values, descending (exact tail)
    top_chan: np.ndarray | None = None    # their channels (rank >= 2)
    count: int = 0                        # number of values seen
    chan_axis: int = -1                   # the axis the chan_* fields describe: 1 for NCHW (rank 4), else last
    ms_axis1: np.ndarray | None = None    # rank 3 (NCW: what a 1-D conv reads and writes): mean x^2 per index of axis 1

    def scaled(self, f: np.ndarray) -> "TensorStats":
        """The stats of x / f (f > 0 per channel of ``chan_axis``), exactly from the recorded ones."""
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
                           top, tch, self.count, self.chan_axis)


class CalibFiles(list):
    """What ``load_calibration`` gives for a folder: ``[(file, {input name: array})]`` in name order
    (each file is one sample, or one batch / stack of samples, by the rule in the module docstring)."""


def load_calibration(path) -> "dict[str, np.ndarray] | CalibFiles":
    """An .npz keyed by input names (a dict), or a folder of such .npz files (a ``CalibFiles``: one
    sample or batch per file, combined by ``calibration_set``).  Data already loaded passes through."""
    if isinstance(path, (dict, CalibFiles)):
        return path
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"{p}: calibration data not found (give an .npz keyed by input names, or a folder of them)")
    files = sorted(p.glob("*.npz")) if p.is_dir() else [p]
    if not files:
        raise CalibrationError(f"{p}: the folder holds no .npz files")
    check_data_size(p, files)
    parts = CalibFiles()
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                parts.append((f, {k: z[k] for k in z.files}))
        except Exception as e:
            raise CalibrationError(f"{f}: not a readable .npz file ({type(e).__name__})") from None
    return parts[0][1] if not p.is_dir() else parts


def npz_bytes(f: Path) -> int:
    """Bytes the arrays of an .npz take once loaded, from their headers (nothing is loaded); 0 for a
    file that is not a readable .npz (``load_calibration`` then names it)."""
    import zipfile

    total = 0
    try:
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as fh:
                    fmt = np.lib.format
                    major, _ = fmt.read_magic(fh)
                    read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
                    shape, _, dtype = read(fh, max_header_size=1 << 20)
                total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    except Exception:  # noqa: BLE001 - not an .npz: reported when it is read
        return 0
    return total


def check_data_size(where: Path, files: list[Path]) -> None:
    """Refuse (one line, ResourceError) calibration data that cannot be held in memory: its arrays
    are loaded together (they are sorted by content, ``canonical_order``); the statistics kept per
    tensor are bounded (``Reservoir``, ``TOPK``) whatever the number of samples."""
    from .errors import ResourceError
    from .frontend import human_bytes, memory_budget

    total = sum(npz_bytes(f) for f in files)
    budget = memory_budget()
    if total > budget // 4:
        raise ResourceError(f"{where}: the calibration data takes {human_bytes(total)} in memory ({len(files)} file(s)), "
                            f"more than a quarter of the {human_bytes(budget)} available; use fewer samples "
                            "(a few hundred are plenty for calibration) or a larger machine (QC_MEMORY_LIMIT "
                            "overrides the limit)")


# ---- which axis holds the samples: the rule -----------------------------------------------------

@dataclass
class CalibSet:
    """Calibration samples checked against the model's declared inputs (``calibration_set``).

    ``arrays[name]`` holds the input's samples on a new axis 0: ``[count, *one sample]`` where one
    sample is the compiled input shape without its batch axis (``axes[name]``), or the whole compiled
    shape for an input without one.  ``count`` is ``n`` or 1 (one value shared by every sample)."""
    arrays: dict[str, np.ndarray]
    axes: dict[str, int | None]
    shapes: dict[str, tuple[int, ...]]   # compiled input shapes (declared dims, batch, the samples' sizes)
    batch: int                           # samples per run of the compiled model
    n: int                               # number of samples

    def feeds(self, start: int) -> dict[str, np.ndarray]:
        """Samples start .. start + batch - 1 (wrapping around) at the compiled shapes."""
        idx = np.arange(start, start + self.batch) % self.n
        out = {}
        for k, a in self.arrays.items():
            j = idx if len(a) > 1 else np.zeros_like(idx)
            ax = self.axes[k]
            out[k] = np.require(a[j[0]] if ax is None else np.moveaxis(a[j], 0, ax), requirements="C")  # keeps 0-d
        return out


def _check_values(where: str, spec, a: np.ndarray) -> None:
    """``a`` has a dtype of the input's kind (float for float inputs; integer or bool otherwise) and,
    for a float input, only finite values."""
    if spec.dtype.startswith("float"):
        if not np.issubdtype(a.dtype, np.floating):
            raise CalibrationError(f"{where}: input '{spec.name}' is {a.dtype}; the model expects {spec.dtype}")
        if not np.all(np.isfinite(a)):
            raise CalibrationError(f"{where}: input '{spec.name}' contains NaN or Inf values; remove those samples")
    elif not np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_:
        raise CalibrationError(f"{where}: input '{spec.name}' is {a.dtype}; the model expects {spec.dtype}")


def _shape_text(dims) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _expected(spec, ax: int | None, fixed_batch: bool = False) -> str:
    d = list(spec.shape)
    if ax is None:
        return (f"{_shape_text(d)} for one sample or {_shape_text(['N'] + d)} for N samples"
                if d else "a scalar for one value shared by all samples or (N,) for N samples")
    one = [("N" if k == ax else x) for k, x in enumerate(d)]
    what = "the batch" if not fixed_batch else f"a fixed batch of {d[ax]}"
    return (f"{_shape_text(one)} with N samples along axis {ax} ({what}), a stack "
            f"{_shape_text(['S'] + one)} of such arrays, or {_shape_text(d[:ax] + d[ax + 1:])} for one sample")


def calibration_set(data, specs, batch: int = 1, where: str = "calibration data") -> CalibSet:
    """Check calibration data against the model's declared inputs and decide, per input, which axis
    holds the samples, the compiled input shapes and the batch.

    The rule (the model's declared input rank decides; ``frontend.batch_axis`` says which axis is a
    batch axis):
      * an input with a batch axis (a symbolic first dim named like a batch -- N, batch, batch_size,
        unk__3, ? -- or that same dim declared on another axis, as silero-vad's state [2, batch, 128]):
        an array of the declared rank holds its samples along that axis (today's [N, 3, 224, 224]);
        an array of rank + 1 is a stack of such arrays (their samples concatenated); an array of
        rank - 1 is one sample without its batch axis;
      * an input whose first dim is a fixed F: an array of exactly the declared shape is ONE sample
        (a state [2, 1, 128] is never split); an array of the declared rank whose first axis differs
        holds samples along that axis, F per run (a fixed batch, e.g. [1, 3, 224, 224] given
        [8, 3, 224, 224]; F > 1 then sets the batch);
      * any other input (a scalar, a [time, features] stream, a graph's [num_nodes, 85]): an array of
        the declared rank is ONE sample; rank + 1 is a stack of samples along a new axis 0;
      * an input given as one sample while the others give N is shared by all N samples (a scalar
        sample rate, an initial state); otherwise every input gives the same N;
      * a folder of .npz files: each file is read by the same rule, the samples concatenated in file
        name order (``collect`` then visits them in a canonical order, ``canonical_order``: by
        content, so neither the files' order nor their split into batches changes the statistics).
    The compiled shapes come from the declared dims, never from the number of samples: the batch axis
    gets ``batch`` (a fixed batch its declared size), other symbolic dims (time, sequence) the samples'
    size, which must then agree across samples and across inputs declaring the same dim name.  An
    input without a batch axis given per sample can only be calibrated at batch 1."""
    from .frontend import batch_axis, batch_dim_names

    parts = list(data) if isinstance(data, CalibFiles) else [(None, data)]
    names = [s.name for s in specs]
    bnames = batch_dim_names(specs)
    axes = {s.name: batch_axis(s, bnames) for s in specs}
    fixed: dict[str, int] = {}          # inputs read as a fixed batch of their declared first dim
    sym: dict[tuple[str, int], tuple[int, str]] = {}   # (input, axis) -> (size, where) of symbolic non-batch dims
    per_input: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    for f, part in parts:
        w = where if f is None else f"{where} ({Path(f).name})"
        missing = [n for n in names if n not in part]
        if missing:
            raise CalibrationError(f"{w} lacks input(s) {missing}; the model's inputs are {names}")
        extra = [k for k in part if k not in names]
        if extra:
            raise CalibrationError(f"{w} has key(s) {extra} that are not model inputs {names}")
        for s in specs:  # a fixed first dim given another size in some file: a fixed batch (samples on axis 0)
            a, r = np.asarray(part[s.name]), len(s.shape)
            if (axes[s.name] is None and r and isinstance(s.shape[0], int) and a.ndim == r and a.shape[0] != s.shape[0]
                    and all(isinstance(d, str) or a.shape[k] == d for k, d in enumerate(s.shape) if k)):
                fixed[s.name] = s.shape[0]
    for s in fixed:
        axes[s] = 0
    for f, part in parts:
        w = where if f is None else f"{where} ({Path(f).name})"
        counts = {}
        arrays = {}
        for s in specs:
            a = np.asarray(part[s.name])
            r = len(s.shape)
            ax = axes[s.name]
            bad = (f"{w}: input '{s.name}' (declared shape {_shape_text(s.shape)}) got an array of shape "
                   f"{_shape_text(a.shape)}; expected {_expected(s, ax, s.name in fixed)}")
            if ax is not None and a.ndim == r - 1 and s.name not in fixed:
                a = np.expand_dims(a, ax)  # one sample without its batch axis
            if a.ndim not in (r, r + 1):
                raise CalibrationError(bad)
            if ax is None:
                smp = a[None] if a.ndim == r else a
            else:
                if a.ndim == r:
                    smp = np.moveaxis(a, ax, 0)
                else:  # a stack of batches: their samples in order
                    st = np.moveaxis(a, ax + 1, 1)
                    smp = st.reshape((-1,) + st.shape[2:])
            one = smp.shape[1:]
            dims = [d for k, d in enumerate(s.shape) if k != ax]
            for k, d in enumerate(dims):
                if isinstance(d, int) and one[k] != d:
                    raise CalibrationError(f"{bad} (dim {k if ax is None or k < ax else k + 1} must be {d})")
            _check_values(w, s, smp)
            arrays[s.name] = smp.astype(s.dtype, copy=False)
            counts[s.name] = len(smp)
            for k, d in enumerate(s.shape):
                if isinstance(d, str) and k != ax:
                    size = one[k if ax is None or k < ax else k - 1]
                    prev = sym.setdefault((s.name, k), (size, w))
                    if prev[0] != size:
                        raise CalibrationError(
                            f"{where}: input '{s.name}' has samples of different sizes in its symbolic dim {k} "
                            f"('{d}'): {prev[0]} ({prev[1]}) vs {size} ({w}); the library is compiled for one size, "
                            "so give samples of equal size (pad or crop them)")
        n_part = max(counts.values())
        odd = {k: c for k, c in counts.items() if c not in (1, n_part)}
        if odd:
            raise CalibrationError(f"{w}: inputs disagree in the number of samples ("
                                   + ", ".join(f"'{k}' {c}" for k, c in counts.items())
                                   + "); give every input the same number, or one value to share")
        for k, a in arrays.items():
            if len(parts) > 1 and counts[k] == 1 and n_part > 1:
                a = np.repeat(a, n_part, axis=0)   # shared within this file; other files may differ
            per_input[k].append(a)
    arrays = {}
    for s in specs:
        a = per_input[s.name]
        a = a[0] if len(a) == 1 else np.concatenate(a)
        if axes[s.name] is None and len(a) > 1 and np.all(a == a[:1]):
            a = a[:1]  # the same value for every sample: one shared value
        arrays[s.name] = a
    n = max(len(a) for a in arrays.values()) if arrays else 0
    odd = {k: len(a) for k, a in arrays.items() if len(a) not in (1, n)}
    if odd:
        raise CalibrationError(f"{where}: inputs disagree in the number of samples ("
                               + ", ".join(f"'{k}' {len(a)}" for k, a in arrays.items()) + ")")
    if not n or any(len(a) == 0 for a in arrays.values()):
        empty = [k for k, a in arrays.items() if len(a) == 0]
        raise CalibrationError(f"{where} holds no samples" + (f" of input(s) {empty}" if empty else ""))
    # symbolic dims declared under one name are one size
    named: dict[str, tuple[int, str]] = {}
    for s in specs:
        for k, d in enumerate(s.shape):
            if isinstance(d, str) and d != "?" and (s.name, k) in sym:
                size = sym[(s.name, k)][0]
                prev = named.setdefault(d, (size, s.name))
                if prev[0] != size:
                    raise CalibrationError(f"{where}: inputs '{prev[1]}' and '{s.name}' declare the same dim '{d}' "
                                           f"but their samples give it sizes {prev[0]} and {size}")
    # the batch
    fb = fixed
    if len(set(fb.values())) > 1:
        raise CalibrationError(f"{where}: inputs " + ", ".join(f"'{k}' (fixed batch {v})" for k, v in fb.items())
                               + " disagree in the batch they declare")
    if fb:
        k, b = next(iter(fb.items()))
        if batch not in (1, b):
            raise ModelError(f"input '{k}' has a fixed batch of {b}; --batch {batch} is impossible for this model")
        batch = b
    elif batch > 1 and not any(ax is not None for ax in axes.values()):
        raise ModelError("the model declares no batch axis (inputs "
                         + ", ".join(f"'{s.name}' {_shape_text(s.shape)}" for s in specs)
                         + f"); --batch {batch} is impossible, compile with --batch 1")
    if batch > 1:
        for s in specs:
            if axes[s.name] is None and len(arrays[s.name]) > 1:
                raise CalibrationError(f"{where}: input '{s.name}' (declared shape {_shape_text(s.shape)}) has no "
                                       f"batch axis, so its {len(arrays[s.name])} per-sample values cannot run "
                                       f"{batch} at a time; compile with --batch 1 or give one value shared by all "
                                       "samples")
    shapes = {}
    for s in specs:
        ax = axes[s.name]
        one = list(arrays[s.name].shape[1:])
        shapes[s.name] = tuple(one) if ax is None else tuple(one[:ax] + [batch] + one[ax:])
    return CalibSet(arrays, axes, shapes, batch, n)


def calibration_groups(data, specs, batch: int, varied: set[str], where: str = "calibration data") -> list[CalibSet]:
    """Calibration samples whose sizes differ in the dims named ``varied`` (symbolic dims of a
    library compiled for a range of sizes, ``qcompiler/shape_spec.py``): one ``CalibSet`` per size,
    largest group first (the library's calibrated size; ties: the larger size).  A folder may mix
    sizes file by file (each file one size); an .npz holds one size.  The statistics of the groups,
    each run at its own shape, are merged (``merge_stats``): a scale is per tensor, valid at every
    size."""
    parts = list(data) if isinstance(data, CalibFiles) else [(None, data)]
    if not varied or len(parts) < 2:
        return [calibration_set(data, specs, batch, where)]
    from .frontend import batch_axis, batch_dim_names

    bnames = batch_dim_names(specs)
    axes = [(s.name, k) for s in specs for k, d in enumerate(s.shape)   # batch axes: samples, any count
            if isinstance(d, str) and d in varied and k != batch_axis(s, bnames)]
    if not axes:
        return [calibration_set(data, specs, batch, where)]

    def key(part):
        out = []
        for name, k in axes:
            a = np.asarray(part.get(name, np.zeros(0)))
            spec = next(s for s in specs if s.name == name)
            # the size of axis k of one sample: counted from the end (a leading samples axis may be added)
            off = len(spec.shape) - k
            out.append(int(a.shape[a.ndim - off]) if a.ndim >= off else -1)
        return tuple(out)

    groups: dict[tuple, CalibFiles] = {}
    for f, part in parts:
        groups.setdefault(key(part), CalibFiles()).append((f, part))
    sets = [calibration_set(g, specs, batch, where) for g in groups.values()]
    return sorted(sets, key=lambda c: (-c.n, -sum(int(np.prod(v)) for v in c.shapes.values())))


def merge_stats(a: TensorStats, b: TensorStats, rng: np.random.Generator) -> TensorStats:
    """The statistics of two disjoint sets of values of one tensor (e.g. calibrated at two sizes of a
    symbolic dim): exact extremes, exact top-|x| tail, counts, per-channel extremes and mean squares
    where the channel axis has one size in both (else dropped), and a subsample that draws from each
    in proportion to its count."""
    count = a.count + b.count
    same_chan = (a.chan_lo is not None and b.chan_lo is not None and a.chan_axis == b.chan_axis
                 and len(a.chan_lo) == len(b.chan_lo))
    # subsample: at most RESERVOIR values, each side in proportion to how many values it stands for
    total = float(RESERVOIR)   # the largest sample whose parts are in proportion and available
    for smp, c in ((a.sample, a.count), (b.sample, b.count)):
        if c:
            total = min(total, len(smp) * count / c)
    take_a = min(len(a.sample), int(round(total * a.count / max(count, 1))))
    take_b = min(len(b.sample), int(round(total * b.count / max(count, 1))))
    ia = np.sort(rng.choice(len(a.sample), take_a, replace=False)) if take_a < len(a.sample) else np.arange(len(a.sample))
    ib = np.sort(rng.choice(len(b.sample), take_b, replace=False)) if take_b < len(b.sample) else np.arange(len(b.sample))
    sample = np.concatenate([a.sample[ia], b.sample[ib]]).astype(np.float32)
    sample_chan = (np.concatenate([a.sample_chan[ia], b.sample_chan[ib]])
                   if same_chan and a.sample_chan is not None and b.sample_chan is not None else None)
    top, tch = None, None
    if a.top_abs is not None and b.top_abs is not None:
        top = np.concatenate([a.top_abs, b.top_abs])
        tch = np.concatenate([a.top_chan, b.top_chan]) if same_chan and a.top_chan is not None and b.top_chan is not None else None
        order = np.argsort(-top, kind="stable")[:TOPK]
        top, tch = top[order], (tch[order] if tch is not None else None)
    if same_chan:
        ra, rb = a.count / max(len(a.chan_lo), 1), b.count / max(len(b.chan_lo), 1)   # rows per channel
        ms = (a.chan_ms * ra + b.chan_ms * rb) / max(ra + rb, 1) if a.chan_ms is not None and b.chan_ms is not None else None
        return TensorStats(min(a.lo, b.lo), max(a.hi, b.hi), sample, np.minimum(a.chan_lo, b.chan_lo),
                           np.maximum(a.chan_hi, b.chan_hi), sample_chan, ms, top, tch, count, a.chan_axis,
                           _merge_ms1(a, b))
    return TensorStats(min(a.lo, b.lo), max(a.hi, b.hi), sample, None, None, None, None, top, None, count, -1,
                       _merge_ms1(a, b))


def _merge_ms1(a: TensorStats, b: TensorStats) -> np.ndarray | None:
    if a.ms_axis1 is None or b.ms_axis1 is None or len(a.ms_axis1) != len(b.ms_axis1):
        return None
    return (a.ms_axis1 * a.count + b.ms_axis1 * b.count) / max(a.count + b.count, 1)


def canonical_order(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The samples sorted by a hash of their contents (every input's values of that sample), so the
    statistics (the random subsample included) do not depend on the order of the files in a
    calibration folder nor on how the samples are split into files or stacked into batches
    (``tests/test_reliability.py``).  Shared values (one for all samples) stay as they are."""
    import hashlib

    per = [k for k in sorted(arrays) if len(arrays[k]) == n]
    if n < 2 or not per:
        return arrays
    digests = []
    for i in range(n):
        h = hashlib.sha256()
        for k in per:
            a = np.ascontiguousarray(arrays[k][i])
            h.update(str((k, a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        digests.append(h.digest())
    order = np.asarray(sorted(range(n), key=digests.__getitem__))
    if np.array_equal(order, np.arange(n)):
        return arrays
    return {k: (a[order] if len(a) == n else a) for k, a in arrays.items()}


def check_inputs(data: dict[str, np.ndarray], specs, where: str = "calibration data") -> dict[str, np.ndarray]:
    """Legacy form (first axis of every array = samples): validate names, ranks, dtypes and finiteness
    against the model's declared inputs.  ``calibration_set`` applies the full rule."""
    if isinstance(data, CalibFiles):
        try:
            data = {k: np.concatenate([p[k] for _, p in data], axis=0) for k in data[0][1]}
        except (ValueError, KeyError) as e:
            raise CalibrationError(f"{where}: calibration files disagree in shape or keys ({e})") from None
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
        if a.ndim != len(s.shape) or a.ndim == 0:
            raise CalibrationError(f"{where}: input '{s.name}' has shape {a.shape}; the model expects rank "
                                   f"{len(s.shape)} {tuple(s.shape)} (first axis = samples)")
        for k, d in enumerate(s.shape):
            if k > 0 and isinstance(d, int) and a.shape[k] != d:
                raise CalibrationError(f"{where}: input '{s.name}' has shape {a.shape}; dim {k} must be {d}")
        _check_values(where, s, a)
        a = a.astype(s.dtype)
        if n0 is None:
            n0 = a.shape[0]
        elif a.shape[0] != n0:
            raise CalibrationError(f"{where}: inputs disagree in the number of samples ({n0} vs {a.shape[0]})")
        out[s.name] = a
    if not n0:
        raise CalibrationError(f"{where} holds no samples")
    return out


def _as_set(data, batch: int) -> CalibSet:
    """A legacy dict (first axis = samples, every input batched on axis 0) as a ``CalibSet``."""
    if isinstance(data, CalibSet):
        return data
    n = next(iter(data.values())).shape[0]
    return CalibSet(dict(data), {k: 0 for k in data}, {k: (batch,) + v.shape[1:] for k, v in data.items()}, batch, n)


def check_memory(graph, tensors: list[str], data: "CalibSet | dict[str, np.ndarray]", batch: int) -> None:
    """Refuse (one line, ResourceError) a calibration whose tensors of one batch cannot be held together."""
    from .frontend import check_memory as check, tensor_bytes

    sizes = {t: tensor_bytes(graph.shapes[t], graph.dtypes.get(t, "float32")) for t in tensors if t in graph.shapes}
    shapes = {i: tuple(graph.shapes[i]) for i in graph.inputs if i in graph.shapes}
    cs = _as_set(data, batch)
    feeds = sum(tensor_bytes(cs.shapes[k], str(v.dtype)) for k, v in cs.arrays.items())
    # onnxruntime's buffers and the returned copies: twice the exposed tensors
    check({k: 2 * v for k, v in sizes.items()}, f"calibration (batch {batch})", shapes, extra=feeds)


def _ort_failure(e: Exception, start: int | None, model: onnx.ModelProto | None = None) -> Exception:
    from .frontend import is_ort_error, ort_message

    if not is_ort_error(e):
        return e
    where = "building the calibration session" if start is None else f"calibrating (samples {start}..)"
    return ModelError(f"onnxruntime fails {where}: {ort_message(e, model=model)}; check the node's weights, attributes and the "
                      "calibration data")


def collect(model: onnx.ModelProto, data: "CalibSet | dict[str, np.ndarray]", tensors: list[str],
            batch: int, seed: int = 0, tap=None) -> dict[str, TensorStats]:
    """Run ``model`` (frozen to the compiled shapes) over ``data`` (a ``CalibSet``, or a legacy dict whose
    arrays hold the samples on axis 0, run ``batch`` at a time) and gather stats of ``tensors``.
    ``tap`` (``calib_hessians.FloatHessians``) also gets every batch of the tensors it wants."""
    rep = progress.get()
    data = _as_set(data, batch)
    data = CalibSet(canonical_order(data.arrays, data.n), data.axes, data.shapes, data.batch, data.n)
    inputs = [t for t in tensors if t in data.arrays]
    tensors = [t for t in tensors if t not in data.arrays]
    try:
        sess = session(expose(model, tensors))
    except Exception as e:
        err = _ort_failure(e, None, model)
        if err is e:
            raise
        raise err from None
    n, batch = data.n, data.batch
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the exception carries onnxruntime's message; no second copy on stderr
    rng = np.random.default_rng(seed)
    lo = {t: np.inf for t in tensors + inputs}
    hi = {t: -np.inf for t in tensors + inputs}
    samples = {t: Reservoir(RESERVOIR, rng) for t in tensors + inputs}
    shapes_seen: dict[str, tuple] = {}
    clo: dict[str, np.ndarray] = {}
    chi: dict[str, np.ndarray] = {}
    csq: dict[str, np.ndarray] = {}
    crows: dict[str, int] = {}
    ms1: dict[str, np.ndarray | None] = {}   # rank 3: sum of x^2 per index of axis 1 (ms_axis1)
    tops: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    count: dict[str, int] = {}
    chunks = range(0, n, batch)
    wanted = tap.wants() if tap is not None else set()
    for start in rep.iterate(chunks, total=len(chunks), desc="calibrating"):
        feeds = data.feeds(start)  # the last chunk repeats samples (ranges unaffected)
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
            fill = np.abs(v) >= FILL_MAGNITUDE   # False for NaN
            if fill.any() or not np.all(np.isfinite(v)):
                fin = np.isfinite(v) & ~fill
                if np.isnan(v).any() or not fin.any():
                    raise CalibrationError(f"tensor '{t}' becomes NaN/Inf on the calibration data (samples {start}..): "
                                           "the float model overflows on these inputs; check that they are scaled "
                                           "and normalized as the model expects")
                # +-Inf or a float's extreme from an explicit fill (masked_fill(-inf), (1 - mask) *
                # finfo.min): the range is the other values' (such an element saturates to the
                # integer dtype's end)
                v = np.clip(v, v[fin].min(), v[fin].max())
            if tap is not None and t in wanted:
                tap.tap(t, v)
            shapes_seen[t] = v.shape
            lo[t] = min(lo[t], float(v.min()))
            hi[t] = max(hi[t], float(v.max()))
            cax = channel_axis(v.ndim)
            cstride = int(np.prod(v.shape[cax + 1:])) if cax >= 0 else 1   # flat index -> channel: (i // cstride) % C
            if v.ndim >= 2:
                vc = np.moveaxis(v, cax, -1)
                c = vc.shape[-1]
                vlo, vhi = vc.reshape(-1, c).min(axis=0), vc.reshape(-1, c).max(axis=0)
                clo[t] = np.minimum(clo[t], vlo) if t in clo else vlo
                chi[t] = np.maximum(chi[t], vhi) if t in chi else vhi
                sq = np.square(vc.reshape(-1, c), dtype=np.float64).sum(axis=0)
                csq[t] = csq[t] + sq if t in csq else sq
                crows[t] = crows.get(t, 0) + v.size // c
            if v.ndim == 3 and ms1.get(t, 0) is not None:
                s1 = np.square(v, dtype=np.float64).sum(axis=(0, 2))
                ms1[t] = s1 if t not in ms1 else (ms1[t] + s1 if len(ms1[t]) == len(s1) else None)
            flat = v.reshape(-1)
            a = np.abs(flat.astype(np.float64))
            k = min(TOPK, a.size)
            sel = np.argpartition(-a, k - 1)[:k] if a.size > k else np.arange(a.size)
            ch = (sel // cstride % v.shape[cax]) if v.ndim >= 2 else np.zeros(len(sel), np.int64)
            if t in tops:
                a_old, c_old = tops[t]
                av, cv = np.concatenate([a_old, a[sel]]), np.concatenate([c_old, ch])
            else:
                av, cv = a[sel], ch
            order = np.argsort(-av, kind="stable")[:TOPK]
            tops[t] = (av[order], cv[order])
            count[t] = count.get(t, 0) + flat.size
            chan_of = (lambda i, cs=cstride, c=v.shape[cax]: (i // cs % c).astype(np.int32)) if v.ndim >= 2 else None
            samples[t].add(flat, chan_of)
    out = {}
    for t in tensors + inputs:
        if not np.isfinite(lo[t]):
            continue
        smp, smp_chan = samples[t].values, samples[t].chans
        per = t in clo and smp_chan is not None
        rank = len(shapes_seen.get(t, ())) if t in shapes_seen else 0
        out[t] = TensorStats(lo[t], hi[t], smp, clo.get(t) if per else None, chi.get(t) if per else None,
                             smp_chan if per else None,
                             csq[t] / max(crows[t], 1) if per else None,
                             tops[t][0] if t in tops else None, tops[t][1] if (t in tops and per) else None,
                             count.get(t, 0), channel_axis(rank) if per else -1,
                             ms1[t] * len(ms1[t]) / max(count.get(t, 0), 1) if ms1.get(t) is not None else None)
    return out


FILL_MAGNITUDE = 1e30
"""|x| from which a calibrated value is a fill standing for -inf / +inf (a mask's finfo.min), not a
magnitude: left out of the range (``collect``)."""


class Reservoir:
    """A uniform random sample, without replacement, of at most ``size`` values of a stream of
    batches, in O(size) memory whatever the number of samples (bottom-k sampling: every value gets
    a uniform key in [0, 1) and the ``size`` smallest keys are kept).  A batch of m values costs one
    binomial draw -- how many of its keys fall below the current k-th smallest key tau -- and keys
    for just those, uniform in [0, tau): the same distribution as keying all m values."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.keys = np.zeros(0, np.float32)
        self.values = np.zeros(0, np.float32)
        self.chans: np.ndarray | None = None

    def add(self, flat: np.ndarray, chan_of=None) -> None:
        """``flat``: the batch's values; ``chan_of(indices)``: their channels (None: not recorded)."""
        m = flat.size
        tau = float(self.keys.max()) if len(self.keys) >= self.size else 1.0
        k = m if tau >= 1.0 and m <= self.size else int(self.rng.binomial(m, tau))
        if k == 0:
            return
        # (unsorted indices and survivors: the sample is a set, every statistic of it is order-free,
        # and the two sorts were a third of a compile's calibration time)
        idx = np.arange(m) if k == m else self.rng.choice(m, k, replace=False)
        keys = (self.rng.random(k) * tau).astype(np.float32)
        vals = flat[idx].astype(np.float32)
        ch = chan_of(idx) if chan_of is not None else None
        keys, vals = np.concatenate([self.keys, keys]), np.concatenate([self.values, vals])
        if ch is not None:
            ch = np.concatenate([self.chans, ch]) if self.chans is not None else ch
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[:self.size]
            keys, vals = keys[keep], vals[keep]
            ch = ch[keep] if ch is not None else None
        self.keys, self.values, self.chans = keys, vals, ch


def channel_axis(rank: int) -> int:
    """The axis whose per-channel statistics are recorded: 1 for NCHW activations (rank 4: what a
    conv reads), the last axis otherwise (what a Dense reads)."""
    return 1 if rank == 4 else -1


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
