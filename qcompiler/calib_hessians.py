"""The layer Hessians of GPTQ weight rounding, gathered during the float calibration run.

Rounding each weight to its nearest integer on its own (RTN) is the best choice for every weight
alone but not for the layer: the output error of a channel is sum_k (w_k - s q_k) x_k, and inputs
that move together (neighbouring pixels, the taps of a smooth image) add their rounding errors.
GPTQ (``qcompiler/mixed/gptq.py``) picks the integers that minimise the output error over the
calibration inputs, E||X w - X s q||^2, greedily with the layer Hessian

    H = 2 X^T X / rows     (X: the layer's inputs, one row per output position; im2col patches
                            per group for a conv, the rows of x for a dense layer)

at the same per-channel scales, so the op and its reference do not change, only which integer
each weight gets.  It matters at 8 bits too: a 3x3 depthwise filter whose taps sum to ~0 (an edge
detector) keeps a DC response below one weight step under RTN, and a following BatchNorm of
variance 1e-4 multiplies that residue by 50; GPTQ keeps the sum (its error feedback spreads the
rounding error of one tap over the others).  Measured in ONNX Runtime FP32 with only the conv
weights at 8 bits (32 rendered text lines, greedy CTC strings equal to FP32's): PP-OCRv2 rec 18 ->
25, v3 28 -> 30, v4 21 -> 32.

X here is the float model's activation (onnxruntime, the calibration run): ``calibrate.collect``
hands every batch of the tensors in ``wants()`` to ``tap``, so no second run is needed.  A layer
whose input is not a tensor of the calibration model (a float pass made it) or has more than
``MAX_ROWS`` inputs per channel (its Hessian could not be full rank) keeps RTN.  A per-channel
smoothing of a layer's input (``passes/smooth.py``) transforms its Hessian (``set_input_scale``).
"""

from __future__ import annotations

import numpy as np

from .graph import Graph, Node
from .mixed.gptq import MAX_ROWS, HessianStore, conv_patches, dense_rows


def _conv_geometry(fg: Graph, n: Node) -> dict:
    """The integer conv's geometry (``intops/gemm.py`` ``conv2d_geometry``) and its 4-D kernel shape."""
    from .intops.gemm import conv2d_geometry

    W = fg.consts[n.inputs[1]]
    return {**conv2d_geometry(fg, n), "kshape": W.shape if W.ndim == 4 else W.shape[:2] + (1, W.shape[2])}


def gemm_inputs(fg: Graph) -> dict[str, list[Node]]:
    """Input tensor -> the Conv (constant 1-D / 2-D weights) and Dense layers that read it, for
    the layers with at most MAX_ROWS inputs per output channel."""
    out: dict[str, list[Node]] = {}
    for n in fg.nodes:
        if n.op == "Conv" and len(n.inputs) > 1 and n.inputs[1] in fg.consts and fg.consts[n.inputs[1]].ndim in (3, 4):
            k = int(np.prod(fg.consts[n.inputs[1]].shape[1:]))
        elif n.op == "Dense" and n.attrs.get("weight") is not None:
            k = int(n.attrs["weight"].shape[0])
        else:
            continue
        if k <= MAX_ROWS:
            out.setdefault(n.inputs[0], []).append(n)
    return out


class FloatHessians:
    """Accumulates ``store`` (a ``HessianStore`` keyed by the float graph's node names) from the
    batches of the calibration run; ``runs`` is how many batches there will be (rows per layer are
    spread evenly over them)."""

    def __init__(self, fg: Graph, runs: int, max_rows: int = MAX_ROWS, seed: int = 0):
        self.fg = fg
        self.readers = gemm_inputs(fg)
        self.store = HessianStore(seed)
        self.per_run = max(64, max_rows // max(runs, 1))
        self._geom = {n.name: _conv_geometry(fg, n) for ns in self.readers.values() for n in ns if n.op == "Conv"}

    def wants(self) -> set[str]:
        return set(self.readers)

    def tap(self, name: str, v: np.ndarray) -> None:
        v = np.asarray(v)
        if tuple(v.shape) != tuple(self.fg.shape(name)) or not np.issubdtype(v.dtype, np.floating):
            return  # not the float graph's tensor at this shape: those layers keep RTN
        for n in self.readers.get(name, ()):
            if n.op == "Conv":
                geo = self._geom[n.name]
                x = v[:, :, None, :] if v.ndim == 3 else v
                mats = conv_patches(x, geo, geo["kshape"], self.store.rng, self.per_run)
            else:
                mats = [dense_rows(v, self.store.rng, self.per_run)]
            self.store.add_rows(n.name, mats)
