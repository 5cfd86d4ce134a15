"""Recurrences over a symbolic time axis: an ONNX Scan quantized as one integer ``loop``.

Unrolled over a fixed time axis (``passes/unroll_recurrent.py``), a recurrence is ordinary ops, one
copy per step.  Over a symbolic one the number of steps is known only at run time, so the frontend
writes each LSTM / GRU / RNN direction as an ONNX Scan (``unroll_recurrent(loop=True)``) whose body
is one step, named as an unrolled step but ``step*`` for ``step<t>``.  This module quantizes it:

  * the body (a small ONNX graph) through the same frontend, float passes and quantization rules as
    any model; each body tensor takes the calibrated range of its role over every step of the
    unrolled calibration model (``passes/shared_steps.py`` ``role``; one range for all steps, as
    ONNX Runtime's and TFLite's integer LSTMs have), a state input the range of the state output
    that feeds it, so every step is the same integer function;
  * the body's entry quantizes and exit dequantizes are taken off: its inputs and outputs are the
    integer states and the step's input / output; a state output whose QParams differ from its
    input's is requantized to them inside the body (one dyadic step), so the state that goes round
    the loop has one representation;
  * the integer ``loop`` node runs the body once per step along axis 0 of its scan input (reversed
    for ``reverse``) from the initial states, and stacks the step outputs along axis 0;
  * a final state the model reads (an LSTM's Y_c) leaves the loop inside the step output: the body
    writes y_t and that state's codes side by side (each widened to the wider dtype, exact), and the
    final state is the slice of the last step run (t = T-1, or 0 when reversed), cast back to its
    own dtype with its own QParams -- the integer graph keeps one output per node.

Semantics (``LoopOp.reference``), with S the states and x the scan input of T steps:
    for t in (0..T-1, or T-1..0):  S, y_t = body(S, x[t])        Y = stack(y_t), in time order
The lowering (``qcompiler/lowering/relax_loop.py``) calls the body's Relax function once per step.
Overflow: the body's own ops carry their bounds (``check_overflow`` of the body, over whole dtype
ranges of its inputs).
"""

from __future__ import annotations

import numpy as np

from qcompiler.errors import QuantizationError

from .registry import Example, IntOp, register, rule


def _check(fg, n) -> str | None:
    a = n.attrs
    k = int(a.get("num_scan_inputs", 0))
    if k != 1:
        return "a Scan with other than one scan input"
    if len(n.outputs) - (len(n.inputs) - k) != 1:
        return "a Scan with other than one scan output"
    if any(int(v) != int(a.get("scan_input_directions", [0])[0]) for v in a.get("scan_output_directions", [0])):
        return "a Scan whose output runs in the other direction from its input"
    if any(int(v) != 0 for key in ("scan_input_axes", "scan_output_axes") for v in a.get(key, [])):
        return "a Scan along an axis other than 0"
    return None


def _role_stats(qz) -> dict:
    """Role name (``step*``) -> the merged statistics of its tensors over every step (cached)."""
    cache = getattr(qz, "_role_stats", None)
    if cache is None:
        from collections import defaultdict

        from passes.shared_steps import merge, role

        groups = defaultdict(list)
        for name, st in qz.stats.items():
            r = role(name)
            if r is not None:
                groups[r].append(st)
        cache = {r: merge(v) for r, v in groups.items()}
        qz._role_stats = cache
    return cache


