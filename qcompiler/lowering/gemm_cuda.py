"""Conv / dense lowering onto the tensor-core kernels (``qcompiler.kernels.cuda_mma``).

Each quantized layer becomes one ``call_tir`` of a scheduled ``mma.sync`` kernel computing, fused,

    acc = sum_k A*W + bias  (int32);   y = clip((int64(acc) * mult + 2^(shift-1)) >> shift, lo, hi)

(the reference's ``conv`` / ``dense`` exactly).  Conv and dense layers go through the CUDA GEMM
backends of ``qcompiler/kernels/backends/`` (``select_cuda(arch, weight bits, activation bits)``:
``cuda_int4`` native s4 where the arch has it and the activations are 4-bit, ``cuda_w4a8`` for
4-bit weights, ``cuda_int8``); a backend whose kernel rejects the layer hands it to the next wider
one (``cuda_fallbacks``: exact, 4-bit codes are int8 values), with a warning.  The backend gives
the tuning workload, the TIR builder and the stored weight operand of the GEMM's W [N, K]:

  dense    W [N, K] = the graph's [K, N] transposed
  conv     W [OC, KH*KW*C] with k = (kh*KW + kw)*C + c  (ONNX [OC, C, KH, KW] -> OHWI, flattened)
  stored   int8 (``cuda_int8``), ``pack_int4(W, "mma_k32")`` int32 words (``cuda_w4a8``: unpacked in
           registers into the int8 mma; every arch, the 4-bit path of sm_90 which has no s4 mma)
  matmul   two activations (attention): ``batch_matmul`` with B as [batch, N, K], made by the
           layout tracking (``BatchMatmul.operands``): a transposed K in Q.K^T is stored with K
           innermost already (at most a permute of the batch / head axes, no copy if none); a B
           stored [.., K, N] (V in P.V) gets a Relax permute_dims first, because ``ldmatrix.trans``
           moves 16-bit elements and cannot transpose int8 tiles

Grouped / depthwise convolutions (no GEMM worth a tensor core), activation dtypes other than
int8/uint8, a uint8 right matmul operand, broadcast matmul batch dims and shapes a kernel rejects
(``KernelUnsupported``) fall back to the generic Relax lowering, scheduled by dlight, with a
warning naming the layer.  Each kernel takes the best tuned
``MmaConfig`` of the active tuning log (``qcompiler.tune.apply``), else ``default_config``.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from qcompiler import progress
from qcompiler.graph import Node
from qcompiler.kernels import backends as KB
from qcompiler.kernels import cuda_mma as K
from qcompiler.tune import apply as tuned

from .gemm import BatchMatmul, KernelGemm, conv_out_hw, scalar_requant
from .relax_lower import Value, const


class CudaGemm(KernelGemm):
    name = "cuda_mma"

    def __init__(self, target):
        super().__init__(target)
        self.arch = str(target.attrs.get("arch", "sm_80"))

    @staticmethod
    def _epi(a):
        return [const(np.asarray(a["bias"], np.int32), "int32"), const(np.asarray(a["mult"], np.int64), "int64"),
                const(np.asarray(a["shift"], np.int64), "int64")]

    def _backends(self, n: Node, x_dtype: str):
        """The layer's backend and its exact fallbacks (``backends.select_cuda`` by the layer's weight
        bits and activation bits, then ``cuda_fallbacks``), or ([], why)."""
        bits = int(n.attrs.get("weight_bits", 8) or 8)
        a_bits = KB.a_bits_of(x_dtype)
        be = KB.select_cuda(self.arch, bits, a_bits) if a_bits is not None else None
        if be is None:
            why = (f"activation dtype must be one of ('int8', 'uint8'), got {x_dtype!r}" if a_bits is None
                   else f"no tensor-core kernel for {bits}-bit weights x {a_bits}-bit activations on {self.arch}")
            return [], why
        return [b for b in (be, *KB.cuda_fallbacks(be, self.arch)) if x_dtype in b.a_dtypes], None

    def _gemm(self, lw, n: Node, x, x_dtype: str, shape, out_shape, op: str, build, pack) -> relax.Expr | None:
        """One call_tir of the first backend whose kernel takes the layer (a 4-bit layer that its
        4-bit kernel rejects runs on the next wider backend, warned); None when none does."""
        cands, why = self._backends(n, x_dtype)
        a = n.attrs
        for i, be in enumerate(cands):
            try:
                wl = be.workload(self.arch, n, x_dtype, shape)
                f = tuned.generate(wl, n.name, lambda cfg, be=be: build(be, cfg))
                wk, wdt = pack(be)
            except (K.KernelUnsupported, ValueError) as e:
                why = f"{be.name}: {e}"
                if i + 1 < len(cands):
                    progress.get().warn(f"layer '{n.name}' runs on {cands[i + 1].name} ({why})")
                continue
            return self._call(lw, f, f"{op}_{be.tag}", [x, const(wk, wdt), *self._epi(a)], out_shape, a["dtype"])
        self._fallback(n, why or "no tensor-core backend")
        return None

    def conv(self, lw, n: Node, x, x_dtype: str, nhwc_shape) -> relax.Expr:
        a = n.attrs
        w = np.asarray(a["weight"])  # [OC, C/g, KH, KW]
        from qcompiler.symbolic import is_static

        N, H, W, C = nhwc_shape  # a symbolic batch: the kernel's rows
        OC, _, KH, KW = w.shape
        why = (f"grouped convolution (group={a['group']}) has no tensor-core kernel" if int(a["group"]) != 1 else
               "a symbolic image height / width (the implicit GEMM kernel takes a symbolic batch only)"
               if not (is_static(H) and is_static(W) and is_static(C)) else None)
        if why is not None:
            self._fallback(n, why)
            return super().conv(lw, n, x, x_dtype, nhwc_shape)
        N = int(N) if is_static(N) else N
        H, W, C = int(H), int(W), int(C)
        geo, lo, hi = (a["strides"], a["pads"], a["dilations"]), int(a["lo"]), int(a["hi"])
        OH, OW = conv_out_hw(H, W, a)

        def build(be, cfg):
            return be.conv2d(N, H, W, C, OC, KH, KW, *geo, x_dtype, a["dtype"], lo, hi, self.arch, config=cfg)

        y = self._gemm(lw, n, x, x_dtype, (N, H, W, C), (N, OH, OW, OC), "conv", build, lambda be: be.pack_conv(w))
        return y if y is not None else super().conv(lw, n, x, x_dtype, nhwc_shape)

    def dense(self, lw, n: Node, x, x_dtype: str, M: int, Kd: int) -> relax.Expr:
        a = n.attrs
        w = np.asarray(a["weight"])  # [K, N]
        N = int(w.shape[1])
        lo, hi = int(a["lo"]), int(a["hi"])

        def build(be, cfg):
            return be.dense(M, N, Kd, x_dtype, a["dtype"], lo, hi, self.arch, config=cfg)

        y = self._gemm(lw, n, x, x_dtype, (M, Kd), (M, N), "dense", build, lambda be: be.pack_dense(w))
        return y if y is not None else super().dense(lw, n, x, x_dtype, M, Kd)

    def matmul(self, lw, n: Node, a: Value, b: Value) -> relax.Expr:
        at = n.attrs
        plan = BatchMatmul.plan(a.shape, b.shape)
        rq = scalar_requant(at)
        why = None
        if isinstance(plan, str):
            why = plan
        elif rq is None:
            why = "per-channel requantization of a matmul"
        else:
            try:
                f = K.batch_matmul(plan.batch, plan.M, plan.N, plan.K, a.dtype, b.dtype, at["dtype"],
                                   int(at["lo"]), int(at["hi"]), self.arch)
            except K.KernelUnsupported as e:
                why = str(e)
        if why is not None:
            self._fallback(n, why)
            return super().matmul(lw, n, a, b)
        a3, b3 = plan.operands(lw, a, b, b_trans=True)
        args = [a3, b3, const(rq[0], "int64"), const(rq[1], "int64")]
        y = self._call(lw, f, "matmul_mma", args, (plan.batch, plan.M, plan.N), at["dtype"])
        return lw.emit(relax.op.reshape(y, lw.ig.shapes[n.outputs[0]]))
