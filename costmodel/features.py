"""Feature extraction (schema ``qc-cost-features/3``, see the package docstring).

Inputs are plain data: a target dict (as in a tuning record), an optional GEMM workload + config
(dicts of a ``qc-tune/1`` record), the scheduled TIR as TVMScript text, and optionally the PrimFunc
(for MetaSchedule's ``PerStoreFeature``).  Everything here is deterministic.
"""

from __future__ import annotations

import functools
import math
import re
import sys
import types

import numpy as np

from qcompiler.kernels import backends as _backends
from qcompiler.kernels import tile_model as _tm

from . import FEATURE_SCHEMA

TEXT_DIM = 2 ** 11
MS_DIM = 164

# ---- target ----------------------------------------------------------------------------------------
# nominal figures: clock GHz, int8 MAC/cycle per core (CPU) or peak int8 TOPS (CUDA), bandwidth GB/s
CPU_ARCH = {  # VNNI: 64 int8 MAC per vpdpbusd, 1 per cycle per core on these parts
    "rocketlake": (4.25, 64, 20.0), "icelake-server": (3.2, 128, 12.0), "icelake-client": (3.9, 64, 20.0),
    "cascadelake": (3.0, 128, 12.0), "sapphirerapids": (3.0, 128, 10.0), "tigerlake": (4.2, 64, 20.0),
    "znver4": (3.7, 64, 15.0), "alderlake": (4.5, 32, 20.0),
    # AVX2 (no VNNI): 16 MAC per vpmaddwd ymm; 1 per cycle on Zen 2, 2 on Zen 3 and Intel since Skylake
    "znver2": (3.0, 16, 15.0), "znver3": (3.5, 32, 15.0), "haswell": (3.0, 16, 15.0), "broadwell": (3.0, 16, 15.0),
    "skylake": (3.5, 32, 15.0),
}
CUDA_ARCH = {  # clock GHz, SMs, dense int8 TOPS, GB/s (the usual part of each arch)
    "sm_75": (1.59, 40, 130.0, 320.0), "sm_80": (1.41, 108, 624.0, 2039.0), "sm_86": (1.70, 84, 284.0, 936.0),
    "sm_89": (2.52, 128, 660.0, 1008.0), "sm_90": (1.83, 132, 1979.0, 3350.0),
}
TARGET_NAMES = ["t_cuda", "t_units", "t_clock_ghz", "t_peak_gops", "t_bw_gbs", "t_log_peak", "t_log_bw",
                "t_in_model"]  # timing context: 1 = inside the running model (cold operands), 0 = alone


def target_info(target: dict) -> dict:
    """Nominal peak figures of a record's target dict ({kind, arch, device, cores | sm_count})."""
    kind = target.get("kind", "cpu")
    arch = str(target.get("arch") or "")
    if kind == "cuda":
        clock, sms, tops, bw = CUDA_ARCH.get(arch, (1.5, 80, 300.0, 1000.0))
        sms_rec = target.get("sm_count") or sms
        return {"kind": "cuda", "units": int(sms_rec), "clock_ghz": clock, "peak_gops": tops * 1e3 * sms_rec / sms,
                "bw_gbs": bw, "launch_s": 5e-6}
    clock, macs, bw_core = CPU_ARCH.get(arch, (3.0, 64, 15.0))
    cores = int(target.get("cores") or 1)
    return {"kind": "cpu", "units": cores, "clock_ghz": clock, "peak_gops": cores * clock * macs * 2,
            "bw_gbs": bw_core * cores, "launch_s": 2e-6}


def target_features(target: dict, in_model: bool = False) -> list[float]:
    t = target_info(target)
    return [float(t["kind"] == "cuda"), t["units"], t["clock_ghz"], t["peak_gops"], t["bw_gbs"],
            math.log(t["peak_gops"]), math.log(t["bw_gbs"]), float(in_model)]


# ---- cfg: the GEMM workload + config of a tuning record ---------------------------------------------
_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int32": 32, "int64": 64,
         "float16": 16, "float32": 32, "bool": 8}
