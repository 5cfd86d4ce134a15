"""Quantize: float graph + calibration ranges -> integer-only graph (HAWQ-V3 dyadic arithmetic).

Walks the canonical float graph in order; one rule per float op type emits integer ops
(``qcompiler.reference`` defines their exact semantics) and decides the QParams of what it
produces.  Requantizing rules (Conv, Dense, Add, pools, ...) take their output scale from the
calibrated range of the ONNX tensor they produce; data-movement rules (Reshape, MaxPool, Slice,
...) pass their input's QParams through unchanged, so no rounding is spent on them.

Every emitted node records the scales of its integer inputs (``in_scales``) and of its output
(``out_scale``) as the rule saw them; ``verify_scales`` checks each consumer against the QParams
its producer declared, which is the check whose absence let I-ViT's softmax output be off 256x.

The rules live with the integer ops they emit, one module per op family in ``qcompiler/intops/``
(gemm: Conv, Dense, MatMul; elementwise: Add, Mul, Affine, Clip, PRelu, HardSigmoid, HardSwish,
unary lookup tables; pool: pools, reductions; softmax; nonlinear: LayerNorm, GELU; transformer:
Cast, MaskAdd, Embedding, Div; shape: data movement, Concat), registered with ``intops.rule``.

Float islands (``QuantConfig.allow_float``, ``qc compile --allow-float``): a node without an integer
form -- its op has no rule, its rule's check refuses it, or canonicalization marked it -- is kept
in float instead of failing: dequantize -> the ONNX node -> quantize (``qcompiler/intops/island.py``).
Strict integer-only stays the default, and its error names the flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from qcompiler.calibrate import TensorStats, clip_range
from qcompiler.errors import QuantizationError, UnsupportedOpError
from qcompiler.graph import Graph, Node
from qcompiler.intops import CHECKS, RULES
from qcompiler.intops.intdata import int_data_rule, is_int_data
from qcompiler.intops import island as _island
from qcompiler.qtypes import QParams, activation_qparams, int_range

from .auto_wide import calib_shape, head_layers, small_tensor
from .shared_steps import role


@dataclass(frozen=True)
class QuantConfig:
    method: str = "percentile"      # activation range: minmax | percentile | mse
    percentile: float = 99.999
    bits: int = 8                   # activation bits
    weight_bits: int = 8
    io: str = "float"               # float: quantize/dequantize inside the library; int: integer I/O
    softmax: str = "iexp"           # iexp (I-BERT polynomial) | shift (I-ViT Shiftmax)
    softmax_out_bits: int = 8       # bits of a softmax consumed inside the graph
    wide_bits: int = 16             # activations no 8-bit op consumes (residual stream, LN/GELU/softmax
                                    # inputs): this many bits; 0 keeps every activation at ``bits``
    gelu: str = "igelu"             # igelu (I-BERT polynomial erf) | shift (I-ViT ShiftGELU) | lut (8-bit table)
    output_bits: int = 16           # bits of a softmax/LUT that is a graph output
    allow_float: bool = False       # keep nodes without an integer form in float islands (--allow-float)
    # per-layer precision (mixed precision, qcompiler/mixed/): (node name, weight bits, activation
    # bits) of the Conv/Dense layers that differ from (weight_bits, bits); activation bits 16 make
    # the layer's input tensor int16 (W8A16) where its producer can emit it (``wide_ok``)
    plan: tuple = ()
    # weight rounding (qcompiler/mixed/gptq.py): auto = GPTQ for sub-8-bit weights, round to nearest
    # for 8-bit; gptq = GPTQ for 4- and 8-bit weights; rtn = round to nearest everywhere
    rounding: str = "auto"
    # node name -> per-group Hessians of the layer's inputs (qcompiler/mixed/gptq.py HessianStore);
    # a layer without one is rounded to nearest
    hessians: object = field(default=None, compare=False, repr=False)
    # W8A16 where the calibration statistics show that an 8-bit input adds more than this relative
    # noise to a Conv/Dense layer's output channels (passes/auto_wide.py REL_NOISE); 0 = off;
    # explicit plan entries are kept
    auto_wide: float = 0.1
    # int16 gates, gate pre-activations and cell states inside unrolled recurrences (RECURRENT_WIDE)
    recurrent_wide: bool = True
    # the target has W8A16 GEMM kernels (qcompiler/kernels/backends takes_a16): a network's head takes
    # 16-bit inputs whatever its noise (passes/auto_wide.py head_layers) only then
    head_a16: bool = True
    # tensor -> shape at the calibration shapes (qcompiler/driver.py prepare): the size-dependent
    # choices (a network's head, small tensors: passes/auto_wide.py calib_shape) are taken at these
    # shapes in every trace of a symbolic dim; None: the graph's own shapes
    calib_shapes: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.method not in ("minmax", "percentile", "mse"):
            raise ValueError(f"unknown calibration method {self.method}")
        if self.io not in ("float", "int"):
            raise ValueError(f"io must be 'float' or 'int', not {self.io}")
        if self.softmax not in ("iexp", "shift"):
            raise ValueError(f"softmax must be 'iexp' or 'shift', not {self.softmax}")
        if self.gelu not in ("igelu", "shift", "lut"):
            raise ValueError(f"gelu must be 'igelu', 'shift' or 'lut', not {self.gelu}")
        if not 2 <= self.bits <= 8 or not 2 <= self.weight_bits <= 8:
            raise ValueError("bits must be in 2..8")
        if not self.auto_wide >= 0:
            raise ValueError(f"auto_wide must be a relative noise >= 0 (0: off), not {self.auto_wide}")
        if self.rounding not in ("auto", "gptq", "rtn"):
            raise ValueError(f"rounding must be 'auto', 'gptq' or 'rtn', not {self.rounding}")
        for entry in self.plan:
            name, wb, ab = entry
            if not (2 <= int(wb) <= 8 or int(wb) == 16) or int(ab) not in (self.bits, 16):
                raise ValueError(f"plan entry {entry}: weight bits in 2..8 or 16, activation bits {self.bits} or 16")

    def layer_bits(self, name: str) -> tuple[int, int]:
        """(weight bits, activation bits) of the Conv/Dense node ``name``."""
        for n, wb, ab in self.plan:
            if n == name:
                return int(wb), int(ab)
        return self.weight_bits, self.bits

    def hessian(self, name: str, weight_bits: int):
        """Per-group Hessians of layer ``name`` (``weight_bits`` wide) for GPTQ rounding, or None
        (round to nearest)."""
        if self.hessians is None or weight_bits > 8 or self.rounding == "rtn":
            return None
        if weight_bits == 8 and self.rounding != "gptq":
            return None
        return self.hessians.get(name)


SMALL_HEADROOM = 4.0
"""Range factor of a 16-bit tensor of at most ``passes.auto_wide.SMALL_INPUT`` elements per sample (a
classifier's head, its logits): a few calibration samples bound such a tensor poorly (orinet: a
held-out page's head activations past the calibrated maximum, saturated, its logits off by 100%),
and 16 bits keep 14 of their bits for the calibrated range at 4x.  Not inside a recurrence's step
(``passes/shared_steps.py`` ``role``): its gates and states are bounded and round the loop at the
state's resolution (a headroom there cost madmom-beats-blstm fidelity)."""
# ops whose integer forms take 16-bit inputs as cheaply as 8-bit ones (int64 arithmetic inside)
WIDE_CONSUMERS = {"Affine", "Add", "Sub", "Mul", "Where", "Log", "LayerNorm", "LayerNormalization", "Gelu", "MaskAdd", "Softmax", "Div",
                  "ReduceSum", "ReduceMean"}

PASSTHROUGH = {"Reshape", "Transpose", "Slice", "Gather", "Pad"}
SMALL_TABLE_INPUT = 4096
"""Elements per sample up to which a unary table takes a 16-bit input (``Quantizer._small_table``)."""
# elementwise ops whose integer form takes a 16-bit input as cheaply as an 8-bit one (int64 steps, the
# hard-swish product |x*h| <= 2^29) and whose output is 16-bit exactly when its consumers take it: a
# 16-bit output is only useful behind a 16-bit input, so their input is wide when their output is
FOLLOW_WIDE = {"HardSwish", "HardSigmoid", "Clip", "PRelu"}

# inside a time step of an unrolled LSTM / GRU (passes/unroll_recurrent.py), after TFLite's integer LSTM:
# the gate pre-activations, gates, cell state and their products are int16 wherever their consumers
# are these ops (int64 products; Sigmoid / Tanh of a 16-bit input: interpolated 513-knot tables,
# qcompiler/intops/interp_table.py), so the state that carries over the steps is not rounded to 8 bits
# each step; the hidden state stays 8-bit where an 8-bit GEMM reads it (the recurrent MatMul)
RECURRENT_WIDE = {"Mul", "Sigmoid", "Tanh"}


def unsupported(fg: Graph) -> list[tuple[str, str, str]]:
    """Every (op, node, why) the quantizer cannot handle, found before any work is done."""
    bad = []
    for n in fg.nodes:
        if is_int_data(fg, n):
            continue
        if n.op not in RULES:
            bad.append((n.op, n.name, ""))
            continue
        chk = CHECKS.get(n.op)
        why = chk(fg, n) if chk else None
        if why:
            bad.append((n.op, n.name, why))
    for t in fg.inputs:
        dt = fg.dtypes.get(t, "")
        if not (dt.startswith("float") or dt.startswith("int") or dt.startswith("uint") or dt == "bool"):
            bad.append(("input", t, f"dtype {dt}"))
    return bad


FLOAT_HINT = "or compile with --allow-float to keep them in float"


def unsupported_error(items: list[tuple[str, str, str]], hint: bool = True) -> UnsupportedOpError:
    """The one-line UnsupportedOpError of ``items``; ``hint`` names ``--allow-float`` as a way out."""
    e = UnsupportedOpError(items)
    msg = str(e)
    if hint and FLOAT_HINT not in msg:
        msg = msg[:-1] + ", " + FLOAT_HINT + ")" if msg.endswith(")") else f"{msg} ({FLOAT_HINT})"
        e.args = (msg,)
    return e


def plan_islands(fg: Graph, bad: list[tuple[str, str, str]], onnx_model=None
                 ) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Split the unsupported items of ``fg`` into float islands (node name -> why it has no integer
    form) and what cannot be kept in float either (not an ONNX node, an unknown dtype, ...).
    Nodes canonicalization marked (``island.MARK``) are islands too."""
    protos, opsets = _island.onnx_nodes(onnx_model), _island.model_opsets(onnx_model)
    by_name = {n.name: n for n in fg.nodes}
    islands: dict[str, str] = {}
    rest = []
    for n in fg.nodes:
        if _island.MARK in n.attrs:
            islands[n.name] = str(n.attrs[_island.MARK])
    for op, name, why in bad:
        n = by_name.get(name)
        if n is None or op == "input":
            rest.append((op, name, why))
            continue
        if name in islands:
            continue
        problem = _island.island_problem(fg, n, protos, opsets)
        if problem is None:
            islands[name] = why or "no integer form"
        else:
            rest.append((op, name, (f"{why}; " if why else "") + f"cannot be kept in float: {problem}"))
    for name in list(islands):
        problem = _island.island_problem(fg, by_name[name], protos, opsets)
        if problem is not None:
            rest.append((by_name[name].op, name, f"{islands.pop(name)}; cannot be kept in float: {problem}"))
    return islands, rest


class Quantizer:
    def __init__(self, fg: Graph, stats: dict[str, TensorStats], nonneg: set[str], cfg: QuantConfig,
                 onnx_model=None, islands: dict[str, str] | None = None, heads: set[str] = frozenset()):
        self.fg, self.stats, self.nonneg, self.cfg = fg, stats, nonneg, cfg
        self.ig = Graph(nodes=[], inputs=list(fg.inputs), outputs=[], shapes={}, dtypes={}, name=fg.name)
        self.int_name: dict[str, str] = {}   # float tensor -> integer tensor
        self.consumers = fg.consumers()
        self._tail: set[str] | None = None   # tensors past the last GEMM (``_tail_tensors``)
        self._heads = set(heads)              # the head layers (passes/auto_wide.py head_layers)
        # Affine output -> (its input, scale, offset, act) where the Affine is folded into the
        # per-channel tables of its consumers (qcompiler/intops/tables.py)
        self.folded_affine: dict[str, tuple] = {}
        # float islands (--allow-float): node name -> why it has no integer form; the ONNX model's
        # nodes give each island its original attributes and opsets
        self.islands: dict[str, str] = dict(islands or {})
        self.onnx_nodes = _island.onnx_nodes(onnx_model)
        self.opsets = _island.model_opsets(onnx_model)

    # ---- tensor bookkeeping ---------------------------------------------------------------
    def qp(self, float_name: str) -> QParams:
        return self.ig.qparams[self.int_name[float_name]]

    def iname(self, float_name: str) -> str:
        if float_name not in self.int_name:
            raise QuantizationError(f"tensor '{float_name}' is used before it is quantized (is it a constant "
                                    "operand where an activation is expected?)")
        return self.int_name[float_name]

    def quantized_const(self, name: str, qp: QParams) -> str:
        """Float constant ``name`` of the float graph as an integer constant at ``qp``
        (clip(round(c / S))): a class token, a constant initial state, a scatter's zero tensor."""
        c = np.clip(np.round(np.asarray(self.fg.consts[name], np.float64) / qp.scale), qp.qmin, qp.qmax)
        q = self.fresh(f"{name}/q")
        self.ig.add_const(q, c.astype(qp.dtype))
        self.ig.qparams[q] = qp
        return q

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.ig.shapes:
            k += 1
            name = f"{base}_{k}"
        return name

    def out_qparams(self, float_name: str, bits: int | None = None, nonneg: bool | None = None) -> QParams:
        """QParams from the calibrated range of ``float_name`` (unsigned only when provably >= 0)."""
        st = self.stats.get(float_name)
        if st is None:
            raise QuantizationError(f"no calibration range for tensor '{float_name}'")
        wide = bits is None and self.cfg.wide_bits and self.wide_ok(float_name)
        if wide:
            bits = self.cfg.wide_bits  # nothing downstream needs 8 bits (qcompiler/intops/transformer.py)
        nn = (float_name in self.nonneg) if nonneg is None else nonneg
        if wide and nonneg is None:
            nn = False  # int16, never uint16: every kernel epilogue and op takes int16
        b = bits or self.cfg.bits
        # 16 bits have the resolution to keep the whole range: clipping only cuts real outliers
        lo, hi = clip_range(st, nn, "minmax" if b >= 16 else self.cfg.method, self.cfg.percentile, b)
        if b >= 16 and role(float_name) is None and self._head_tensor(float_name):
            lo, hi = lo * SMALL_HEADROOM, hi * SMALL_HEADROOM  # (SMALL_HEADROOM)
        return activation_qparams(lo, hi, nn, bits or self.cfg.bits)

    def _constant_output(self, o: str) -> None:
        """A graph output that is a constant: integer data as it is, a float one on a 16-bit grid
        (dequantized at the exit like any output)."""
        c = np.asarray(self.fg.consts[o])
        if c.dtype.kind in "iub":
            q = self.fresh(f"{o}/const")
            self.ig.add_const(q, c)
            self.int_name[o] = q
            return
        lo, hi = (float(c.min()), float(c.max())) if c.size else (0.0, 0.0)
        self.int_name[o] = self.quantized_const(o, activation_qparams(min(lo, 0.0), max(hi, 0.0), False, 16))

    def wide_ok(self, float_name: str) -> bool:
        """Whether ``float_name`` may be int16: every consumer is an elementwise / normalization /
        reduction op that takes 16-bit inputs (the 8-bit GEMM kernels and tables need int8, so a
        tensor that feeds any Conv/Dense/MatMul or lookup table stays 8-bit), except: a W8A16 layer of
        the plan, a hard activation whose own output is wide and feeds such a layer (``FOLLOW_WIDE``), Log and the
        tables that make a graph output (65536-entry tables, ``qcompiler/intops/elementwise.py``)."""
        if self.cfg.bits >= 16:
            return False
        users = self.consumers.get(float_name, [])
        if not users and float_name not in self.fg.outputs:
            return False
        in_step = self.cfg.recurrent_wide and role(float_name) is not None
        for u in users:
            if u.op in PASSTHROUGH:  # data movement keeps the dtype: look at its consumers
                if u.inputs[0] != float_name or not self.wide_ok(u.outputs[0]):
                    return False
            elif u.op == "Concat":  # its inputs take the output's dtype (requantized into one scale)
                if not self.wide_ok(u.outputs[0]):
                    return False
            elif u.op in FOLLOW_WIDE and u.name not in self.islands:
                if u.inputs[0] != float_name or not self._feeds_a16(u.outputs[0]) or not self.wide_ok(u.outputs[0]):
                    return False
            elif u.name not in self.islands and u.inputs[0] == float_name and self._output_table(u):
                continue  # a table making a graph output: 16-bit input, 65536 entries (intops/elementwise.py)
            elif u.name not in self.islands and u.inputs[0] == float_name and self._small_table(u):
                continue  # a table of a small tensor (a spectrum's power before its Sqrt): 65536 entries
            elif u.name in self.islands:  # dequantized to float: 16 bits cost nothing there
                continue
            elif u.op in ("Conv", "Dense") and u.inputs[0] == float_name and self.cfg.layer_bits(u.name)[1] >= 16:
                continue  # a W8A16 layer of the plan (qcompiler/mixed/)
            elif in_step and u.op in RECURRENT_WIDE and (u.op == "Mul" or u.inputs[0] == float_name):
                continue  # a gate / cell-state op of an unrolled recurrence (RECURRENT_WIDE)
            elif u.op not in WIDE_CONSUMERS or (u.op == "Gelu" and self.cfg.gelu == "lut"):
                return False
        return True

    def _feeds_a16(self, t: str, depth: int = 0) -> bool:
        """Whether ``t`` feeds (through data movement) a W8A16 layer of the plan: only there does a hard
        activation take a 16-bit input (elsewhere its 8-bit input was measured as good, and a residual
        stream's 16 bits do not need it: ppocrv4-det moved either way by sample)."""
        for u in self.consumers.get(t, []):
            if u.op in PASSTHROUGH and u.inputs[0] == t and depth < 16:
                if self._feeds_a16(u.outputs[0], depth + 1):
                    return True
            elif u.op in ("Conv", "Dense") and u.inputs[0] == t and self.cfg.layer_bits(u.name)[1] >= 16:
                return True
        return False

    def _output_table(self, u: Node) -> bool:
        """Whether ``u`` is a unary table whose output only reaches graph outputs (through data movement):
        a detector's score sigmoids, whose tails an 8-bit input step would leave a few codes."""
        from qcompiler.intops.elementwise import unary_lut

        if RULES.get(u.op) is not unary_lut or any(i in self.fg.consts for i in u.inputs[:1]):
            return False
        t, seen = u.outputs[0], 0
        while t not in self.fg.outputs:
            users = self.consumers.get(t, [])
            if len(users) != 1 or users[0].op not in PASSTHROUGH or users[0].inputs[0] != t or seen > 16:
                return False
            t, seen = users[0].outputs[0], seen + 1
        return len(self.consumers.get(t, [])) == 0

    def _head_tensor(self, t: str) -> bool:
        """Whether ``t`` is a small tensor of a network's head (``SMALL_HEADROOM``): at most
        ``SMALL_INPUT`` elements, and read by a head layer (``_feeds_head``) or past the
        last GEMM on the way to an output (a classifier's pooled features and hidden layer, its logits before and
        after a softmax / sigmoid), where a held-out sample's values most often leave the range a
        few calibration samples saw."""
        if not self.cfg.auto_wide or not small_tensor(self.fg, t, self.cfg):
            return False   # (part of the automatic widening: off with it, and in a loop's body)
        if self._tail is None:
            self._tail = _tail_tensors(self.fg)
        return t in self._tail or self._feeds_head(t)

    def _feeds_head(self, t: str, depth: int = 0) -> bool:
        """Whether ``t`` is the input of a head layer (``passes/auto_wide.py`` ``head_layers``), or
        reaches one through ops of one activation input (reshapes, an Affine, an activation; at most
        4).  (Not the 16-bit input of a layer widened for its noise: that one needs the resolution.)"""
        for u in self.consumers.get(t, []):
            if u.op in ("Conv", "Dense") and u.inputs[0] == t and u.name in self._heads:
                return True
            acts = [i for i in u.inputs if i not in self.fg.consts]
            if depth < 4 and u.op not in ("Conv", "Dense", "MatMul") and acts == [t] and self._feeds_head(u.outputs[0], depth + 1):
                return True
        return False

    def _small_table(self, u: Node) -> bool:
        """Whether ``u`` is a unary table of a small tensor: at most ``SMALL_TABLE_INPUT`` elements per
        sample (a short audio frame's power spectrum, a per-channel variance).  Such inputs are
        sums of squares spanning decades (silero-vad's STFT power re^2 + im^2 at 8 bits: every
        bin but the loudest rounded to 0, the magnitude after the Sqrt lost); a 65536-entry table
        costs little when it is read at so few positions."""
        from qcompiler.intops.elementwise import unary_lut

        if RULES.get(u.op) is not unary_lut or any(i in self.fg.consts for i in u.inputs[:1]):
            return False
        shape = calib_shape(self.fg, self.cfg, u.inputs[0])
        return shape is not None and int(np.prod(shape[1:] if len(shape) > 1 else shape)) <= SMALL_TABLE_INPUT

    def clamp(self, qp: QParams, act: tuple[float, float] | None) -> tuple[int, int]:
        """Integer clamp bounds of ``qp`` intersected with a fused activation's real bounds."""
        lo, hi = qp.qmin, qp.qmax
        if act is not None:
            if math.isfinite(act[0]):
                lo = max(lo, math.ceil(act[0] / qp.scale - 1e-9))
            if math.isfinite(act[1]):
                hi = min(hi, math.floor(act[1] / qp.scale + 1e-9))
        if lo > hi:
            lo = hi = max(min(0, qp.qmax), qp.qmin)
        return lo, hi

    def emit(self, op: str, inputs: list[str], out: str, attrs: dict, dtype: str, shape,
             qp: QParams | None = None, float_name: str | None = None, node_name: str = "") -> str:
        """Append an integer node; ``inputs`` are integer tensor names."""
        attrs = dict(attrs)
        attrs["in_scales"] = tuple(self.ig.qparams[i].scale if i in self.ig.qparams else None for i in inputs)
        attrs["out_scale"] = qp.scale if qp is not None else None
        self.ig.nodes.append(Node(op, node_name or out, list(inputs), [out], attrs))
        self.ig.shapes[out] = tuple(int(d) for d in shape)
        self.ig.dtypes[out] = dtype
        if qp is not None:
            if qp.dtype != dtype and not (dtype == "int32" and qp.dtype == "int32"):
                raise QuantizationError(f"internal: node {node_name or out} declares {dtype} but QParams {qp.dtype}")
            self.ig.qparams[out] = qp
        if float_name is not None:
            self.int_name[float_name] = out
        return out

    # ---- driver ----------------------------------------------------------------------------
    def run(self) -> Graph:
        fg, ig = self.fg, self.ig
        for t in fg.inputs:
            dt = fg.dtypes[t]
            ig.shapes[t], ig.dtypes[t] = fg.shape(t), dt
            if dt.startswith("float"):
                if self.cfg.io == "int":
                    qp = self.out_qparams(t)
                    ig.dtypes[t] = qp.dtype
                    ig.qparams[t] = qp
                    self.int_name[t] = t
                else:
                    qp = self.out_qparams(t)
                    lo, hi = int_range(qp.dtype)
                    self.emit("quantize", [t], t + "/q", {"inv_scale": np.float32(1.0 / qp.scale), "lo": lo, "hi": hi,
                                                          "dtype": qp.dtype}, qp.dtype, fg.shape(t), qp, t)
            else:
                self.int_name[t] = t  # integer inputs (token ids, indices) pass as they are
        for n in fg.nodes:
            if n.name in self.islands:
                _island.emit_island(self, n, self.islands[n.name])
            elif is_int_data(fg, n):  # exact integer arithmetic (qcompiler/intops/intdata.py)
                int_data_rule(self, n)
            else:
                RULES[n.op](self, n)
        for o in fg.outputs:
            if o in fg.consts and o not in self.int_name:  # an output folded to a constant at the frozen
                self._constant_output(o)                   # shapes (a feature length from ConstantOfShape)
            src = self.iname(o)
            qp = ig.qparams.get(src)
            if self.cfg.io == "int" or qp is None:
                if src != o:
                    self.emit("reshape", [src], o, {"shape": ig.shapes[src]}, ig.dtypes[src], ig.shapes[src], qp)
            else:
                self.emit("dequantize", [src], o, {"scale": np.float32(qp.scale)}, "float32", ig.shapes[src])
            ig.outputs.append(o)
        return ig


# ops a network's output passes through after its last GEMM whose inputs take range headroom
# (``_tail_tensors``): bounded or order-keeping maps and data movement -- not a Log / Sqrt / Div,
# whose small inputs need the resolution (a log-power spectrum)
TAIL_OPS = {"Softmax", "LogSoftmax", "Sigmoid", "Relu", "Clip", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
            "Transpose", "Identity", "Concat", "Split", "Slice"}


def _tail_tensors(fg: Graph) -> set[str]:
    """The graph outputs made by a GEMM or ``TAIL_OPS`` and the tensors they are made from after the
    last GEMM through ``TAIL_OPS`` only (a classifier's logits before its softmax, a reshape of them)."""
    prod = {o: n for n in fg.nodes for o in n.outputs}
    seen: set[str] = set()
    # (an output a Log / Sqrt / table makes keeps its range: its table's steps are set by it)
    stack = [o for o in fg.outputs if o not in prod or prod[o].op in TAIL_OPS | {"Conv", "Dense"}]
    while stack:
        t = stack.pop()
        if t in seen or t in fg.consts:
            continue
        seen.add(t)
        n = prod.get(t)
        if n is not None and n.op in TAIL_OPS:
            stack.extend(n.inputs)
    return seen


def verify_scales(ig: Graph, rtol: float = 1e-9) -> None:
    """Every consumer was built for the scale its producer declares (raises on disagreement)."""
    for n in ig.nodes:
        for i, s in zip(n.inputs, n.attrs.get("in_scales", ())):
            qp = ig.qparams.get(i)
            if s is None or qp is None:
                continue
            if abs(qp.scale - s) > rtol * abs(s):
                raise QuantizationError(f"scale mismatch at node '{n.name}' ({n.op}): input '{i}' is produced at "
                                        f"scale {qp.scale:.6g} but consumed as {s:.6g}")
        o = n.outputs[0]
        if n.attrs.get("out_scale") is not None and o in ig.qparams and \
                abs(ig.qparams[o].scale - n.attrs["out_scale"]) > rtol * n.attrs["out_scale"]:
            raise QuantizationError(f"scale mismatch at node '{n.name}': output declared {ig.qparams[o].scale:.6g}, "
                                    f"built for {n.attrs['out_scale']:.6g}")


def permuted_stats(fg: Graph, stats: dict[str, TensorStats]) -> dict[str, TensorStats]:
    """``stats`` plus the ranges of tensors the calibration never saw whose values are those of one it
    did, rearranged: a node output read only through a Reshape / Transpose chain that ends at a
    calibrated tensor (the 1x1 conv of ``passes/subpixel_deconv.py``, whose pixel shuffle makes the
    ONNX tensor), or read only as the scores of a MaskAdd (``passes/fuse_attention.py``: scores plus
    a position bias, the mask added after; its kept positions are the ONNX sum's).  Per-tensor
    statistics only: the channels moved."""
    missing = [o for n in fg.nodes for o in n.outputs if o and o not in stats]
    if not missing:
        return stats
    cons = fg.consumers()
    out = dict(stats)
    for t in missing:
        cur = t
        for _ in range(8):
            users = cons.get(cur, [])
            if cur in stats or len(users) != 1 or users[0].op not in ("Reshape", "Transpose", "MaskAdd") \
                    or users[0].inputs[0] != cur:
                break
            cur = users[0].outputs[0]
        if cur != t and cur in stats:
            out[t] = replace(stats[cur], chan_lo=None, chan_hi=None, sample_chan=None, chan_ms=None, top_chan=None,
                             ms_axis1=None, chan_axis=-1)
    return out


def quantize(fg: Graph, stats: dict[str, TensorStats], nonneg: set[str], cfg: QuantConfig,
             onnx_model=None) -> Graph:
    """The integer graph of ``fg``; with ``cfg.allow_float`` the nodes without an integer form become
    float islands (``onnx_model``, the frontend's model, supplies their original ONNX attributes)."""
    stats = permuted_stats(fg, stats)
    bad = unsupported(fg)
    islands: dict[str, str] = {}
    if cfg.allow_float:
        islands, bad = plan_islands(fg, bad, onnx_model)
    if bad:
        raise unsupported_error(bad, hint=not cfg.allow_float)
    # a network's head (passes/auto_wide.py), part of the automatic widening: W8A16 and headroom
    heads = head_layers(fg, cfg) if cfg.auto_wide and cfg.head_a16 else set()
    if cfg.auto_wide:
        from passes.auto_wide import auto_wide_plan

        extra = auto_wide_plan(fg, stats, nonneg, cfg, heads)
        if extra:
            wide = {e[0] for e in extra}   # a w16a8 entry the pass widens becomes w16a16
            cfg = replace(cfg, plan=tuple(e for e in cfg.plan if e[0] not in wide) + extra)
    ig = Quantizer(fg, stats, nonneg, cfg, onnx_model, islands, heads).run()
    verify_scales(ig)
    return ig
