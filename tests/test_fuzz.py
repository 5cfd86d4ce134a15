"""Fuzz the compiler as a new user would: mutated models and calibration data must give a clean
compile (model.so + model.json) or exactly one clean error line, exit code 2, no traceback and
nothing left behind.

The mutation generator lives here (not in the product package) and is shared with
``benchmarks/fuzz.py``, which runs thousands of the same mutations over real zoo models in
subprocesses.  Mutation ``i`` of a seed is deterministic: kind ``KINDS[i % len(KINDS)]``, its
details drawn from ``numpy.random.default_rng((seed, i))``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ---- base models ------------------------------------------------------------------------------


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "fuzz", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def tiny_cnn(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """conv 3x3 + relu + global pool + flatten + gemm (a small classifier), input N x 3 x 12 x 12."""
    r = np.random.default_rng(seed)
    t = numpy_helper.from_array
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
             helper.make_node("Gemm", ["f", "W2", "B2"], ["logits"], name="fc", transB=1)]
    inits = [t((r.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32), "W"),
             t((r.standard_normal(6) * 0.1).astype(np.float32), "B"),
             t(r.standard_normal((4, 6)).astype(np.float32), "W2"),
             t(np.zeros(4, np.float32), "B2")]
    m = _model(nodes, [_vi("x", ["N", 3, 12, 12])], [_vi("logits", ["N", 4])], inits)
    return m, {"x": r.standard_normal((4, 3, 12, 12)).astype(np.float32)}


def tiny_block(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """matmul + add + softmax + matmul (an attention-like block), input N x 5 x 8."""
    r = np.random.default_rng(seed + 1)
    t = numpy_helper.from_array
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="mm_q"),
             helper.make_node("Add", ["q", "bq"], ["qa"], name="add_q"),
             helper.make_node("Softmax", ["qa"], ["s"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["s", "Wo"], ["o"], name="mm_o"),
             helper.make_node("Add", ["o", "x"], ["y"], name="residual")]
    inits = [t((r.standard_normal((8, 8)) * 0.4).astype(np.float32), "Wq"),
             t((r.standard_normal(8) * 0.1).astype(np.float32), "bq"),
             t((r.standard_normal((8, 8)) * 0.4).astype(np.float32), "Wo")]
    m = _model(nodes, [_vi("x", ["N", 5, 8])], [_vi("y", ["N", 5, 8])], inits)
    return m, {"x": r.standard_normal((4, 5, 8)).astype(np.float32)}


BASES = {"tiny_cnn": tiny_cnn, "tiny_block": tiny_block}


# ---- mutations --------------------------------------------------------------------------------


@dataclass
class Case:
    """One fuzz input: the model file's bytes, the calibration (arrays, raw file bytes or none)."""
    name: str
    model: bytes
    calib: dict[str, np.ndarray] | bytes | None
    args: list[str] = field(default_factory=list)

    def write(self, d: Path) -> list[str]:
        """Write the inputs into ``d``; returns the ``qc compile`` arguments (output: d/out/model.so)."""
        (d / "out").mkdir(parents=True, exist_ok=True)
        (d / "model.onnx").write_bytes(self.model)
        argv = ["-q", "compile", str(d / "model.onnx"), "-o", str(d / "out" / "model.so")]
        if isinstance(self.calib, bytes):
            (d / "calib.npz").write_bytes(self.calib)
            argv += ["--calib", str(d / "calib.npz")]
        elif self.calib is not None:
            with open(d / "calib.npz", "wb") as f:
                np.savez(f, **self.calib)
            argv += ["--calib", str(d / "calib.npz")]
        return argv + self.args


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _ser(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


def _inputs(m):
    inits = {i.name for i in m.graph.initializer}
    return [vi for vi in m.graph.input if vi.name not in inits]


def _pick(r, seq):
    return seq[int(r.integers(len(seq)))]


def _weights(m) -> list[tuple[str, int]]:
    """Float weights: ("init", index of an initializer) or ("const", index of a Constant node)."""
    out = [("init", k) for k, i in enumerate(m.graph.initializer) if i.data_type == TensorProto.FLOAT and np.prod(i.dims) > 0]
    for k, n in enumerate(m.graph.node):
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" \
                and n.attribute[0].t.data_type == TensorProto.FLOAT and np.prod(n.attribute[0].t.dims) > 1:
            out.append(("const", k))
    return out


def _tensor(m, ref) -> onnx.TensorProto:
    kind, k = ref
    return m.graph.initializer[k] if kind == "init" else m.graph.node[k].attribute[0].t


def _wname(m, ref) -> str:
    kind, k = ref
    return m.graph.initializer[k].name if kind == "init" else (m.graph.node[k].output[0] + " (Constant)")


def _get(m, ref) -> np.ndarray:
    return numpy_helper.to_array(_tensor(m, ref))


def _set(m, ref, arr):
    t = _tensor(m, ref)
    t.CopyFrom(numpy_helper.from_array(np.asarray(arr), t.name))


def m_corrupt_bytes(m, calib, r):
    b = bytearray(_ser(m))
    k = int(r.integers(1, 17))
    for off in r.integers(0, len(b), k):
        b[int(off)] = int(r.integers(256))
    return f"corrupt {k} bytes", bytes(b), calib


def m_truncate(m, calib, r):
    b = _ser(m)
    n = int(r.integers(0, len(b)))
    return f"truncate to {n}/{len(b)} bytes", b[:n], calib


def m_wrong_attr(m, calib, r):
    m = _copy(m)
    nodes = [n for n in m.graph.node if n.attribute]
    if not nodes:
        return m_missing_attr(m, calib, r)
    n = _pick(r, nodes)
    a = _pick(r, list(n.attribute))
    choice = int(r.integers(6))
    if a.type == onnx.AttributeProto.INTS:
        vals = [[0] * len(a.ints), [-1] * len(a.ints), [99] * len(a.ints), [1 << 40] * len(a.ints),
                list(a.ints) + [1], list(a.ints)[:-1] or [7]][choice]
        del a.ints[:]
        a.ints.extend(vals)
    elif a.type == onnx.AttributeProto.INT:
        a.i = [-7, 0, 99, 1 << 40, -1, 2][choice]
    elif a.type == onnx.AttributeProto.FLOAT:
        a.f = [float("nan"), float("inf"), -1.0, 0.0, 1e30, -1e-30][choice]
    else:
        a.s = b"bogus"
    if choice == 5 and a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS):  # wrong attribute type
        name = a.name
        n.attribute.remove(a)
        n.attribute.append(helper.make_attribute(name, 1.5))
    return f"wrong attr {n.name}.{a.name} (choice {choice})", _ser(m), calib


