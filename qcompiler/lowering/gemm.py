"""Lowering of conv / dense / matmul: our scheduled kernels where they apply, else a generic path.

Generic path (any target, any shape; correct, scheduled later by the default schedule):
  acc = conv2d / matmul in int32 (operands widened to int16 so mixed u8/s8 inputs type-check),
  then the dyadic epilogue of the reference in Relax ops.
Kernel paths: ``CpuGemm`` (AVX-512 VNNI, qcompiler.kernels.cpu_vnni) and ``CudaGemm``
(mma.sync tensor cores, qcompiler.kernels.cuda_mma) emit one ``call_tir`` per layer with the
epilogue fused; a shape a kernel cannot take falls back to the generic path with a warning that
names the layer.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from qcompiler import progress
from qcompiler.graph import Node

from . import layout as L
from .relax_lower import Value, const


def conv_out_hw(H, W, a):
    kh, kw = a["weight"].shape[2:]
    (sh, sw), (dh, dw) = a["strides"], a["dilations"]
    pt, pl, pb, pr = a["pads"]
    return (H + pt + pb - dh * (kh - 1) - 1) // sh + 1, (W + pl + pr - dw * (kw - 1) - 1) // sw + 1


class GenericGemm:
    """Relax-op lowering; used for every layer when no kernel library applies."""

    name = "generic"

    def conv(self, lw, n: Node, x, x_dtype: str, nhwc_shape) -> relax.Expr:
        a = n.attrs
        w = a["weight"]  # [OC, C/g, KH, KW]
        xe = lw.cast(x, "int16")
        wk = const(np.transpose(w, (0, 2, 3, 1)).astype(np.int16), "int16")  # OHWI
        pt, pl, pb, pr = a["pads"]
        acc = lw.emit(relax.op.nn.conv2d(xe, wk, strides=a["strides"], padding=(pt, pl, pb, pr),
                                         dilation=a["dilations"], groups=a["group"], data_layout="NHWC",
                                         kernel_layout="OHWI", out_dtype="int32"))
        acc = lw.emit(relax.op.add(acc, const(a["bias"], "int32")))
        t = lw.cast(acc, "int64")
        N, H, W, C = nhwc_shape
        OH, OW = conv_out_hw(H, W, a)
        ref = Value(t, L.NHWC, (N, w.shape[0], OH, OW), "int64")
        return lw.requant_expr(t, ref, a["mult"][None, :, None, None], a["shift"][None, :, None, None], None,
                               a["lo"], a["hi"], a["dtype"])

    def dense(self, lw, n: Node, x, x_dtype: str, M: int, K: int) -> relax.Expr:
        a = n.attrs
        acc = lw.emit(relax.op.matmul(lw.cast(x, "int16"), const(a["weight"].astype(np.int16), "int16"),
                                      out_dtype="int32"))
        acc = lw.emit(relax.op.add(acc, const(a["bias"], "int32")))
        t = lw.cast(acc, "int64")
        ref = Value(t, (0, 1), (M, a["weight"].shape[1]), "int64")
        return lw.requant_expr(t, ref, a["mult"], a["shift"], None, a["lo"], a["hi"], a["dtype"])

    def matmul(self, lw, n: Node, a: Value, b: Value) -> relax.Expr:
        return lw.emit(relax.op.matmul(lw.cast(a.expr, "int16"), lw.cast(b.expr, "int16"), out_dtype="int32"))


class KernelGemm(GenericGemm):
    """Dispatch to a kernel module; the generic lowering is the fallback for shapes it rejects."""

    def __init__(self, target):
        self.target = target
        self.fallbacks: list[str] = []

    def _fallback(self, n: Node, why: str):
        self.fallbacks.append(f"{n.name}: {why}")
        progress.get().warn(f"layer '{n.name}' uses the generic schedule ({why})")


def gemm_for(target, use_kernels: bool = True) -> GenericGemm:
    if not use_kernels:
        return GenericGemm()
    kind = target.kind.name
    try:
        if kind == "llvm":
            from .gemm_cpu import CpuGemm

            return CpuGemm(target)
        if kind == "cuda":
            from .gemm_cuda import CudaGemm

            return CudaGemm(target)
    except ImportError:
        pass
    return GenericGemm()
