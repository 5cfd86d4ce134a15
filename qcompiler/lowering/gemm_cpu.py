"""Conv / dense lowering onto the x86 GEMM kernel backends (``qcompiler.kernels.backends``).

Each quantized layer becomes one ``call_tir`` of a scheduled kernel that computes, fused,

    acc = sum_k A*W + bias  (int32);   y = clip((int64(acc) * mult + 2^(shift-1)) >> shift, lo, hi)

which is the reference's ``conv`` / ``dense`` op exactly.  The backend is chosen per layer by
``backends.select_cpu(target, weight_bits, input dtype)``: the first backend (AVX-512 VNNI before
AVX2, then 4-bit weights before 8-bit) whose ISA the target has and which takes the layer:

  weight_bits 8, int8/uint8 input  -> cpu_vnni / cpu_avx2        (INT8: vpdpbusd / vpmaddwd)
  weight_bits 4, int8/uint8 input  -> cpu_vnni_w4 / cpu_avx2_w4  (W4A8: nibbles unpacked in registers)
  int16 input (W8A16)              -> cpu_vnni_a16 / cpu_avx2_a16 (vpdpwssd / vpmaddwd)

A 4-bit layer the W4A8 kernel cannot take runs on the INT8 kernel of the same ISA (exact: its int8
weight array holds the 4-bit values), with a warning naming it.  Weights are packed at compile time
by the backend (``pack_conv`` / ``pack_dense``: [N/L, Kp/kp, L, kp] int8 or the nibble layout of
``int4_pack.pack_cpu_w4``, with the +128 offset of signed activations folded into ``bias_eff``).
Routing by layer:

  group == 1                       -> the backend's conv2d (implicit GEMM)
  group == C == OC (depthwise)     -> depthwise_conv2d_taps (vpdpbusd over 4 kernel rows on VNNI,
                                      vpmaddwd over 2 on AVX2, int16 input vpdpwssd / vpmaddwd
                                      over 2; C a multiple of 8, >= 2 kernel rows; exact over a
                                      symbolic width, the last column tile stored in part), else
                                      depthwise_conv2d_nhwc (direct, int32 vectors: other C, one
                                      kernel row); QC_DEPTHWISE=lanes forces the latter (A/B)
  other groups                     -> grouped_conv2d_nhwc
  dense (M x K @ K x N)            -> the backend's dense
  matmul of two activations        -> batch_matmul of the INT8 ISA (B packed in the kernel; [batch, N, K]
                                      read as stored when B's last stored axis is K, e.g. a
                                      transposed K in attention, else [batch, K, N])

A layer no kernel can take (an activation dtype no backend takes, a uint8 right matmul operand,
broadcast matmul batch dims, K > MAX_K, a target with neither VNNI nor AVX2) falls back to
``GenericGemm`` with a warning naming it.  Kernels are marked ``op_pattern`` = opaque so FuseOps
never merges them into other PrimFuncs.  A node with a fused epilogue (``passes/fuse_epilogue.py``:
residual add, hard-swish, clip) runs it inside the group-1 conv, depthwise and dense kernels
(``conv_vnni_add``, ``dwconv_cpu_requant_mul``, ...: one more input, the steps' constants as an int64
vector); the grouped and generic routes return the plain result and the steps are lowered in Relax as
before.  The tuning workload of a fused kernel is the plain kernel's (the epilogue is not part of the
key: a config tuned for the plain kernel applies, and ``qc tune`` measures the plain kernel).
The dense / group-1 conv kernels take the best tuned
``VnniConfig`` of the active tuning log for their backend (``qcompiler.tune.apply``), else
``default_config``.
"""

from __future__ import annotations

import os

import numpy as np
from tvm import relax

from qcompiler import progress
from qcompiler.graph import Node
from qcompiler.kernels import backends as KB
from qcompiler.kernels import cpu_vnni as V
from qcompiler.tune import apply as tuned

from .gemm import BatchMatmul, KernelGemm, conv_out_hw, scalar_requant
from .relax_lower import Value, const


def target_has_vnni(target) -> bool:
    """AVX-512 VNNI in the generated code (rocketlake, cascadelake, znver4: yes; znver2,
    skylake-avx512: no)."""
    return KB.get("cpu_vnni").available(target)


def target_isa(target) -> V.Isa | None:
    """The ISA of the INT8 GEMM kernels for ``target``: VNNI, else AVX2 (haswell .. znver3), else None."""
    be = KB.select_cpu(target, 8, "int8", vector_only=True)
    return be.isa if be is not None else None


_NO_ISA = "the target CPU has neither AVX-512 VNNI nor AVX2"