def m_missing_attr(m, calib, r):
    m = _copy(m)
    n = _pick(r, list(m.graph.node))
    if n.attribute and r.random() < 0.7:
        a = _pick(r, list(n.attribute))
        n.attribute.remove(a)
        return f"missing attr {n.name}.{a.name}", _ser(m), calib
    n.attribute.append(helper.make_attribute("fuzz_unknown", 3))
    return f"unknown attr on {n.name}", _ser(m), calib


def m_dangling_input(m, calib, r):
    m = _copy(m)
    n = _pick(r, [n for n in m.graph.node if n.input])
    k = int(r.integers(len(n.input)))
    n.input[k] = "no_such_tensor"
    return f"dangling input {n.name}[{k}]", _ser(m), calib


def m_nan_weight(m, calib, r):
    m = _copy(m)
    ref = _pick(r, _weights(m))
    arr = _get(m, ref).copy()
    flat = arr.reshape(-1)
    for j in r.integers(0, flat.size, int(r.integers(1, 4))):
        flat[int(j)] = _pick(r, [np.nan, np.inf, -np.inf])
    _set(m, ref, arr)
    return f"non-finite weight {_wname(m, ref)}", _ser(m), calib


def m_weight_values(m, calib, r):
    """Finite but hostile weight values: all zero, huge, tiny, denormal, constant."""
    m = _copy(m)
    ref = _pick(r, _weights(m))
    arr = _get(m, ref)
    choice = int(r.integers(5))
    new = [np.zeros_like(arr), arr * np.float32(1e30), arr * np.float32(1e-30),
           np.full_like(arr, 1e-42), np.full_like(arr, 3.0)][choice]
    _set(m, ref, new.astype(np.float32))
    return f"weight values {_wname(m, ref)} (choice {choice})", _ser(m), calib


