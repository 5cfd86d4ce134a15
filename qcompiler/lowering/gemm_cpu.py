"""Conv / dense lowering onto the x86 INT8 kernels (``qcompiler.kernels.cpu_vnni``), AVX-512 VNNI or AVX2.

Each quantized layer becomes one ``call_tir`` of a scheduled kernel that computes, fused,

    acc = sum_k A*W + bias  (int32);   y = clip((int64(acc) * mult + 2^(shift-1)) >> shift, lo, hi)

which is the reference's ``conv`` / ``dense`` op exactly.  The ISA is the target's: AVX-512 VNNI
when LLVM says the target CPU has it (``vpdpbusd``, 16 lanes x 4), else AVX2 (``vpmaddwd``, 8 lanes
x 2), else none.  Weights are packed at compile time (``pack_conv`` / ``pack_dense``: [N/L, Kp/kp,
L, kp] int8, with the +128 offset of signed activations folded into ``bias_eff``).  Routing by layer:

  group == 1                       -> conv2d_nhwc (implicit GEMM on vpdpbusd / vpmaddwd)
  group == C == OC (depthwise)     -> depthwise_conv2d_nhwc (direct, int32 vectors)
  other groups                     -> grouped_conv2d_nhwc
  dense (M x K @ K x N)            -> dense
  matmul of two activations        -> batch_matmul (B packed in the kernel; [batch, N, K] read
                                      as stored when B's last stored axis is K, e.g. a
                                      transposed K in attention, else [batch, K, N])

A layer a kernel cannot take (activation dtype other than int8/uint8, a uint8 right matmul
operand, broadcast matmul batch dims, K > MAX_K, a target with neither VNNI nor AVX2 for the
group == 1 / dense / matmul kernels) falls back to ``GenericGemm`` with a warning naming it.
Kernels are marked ``op_pattern`` = opaque so FuseOps never merges them into other PrimFuncs.
The dense / group-1 conv kernels take the best tuned ``VnniConfig`` of the active tuning log for
their ISA's backend (``qcompiler.tune.apply``; ``cpu_vnni`` / ``cpu_avx2``), else ``default_config``.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from qcompiler.graph import Node
from qcompiler.kernels import cpu_vnni as V
from qcompiler.targets import host_has_avx2, host_has_vnni
from qcompiler.tune import apply as tuned
from qcompiler.tune import workload as tw

from .gemm import BatchMatmul, KernelGemm, conv_out_hw, scalar_requant
from .relax_lower import Value, const


def _target_has(target, features: list[str], host_flag) -> bool:
    """LLVM's answer for the target's mcpu / mattr (any CPU it knows); the host's flags when the
    target names no CPU."""
    from tvm.target import codegen

    attrs = target.attrs
    if not attrs.get("mcpu") and not attrs.get("mattr"):
        return host_flag()
    return bool(codegen.llvm_cpu_has_features(features, target))


def target_has_vnni(target) -> bool:
    """AVX-512 VNNI in the generated code (rocketlake, cascadelake, znver4: yes; znver2,
    skylake-avx512: no)."""
    return _target_has(target, ["avx512vnni", "avx512bw"], host_has_vnni)


def target_isa(target) -> V.Isa | None:
    """The ISA of the GEMM kernels for ``target``: VNNI, else AVX2 (haswell .. znver3), else None."""
    if target_has_vnni(target):
        return V.VNNI
    return V.AVX2 if _target_has(target, ["avx2"], host_has_avx2) else None


_NO_ISA = "the target CPU has neither AVX-512 VNNI nor AVX2"


class CpuGemm(KernelGemm):
    name = "cpu_vnni"

    def __init__(self, target):
        super().__init__(target)
        self.isa = target_isa(target)
        if self.isa is not None:
            self.name = self.isa.backend
        self.tag = self.name.removeprefix("cpu_")  # kernel names: dense_vnni / dense_avx2

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
            self._fallback(n, f"activation dtype {x_dtype} -> {a['dtype']} has no INT8 CPU kernel")
            return super().conv(lw, n, x, x_dtype, nhwc_shape)
        mult, shift = self._epi(a)
        bias = np.asarray(a["bias"], np.int32)
        lo, hi = int(a["lo"]), int(a["hi"])
        try:
            if g == 1:
                if self.isa is None:
                    raise ValueError(_NO_ISA)
                isa = self.isa
                wp, beff = V.pack_conv(w, bias, x_dtype == "int8", isa=isa)
                wl = tw.cpu_conv(self.target, N, H, W, C, OC, KH, KW, *geo, x_dtype, a["dtype"], lo, hi,
                                 backend=isa.backend)
                f = tuned.generate(wl, n.name, lambda cfg: V.conv2d_nhwc(N, H, W, C, OC, KH, KW, *geo, x_dtype,
                                                                         a["dtype"], lo, hi, cfg, isa=isa))
                args = [x, const(wp, "int8"), const(beff, "int32"), mult, shift]
                return self._call(lw, f, f"conv_{self.tag}", args, out_shape, a["dtype"])
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
        isa = self.isa
        if x_dtype not in V.ACT_DTYPES or a["dtype"] not in V.OUT_DTYPES or isa is None:
            why = _NO_ISA if isa is None else f"activation dtype {x_dtype} -> {a['dtype']} has no INT8 CPU kernel"
            self._fallback(n, why)
            return super().dense(lw, n, x, x_dtype, M, K)
        try:
            wp, beff = V.pack_dense(w, np.asarray(a["bias"], np.int32), x_dtype == "int8", isa=isa)
            lo, hi = int(a["lo"]), int(a["hi"])
            wl = tw.cpu_dense(self.target, M, N, K, x_dtype, a["dtype"], lo, hi, backend=isa.backend)
            f = tuned.generate(wl, n.name, lambda cfg: V.dense(M, N, K, x_dtype, a["dtype"], lo, hi, cfg, isa=isa))
        except ValueError as e:
            self._fallback(n, str(e))
            return super().dense(lw, n, x, x_dtype, M, K)
        mult, shift = self._epi(a)
        args = [x, const(wp, "int8"), const(beff, "int32"), mult, shift]
        return self._call(lw, f, f"dense_{self.tag}", args, (M, N), a["dtype"])

    def matmul(self, lw, n: Node, a: Value, b: Value) -> relax.Expr:
        at = n.attrs
        plan = BatchMatmul.plan(a.shape, b.shape)
        rq = scalar_requant(at)
        why = None
        if self.isa is None:
            why = _NO_ISA
        elif isinstance(plan, str):
            why = plan
        elif a.dtype not in V.ACT_DTYPES or b.dtype != "int8" or at["dtype"] not in V.OUT_DTYPES:
            why = f"operand dtypes {a.dtype} x {b.dtype} -> {at['dtype']} have no INT8 CPU kernel"
        elif rq is None:
            why = "per-channel requantization of a matmul"
        if why is None:
            b_trans = BatchMatmul.b_stored_transposed(b)
            try:
                f = V.batch_matmul(plan.batch, plan.M, plan.N, plan.K, a.dtype, b.dtype, at["dtype"],
                                   int(at["lo"]), int(at["hi"]), b_trans=b_trans, isa=self.isa)
            except ValueError as e:
                why = str(e)
        if why is not None:
            self._fallback(n, why)
            return super().matmul(lw, n, a, b)
        a3, b3 = plan.operands(lw, a, b, b_trans)
        args = [a3, b3, const(rq[0], "int64"), const(rq[1], "int64")]
        y = self._call(lw, f, f"matmul_{self.tag}", args, (plan.batch, plan.M, plan.N), at["dtype"])
        return lw.emit(relax.op.reshape(y, lw.ig.shapes[n.outputs[0]]))
