"""Conv / dense lowering onto the tensor-core kernels (``qcompiler.kernels.cuda_mma``).

Each quantized layer becomes one ``call_tir`` of a scheduled ``mma.sync`` kernel computing, fused,

    acc = sum_k A*W + bias  (int32);   y = clip((int64(acc) * mult + 2^(shift-1)) >> shift, lo, hi)

(the reference's ``conv`` / ``dense`` exactly).  Weight layouts are made at compile time:

  dense    W int8 [N, K]  (the graph stores [K, N]: transposed)
  conv     W int8 [OC, KH*KW*C] with k = (kh*KW + kw)*C + c  (ONNX [OC, C, KH, KW] -> OHWI, flattened)
  W4A8     a dense/conv layer quantized to 4-bit weights (``weight_bits`` == 4) on sm_90 uses
           ``dense_w4a8`` with ``pack_int4(w, order="mma_k32")`` (no native INT4 mma there)
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

from qcompiler.graph import Node
from qcompiler.kernels import cuda_mma as K
from qcompiler.kernels.int4_pack import pack_int4
from qcompiler.tune import apply as tuned
from qcompiler.tune import workload as tw

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

    def conv(self, lw, n: Node, x, x_dtype: str, nhwc_shape) -> relax.Expr:
        a = n.attrs
        w = np.asarray(a["weight"])  # [OC, C/g, KH, KW]
        N, H, W, C = (int(d) for d in nhwc_shape)
        OC, _, KH, KW = w.shape
        if int(a["group"]) != 1:
            self._fallback(n, f"grouped convolution (group={a['group']}) has no tensor-core kernel")
            return super().conv(lw, n, x, x_dtype, nhwc_shape)
        try:
            geo, lo, hi = (a["strides"], a["pads"], a["dilations"]), int(a["lo"]), int(a["hi"])
            wl = tw.cuda_conv(self.arch, N, H, W, C, OC, KH, KW, *geo, x_dtype, a["dtype"], lo, hi)
            f = tuned.generate(wl, n.name, lambda cfg: K.conv2d_nhwc(N, H, W, C, OC, KH, KW, *geo, a["dtype"], lo, hi,
                                                                     self.arch, config=cfg, a_dtype=x_dtype))
        except K.KernelUnsupported as e:
            self._fallback(n, str(e))
            return super().conv(lw, n, x, x_dtype, nhwc_shape)
        wk = np.ascontiguousarray(np.transpose(w, (0, 2, 3, 1)).reshape(OC, -1)).astype(np.int8)
        OH, OW = conv_out_hw(H, W, a)
        return self._call(lw, f, "conv_mma", [x, const(wk, "int8"), *self._epi(a)], (N, OH, OW, OC), a["dtype"])

    def dense(self, lw, n: Node, x, x_dtype: str, M: int, Kd: int) -> relax.Expr:
        a = n.attrs
        w = np.asarray(a["weight"])  # [K, N]
        N = int(w.shape[1])
        four = int(a.get("weight_bits", 8) or 8) == 4
        try:
            lo, hi = int(a["lo"]), int(a["hi"])
            wl = tw.cuda_dense(self.arch, M, N, Kd, x_dtype, a["dtype"], lo, hi, w4a8=four)
            if four:
                f = tuned.generate(wl, n.name, lambda cfg: K.dense_w4a8(M, N, Kd, a["dtype"], lo, hi, self.arch,
                                                                        config=cfg, a_dtype=x_dtype))
                wk = const(pack_int4(np.ascontiguousarray(w.T), order="mma_k32"), "int32")
                name = "dense_w4a8"
            else:
                f = tuned.generate(wl, n.name, lambda cfg: K.dense(M, N, Kd, a["dtype"], lo, hi, self.arch,
                                                                   config=cfg, a_dtype=x_dtype))
                wk = const(np.ascontiguousarray(w.T).astype(np.int8), "int8")
                name = "dense_mma"
        except K.KernelUnsupported as e:
            self._fallback(n, str(e))
            return super().dense(lw, n, x, x_dtype, M, Kd)
        return self._call(lw, f, name, [x, wk, *self._epi(a)], (M, N), a["dtype"])

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