def m_weight_dtype(m, calib, r):
    m = _copy(m)
    ref = _pick(r, _weights(m))
    dt = _pick(r, [np.float64, np.float16, np.int64, np.int8, np.int32, np.bool_])
    _set(m, ref, _get(m, ref).astype(dt))
    return f"weight dtype {_wname(m, ref)} -> {np.dtype(dt).name}", _ser(m), calib


def m_weight_shape(m, calib, r):
    m = _copy(m)
    ref = _pick(r, _weights(m))
    arr = _get(m, ref)
    choice = int(r.integers(4))
    if choice == 0:
        new = arr.reshape(-1)[: max(arr.size - 1, 1)]
    elif choice == 1:
        new = arr.T.copy() if arr.ndim >= 2 else np.concatenate([arr, arr])
    elif choice == 2:
        new = arr[None]
    else:
        new = np.concatenate([arr.reshape(-1), arr.reshape(-1)]).reshape((2,) + arr.shape)[..., : max(arr.shape[-1] - 1, 1)] \
            if arr.ndim else arr
    _set(m, ref, np.ascontiguousarray(new).astype(np.float32))
    return f"weight shape {_wname(m, ref)} {arr.shape} -> {new.shape}", _ser(m), calib


def m_corrupt_init_data(m, calib, r):
    """An initializer's raw data shorter than its dims say."""
    m = _copy(m)
    ref = _pick(r, _weights(m))
    arr = _get(m, ref)
    t = _tensor(m, ref)
    t.ClearField("float_data")
    t.raw_data = arr.tobytes()[: max(arr.nbytes - 4 * int(r.integers(1, 4)), 0)]
    return f"short raw_data {_wname(m, ref)}", _ser(m), calib


def m_input_dtype(m, calib, r):
    m = _copy(m)
    vi = _pick(r, _inputs(m))
    et = _pick(r, [TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.STRING, TensorProto.INT32, TensorProto.BOOL,
                   TensorProto.UINT8, TensorProto.INT64])
    vi.type.tensor_type.elem_type = et
    return f"input dtype {vi.name} -> {TensorProto.DataType.Name(et)}", _ser(m), calib


def m_absurd_dims(m, calib, r):
    m = _copy(m)
    vi = _pick(r, _inputs(m))
    dims = vi.type.tensor_type.shape.dim
    choice = int(r.integers(4))
    if choice == 0:       # batch fixed to 100000 (calibration unchanged)
        ks, v = [0], 100000
    elif choice == 1:     # two dims 100000 x 100000
        ks, v = [len(dims) - 2, len(dims) - 1], 100000
    elif choice == 2:     # a dim far beyond anything
        ks, v = [len(dims) - 1], 1 << 40
    else:                 # every non-batch dim 100000, calibration regenerated? no: symbolic, from data
        ks, v = list(range(1, len(dims))), 100000
    for k in ks:
        dims[k].Clear()
        dims[k].dim_value = v
    return f"absurd dims {vi.name}{ks}={v}", _ser(m), calib


def m_big_calib_dims(m, calib, r):
    """Symbolic non-batch dims frozen from calibration data that is huge along them."""
    m = _copy(m)
    vi = _pick(r, _inputs(m))
    dims = vi.type.tensor_type.shape.dim
    k = len(dims) - 1
    dims[k].Clear()
    dims[k].dim_param = "L"
    a = calib[vi.name]
    n = int(r.choice([0, 1, 200000]))
    shape = list(a.shape)
    shape[0] = 1
    shape[k] = n
    new = dict(calib)
    new[vi.name] = np.zeros(shape, a.dtype)
    return f"calibration dim {vi.name}[{k}]={n}", _ser(m), new


def m_zero_dims(m, calib, r):
    m = _copy(m)
    vi = _pick(r, _inputs(m))
    dims = vi.type.tensor_type.shape.dim
    k = int(r.integers(len(dims)))
    dims[k].Clear()
    dims[k].dim_value = int(r.choice([0, -1]))
    return f"zero/negative dim {vi.name}[{k}]", _ser(m), calib


def m_no_outputs(m, calib, r):
    m = _copy(m)
    del m.graph.output[:]
    return "no outputs", _ser(m), calib


def m_dup_outputs(m, calib, r):
    m = _copy(m)
    m.graph.output.append(m.graph.output[0])
    return "duplicated output", _ser(m), calib


def m_output_not_produced(m, calib, r):
    m = _copy(m)
    m.graph.output[0].name = "ghost_output"
    return "output not produced", _ser(m), calib


