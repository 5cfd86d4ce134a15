"""4-bit weights that survive post-training: per-output-channel scales + GPTQ rounding.

Round-to-nearest (RTN) quantizes every weight on its own.  GPTQ (Frantar et al. 2022, after Optimal
Brain Quantization) quantizes the input dimensions of a layer one at a time and spreads each
rounding error over the not-yet-quantized weights of the same output channel, weighted by the
layer Hessian of the squared output error

    H = 2 X^T X / rows        (X: the layer's calibration inputs, one row per output position)

so that sum_rows ||X w - X w_q||^2 is minimised greedily (forward passes only, no autograd).  With
U the upper Cholesky factor of H^-1 (dampened by 1% of mean diag(H)), for column k:

    q_k = clip(round(w_k / s), -2^(b-1), 2^(b-1) - 1);   e = (w_k - s q_k) / U[k, k]
    w_{k+1:} -= e * U[k, k+1:]

processed in blocks of 128 columns with the lazy batch update of the paper (same result, matmuls
instead of rank-1 updates).  The scales s stay those of ``docs/design.md §2`` (max|w| / (2^(b-1)-1)
per output channel, raised where the int32 bias needs it), so the integer op and its reference do
not change: only which integer each weight gets.

A layer with fewer calibration rows than inputs per channel (rows < K) is rounded to nearest:
its Hessian is singular and GPTQ would fit the few samples instead of the input distribution.

Inputs: the integer graph's own activations (the INT8 model run by the NumPy reference executor
on calibration samples), i.e. exactly what the deployed layer reads; for convs the im2col patches
(per group, rows subsampled to ``MAX_ROWS``), for dense layers the rows of x.  The scale of x does
not matter (H is only used up to a factor).
"""

from __future__ import annotations

import numpy as np

MAX_ROWS = 4096
DAMP = 0.01
BLOCK = 128


