"""Issue 17: LSTM / GRU / RNN over a symbolic time axis, one library for every sequence length.

The frontend writes each direction as an ONNX Scan whose body is one step
(``passes/unroll_recurrent.py`` loop mode); the quantizer turns it into one integer ``loop`` with
the body quantized once (``qcompiler/intops/recurrent.py``); the lowering runs the body's Relax
function once per step (``qcompiler/lowering/relax_loop.py``).  At every length tried -- 1, a prime,
the range's end -- the library equals the NumPy reference of the integer graph at that length bit
for bit, and reads close to onnxruntime's float model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import qcompiler
from qcompiler.cli import main
from qcompiler.errors import InputError
from tests.helpers import cosine, make_model, tensor
from tests.test_symbolic_shapes import against_reference

MAX_T = 40


def _model(op, direction="forward", init=False, layout=0, lbr=0, N=1, I=5, H=4, stacked=False, seed=0):
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]

    def weights(k, inp):
        return [tensor(f"W{k}", (rng.standard_normal((dirs, G * H, inp)) * 0.5).astype(np.float32)),
                tensor(f"R{k}", (rng.standard_normal((dirs, G * H, H)) * 0.5).astype(np.float32)),
                tensor(f"B{k}", (rng.standard_normal((dirs, 2 * G * H)) * 0.3).astype(np.float32))]

    attrs = dict(hidden_size=H, direction=direction, **({"layout": 1} if layout else {}),
                 **({"linear_before_reset": lbr} if op == "GRU" else {}))
    xshape = [N, "T", I] if layout else ["T", N, I]
    ins = [("x", xshape)]
    node_in = ["x", "W0", "R0", "B0", ""]
    if init:
        ins.append(("h0", [N, dirs, H] if layout else [dirs, N, H]))
        node_in.append("h0")
    nodes = [helper.make_node(op, node_in, ["y", "yh"], **attrs)]
    inits = weights(0, I)
    out = "y"
    if stacked:  # a second layer reading the first one's output ([T, dirs, N, H] -> [T, N, dirs * H])
        nodes += [helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["yt", "shp"], ["y1"]),
                  helper.make_node(op, ["y1", "W1", "R1", "B1"], ["y2"], **{k: v for k, v in attrs.items() if k != "layout"})]
        inits += weights(1, dirs * H) + [tensor("shp", np.array([0, N, dirs * H], np.int64))]
        out = "y2"
    nodes.append(helper.make_node("Relu", [out], ["out"]))
    return make_model(nodes, ins, [("out", None), ("yh", None)], inits, opset=14)


def _feeds(m, T, rng, n=1):
    out = {}
    for vi in m.graph.input:
        shape = [T if d.dim_param == "T" else d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal([n * shape[0]] + shape[1:]).astype(np.float32)
    return out


CASES = {
    "lstm": dict(op="LSTM"),
    "lstm-bi-init": dict(op="LSTM", direction="bidirectional", init=True),
    "gru-lbr-reverse": dict(op="GRU", lbr=1, direction="reverse"),
    "gru-batch2": dict(op="GRU", N=2),
    "rnn-stacked": dict(op="RNN", stacked=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_symbolic_time_bit_exact_at_every_length(tmp_path, case):
    m = _model(**CASES[case])
    onnx.save(m, tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = _feeds(m, 8, rng, n=4)
    np.savez(tmp_path / "c.npz", **calib)
    spec = f"x=1..{MAX_T}x{CASES[case].get('N', 1)}x5"
    out = tmp_path / "m.so"
    assert main(["-q", "compile", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "c.npz"),
                 "--shape", spec]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["symbolic_dims"]["T"]["max"] == MAX_T and not meta.get("fixed_dims") and meta["integer_only"]
    # every direction runs as one kernel (qcompiler/lowering/loop_kernel.py), not as VM recursion
    loops = meta["kernels"]["loops"]
    assert loops["kernel"] and not loops["recursion"], loops
    lib = qcompiler.load(str(out))
    feeds = [_feeds(m, T, rng) for T in (1, 2, 7, 23, MAX_T)]   # length 1, a prime, the range's end
    against_reference(tmp_path / "m.onnx", calib, lib, feeds, [spec])
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    f = _feeds(m, 8, rng)
    for want, got in zip(sess.run(None, f), (lib(f)["out"], lib(f)["yh"])):
        assert cosine(want, got) > 0.97, case


def test_default_dims_keep_a_recurrences_time_symbolic(tmp_path):
    """Without --shape: the declared-symbolic time axis stays symbolic (1..AUTO_MAX)."""
    from qcompiler.shape_spec import AUTO_MAX

    m = _model("LSTM")
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **_feeds(m, 6, np.random.default_rng(2), n=2))
    out = tmp_path / "m.so"
    assert main(["-q", "compile", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "c.npz")]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["symbolic_dims"]["T"]["max"] == AUTO_MAX
    assert qcompiler.load(str(out))(x=np.zeros((AUTO_MAX, 1, 5), np.float32))["out"].shape == (AUTO_MAX, 1, 1, 4)


def test_loop_kernel_equals_the_vm_recursion(tmp_path, monkeypatch):
    """The steps folded into one kernel per direction (qcompiler/lowering/loop_kernel.py) compute
    what the Relax recursion over the steps computes (qcompiler/lowering/relax_loop.py; the path a
    step that does not fold keeps; QC_LOOP_KERNEL=0 forces it), bit for bit at every length."""
    m = _model(**CASES["lstm-bi-init"])
    onnx.save(m, tmp_path / "m.onnx")
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "c.npz", **_feeds(m, 8, rng, n=4))
    libs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("QC_LOOP_KERNEL", flag)
        out = tmp_path / f"m{flag}.so"
        assert main(["-q", "compile", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "c.npz"),
                     "--shape", f"x=1..{MAX_T}x1x5"]) == 0
        loops = json.loads(out.with_suffix(".json").read_text())["kernels"]["loops"]
        assert bool(loops["kernel"]) == (flag == "1") and bool(loops["recursion"]) == (flag == "0"), loops
        libs[flag] = qcompiler.load(str(out))
    for T in (1, 2, 31, MAX_T):
        f = _feeds(m, T, rng)
        a, b = libs["1"](f), libs["0"](f)
        assert all(np.array_equal(a[k], b[k]) for k in a), T


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_final_cell_state_of_a_loop(tmp_path, direction):
    """A model that reads Y_c (the cell state after the last step) keeps its time axis symbolic: the
    loop's step output carries the cell state's codes beside h_t and Y_c is the last step's slice
    (qcompiler/intops/recurrent.py); bit-exact to the reference at every length, close to float."""
    rng = np.random.default_rng(3)
    dirs = 2 if direction == "bidirectional" else 1
    w = (rng.standard_normal((dirs, 16, 5)) * 0.5).astype(np.float32)
    r = (rng.standard_normal((dirs, 16, 4)) * 0.5).astype(np.float32)
    m = make_model([helper.make_node("LSTM", ["x", "W", "R"], ["y", "", "yc"], hidden_size=4, direction=direction),
                    helper.make_node("Relu", ["y"], ["out"])],
                   [("x", ["T", 1, 5])], [("out", None), ("yc", None)], [tensor("W", w), tensor("R", r)])
    onnx.save(m, tmp_path / "m.onnx")
    calib = {"x": rng.standard_normal((6, 1, 5)).astype(np.float32)}
    np.savez(tmp_path / "c.npz", **calib)
    out = tmp_path / "m.so"
    assert main(["-q", "compile", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "c.npz")]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert "T" in meta["symbolic_dims"] and "T" not in meta.get("fixed_dims", {})
    lib = qcompiler.load(str(out))
    feeds = [{"x": rng.standard_normal((t, 1, 5)).astype(np.float32)} for t in (1, 6, 13, MAX_T)]
    against_reference(tmp_path / "m.onnx", calib, lib, feeds)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for f in feeds:
        want = sess.run(["yc"], f)[0]
        assert lib(f)["yc"].shape == want.shape == (dirs, 1, 4)
    want = sess.run(["yc"], calib)[0]  # (the two directions' states join in Y_c's range, calibrated at T = 6)
    assert cosine(lib(calib)["yc"], want) > 0.98


def _crnn(rows=8, I=6, H=4, seed=0):
    """A CRNN in miniature: a conv striding over the width of an 8-row line image, the rows folded
    away, a bidirectional LSTM over the width / stride columns (an OCR recogniser's shape)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[8, 3], strides=[8, 2], pads=[0, 1, 0, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Squeeze", ["r", "ax2"], ["s"]),
             helper.make_node("Transpose", ["s"], ["t"], perm=[2, 0, 1]),
             helper.make_node("LSTM", ["t", "W", "R", "B"], ["y", "yh"], hidden_size=H, direction="bidirectional"),
             helper.make_node("Relu", ["y"], ["out"])]
    inits = [tensor("cw", (rng.standard_normal((I, 1, 8, 3)) * 0.3).astype(np.float32)),
             tensor("cb", np.zeros(I, np.float32)), tensor("ax2", np.array([2], np.int64)),
             tensor("W", (rng.standard_normal((2, 4 * H, I)) * 0.5).astype(np.float32)),
             tensor("R", (rng.standard_normal((2, 4 * H, H)) * 0.5).astype(np.float32)),
             tensor("B", (rng.standard_normal((2, 8 * H)) * 0.3).astype(np.float32))]
    return make_model(nodes, [("x", [1, 1, rows, "W"])], [("out", None)], inits, opset=14)