CFG_NAMES = ["c_is_conv", "c_is_w4a8", "c_M", "c_N", "c_K", "c_logM", "c_logN", "c_logK", "c_log_macs",
             "c_a_bits", "c_w_bits", "c_out_bits", "c_KH", "c_KW", "c_stride", "c_C", "c_OC",
             "c_bytes_a", "c_bytes_w", "c_bytes_out", "c_log_bytes", "c_intensity",
             "c_mr", "c_nr", "c_kc", "c_n_outer", "c_acc", "c_workspace", "c_tiles", "c_log_tiles",
             "c_tiles_per_unit", "c_imbalance", "c_m_waste", "c_k_steps", "c_kc_blocks",
             "c_bm", "c_bn", "c_bk", "c_warps", "c_stages", "c_smem_kb",
             "c_roof_log_s", "c_compute_log_s", "c_mem_log_s", "c_default_like"] + [
    # VNNI analytic model of the register-tiled GEMM (see :func:`vnni_analytic`)
    "v_log_cycles", "v_log_cycles_rel", "v_step_cycles", "v_loads_per_dot", "v_vregs", "v_log_a_traffic",
    "v_log_w_traffic", "v_log_traffic", "v_w_panel_kb", "v_a_block_kb", "v_kblock_kb", "v_log_tile_cycles",
    "v_par_tasks", "v_tail_frac", "v_n_waste"]


def gemm_mnk(workload: dict) -> tuple[int, int, int]:
    shp = [int(v) for v in workload["shape"]]
    if workload["kind"] == "conv2d":
        N, H, W, C, OC, KH, KW = shp
        (sh, sw), (pt, pl, pb, pr), (dh, dw) = workload["strides"], workload["pads"], workload["dilations"]
        oh = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
        ow = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
        be = _cpu_backend(workload.get("backend"))
        return N * oh * ow, OC, be.gemm_k(C, KH, KW) if be is not None else KH * KW * C
    return shp[0], shp[1], shp[2]


def roofline_gemm(workload: dict, target: dict) -> tuple[float, float, float]:
    """(time, compute time, memory time) in seconds of a GEMM at the target's nominal peaks."""
    M, N, K = gemm_mnk(workload)
    t = target_info(target)
    a_bits = _BITS.get(workload.get("a_dtype", "int8"), 8)
    w_bits = weight_bits(workload)
    ob = _BITS.get(workload.get("out_dtype", "int8"), 8)
    comp = 2.0 * M * N * K / (t["peak_gops"] * 1e9)
    mem = (M * K * a_bits / 8 + N * K * w_bits / 8 + M * N * ob / 8 + 12 * N) / (t["bw_gbs"] * 1e9)
    return max(comp, mem) + t["launch_s"], comp, mem


# the x86 GEMM backends' tile model: qcompiler/kernels/tile_model.py through the backend registry
# (qcompiler/kernels/backends/), the same model ``cpu_vnni.default_config`` picks tiles with
def _cpu_backend(name):
    """The CPU GEMM backend of a workload's backend name, None for others (the CUDA ones)."""
    try:
        be = _backends.get(name)
    except KeyError:
        return None
    return be if be.kind == "cpu" else None


def _isa(backend) -> _tm.Isa:
    """The tile model of a CPU backend (an unknown one is read as VNNI INT8, as before)."""
    be = _cpu_backend(backend)
    return be.isa if be is not None else _backends.get("cpu_vnni").isa


def weight_bits(workload: dict) -> int:
    if workload["kind"] == "w4a8":  # the older name of a CUDA W4A8 dense workload
        return 4
    try:
        return _backends.get(workload.get("backend")).weight_bits
    except KeyError:
        return 8


def _vnni_cycles(M: int, N: int, K: int, mr: int, nr: int, units: int,
                 backend: str = "cpu_vnni") -> tuple[float, float, float]:
    """(total, per tile, per kp-deep step) cycles of the x86 kernel's register tile
    (``tile_model.tile_cost``: whole tiles split over the cores)."""
    return _tm.tile_cost(M, N, K, mr, nr, _isa(backend), units)[:3]


