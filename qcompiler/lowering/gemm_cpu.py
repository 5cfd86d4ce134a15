"""Conv / dense lowering onto the AVX-512 VNNI kernels (``qcompiler.kernels.cpu_vnni``).

Each quantized layer becomes one ``call_tir`` of a scheduled kernel that computes, fused,

    acc = sum_k A*W + bias  (int32);   y = clip((int64(acc) * mult + 2^(shift-1)) >> shift, lo, hi)

which is the reference's ``conv`` / ``dense`` op exactly.  Weights are packed at compile time
(``pack_conv`` / ``pack_dense``: [N/16, K/4, 16, 4] int8, with the +128 offset of signed
activations folded into ``bias_eff``).  Routing by layer:

  group == 1                       -> conv2d_nhwc (implicit GEMM on vpdpbusd)
  group == C == OC (depthwise)     -> depthwise_conv2d_nhwc (direct, int32 vectors)
  other groups                     -> grouped_conv2d_nhwc
  dense (M x K @ K x N)            -> dense
  matmul of two activations        -> batch_matmul (B packed in the kernel; [batch, N, K] read
                                      as stored when B's last stored axis is K, e.g. a
                                      transposed K in attention, else [batch, K, N])

A layer a kernel cannot take (activation dtype other than int8/uint8, a uint8 right matmul
operand, broadcast matmul batch dims, K > MAX_K, a host without VNNI for the group == 1 / dense /
matmul kernels) falls back to ``GenericGemm`` with a warning naming it.
Kernels are marked ``op_pattern`` = opaque so FuseOps never merges them into other PrimFuncs.
The dense / group-1 conv kernels take the best tuned ``VnniConfig`` of the active tuning log
(``qcompiler.tune.apply``), else ``default_config``.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from qcompiler.graph import Node
from qcompiler.kernels import cpu_vnni as V
from qcompiler.tune import apply as tuned
from qcompiler.tune import workload as tw

from .gemm import BatchMatmul, KernelGemm, conv_out_hw, scalar_requant
from .relax_lower import Value, const


def target_has_vnni(target) -> bool:
    """The u8 x s8 kernels need AVX-512 VNNI in the generated code: LLVM's answer for the target's
    mcpu / mattr (any CPU it knows, e.g. rocketlake, cascadelake, znver4: yes; znver2, skylake-avx512:
    no); the host's flags when the target names no CPU."""
    from tvm.target import codegen

    attrs = target.attrs
    if not attrs.get("mcpu") and not attrs.get("mattr"):
        return V.host_has_vnni()
    return bool(codegen.llvm_cpu_has_features(["avx512vnni", "avx512bw"], target))