def _body_float_graph(qz, n):
    """The Scan body as a float Graph through the frontend's conversion and the float passes."""
    import onnx
    from onnx import helper

    from qcompiler.driver import float_passes
    from qcompiler.frontend import to_graph

    body = n.attrs["body"]
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", qz.fg.opset)])
    model.ir_version = min(model.ir_version, 8)
    feeds = {}
    for vi in body.input:
        shape = [int(d.dim_value) for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = np.zeros(shape, np.float32)
    g = to_graph(onnx.shape_inference.infer_shapes(model), feeds)
    return float_passes(g, qz.cfg.allow_float)


def _body_stats(qz, bg, n, ns: int) -> dict:
    roles = _role_stats(qz)
    stats = {}
    for name in bg.shapes:
        if name in qz.stats:
            stats[name] = qz.stats[name]
        elif name in roles:
            stats[name] = roles[name]
    from passes.shared_steps import merge

    for k in range(ns):  # a state input: the range of the state output that feeds it (and the initial state's)
        out = bg.outputs[k]
        if out not in stats:
            raise QuantizationError(f"Scan '{n.name}': no calibrated range for its state '{out}'")
        init = qz.stats.get(n.inputs[k])
        stats[bg.inputs[k]] = merge([stats[out], init]) if init is not None else stats[out]
    return stats


def _strip_boundary(ig):
    """Take the body's entry quantizes and exit dequantizes off (module docstring)."""
    ins, outs = {}, {}
    keep = []
    for node in ig.nodes:
        if node.op == "quantize" and node.inputs[0] in ig.inputs:
            ins[node.inputs[0]] = node.outputs[0]
        elif node.op == "dequantize" and node.outputs[0] in ig.outputs:
            outs[node.outputs[0]] = node.inputs[0]
        else:
            keep.append(node)
    if set(ins) != set(ig.inputs) or set(outs) != set(ig.outputs):
        raise QuantizationError("Scan body: its inputs and outputs must be float tensors quantized at its boundary")
    ig.nodes = keep
    for src in outs.values():  # an output dequantize writes the name of its integer source
        ig.dtypes[src] = ig.qparams[src].dtype
    for t in ig.inputs:
        ig.shapes.pop(t, None)
        ig.dtypes.pop(t, None)
    ig.inputs = [ins[t] for t in ig.inputs]
    ig.outputs = [outs[t] for t in ig.outputs]
    return ig


def _requant_attrs(have, want, where: str) -> dict:
    """The ``requant`` from QParams ``have`` to ``want`` (the same zero point, 0)."""
    from qcompiler.qtypes import dyadic

    dy = dyadic(np.asarray(have.scale / want.scale), where)
    return {"mult": dy.mult, "shift": dy.shift, "lo": want.qmin, "hi": want.qmax, "dtype": want.dtype}


def _to_qparams(g, src: str, qp, where: str):
    """``src`` (an integer tensor of the body ``g``) in QParams ``qp``: itself, or one requant."""
    from qcompiler.graph import Node

    have = g.qparams[src]
    if have == qp:
        return src
    out = f"{src}/loop_rq"
    g.nodes.append(Node("requant", out, [src], [out], {**_requant_attrs(have, qp, where),
                                                        "in_scales": (have.scale,), "out_scale": qp.scale}))
    g.shapes[out], g.dtypes[out], g.qparams[out] = g.shapes[src], qp.dtype, qp
    return out


@rule("Scan", check=_check)
def scan_rule(qz, n):
    from dataclasses import replace

    from passes.overflow import check_overflow
    from passes.quantize import quantize
    from passes.sign import nonnegative

    a = n.attrs
    ns = len(n.inputs) - 1
    bg = _body_float_graph(qz, n)
    stats = _body_stats(qz, bg, n, ns)
    body = quantize(bg, stats, nonnegative(bg), replace(qz.cfg, io="float", allow_float=False, auto_wide=0.0))
    body = _strip_boundary(body)
    for k in range(ns):  # the state round the loop in one representation
        body.outputs[k] = _to_qparams(body, body.outputs[k], body.qparams[body.inputs[k]], f"Scan '{n.name}' state {k}")
    check_overflow(body)
    ins = []
    for k, t in enumerate(n.inputs):
        want = body.qparams[body.inputs[k]]
        if t in qz.fg.consts:  # a constant initial state (zeros when the model gives none)
            ins.append(qz.quantized_const(t, want))
            continue
        src = qz.iname(t)
        if qz.ig.qparams.get(src) != want:
            src = qz.emit("requant", [src], qz.fresh(f"{t}/loop_in"),
                          _requant_attrs(qz.ig.qparams[src], want, f"Scan '{n.name}' input {k}"),
                          want.dtype, qz.fg.shape(t), want, node_name=f"{n.name}/requant_{k}")
        ins.append(src)
    y = body.outputs[ns]
    qy = body.qparams[y]
    out = n.outputs[-1]
    reverse = bool(int(a.get("scan_input_directions", [0])[0]))
    read = [k for k in range(ns) if n.outputs[k] and (qz.consumers.get(n.outputs[k]) or n.outputs[k] in qz.fg.outputs)]
    if not read:
        qz.emit("loop", ins, out, {"body": body, "n_states": ns, "reverse": reverse}, qy.dtype, qz.fg.shape(out),
                qy, out, node_name=n.name)
        return
    _loop_with_final_states(qz, n, body, ins, read, reverse)


def _loop_with_final_states(qz, n, body, ins, read: list, reverse: bool) -> None:
    """The loop of Scan ``n`` whose final states ``read`` are used (an LSTM's Y_c): the body's step
    output carries those states' codes beside y_t (``_pack``), and the final states are the last
    step's (t = T-1; t = 0 when ``reverse``) slices of the stacked output, each back in its own
    QParams (module docstring)."""
    from qcompiler.qtypes import QParams

    ns = len(n.inputs) - 1
    parts = [body.outputs[ns]] + [body.outputs[k] for k in read]
    widths = [int(body.shapes[p][-1]) for p in parts]
    qps = [body.qparams[p] for p in parts]
    wide = max(qps, key=lambda q: q.bits).dtype
    body.outputs[ns] = _pack(body, parts, wide)
    out = n.outputs[-1]
    T = qz.fg.shape(out)[0]
    packed_shape = (*qz.fg.shape(out)[:-1], sum(widths))
    carrier = QParams(qps[0].scale, wide)  # a carrier of codes: never read as real values
    packed = qz.emit("loop", ins, qz.fresh(f"{out}/packed"), {"body": body, "n_states": ns, "reverse": reverse},
                     wide, packed_shape, carrier, node_name=n.name)
    off = 0
    for j, (w, q) in enumerate(zip(widths, qps)):
        name = out if j == 0 else n.outputs[read[j - 1]]
        rank = len(packed_shape)
        if j == 0:  # y: every step, its columns
            attrs = {"starts": (off,), "ends": (off + w,), "axes": (rank - 1,), "steps": (1,)}
            shape = (*packed_shape[:-1], w)
        else:       # a final state: the last step run, its columns
            last = 0 if reverse else T - 1
            attrs = {"starts": (last, off), "ends": (last + 1, off + w), "axes": (0, rank - 1), "steps": (1, 1)}
            shape = (1, *packed_shape[1:-1], w)
        cut = qz.emit("slice", [packed], qz.fresh(f"{name}/cut"), attrs, wide, shape, carrier,
                      node_name=f"{n.name}/unpack_{j}")
        if j:
            cut = qz.emit("reshape", [cut], qz.fresh(f"{name}/last"), {"shape": tuple(shape[1:])}, wide, shape[1:],
                          carrier, node_name=f"{n.name}/unpack_{j}_last")
            shape = shape[1:]
        # the codes back in their own dtype and QParams (exact: they are that dtype's values)
        qz.emit("int_cast", [cut], qz.fresh(f"{name}/q") if name in qz.ig.shapes else name,
                {"lo": q.qmin, "hi": q.qmax, "dtype": q.dtype}, q.dtype, shape, q, name, node_name=f"{n.name}/unpack_{j}_cast")
        off += w


def _pack(body, parts: list, dtype: str) -> str:
    """One body tensor holding ``parts``' codes side by side on the last axis, each widened to
    ``dtype`` (exact), in a carrier QParams (the first part's scale)."""
    from qcompiler.graph import Node
    from qcompiler.qtypes import QParams

    carrier = QParams(body.qparams[parts[0]].scale, dtype)
    lo, hi = carrier.qmin, carrier.qmax
    srcs = []
    for p in parts:
        if body.dtypes[p] == dtype:
            srcs.append(p)
            continue
        w = f"{p}/pack_w"
        body.nodes.append(Node("int_cast", w, [p], [w], {"lo": lo, "hi": hi, "dtype": dtype,
                                                         "in_scales": (body.qparams[p].scale,), "out_scale": carrier.scale}))
        body.shapes[w], body.dtypes[w], body.qparams[w] = body.shapes[p], dtype, carrier
        srcs.append(w)
    out = "step_packed"
    axis = len(body.shapes[parts[0]]) - 1
    body.nodes.append(Node("concat", out, srcs, [out], {"axis": axis, "in_scales": tuple(carrier.scale for _ in srcs),
                                                        "out_scale": carrier.scale}))
    body.shapes[out] = (*body.shapes[parts[0]][:-1], sum(int(body.shapes[p][-1]) for p in parts))
    body.dtypes[out], body.qparams[out] = dtype, carrier
    return out


@register
class LoopOp(IntOp):
    """Y = stack(y_t) with (S, y_t) = body(S, x[t]) over the steps of axis 0 of the scan input x, from
    the initial states S (module docstring).  Bound: the body's own (``check_overflow`` of it)."""
    name = "loop"
    attrs = {"body": "the step: an integer Graph, inputs [states..., x_t], outputs [states..., y_t]",
             "n_states": "how many of the inputs / outputs are states",
             "reverse": "run t from T-1 down to 0 (Y stays in time order)"}

    @staticmethod
    def reference(*args):
        from qcompiler.reference import execute

        *vals, a = args
        body, ns = a["body"], int(a["n_states"])
        states, xs = list(vals[:ns]), vals[ns]
        T = xs.shape[0]
        ys = [None] * T
        for t in (range(T - 1, -1, -1) if a["reverse"] else range(T)):
            out = execute(body, {**dict(zip(body.inputs[:ns], states)), body.inputs[ns]: xs[t]})
            states = [out[o] for o in body.outputs[:ns]]
            ys[t] = out[body.outputs[ns]]
        return np.stack(ys)

    @staticmethod
    def lower(lw, n, *vals):
        from qcompiler.lowering.relax_loop import lower_loop

        return lower_loop(lw, n, *vals)

    @staticmethod
    def bound(ctx, n, *ins):
        from passes.overflow import check_overflow

        check_overflow(n.attrs["body"])
        return None

    @staticmethod
    def examples(rng):
        from qcompiler.graph import Graph, Node

        # h' = clip(rq(h * mult_a + x * mult_b)), y = h': an accumulating recurrence
        body = Graph([Node("add", "acc", ["h", "x"], ["h2"], {"mult_a": np.int64(1 << 29), "mult_b": np.int64(3 << 28),
                                                             "shift": np.int64(30), "lo": -128, "hi": 127,
                                                             "dtype": "int8"})],
                     ["h", "x"], ["h2", "h2"], {"h": (2, 3), "x": (2, 3), "h2": (2, 3)},
                     {"h": "int8", "x": "int8", "h2": "int8"})
        return [Example([("int8", (2, 3)), ("int8", (5, 2, 3))], {"body": body, "n_states": 1, "reverse": False}, "int8"),
                Example([("int8", (2, 3)), ("int8", (1, 2, 3))], {"body": body, "n_states": 1, "reverse": True}, "int8")]
