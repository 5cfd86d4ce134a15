"""Lowering of conv / dense / matmul: our scheduled kernels where they apply, else a generic path.

Generic path (any target, any shape; correct, scheduled later by the default schedule):
  acc = conv2d / matmul in int32 (operands widened to int16 so mixed u8/s8 inputs type-check),
  then the dyadic epilogue of the reference in Relax ops.
Kernel paths: ``CpuGemm`` (x86: the GEMM backend of ``qcompiler.kernels.backends`` chosen per layer by
ISA, weight bits and input dtype: INT8, W4A8, W8A16 on AVX-512 VNNI or AVX2) and ``CudaGemm``
(mma.sync tensor cores, qcompiler.kernels.cuda_mma) emit one ``call_tir`` per layer with the
epilogue fused; a shape a kernel cannot take falls back to the generic path with a warning that
names the layer.  That includes ``matmul`` of two activations (attention Q.K^T, P.V): operands
reshaped to [batch, M, K] x [batch, K, N] (``BatchMatmul``), one batched kernel, reshaped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax, tirx

from qcompiler import progress
from qcompiler.graph import Node

from . import layout as L
from .relax_lower import Value, const


def conv_out_hw(H, W, a):
    kh, kw = a["weight"].shape[2:]
    (sh, sw), (dh, dw) = a["strides"], a["dilations"]
    pt, pl, pb, pr = a["pads"]
    return (simplify((H + pt + pb - dh * (kh - 1) - 1) // sh + 1),
            simplify((W + pl + pr - dw * (kw - 1) - 1) // sw + 1))


def simplify(d):
    """A dim: an int as it is, a symbolic one (a TIR expression) in its simplest form -- 2*u for
    (4*u + 2 - 3) // 2 + 1 -- so that shapes computed by different ops compare and bind as one."""
    if isinstance(d, (int, np.integer)):
        return int(d)
    from tvm.sym import Analyzer

    return Analyzer().simplify(d)


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
        """The reference's ``matmul`` of two activations (ONNX MatMul broadcasting), requantized;
        returns the output in logical layout."""
        a, b = lw.logical(a), lw.logical(b)
        acc = lw.emit(relax.op.matmul(lw.cast(a.expr, "int16"), lw.cast(b.expr, "int16"), out_dtype="int32"))
        shape = lw.ig.shapes[n.outputs[0]]
        ref = Value(acc, L.identity(len(shape)), shape, "int32")
        at = n.attrs
        return lw.requant_expr(lw.cast(acc, "int64"), ref, at["mult"], at["shift"], None, at["lo"], at["hi"],
                               at["dtype"])


@dataclass(frozen=True)
class BatchMatmul:
    """A matmul of two activations as ``batch`` independent [M, K] x [K, N] products.

    ``fold``: the right operand is shared by every batch entry (its leading dims are all 1), so the
    left operand's leading dims are folded into M (batch = 1).
    """

    batch: int
    M: int
    N: int
    K: int
    fold: bool

    @staticmethod
    def plan(a_shape, b_shape) -> "BatchMatmul | str":
        """The plan for ONNX MatMul of a [..., M, K] and b [..., K, N], or why there is none."""
        if len(a_shape) < 2 or len(b_shape) < 2:
            return "a 1-D matmul operand"
        from qcompiler.symbolic import is_static, same_shape, shape_prod

        (M, K), (K2, N) = a_shape[-2:], b_shape[-2:]
        assert same_shape((K,), (K2,)), (a_shape, b_shape)
        la, lb = tuple(a_shape[:-2]), tuple(b_shape[:-2])
        if all(is_static(d) and d == 1 for d in lb) and len(lb) <= len(la):
            return BatchMatmul(1, shape_prod(la) * M, N, K, True)
        r = max(len(la), len(lb))
        la, lb = (1,) * (r - len(la)) + la, (1,) * (r - len(lb)) + lb
        if not same_shape(la, lb):
            return f"broadcast batch dims {tuple(a_shape)} x {tuple(b_shape)}"
        return BatchMatmul(shape_prod(la), M, N, K, False)

    def operands(self, lw, a: Value, b: Value, b_trans: bool) -> tuple[relax.Expr, relax.Expr]:
        """a as [batch, M, K] and b as [batch, K, N] (``b_trans``: [batch, N, K]), copying only
        what the stored layouts require."""
        a = lw.logical(a)
        r = b.rank
        want = L.identity(r)
        if b_trans:
            want = (*want[:-2], r - 1, r - 2)
        b = lw.to_perm(b, want)
        bshape = (self.batch, self.N, self.K) if b_trans else (self.batch, self.K, self.N)
        return (lw.emit(relax.op.reshape(a.expr, (self.batch, self.M, self.K))),
                lw.emit(relax.op.reshape(b.expr, bshape)))

    @staticmethod
    def b_stored_transposed(b: Value) -> bool:
        """Whether b's stored layout is closer to [.., N, K] than to [.., K, N]: its last physical
        axis is logical K (then the [.., N, K] copy moves contiguous runs, or nothing)."""
        return b.rank >= 2 and b.perm[-1] == b.rank - 2


def scalar_requant(at) -> tuple[np.ndarray, np.ndarray] | None:
    """(mult, shift) as int64 [1] arrays when the op's requantization is per tensor, else None."""
    mult, shift = np.asarray(at["mult"], np.int64), np.asarray(at["shift"], np.int64)
    if mult.size != 1 or shift.size != 1:
        return None
    return mult.reshape(1), shift.reshape(1)


class KernelGemm(GenericGemm):
    """Dispatch to a kernel module; the generic lowering is the fallback for shapes it rejects."""

    def __init__(self, target):
        self.target = target
        self.fallbacks: list[str] = []
        self.kernels: dict[str, int] = {}  # kernel kind -> layers using it

    def _fallback(self, n: Node, why: str):
        self.fallbacks.append(f"{n.name}: {why}")
        progress.get().warn(f"layer '{n.name}' uses the generic schedule ({why})")

    def _call(self, lw, func, name: str, args, shape, dtype) -> relax.Expr:
        """call_tir of a scheduled kernel; op_pattern opaque (8) so FuseOps never merges it.

        A conv kernel over symbolic dims (attribute ``qc.ow_tiles`` = the column tile t: the implicit
        GEMM ``cpu_vnni.conv2d_nhwc``, the depthwise kernels) gets the column tiles per output row
        ceil(OW / t) as an int32 argument after the tensors and writes the exact NHWC output.  (The
        dense and matmul kernels over symbolic dims store exactly their valid rows.)"""
        gv = lw.bb.add_func(func.with_attr("op_pattern", 8), name)
        self.kernels[name] = self.kernels.get(name, 0) + 1
        ow_tiles = func.attrs.get("qc.ow_tiles") if func.attrs is not None else None
        if ow_tiles is not None:
            owt = simplify(tirx.floordiv(shape[2] + (int(ow_tiles) - 1), int(ow_tiles)))
            args = [*args, relax.prim_value(tirx.Cast("int32", owt))]
        return lw.emit(relax.call_tir(gv, args, relax.TensorType(shape=tuple(shape), dtype=dtype)), name)


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
