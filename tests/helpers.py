"""Shared test helpers: tiny ONNX models and the three-way check every pass and kernel must pass.

check_pipeline(model, data):
  1. float passes: our float executor on the rewritten graph == onnxruntime on the file (allclose)
  2. quantization: integer reference vs onnxruntime float (cosine per output)
  3. lowering + build: TVM output == integer reference, element for element, same shape and dtype,
     on the test feed and on further calibration samples
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompiler import float_reference, reference
from qcompiler.driver import CompileOptions, float_passes, prepare
from qcompiler.targets import parse_target


def tensor(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def make_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    """inputs/outputs: [(name, shape, elem_type=FLOAT)]"""
    def vi(spec):
        name, shape, *t = spec
        return helper.make_tensor_value_info(name, t[0] if t else TensorProto.FLOAT, shape)

    g = helper.make_graph(nodes, "t", [vi(i) for i in inputs], [vi(o) for o in outputs], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for k, o in enumerate(m.graph.output):
        if not o.type.tensor_type.HasField("shape") and o.name in known:
            m.graph.output[k].CopyFrom(known[o.name])
    onnx.checker.check_model(m)
    return m


def save(model, d) -> str:
    p = str(Path(d) / "m.onnx")
    onnx.save(model, p)
    return p


def ort_run(path_or_model, feeds):
    import onnxruntime as ort

    src = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float(na == nb)
    return float(a @ b / na / nb)


def run_tvm(executable, ig, feeds):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    res = vm["main"](*[tvm.runtime.tensor(np.require(feeds[k], requirements="C")) for k in ig.inputs])  # keeps 0-d
    if len(ig.outputs) == 1:
        return {ig.outputs[0]: res.numpy()}
    return {o: r.numpy() for o, r in zip(ig.outputs, res)}


EXTRA_SAMPLES = 2  # calibration samples, besides ``test``, on which TVM must equal the reference


def _more_samples(calib: dict, test: dict, n: int) -> list[dict]:
    """Up to ``n`` further feeds of ``test``'s shapes taken from ``calib``: blocks 1, 2, ... of as many
    samples (first axis) as ``test`` has."""
    out = []
    for i in range(1, 1 + n):
        try:
            feed = {}
            for k, v in calib.items():
                v, b = np.asarray(v), max(1, len(np.asarray(test[k])) if np.ndim(test[k]) else 1)
                feed[k] = v[i * b:(i + 1) * b]
        except (IndexError, KeyError, TypeError):
            break
        if set(feed) != set(test) or any(feed[k].shape != np.asarray(test[k]).shape for k in feed):
            break
        out.append(feed)
    return out


def check_pipeline(model, calib: dict, test: dict | None = None, min_cos=0.99, target="cpu", build=True,
                   opts_kw=None, float_rtol=1e-4):
    """Three checks; returns (prepared, tvm outputs, reference outputs) of ``test``:
    1. the float passes keep the model: the float reference of the rewritten graph equals ONNX
       Runtime on ``test`` within ``float_rtol`` (relative, and absolute ``float_rtol`` x (1 + max|y|));
    2. the quantized NumPy reference is close to ONNX Runtime on ``test``: cosine >= ``min_cos`` per
       output (no max-error bound: quantization error is judged by the cosine alone);
    3. (``build``) the TVM library equals the integer reference bit for bit, same dtype and shape, on
       ``test`` (default: the first calibration sample) and on up to ``EXTRA_SAMPLES`` further
       calibration samples of the same shapes."""
    test = test or {k: v[:1] for k, v in calib.items()}
    with tempfile.TemporaryDirectory() as d:
        path = save(model, d)
        opts = CompileOptions(target=parse_target(target), **(opts_kw or {}))
        prep = prepare(path, calib, opts)
        ort_out = ort_run(path, test)
    names = [o.name for o in model.graph.output]
    # 1. float passes are exact
    fg = float_passes(prep.fr.graph)
    fo = float_reference.execute(fg, test)
    for name, r in zip(names, ort_out):
        np.testing.assert_allclose(fo[name], r, rtol=float_rtol, atol=float_rtol * (1 + np.abs(r).max()),
                                   err_msg=f"float passes changed output {name}")
    # 2. quantized reference is close to float
    ref = reference.execute(prep.int_graph, test)
    for name, r in zip(names, ort_out):
        c = cosine(ref[name], r)
        assert c >= min_cos, f"output {name}: cosine {c:.5f} < {min_cos}"
    tv = None
    if build:
        from qcompiler.lowering.build import build as tvm_build

        res = tvm_build(prep.int_graph, opts.target.tvm_target(), use_kernels=opts.use_kernels)
        tv = run_tvm(res.executable, prep.int_graph, test)
        assert_bit_exact(tv, ref, names)
        for k, feed in enumerate(_more_samples(calib, test, EXTRA_SAMPLES)):
            assert_bit_exact(run_tvm(res.executable, prep.int_graph, feed), reference.execute(prep.int_graph, feed),
                             names, f" (calibration sample {k + 1})")
    return prep, tv, ref


def assert_bit_exact(tv: dict, ref: dict, names, where: str = "") -> None:
    """TVM outputs equal to the reference's: same dtype, same shape (``!=`` alone would broadcast a
    (1, n) against an (n, 1)), every element."""
    for name in names:
        t, r = np.asarray(tv[name]), np.asarray(ref[name])
        assert t.dtype == r.dtype, (name, t.dtype, r.dtype)
        assert t.shape == r.shape, f"output {name}{where}: TVM shape {t.shape} != reference shape {r.shape}"
        bad = np.flatnonzero(t != r)
        assert bad.size == 0, (f"output {name}{where}: TVM differs from the integer reference at {bad.size} of "
                               f"{r.size} elements, e.g. {t.ravel()[bad[:3]]} vs {r.ravel()[bad[:3]]}")


def one_line_error(capsys, argv, *needles) -> str:
    """Run ``qc -q ARGV`` in-process: exit code 2, one line on stderr without a traceback, naming
    every needle (case-insensitive); returns the line."""
    from qcompiler.cli import main

    rc = main(["-q"] + list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n.lower() in err.lower(), err
    return err


def small_cnn(rng, in_shape, oc: int, n_out: int, pool: bool) -> onnx.ModelProto:
    """Conv 3x3 (+bias) -> Relu -> [GlobalAveragePool] -> Flatten -> Gemm: the small CNN the CLI,
    tuning and reliability tests compile.  ``pool``: global pooling before the head (head weights
    [oc, n_out], no bias); else the head takes every position (weights [oc*H*W, n_out], zero bias)."""
    C, H, W = in_shape[1:]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"])]
    inits = [tensor("W", (rng.standard_normal((oc, C, 3, 3)) * 0.3).astype(np.float32)),
             tensor("B", (rng.standard_normal(oc) * 0.1).astype(np.float32))]
    if pool:
        nodes += [helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
                  helper.make_node("Gemm", ["f", "W2"], ["y"])]
        inits.append(tensor("W2", rng.standard_normal((oc, n_out)).astype(np.float32)))
    else:
        nodes += [helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "W2", "B2"], ["y"])]
        inits += [tensor("W2", (rng.standard_normal((oc * H * W, n_out)) * 0.05).astype(np.float32)),
                  tensor("B2", np.zeros(n_out, np.float32))]
    return make_model(nodes, [("x", list(in_shape))], [("y", None)], inits)


def attention_and_mean_pool(q: str) -> list:
    """The nodes of one attention head group over projections ``q`` / ``k0`` / ``v0`` (reshaped by
    ``shp4``, back by ``shp3``), the additive mask ``madd`` on the scores, the residual ``x`` and a
    masked mean pooling by ``mask`` (``pm*``): outputs ``res`` and ``pooled``.  Constants the caller
    provides: shp4, shp3, sqrtd, ax1, axm1, eps (the transformer tests' encoders)."""
    return [
        helper.make_node("Reshape", [q, "shp4"], ["q2"]), helper.make_node("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k0", "shp4"], ["k2"]), helper.make_node("Transpose", ["k2"], ["kT"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v0", "shp4"], ["v2"]), helper.make_node("Transpose", ["v2"], ["v"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q", "kT"], ["s0"]), helper.make_node("Div", ["s0", "sqrtd"], ["s1"]),
        helper.make_node("Add", ["s1", "madd"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o0"]), helper.make_node("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o1", "shp3"], ["o"]),
        helper.make_node("Add", ["o", "x"], ["res"]),
        # masked mean pooling
        helper.make_node("Unsqueeze", ["mask", "axm1"], ["pm1"]),
        helper.make_node("Expand", ["pm1", "shp3"], ["pm2"]),
        helper.make_node("Cast", ["pm2"], ["pmf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["res", "pmf"], ["rm"]),
        helper.make_node("ReduceSum", ["rm", "ax1"], ["rs"], keepdims=0),
        helper.make_node("ReduceSum", ["pmf", "ax1"], ["cnt0"], keepdims=0),
        helper.make_node("Clip", ["cnt0", "eps"], ["cnt"]),
        helper.make_node("Div", ["rs", "cnt"], ["pooled"]),
    ]


def call_concurrently(f, items: list, nthreads: int) -> tuple[list, list]:
    """``f(item)`` for every item, ``nthreads`` threads at once (thread t takes items t, t + n, ...,
    all starting together): (results in item order, None where a call failed; the errors' reprs)."""
    import threading

    got: list = [None] * len(items)
    errors: list = []
    start = threading.Barrier(nthreads)

    def worker(t):
        try:
            start.wait()
            for k in range(t, len(items), nthreads):
                got[k] = f(items[k])
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return got, errors
