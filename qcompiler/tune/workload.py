"""Tuning tasks: the workload of one conv/dense kernel, its config space, and its PrimFunc.

A workload is everything the kernel generator is called with except the config: backend
(``cuda_mma`` or a CPU backend of ``qcompiler.kernels.backends``: ``cpu_vnni`` / ``cpu_avx2`` (INT8),
``cpu_vnni_w4`` / ``cpu_avx2_w4`` (W4A8), ``cpu_vnni_a16`` / ``cpu_avx2_a16`` (W8A16); each CPU
backend gives its config class, default config, config space and TIR builder), kind (``dense``, ``conv2d``, ``w4a8``), shape, conv geometry, the
activation and output dtypes, the clip range, and the target (``cpu:<mcpu>`` / ``cuda:sm_XX``).
Its ``key`` is a readable canonical string; the same key is computed by the tuner (from the
integer graph, :func:`tasks_from_graph`) and by the lowering adapters at compile time
(:func:`cpu_conv`, :func:`cpu_dense`, :func:`cuda_conv`, :func:`cuda_dense`), so records tuned for
one model apply to every model with the same kernel.

Config spaces are the fields of the kernels' own dataclasses (``VnniConfig``, ``MmaConfig``); a
point is valid when the dataclass accepts it and the generator does not raise ``ValueError`` /
``KernelUnsupported`` for the workload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from qcompiler.kernels import backends as _backends

CPU_BACKENDS = _backends.cpu_names()   # the x86 backends, in selection order (TVM-free registry)
BACKENDS = (*CPU_BACKENDS, "cuda_mma")


REP_ROWS: dict = {}
"""Symbolic dim name -> the size a kernel with that dim is tuned and predicted at (the calibration
size; set by the lowering of a library with symbolic dims, ``qcompiler/symbolic.py``)."""


@contextlib.contextmanager
def rows_at(sizes: dict):
    """``REP_ROWS`` = ``sizes`` while a library with symbolic dims is lowered."""
    old = dict(REP_ROWS)
    REP_ROWS.clear()
    REP_ROWS.update(sizes)
    try:
        yield
    finally:
        REP_ROWS.clear()
        REP_ROWS.update(old)


def rows_bucket(d) -> int:
    """A dim of a kernel's workload: itself when static; a symbolic one (a TIR expression) at the
    representative sizes ``REP_ROWS``: tuning records and cost-model predictions are per bucket."""
    if isinstance(d, (int, np.integer)):
        return int(d)
    from tvm import tirx
    from tvm.sym import Analyzer
    from tvm.tirx.analysis import undefined_vars

    free = list(undefined_vars(d))
    missing = [v.name for v in free if v.name not in REP_ROWS]
    if missing:
        raise ValueError(f"no representative size for symbolic dim(s) {missing}")
    an = Analyzer()
    for v in free:
        an.bind(v, tirx.const(REP_ROWS[v.name], "int64"))
    return int(an.simplify(d))


@dataclass(frozen=True)
class Workload:
    backend: str                 # a CPU backend (CPU_BACKENDS) | cuda_mma
    kind: str                    # dense | conv2d | w4a8
    shape: tuple                 # dense/w4a8: (M, N, K); conv2d: (N, H, W, C, OC, KH, KW)
    a_dtype: str
    out_dtype: str
    lo: int
    hi: int
    target: str                  # cpu:<mcpu> | cuda:sm_XX
    strides: tuple = ()
    pads: tuple = ()
    dilations: tuple = ()

    @property
    def key(self) -> str:
        geo = ""
        if self.kind == "conv2d":
            geo = (f"/s{','.join(map(str, self.strides))}/p{','.join(map(str, self.pads))}"
                   f"/d{','.join(map(str, self.dilations))}")
        return (f"{self.backend}.{self.kind}/{'x'.join(map(str, self.shape))}{geo}/"
                f"{self.a_dtype}->{self.out_dtype}[{self.lo},{self.hi}]/{self.target}")

    def fields(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("shape", "strides", "pads", "dilations"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_fields(cls, d: dict) -> Workload:
        d = dict(d)
        for k in ("shape", "strides", "pads", "dilations"):
            d[k] = tuple(int(v) for v in d.get(k, ()))
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    @property
    def macs(self) -> int:
        """Multiply-accumulates (to estimate a task's time before it is measured)."""
        if self.kind == "conv2d":
            N, H, W, C, OC, KH, KW = self.shape
            oh, ow = _conv_out(H, W, KH, KW, self.strides, self.pads, self.dilations)
            return N * oh * ow * OC * KH * KW * C
        M, N, K = self.shape
        return M * N * K

    @property
    def arch(self) -> str:
        return self.target.split(":", 1)[1]

    # ---- config space -------------------------------------------------------------------------
    @property
    def gemm_backend(self):
        """The CPU backend (``qcompiler.kernels.backends``) of this workload."""
        return _backends.get(self.backend)

    @property
    def isa(self):
        """The CPU ISA (``tile_model.Isa``) of a CPU backend."""
        return self.gemm_backend.isa

    def _registered(self) -> bool:
        """A backend of ``qcompiler.kernels.backends`` (every CPU one, and the CUDA ones for the kinds
        their workloads have: dense / conv2d; ``cuda_mma.w4a8`` is the older name of a W4A8 dense)."""
        return self.backend in CPU_BACKENDS or (self.kind != "w4a8" and self.backend in _backends.cuda_names())

    def config_class(self):
        if self._registered():
            return self.gemm_backend.config_class()
        from qcompiler.kernels.cuda_mma import MmaConfig

        return MmaConfig

    def config_from_dict(self, d: dict):
        cls = self.config_class()
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def default_config(self):
        if self._registered():
            return self.gemm_backend.default_for(self)
        from qcompiler.kernels import cuda_mma as K

        M, N, Kd = self._gemm_mnk()
        return K.default_config(M, N, Kd, self.arch, self.kind)

    def _gemm_mnk(self) -> tuple[int, int, int]:
        """The GEMM the kernel runs (as its generator sizes default_config)."""
        if self.kind == "conv2d":
            N, H, W, C, OC, KH, KW = self.shape
            oh, ow = _conv_out(H, W, KH, KW, self.strides, self.pads, self.dilations)
            if self.backend in CPU_BACKENDS:
                return N * oh * ow, OC, self.gemm_backend.gemm_k(C, KH, KW)
            return N * oh * ow, OC, KH * KW * C
        return tuple(self.shape)

    def config_space(self) -> list:
        """Every config the dataclass accepts for this workload (the generator may still reject some)."""
        cls = self.config_class()
        out, seen = [], set()
        for kw in (self.gemm_backend.config_points(self) if self._registered() else _cuda_points(self)):
            try:
                c = cls(**kw)
            except ValueError:
                continue
            k = config_key(c)
            if k not in seen:
                seen.add(k)
                out.append(c)
        return out

    def make_func(self, config=None):
        """The scheduled PrimFunc (args as the adapters pass them); raises ValueError / KernelUnsupported."""
        if self._registered():
            return self.gemm_backend.make_func(self, config)
        from qcompiler.kernels import cuda_mma as K

        if self.kind == "conv2d":
            N, H, W, C, OC, KH, KW = self.shape
            return K.conv2d_nhwc(N, H, W, C, OC, KH, KW, self.strides, self.pads, self.dilations, self.out_dtype,
                                 self.lo, self.hi, self.arch, config=config, a_dtype=self.a_dtype)
        M, N, Kd = self.shape
        f = K.dense_w4a8 if self.kind == "w4a8" else K.dense
        return f(M, N, Kd, self.out_dtype, self.lo, self.hi, self.arch, config=config, a_dtype=self.a_dtype)


def config_key(config) -> str:
    """Canonical identity of a config (its dataclass fields as sorted JSON).

    A field added to a config class after records were made carries ``metadata={"legacy": v}``,
    ``v`` being the value that generates the kernel the older records measured; at that value the
    field is left out of the key, so a record without the field and a config with it at ``v`` are
    the same config (and a kernel's ``qc.config`` attribute, hence its TIR hash, is unchanged)."""
    d = config if isinstance(config, dict) else dataclasses.asdict(config)
    legacy = _legacy_values()
    d = {k: v for k, v in d.items() if not (k in legacy and v == legacy[k])}
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


@functools.cache
def _legacy_values() -> dict:
    from qcompiler.kernels.cpu_vnni import VnniConfig
    from qcompiler.kernels.cuda_mma import MmaConfig

    return {f.name: f.metadata["legacy"] for cls in (VnniConfig, MmaConfig)
            for f in dataclasses.fields(cls) if "legacy" in f.metadata}


def config_dict(config) -> dict:
    return dict(config) if isinstance(config, dict) else dataclasses.asdict(config)


def normalize_config(w: Workload, config):
    """Map a config to its canonical twin (configs that generate the same kernel measure once).

    CPU: ``kc`` that does not divide the innermost reduction, is not below it or is not a multiple of
    the intrinsic's depth acts as 0; a config of one tile in all runs serially either way
    (``parallel`` is kept at its legacy True)."""
    if w.backend not in CPU_BACKENDS:
        return config
    if not config.parallel:
        from qcompiler.kernels.cpu_vnni import n_tiles

        M, N, _ = w._gemm_mnk()
        if n_tiles(M, N, config.mr, config.nr, w.isa) == 1:
            config = dataclasses.replace(config, parallel=True)
    if not config.kc:
        return config
    ext = _cpu_red_ext(w)
    if config.kc < ext and ext % config.kc == 0 and config.kc % w.isa.kpack == 0:
        return config
    return dataclasses.replace(config, kc=0)


def distinct_configs(w: Workload, configs) -> list:
    """``configs`` normalized (:func:`normalize_config`), each kernel once, in first-seen order."""
    return list({config_key(c): c for c in (normalize_config(w, c) for c in configs)}.values())


def text_hash(text: str) -> str:
    """The 16-hex-digit identity of a kernel's TVMScript (records' and profiles' ``tir_sha256``)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tir_hash(func) -> str:
    return text_hash(str(func))


def _conv_out(H, W, KH, KW, strides, pads, dilations):
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = strides, pads, dilations
    return (H + pt + pb - dh * (KH - 1) - 1) // sh + 1, (W + pl + pr - dw * (KW - 1) - 1) // sw + 1


def _cpu_red_ext(w: Workload) -> int:
    """The innermost reduction's extent (a conv's channels of one tap), padded as the kernel pads it."""
    return w.gemm_backend.red_ext(w)


SERIAL_SPACE_CYCLES = 400_000  # GEMMs estimated below this (~130 us) also try parallel=False


def tries_serial(w: Workload) -> bool:
    """Whether the CPU workload's config space also holds serial configs (``parallel=False``)."""
    from qcompiler.kernels.cpu_vnni import gemm_cycles

    return gemm_cycles(*w._gemm_mnk(), isa=w.isa) < SERIAL_SPACE_CYCLES


