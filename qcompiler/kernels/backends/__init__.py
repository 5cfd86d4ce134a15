"""GEMM kernel backends: one :class:`GemmBackend` per ISA and bit width, one module each.

A backend is everything the lowering, the tuner and the cost model need to know about one family
of conv / dense kernels:

    name             the tuning workloads' backend (``cpu_vnni``, ``cpu_avx2_w4``, ...)
    isa              the ``tile_model.Isa`` (lanes, depth, registers, operand formats, step cost)
    weight_bits      8 or 4 (4: the int8 weight array holds values in [-8, 7], packed as nibbles)
    a_dtypes         activation dtypes it takes
    config_class()   the tunable config dataclass (``cpu_vnni.VnniConfig``)
    workload(...)    the tuning workload of a conv / dense node (``qcompiler.tune.workload``)
    default_config / config_space / make_func (the TIR builder) / pack_dense / pack_conv

Selection (:func:`select_cpu`): the first registered backend (in :data:`CPU_ORDER`) whose LLVM
features the target has and which takes the layer's (weight bits, activation dtype).  Adding an
ISA or a bit width is one module here that calls :func:`register` (plus its tensor intrinsic in
``qcompiler/kernels/_x86_intrin.py``) and its name in :data:`CPU_ORDER`.

This package imports no TVM (``costmodel/features.py`` reads the tile models through it); the
kernel builders import it lazily.
"""

from __future__ import annotations

import dataclasses
import importlib

from ..tile_model import Isa

# registration order = selection priority: the widest ISA first (AMX tiles, then AVX-512 VNNI, AVX2),
# then the fewer weight bits
CPU_ORDER = ("amx_int8", "vnni_w4a8", "vnni_int8", "vnni_w8a16", "avx2_w4a8", "avx2_int8", "avx2_w8a16")
# CUDA (tensor cores, ``qcompiler/kernels/cuda_mma.py``): native s4 first, then W4A8, then INT8
CUDA_ORDER = ("cuda_int4", "cuda_w4a8", "cuda_int8")

_REGISTRY: dict[str, "GemmBackend"] = {}


class GemmBackend:
    """Interface of a conv / dense kernel backend (see the module docstring)."""

    name: str
    isa: Isa | None = None
    weight_bits: int = 8
    a_dtypes: tuple = ()
    kind: str = "cpu"
    vector = True  # a vector ISA (the direct depthwise / grouped kernels use its Isa)
    pointwise_as_dense = False  # lower 1x1 / stride-1 / unpadded convs as its dense kernel on [N*H*W, C]

    def declines(self, op: str, shape, weight) -> str | None:
        """Why this backend does not take a conv / dense layer it otherwise would (None: it takes it):
        ``shape`` = the input's (N, H, W, C) or (M, K), ints or symbolic; ``weight`` the graph's."""
        return None

    def config_class(self):
        raise NotImplementedError

    def default_config(self, M: int, N: int, K: int, batch: int = 1):
        raise NotImplementedError

    def config_points(self, workload):
        raise NotImplementedError

    def make_func(self, workload, config=None):
        raise NotImplementedError

    def default_for(self, workload):
        """The default config of a tuning workload (``qcompiler.tune.workload.Workload``)."""
        return self.default_config(*workload._gemm_mnk())


