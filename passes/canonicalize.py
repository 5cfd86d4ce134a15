"""Canonicalize: rewrite ONNX ops (opsets 13..21) into the normal forms the quantizer handles.

All rewrites are exact in float.  Surviving tensors keep their ONNX names (calibration ranges are
keyed by them); a new tensor is only introduced inside a pure data-movement chain.

  Gemm(A, B, C; alpha, beta, transB), MatMul(A, const B) [+ Add(const c)]   ->  Dense(A; W[K,N], b[N])
  Relu -> Clip(0, inf); Clip(min, max inputs, any one-value shape) -> Clip(attrs); LeakyRelu(a) -> PRelu(a)
  Pow(x, 1) -> x; Pow(x, 2) -> Mul(x, x); Pow(x, 0.5) -> Sqrt(x); Pow(x, other constant) kept (a table)
  Max/Min(activations, constants) -> Max/Min of <= 2 activations with the constants as clamp, or Clip
  Sub(x, c) -> Add(x, -c); Div(x, c) -> Mul(x, 1/c); Neg(x) -> Mul(x, -1)
  Add/Sub/Mul/Div(x, c) with an output larger than x: x expanded to it first (a Gather)
  Identity / Dropout / Cast(float->float) -> removed; Cast(int->float) kept (integer data such as masks)
  Gather(const table, activation indices, axis 0) -> Embedding(ids; table)
  Div(x, activation) kept (integer division by a positive activation, e.g. a mean over a mask)
  Flatten / Squeeze / Unsqueeze / Reshape -> Reshape(shape = inferred output shape)
  MaxPool / AveragePool: auto_pad and ceil_mode -> explicit (top, left, bottom, right) pads
  GlobalAveragePool -> ReduceMean(axes 2..), GlobalMaxPool -> ReduceMax(axes 2..)
  ReduceMean/ReduceSum/ReduceMax axes (attribute or input) -> attribute, normalized
  Slice / Split / Pad / Concat / Transpose / Softmax: constant operands -> normalized attributes
  Resize(nearest), Tile, Expand, DepthToSpace, SpaceToDepth, and GatherElements / GatherND / Compress /
  ReverseSequence with constant indices -> Gather(flat index map, see index_map)
  Resize(linear, cubic) -> Resample(per-axis taps, see resize_maps)
  ConvTranspose -> GatherFill (zero insertion + padding, per spatial axis) -> Conv(stride 1, flipped weights)
"""

from __future__ import annotations

import numpy as np

from qcompiler.errors import UnsupportedOpError
from qcompiler.graph import Graph, Node

from .index_map import index_map
from .subpixel_deconv import SUBPIXEL

_ELEMENTWISE_FLOAT_UNARY = {"Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Erf", "Abs", "Softplus", "Softsign",
                            "Elu", "Selu", "Celu", "Gelu", "Mish", "Sin", "Cos", "Reciprocal", "ThresholdedRelu",
                            "Round", "Floor", "Ceil", "Sign", "HardSwish", "HardSigmoid"}
_INDEX_OPS = {"Resize", "Upsample", "Tile", "Expand", "DepthToSpace", "SpaceToDepth", "GatherElements", "GatherND",
              "Compress", "ReverseSequence"}

# ops that pass canonicalization unchanged (their attribute forms are already canonical)
_KEEP = {"Conv", "Add", "Mul", "MatMul", "Concat", "Transpose", "PRelu", "Softmax", "BatchNormalization",
         "HardSigmoid", "HardSwish", "LayerNormalization", "Equal", "Less", "Greater", "LessOrEqual",
         "GreaterOrEqual", "Not", "And", "Or", "Xor", "Where", "Mod", "Abs",
         "Scan", "ScatterElements", "ScatterND", "IsNaN"} | _ELEMENTWISE_FLOAT_UNARY
# Scan: a recurrence over a symbolic time axis (intops/recurrent.py); ScatterElements, ScatterND,
# IsNaN and a GatherND / GatherElements of computed indices: qcompiler/intops/indexed.py


ISLAND_MARK = "qc.float_island"   # attribute of a node kept for a float island (qcompiler/intops/island.py)


def _norm_axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


