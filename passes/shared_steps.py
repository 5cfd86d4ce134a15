"""One calibrated range per role of an unrolled recurrence, shared by all its time steps.

``unroll_recurrent.py`` (ONNX LSTM / GRU / RNN) and ``unroll_loop.py`` (ONNX Loop) name the tensors
of time step t ``.../step<t>/...``, the rest of the name saying the role (a gate, the cell state,
the hidden state).  Calibrated one by one, each step's tensors would get scales of their own, so
each step would be a different integer function: T copies of every kernel and table to build.
Here the statistics of the tensors of one role whose ranges are within a factor of sqrt(2) of each
other (``BUCKET``) are merged (union of ranges, pooled samples, per-channel extremes and tails), so
those steps get the same scales and lower to identical kernels, which the build shares; a state
whose range grows over the sequence gets a few scales, one per bucket, not one per step.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from qcompiler.calibrate import TOPK, TensorStats

STEP = re.compile(r"/step(\d+|\*)/")


def role(name: str) -> str | None:
    """``.../step<t>/...`` -> ``.../step*/...``; a loop body's own names (``step*``,
    ``qcompiler/intops/recurrent.py``) are their role; None outside a step."""
    return STEP.sub("/step*/", name) if "/step" in name and STEP.search(name) else None


def merge(stats: list[TensorStats]) -> TensorStats:
    """The statistics of the union of the tensors' values (as if calibration had seen one tensor)."""
    first = stats[0]
    lo, hi = min(s.lo for s in stats), max(s.hi for s in stats)
    n_keep = max(len(s.sample) for s in stats)
    sample = np.concatenate([s.sample for s in stats])
    pick = np.linspace(0, len(sample) - 1, num=min(n_keep, len(sample))).astype(np.int64) if len(sample) else None
    same_ch = all(s.chan_lo is not None and s.chan_lo.shape == first.chan_lo.shape for s in stats) \
        if first.chan_lo is not None else False
    chan_lo = np.min([s.chan_lo for s in stats], axis=0) if same_ch else None
    chan_hi = np.max([s.chan_hi for s in stats], axis=0) if same_ch else None
    sample_chan = None
    if same_ch and all(s.sample_chan is not None for s in stats):
        sample_chan = np.concatenate([s.sample_chan for s in stats])[pick]
    chan_ms = None
    counts = np.array([max(s.count, 1) for s in stats], np.float64)
    if same_ch and all(s.chan_ms is not None for s in stats):
        chan_ms = np.sum([s.chan_ms * c for s, c in zip(stats, counts)], axis=0) / counts.sum()
    top_abs = top_chan = None
    if all(s.top_abs is not None for s in stats):
        top_abs = np.concatenate([s.top_abs for s in stats])
        order = np.argsort(-top_abs, kind="stable")[:TOPK]
        if same_ch and all(s.top_chan is not None for s in stats):
            top_chan = np.concatenate([s.top_chan for s in stats])[order]
        top_abs = top_abs[order]
    return TensorStats(lo, hi, sample[pick] if pick is not None else sample, chan_lo, chan_hi, sample_chan,
                       chan_ms, top_abs, top_chan, int(sum(s.count for s in stats)), first.chan_axis)


BUCKET = np.sqrt(2.0)
"""Steps of one role share their range when their own ranges fall in one bucket of this ratio
(by the larger magnitude of the range): a step quantizes with at most half a bit less resolution
than its own range would give.  One range for all steps would cost the early steps of a long
recurrence (small states, a range grown by the late ones) several bits: an 80-step, 3-layer LSTM's
output cosine fell from 0.67 to 0.33 that way."""


def _bucket(st: TensorStats) -> int:
    m = max(abs(st.lo), abs(st.hi))
    return int(np.ceil(np.log(m) / np.log(BUCKET))) if m > 0 else -(1 << 30)


def share_step_ranges(stats: dict[str, TensorStats]) -> dict[str, TensorStats]:
    """``stats`` with the tensors of each role of an unrolled recurrence whose ranges fall in one
    bucket (``BUCKET``) given their merged stats."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in stats:
        r = role(name)
        if r is not None:
            groups[(r, _bucket(stats[name]))].append(name)
    out = dict(stats)
    for names in groups.values():
        if len(names) > 1:
            m = merge([stats[n] for n in names])
            for n in names:
                out[n] = m
    return out
