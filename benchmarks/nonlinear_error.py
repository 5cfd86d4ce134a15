"""Accuracy of the integer nonlinearities against float64, over their input ranges.

For each function the bit-exact integer reference op (qcompiler/intops/, i.e. what
the TVM library computes) is run on a dense sweep of its integer input domain at a realistic input
scale, twice:
  * "int8 out": the output requantized to int8 at the scale calibration would give (max|f|/127),
    i.e. what the compiled model sees (includes the output rounding, <= 0.5 LSB);
  * "approx": the output kept at a fine scale (int32, max|f|/2^24), i.e. the error of the integer
    approximation itself.
Errors are against the float function of the *dequantized* input (input rounding is not counted).
"% of range" = max |err| / max|f|; "max rel" = max |err| / |f| over the points with |f| >= 1% of
max|f| (near the zeros of f a relative error means nothing; for the exp on [-15, 0]: t >= -4.6).
The overflow column is the largest int64 intermediate the compile-time bound allows.

    .venv/bin/python benchmarks/nonlinear_error.py      (about 20 s)
writes benchmarks/results/nonlinear_error.json and docs/nonlinear_errors.md.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompiler.intops.nonlinear import GeluOp, LayerNormOp, gelu_constants, layernorm_constants  # noqa: E402
from qcompiler.intops.softmax import SoftmaxOp, softmax_constants  # noqa: E402

RNG = np.random.default_rng(0)
ERF = np.vectorize(math.erf, otypes=[np.float64])


def gelu_f(x):
    return 0.5 * x * (1 + ERF(x / math.sqrt(2)))


def _errors(y, f):
    """(max |err|, max |err| / max|f|, max |err|/|f| over |f| >= 1% of max|f|)."""
    err = np.abs(y - f)
    rng = np.abs(f).max()
    big = np.abs(f) >= 0.01 * rng
    return float(err.max()), float(err.max() / rng), float((err[big] / np.abs(f[big])).max())


def _entry(y, f, sy=None):
    ea, eg, er = _errors(y, f)
    return {"max_abs": ea, "max_abs_lsb": None if sy is None else ea / sy, "of_range": eg, "max_rel": er}


def _log2(v: float) -> str:
    return f"2^{math.log2(max(v, 1)):.1f}"


# ---- GELU -----------------------------------------------------------------------------------------
def gelu_rows():
    rows = []
    for dt, amax in (("int8", 8.0), ("int16", 8.0)):
        lo, hi = (-128, 127) if dt == "int8" else (-32768, 32767)
        s = amax / hi
        q = np.arange(lo, hi + 1, dtype=np.int64)
        x = q * s
        f = gelu_f(x)
        for variant, name in (("igelu", "i-GELU (I-BERT)"), ("shift", "ShiftGELU (I-ViT)"), ("lut", "GELU table")):
            if variant == "lut" and dt != "int8":
                continue
            row = {"function": name, "input": f"{dt}, x in [{-amax:g}, {amax:g}], S={s:.3g}", "points": int(q.size)}
            for mode, sy, olo, ohi, odt in (("int8 out", np.abs(f).max() / 127, -128, 127, "int8"),
                                             ("approx", np.abs(f).max() / 2**24, -(2**31), 2**31 - 1, "int32")):
                if variant == "lut":
                    y = np.clip(np.round(f / sy), olo, ohi) * sy
                    bound = "-"
                else:
                    a = gelu_constants(s, dt, variant, sy, olo, ohi, odt)
                    y = GeluOp.reference(q.astype(dt), a).astype(np.float64) * sy
                    bound = _log2(a["pmax"] * abs(a["mult"]) + 2.0 ** (a["shift"] - 1))
                row[mode] = _entry(y, f, sy if mode == "int8 out" else None)
                if mode == "int8 out":
                    row["out_scale"] = sy
                    row["overflow_bound"] = bound + (" < 2^63" if bound != "-" else "")
            rows.append(row)
    return rows


# ---- LayerNorm ------------------------------------------------------------------------------------------
def ln_rows():
    rows = []
    C = 768
    gam = RNG.standard_normal(C) * 0.2 + 1
    bet = RNG.standard_normal(C) * 0.1
    for dt, amax in (("int8", 8.0), ("int16", 16.0)):
        lo, hi = (-128, 127) if dt == "int8" else (-32768, 32767)
        s = amax / hi
        # rows at every spread from one LSB to the full range, shifted means, outliers, constant rows
        n = 512
        sig = np.exp(np.linspace(np.log(s), np.log(amax / 3), n))
        x = RNG.standard_normal((n, C)) * sig[:, None] + RNG.uniform(-0.3, 0.3, (n, 1)) * amax
        x[::17, :4] = amax                                         # outlier channels
        x[5] = 0.5
        x[6] = -amax
        q = np.clip(np.round(x / s), lo, hi).astype(dt)
        xf = q.astype(np.float64) * s
        d = xf - xf.mean(-1, keepdims=True)
        f = d / np.sqrt((d * d).mean(-1, keepdims=True) + 1e-5) * gam + bet
        row = {"function": "I-LayerNorm", "input": f"{dt}, C={C}, x in [{-amax:g}, {amax:g}], S={s:.3g}",
               "points": int(q.size)}
        for mode, sy, olo, ohi, odt in (("int8 out", np.abs(f).max() / 127, -128, 127, "int8"),
                                         ("approx", np.abs(f).max() / 2**24, -(2**31), 2**31 - 1, "int32")):
            a = layernorm_constants(s, dt, C, 1e-5, gam, bet, sy, olo, ohi, odt)
            y = LayerNormOp.reference(q, a).astype(np.float64) * sy
            row[mode] = _entry(y, f, sy if mode == "int8 out" else None)
            if mode == "int8 out":
                row["out_scale"] = sy
                fb = ((2.0 ** a["F"] + 1) * np.abs(a["mult"]).max() + np.abs(a["bias"]).max()
                      + 2.0 ** (a["shift"].max() - 1))
                row["overflow_bound"] = (f"V <= {_log2(a['vmax'])} < 2^62, abs(y*k) <= 2^{a['R']}, "
                                         f"requant {_log2(fb)} < 2^63; Newton steps {a['steps']}")
        rows.append(row)
    return rows


# ---- softmax ----------------------------------------------------------------------------------------------
def _exp_int(d, c):
    """The exp step of SoftmaxOp.reference (same lines), d = (x - max) << u <= 0."""
    if c["variant"] == "iexp":
        z = (-d) // c["q_ln2"]
        p = d + z * c["q_ln2"]
        return ((p + c["q_b"]) * (p + c["q_b"]) + c["q_c"]) >> np.minimum(z, 31)
    v = d + (d >> 1) - (d >> 4)
    z = (-v) // c["q_1"]
    r = v + z * c["q_1"]
    return ((r >> 1) + c["q_1"]) << (c["N"] - np.minimum(z, c["N"]))


def softmax_rows():
    rows = []
    s = 16.0 / 127                        # int8 logits in [-16, 16]
    for variant, name in (("iexp", "softmax, i-exp (I-BERT)"), ("shift", "softmax, Shiftmax (I-ViT)")):
        c = softmax_constants(s, variant)
        # exp over [-15, 0] on the refined grid
        sp = s / 2**c["u"]
        d = -np.arange(0, int(15 / sp) + 1, dtype=np.int64)
        e = _exp_int(d, c).astype(np.float64)
        approx = e / e[0]
        t = d * sp
        # end to end on rows of 128 int8 logits
        q = np.clip(np.round(RNG.standard_normal((2000, 128)) * RNG.uniform(0.5, 6, (2000, 1)) / s), -128, 127)
        q = q.astype(np.int8)
        xf = q.astype(np.float64) * s
        ef = np.exp(xf - xf.max(-1, keepdims=True))
        f = ef / ef.sum(-1, keepdims=True)
        a = dict(c, axis=1, ob=8, lo=0, hi=255, dtype="uint8")
        y = SoftmaxOp.reference(q, a).astype(np.float64) / 2**8
        row = {"function": name, "input": f"rows of 128 int8 logits, S={s:.3g}; approx: exp on [-15, 0]",
               "points": int(q.size), "out_scale": 2.0**-8,
               "int8 out": _entry(y, f, 2.0**-8), "approx": _entry(approx, np.exp(t)),
               "overflow_bound": f"e < 2^30, e*k <= 2^{c['R'] + 1} < 2^63"}
        rows.append(row)
    return rows


# ---- tables of inputs that span decades (qcompiler/intops/elementwise.py WIDE_TABLES) -----------------
def wide_table_rows():
    """Log / Sqrt of a power-like input spanning 4 decades (x = 100 * 10^u, u in [-4, 0]), through the
    ``lut`` op with an 8-bit input (256 entries) and a 16-bit one (65536 entries), output int16 at
    max|f|/32767.  Here the error is against f of the *float* input: the input resolution is the point."""
    from qcompiler.intops.elementwise import LutOp

    x = 100.0 * np.logspace(-4, 0, 40001)
    rows = []
    for name, f in (("Log", np.log), ("Sqrt", np.sqrt)):
        fx = f(x)
        sy = np.abs(fx).max() / 32767
        for bits in (8, 16):
            qmax = 2 ** (bits - 1) - 1
            sx = x.max() / qmax
            codes = np.arange(-qmax - 1, qmax + 1)
            with np.errstate(all="ignore"):
                fc = f(np.maximum(codes * sx, 0))
            fc = np.where(np.isfinite(fc), fc, -1e30)
            table = np.clip(np.round(fc / sy), -32768, 32767).astype(np.int16)
            q = np.clip(np.round(x / sx), -qmax - 1, qmax).astype(np.int64)
            y = LutOp.reference(q.astype("int8" if bits == 8 else "int16"),
                                {"table": table, "offset": qmax + 1, "dtype": "int16"}).astype(np.float64) * sy
            err = np.abs(y - fx)
            dec = {k: float(err[(x >= 100 * 10.0 ** -k) & (x < 100 * 10.0 ** (1 - k))].max()) for k in (1, 2, 3, 4)}
            rows.append({"function": name, "input": f"int{bits}, x in [0.01, 100]", "entries": 2 ** bits,
                         "decades": dec})
    return rows


def main() -> int:
    rows = gelu_rows() + ln_rows() + softmax_rows()
    wide = wide_table_rows()
    wlines = ["| function | input | table entries | max abs err, x in [10, 100] | [1, 10] | [0.1, 1] | [0.01, 0.1] |",
              "|" + "---|" * 7]
    for r in wide:
        d = r["decades"]
        wlines.append(f"| {r['function']} | {r['input']} | {r['entries']} | {d[1]:.3g} | {d[2]:.3g} | {d[3]:.3g} | "
                      f"{d[4]:.3g} |")
    wtable = "\n".join(wlines)
    print(wtable)
    hdr = ("| function | input | points | out scale | int8 out: max abs err | LSB | % of range "
           "| approx: max abs err | % of range | max rel | overflow bound |")
    lines = [hdr, "|" + "---|" * 11]
    for r in rows:
        o, p = r["int8 out"], r["approx"]
        lines.append(f"| {r['function']} | {r['input']} | {r['points']} | {r['out_scale']:.3g} | {o['max_abs']:.3g} | "
                     f"{o['max_abs_lsb']:.2f} | {o['of_range'] * 100:.2f}% | {p['max_abs']:.3g} | "
                     f"{p['of_range'] * 100:.3f}% | {p['max_rel'] * 100:.3f}% | {r['overflow_bound']} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results" / "nonlinear_error.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "wide_tables": wide}, indent=1))
    doc = ROOT / "docs" / "nonlinear_errors.md"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(
        "# Integer nonlinearities: error against float64\n\n"
        "Generated by `benchmarks/nonlinear_error.py` (bit-exact reference ops = the compiled library).\n"
        "*int8 out*: output requantized to int8 at the calibrated scale (max|f|/127), as in a compiled model;\n"
        "*approx*: output at a fine int32 scale, the error of the integer approximation itself (for softmax: the\n"
        "exp on [-15, 0], relative to exp). Errors are against the float function of the dequantized input.\n"
        "% of range: max|err| / max|f|; max rel: |err|/|f| over points with |f| >= 1% of max|f| (exp: t >= -4.6).\n"
        "LSB: output quantization steps. Softmax int8 out: uint8 probabilities at scale 2^-8.\n\n"
        + table + "\n\n"
        "Notes: the *approx* error of i-GELU is that of I-BERT's second-order erf polynomial (absolute,\n"
        "largest for |x| around 1-3); ShiftGELU adds to x*sigmoid(1.702x) - GELU the error of the shift-only\n"
        "exp. Both stay within one int8 output step of GELU. For 8-bit inputs the 256-entry table\n"
        "(`--gelu lut`) is exact up to the output rounding. I-LayerNorm's approximation error is orders of\n"
        "magnitude below the int8 output step (exact integer mean and sqrt, 2^60 reciprocal), so its error\n"
        "is the output rounding alone. Softmax: the i-exp relative error matches I-BERT's 0.4%, Shiftmax's\n"
        "shift-only exp is ~17x worse.\n\n"
        "## Tables of inputs that span decades\n\n"
        "Log of a power-like input (a power spectrum) takes a 16-bit input through a 65536-entry table\n"
        "(`qcompiler/intops/elementwise.py` `WIDE_TABLES`; 128 KiB of int16), as does any table that makes a\n"
        "graph output; other tables take 8 bits (Sqrt shown for comparison). x = 100 * 10^u, u uniform in\n"
        "[-4, 0], the input at max|x|/qmax, the output int16 at max|f|/32767; the error is against f of the\n"
        "float input (input rounding included: that is the point), per decade of x. With 8 bits everything\n"
        "below 0.39 is code 0 (log: the table's floor).\n\n"
        + wtable + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