def _cpu_points(w: Workload):
    """The CPU backend's config grid (``CpuGemmBackend.config_points``): every register tile that
    fits, kc dividing the reduction, both loop orders; a small GEMM (``cpu_vnni.gemm_cycles`` <
    :data:`SERIAL_SPACE_CYCLES`, where a ~3.5 us parallel launch is >= 3% of the kernel) also every
    point run serially."""
    return w.gemm_backend.config_points(w)


def _cuda_points(w: Workload):
    """The MmaConfig grid of a CUDA workload of the older ``cuda_mma.w4a8`` kind (``cuda_mma.config_points``;
    the registered CUDA backends give theirs through the backend)."""
    from qcompiler.kernels import cuda_mma as K

    M, N, Kd = w._gemm_mnk()
    yield from K.config_points(M, N, Kd, w.arch, w.kind)


# ---- workloads of the adapters (compile time) and of the integer graph (tuning) ----------------
def _cpu_target(target) -> str:
    return f"cpu:{target.attrs.get('mcpu', '') if hasattr(target, 'attrs') else target}"


def cpu_conv(target, N, H, W, C, OC, KH, KW, strides, pads, dilations, a_dtype, out_dtype, lo, hi,
             backend: str = "cpu_vnni") -> Workload:
    return Workload(backend, "conv2d", tuple(int(v) for v in (N, H, W, C, OC, KH, KW)), a_dtype, out_dtype,
                    int(lo), int(hi), _cpu_target(target), tuple(map(int, strides)), tuple(map(int, pads)),
                    tuple(map(int, dilations)))