def _pointwise(a) -> bool:
    """Stride 1, no padding, no dilation (with a 1x1 kernel: a GEMM over the pixels as they are)."""
    return (tuple(a["strides"]) == (1, 1) and not any(a["pads"]) and tuple(a["dilations"]) == (1, 1))


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

    def _backend(self, n: Node, x_dtype: str, shape=None):
        """(backend, None) for a conv / dense layer (input ``shape``: N, H, W, C or M, K), or (None, why)."""
        if self.isa is None:
            return None, _NO_ISA
        if n.attrs["dtype"] not in V.OUT_DTYPES:
            return None, f"output dtype {n.attrs['dtype']} has no CPU GEMM kernel"
        bits = int(n.attrs.get("weight_bits", 8) or 8)
        layer = (n.op, tuple(shape) if shape is not None else None, np.asarray(n.attrs["weight"]))
        be = KB.select_cpu(self.target, bits, x_dtype, layer)
        if be is None:
            return None, f"activation dtype {x_dtype} (weights {bits}-bit) has no CPU GEMM kernel"
        return be, None

    def _gemm(self, lw, n: Node, x, x_dtype: str, shape, out_shape, build, pack, kind: str, epilogue=None):
        """One call_tir of the layer's backend kernel; a 4-bit layer its W4A8 kernel rejects runs on the
        INT8 kernel of the same ISA; None when no kernel takes it (the caller falls back, warned).
        ``epilogue`` = (Epilogue, extra input exprs): fused into the kernel (``build(be, cfg, post)``);
        the tuning workload stays the plain kernel's (the epilogue is not part of the key)."""
        be, why = self._backend(n, x_dtype, shape)
        if be is None:
            self._fallback(n, why)
            return None
        a = n.attrs
        post = epilogue[0] if epilogue is not None else None
        while be is not None:
            try:
                wp, beff = pack(be)
                wl = be.workload(self.target, n, x_dtype, shape)
                f = tuned.generate(wl, n.name, lambda cfg, be=be: build(be, cfg, post))
            except ValueError as e:
                twin = KB.int8_twin(be) if be.weight_bits == 4 else None
                if twin is None:
                    self._fallback(n, str(e))
                    return None
                progress.get().warn(f"layer '{n.name}' runs on the INT8 kernel ({be.name}: {e})")
                be = twin
                continue
            mult, shift = self._epi(a)
            args = [x, const(wp, be.weight_dtype()), const(beff, "int32"), mult, shift]
            name, dtype = f"{kind}_{be.name.removeprefix('cpu_')}", a["dtype"]
            if post is not None:
                f = f.with_attr("qc.epilogue", post.tag)
                args += [*epilogue[1], const(post.consts, "int64")]
                name, dtype = f"{name}_{post.tag}", post.out_dtype
            return self._call(lw, f, name, args, out_shape, dtype)
        return None

    fuses_epilogue = True  # conv / dense take ``epilogue=`` and return (expr, fused)

    def conv(self, lw, n: Node, x, x_dtype: str, nhwc_shape, epilogue=None):
        """The layer's kernel; with ``epilogue`` = (Epilogue, extra inputs in NHWC) returns (expr, fused):
        the group-1 and depthwise kernels fuse it, the other routes return the plain result (the
        caller lowers the steps in Relax)."""
        if epilogue is not None:
            y = self._conv(lw, n, x, x_dtype, nhwc_shape, epilogue)
            return (y, True) if y is not None else (self._conv(lw, n, x, x_dtype, nhwc_shape), False)
        return self._conv(lw, n, x, x_dtype, nhwc_shape)

    def _conv(self, lw, n: Node, x, x_dtype: str, nhwc_shape, epilogue=None) -> relax.Expr | None:
        """The kernel call; None when ``epilogue`` is given and this route cannot fuse it (nothing
        emitted, nothing warned: the plain call follows)."""
        a = n.attrs
        w = np.asarray(a["weight"])  # [OC, C/g, KH, KW] int8
        N, H, W, C = (d if not isinstance(d, (int, np.integer)) else int(d)  # N, H, W may be symbolic
                      for d in nhwc_shape)
        OC, _, KH, KW = w.shape
        g = int(a["group"])
        geo = (tuple(a["strides"]), tuple(a["pads"]), tuple(a["dilations"]))
        OH, OW = conv_out_hw(H, W, a)
        out_shape = (N, OH, OW, OC)
        lo, hi = int(a["lo"]), int(a["hi"])
        bias = np.asarray(a["bias"], np.int32)
        if epilogue is not None and epilogue[0].out_dtype not in V.OUT_DTYPES:
            return None
        if g == 1:
            be = self._backend(n, x_dtype, (N, H, W, C))[0]
            if epilogue is not None and be is None:
                return None
            # a pointwise conv over symbolic dims: the dense kernel over the flat pixel rows (no row
            # tiles per output row, so no ragged tile per row: 1-10% faster than the conv kernel)
            static = all(isinstance(d, int) for d in (N, H, W))
            if be is not None and KH == KW == 1 and _pointwise(a) and (be.pointwise_as_dense or not static):
                return self._pointwise(lw, n, x, x_dtype, (N, H, W, C), OC, epilogue)
            y = self._gemm(lw, n, x, x_dtype, (N, H, W, C), out_shape,
                           lambda be, cfg, post: be.conv2d(N, H, W, C, OC, KH, KW, *geo, x_dtype, a["dtype"], lo, hi,
                                                           cfg, post=post),
                           lambda be: be.pack_conv(w, bias, x_dtype), "conv", epilogue)
            if y is None and epilogue is not None:
                return None  # warned once; the plain call takes the generic path
            return y if y is not None else super().conv(lw, n, x, x_dtype, nhwc_shape)
        depthwise = g == C and OC == C
        sym_hw = not all(isinstance(d, int) for d in (H, W))
        taps = depthwise and V.depthwise_taps_ok(N, H, W, C, KH, KW, x_dtype, self.isa) and \
            os.environ.get("QC_DEPTHWISE") != "lanes"  # vpdpbusd over kernel rows
        if sym_hw and not depthwise:
            if epilogue is not None:
                return None
            self._fallback(n, "a grouped conv with a symbolic height / width (no such kernel yet)")
            return super().conv(lw, n, x, x_dtype, nhwc_shape)
        if epilogue is not None and (not depthwise or x_dtype not in V.DIRECT_ACT_DTYPES
                                     or a["dtype"] not in V.OUT_DTYPES):
            return None
        if x_dtype not in V.DIRECT_ACT_DTYPES or a["dtype"] not in V.OUT_DTYPES:
            self._fallback(n, f"activation dtype {x_dtype} -> {a['dtype']} has no INT8 CPU kernel")
            return super().conv(lw, n, x, x_dtype, nhwc_shape)
        mult, shift = self._epi(a)
        try:
            if depthwise:
                wd = np.ascontiguousarray(np.transpose(w[:, 0], (1, 2, 0)))  # [KH, KW, C]
                post = epilogue[0] if epilogue is not None else None
                if taps:
                    m64, s64 = (np.broadcast_to(np.asarray(a[k], np.int64), (C,)) for k in ("mult", "shift"))
                    w4, rc = V.pack_depthwise_taps(wd, bias, x_dtype, m64, s64, isa=self.isa)
                    f = V.depthwise_conv2d_taps(N, H, W, C, KH, KW, *geo, x_dtype, a["dtype"], lo, hi, post=post,
                                                isa=self.isa)
                    args = [x, const(w4, "int8"), const(rc, "int64"), const(np.ascontiguousarray(m64), "int64"),
                            const(np.ascontiguousarray(s64), "int64")]
                else:  # C % 8 != 0, 1-row kernels: int32 lanes
                    f = V.depthwise_conv2d_nhwc(N, H, W, C, KH, KW, *geo, x_dtype, a["dtype"], lo, hi, post=post)
                    args = [x, const(wd, "int8"), const(bias, "int32"), mult, shift]
                if post is None:
                    return self._call(lw, f, "dwconv_cpu", args, out_shape, a["dtype"])
                args += [*epilogue[1], const(post.consts, "int64")]
                return self._call(lw, f.with_attr("qc.epilogue", post.tag), f"dwconv_cpu_{post.tag}", args,
                                  out_shape, post.out_dtype)
            f = V.grouped_conv2d_nhwc(N, H, W, C, OC, KH, KW, *geo, g, x_dtype, a["dtype"], lo, hi)
            args = [x, const(w, "int8"), const(bias, "int32"), mult, shift]
            return self._call(lw, f, "gconv_cpu", args, out_shape, a["dtype"])
        except ValueError as e:
            if epilogue is not None:
                return None
            self._fallback(n, str(e))
            return super().conv(lw, n, x, x_dtype, nhwc_shape)

    def _pointwise(self, lw, n: Node, x, x_dtype: str, nhwc, OC: int, epilogue=None):
        """A 1x1 / stride-1 / unpadded conv as the dense kernel of its backend over the input viewed as
        [N*H*W, C] (a reshape, no copy; ``GemmBackend.pointwise_as_dense``: the AMX kernels then read
        the activations in place).  Same packing as the conv (k = c), same workload (the conv's)."""
        a = n.attrs
        N, H, W, C = nhwc
        M = N * H * W
        w = np.asarray(a["weight"])
        lo, hi = int(a["lo"]), int(a["hi"])
        bias = np.asarray(a["bias"], np.int32)
        x2 = lw.emit(relax.op.reshape(x, (M, C)))
        ep = None
        if epilogue is not None:
            ep = (epilogue[0], [lw.emit(relax.op.reshape(e, (M, OC))) for e in epilogue[1]])
        y = self._gemm(lw, n, x2, x_dtype, nhwc, (M, OC),
                       lambda be, cfg, post: be.dense(M, OC, C, x_dtype, a["dtype"], lo, hi, cfg, post=post),
                       lambda be: be.pack_conv(w, bias, x_dtype), "conv", ep)
        if y is None:
            return None if epilogue is not None else super().conv(lw, n, x, x_dtype, nhwc)
        return lw.emit(relax.op.reshape(y, (N, H, W, OC)))

    def dense(self, lw, n: Node, x, x_dtype: str, M: int, K: int, epilogue=None):
        """As :meth:`conv`: with ``epilogue`` (extra inputs [M, N]) returns (expr, fused)."""
        a = n.attrs
        w = np.asarray(a["weight"])  # [K, N]
        N = int(w.shape[1])
        lo, hi = int(a["lo"]), int(a["hi"])
        bias = np.asarray(a["bias"], np.int32)

        def buckets(be):  # a symbolic M: each row bucket's tuned tile (its workload at the bucket's rows)
            if isinstance(M, (int, np.integer)):
                return None
            return lambda r: tuned.tuned_config(be.workload(self.target, n, x_dtype, (r, K)))

        def run(ep):
            return self._gemm(lw, n, x, x_dtype, (M, K), (M, N),
                              lambda be, cfg, post: be.dense(M, N, K, x_dtype, a["dtype"], lo, hi, cfg, post=post,
                                                             bucket_config=buckets(be)),
                              lambda be: be.pack_dense(w, bias, x_dtype), "dense", ep)

        if epilogue is not None:
            ok = self._backend(n, x_dtype)[0] is not None and epilogue[0].out_dtype in V.OUT_DTYPES
            y = run(epilogue) if ok else None
            if y is not None:
                return y, True
            y = run(None) if ok else None
            return (y if y is not None else super().dense(lw, n, x, x_dtype, M, K)), False
        y = run(None)
        return y if y is not None else super().dense(lw, n, x, x_dtype, M, K)

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
        tiles = f.attrs.get("qc.sym_tiles") if f.attrs is not None else None
        out_shape = lw.ig.shapes[n.outputs[0]]
        if tiles:  # a symbolic N: whole column tiles, keep N (cpu_vnni.batch_matmul)
            return self._call_tiled(lw, f, f"matmul_{self.tag}", args, plan, tiles, at["dtype"], out_shape)
        y = self._call(lw, f, f"matmul_{self.tag}", args, (plan.batch, plan.M, plan.N), at["dtype"])
        return lw.emit(relax.op.reshape(y, out_shape))

    def _call_tiled(self, lw, f, name: str, args, plan, tiles, dtype, out_shape) -> relax.Expr:
        """The kernel's output, [batch, M, whole tiles of N], read into the node's output shape
        [..., M, N] by one injective ``keep``: the batch dims' flat index is a sum of products (no
        division by a symbolic extent, and no reshape, whose symbolic form ``FuseOps`` treats as
        opaque), so ``keep`` fuses into its consumer (the attention mask's add) instead of copying
        the scores once more."""
        from tvm import te, tirx

        size = {str(d): int(t) for d, t in tiles}  # {"N": columns per tile}: the output's padded columns
        gv = lw.bb.add_func(f.with_attr("op_pattern", 8), name)
        self.kernels[name] = self.kernels.get(name, 0) + 1
        oshape = (plan.batch, plan.M, tirx.floordiv(plan.N + (size["N"] - 1), size["N"]) * size["N"])
        y = lw.emit(relax.call_tir(gv, args, relax.TensorType(shape=oshape, dtype=dtype)), name)
        lead = tuple(out_shape[:-2])

        def flat(idx):  # row-major index of the batch dims
            b = tirx.const(0, "int64")
            for d, i in zip(lead, idx):
                b = b * d + i
            return b

        return lw.bb.emit_te(lambda t: te.compute(tuple(out_shape), lambda *i: t(flat(i[:-2]), i[-2], i[-1]),
                                                  name="keep"), y, primfunc_name_hint="keep")