def rtn(w2d: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Round to nearest: w2d [N, K] (one row per output channel), scale [N] -> int8 [N, K]."""
    qmax = 2 ** (bits - 1) - 1
    return np.clip(np.round(w2d / scale[:, None]), -qmax - 1, qmax).astype(np.int8)


def gptq(w2d: np.ndarray, scale: np.ndarray, H: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ rounding of w2d [N, K] with per-row scales [N] and Hessian H [K, K] -> int8 [N, K]."""
    qmax = 2 ** (bits - 1) - 1
    W = np.array(w2d, dtype=np.float64, copy=True)
    N, K = W.shape
    H = np.array(H, dtype=np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(K)] += DAMP * max(float(np.mean(np.diag(H))), 1e-12)
    try:
        Hinv = np.linalg.inv(H)
        U = np.linalg.cholesky(Hinv).T  # upper: Hinv = U^T U
    except np.linalg.LinAlgError:
        return rtn(w2d, scale, bits)
    s = scale[:, None]
    Q = np.zeros((N, K), dtype=np.int8)
    for b0 in range(0, K, BLOCK):
        b1 = min(b0 + BLOCK, K)
        Wb = W[:, b0:b1].copy()
        Ub = U[b0:b1, b0:b1]
        Eb = np.zeros_like(Wb)
        for j in range(b1 - b0):
            w = Wb[:, j]
            q = np.clip(np.round(w / s[:, 0]), -qmax - 1, qmax)
            Q[:, b0 + j] = q.astype(np.int8)
            e = (w - q * s[:, 0]) / Ub[j, j]
            Wb[:, j + 1:] -= np.outer(e, Ub[j, j + 1:])
            Eb[:, j] = e
        W[:, b1:] -= Eb @ U[b0:b1, b1:]
    # dead columns quantize to 0 whatever feedback reached them (their inputs are always 0)
    Q[:, dead] = 0
    return Q


def conv_patches(x: np.ndarray, attrs: dict, kshape: tuple, rng: np.random.Generator,
                 max_rows: int = MAX_ROWS) -> list[np.ndarray]:
    """im2col rows of a conv's NCHW input, one [rows, C/g*KH*KW] matrix per group (column order
    (c, kh, kw), the flattening of the weight [OC, C/g, KH, KW]), rows subsampled to ``max_rows``."""
    n, c, h, wd = x.shape
    _, cg, kh, kw = kshape
    (sh, sw), (dh, dw) = attrs["strides"], attrs["dilations"]
    pt, pl, pb, pr = attrs["pads"]
    group = int(attrs["group"])
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    total = n * oh * ow
    take = np.sort(rng.choice(total, size=min(total, max_rows), replace=False))
    ni, rest = np.divmod(take, oh * ow)
    oi, oj = np.divmod(rest, ow)
    xp = np.pad(x.astype(np.float32), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    out = []
    for g in range(group):
        cols = np.empty((len(take), cg, kh, kw), dtype=np.float32)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, i, j] = xp[ni, g * cg:(g + 1) * cg, oi * sh + i * dh, oj * sw + j * dw]
        out.append(cols.reshape(len(take), -1))
    return out


def dense_rows(x: np.ndarray, rng: np.random.Generator, max_rows: int = MAX_ROWS) -> np.ndarray:
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
    if len(x2) > max_rows:
        x2 = x2[np.sort(rng.choice(len(x2), size=max_rows, replace=False))]
    return x2


def hessian(rows: np.ndarray) -> np.ndarray:
    X = rows.astype(np.float64)
    return 2.0 * (X.T @ X) / max(len(X), 1)


class GroupHessians(list):
    """A layer's per-group Hessians, with the GPTQ results already computed from them (a search
    quantizes the same layer many times)."""

    def __init__(self, items=(), rows: int = 0):
        super().__init__(items)
        self.rows = rows
        self.memo: dict = {}


class HessianStore:
    """Per-layer Hessians (node name -> list of per-group [K, K] arrays), accumulated over batches of
    the INT8 model's activations (``add``, mixed precision) or of the float model's in the calibration
    run (``add_rows``, ``qcompiler/calib_hessians.py``), and read by the GEMM rule (``get``)."""

    def __init__(self, seed: int = 0):
        self._done: dict[str, GroupHessians] = {}
        self.sum: dict[str, list[np.ndarray]] = {}
        self.rows: dict[str, int] = {}
        self.scale: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(seed)

    def add(self, node, x: np.ndarray, max_rows: int = MAX_ROWS) -> None:
        """One batch of the integer graph's input ``x`` of its conv / dense ``node``."""
        a = node.attrs
        if node.op == "conv":
            mats = conv_patches(x, a, a["weight"].shape, self.rng, max_rows)
        else:
            mats = [dense_rows(x, self.rng, max_rows)]
        self.add_rows(node.name, mats)

    def add_rows(self, name: str, mats: list[np.ndarray]) -> None:
        """Input rows of layer ``name``, one [rows, K] matrix per group."""
        acc = self.sum.setdefault(name, [np.zeros((m.shape[1], m.shape[1])) for m in mats])
        if len(acc) != len(mats) or any(s.shape[0] != m.shape[1] for s, m in zip(acc, mats)):
            return  # another geometry under the same name (a retraced shape): keep the first
        for s, m in zip(acc, mats):
            X = m.astype(np.float64)
            s += X.T @ X
        self.rows[name] = self.rows.get(name, 0) + len(mats[0])
        self._done.pop(name, None)

    def set_input_scale(self, name: str, d: np.ndarray) -> None:
        """Layer ``name`` now reads x * d (per input column, d > 0: a per-channel smoothing of its
        input, ``passes/smooth.py``), so its Hessian is D H D.  Replaces an earlier factor."""
        d = np.asarray(d, np.float64)
        if name in self.scale and np.array_equal(self.scale[name], d):
            return  # the same smoothing again (a retrace): keep the memoised roundings
        self.scale[name] = d
        self._done.pop(name, None)

    def get(self, name: str) -> list[np.ndarray] | None:
        if name not in self.sum:
            return None
        if name not in self._done:
            r = max(self.rows[name], 1)
            d = self.scale.get(name)
            hs = (2.0 * s / r for s in self.sum[name])
            if d is not None:
                hs = (h * d[:, None] * d[None, :] for h in hs)
            self._done[name] = GroupHessians(hs, self.rows[name])
        return self._done[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sum

    def names(self) -> list[str]:
        return list(self.sum)


def quantize_grouped(W: np.ndarray, axis: int, scale: np.ndarray, bits: int,
                     H: list[np.ndarray] | None, group: int = 1) -> np.ndarray:
    """Integer weights of W (conv [OC, C/g, ...] with axis 0, dense [K, N] with axis 1) at the given
    per-output-channel scales: GPTQ with the per-group Hessians H when given, else RTN."""
    w2d = np.moveaxis(W, axis, 0).reshape(W.shape[axis], -1)  # [N, K]
    memo = getattr(H, "memo", None)
    key = None
    if memo is not None:
        import hashlib

        key = (bits, axis, W.shape, hashlib.blake2b(np.ascontiguousarray(W, np.float64).tobytes(), digest_size=16)
               .hexdigest(), np.asarray(scale, np.float64).tobytes())
        if key in memo:
            return memo[key].copy()
    if H is None or getattr(H, "rows", np.inf) < w2d.shape[1]:
        # fewer input rows than weights per channel (a dense head at batch 1 sees one row per
        # sample): H is singular there and GPTQ would fit the few samples, so round to nearest
        q = rtn(w2d, scale, bits)
    else:
        N = w2d.shape[0]
        ng = len(H)
        per = N // ng if ng else N
        q = np.empty(w2d.shape, np.int8)
        for g in range(ng):
            sl = slice(g * per, (g + 1) * per)
            q[sl] = gptq(w2d[sl], scale[sl], H[g], bits)
    shape = list(np.moveaxis(W, axis, 0).shape)
    out = np.ascontiguousarray(np.moveaxis(q.reshape(shape), 0, axis))
    if key is not None:
        memo[key] = out.copy()
    return out
