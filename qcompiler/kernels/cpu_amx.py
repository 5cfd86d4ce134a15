"""INT8 dense and NHWC convolution kernels on Intel AMX (``TDPBUSD`` tiles, ``_amx_intrin.py``).

They compute the kernel contract of ``cpu_vnni.py`` (``acc = A @ W + bias``, dyadic requantization,
clip, optional fused elementwise epilogue) with the same operand conventions: activations read as
uint8 (int8 offset by +128, taken back through ``bias_eff``), weights in the VNNI layout
``Wp[N/16, Kp/4, 16, 4]``, which is also AMX's B-tile layout (16 rows of 64 bytes per 16 columns and
64 reduction steps).  What differs is the reduction padding and the operand copy:

* the reduction is padded to a multiple of 64 (an A tile row).  Dense: Kp = K rounded up to 64.
  Conv: each tap's channels are padded to Cp = C rounded up to 64 (k = tap * Cp + c, the layout of
  ``cpu_vnni._conv_kn(w, 64)``), so every 64-deep step lies inside one tap; a narrow conv (C < 32:
  an image's first layer) pads to 4 channels and its kernel to a (KHp, KWp) grid (``conv_layout``);
* the A operand is a row-major [Mp, Kp] uint8 matrix, rows = output pixels (n, oh, ow) for a conv
  (an im2col copy, "prep"), Mp = M rounded up to the block rows; rows past M repeat the last row and
  are never stored.  Dense reads A in place when it already is that matrix (uint8, K % 64 == 0,
  M % block rows == 0).  Zero padding of a conv is the byte of the real value 0 (128 under the
  offset), so ``bias_eff`` removes it with the rest, exactly as in ``cpu_vnni``.

Schedule: blocks of ``16 mt x 16 nt`` outputs (``AmxConfig``), one intrinsic call per block over
``kc`` (0: the whole reduction, so the C tiles stay in tile registers from the first to the last
step), the requantization epilogue on the finished block from its ``local`` int32 buffer.  Row
blocks outer (the default unless there are fewer than two per core): the row-block loop is parallel
and the operand copy of a row block runs right before its column blocks, so the im2col rows stay in
cache (a whole-matrix im2col of a 56x56x64 3x3 conv is 1.8 MB: 126 -> 77 us per call on the 2-core
Sapphire-Rapids-class VM); column blocks outer: the fused block loop is parallel after a parallel
whole-matrix copy.  Shapes over symbolic dims and convs with fewer than
:data:`MIN_CONV_CHANNELS` channels per tap are not taken (``AmxBackend.declines``): the VNNI kernels
run them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from . import _amx_intrin as X
from . import cpu_vnni as V

KROUND = 64
MIN_MACS = 1 << 20       # smaller GEMMs stay on the vector kernels (AmxGemmBackend.declines)
NARROW_CHANNELS = 32     # below, a conv's channels per tap are padded to 4, not 64 (conv_layout)
DEFAULT_UNITS = 2        # cores the default config is chosen for (the project's machines)
MIN_CONV_CHANNELS = 32   # below, padding each tap's channels to 64 at least doubles the work


@dataclass(frozen=True)
class AmxConfig:
    """Tunable parameters of the AMX GEMM schedule.

    mr       rows of a block: 16 * mt, mt in 1..3
    nr       column blocks of 16 (nt), 1..3, dividing ceil(N/16); mt * nt + mt + nt <= 8 tiles
    kc       reduction per intrinsic call, a multiple of 64 dividing Kp (0: the whole reduction)
    n_outer  block loop order: column blocks outside row blocks
    parallel the block loop runs in parallel
    ng       column blocks per intrinsic call (dividing their count; with kc = 0 only): the tile
             configuration is loaded once for ng blocks, whose C tiles go to one [mr, 16 nr ng] buffer
    (The first five field names are VnniConfig's, so the cost model's features read both.)
    """

    mr: int = 32
    nr: int = 2
    kc: int = 0
    n_outer: bool = False
    parallel: bool = True
    ng: int = 1

    def __post_init__(self):
        if self.mr % 16 or (self.mr // 16, self.nr) not in X.SHAPES:
            raise ValueError(f"AmxConfig: a {self.mr}x{16 * self.nr} block is not one of the tile shapes "
                             f"{[(16 * a, 16 * b) for a, b in X.SHAPES]}")
        if self.kc < 0 or self.kc % KROUND:
            raise ValueError(f"AmxConfig: kc must be 0 or a positive multiple of {KROUND}, got {self.kc}")
        if self.ng < 1 or (self.ng > 1 and self.kc):
            raise ValueError(f"AmxConfig: ng must be >= 1, and 1 unless kc = 0; got ng={self.ng}, kc={self.kc}")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def block_cycles(M: int, N: int, K: int, mr: int, nr: int, units: int = 2) -> float:
    """Modelled cycles of an mr x 16nr blocking on ``units`` cores: per 64-deep step
    max(16 * mt * nt, 8 * (mt + nt)) + 10 (tdpbusd at 16 cycles, tile loads ~8), per block ~150 for
    the tile configuration, ~40 per C tile out and ~0.6 per output of the int64 requantization
    epilogue (a 3136 x 256 x 64 GEMM, one step per block: ~900 cycles per 32x32 block measured)."""
    mt = mr // 16
    steps = _ceil(K, KROUND)
    per_step = max(16 * mt * nr, 8 * (mt + nr)) + 10
    per_block = steps * per_step + 150 + 40 * mt * nr + 0.6 * (mt * 16) * (nr * 16)
    blocks = _ceil(M, mr) * max(1, _ceil(N, 16) // nr)
    return per_block * _ceil(blocks, units)


def default_config(M: int, N: int, K: int) -> AmxConfig:
    """The cheapest block of :func:`block_cycles` (whole reduction per call); row blocks outer unless
    there are fewer than two per core; serial when the GEMM is one block or under
    ``cpu_vnni.SERIAL_CYCLES``."""
    nb = _ceil(N, 16)
    best = None
    for mt, nt in X.SHAPES:
        if nb % nt or (mt > 1 and M <= 16 * (mt - 1)):
            continue
        c = block_cycles(M, N, K, 16 * mt, nt)
        if best is None or c < best[0]:
            best = (c, mt, nt)
    _, mt, nt = best
    blocks = _ceil(M, 16 * mt) * (nb // nt)
    # row blocks outer (each copies its operand rows right before its column blocks, in cache) unless
    # there are too few row blocks to share between the cores: then the column blocks are the parallel
    # work (each core reads its half of the weights, which dominate at a few rows)
    few_rows = _ceil(M, 16 * mt) < 2 * DEFAULT_UNITS
    return AmxConfig(mr=16 * mt, nr=nt, kc=0, n_outer=few_rows,
                     parallel=blocks > 1 and block_cycles(M, N, K, 16 * mt, nt, units=1) >= V.SERIAL_CYCLES,
                     ng=default_ng(16 * mt, nt, nb // nt, K))


PANEL_BYTES = 8192  # the int32 C panel of one call: measured best at 8 KB (K = 64, 3136 x 256: -15%)
NG_MAX_K = 256      # above, a call's tdpbusd steps dwarf its tile configuration (and a 3x3 conv, K = 576,
                    # ran 1.3-2x slower with 2 column blocks per call)


def default_ng(mr: int, nr: int, col_blocks: int, K: int) -> int:
    """The most column blocks per call (a divisor of ``col_blocks``) whose C panel fits PANEL_BYTES, for
    a reduction of at most NG_MAX_K; else 1."""
    if K > NG_MAX_K:
        return 1
    return max(g for g in range(1, col_blocks + 1) if col_blocks % g == 0 and mr * 16 * nr * g * 4 <= PANEL_BYTES)


def config_points(M: int, N: int, K: int):
    """The tuning space: every tile shape that divides the columns, kc in {whole, 256, 512}, both loop
    orders, serial twins for small GEMMs."""
    nb = _ceil(N, 16)
    Kp = _ceil(K, KROUND) * KROUND
    kcs = [0] + [k for k in (256, 512) if k < Kp and Kp % k == 0]
    for mt, nt in X.SHAPES:
        if nb % nt or (mt > 1 and M <= 16 * (mt - 1)):
            continue
        for kc in kcs:
            ngs = [g for g in (1, 2, 4, 8) if (nb // nt) % g == 0] if kc == 0 else [1]
            for n_outer in (False, True):
                for par in (True, False):
                    for ng in ngs:
                        yield dict(mr=16 * mt, nr=nt, kc=kc, n_outer=n_outer, parallel=par, ng=ng)


# ---- weight packing ---------------------------------------------------------------------------
def pack_dense(w: np.ndarray, bias, a_signed: bool):
    """w int8 [K, N] -> (Wp int8 [ceil(N/16), Kp/4, 16, 4] with Kp = K rounded up to 64, bias_eff)."""
    V._check_weight(w, 2, "pack_dense")
    K, N = w.shape
    wk = np.zeros((_ceil(K, KROUND) * KROUND, N), np.int8)
    wk[:K] = w
    return V._pack_kn(wk, V.VNNI), V._bias_eff(w, bias, a_signed)


def pack_conv(w: np.ndarray, bias, a_signed: bool):
    """w int8 [OC, C, KH, KW] -> (Wp [ceil(OC/16), Kp/4, 16, 4], bias_eff) over the (KHp, KWp, Cp) grid of
    :func:`conv_layout`: k = (kh * KWp + kw) * Cp + c, zero rows past the kernel and the channels."""
    V._check_weight(w, 4, "pack_conv")
    OC, C, KH, KW = w.shape
    KHp, KWp, Cp = conv_layout(C, KH, KW)
    g = np.zeros((KHp, KWp, Cp, OC), np.int8)
    g[:KH, :KW, :C] = w.transpose(2, 3, 1, 0)
    wk = g.reshape(KHp * KWp * Cp, OC)
    return V._pack_kn(wk, V.VNNI), V._bias_eff(wk, bias, a_signed)


# ---- kernels ----------------------------------------------------------------------------------------
def _u8(x, offset: bool):
    """The uint8 operand: x + 128 for int8 (mod 256, i.e. the sign bit flipped, in byte lanes), x for uint8."""
    return (x.astype("uint8") ^ tirx.const(128, "uint8")) if offset else x.astype("uint8")


def _placeholders(N: int, Kp: int):
    Wp = te.placeholder((_ceil(N, 16), Kp // 4, 16, 4), "int8", name="Wp")
    return (Wp, te.placeholder((N,), "int32", name="bias"), te.placeholder((N,), "int64", name="mult"),
            te.placeholder((N,), "int64", name="shift"))


def _gemm(Ap, Wp, Mp: int, Np: int, Kp: int):
    k = te.reduce_axis((0, Kp), name="k")
    return te.compute((Mp, Np), lambda i, j: te.sum(
        Ap[i, k].astype("int32") * Wp[j // 16, k // 4, j % 16, k % 4].astype("int32"), axis=k), name="gemm")


def _schedule(sch: Schedule, cfg: AmxConfig, Kp: int, prep: str | None, prep_vec: int) -> tirx.PrimFunc:
    """Blocks "prep" (optional: its last loop vectorized by ``prep_vec``), "gemm" (i, j, k), "out"."""
    mt, nt = cfg.mr // 16, cfg.nr
    kc = cfg.kc if cfg.kc and Kp % cfg.kc == 0 else Kp
    gemm = sch.get_sblock("gemm")
    i, j, k = sch.get_loops(gemm)
    nblk = int(sch.get(j).extent) // (16 * nt)
    ng = cfg.ng if kc == Kp and nblk % cfg.ng == 0 else 1
    m0, m1 = sch.split(i, [None, cfg.mr])
    n0, n1 = sch.split(j, [None, 16 * nt * ng])
    k0, k1 = sch.split(k, [None, kc])
    outer = [n0, m0] if cfg.n_outer else [m0, n0]
    sch.reorder(*outer, k0, m1, n1, k1)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, outer[-1])
    m0_ext = sch.get(m0).extent
    sym = not isinstance(m0_ext, tirx.IntImm)
    per_row_block = prep is not None and not cfg.n_outer and (sym or int(m0_ext) > 1)
    if per_row_block:
        # the operand copy of one row block right before its column blocks: it stays in L1 / L2 (an
        # im2col of a 3x3 conv is 9x its input) instead of a whole-matrix pass through memory
        if cfg.parallel:
            sch.parallel(m0)
        sch.compute_at(sch.get_sblock(prep), m0)
    else:
        tile = sch.fuse(*outer)
        if cfg.parallel:
            sch.parallel(tile)
    rows_cols = sch.get_loops(out)[1:]
    # (a symbolic row count leaves the rows' predicate in a form reorder rejects: rows stay outside)
    if len(rows_cols) == 2 and int(sch.get(rows_cols[-1]).extent) % 16 == 0 and not sym:
        c0, c1 = sch.split(rows_cols[-1], [None, 16])
        sch.reorder(c0, rows_cols[0], c1)
        sch.vectorize(c1)
    elif rows_cols:
        V._vectorize_inner(sch, rows_cols[-1], 16)
    sch.set_scope(gemm, 0, "local")
    init = sch.decompose_reduction(gemm, k0)
    if kc == Kp:  # one call per block: it starts from tilezero, the init writes nothing
        sch.tensorize(sch.get_loops(init)[-2], X.register_zero(mt, nt, ng))
        sch.tensorize(m1, X.register(mt, nt, kc // 64, zero=True, ng=ng))
    else:
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(m1, X.register(mt, nt, kc // 64))
    if prep is not None:
        pl = sch.get_loops(sch.get_sblock(prep))
        if per_row_block:
            V._vectorize_inner(sch, pl[-1], prep_vec)
        else:
            par = sch.fuse(*pl[:-1]) if len(pl) > 1 else None
            if par is not None and cfg.parallel:
                sch.parallel(par)
            V._vectorize_inner(sch, pl[-1], prep_vec)
    return V._finish(sch)


def _with_permission(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The kernel asking Linux for the AMX tile state on entry (``_amx_intrin.request_permission_stmt``)."""
    return func.with_body(tirx.SeqStmt([X.request_permission_stmt(), func.body]))