class CpuGemmBackend(GemmBackend):
    """An x86 register-tiled GEMM backend on the kernels of ``qcompiler.kernels.cpu_vnni``.

    llvm_features  what LLVM must report for the target CPU (``target_has``)
    host_flag      the /proc/cpuinfo flag that decides it for a target naming no CPU
    """

    def __init__(self, isa: Isa, llvm_features: tuple, host_flag: str, doc: str = ""):
        self.isa = isa
        self.name = isa.backend
        self.weight_bits = isa.w_bits
        self.a_dtypes = tuple(isa.a_dtypes)
        self.llvm_features = tuple(llvm_features)
        self.host_flag = host_flag
        self.__doc__ = doc or self.__doc__

    def __repr__(self) -> str:
        return f"CpuGemmBackend({self.name})"

    # ---- routing -------------------------------------------------------------------------------
    def takes(self, weight_bits: int, a_dtype: str) -> bool:
        if a_dtype not in self.a_dtypes:
            return False
        # 4-bit weights run on a 4-bit backend where there is one, else on an 8-bit one (exact:
        # the int8 array holds them); 8-bit weights only on an 8-bit backend; 16-bit weights on none
        # (they run as two 8-bit halves, qcompiler/intops/gemm.py lower_w16)
        return weight_bits in (4, 8) and (self.weight_bits == 8 or weight_bits == 4)

    def available(self, target) -> bool:
        return target_has(target, self.llvm_features, self.host_flag)

    # ---- config ---------------------------------------------------------------------------------
    def config_class(self):
        from ..cpu_vnni import VnniConfig

        return VnniConfig

    def default_config(self, M: int, N: int, K: int, batch: int = 1):
        from ..cpu_vnni import default_config

        return default_config(M, N, K, batch, isa=self.isa)

    def red_ext(self, workload) -> int:
        """Extent in elements of the innermost reduction (a conv's channels of one tap), padded."""
        c = workload.shape[3] if workload.kind == "conv2d" else workload.shape[2]
        return self.pad_k(c)

    def pad_k(self, k: int) -> int:
        """The reduction (a conv's channels per tap) padded as the kernels pad it."""
        r = max(self.isa.kround, self.isa.kpack)
        return -(-k // r) * r

    def gemm_k(self, C: int, KH: int, KW: int) -> int:
        return KH * KW * self.pad_k(C)

    def config_points(self, workload):
        """The VnniConfig grid: every register tile that fits, kc dividing the reduction (multiples
        of the intrinsic's depth), both loop orders, serial twins for small GEMMs."""
        from qcompiler.tune.workload import tries_serial

        M, N, _ = workload._gemm_mnk()
        isa = self.isa
        pars = (True, False) if tries_serial(workload) else (True,)
        nb = -(-N // isa.lanes)
        ext = self.red_ext(workload)
        step = max(4, isa.kpack)
        kcs = [0] + [k for k in range(max(16, step), ext, step)
                     if ext % k == 0 and (k & (k - 1) == 0 or k % 48 == 0)][:6]
        for nr in (d for d in range(1, 9) if nb % d == 0):
            for mr in range(1, min(16, M) + 1):
                if not isa.fits(mr, nr):
                    continue
                for kc in kcs:
                    for n_outer in (True, False):
                        for par in pars:
                            yield dict(mr=mr, nr=nr, kc=kc, n_outer=n_outer, parallel=par)

    # ---- workloads -------------------------------------------------------------------------------
    def workload(self, target, node, x_dtype: str, shape):
        """The tuning workload (``qcompiler.tune.workload.Workload``) of a conv (``shape`` = the input's
        N, H, W, C) or dense (``shape`` = M, K) node of the integer graph."""
        from qcompiler.tune import workload as tw

        a = node.attrs
        lo, hi, od = int(a["lo"]), int(a["hi"]), a["dtype"]
        w = a["weight"]
        if node.op == "conv":
            N, H, W, C = (tw.rows_bucket(d) for d in shape)   # a symbolic batch: its representative size
            OC, _, KH, KW = w.shape
            return tw.cpu_conv(target, N, H, W, C, OC, KH, KW, a["strides"], a["pads"], a["dilations"], x_dtype,
                               od, lo, hi, backend=self.name)
        M, K = (tw.rows_bucket(d) for d in shape)   # a symbolic M: its representative size
        return tw.cpu_dense(target, M, int(w.shape[1]), K, x_dtype, od, lo, hi, backend=self.name)

    def reject_conv(self, C: int) -> str | None:
        """Why this backend declines a conv of C input channels (None: it takes it).  A 4-bit backend
        pads each tap's channels to its depth (8 / 32): where that at least doubles the INT8 kernel's
        reduction (C = 3 -> 32 on AVX2) the INT8 kernel of the ISA is the faster exact choice."""
        if self.weight_bits == 4:
            int8_red = -(-C // 4) * 4
            if self.pad_k(C) >= 2 * int8_red:
                return (f"{C} channels per tap pad to {self.pad_k(C)} for {self.name} (INT8: {int8_red}); "
                        "the INT8 kernel does less work")
        return None

    # ---- TIR builders and packing ---------------------------------------------------------------
    def dense(self, M, N, K, a_dtype, out_dtype, lo, hi, config=None, post=None, bucket_config=None):
        """``post``: a fused elementwise epilogue (``cpu_vnni.Post``); not part of the workload, so a
        tuned config of the plain kernel applies to the fused one.  ``bucket_config(rows)``: the
        tuned config of a symbolic-M kernel's row bucket, or None (``cpu_vnni.dense``)."""
        from .. import cpu_vnni as V

        return V.dense(M, N, K, a_dtype, out_dtype, lo, hi, config, isa=self.isa, post=post,
                       bucket_config=bucket_config)

    def conv2d(self, N, H, W, C, OC, KH, KW, strides, pads, dilations, a_dtype, out_dtype, lo, hi, config=None,
               post=None):
        from .. import cpu_vnni as V

        why = self.reject_conv(C)
        if why:
            raise ValueError(why)
        return V.conv2d_nhwc(N, H, W, C, OC, KH, KW, strides, pads, dilations, a_dtype, out_dtype, lo, hi,
                             config, isa=self.isa, post=post)

    def make_func(self, workload, config=None):
        w = workload
        if w.kind == "dense":
            M, N, K = w.shape
            return self.dense(M, N, K, w.a_dtype, w.out_dtype, w.lo, w.hi, config)
        N, H, W, C, OC, KH, KW = w.shape
        return self.conv2d(N, H, W, C, OC, KH, KW, w.strides, w.pads, w.dilations, w.a_dtype, w.out_dtype,
                           w.lo, w.hi, config)

    def pack_dense(self, w, bias, a_dtype: str):
        from .. import cpu_vnni as V

        return V.pack_dense(w, bias, a_dtype == "int8", isa=self.isa)

    def pack_conv(self, w, bias, a_dtype: str):
        from .. import cpu_vnni as V

        return V.pack_conv(w, bias, a_dtype == "int8", isa=self.isa)

    def weight_dtype(self) -> str:
        return "uint8" if self.weight_bits == 4 else "int8"


class CudaGemmBackend(GemmBackend):
    """A tensor-core GEMM backend on the kernels of ``qcompiler.kernels.cuda_mma``.

    name          the tuning workloads' backend (``cuda_mma``: INT8, ``cuda_mma_w4``, ``cuda_mma_s4``)
    weight_bits   4 or 8; ``a_bits`` 4 or 8 (the layer's activation codes)
    mma_kind      the ``cuda_mma.supports`` / ``default_config`` kind of its dense kernel
                  ("dense", "w4a8", "int4"); ``conv_kind`` that of its conv kernel (None: no conv)
    tag           kernel names in the library: ``dense_<tag>``, ``conv_<tag>``
    builders      names of the ``cuda_mma`` functions building its dense / conv kernels
    pack          how its weight operand is stored: the int8 matrix W [rows, K] of the GEMM as it
                  is ("int8"), or ``int4_pack.pack_int4(W, order)`` words ("mma_k32", "linear")

    The weight matrix of the GEMM is [N, K] (dense: the graph's [K, N] transposed; conv: ONNX
    [OC, C, KH, KW] -> OHWI flattened, k = (kh*KW + kw)*C + c), so every backend computes

        acc[m, n] = sum_k A[m, k] * W[n, k] + bias[n];  y = clip((acc * mult + 2^(shift-1)) >> shift)

    exactly; they differ in how W (and, for s4, A) is stored and which mma consumes it.
    """

    kind = "cuda"

    def __init__(self, name: str, weight_bits: int, a_bits: int, mma_kind: str, conv_kind: str | None, tag: str,
                 dense_builder: str, conv_builder: str | None, pack: str, a_dtypes: tuple, doc: str = ""):
        self.name, self.weight_bits, self.a_bits = name, weight_bits, a_bits
        self.mma_kind, self.conv_kind, self.tag = mma_kind, conv_kind, tag
        self.dense_builder, self.conv_builder, self.pack = dense_builder, conv_builder, pack
        self.a_dtypes = tuple(a_dtypes)
        self.__doc__ = doc or self.__doc__

    def __repr__(self) -> str:
        return f"CudaGemmBackend({self.name})"

    # ---- routing -------------------------------------------------------------------------------
    def takes(self, weight_bits: int, a_bits: int) -> bool:
        """Exact for the layer: 4-bit weights / activations are values an 8-bit operand holds, so a
        wider backend takes narrower codes (the caller tries the narrowest first)."""
        return weight_bits <= self.weight_bits and a_bits <= self.a_bits

    def available(self, arch) -> bool:
        from .. import cuda_mma as cm

        return cm.supports(arch, self.mma_kind)

    def kernel_kind(self, op: str) -> str | None:
        """The ``cuda_mma`` kind of this backend's kernel for a graph op ("conv" / "dense")."""
        return self.conv_kind if op in ("conv", "conv2d") else self.mma_kind

    # ---- config ---------------------------------------------------------------------------------
    def config_class(self):
        from ..cuda_mma import MmaConfig

        return MmaConfig

    def default_config(self, M: int, N: int, K: int, batch: int = 1, arch="sm_80", op: str = "dense"):
        from .. import cuda_mma as cm

        return cm.default_config(M, N, K, arch, self.kernel_kind(op) or self.mma_kind, batch=batch)

    def default_for(self, workload):
        M, N, K = workload._gemm_mnk()
        return self.default_config(M, N, K, arch=workload.arch, op=workload.kind)

    def gemm_k(self, C: int, KH: int, KW: int) -> int:
        return KH * KW * C

    def config_points(self, workload):
        from .. import cuda_mma as cm

        M, N, K = workload._gemm_mnk()
        yield from cm.config_points(M, N, K, workload.arch, self.kernel_kind(workload.kind) or self.mma_kind)

    # ---- workloads -------------------------------------------------------------------------------
    def workload(self, arch, node, x_dtype: str, shape):
        """The tuning workload of a conv (``shape`` = the input's N, H, W, C) or dense (M, K) node;
        backend = this backend's name, kind "conv2d" / "dense", target ``cuda:<arch>``."""
        from qcompiler.tune.workload import Workload, rows_bucket

        a = node.attrs
        lo, hi, od = int(a["lo"]), int(a["hi"]), a["dtype"]
        w = a["weight"]
        if node.op == "conv":
            OC, _, KH, KW = w.shape
            N, H, W, C = (rows_bucket(d) for d in shape)   # a symbolic batch: its representative size
            return Workload(self.name, "conv2d", (N, H, W, C, int(OC), int(KH), int(KW)), x_dtype, od, lo, hi,
                            f"cuda:{arch}", tuple(map(int, a["strides"])), tuple(map(int, a["pads"])),
                            tuple(map(int, a["dilations"])))
        M, K = (rows_bucket(d) for d in shape)   # a symbolic M: its representative size
        return Workload(self.name, "dense", (M, int(w.shape[1]), K), x_dtype, od, lo, hi, f"cuda:{arch}")

    # ---- TIR builders and packing ---------------------------------------------------------------
    def dense(self, M, N, K, a_dtype, out_dtype, lo, hi, arch, config=None):
        from .. import cuda_mma as cm

        return getattr(cm, self.dense_builder)(M, N, K, out_dtype, lo, hi, arch, config=config, a_dtype=a_dtype)

    def conv2d(self, N, H, W, C, OC, KH, KW, strides, pads, dilations, a_dtype, out_dtype, lo, hi, arch,
               config=None):
        from .. import cuda_mma as cm

        if self.conv_builder is None:
            raise cm.KernelUnsupported(f"{self.name} has no convolution kernel")
        return getattr(cm, self.conv_builder)(N, H, W, C, OC, KH, KW, strides, pads, dilations, out_dtype, lo, hi,
                                              arch, config=config, a_dtype=a_dtype)

    def make_func(self, workload, config=None):
        w = workload
        if w.kind == "dense":
            M, N, K = w.shape
            return self.dense(M, N, K, w.a_dtype, w.out_dtype, w.lo, w.hi, w.arch, config)
        N, H, W, C, OC, KH, KW = w.shape
        return self.conv2d(N, H, W, C, OC, KH, KW, w.strides, w.pads, w.dilations, w.a_dtype, w.out_dtype, w.lo,
                           w.hi, w.arch, config)

    def pack_gemm(self, wk):
        """The stored weight operand of the GEMM's int8 matrix wk [N, K]: (array, dtype)."""
        import numpy as np

        wk = np.ascontiguousarray(wk)
        if self.pack == "int8":
            return wk.astype(np.int8), "int8"
        from ..int4_pack import pack_int4

        return pack_int4(wk, order=self.pack), "int32"

    def pack_dense(self, w):
        """Graph weight [K, N] -> stored operand."""
        import numpy as np

        return self.pack_gemm(np.asarray(w).T)

    def pack_conv(self, w):
        """ONNX weight [OC, C, KH, KW] -> stored operand of W [OC, KH*KW*C] (OHWI flattened)."""
        import numpy as np

        w = np.asarray(w)
        return self.pack_gemm(np.transpose(w, (0, 2, 3, 1)).reshape(w.shape[0], -1))


def target_has(target, features, host_flag: str) -> bool:
    """LLVM's answer for the target's mcpu / mattr (any CPU it knows); the host's /proc/cpuinfo flag
    when the target names no CPU."""
    from tvm.target import codegen

    from qcompiler.targets import _host_flag

    attrs = target.attrs
    if not attrs.get("mcpu") and not attrs.get("mattr"):
        return _host_flag(host_flag)
    return bool(codegen.llvm_cpu_has_features(list(features), target))


def register(backend: GemmBackend) -> GemmBackend:
    _REGISTRY[backend.name] = backend
    return backend


def _load() -> None:
    for m in (*CPU_ORDER, *CUDA_ORDER):
        importlib.import_module(f"{__name__}.{m}")


def get(name: str) -> GemmBackend:
    if name not in _REGISTRY:
        _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown GEMM backend {name!r}; known: {sorted(_REGISTRY)}") from None


def cpu_backends() -> list[CpuGemmBackend]:
    """The x86 backends in selection order."""
    out = []
    for m in CPU_ORDER:
        mod = importlib.import_module(f"{__name__}.{m}")
        out.append(mod.BACKEND)
    return out


def cpu_names() -> tuple[str, ...]:
    return tuple(b.name for b in cpu_backends())


def isa_of(name: str) -> Isa | None:
    """The tile model of a CPU backend (None for others, e.g. ``cuda_mma``)."""
    try:
        b = get(name)
    except KeyError:
        return None
    return b.isa


def select_cpu(target, weight_bits: int, a_dtype: str, layer=None,
               vector_only: bool = False) -> CpuGemmBackend | None:
    """The backend a conv / dense layer with these weight bits and activation dtype runs on;
    ``layer`` = (op, input shape, weight) lets a backend decline it (``declines``); ``vector_only``:
    the vector ISAs only (what the direct depthwise / grouped kernels are generated for)."""
    for b in cpu_backends():
        if vector_only and not b.vector:
            continue
        if b.takes(weight_bits, a_dtype) and b.available(target) and not (layer and b.declines(*layer)):
            return b
    return None


def takes_a16(kind: str) -> bool:
    """Whether some backend of target ``kind`` (``cpu`` / ``cuda``) runs W8A16 layers (16-bit
    activations): where none does, such a layer is generic code (``passes/auto_wide.py`` widens a
    network's head only where one does)."""
    if kind == "cpu":
        return any("int16" in b.a_dtypes for b in cpu_backends())
    if kind == "cuda":
        return any(b.a_bits >= 16 for b in cuda_backends())
    return False


def int8_twin(backend: CpuGemmBackend) -> CpuGemmBackend | None:
    """The 8-bit backend of the same ISA and activations (the exact fallback of a 4-bit one)."""
    for b in cpu_backends():
        if (b.weight_bits == 8 and b.llvm_features == backend.llvm_features
                and set(backend.a_dtypes) <= set(b.a_dtypes)):
            return b
    return None


def replace_isa(isa: Isa, **kw) -> Isa:
    return dataclasses.replace(isa, **kw)


# ---- CUDA -----------------------------------------------------------------------------------------
def cuda_backends() -> list[CudaGemmBackend]:
    """The tensor-core backends in selection order (:data:`CUDA_ORDER`)."""
    return [importlib.import_module(f"{__name__}.{m}").BACKEND for m in CUDA_ORDER]


def cuda_names() -> tuple[str, ...]:
    """The tuning-workload backend names of the CUDA backends (``cuda_mma``, ``cuda_mma_w4``, ...)."""
    return tuple(b.name for b in cuda_backends())


def a_bits_of(a_dtype: str) -> int | None:
    """Activation bits of a conv / dense input dtype the CUDA kernels read (None: none of them)."""
    return {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4}.get(a_dtype)


def select_cuda(arch, weight_bits: int, a_bits: int) -> CudaGemmBackend | None:
    """The first backend (in :data:`CUDA_ORDER`: native s4, W4A8, INT8) that exists on ``arch`` and
    takes a layer of these weight / activation bits exactly; None (generic lowering) if none does
    (16-bit activations, archs without integer mma)."""
    for b in cuda_backends():
        if b.takes(weight_bits, a_bits) and b.available(arch):
            return b
    return None


def cuda_fallbacks(backend: CudaGemmBackend, arch) -> list[CudaGemmBackend]:
    """The wider backends after ``backend`` that also exist on ``arch`` (what a layer runs on when a
    backend's kernel rejects its shape: s4 -> W4A8 -> INT8, each exact for the narrower codes)."""
    order = cuda_backends()
    i = order.index(backend)
    return [b for b in order[i + 1:] if b.weight_bits >= backend.weight_bits and b.a_bits >= backend.a_bits
            and b.available(arch)]