def m_cycle(m, calib, r):
    m = _copy(m)
    nodes = list(m.graph.node)
    with_inputs = [k for k, n in enumerate(nodes[:-1]) if n.input]
    a = _pick(r, with_inputs)
    b = int(r.integers(a + 1, len(nodes)))
    nodes[a].input[0] = nodes[b].output[0]
    return f"cycle {nodes[a].name} <- {nodes[b].name}", _ser(m), calib


def m_unknown_op(m, calib, r):
    m = _copy(m)
    n = _pick(r, list(m.graph.node))
    choice = int(r.integers(3))
    if choice == 0:
        n.op_type = "FuzzOp"
    elif choice == 1:
        n.domain = "com.fuzz"
        m.opset_import.append(helper.make_opsetid("com.fuzz", 1))
    else:
        n.domain = "com.microsoft"   # a real custom domain onnxruntime knows
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return f"unknown op {n.name} (choice {choice})", _ser(m), calib


def m_reorder(m, calib, r):
    m = _copy(m)
    nodes = list(m.graph.node)
    r.shuffle(nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return "nodes shuffled", _ser(m), calib


def m_drop(m, calib, r):
    m = _copy(m)
    if r.random() < 0.5 and m.graph.initializer:
        init = _pick(r, list(m.graph.initializer))
        m.graph.initializer.remove(init)
        return f"dropped initializer {init.name}", _ser(m), calib
    n = _pick(r, list(m.graph.node))
    m.graph.node.remove(n)
    return f"dropped node {n.name}", _ser(m), calib


def m_opset(m, calib, r):
    m = _copy(m)
    v = int(r.choice([1, 7, 8, 22, 99]))
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = v
    return f"opset {v}", _ser(m), calib


def m_empty_names(m, calib, r):
    m = _copy(m)
    choice = int(r.integers(3))
    if choice == 0:
        for n in m.graph.node:
            n.name = ""
        return "all node names empty (valid)", _ser(m), calib
    if choice == 1:
        n = _pick(r, list(m.graph.node))
        n.output[0] = ""
        return f"empty output name {n.name}", _ser(m), calib
    for n in m.graph.node:
        n.name = "same"
    return "all node names equal", _ser(m), calib


def m_calib(m, calib, r):
    """Calibration data problems on an intact model."""
    name = next(iter(calib))
    a = calib[name]
    choice = int(r.integers(10))
    if choice == 0:
        return "calib empty (0 samples)", _ser(m), {name: a[:0]}
    if choice == 1:
        return "calib wrong key", _ser(m), {name + "_x": a}
    if choice == 2:
        return "calib wrong shape", _ser(m), {name: a[..., :-1]}
    if choice == 3:
        b = a.copy()
        b.reshape(-1)[int(r.integers(b.size))] = np.nan
        return "calib NaN", _ser(m), {name: b}
    if choice == 4:
        return "calib int dtype", _ser(m), {name: a.astype(np.int32)}
    if choice == 5:
        return "calib extra key", _ser(m), {name: a, "extra": a}
    if choice == 6:
        b = bytearray(_npz({name: a}))
        cut = int(r.integers(0, len(b)))
        return "calib truncated npz", _ser(m), bytes(b[:cut])
    if choice == 7:
        return "calib all zeros (valid)", _ser(m), {name: np.zeros_like(a)}
    if choice == 8:
        return "calib huge values", _ser(m), {name: (a * np.float32(1e37)).astype(np.float32)}
    return "calib no file", _ser(m), None


def m_valid(m, calib, r):
    """The unmutated model (with float64 calibration data, which is converted)."""
    return "unmutated", _ser(m), {k: v.astype(np.float64) if r.random() < 0.5 else v for k, v in calib.items()}


def _npz(arrays) -> bytes:
    f = io.BytesIO()
    np.savez(f, **arrays)
    return f.getvalue()


KINDS = [m_corrupt_bytes, m_truncate, m_wrong_attr, m_missing_attr, m_dangling_input, m_nan_weight, m_weight_values,
         m_weight_dtype, m_weight_shape, m_corrupt_init_data, m_input_dtype, m_absurd_dims, m_big_calib_dims,
         m_zero_dims, m_no_outputs, m_dup_outputs, m_output_not_produced, m_cycle, m_unknown_op, m_reorder, m_drop,
         m_opset, m_empty_names, m_calib, m_valid]


def mutation(base: str, model: onnx.ModelProto, calib: dict[str, np.ndarray], i: int, seed: int = 0) -> Case:
    """Mutation ``i`` (deterministic) of ``model`` + ``calib``."""
    kind = KINDS[i % len(KINDS)]
    r = np.random.default_rng((seed, i, zlib.crc32(base.encode())))
    name, data, cal = kind(model, calib, r)
    return Case(f"{base}#{i} {kind.__name__[2:]}: {name}", data, cal)


def mutations(n: int, bases=None, seed: int = 0):
    """``n`` cases cycling over ``bases`` ({name: (model, calib)}; default: the tiny models here)."""
    bases = bases or {k: f() for k, f in BASES.items()}
    names = sorted(bases)
    for i in range(n):
        b = names[i % len(names)]
        m, c = bases[b]
        yield mutation(b, m, c, i // len(names), seed)


# ---- judging an outcome -----------------------------------------------------------------------


# files other libraries keep in TMPDIR on purpose (not partial output): onnxruntime's session id
THIRD_PARTY_TMP = {".ses"}


def judge(rc, stdout: str, stderr: str, out_dir: Path, tmp_dir: Path | None = None) -> tuple[str, str]:
    """(outcome, detail): outcome is 'ok', 'error:<Class>' or a failure: 'crash', 'traceback',
    'not-one-line', 'leftovers', 'missing-output'."""
    files = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    left_tmp = sorted(p.name for p in tmp_dir.iterdir() if p.name not in THIRD_PARTY_TMP) \
        if tmp_dir is not None and tmp_dir.exists() else []
    if "Traceback" in stderr or "Traceback" in stdout:
        return "traceback", stderr[-2000:]
    if rc == 0:
        if files != ["model.json", "model.so"]:
            return "missing-output", f"files {files}"
        if left_tmp:
            return "leftovers", f"temp files {left_tmp}"
        return "ok", ""
    if rc != 2:
        return "crash", f"exit code {rc}: {stderr[-2000:]}"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    line = lines[0].split("] ", 1)[-1] if lines and lines[0].startswith("[") else (lines[0] if lines else "")
    if len(lines) != 1 or not line.startswith("qc compile: error: "):
        return "not-one-line", stderr[-2000:]
    if files or left_tmp:
        return "leftovers", f"output folder {files}, temp {left_tmp}"
    return "error:" + error_class(lines[0]), lines[0]


def error_class(line: str) -> str:
    """The QCError class of a one-line message, from the tag ``record_error_class`` leaves in it."""
    if line.startswith("[") and "] " in line:
        return line[1:line.index("] ")]
    return "InternalError" if "internal error in " in line else "QCError"


@contextlib.contextmanager
def record_error_class():
    """While active, the CLI's error line names the QCError class: "[ModelError] qc compile: error: ..."
    (only for counting outcomes; the product prints the line without it)."""
    from qcompiler import cli

    orig = cli._error_line

    def tagged(cmd, e):
        return f"[{type(e).__name__}] " + orig(cmd, e)

    cli._error_line = tagged
    try:
        yield
    finally:
        cli._error_line = orig


def run_in_process(case: Case, d: Path) -> tuple[str, str]:
    """Run ``case`` through ``qcompiler.cli.main`` here; (outcome, detail)."""
    from qcompiler.cli import main

    argv = case.write(d)
    tmp = d / "tmp"
    tmp.mkdir(exist_ok=True)
    old_tmp = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), record_error_class():
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
                import traceback

                traceback.print_exc(file=err)
                rc = 1
                if isinstance(e, KeyboardInterrupt):
                    raise
    finally:
        tempfile.tempdir = old_tmp
    return judge(rc, out.getvalue(), err.getvalue(), d / "out", tmp)


# ---- the test ---------------------------------------------------------------------------------

# kinds that must always be refused as a ModelError whose line says this
EXPECT_MODEL_ERROR = {"nan_weight": "non-finite", "no_outputs": "no outputs", "dup_outputs": "declared once",
                      "cycle": "topologically sorted", "output_not_produced": "ghost_output"}
N_CASES = 60  # two bases x 30: every kind on both, some twice


def test_fuzz_mutations(tmp_path, monkeypatch):
    # the same verdicts on every machine: a fixed memory budget for the size checks
    monkeypatch.setenv("QC_MEMORY_LIMIT", "1G")
    cases = list(mutations(N_CASES, seed=0))
    kinds = {c.name.split(" ", 2)[1] for c in cases}
    assert len(cases) >= 50 and len(kinds) == len(KINDS)
    results = []
    for k, case in enumerate(cases):
        d = tmp_path / f"c{k}"
        outcome, detail = run_in_process(case, d)
        results.append((case.name, outcome, detail))
    bad = [r for r in results if not (r[1] == "ok" or r[1].startswith("error:"))]
    assert not bad, "\n".join(f"{n}: {o}: {d}" for n, o, d in bad)
    # on these small models every failure is the user's input, named as such (no compiler bug)
    internal = [r for r in results if r[1] == "error:InternalError"]
    assert not internal, "\n".join(f"{n}: {d}" for n, o, d in internal)
    for name, outcome, detail in results:
        kind = name.split(" ", 2)[1].rstrip(":")
        if kind in EXPECT_MODEL_ERROR:
            assert outcome == "error:ModelError" and EXPECT_MODEL_ERROR[kind] in detail, (name, outcome, detail)
    oks = sum(r[1] == "ok" for r in results)
    assert oks >= 4, "the unmutated and valid-mutation cases must compile"
    assert sum(r[1].startswith("error:") for r in results) >= 35
    print("\n".join(f"{o:24s} {n}  {d[:160]}" for n, o, d in results))


def test_fuzz_subprocess_one_line(tmp_path):
    """A few cases through the console entry point in a fresh process: stderr at the file-descriptor
    level (C++ logs included) is one line and no temp file is left behind."""
    import subprocess
    import sys

    picks = {}
    for c in mutations(2 * len(KINDS), seed=1):
        kind = c.name.split(" ", 2)[1].rstrip(":")
        if kind in ("no_outputs", "nan_weight", "weight_dtype", "absurd_dims"):
            picks.setdefault(kind, c)
    picks = list(picks.values())
    assert len(picks) == 4
    for k, case in enumerate(picks):
        d = tmp_path / f"s{k}"
        argv = case.write(d)
        tmp = d / "tmp"
        tmp.mkdir()
        env = {**os.environ, "TMPDIR": str(tmp), "QC_MEMORY_LIMIT": "1G"}
        r = subprocess.run([sys.executable, "-m", "qcompiler.cli", *argv], capture_output=True, text=True,
                           timeout=300, env=env)
        outcome, detail = judge(r.returncode, r.stdout, r.stderr, d / "out", tmp)
        assert outcome == "ok" or (outcome.startswith("error:") and outcome != "error:InternalError"), \
            (case.name, outcome, detail)


def test_internal_error_is_one_line_naming_node(tmp_path, capsys, monkeypatch):
    """An unexpected exception inside a pass becomes one InternalError line naming pass, node and op."""
    import passes.fuse_activation as fa
    from qcompiler.cli import main

    def boom(g):
        for n in g.nodes:
            if n.op == "Conv":
                raise ValueError("synthetic failure\nsecond line")
        return g

    monkeypatch.setattr(fa, "fuse_activation", boom)
    m, calib = tiny_cnn()
    case = Case("boom", _ser(m), calib)
    argv = case.write(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["qc compile: error: internal error in fuse_activation at node conv (Conv): ValueError: "
                     "synthetic failure; please report"], err
    assert not any((tmp_path / "out").iterdir())


def test_at_node_tags_the_exception():
    from qcompiler import errors

    with errors.at_node(("outer", "Add")):
        assert errors.current_node() == ("outer", "Add")
    assert errors.current_node() is None
    try:
        with errors.stage("demo"):
            with errors.at_node(("n7", "Mul")):
                raise KeyError("k")
    except errors.InternalError as e:
        assert str(e) == "internal error in demo at node n7 (Mul): KeyError: 'k'; please report"
    try:
        with errors.stage("demo2"):
            raise RuntimeError("")
    except errors.InternalError as e:
        assert str(e) == "internal error in demo2 at node ?: RuntimeError: (no message); please report"
    try:
        with errors.stage("mem"):
            raise MemoryError()
    except errors.ResourceError as e:
        assert "out of memory in mem" in str(e)