class Canonicalizer:
    def __init__(self, g: Graph):
        self.g = g
        self.problems: list[tuple[str, str, str]] = []

    def c(self, name: str) -> np.ndarray | None:
        return self.g.consts.get(name) if name else None

    def need_const(self, n: Node, k: int, what: str):
        if k >= len(n.inputs) or not n.inputs[k]:
            return None
        v = self.c(n.inputs[k])
        if v is None:
            self.problems.append((n.op, n.name, f"{what} must be a constant"))
        return v

    def run(self, keep_unsupported: bool = False) -> Graph:
        """Rewrite every node; raises UnsupportedOpError listing every node it cannot take, or, with
        ``keep_unsupported`` (``--allow-float``), keeps such a node as the model has it, marked
        ``ISLAND_MARK`` with the reasons, for the quantizer to keep in float."""
        from qcompiler.frontend import outer_scope_inputs

        g = self.g
        out: list[Node] = []
        for n in g.nodes:
            orig = (n.op, list(n.inputs), list(n.outputs), dict(n.attrs))
            before = len(self.problems)
            res = None
            if n.attrs.get("domain"):
                self.problems.append((f"{n.attrs['domain']}.{n.op}", n.name, "custom domain"))
            elif (all(i in g.consts or not i for i in n.inputs) and n.op not in ("Constant",)
                  and not outer_scope_inputs(n.attrs)):  # a Loop / If body reading the graph is not constant
                self._fold_const(n)
                continue
            else:
                fn = getattr(self, "op_" + n.op, None)
                if fn is not None:
                    res = fn(n)
                elif n.op in _KEEP:
                    res = [n]
                elif n.op in _INDEX_OPS:
                    res = self.op_index(n)
                else:
                    self.problems.append((n.op, n.name, ""))
            if keep_unsupported and len(self.problems) > before:
                n.op, n.inputs, n.outputs, n.attrs = orig  # the same object: later renames reach it
                n.attrs[ISLAND_MARK] = "; ".join(p[2] or "no integer form" for p in self.problems[before:])
                del self.problems[before:]
                res = [n]
            out.extend(r for r in (res or []) if r is not None)
        if self.problems:
            raise UnsupportedOpError(self.problems)
        g.nodes = out
        g.toposort()
        g.prune()
        return g

    # ---- constant folding of whatever ORT left (rare) ------------------------------------
    def _fold_const(self, n: Node) -> None:
        from qcompiler.ort_util import session
        import onnx
        from onnx import helper

        inits = [onnx.numpy_helper.from_array(self.g.consts[i], f"c{k}") for k, i in enumerate(n.inputs) if i]
        names = [f"c{k}" if i else "" for k, i in enumerate(n.inputs)]
        attrs = {k: v for k, v in n.attrs.items() if k != "domain"}
        node = helper.make_node(n.op, names, [f"y{k}" for k in range(len(n.outputs))], **attrs)
        def elem(o):  # the output's ONNX type where known (ORT rejects some nodes with an undefined one)
            dt = self.g.dtypes.get(o)
            try:
                return helper.np_dtype_to_tensor_dtype(np.dtype(dt)) if dt else 0
            except TypeError:
                return 0

        outs = [helper.make_tensor_value_info(f"y{k}", elem(o), None) for k, o in enumerate(n.outputs)]
        m = helper.make_model(helper.make_graph([node], "f", [], outs, inits),
                              opset_imports=[helper.make_opsetid("", self.g.opset)])
        vals = session(m).run(None, {})
        for o, v in zip(n.outputs, vals):
            self.g.add_const(o, v)

    # ---- GEMM forms ---------------------------------------------------------------------
    def op_Gemm(self, n: Node):
        a = n.inputs[0]
        W = self.need_const(n, 1, "B")
        if W is None:
            return [n]
        if n.attrs.get("transA", 0):
            self.problems.append(("Gemm", n.name, "transA=1"))
            return [n]
        W = W.astype(np.float64)
        if n.attrs.get("transB", 0):
            W = W.T
        W = W * n.attrs.get("alpha", 1.0)
        bias = None
        if len(n.inputs) > 2 and n.inputs[2]:
            C = self.need_const(n, 2, "C")
            if C is None:
                return [n]
            C = np.broadcast_to(C.astype(np.float64) * n.attrs.get("beta", 1.0), self.g.shape(n.outputs[0]))
            if not np.all(C == C[:1]):
                self.problems.append(("Gemm", n.name, "C varies along rows"))
                return [n]
            bias = C[0]
        return [self._dense(n, a, W, bias)]

    def op_MatMul(self, n: Node):
        W = self.c(n.inputs[1])
        if W is None or W.ndim != 2:
            return [n]  # activation x activation: quantized as MatMul
        return [self._dense(n, n.inputs[0], W.astype(np.float64), None)]

    def _dense(self, n: Node, a: str, W: np.ndarray, bias):
        return Node("Dense", n.name, [a], [n.outputs[0]],
                    {"weight": W.astype(np.float32), "bias": None if bias is None else np.asarray(bias, np.float32)})

    # ---- elementwise forms --------------------------------------------------------------
    def op_Relu(self, n: Node):
        return [Node("Clip", n.name, [n.inputs[0]], n.outputs, {"min": 0.0, "max": float("inf")})]

    def _scalar(self, n: Node, k: int, what: str) -> float | None:
        """A constant operand that holds one value (shape [], [1], [1, 1], ...), as a float."""
        v = self.need_const(n, k, what)
        if v is None:
            return None
        if v.size != 1:
            self.problems.append((n.op, n.name, f"{what} of shape {list(v.shape)} (one value expected)"))
            return None
        return float(np.asarray(v).reshape(-1)[0])

    def op_Clip(self, n: Node):
        lo = self._scalar(n, 1, "min")
        hi = self._scalar(n, 2, "max")
        lo = lo if lo is not None else float(n.attrs.get("min", -np.inf))
        hi = hi if hi is not None else float(n.attrs.get("max", np.inf))
        return [Node("Clip", n.name, [n.inputs[0]], n.outputs, {"min": lo, "max": hi})]

    def op_Pow(self, n: Node):
        if n.inputs[0] in self.g.consts:
            self.problems.append(("Pow", n.name, "constant base with an activation exponent"))
            return [n]
        e = self._scalar(n, 1, "exponent")
        if e is None:
            return [n]
        x = n.inputs[0]
        if e == 1.0:
            return self._alias(n)
        if e == 2.0:
            return [Node("Mul", n.name, [x, x], n.outputs)]
        if e == 0.5:
            return [Node("Sqrt", n.name, [x], n.outputs)]
        return [Node("Pow", n.name, [x, n.inputs[1]], n.outputs)]  # a lookup table of x**e

    def _minmax(self, n: Node):
        """Max/Min of activations and constants: constants become the clamp of the result."""
        if self._int(n.outputs[0]):
            return [n]
        acts = [i for i in n.inputs if i and i not in self.g.consts]
        consts = [self.c(i) for i in n.inputs if i in self.g.consts]
        if any(c.size != 1 for c in consts):
            self.problems.append((n.op, n.name, "a constant operand with more than one value"))
            return [n]
        f = max if n.op == "Max" else min
        c = f(float(np.asarray(v).reshape(-1)[0]) for v in consts) if consts else None
        if len(acts) == 1:
            lo, hi = (c, np.inf) if n.op == "Max" else (-np.inf, c)
            return [Node("Clip", n.name, acts, n.outputs, {"min": lo, "max": hi})]
        if len(acts) > 2:
            self.problems.append((n.op, n.name, f"{len(acts)} activation operands (two at most)"))
            return [n]
        attrs = {}
        if c is not None:
            attrs["act"] = (c, np.inf) if n.op == "Max" else (-np.inf, c)
        return [Node(n.op, n.name, acts, n.outputs, attrs)]

    op_Max = op_Min = _minmax

    def op_LeakyRelu(self, n: Node):
        slope = self.g.add_const(self.g.fresh(n.name + "_slope"), np.float32(n.attrs.get("alpha", 0.01)))
        return [Node("PRelu", n.name, [n.inputs[0], slope], n.outputs)]

    def _expand_activation(self, n: Node) -> list[Node]:
        """An elementwise op of an activation and a constant whose output is larger than the
        activation (x [1, 1, D] * c [1, S, D]): the activation is expanded to the output shape first
        (data movement), so the op is an elementwise affine map.  Rewrites ``n.inputs``; returns the
        nodes that go before ``n``."""
        out_shape = self.g.shape(n.outputs[0])
        acts = [k for k, i in enumerate(n.inputs) if i and i not in self.g.consts]
        if len(acts) != 1 or len(n.inputs) != 2 or self._int(n.outputs[0]):
            return []
        k = acts[0]
        x = n.inputs[k]
        if tuple(self.g.shape(x)) == tuple(out_shape):
            return []
        xe = self.g.fresh(x + "/expand")
        self.g.shapes[xe], self.g.dtypes[xe] = tuple(out_shape), self.g.dtypes[x]
        shape_c = self.g.add_const(self.g.fresh(n.name + "_shape"), np.asarray(out_shape, np.int64))
        pre = self.op_index(Node("Expand", n.name + "/expand", [x, shape_c], [xe]))
        n.inputs = [xe if j == k else i for j, i in enumerate(n.inputs)]
        return pre

    def op_Add(self, n: Node):
        return self._expand_activation(n) + [n]

    def op_Mul(self, n: Node):
        return self._expand_activation(n) + [n]

    def op_Sub(self, n: Node):
        pre = self._expand_activation(n)
        return pre + self._sub(n)

    def _sub(self, n: Node):
        b = self.c(n.inputs[1])
        a = self.c(n.inputs[0])
        if b is None and a is not None:  # c - x -> Add(Mul(x, -1), c); the affine merge fuses the pair
            neg = self.g.fresh(n.outputs[0] + "/neg")
            self.g.shapes[neg] = self.g.shape(n.inputs[1])
            self.g.dtypes[neg] = self.g.dtypes[n.outputs[0]]
            m1 = self.g.add_const(self.g.fresh(n.name + "_m1"), np.asarray(-1, a.dtype))
            return [Node("Mul", n.name + "/neg", [n.inputs[1], m1], [neg]),
                    Node("Add", n.name, [neg, n.inputs[0]], n.outputs)]
        if b is None:
            return [n]
        nb = self.g.add_const(self.g.fresh(n.inputs[1] + "_neg"), (-b).astype(b.dtype))
        return [Node("Add", n.name, [n.inputs[0], nb], n.outputs)]

    def _int(self, t: str) -> bool:
        dt = self.g.dtypes.get(t, "")
        return dt.startswith("int") or dt.startswith("uint")

    def op_Div(self, n: Node):
        pre = self._expand_activation(n)
        b = self.c(n.inputs[1])
        if b is None or self._int(n.outputs[0]):  # integer division stays a division (intops/intdata.py)
            return pre + [n]
        rb = self.g.add_const(self.g.fresh(n.inputs[1] + "_recip"), (1.0 / b.astype(np.float64)).astype(b.dtype))
        return pre + [Node("Mul", n.name, [n.inputs[0], rb], n.outputs)]

    def op_Neg(self, n: Node):
        if self._int(n.outputs[0]):
            return [n]
        m1 = self.g.add_const(self.g.fresh(n.name + "_m1"), np.float32(-1))
        return [Node("Mul", n.name, [n.inputs[0], m1], n.outputs)]

    def _alias(self, n: Node):
        """Remove an identity-like node: its output becomes its input."""
        src, dst = n.inputs[0], n.outputs[0]
        if dst in self.g.outputs:
            return [Node("Reshape", n.name, [src], [dst], {"shape": self.g.shape(dst)})]
        self.g.rename_tensor(dst, src)
        return []

    def op_Identity(self, n):
        return self._alias(n)

    def op_Dropout(self, n):
        return self._alias(n)

    def op_Cast(self, n: Node):
        src, dst = self.g.dtypes.get(n.inputs[0], ""), self.g.dtypes.get(n.outputs[0], "")
        if src == dst or (src.startswith("float") and dst.startswith("float")):
            return self._alias(n)
        if (src.startswith("int") or src.startswith("uint") or src == "bool") and dst.startswith("float"):
            return [Node("Cast", n.name, n.inputs[:1], n.outputs, {"to": dst})]  # integer data (masks) -> quantizer
        if (src.startswith("int") or src.startswith("uint") or src == "bool") and \
                (dst.startswith("int") or dst.startswith("uint")):  # integer data: exact (intops/intdata.py)
            return [Node("Cast", n.name, n.inputs[:1], n.outputs, {"to": dst})]
        self.problems.append(("Cast", n.name, f"{self.g.dtypes.get(n.inputs[0])} -> {self.g.dtypes.get(n.outputs[0])}"))
        return [n]

    # ---- shapes -------------------------------------------------------------------------
    def _reshape(self, n: Node):
        return [Node("Reshape", n.name, [n.inputs[0]], [n.outputs[0]], {"shape": tuple(self.g.shape(n.outputs[0]))})]

    op_Flatten = op_Squeeze = op_Unsqueeze = op_Reshape = _reshape

    def op_Transpose(self, n: Node):
        rank = len(self.g.shape(n.inputs[0]))
        perm = n.attrs.get("perm") or list(range(rank))[::-1]
        return [Node("Transpose", n.name, n.inputs[:1], n.outputs, {"perm": tuple(int(p) for p in perm)})]

    def op_Concat(self, n: Node):
        rank = len(self.g.shape(n.outputs[0]))
        return [Node("Concat", n.name, [i for i in n.inputs if i], n.outputs,
                     {"axis": _norm_axis(int(n.attrs["axis"]), rank)})]

    def op_Softmax(self, n: Node):
        rank = len(self.g.shape(n.outputs[0]))
        axis = _norm_axis(int(n.attrs.get("axis", -1)), rank)
        if axis != rank - 1:
            # opset < 13 semantics were converted by the upgrade; a non-last axis is fine too
            pass
        return [Node("Softmax", n.name, n.inputs[:1], n.outputs, {"axis": axis})]

    def op_LogSoftmax(self, n: Node):
        rank = len(self.g.shape(n.outputs[0]))
        return [Node("LogSoftmax", n.name, n.inputs[:1], n.outputs, {"axis": _norm_axis(int(n.attrs.get("axis", -1)), rank)})]

    def _arg(self, n: Node):
        rank = len(self.g.shape(n.inputs[0]))
        return [Node(n.op, n.name, n.inputs[:1], n.outputs,
                     {"axis": _norm_axis(int(n.attrs.get("axis", 0)), rank), "keepdims": int(n.attrs.get("keepdims", 1)),
                      "select_last_index": int(n.attrs.get("select_last_index", 0))})]

    op_ArgMax = op_ArgMin = _arg

    def op_TopK(self, n: Node):
        k = self._scalar(n, 1, "K")
        if k is None:
            return [n]
        rank = len(self.g.shape(n.inputs[0]))
        return [Node("TopK", n.name, n.inputs[:1], list(n.outputs),
                     {"k": int(k), "axis": _norm_axis(int(n.attrs.get("axis", -1)), rank),
                      "largest": int(n.attrs.get("largest", 1)), "sorted": int(n.attrs.get("sorted", 1))})]

    def op_Slice(self, n: Node):
        shape = self.g.shape(n.inputs[0])
        starts = self.need_const(n, 1, "starts")
        ends = self.need_const(n, 2, "ends")
        if starts is None or ends is None:
            return [n]
        axes = self.need_const(n, 3, "axes")
        steps = self.need_const(n, 4, "steps")
        axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
        steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
        rank = len(shape)
        S, E, A, P = [], [], [], []
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            ax = _norm_axis(ax, rank)
            s = slice(int(max(min(st, 2**62), -2**62)), int(max(min(en, 2**62), -2**62)), sp)
            st2, en2, sp2 = s.indices(shape[ax])
            S.append(st2)
            E.append(en2 if en2 >= 0 else None)
            A.append(ax)
            P.append(sp2)
        return [Node("Slice", n.name, n.inputs[:1], n.outputs, {"starts": S, "ends": E, "axes": A, "steps": P})]

    def op_Split(self, n: Node):
        shape = self.g.shape(n.inputs[0])
        axis = _norm_axis(int(n.attrs.get("axis", 0)), len(shape))
        sizes = [self.g.shape(o)[axis] for o in n.outputs]
        res, start = [], 0
        for o, sz in zip(n.outputs, sizes):
            res.append(Node("Slice", f"{n.name}/{o}", n.inputs[:1], [o],
                            {"starts": [start], "ends": [start + sz], "axes": [axis], "steps": [1]}))
            start += sz
        return res

    def op_Gather(self, n: Node):
        idx = self.c(n.inputs[1])
        rank = len(self.g.shape(n.inputs[0]))
        axis = _norm_axis(int(n.attrs.get("axis", 0)), rank)
        if idx is None:
            table = self.c(n.inputs[0])
            if table is not None and axis == 0 and table.dtype.kind == "f":  # embedding lookup
                return [Node("Embedding", n.name, n.inputs[1:2], n.outputs, {"table": table})]
            return [n]
        idx = np.where(idx < 0, idx + self.g.shape(n.inputs[0])[axis], idx).astype(np.int64)
        return [Node("Gather", n.name, n.inputs[:1], n.outputs, {"indices": idx, "axis": axis})]

    def op_Pad(self, n: Node):
        mode = n.attrs.get("mode", "constant")
        if mode != "constant":
            return self.op_index(n)
        pads = self.need_const(n, 1, "pads")
        if pads is None:
            return [n]
        value = self.need_const(n, 2, "constant_value")
        axes = self.need_const(n, 3, "axes")
        rank = len(self.g.shape(n.inputs[0]))
        pads = [int(p) for p in pads]
        if axes is not None:
            full = [0] * (2 * rank)
            axes = [_norm_axis(int(a), rank) for a in axes]
            for k, a in enumerate(axes):
                full[a], full[a + rank] = pads[k], pads[k + len(axes)]
            pads = full
        if any(p < 0 for p in pads):
            return self.op_index(n)
        return [Node("Pad", n.name, n.inputs[:1], n.outputs,
                     {"pads": pads, "value": 0.0 if value is None else float(value)})]

    # ---- pooling and reductions ----------------------------------------------------------
    def _pool_attrs(self, n: Node) -> dict:
        in_shape, out_shape = self.g.shape(n.inputs[0]), self.g.shape(n.outputs[0])
        if len(in_shape) != 4:
            self.problems.append((n.op, n.name, f"{len(in_shape) - 2}-D pooling (2-D only)"))
            return {}
        k = list(n.attrs["kernel_shape"])
        s = list(n.attrs.get("strides", [1, 1]))
        d = list(n.attrs.get("dilations", [1, 1]))
        auto = n.attrs.get("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0, 0, 0, 0]
            for ax in range(2):
                total = max((out_shape[2 + ax] - 1) * s[ax] + d[ax] * (k[ax] - 1) + 1 - in_shape[2 + ax], 0)
                lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
                pads[ax], pads[ax + 2] = lo, total - lo
        else:
            pads = list(n.attrs.get("pads", [0, 0, 0, 0]))
        # ceil_mode (or anything else) -> extend bottom/right so the floor formula gives ONNX's size
        for ax in range(2):
            while (in_shape[2 + ax] + pads[ax] + pads[ax + 2] - d[ax] * (k[ax] - 1) - 1) // s[ax] + 1 < out_shape[2 + ax]:
                pads[ax + 2] += 1
        return {"kernel": tuple(k), "strides": tuple(s), "dilations": tuple(d), "pads": tuple(pads)}

    def op_MaxPool(self, n: Node):
        if len(n.outputs) > 1 and n.outputs[1]:
            self.problems.append(("MaxPool", n.name, "Indices output"))
        return [Node("MaxPool", n.name, n.inputs[:1], n.outputs[:1], self._pool_attrs(n))]

    def op_AveragePool(self, n: Node):
        a = self._pool_attrs(n)
        if a:
            a["count"] = self._avg_divisors(n, a)
        return [Node("AveragePool", n.name, n.inputs[:1], n.outputs, a)]

    def _avg_divisors(self, n: Node, a: dict) -> np.ndarray:
        """Per-output-position divisor of ONNX AveragePool: (taps inside the zero-padded window) /
        AveragePool(ones), evaluated by the reference executor for the node's exact attributes."""
        from qcompiler.intops.pool import SumPoolOp

        _, _, h, w = self.g.shape(n.inputs[0])
        ones = np.ones((1, 1, h, w), np.float32)
        from qcompiler.ort_util import session
        from onnx import helper

        attrs = {k: v for k, v in n.attrs.items() if k != "domain"}
        node = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
        m = helper.make_model(helper.make_graph([node], "p", [helper.make_tensor_value_info("x", 1, [1, 1, h, w])],
                                                [helper.make_tensor_value_info("y", 1, None)]),
                              opset_imports=[helper.make_opsetid("", 17)])
        avg = session(m).run(["y"], {"x": ones})[0][0, 0].astype(np.float64)
        taps = SumPoolOp.reference(np.ones((1, 1, h, w), np.int8), a)[0, 0].astype(np.float64)
        return np.round(taps / avg).astype(np.int64)

    def op_GlobalAveragePool(self, n: Node):
        rank = len(self.g.shape(n.inputs[0]))
        return [Node("ReduceMean", n.name, n.inputs[:1], n.outputs, {"axes": tuple(range(2, rank)), "keepdims": 1})]

    def op_GlobalMaxPool(self, n: Node):
        rank = len(self.g.shape(n.inputs[0]))
        return [Node("ReduceMax", n.name, n.inputs[:1], n.outputs, {"axes": tuple(range(2, rank)), "keepdims": 1})]

    def _reduce(self, n: Node):
        rank = len(self.g.shape(n.inputs[0]))
        axes = n.attrs.get("axes")
        if axes is None and len(n.inputs) > 1 and n.inputs[1]:
            axes = self.need_const(n, 1, "axes")
        if axes is None or len(axes) == 0:
            if n.attrs.get("noop_with_empty_axes", 0):
                return self._alias(n)
            axes = list(range(rank))
        axes = tuple(sorted(_norm_axis(int(a), rank) for a in axes))
        return [Node(n.op, n.name, n.inputs[:1], n.outputs, {"axes": axes, "keepdims": int(n.attrs.get("keepdims", 1))})]

    op_ReduceMean = op_ReduceSum = op_ReduceMax = _reduce

    def op_index(self, n: Node):
        """Pure data movement with constant parameters -> Gather along a flat index map."""
        if n.op in ("Resize", "Upsample") and n.attrs.get("mode", "nearest") != "nearest":
            return self._resample(n)
        if n.op in ("GatherND", "GatherElements") and n.inputs[1] not in self.g.consts:
            return [n]  # indices computed at run time (qcompiler/intops/indexed.py)
        for i in n.inputs[1:]:
            if i and i not in self.g.consts:
                self.problems.append((n.op, n.name, "non-constant parameters"))
                return [n]
        try:
            idx = index_map(n, self.g.shape(n.inputs[0]), self.g.consts)
        except ValueError as e:
            self.problems.append((n.op, n.name, str(e)))
            return [n]
        flat = self.g.fresh(n.inputs[0] + "/flat")
        self.g.shapes[flat] = (int(np.prod(self.g.shape(n.inputs[0]))),)
        self.g.dtypes[flat] = self.g.dtypes[n.inputs[0]]
        return [Node("Reshape", n.name + "/flatten", n.inputs[:1], [flat], {"shape": self.g.shapes[flat]}),
                Node("Gather", n.name, [flat], n.outputs, {"indices": idx, "axis": 0})]


    # ---- linear resampling and transposed convolution (qcompiler/intops/resample.py) ----------------
    def _resample(self, n: Node):
        """Resize (linear / cubic) -> Resample(axes, per-axis taps) from onnxruntime's own rule."""
        from .resize_maps import resize_maps

        for i in n.inputs[1:]:
            if i and i not in self.g.consts:
                self.problems.append((n.op, n.name, "non-constant parameters"))
                return [n]
        try:
            axes, idx, w = resize_maps(n, self.g.shape(n.inputs[0]), self.g.shape(n.outputs[0]), self.g.consts)
        except ValueError as e:
            self.problems.append((n.op, n.name, str(e)))
            return [n]
        if not axes:
            return self._alias(n)
        return [Node("Resample", n.name, n.inputs[:1], n.outputs, {"axes": axes, "idx": idx, "w": w})]

    def op_ConvTranspose(self, n: Node):
        """ConvTranspose -> GatherFill per spatial axis (zero insertion + padding) -> Conv (stride 1)."""
        W = self.need_const(n, 1, "weights")
        if W is None:
            return [n]
        if len(n.inputs) > 2 and n.inputs[2] and self.need_const(n, 2, "bias") is None:
            return [n]
        x = n.inputs[0]
        in_shape, out_shape = self.g.shape(x), self.g.shape(n.outputs[0])
        nd = len(in_shape) - 2
        if nd not in (1, 2):
            self.problems.append(("ConvTranspose", n.name, f"{nd}-D (1-D and 2-D only)"))
            return [n]
        a = n.attrs
        k = list(W.shape[2:])
        s = list(a.get("strides", [1] * nd))
        d = list(a.get("dilations", [1] * nd))
        op_ = list(a.get("output_padding", [0] * nd))
        group = int(a.get("group", 1))
        pads = list(a.get("pads", [0] * (2 * nd)))
        auto = a.get("auto_pad", "NOTSET")
        nodes, cur, shape = [], x, list(in_shape)
        for ax in range(nd):
            H, full = in_shape[2 + ax], (in_shape[2 + ax] - 1) * s[ax] + d[ax] * (k[ax] - 1) + 1 + op_[ax]
            total = full - out_shape[2 + ax]
            if auto in ("SAME_UPPER", "SAME_LOWER") or "output_shape" in a:
                lo = total // 2 if auto != "SAME_LOWER" else total - total // 2
                pads[ax], pads[ax + nd] = lo, total - lo
            pb, pe = pads[ax], pads[ax + nd]
            if full - pb - pe != out_shape[2 + ax]:
                self.problems.append(("ConvTranspose", n.name, "output size does not follow from the attributes"))
                return [n]
            left, right = d[ax] * (k[ax] - 1) - pb, d[ax] * (k[ax] - 1) - pe + op_[ax]
            L_ = (H - 1) * s[ax] + 1 + left + right
            src = np.arange(L_) - left
            idx = np.where((src >= 0) & (src % s[ax] == 0) & (src // s[ax] < H), src // s[ax], -1).astype(np.int64)
            if np.array_equal(idx, np.arange(H)):
                continue
            shape[2 + ax] = L_
            t = self.g.fresh(f"{n.outputs[0]}/spread{ax}")
            self.g.shapes[t], self.g.dtypes[t] = tuple(shape), self.g.dtypes[x]
            nodes.append(Node("GatherFill", f"{n.name}/spread{ax}", [cur], [t], {"axis": 2 + ax, "indices": idx}))
            cur = t
        Cin, Cog = W.shape[0], W.shape[1]
        Wt = W.reshape((group, Cin // group, Cog) + tuple(k))
        Wc = np.swapaxes(Wt, 1, 2).reshape((group * Cog, Cin // group) + tuple(k))
        Wc = np.flip(Wc, axis=tuple(range(2, 2 + nd))).copy()
        wname = self.g.add_const(self.g.fresh(n.name + "_conv_weight"), Wc.astype(W.dtype))
        ins = [cur, wname] + ([n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] else [])
        attrs = {"strides": [1] * nd, "dilations": d, "pads": [0] * (2 * nd), "group": group, "kernel_shape": k}
        if group == 1 and k == s and d == [1] * nd and not any(pads) and not any(op_) and k != [1] * nd:
            attrs[SUBPIXEL] = (tuple(s), x)  # no overlap: a 1x1 conv + pixel shuffle (passes/subpixel_deconv.py)
        nodes.append(Node("Conv", n.name, ins, n.outputs, attrs))
        return nodes


def canonicalize(g: Graph, keep_unsupported: bool = False) -> Graph:
    """Run the rewrites on a copy of ``g``; raises UnsupportedOpError listing every unsupported op
    (``keep_unsupported``: marks them as float islands instead, see ``Canonicalizer.run``)."""
    return Canonicalizer(g.copy()).run(keep_unsupported)