def cpu_dense(target, M, N, K, a_dtype, out_dtype, lo, hi, backend: str = "cpu_vnni") -> Workload:
    return Workload(backend, "dense", (int(M), int(N), int(K)), a_dtype, out_dtype, int(lo), int(hi),
                    _cpu_target(target))


def cuda_conv(arch, N, H, W, C, OC, KH, KW, strides, pads, dilations, a_dtype, out_dtype, lo, hi) -> Workload:
    return Workload("cuda_mma", "conv2d", tuple(int(v) for v in (N, H, W, C, OC, KH, KW)), a_dtype, out_dtype,
                    int(lo), int(hi), f"cuda:{arch}", tuple(map(int, strides)), tuple(map(int, pads)),
                    tuple(map(int, dilations)))


def cuda_dense(arch, M, N, K, a_dtype, out_dtype, lo, hi, w4a8: bool = False) -> Workload:
    return Workload("cuda_mma", "w4a8" if w4a8 else "dense", (int(M), int(N), int(K)), a_dtype, out_dtype,
                    int(lo), int(hi), f"cuda:{arch}")


def _cuda_workload(arch, n, bits: int, x_dtype: str, shape) -> Workload | None:
    """The workload of the CUDA backend the lowering picks first for the layer
    (``lowering/gemm_cuda.py``: ``backends.select_cuda`` by weight and activation bits)."""
    a_bits = _backends.a_bits_of(x_dtype)
    be = _backends.select_cuda(arch, bits, a_bits) if a_bits is not None else None
    if be is None or x_dtype not in be.a_dtypes:
        return None
    return be.workload(arch, n, x_dtype, shape)