class CpuGemm(KernelGemm):
    name = "cpu_vnni"

    def __init__(self, target):
        super().__init__(target)
        self.vnni = target_has_vnni(target)

    @staticmethod
    def _epi(a):
        return (const(np.asarray(a["mult"], np.int64), "int64"), const(np.asarray(a["shift"], np.int64), "int64"))

    def conv(self, lw, n: Node, x, x_dtype: str, nhwc_shape) -> relax.Expr:
        a = n.attrs
        w = np.asarray(a["weight"])  # [OC, C/g, KH, KW] int8
        N, H, W, C = (int(d) for d in nhwc_shape)
        OC, _, KH, KW = w.shape
        g = int(a["group"])
        geo = (tuple(a["strides"]), tuple(a["pads"]), tuple(a["dilations"]))
        OH, OW = conv_out_hw(H, W, a)
        out_shape = (N, OH, OW, OC)
        if x_dtype not in V.ACT_DTYPES or a["dtype"] not in V.OUT_DTYPES:
            self._fallback(n, f"activation dtype {x_dtype} -> {a['dtype']} has no VNNI kernel")
            return super().conv(lw, n, x, x_dtype, nhwc_shape)
        mult, shift = self._epi(a)
        bias = np.asarray(a["bias"], np.int32)
        lo, hi = int(a["lo"]), int(a["hi"])
        try:
            if g == 1:
                if not self.vnni:
                    raise ValueError("the target CPU has no AVX-512 VNNI")
                wp, beff = V.pack_conv(w, bias, x_dtype == "int8")
                wl = tw.cpu_conv(self.target, N, H, W, C, OC, KH, KW, *geo, x_dtype, a["dtype"], lo, hi)
                f = tuned.generate(wl, n.name, lambda cfg: V.conv2d_nhwc(N, H, W, C, OC, KH, KW, *geo, x_dtype,
                                                                         a["dtype"], lo, hi, cfg))
                args = [x, const(wp, "int8"), const(beff, "int32"), mult, shift]
                return self._call(lw, f, "conv_vnni", args, out_shape, a["dtype"])
            if g == C and OC == C:
                wd = np.ascontiguousarray(np.transpose(w[:, 0], (1, 2, 0)))  # [KH, KW, C]
                f = V.depthwise_conv2d_nhwc(N, H, W, C, KH, KW, *geo, x_dtype, a["dtype"], lo, hi)
                args = [x, const(wd, "int8"), const(bias, "int32"), mult, shift]
                return self._call(lw, f, "dwconv_cpu", args, out_shape, a["dtype"])
            f = V.grouped_conv2d_nhwc(N, H, W, C, OC, KH, KW, *geo, g, x_dtype, a["dtype"], lo, hi)
            args = [x, const(w, "int8"), const(bias, "int32"), mult, shift]
            return self._call(lw, f, "gconv_cpu", args, out_shape, a["dtype"])
        except ValueError as e:
            self._fallback(n, str(e))
            return super().conv(lw, n, x, x_dtype, nhwc_shape)

    def dense(self, lw, n: Node, x, x_dtype: str, M: int, K: int) -> relax.Expr:
        a = n.attrs
        w = np.asarray(a["weight"])  # [K, N]
        N = int(w.shape[1])
        if x_dtype not in V.ACT_DTYPES or a["dtype"] not in V.OUT_DTYPES or not self.vnni:
            why = "the target CPU has no AVX-512 VNNI" if not self.vnni else \
                f"activation dtype {x_dtype} -> {a['dtype']} has no VNNI kernel"
            self._fallback(n, why)
            return super().dense(lw, n, x, x_dtype, M, K)
        try:
            wp, beff = V.pack_dense(w, np.asarray(a["bias"], np.int32), x_dtype == "int8")
            lo, hi = int(a["lo"]), int(a["hi"])
            wl = tw.cpu_dense(self.target, M, N, K, x_dtype, a["dtype"], lo, hi)
            f = tuned.generate(wl, n.name, lambda cfg: V.dense(M, N, K, x_dtype, a["dtype"], lo, hi, cfg))
        except ValueError as e:
            self._fallback(n, str(e))
            return super().dense(lw, n, x, x_dtype, M, K)
        mult, shift = self._epi(a)
        args = [x, const(wp, "int8"), const(beff, "int32"), mult, shift]
        return self._call(lw, f, "dense_vnni", args, (M, N), a["dtype"])

    def matmul(self, lw, n: Node, a: Value, b: Value) -> relax.Expr:
        at = n.attrs
        plan = BatchMatmul.plan(a.shape, b.shape)
        rq = scalar_requant(at)
        why = None
        if not self.vnni:
            why = "the target CPU has no AVX-512 VNNI"
        elif isinstance(plan, str):
            why = plan
        elif a.dtype not in V.ACT_DTYPES or b.dtype != "int8" or at["dtype"] not in V.OUT_DTYPES:
            why = f"operand dtypes {a.dtype} x {b.dtype} -> {at['dtype']} have no VNNI kernel"
        elif rq is None:
            why = "per-channel requantization of a matmul"
        if why is None:
            b_trans = BatchMatmul.b_stored_transposed(b)
            try:
                f = V.batch_matmul(plan.batch, plan.M, plan.N, plan.K, a.dtype, b.dtype, at["dtype"],
                                   int(at["lo"]), int(at["hi"]), b_trans=b_trans)
            except ValueError as e:
                why = str(e)
        if why is not None:
            self._fallback(n, why)
            return super().matmul(lw, n, a, b)
        a3, b3 = plan.operands(lw, a, b, b_trans)
        args = [a3, b3, const(rq[0], "int64"), const(rq[1], "int64")]
        y = self._call(lw, f, "matmul_vnni", args, (plan.batch, plan.M, plan.N), at["dtype"])
        return lw.emit(relax.op.reshape(y, lw.ig.shapes[n.outputs[0]]))