def dense(M: int, N: int, K: int, a_dtype: str, out_dtype: str, lo: int, hi: int,
          config: AmxConfig | None = None, post: V.Post | None = None) -> tirx.PrimFunc:
    """Out[M, N] = requant(A[M, K] @ W + bias); args (A, Wp, bias_eff, mult, shift, [*extras, consts,] Out)
    with Wp from :func:`pack_dense`.

    A symbolic ``M`` (a TIR expression, qcompiler/symbolic.py) gives one kernel for every row count,
    bound from A's shape at the call (its own int32 variable): the row blocks of a copy padded to
    whole blocks, only the M valid rows stored; the config is the default at the representative size
    (``tune/workload.rows_bucket``) unless given."""
    V._check_io(a_dtype, out_dtype, lo, hi)
    V._check_k(K, "dense")
    sym = not isinstance(M, (int, np.integer))
    if sym:
        from qcompiler.tune.workload import rows_bucket

        cfg = config or default_config(rows_bucket(M), N, K)
        M = tirx.Var("M", "int32")
    else:
        M = int(M)
        cfg = config or default_config(M, N, K)
    nb = _ceil(N, 16)
    if nb % cfg.nr:
        raise ValueError(f"dense: nr={cfg.nr} does not divide ceil(N/16)={nb}")
    Kp, Np = _ceil(K, KROUND) * KROUND, nb * 16
    Mp = tirx.floordiv(M + (cfg.mr - 1), cfg.mr) * cfg.mr if sym else _ceil(M, cfg.mr) * cfg.mr
    A = te.placeholder((M, K), a_dtype, name="A")
    Wp, bias, mult, shift = _placeholders(N, Kp)
    offset = a_dtype == "int8"
    in_place = not sym and not offset and Kp == K and Mp == M
    if in_place:
        Ap = A
    else:
        # past K any byte will do (zero weights there): select first, convert the whole vector after
        Ap = te.compute((Mp, Kp), lambda i, k: _u8(tirx.if_then_else(
            k < K, A[tirx.min(i, M - 1), tirx.min(k, K - 1)], tirx.const(0, a_dtype)), offset), name="prep")
    C = _gemm(Ap, Wp, Mp, Np, Kp)
    extras, consts = V._post_args(post, (M, N))
    out = V._epilogue((M, N), C, bias, mult, shift, lo, hi, out_dtype, lambda i, j: (i, j), 0, post,
                      (extras, consts))
    func = te.create_prim_func([A, Wp, bias, mult, shift, *V._post_list(extras, consts), out])

    def schedule(c):
        return _schedule(Schedule(func), c, Kp, None if in_place else "prep", 64)

    if sym and cfg.parallel:
        # serial at the row counts whose GEMM costs under cpu_vnni.SERIAL_CYCLES (a parallel launch
        # costs more there), the same blocks either way (cpu_vnni._par_branch)
        rows = V._serial_rows(lambda m: block_cycles(m, N, K, cfg.mr, cfg.nr, units=1))
        if rows > 0:
            return _with_permission(V._par_branch(schedule, cfg, M <= rows)).with_attr("qc.rows_serial_max", rows)
    return _with_permission(schedule(cfg))