@dataclass
class Task:
    workload: Workload
    layers: list                  # (model, layer name) using it
    uses: int = 0


def tasks_from_graph(ig, spec, model: str = "", row_buckets=()) -> list[Task]:
    """The distinct tunable kernels of an integer graph, routed as the lowering adapters route them
    (CPU: ``backends.select_cpu`` by the layer's weight bits and input dtype).  ``row_buckets``: the
    representative row counts of a CPU dense kernel over a symbolic row count
    (``cpu_vnni.ROW_BUCKETS``); each dense layer is a task at each of them below its row count too,
    the workload of that bucket (its tuned tile is what the symbolic kernel runs there)."""
    target = spec.arch  # cpu: the LLVM mcpu, as the adapter reads it from the target
    tvm_target = spec.tvm_target() if spec.kind == "cpu" else None
    found: dict[str, Task] = {}
    for n in ig.nodes:
        if n.op not in ("conv", "dense"):
            continue
        a = n.attrs
        x_dtype = ig.dtypes[n.inputs[0]]
        od = a["dtype"]
        bits = int(a.get("weight_bits", 8) or 8)
        bits = 8 if bits == 16 else bits   # 16-bit weights run the INT8 kernel twice (intops/gemm.py lower_w16)
        wls = []   # the layer's workloads (a dense one: also at each row bucket below its rows)
        if n.op == "conv":
            N, C, H, W = (int(d) for d in ig.shapes[n.inputs[0]])
            if int(a["group"]) != 1:
                continue  # depthwise / grouped kernels have no config space
            if spec.kind == "cpu":
                be = _backends.select_cpu(tvm_target, bits, x_dtype, ("conv", (N, H, W, C), np.asarray(a["weight"])))
                if be is not None and be.reject_conv(C):  # the lowering runs it on the INT8 kernel
                    be = _backends.int8_twin(be)
                if be is not None and od in _OUT_DTYPES:
                    wls = [be.workload(target, n, x_dtype, (N, H, W, C))]
            else:
                wls = [_cuda_workload(spec.arch, n, bits, x_dtype, (N, H, W, C))]
        else:
            shp = ig.shapes[n.inputs[0]]
            M, K = int(np.prod(shp[:-1])), int(shp[-1])
            if spec.kind == "cpu":
                be = _backends.select_cpu(tvm_target, bits, x_dtype, ("dense", (M, K), np.asarray(a["weight"])))
                if be is not None and od in _OUT_DTYPES:
                    wls = [be.workload(target, n, x_dtype, (m, K)) for m in (M, *(r for r in row_buckets if r < M))]
            else:
                wls = [_cuda_workload(spec.arch, n, bits, x_dtype, (M, K))]
        for w in (w for w in wls if w is not None):
            t = found.setdefault(w.key, Task(w, []))
            t.layers.append((model, n.name))
            t.uses += 1
    out = []
    for t in found.values():
        try:
            t.workload.make_func(None)
        except Exception:  # noqa: BLE001 - ValueError / KernelUnsupported: the layer goes generic
            continue
        out.append(t)
    return out


_OUT_DTYPES = ("int8", "uint8", "int16", "int32")  # cpu_vnni.OUT_DTYPES (kept TVM-free here)
