"""Unroll ONNX LSTM / GRU / RNN nodes over their (frozen) time axis into plain ONNX ops.

Runs on the ONNX model itself, in the frontend, before calibration: every gate, cell state and
hidden state of every time step becomes an ONNX tensor of its own, so onnxruntime calibrates each
one by name and the ordinary integer rules quantize them (Dense for the input and recurrent
projections, Add / Mul / Sub of activations, Sigmoid / Tanh as 8-bit tables, Concat).  The
rewrite is exact in float (the same sums in the same order up to float32 rounding), which the
tests check against onnxruntime's own LSTM / GRU / RNN.

Per direction d (forward; reverse walks t from T-1 down to 0), with XW = X W_d^T + Wb_d computed for
all steps at once (one Dense over [T, batch, input]) and h_{-1}, c_{-1} the initial states (zero
when absent: their terms are left out):
  LSTM (gates i, o, f, c; ONNX order)   g = XW[t] + h R^T + Rb;  i, o, f = f1(g_i, g_o, g_f);
                                        c~ = f2(g_c);  C = f*C + i*c~  (peepholes: + p*C terms);
                                        H = o * f3(C)
  GRU (gates z, r, h)                   z, r = f1(..);  linear_before_reset = 0:
                                        h~ = f2(XW_h[t] + (r*H) R_h^T + Rb_h), else
                                        h~ = f2(XW_h[t] + r*(H R_h^T + Rb_h));  H = h~ + z*(H - h~)
  RNN                                   H = f1(XW[t] + H R^T + Rb)
Outputs: Y [T, dirs, batch, hidden] (layout 1: [batch, T, dirs, hidden]), Y_h / Y_c
[dirs, batch, hidden] (layout 1: [batch, dirs, hidden]).
Refused in one line (UnsupportedOpError): a non-constant sequence_lens shorter than T, input_forget,
activation functions other than Sigmoid / Tanh / Relu / HardSigmoid / Affine-free ScaledTanh.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qcompiler.errors import UnsupportedOpError

from .onnx_rewrite import NodeBuilder, initializer_value, replace_nodes

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
PLAIN_ACTS = {"Sigmoid", "Tanh", "Relu", "HardSigmoid"}


class _Builder(NodeBuilder):
    """Inside a time step (``scope`` set) a tensor is named ``<node>/d<dir>/step<t>/<what>_<k>``, k
    counting that ``what`` within the step: the same role has the same name in every step but for
    ``step<t>``, which is how calibration shares one range per role over the steps
    (``passes/shared_steps.py``)."""

    scope: str | None = None
    _occ: dict | None = None

    def name(self, what: str) -> str:
        if self.scope is None:
            return super().name(what)
        self._occ[what] = self._occ.get(what, 0) + 1
        return f"{self.prefix}/{self.scope}/{what}_{self._occ[what]}"

    def act(self, fn: str, x: str, alpha, beta) -> str:
        if fn == "HardSigmoid":
            return self.op("HardSigmoid", [x], "act", alpha=float(alpha if alpha is not None else 0.2),
                           beta=float(beta if beta is not None else 0.5))
        return self.op(fn, [x], fn.lower())

    def slice_last(self, x: str, start: int, size: int, what: str) -> str:
        return self.op("Slice", [x, self.const("s", np.array([start], np.int64)),
                                 self.const("e", np.array([start + size], np.int64)),
                                 self.const("a", np.array([-1], np.int64))], what)

    def step(self, x: str, t: int) -> str:
        """x[t] of a [T, ...] tensor, as [...]."""
        s = self.op("Slice", [x, self.const("s", np.array([t], np.int64)), self.const("e", np.array([t + 1], np.int64)),
                              self.const("a", np.array([0], np.int64))], "xw_t")
        return self.op("Squeeze", [s, self.const("ax", np.array([0], np.int64))], "x_t")

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", [x, self.const("ax", np.array([axis], np.int64))], "unsq")


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unroll(model: onnx.ModelProto, node: onnx.NodeProto, k: int, T: int, loop: bool = False,
            Bsz: int = 1) -> tuple[list, list]:
    op = node.op_type
    b = _Builder(node, k)
    a = _attrs(node)
    where = b.prefix
    ins = list(node.input) + [""] * (8 - len(node.input))
    W, R = initializer_value(model, ins[1]), initializer_value(model, ins[2])
    if W is None or R is None:
        raise UnsupportedOpError([(op, where, "W and R must be constant")])
    dirs, G = W.shape[0], GATES[op]
    H = R.shape[-1]
    B = initializer_value(model, ins[3]) if ins[3] else np.zeros((dirs, 2 * G * H), W.dtype)
    if ins[3] and B is None:
        raise UnsupportedOpError([(op, where, "B must be constant")])
    if ins[4]:
        sl = initializer_value(model, ins[4])
        if sl is None or np.any(sl != T):
            raise UnsupportedOpError([(op, where, "sequence_lens must be a constant equal to the sequence length")])
    if a.get("input_forget", 0):
        raise UnsupportedOpError([(op, where, "input_forget=1")])
    acts = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", [])] or DEFAULT_ACTS[op] * dirs
    bad = [f for f in acts if f not in PLAIN_ACTS]
    if bad:
        raise UnsupportedOpError([(op, where, f"activation {bad[0]}")])
    alphas, betas = list(a.get("activation_alpha", [])), list(a.get("activation_beta", []))
    clip = a.get("clip")
    layout = int(a.get("layout", 0))
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    lbr = int(a.get("linear_before_reset", 0))
    P = initializer_value(model, ins[7]) if op == "LSTM" and len(ins) > 7 and ins[7] else None
    x = ins[0]
    h0 = ins[5]
    c0 = ins[6] if op == "LSTM" else ""
    if layout == 1:  # [batch, T, in] -> [T, batch, in]; states [batch, dirs, H] -> [dirs, batch, H]
        x = b.op("Transpose", [x], "xT", perm=[1, 0, 2])
        h0 = b.op("Transpose", [h0], "h0T", perm=[1, 0, 2]) if h0 and initializer_value(model, h0) is None else h0
        c0 = b.op("Transpose", [c0], "c0T", perm=[1, 0, 2]) if c0 and initializer_value(model, c0) is None else c0
    nacts = len(DEFAULT_ACTS[op])
    Ys, Hs, Cs = [], [], []
    for d in range(dirs):
        fns = acts[d * nacts:(d + 1) * nacts]
        al = [alphas[d * nacts + i] if d * nacts + i < len(alphas) else None for i in range(nacts)]
        be = [betas[d * nacts + i] if d * nacts + i < len(betas) else None for i in range(nacts)]

        def f(bld, i, v, fns=fns, al=al, be=be):
            if clip is not None and fns[i] != "Relu":
                v = bld.op("Clip", [v, bld.const("lo", np.float32(-clip)), bld.const("hi", np.float32(clip))], "clip")
            return bld.act(fns[i], v, al[i], be[i])

        Wb, Rb = B[d, :G * H], B[d, G * H:]
        if op == "GRU" and lbr:  # Rb_h stays inside the reset product
            xb = Wb + np.concatenate([Rb[:2 * H], np.zeros(H, Rb.dtype)])
        else:
            xb = Wb + Rb
        XW = b.op("MatMul", [x, b.const("WT", np.ascontiguousarray(W[d].T))], "xw", out=f"{b.prefix}/xw_d{d}")
        XW = b.op("Add", [XW, b.const("xb", xb.astype(W.dtype))], "xwb", out=f"{b.prefix}/xwb_d{d}")
        RT = np.ascontiguousarray(R[d].T)
        once: dict[str, str] = {}

        def shared(bld, what, arr):  # one initializer per direction, read by every step (not T copies)
            if (id(bld), what) not in once:
                once[(id(bld), what)] = bld.const(what, arr)
            return once[(id(bld), what)]

        h = _state(b, model, h0, d, layout, "h0")
        c = _state(b, model, c0, d, layout, "c0")
        reverse = not (direction == "forward" or (direction == "bidirectional" and d == 0))
        cell = _Cell(op, H, f, shared, RT, Rb, P[d] if P is not None else None, lbr)
        if loop:  # one Scan over the time axis, its body one step (module docstring)
            y, h, c = _scan(b, cell, XW, h, c, d, reverse, Bsz, W.dtype)
            Ys.append(y)
            Hs.append(b.op("Squeeze", [b.op("Slice", [y, b.const("s", np.array([0 if reverse else -1], np.int64)),
                                                      b.const("e", np.array([1 if reverse else T], np.int64)),
                                                      b.const("a", np.array([0], np.int64))], "y_last"),
                                       b.const("ax", np.array([0], np.int64))], "h_last"))
            Cs.append(c or None)  # the Scan's final cell state (LSTM)
            continue
        # XW[t] for every t from one Split (one kernel): a Slice per step would fuse with the step's
        # first ops into a kernel of its own per step, where the steps are otherwise identical
        xs = [f"{b.prefix}/xw_split_{t}_{d}" for t in range(T)]
        b.nodes.append(helper.make_node("Split", [XW, b.const("split", np.ones(T, np.int64))], xs,
                                        name=b.name("Split"), axis=0))
        steps = range(T - 1, -1, -1) if reverse else range(T)
        outs = {}
        for t in steps:
            b.scope, b._occ = f"d{d}/step{t}", {}
            g = b.op("Squeeze", [xs[t], b.const("ax", np.array([0], np.int64))], "x_t")
            h, c = cell(b, g, h, c)
            outs[t] = h
        b.scope = None
        Ys.append(b.op("Concat", [b.unsqueeze(outs[t], 0) for t in range(T)], "y", axis=0))
        Hs.append(h)
        Cs.append(c)
    outputs = list(node.output) + [""] * 3
    final: list[onnx.NodeProto] = []

    def emit(dst, src_list, axis, what):
        if len(src_list) == 1:
            src = b.unsqueeze(src_list[0], axis)
        else:
            # (named apart from the builder's count: the same tensor, calibrated by name, unrolled or as Scans)
            src = b.op("Concat", [b.unsqueeze(s, axis) for s in src_list], what, out=f"{b.prefix}/{what}_dirs", axis=axis)
        if layout == 1:
            perm = [2, 0, 1, 3] if what == "Y" else [1, 0, 2]
            src = b.op("Transpose", [src], what + "T", perm=perm)
        final.append(helper.make_node("Identity", [src], [dst], name=f"{b.prefix}/{what}"))

    if outputs[0]:
        emit(outputs[0], Ys, 1, "Y")
    if outputs[1]:
        emit(outputs[1], Hs, 0, "Y_h")
    if op == "LSTM" and outputs[2]:
        emit(outputs[2], Cs, 0, "Y_c")
    return b.nodes + final, b.inits


class _Cell:
    """One time step of direction d: ``cell(b, g, h, c) -> (h, c)`` with ``g`` = XW[t] (gates' input
    projection and biases) and h / c the previous states (None: zero, their terms left out)."""

    def __init__(self, op, H, f, shared, RT, Rb, P, lbr):
        self.op, self.H, self.f, self.shared, self.RT, self.Rb, self.P, self.lbr = op, H, f, shared, RT, Rb, P, lbr

    def __call__(self, b, g, h, c):
        op, H, f, RT, Rb, P, lbr = self.op, self.H, self.f, self.RT, self.Rb, self.P, self.lbr

        def shared(what, arr):
            return self.shared(b, what, arr)

        if op == "LSTM":
            if h is not None:
                g = b.op("Add", [g, b.op("MatMul", [h, shared("RT", RT)], "hr")], "g")
            gi, go, gf, gc = (b.slice_last(g, j * H, H, w) for j, w in enumerate("iofc"))
            if P is not None and c is not None:
                gi = b.op("Add", [gi, b.op("Mul", [c, shared("pi", P[:H])], "pc")], "gi")
                gf = b.op("Add", [gf, b.op("Mul", [c, shared("pf", P[2 * H:])], "pc")], "gf")
            i_, f_, cc = f(b, 0, gi), f(b, 0, gf), f(b, 1, gc)
            ic = b.op("Mul", [i_, cc], "ic")
            c = ic if c is None else b.op("Add", [b.op("Mul", [f_, c], "fc"), ic], "c")
            if P is not None:
                go = b.op("Add", [go, b.op("Mul", [c, shared("po", P[H:2 * H])], "pc")], "go")
            h = b.op("Mul", [f(b, 0, go), f(b, 2, c)], "h")
        elif op == "GRU":
            gz, gr, gh = (b.slice_last(g, j * H, H, w) for j, w in enumerate("zrh"))
            if h is not None:
                hzr = b.op("MatMul", [h, shared("RzrT", np.ascontiguousarray(RT[:, :2 * H]))], "hzr")
                gz = b.op("Add", [gz, b.slice_last(hzr, 0, H, "hz")], "gz")
                gr = b.op("Add", [gr, b.slice_last(hzr, H, H, "hr")], "gr")
            z, r = f(b, 0, gz), f(b, 0, gr)
            RhT = shared("RhT", np.ascontiguousarray(RT[:, 2 * H:]))
            if lbr:      # h~ = f2(XW_h + r * (H R_h^T + Rb_h))
                hr_ = shared("Rbh", Rb[2 * H:]) if h is None else \
                    b.op("Add", [b.op("MatMul", [h, RhT], "hRh"), shared("Rbh", Rb[2 * H:])], "hRhb")
                gh = b.op("Add", [gh, b.op("Mul", [r, hr_], "rhr")], "gh")
            elif h is not None:   # h~ = f2(XW_h + Rb_h + (r * H) R_h^T)  (Rb_h is in XW)
                gh = b.op("Add", [gh, b.op("MatMul", [b.op("Mul", [r, h], "rh"), RhT], "rhR")], "gh")
            ht = f(b, 1, gh)
            if h is None:   # H = (1 - z) * h~
                h = b.op("Sub", [ht, b.op("Mul", [z, ht], "zh")], "h")
            else:           # H = h~ + z * (H - h~)
                h = b.op("Add", [ht, b.op("Mul", [z, b.op("Sub", [h, ht], "dh")], "zdh")], "h")
        else:
            if h is not None:
                g = b.op("Add", [g, b.op("MatMul", [h, shared("RT", RT)], "hr")], "g")
            h = f(b, 0, g)
        return h, c


def _scan(b: _Builder, cell: _Cell, XW: str, h, c, d: int, reverse: bool, batch: int, dtype) -> tuple[str, str, str]:
    """Direction d as one ONNX Scan over XW's time axis (loop mode): its body is one step of the
    recurrence with the names of an unrolled step but ``step*`` for ``step<t>`` (the roles of
    ``passes/shared_steps.py``: calibrated on the unrolled model, each body tensor takes the range
    of its role over every step); zero initial states are explicit zeros (every step runs the same
    body).  Returns (Y_d [T, batch, H], the final h, the final c or '')."""
    H = cell.H
    body = _Builder.__new__(_Builder)
    body.prefix, body.nodes, body.inits, body.count = b.prefix, [], [], 0
    body.scope, body._occ = f"d{d}/step*", {}
    lstm = cell.op == "LSTM"
    names = [f"{b.prefix}/d{d}/step*/h_prev"] + ([f"{b.prefix}/d{d}/step*/c_prev"] if lstm else [])
    x_t = f"{b.prefix}/d{d}/step*/x_t_1"
    hn, cn = cell(body, x_t, names[0], names[1] if lstm else None)
    y = body.op("Identity", [hn], "y")
    outs = [hn] + ([cn] if lstm else []) + [y]
    ft = onnx.TensorProto.FLOAT
    graph = helper.make_graph(body.nodes, f"{b.prefix}_d{d}_step",
                              [helper.make_tensor_value_info(n, ft, [batch, H]) for n in names]
                              + [helper.make_tensor_value_info(x_t, ft, [batch, cell_width(cell)])],
                              [helper.make_tensor_value_info(o, ft, [batch, H]) for o in outs], body.inits)
    zeros = np.zeros((batch, H), dtype)
    init = [h if h is not None else b.const("h0z", zeros)]
    if lstm:
        init.append(c if c is not None else b.const("c0z", zeros))
    res = [b.name("h_fin")] + ([b.name("c_fin")] if lstm else []) + [b.name("y_scan")]
    b.nodes.append(helper.make_node("Scan", init + [XW], res, name=b.name("Scan"), body=graph, num_scan_inputs=1,
                                    scan_input_directions=[int(reverse)], scan_output_directions=[int(reverse)]))
    return res[-1], res[0], res[1] if lstm else ""


def cell_width(cell: _Cell) -> int:
    return GATES[cell.op] * cell.H


def _state(b: _Builder, model, name: str, d: int, layout: int, what: str) -> str | None:
    """The initial state of direction d: None when absent or all zero (its terms are left out), a
    constant slice when constant, else a Slice of the activation."""
    if not name:
        return None
    v = initializer_value(model, name)
    if v is None:
        return b.step(name, d)
    v = np.swapaxes(v, 0, 1) if layout == 1 else v
    return None if not np.any(v[d]) else b.const(what, np.ascontiguousarray(v[d]))


def _input_dims(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[int | None, int | None]:
    """(sequence length, batch) of the recurrence's input X from the model's shapes (None: unknown)."""
    layout = int(_attrs(node).get("layout", 0))
    vi = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    v = vi.get(node.input[0])
    if v is None or not v.type.tensor_type.HasField("shape"):
        return None, None
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in v.type.tensor_type.shape.dim]
    return (dims[1], dims[0]) if layout == 1 else (dims[0], dims[1])


def unroll_recurrent(model: onnx.ModelProto, loop: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` with every LSTM / GRU / RNN unrolled (module docstring); the model must
    have static shapes (the frontend freezes them first).  Returns ``model`` itself if it has none.
    ``loop``: each direction becomes one ONNX Scan whose body is one step (``_scan``), the form
    whose integer graph is the same at every sequence length (a symbolic time axis,
    ``qcompiler/intops/recurrent.py``)."""
    def expand(m, n, k):
        T, batch = _input_dims(m, n)
        if T is None:
            raise UnsupportedOpError([(n.op_type, n.name, "sequence length unknown (freeze the input shapes)")])
        return _unroll(m, n, k, T, loop, batch or 1)

    return replace_nodes(model, GATES, expand)