@pytest.mark.parametrize("shape", [None, "x=1x1x8x4..64:4"])
def test_crnn_width_on_the_stride_lattice(tmp_path, shape):
    """A recogniser's width through a strided conv into a recurrence over the columns: by default the
    width stays symbolic on the lattice of the conv's stride (found, not asked for), with --shape
    on the lattice asked for; the step variable reaches the loop and its kernels as a plain variable
    (FuseTIR requires one), and every width on the lattice is bit-exact to the reference; a width
    off the lattice is refused in one line.  The line's height, declared symbolic by default, is
    folded away by the model (8 rows to 1): it stays at its calibration size, with the reason."""
    m = _crnn("H" if shape is None else 8)
    onnx.save(m, tmp_path / "m.onnx")
    rng = np.random.default_rng(4)
    calib = {"x": rng.standard_normal((4, 1, 8, 32)).astype(np.float32)}
    np.savez(tmp_path / "c.npz", **calib)
    out = tmp_path / "m.so"
    args = ["-q", "compile", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "c.npz")]
    assert main(args + (["--shape", shape] if shape else [])) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    step, hi = (2, 2048) if shape is None else (4, 64)
    assert meta["symbolic_dims"]["W"]["step"] == step and meta["symbolic_dims"]["W"]["max"] == hi
    assert meta["integer_only"] and list(meta.get("fixed_dims") or {}) == (["H"] if shape is None else [])
    lib = qcompiler.load(str(out))
    widths = (step, 7 * step, 11 * step, 32, hi)        # length 1 (in steps), primes, the calibrated, the end
    against_reference(tmp_path / "m.onnx", calib, lib,
                      [{"x": rng.standard_normal((1, 1, 8, w)).astype(np.float32)} for w in widths],
                      [shape] if shape else [])
    with pytest.raises(InputError, match=f"multiple of {step}"):
        lib(x=np.zeros((1, 1, 8, 33), np.float32))
