"""Where a quantized model loses its accuracy: every integer tensor against onnxruntime's float one.

For a corpus or zoo model (or any .onnx with an .npz of inputs), quantize as ``qc compile`` does,
run the NumPy integer reference keeping every tensor, run onnxruntime FP32 with every intermediate
tensor exposed, and print, in graph order, each tensor that carries an ONNX name: its integer
dtype, scale, the cosine and relative error of (integer * scale) against float, and how much of
the float range the scale clips.  The first tensors whose cosine drops are where to look.
``--local`` separates what each op adds from what it inherits: every named tensor's integer value is
computed from its named inputs quantized from the float run (teacher forcing), so a layer whose own
error is large stands out even deep in a network whose error accumulates.

  .venv/bin/python benchmarks/layer_error.py ppocrv2-rec [--n-calib 8] [--worst 25] [--local] [--sample 3]
  .venv/bin/python benchmarks/layer_error.py model.onnx --calib calib.npz --test test.npz
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from qcompiler import reference  # noqa: E402
from qcompiler.driver import CompileOptions, prepare  # noqa: E402
from qcompiler.targets import parse_target  # noqa: E402


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / na / nb) if na and nb else float(na == nb)


def _execute_local(ig, feeds: dict, floats: dict) -> dict:
    """The integer reference with teacher forcing: after each node whose output has a float
    counterpart in ``floats``, the node's own output is recorded and the value passed on is the float
    tensor quantized at the node's scale, so each recorded tensor carries only the error its own
    chain of integer ops adds (from the last named tensors before it), not what came from upstream."""
    env: dict = dict(ig.consts)
    env.update(feeds)
    own: dict = {}
    for node in ig.nodes:
        y = reference.run_node(node, [env[i] for i in node.inputs])
        o = node.outputs[0]
        env[o] = y
        if o in floats and o in ig.qparams and np.shape(floats[o]) == np.shape(y):
            own[o] = y
            qp = ig.qparams[o]
            env[o] = np.clip(np.round(np.asarray(floats[o], np.float64) / qp.scale), qp.qmin, qp.qmax).astype(y.dtype)
    return own


def _smoothing(prep, t: str):
    """The per-channel factor f (shaped to broadcast) by which ``passes/smooth.py`` divided tensor
    ``t`` in place (a LayerNorm output whose gamma / beta took 1 / f), or None: the statistics before
    smoothing (``calib_stats``) and after (``state.stats``) differ by exactly that factor."""
    a, b = (prep.calib_stats or {}).get(t), prep.state.stats.get(t)
    if a is None or b is None or a is b or a.chan_hi is None or b.chan_hi is None:
        return None
    ma = np.maximum(np.abs(a.chan_lo), np.abs(a.chan_hi)).astype(np.float64)
    mb = np.maximum(np.abs(b.chan_lo), np.abs(b.chan_hi)).astype(np.float64)
    if ma.shape != mb.shape or np.allclose(ma, mb):
        return None
    f = np.where(mb > 0, ma / np.where(mb > 0, mb, 1.0), 1.0)
    shape = [1] * len(prep.int_graph.shapes[t])
    shape[b.chan_axis] = -1
    return f.reshape(shape)


def layer_errors(model_path: str, calib: dict, test: dict, batch: int = 1, method: str = "percentile",
                 local: bool = False) -> list[dict]:
    """One row per named integer tensor (module docstring); ``local``: each tensor's own error with
    its named inputs taken from the float run (``_execute_local``)."""
    import onnx

    from qcompiler.ort_util import session

    prep = prepare(model_path, calib, CompileOptions(target=parse_target("cpu"), batch=batch, method=method))
    ig = prep.int_graph
    feeds = {}
    for t in ig.inputs:
        if t not in test:
            feeds[t] = None
        elif prep.batch_axes.get(t) is None:  # no sample axis (a scalar rate): as is
            feeds[t] = np.asarray(test[t])
        else:  # the first ``batch`` samples along the input's batch axis (a state [2, B, 128]: axis 1)
            v = np.asarray(test[t])
            feeds[t] = v if v.shape == tuple(ig.shapes[t]) else np.take(v, range(batch), axis=prep.batch_axes[t])
    m = onnx.ModelProto()
    m.CopyFrom(prep.fr.model)
    names = [t for t in ig.qparams if t in prep.fr.graph.dtypes and prep.fr.graph.dtypes[t].startswith("float")
             and t not in ig.inputs]
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    sess = session(m)
    wanted = [t for t in names if t in {o.name for o in sess.get_outputs()}]
    vals = dict(zip(wanted, sess.run(wanted, {k: v for k, v in feeds.items() if v is not None})))
    for t in wanted:  # a tensor smoothed in place holds x / f: compare with that
        f = _smoothing(prep, t)
        if f is not None:
            vals[t] = np.asarray(vals[t], np.float64) / f
    given = {k: v for k, v in feeds.items() if v is not None}
    env = _execute_local(ig, given, vals) if local else reference.execute(ig, given, keep=True)
    rows = []
    order = {n.outputs[0]: i for i, n in enumerate(ig.nodes)}
    for t in sorted(wanted, key=lambda t: order.get(t, 1 << 30)):
        if t not in env:
            continue
        qp = ig.qparams[t]
        f = np.asarray(vals[t], np.float64)
        q = np.asarray(env[t], np.float64) * qp.scale
        if f.shape != q.shape:
            continue
        lo, hi = qp.qmin * qp.scale, qp.qmax * qp.scale
        clipped = float(np.mean((f < lo - qp.scale) | (f > hi + qp.scale)))
        rows.append({"tensor": t, "op": next((n.op for n in ig.nodes if n.outputs[0] == t), "?"), "dtype": qp.dtype,
                     "scale": qp.scale, "cos": _cos(q, f),
                     "rel_err": float(np.linalg.norm(q - f) / (np.linalg.norm(f) or 1.0)), "clipped": clipped})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a corpus / zoo model name, or an .onnx path")
    ap.add_argument("--calib", help=".npz of calibration inputs (with an .onnx path)")
    ap.add_argument("--test", help=".npz of one test input (with an .onnx path)")
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--worst", type=int, default=0, help="print only the N tensors of lowest cosine")
    ap.add_argument("--method", default="percentile", help="activation range: minmax | percentile | mse")
    ap.add_argument("--local", action="store_true", help="each tensor's own error: its named inputs taken "
                    "from the float run, quantized (teacher forcing), so the error does not carry downstream")
    ap.add_argument("--sample", type=int, default=0, help="which eval sample of a corpus model")
    args = ap.parse_args(argv)
    if args.model.endswith(".onnx"):
        path = args.model
        calib, test = dict(np.load(args.calib)), dict(np.load(args.test or args.calib))
    else:
        import corpus

        path = str(corpus.model_path(args.model))
        calib = corpus.make_inputs(args.model, "calib", args.n_calib)
        e = corpus.get(args.model)
        test = corpus.sample(corpus.layout(e), corpus.make_inputs(args.model, "eval", args.sample + 1), args.sample)
    rows = layer_errors(path, calib, test, method=args.method, local=args.local)
    shown = sorted(rows, key=lambda r: r["cos"])[:args.worst] if args.worst else rows
    print(f"{'tensor':48s} {'op':10s} {'dtype':6s} {'scale':>10s} {'cos':>8s} {'rel_err':>8s} {'clipped':>8s}")
    for r in shown:
        print(f"{r['tensor'][-48:]:48s} {r['op'][:10]:10s} {r['dtype']:6s} {r['scale']:10.3g} {r['cos']:8.4f} "
              f"{r['rel_err']:8.3f} {r['clipped']:8.4f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    raise SystemExit(main())