def conv2d_nhwc(N: int, H: int, W: int, C: int, OC: int, KH: int, KW: int, strides, pads, dilations,
                a_dtype: str, out_dtype: str, lo: int, hi: int, config: AmxConfig | None = None,
                post: V.Post | None = None) -> tirx.PrimFunc:
    """Out[N, OH, OW, OC] = requant(conv(X[N, H, W, C], W) + bias) as an implicit GEMM over an im2col
    copy; args (X, Wp, bias_eff, mult, shift, [*extras, consts,] Out), Wp from :func:`pack_conv`.

    The im2col row of an output pixel is the (KHp, KWp, Cp) grid of :func:`conv_layout`, kh / kw /
    channels past the kernel's being padding (zero weights).  Wide convs (Cp = C rounded up to 64)
    read the input directly, one bounds test per tap and 64 channels vectorized.  Narrow convs read a
    zero-padded copy of the input with Cp channels (``xpad``: every grid point in bounds), so a
    kernel row of the grid is KWp * Cp contiguous bytes, one vectorized copy."""
    V._check_io(a_dtype, out_dtype, lo, hi)
    if not all(isinstance(d, (int, np.integer)) for d in (N, H, W)):
        raise ValueError("the AMX conv kernel takes static dims")
    N, H, W = int(N), int(H), int(W)
    sh, sw, dh, dw, pt, pl, OH, OW, _, _ = V._conv_geometry(H, W, KH, KW, strides, pads, dilations)
    KHp, KWp, Cp = conv_layout(C, KH, KW)
    Kp = KHp * KWp * Cp
    V._check_k(Kp, "conv2d_nhwc")
    M = N * OH * OW
    cfg = config or default_config(M, OC, Kp)
    nb = _ceil(OC, 16)
    if nb % cfg.nr:
        raise ValueError(f"conv2d_nhwc: nr={cfg.nr} does not divide ceil(OC/16)={nb}")
    Mp, Np = _ceil(M, cfg.mr) * cfg.mr, nb * 16
    offset = a_dtype == "int8"
    Xt = te.placeholder((N, H, W, C), a_dtype, name="X")
    Wp, bias, mult, shift = _placeholders(OC, Kp)
    zero = tirx.const(0, a_dtype)

    def pixel(i):
        r = tirx.min(i, M - 1)
        return r // (OH * OW), (r // OW) % OH, r % OW

    if KHp == KH and KWp == KW:  # wide: taps of Cp = 64k channels, read in place
        def prep(i, k):
            n, oh, ow = pixel(i)
            t, c = k // Cp, k % Cp
            hh, ww = oh * sh + (t // KW) * dh - pt, ow * sw + (t % KW) * dw - pl
            inside = tirx.all(hh >= 0, hh < H, ww >= 0, ww < W, c < C)
            v = Xt[n, tirx.max(tirx.min(hh, H - 1), 0), tirx.max(tirx.min(ww, W - 1), 0), tirx.min(c, C - 1)]
            # select the raw value (padding: the real 0), then flip the sign bit of the whole vector
            return _u8(tirx.if_then_else(inside, v, zero), offset)

        stages = ["prep"]
    else:  # narrow: a padded copy whose every grid point is in bounds, then contiguous kernel rows
        Hx, Wx = (OH - 1) * sh + (KHp - 1) * dh + 1, (OW - 1) * sw + (KWp - 1) * dw + 1

        def pad(n, h, w, c):
            hh, ww = h - pt, w - pl
            inside = tirx.all(hh >= 0, hh < H, ww >= 0, ww < W, c < C)
            v = Xt[n, tirx.max(tirx.min(hh, H - 1), 0), tirx.max(tirx.min(ww, W - 1), 0), tirx.min(c, C - 1)]
            return _u8(tirx.if_then_else(inside, v, zero), offset)

        xpad = te.compute((N, Hx, Wx, Cp), pad, name="xpad")

        def prep(i, k):
            n, oh, ow = pixel(i)
            kh, kw, c = k // (KWp * Cp), k // Cp % KWp, k % Cp
            return xpad[n, oh * sh + kh * dh, ow * sw + kw * dw, c]

        stages = ["xpad", "prep"]
    Ap = te.compute((Mp, Kp), prep, name="prep")
    Cacc = _gemm(Ap, Wp, Mp, Np, Kp)
    extras, consts = V._post_args(post, (N, OH, OW, OC))
    out = V._epilogue((N, OH, OW, OC), Cacc, bias, mult, shift, lo, hi, out_dtype,
                      lambda n, oh, ow, j: ((n * OH + oh) * OW + ow, j), 0, post, (extras, consts))
    sch = Schedule(te.create_prim_func([Xt, Wp, bias, mult, shift, *V._post_list(extras, consts), out]))
    V._prepare_conv_epilogue(sch, OH, OW)
    if len(stages) == 1:
        # the copy iterates (row, tap, channel): one index computation per tap, channels vectorized
        sch.transform_block_layout(sch.get_sblock("prep"), lambda i, k: (i, k // Cp, k % Cp))
        return _with_permission(_schedule(sch, cfg, Kp, "prep", 64))
    # (row, kh, kw * channel): a kernel row of the grid is one contiguous run of the padded copy
    # (with dilation 1 along the width)
    sch.transform_block_layout(sch.get_sblock("prep"), lambda i, k: (i, k // (KWp * Cp), k % (KWp * Cp)))
    xl = sch.get_loops(sch.get_sblock("xpad"))
    par = sch.fuse(*xl[:2])
    if cfg.parallel:
        sch.parallel(par)
    V._vectorize_inner(sch, sch.fuse(*xl[2:]), 64)
    return _with_permission(_schedule(sch, cfg, Kp, "prep", KWp * Cp))


def conv_layout(C: int, KH: int, KW: int) -> tuple[int, int, int]:
    """(KHp, KWp, Cp): the im2col row of a conv is the grid kh < KHp, kw < KWp, c < Cp (k = (kh*KWp + kw)
    * Cp + c; past the kernel and the channels, padding with zero weights), its size a multiple of 64.

    Wide convs (C >= NARROW_CHANNELS): Cp = C rounded up to 64, the kernel's own KH x KW.  Narrow ones
    (an image's first layer: padding 3 channels to 64 per tap would be 21x the work): Cp = C rounded
    up to 4, KWp >= KW with KWp * Cp a multiple of 16 (a kernel row is whole 16-byte vectors), KHp >= KH
    the least that makes the size a multiple of 64, the KWp among the first few that gives the least
    size: 7x7x3 -> 8 x 8 x 4 = 256 (the real 147; 49 taps x 64 = 3136), 3x3x3 -> 4 x 4 x 4 = 64."""
    if C >= NARROW_CHANNELS or KH * KW == 1:   # (a 1x1 conv: the dense layout, pointwise_as_dense)
        return KH, KW, _ceil(C, KROUND) * KROUND
    Cp = _ceil(C, 4) * 4
    best = None
    for KWp in range(KW, KW + 17):
        if KWp * Cp % 16:
            continue
        KHp = next(h for h in range(KH, KH + 65) if h * KWp * Cp % KROUND == 0)
        if best is None or KHp * KWp < best[0] * best[1]:
            best = (KHp, KWp)
    return best[0], best[1], Cp