@functools.lru_cache(maxsize=4096)
def _vnni_best(M: int, N: int, K: int, units: int, backend: str = "cpu_vnni") -> float:
    return _tm.best_space_cycles(M, N, K, _isa(backend), units)


def _units(t: dict, config: dict) -> int:
    """Cores (SMs) a config's kernel runs on: all of the target's, one for a serial CPU config."""
    return t["units"] if config.get("parallel", True) else 1


def vnni_analytic(workload: dict, config: dict, target: dict) -> list[float]:
    """Analytic features of a VNNI GEMM config (schema v2): modelled cycles (absolute and relative
    to the best tile of the same model over the space: what the learned part corrects), operand
    loads per vpdpbusd ((mr+nr)/(mr*nr)), vector registers used (mr*nr + nr + 1 of 32), operand
    traffic by loop order (n-tiles outside: A re-read once per n-tile, W once; m-tiles outside: W
    re-read once per m-tile), weight panel K x 16nr, activation block mr x K and k-block bytes,
    parallel tasks per core and the idle share of the last wave, padded columns.  A config with
    ``parallel=False`` runs on one core (units = 1)."""
    M, N, K = gemm_mnk(workload)
    t = target_info(target)
    units = _units(t, config)
    mr, nr, kc = int(config["mr"]), int(config["nr"]), int(config.get("kc") or 0)
    backend = workload.get("backend", "cpu_vnni")
    L = _isa(backend).lanes
    nb = -(-N // L)
    total, per_tile, step = _vnni_cycles(M, N, K, mr, nr, units, backend)
    best = _vnni_best(M, N, K, units, backend)
    mt, ntl = -(-M // mr), max(1, nb // nr)
    a_b, w_b = M * K, nb * L * K
    if config.get("n_outer", True):
        a_tr, w_tr = a_b * ntl, w_b
    else:
        a_tr, w_tr = a_b, w_b * mt
    taps = 1
    if workload["kind"] == "conv2d":
        shp = [int(v) for v in workload["shape"]]
        taps = shp[5] * shp[6]
    kblock = (kc * taps if kc else K) * nr * L
    tiles = mt * ntl
    waves = math.ceil(tiles / units)
    return [math.log(total), math.log(total / best), step, (mr + nr) / (mr * nr), mr * nr + nr + 1,
            math.log(a_tr), math.log(w_tr), math.log(a_tr + w_tr), K * nr * L / 1024, mr * K / 1024,
            kblock / 1024, math.log(per_tile), tiles / units, (waves * units - tiles) / (waves * units),
            (nb * L - N) / N]


def cfg_features(workload: dict | None, config: dict | None, target: dict) -> list[float]:
    if workload is None:
        return [math.nan] * len(CFG_NAMES)
    M, N, K = gemm_mnk(workload)
    t = target_info(target)
    conv = workload["kind"] == "conv2d"
    shp = [int(v) for v in workload["shape"]]
    KH, KW, C, OC = (shp[5], shp[6], shp[3], shp[4]) if conv else (1, 1, K, N)
    stride = workload["strides"][0] if conv else 1
    a_bits = _BITS.get(workload.get("a_dtype", "int8"), 8)
    w_bits = weight_bits(workload)
    ob = _BITS.get(workload.get("out_dtype", "int8"), 8)
    ba, bw, bo = M * K * a_bits / 8, N * K * w_bits / 8, M * N * ob / 8
    macs = M * N * K
    roof, comp, mem = roofline_gemm(workload, target)
    c = config or {}
    nan = math.nan
    mr, nr, kc, n_outer = (c.get("mr", nan), c.get("nr", nan), c.get("kc", nan), c.get("n_outer", nan))
    bm, bn, bk = c.get("bm", nan), c.get("bn", nan), c.get("bk", nan)
    warps = (c.get("warps_m", 1) * c.get("warps_n", 1) * c.get("warps_k", 1)) if "bm" in c else nan
    stages = c.get("stages", nan)
    if "mr" in c:
        isa = _isa(workload.get("backend"))
        L = isa.lanes
        nb = -(-N // L)
        tiles = -(-M // mr) * max(1, nb // nr)
        acc = mr * nr
        workspace = float(acc * L * 4 >= 1024)
        m_waste = (-(-M // mr) * mr - M) / M
        k_steps = -(-K // 4)
        r = max(isa.kround, isa.kpack)
        red = -(-C // r) * r if conv else -(-K // r) * r
        kc_blocks = red / kc if kc and red % kc == 0 and kc < red else 1.0
        smem = nan
        default_like = float(acc < 16 and mr <= 8)
    elif "bm" in c:
        tiles = -(-M // bm) * -(-N // bn)
        acc = bm * bn / max(1, warps) / 32
        workspace = nan
        m_waste = (-(-M // bm) * bm - M) / M
        k_steps = -(-K // bk)
        kc_blocks = nan
        smem = stages * (bm * bk + bn * bk * w_bits / 8) / 1024
        default_like = nan
    else:
        tiles = acc = workspace = m_waste = k_steps = kc_blocks = smem = default_like = nan
    units = _units(t, c)
    tpu = tiles / units if tiles == tiles else nan
    imb = (math.ceil(tiles / units) * units / tiles) if tiles == tiles and tiles > 0 else nan
    return [float(conv), float(w_bits == 4), M, N, K, math.log2(M), math.log2(N), math.log2(K),
            math.log(macs), a_bits, w_bits, ob, KH, KW, stride, C, OC, ba, bw, bo, math.log(ba + bw + bo),
            2.0 * macs / (ba + bw + bo), mr, nr, kc, float(n_outer) if n_outer == n_outer else nan, acc, workspace,
            tiles, math.log(tiles) if tiles == tiles and tiles > 0 else nan, tpu, imb, m_waste, k_steps, kc_blocks,
            bm, bn, bk, warps, stages, smem, math.log(roof), math.log(comp), math.log(mem), default_like] + \
        (vnni_analytic(workload, c, target) if "mr" in c else [nan] * 15)


# ---- tir: loop structure and dynamic op counts read from the TVMScript -------------------------------
_LOOP = re.compile(r"^\s*for\s+(.+?)\s+in\s+(T\.(parallel|vectorized|unroll|serial|grid|thread_binding)|range)\((.*)\):\s*$")
_SHAPE = r'\(((?:[^()]|\([^()]*\))*)\)'  # a shape tuple; its extents may be T.int64(22) (Relax-lowered kernels)
_BUF = re.compile(r'T\.Buffer\(' + _SHAPE + r',\s*"(\w+)"')
_ARG = re.compile(r'(\w+):\s*' + _BUF.pattern)  # name: T.Buffer(shape, "dtype") of a signature
_ALLOC = re.compile(r'(\w+)\s*=\s*T\.(?:sblock_)?alloc_buffer\(' + _SHAPE + r',\s*"(\w+)"')
_STORE = re.compile(r"^\s*([A-Za-z_]\w*)\[(.*?)\]\s*=\s*(.+)$")
_SKIP = ("T.axis", "T.reads", "T.writes", "T.match_buffer", "T.func_attr", "T.sblock_alloc", "T.alloc")
_OPS = {
    "mul": re.compile(r"(?<![*])\*(?![*])"), "add": re.compile(r"(?<![<>=!])[+-](?!=)"),
    "shift": re.compile(r"<<|>>"), "cast": re.compile(r"T\.Cast\("), "minmax": re.compile(r"T\.(?:max|min)\("),
    "select": re.compile(r"T\.(?:if_then_else|Select)\(|\bif\b"), "div": re.compile(r"//|%|T\.(?:floordiv|floormod|truncdiv)\("),
    "cmp": re.compile(r"<=|>=|==|!=|(?<![<])<(?![<=])|(?<![>])>(?![>=])"),
    "vnni": re.compile(r"vpdpbusd|vpdpwssd|dp4a|mma|pmadd\.wd"), "intrin": re.compile(r"call_llvm_pure_intrin|call_extern|call_pure_extern"),
    "load": re.compile(r"\b[A-Za-z_]\w*\["),
}
_MAC_UNITS = {"pmadd.wd": 0.25}  # "vnni" counts MAC intrinsics in vpdpbusd units (64 MACs): vpmaddwd ymm does 16
TIR_NAMES = (["x_n_loops", "x_n_parallel", "x_n_vector", "x_n_unroll", "x_n_serial", "x_depth", "x_par_extent",
              "x_log_par_extent", "x_par_per_unit", "x_par_imbalance", "x_vec_max", "x_vec_mean", "x_unroll_prod",
              "x_n_blocks", "x_n_stores", "x_log_iters", "x_log_scalar_iters", "x_log_vec_iters"]
             + [f"x_log_dyn_{k}" for k in _OPS]
             + ["x_log_bytes_written", "x_log_bytes_read", "x_log_param_bytes", "x_log_scratch_bytes",
                "x_max_bits", "x_has_i64", "x_has_i16", "x_has_float", "x_n_params", "x_log_out_elems",
                "x_log_ops_per_unit", "x_log_bytes_per_unit", "x_intensity", "x_roof_log_s"])


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _ints(s: str) -> list[int]:
    """The integers of a shape tuple's text: ``22``, ``T.int64(22)`` -> 22 (never the 64 of int64)."""
    return [int(v) for v in re.findall(r"-?\d+", re.sub(r"T\.u?int\d+\(", "(", s))]


def _extent(kind: str, args: str) -> list[int]:
    a = [x.strip() for x in args.split(",") if x.strip()]
    nums = []
    for x in a:
        if re.fullmatch(r"-?\d+", x):
            nums.append(int(x))
        elif "=" in x:  # thread_binding(..., thread="x")
            continue
        else:
            m = re.fullmatch(r"T\.int64\((\d+)\)", x)
            nums.append(int(m.group(1)) if m else 1)
    if kind in ("grid",):
        return nums
    if kind == "range" and len(nums) == 2:
        return [max(1, nums[1] - nums[0])]
    return nums[-1:] if kind == "thread_binding" and nums else nums[:1] or [1]


def _dtype_bytes(dt: str) -> float:
    m = re.match(r"([a-z]+?)(\d+)(?:x(\d+))?$", dt)
    if not m:
        return 4.0
    return int(m.group(2)) / 8 * int(m.group(3) or 1)


def analyze_text(text: str) -> dict:
    """Loop nest, stores and dynamic op counts of one PrimFunc's TVMScript (indentation-based)."""
    lines = text.splitlines()
    params, scratch = [], []
    for ln in lines:
        if ln.lstrip().startswith("def "):
            params = [(_ints(s), dt) for s, dt in _BUF.findall(ln)]
        for _, s, dt in _ALLOC.findall(ln):
            scratch.append((_ints(s), dt))
    buf_dtype = {}
    sig = next((ln for ln in lines if ln.lstrip().startswith("def ")), "")
    for name, s, dt in _ARG.findall(sig):
        buf_dtype[name] = dt
    for name, s, dt in _ALLOC.findall(text):
        buf_dtype[name] = dt
    stack: list[tuple[int, str, int]] = []  # (indent, kind, extent)
    loops = {"parallel": 0, "vectorized": 0, "unroll": 0, "serial": 0}
    vecs, unrolls, depth, par_top = [], [], 0, 0
    blocks = stores = 0
    iters_tot = scalar_tot = vec_tot = 0.0
    dyn = {k: 0.0 for k in _OPS}
    wbytes = rbytes = 0.0
    for ln in lines:
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        ind = len(ln) - len(ln.lstrip())
        while stack and stack[-1][0] >= ind:
            stack.pop()
        m = _LOOP.match(ln)
        if m:
            kind = m.group(3) or "range"
            exts = _extent(kind, m.group(4))
            k2 = {"range": "serial", "grid": "serial", "thread_binding": "parallel"}.get(kind, kind)
            for e in exts:
                stack.append((ind, k2, max(1, e)))
                loops[k2] += 1
                if k2 == "vectorized":
                    vecs.append(e)
                elif k2 == "unroll":
                    unrolls.append(e)
            if k2 == "parallel" and not any(k == "parallel" for _, k, _ in stack[:-len(exts)]):
                par_top += _prod(exts)
            depth = max(depth, len(stack))
            continue
        s = ln.strip()
        if s.startswith("with T.sblock("):
            blocks += 1
            continue
        if s.startswith(_SKIP) or s.startswith(("with ", "T.", "return", "def ", "@")):
            continue
        sm = _STORE.match(ln)
        if not sm:
            continue
        stores += 1
        it = float(_prod(e for _, _, e in stack))
        vw = float(_prod(e for _, k, e in stack if k == "vectorized"))
        iters_tot += it
        scalar_tot += it / vw
        vec_tot += it if vw > 1 else 0.0
        rhs = sm.group(3)
        lanes = 1
        lm = re.search(r'"(?:u?int|float)(\d+)x(\d+)"', rhs)
        if lm:
            lanes = int(lm.group(2))
        for k, rx in _OPS.items():
            n = len(rx.findall(rhs))
            if k == "add":  # unary minus of literals and index arithmetic inside [] are not ALU work
                n = len(rx.findall(re.sub(r"\[[^\]]*\]", "", rhs)))
            elif k == "vnni":
                n = sum(_MAC_UNITS.get(m, 1.0) for m in rx.findall(rhs))
            # an intrinsic call is one instruction whatever its lanes; ALU ops count per lane
            dyn[k] += n * it * (1 if k in ("vnni", "intrin") else lanes)
        wbytes += it * _dtype_bytes(buf_dtype.get(sm.group(1), "int32")) * lanes
        for name in re.findall(r"\b([A-Za-z_]\w*)\[", rhs):
            if name in buf_dtype:
                rbytes += it * _dtype_bytes(buf_dtype[name]) * lanes
    dts = set(re.findall(r'"((?:u?int|float|bfloat)\d+)(?:x\d+)?"', text)) | set(
        re.findall(r"T\.((?:u?int|float)\d+)\(", text))
    pbytes = sum(_prod(s) * _dtype_bytes(dt) for s, dt in params)
    sbytes = sum(_prod(s) * _dtype_bytes(dt) for s, dt in scratch)
    out_elems = _prod(params[-1][0]) if params else 1
    return {"loops": loops, "depth": depth, "par_extent": par_top, "vecs": vecs, "unrolls": unrolls,
            "blocks": blocks, "stores": stores, "iters": iters_tot, "scalar_iters": scalar_tot, "vec_iters": vec_tot,
            "dyn": dyn, "wbytes": wbytes, "rbytes": rbytes, "pbytes": pbytes, "sbytes": sbytes,
            "max_bits": max([_BITS.get(d, 32) for d in dts] or [8]), "dtypes": sorted(dts),
            "n_params": len(params), "out_elems": out_elems}


def _l(x: float) -> float:
    return math.log1p(max(0.0, float(x)))


def tir_features(a: dict, target: dict) -> list[float]:
    t = target_info(target)
    units = t["units"]
    par = a["par_extent"]
    ops = sum(v for k, v in a["dyn"].items() if k not in ("load", "intrin"))
    vnni = a["dyn"]["vnni"]
    ops_eff = ops + vnni * 128  # one vpdpbusd = 64 MAC = 128 ops (vpmaddwd: counted as 1/4 of one)
    byt = a["wbytes"] + a["rbytes"]
    compute = ops_eff / (t["peak_gops"] * 1e9 / 4)  # non-VNNI ALU work runs at ~1/4 of the VNNI peak rate
    mem = (a["pbytes"] + a["sbytes"]) / (t["bw_gbs"] * 1e9)
    roof = max(compute, mem) + t["launch_s"]
    vec = a["vecs"]
    return [sum(a["loops"].values()), a["loops"]["parallel"], a["loops"]["vectorized"], a["loops"]["unroll"],
            a["loops"]["serial"], a["depth"], par, _l(par), par / units if par else 0.0,
            (math.ceil(par / units) * units / par) if par else float(units),
            max(vec or [0]), float(np.mean(vec)) if vec else 0.0, float(_prod(a["unrolls"])) if a["unrolls"] else 1.0,
            a["blocks"], a["stores"], _l(a["iters"]), _l(a["scalar_iters"]), _l(a["vec_iters"])] + \
        [_l(a["dyn"][k]) for k in _OPS] + \
        [_l(a["wbytes"]), _l(a["rbytes"]), _l(a["pbytes"]), _l(a["sbytes"]), a["max_bits"],
         float("int64" in a["dtypes"]), float("int16" in a["dtypes"] or "uint16" in a["dtypes"]),
         float(any(d.startswith(("float", "bfloat")) for d in a["dtypes"])), a["n_params"], _l(a["out_elems"]),
         _l(ops_eff / (min(par, units) if par else 1)), _l(byt / (min(par, units) if par else 1)),
         ops_eff / max(1.0, a["pbytes"] + a["sbytes"]), math.log(roof)]


def roofline_text(a: dict, target: dict) -> float:
    """Roofline time (s) of a kernel from its TIR analysis (nominal peaks; labelled as such by callers)."""
    return math.exp(tir_features(a, target)[-1])


# ---- MetaSchedule per-store features ---------------------------------------------------------------
_FE = {}


def _ms_context(target_obj):
    """A TuneContext without TuneContext.__init__'s ``import tvm.s_tir.tensor_intrin`` (30+ s here,
    docs/design.md §5): PerStoreFeature only reads the target and the candidate's module."""
    from tvm.s_tir import meta_schedule as ms

    stubbed = "tvm.s_tir.tensor_intrin" not in sys.modules
    if stubbed:
        sys.modules["tvm.s_tir.tensor_intrin"] = types.ModuleType("tvm.s_tir.tensor_intrin")
    try:
        return ms.TuneContext(mod=None, target=target_obj)
    finally:
        if stubbed:
            del sys.modules["tvm.s_tir.tensor_intrin"]


def ms_features(func, target: dict) -> np.ndarray:
    """PerStoreFeature (164 per BufferStore) of a scheduled PrimFunc, summed and maxed over stores
    (log1p-scaled as MetaSchedule emits them); NaN when the func is missing or extraction fails."""
    if func is None:
        return np.full(2 * MS_DIM, np.nan)
    try:
        import tvm
        from tvm.s_tir import meta_schedule as ms

        key = (target.get("kind"), target.get("arch"))
        if key not in _FE:
            tj = ({"kind": "llvm", "mcpu": target.get("arch") or "x86-64", "num-cores": int(target.get("cores") or 1)}
                  if target.get("kind", "cpu") == "cpu" else {"kind": "cuda", "arch": target.get("arch")})
            try:
                tobj = tvm.target.Target(tj)
            except Exception:  # noqa: BLE001 - an arch this LLVM does not know
                tobj = tvm.target.Target({"kind": "llvm"})
            _FE[key] = (ms.feature_extractor.PerStoreFeature(), _ms_context(tobj))
        fe, ctx = _FE[key]
        if not func.attrs or "global_symbol" not in func.attrs:
            func = func.with_attr("global_symbol", "main")
        f = fe.extract_from(ctx, [ms.MeasureCandidate(tvm.s_tir.Schedule(func), [])])[0].numpy()
        if f.size == 0:
            return np.zeros(2 * MS_DIM)
        return np.concatenate([f.sum(0), f.max(0)])
    except Exception:  # noqa: BLE001 - features are best effort; XGBoost takes NaN as missing
        return np.full(2 * MS_DIM, np.nan)


MS_NAMES = [f"ms_sum_{i}" for i in range(MS_DIM)] + [f"ms_max_{i}" for i in range(MS_DIM)]


# ---- text: the TIR read as language ---------------------------------------------------------------
_TOK = re.compile(r'"[^"]*"|T\.\w+|[A-Za-z_]\w*|\d+|<<|>>|//|<=|>=|==|!=|[-+*/%<>=()\[\]:,]')


def _norm_num(s: str) -> str:
    n = int(s)
    return s if n <= 16 else f"P{int(math.log2(n))}"


def tokens(text: str) -> list[str]:
    """Tokens of TVMScript: op names, dtypes (quoted strings), loop kinds, intrinsic names, block
    names; numbers <= 16 kept, larger ones as their power of two (P10 ~ 1024); loop variables and
    other identifiers reduced to their stem (v_i_o -> v, j_0_i_0_fused -> fused); one EOL per line."""
    out = []
    for ln in text.splitlines():
        s = ln.strip()
        if not s or s.startswith(("#", "T.reads", "T.writes", "T.func_attr", "@")):
            continue
        for t in _TOK.findall(s):
            if t.isdigit():
                out.append(_norm_num(t))
            elif t.startswith('"'):
                out.append(t.strip('"').replace(" ", "_"))
            elif t.startswith("T."):
                out.append(t)
            elif re.match(r"[A-Za-z_]", t):
                stem = re.sub(r"(_\d+)+$", "", t)
                stem = "fused" if stem.endswith("fused") else stem
                out.append(stem.split("_")[0] if stem.startswith("v_") else stem)
            else:
                out.append(t)
        out.append("EOL")
    return out


_HV = None


def text_features_many(texts: list[str]) -> np.ndarray:
    global _HV
    if _HV is None:
        from sklearn.feature_extraction.text import HashingVectorizer

        _HV = HashingVectorizer(n_features=TEXT_DIM, analyzer=lambda toks: _ngrams(toks), alternate_sign=False,
                                norm=None)
    m = _HV.transform([tokens(t) for t in texts])
    return np.log1p(m.toarray())


def _ngrams(toks: list[str]) -> list[str]:
    out = list(toks)
    out += [" ".join(toks[i:i + 2]) for i in range(len(toks) - 1)]
    out += [" ".join(toks[i:i + 3]) for i in range(len(toks) - 2)]
    return out


TEXT_NAMES = [f"txt_{i}" for i in range(TEXT_DIM)]

# ---- assembly --------------------------------------------------------------------------------------
FAMILIES = {"target": TARGET_NAMES, "cfg": CFG_NAMES, "tir": TIR_NAMES, "ms": MS_NAMES, "text": TEXT_NAMES}
ORDER = ["target", "cfg", "tir", "ms", "text"]
NAMES = [n for f in ORDER for n in FAMILIES[f]]
STRUCTURAL = ["target", "cfg", "tir", "ms"]


def schema() -> dict:
    return {"schema": FEATURE_SCHEMA, "families": {f: len(FAMILIES[f]) for f in ORDER}, "order": ORDER,
            "n_features": len(NAMES), "text": {"n_features": TEXT_DIM, "ngram_range": [1, 3], "hash": "sklearn"
                                               " HashingVectorizer(alternate_sign=False, norm=None), log1p counts"}}


def columns(families: list[str]) -> np.ndarray:
    """Column indices of the given families in the full vector."""
    idx, off = [], 0
    for f in ORDER:
        n = len(FAMILIES[f])
        if f in families:
            idx.extend(range(off, off + n))
        off += n
    return np.asarray(idx, dtype=np.int64)


def featurize(samples: list[dict], with_ms: bool = True) -> np.ndarray:
    """Feature matrix of samples ``{"target": dict, "text": TVMScript, "func": PrimFunc|None,
    "workload": dict|None, "config": dict|None, "in_model": bool}`` (full vector; select families
    with :func:`columns`)."""
    rows = []
    for s in samples:
        a = analyze_text(s["text"])
        ms_f = ms_features(s.get("func"), s["target"]) if with_ms else np.full(2 * MS_DIM, np.nan)
        rows.append(np.concatenate([target_features(s["target"], s.get("in_model", False)), cfg_features(s.get("workload"), s.get("config"),
                                                                              s["target"]),
                                    tir_features(a, s["target"]), ms_f]))
    txt = text_features_many([s["text"] for s in samples]) if samples else np.zeros((0, TEXT_DIM))
    X = np.concatenate([np.asarray(rows, dtype=np.float64).reshape(len(samples), -1), txt], axis=1)
    assert X.shape[1] == len(NAMES), (X.shape, len(NAMES))
    return X


def cfg_only(workload: dict, config: dict, target: dict) -> np.ndarray:
    """The target + cfg part of the vector (no TIR needed): what the compile-time picker uses."""
    return np.asarray(target_features(target) + cfg_features(workload, config, target), dtype=np.float64)
