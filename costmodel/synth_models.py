"""Synthetic models (random weights) whose compiled kernels are profiled for the cost model, so the
kernels of whole models (GEMMs inside a running model, and the non-GEMM kernels: softmax, LayerNorm,
GELU, requantization chains, mask arithmetic, pooling, activations, layout copies) are seen at more
than the zoo's few sizes: transformer encoders (:class:`Encoder`) and CNNs (:class:`Cnn`).  Latency does not depend on the
weight values, only on shapes and the integer graph, so random weights serve.

Two fronts, the structures of the two public encoder families:

* ``vit``: image [B, 3, S, S] -> Conv(P x P, stride P) patches -> class token (Concat) + position
  embedding -> pre-norm blocks -> final LayerNorm -> class token -> Gemm head.
* ``bert``: input_ids [B, T] (int64) and attention_mask [B, T] -> word + position embeddings
  (Gather) -> LayerNorm -> post-norm blocks, the mask added to the scores as (1 - mask) * -10000
  (the exporters' form) -> last hidden state.

A block: Q, K, V = x Wq + bq, ... (MatMul + Add), heads split by Reshape/Transpose,
softmax(Q K^T / sqrt(dh) [+ mask]) V, output projection, residual; MLP x W1 + b1 -> GELU (erf form)
-> W2 + b2, residual; LayerNorm before (pre) or after (post) each residual.

``SUITE`` names the encoders ``python -m costmodel.profile --models synth`` profiles; their shapes are
chosen unlike the zoo's MiniLM so a leave-one-model-out test of MiniLM stays honest (identical
kernels would share a split group anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREFIX = "synth-"


@dataclass(frozen=True)
class Encoder:
    front: str            # "vit" | "bert"
    blocks: int
    dim: int
    heads: int
    mlp: int
    batch: int
    seq: int = 0          # bert: tokens
    img: int = 0          # vit: image side
    patch: int = 0        # vit: patch side
    vocab: int = 1000
    classes: int = 10
    seed: int = 0

    @property
    def tokens(self) -> int:
        return (self.img // self.patch) ** 2 + 1 if self.front == "vit" else self.seq

    @property
    def name(self) -> str:
        size = f"i{self.img}p{self.patch}" if self.front == "vit" else f"t{self.seq}"
        return f"{PREFIX}{self.front}-l{self.blocks}-d{self.dim}h{self.heads}f{self.mlp}-{size}-b{self.batch}"

    def __post_init__(self):
        if self.front not in ("vit", "bert"):
            raise ValueError(f"encoder front {self.front!r}: expected 'vit' or 'bert'")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not a multiple of heads {self.heads}")
        if self.front == "vit" and (not self.patch or self.img % self.patch):
            raise ValueError(f"image side {self.img} is not a multiple of the patch {self.patch}")


@dataclass(frozen=True)
class Cnn:
    """A CNN of ``len(widths)`` stages of ``depth`` blocks on a [batch, 3, size, size] image.

    Stem: Conv 3x3 stride 2 + BatchNormalization + activation.  Blocks:
    ``plain`` Conv 3x3 + BN + act (MaxPool 2x2 closes each stage, as in the MTCNN nets);
    ``res`` bottleneck 1x1 -> 3x3 (stride 2 opening a stage) -> 1x1, projection shortcut when the
    shape changes, Add, act (ResNet); ``mobile`` inverted residual 1x1 expand x4 -> depthwise 3x3
    -> 1x1 project, Add when the shape allows (MobileNetV2/V3).
    Head: GlobalAveragePool, Flatten, optional Gemm of ``head`` units + act, Gemm to classes."""

    block: str            # "plain" | "res" | "mobile"
    widths: tuple
    size: int
    batch: int
    act: str = "relu"     # "relu" | "prelu" | "hardswish"
    depth: int = 1
    head: int = 0
    classes: int = 10
    seed: int = 0

    @property
    def name(self) -> str:
        w = "_".join(map(str, self.widths))
        return f"{PREFIX}cnn-{self.block}-{self.act}-w{w}x{self.depth}-s{self.size}-b{self.batch}"

    def __post_init__(self):
        if self.block not in ("plain", "res", "mobile"):
            raise ValueError(f"cnn block {self.block!r}: expected 'plain', 'res' or 'mobile'")
        if self.act not in ("relu", "prelu", "hardswish"):
            raise ValueError(f"cnn activation {self.act!r}: expected 'relu', 'prelu' or 'hardswish'")


SUITE = [
    Encoder("bert", blocks=2, dim=256, heads=4, mlp=1024, batch=1, seq=128),
    Encoder("bert", blocks=2, dim=128, heads=2, mlp=512, batch=4, seq=32),
    Encoder("bert", blocks=1, dim=512, heads=8, mlp=2048, batch=1, seq=96),
    Encoder("bert", blocks=2, dim=192, heads=6, mlp=768, batch=2, seq=48),
    Encoder("vit", blocks=2, dim=192, heads=3, mlp=768, batch=1, img=224, patch=16),
    Encoder("vit", blocks=2, dim=128, heads=4, mlp=256, batch=8, img=32, patch=4),
    Encoder("vit", blocks=1, dim=384, heads=6, mlp=1536, batch=2, img=128, patch=16),
    Cnn("plain", (16, 32, 64), size=40, batch=1, act="prelu", head=96),
    Cnn("plain", (24, 40, 72), size=64, batch=4, act="relu", head=128),
    Cnn("res", (32, 64, 128), size=96, batch=1, act="relu", depth=2),
    Cnn("res", (48, 96, 192, 256), size=128, batch=1, act="relu"),
    Cnn("mobile", (16, 24, 40, 80), size=160, batch=1, act="hardswish"),
    Cnn("mobile", (16, 32, 64), size=64, batch=8, act="relu", depth=2),
    Cnn("plain", (32, 64, 96), size=28, batch=16, act="prelu", head=64),
]


def by_name(name: str) -> Encoder | Cnn:
    for e in SUITE:
        if e.name == name:
            return e
    raise KeyError(f"unknown synthetic model {name!r}; known: {', '.join(e.name for e in SUITE)}")


def build(e: Encoder | Cnn):
    """The model as an ONNX model (opset 17)."""
    if isinstance(e, Cnn):
        return build_cnn(e)
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(e.seed)
    B, D, H, F, T = e.batch, e.dim, e.heads, e.mlp, e.tokens
    dh = D // H
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def rnd(name, *shape, s=1.0, mean=0.0):
        return init(name, (mean + s * rng.standard_normal(shape)).astype(np.float32))

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], **kw))
        return out

    def layernorm(x, p):
        return node("LayerNormalization", [x, rnd(p + "g", D, s=0.1, mean=1.0), rnd(p + "b", D, s=0.1)], p + "y",
                    axis=-1, epsilon=1e-6 if e.front == "vit" else 1e-12)

    def linear(x, p, k, n):
        y = node("MatMul", [x, rnd(p + "W", k, n, s=1 / np.sqrt(k))], p + "mm")
        return node("Add", [y, rnd(p + "bias", n, s=0.1)], p + "y")

    init("s4", np.array([B, T, H, dh], np.int64))
    init("s3", np.array([B, T, D], np.int64))
    init("sq", np.array(np.sqrt(dh), np.float32))
    init("one", np.array(1.0, np.float32))
    init("half", np.array(0.5, np.float32))
    init("r2", np.array(np.sqrt(2.0), np.float32))
    if e.front == "vit":
        inputs = [helper.make_tensor_value_info("img", TensorProto.FLOAT, [B, 3, e.img, e.img])]
        node("Conv", ["img", rnd("Wp", D, 3, e.patch, e.patch, s=0.2), rnd("bp", D, s=0.1)], "pe",
             kernel_shape=[e.patch, e.patch], strides=[e.patch, e.patch])
        node("Reshape", ["pe", init("s_bdn", np.array([B, D, -1], np.int64))], "pe2")
        node("Transpose", ["pe2"], "tok", perm=[0, 2, 1])
        node("Expand", [rnd("cls", 1, 1, D, s=0.5), init("s_b1d", np.array([B, 1, D], np.int64))], "clsb")
        node("Concat", ["clsb", "tok"], "seq", axis=1)
        x, mask = node("Add", ["seq", rnd("pos", 1, T, D, s=0.2)], "x0"), None
    else:
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, T]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, T])]
        node("Gather", [rnd("wemb", e.vocab, D, s=0.5), "input_ids"], "we")
        node("Gather", [rnd("pemb", 512, D, s=0.2), init("pos_ids", np.arange(T, dtype=np.int64)[None])], "pe")
        x = layernorm(node("Add", ["we", "pe"], "emb"), "embln_")
        node("Unsqueeze", ["attention_mask", init("ax12", np.array([1, 2], np.int64))], "m4")
        node("Cast", ["m4"], "mf", to=TensorProto.FLOAT)
        node("Sub", ["one", "mf"], "minv")
        mask = node("Mul", ["minv", init("neg", np.array(-10000.0, np.float32))], "mask")
    for i in range(e.blocks):
        p = f"b{i}_"
        h = layernorm(x, p + "ln1_") if e.front == "vit" else x
        q, k, v = (linear(h, p + n + "_", D, D) for n in "qkv")
        node("Transpose", [node("Reshape", [q, "s4"], p + "q4")], p + "qt", perm=[0, 2, 1, 3])
        node("Transpose", [node("Reshape", [k, "s4"], p + "k4")], p + "kt", perm=[0, 2, 3, 1])
        node("Transpose", [node("Reshape", [v, "s4"], p + "v4")], p + "vt", perm=[0, 2, 1, 3])
        s = node("Div", [node("MatMul", [p + "qt", p + "kt"], p + "s"), "sq"], p + "ss")
        if mask is not None:
            s = node("Add", [s, mask], p + "sm")
        node("MatMul", [node("Softmax", [s], p + "a", axis=-1), p + "vt"], p + "o")
        node("Reshape", [node("Transpose", [p + "o"], p + "ot", perm=[0, 2, 1, 3]), "s3"], p + "o3")
        r1 = node("Add", [x, linear(p + "o3", p + "proj_", D, D)], p + "r1")
        if e.front == "bert":
            r1 = layernorm(r1, p + "ln1_")
        h = layernorm(r1, p + "ln2_") if e.front == "vit" else r1
        h1 = linear(h, p + "fc1_", D, F)
        node("Erf", [node("Div", [h1, "r2"], p + "gd")], p + "ge")
        g = node("Mul", [node("Mul", [h1, node("Add", [p + "ge", "one"], p + "gp")], p + "gm"), "half"], p + "g")
        x = node("Add", [r1, linear(g, p + "fc2_", F, D)], p + "out")
        if e.front == "bert":
            x = layernorm(x, p + "ln2_")
    if e.front == "vit":
        node("Gather", [layernorm(x, "lnf_"), init("idx0", np.array([0], np.int64))], "c0", axis=1)
        node("Reshape", ["c0", init("s_bd", np.array([B, D], np.int64))], "c")
        out = node("Gemm", ["c", rnd("Wh", D, e.classes, s=1 / np.sqrt(D)), rnd("bh", e.classes, s=0.1)], "logits")
    else:
        out = node("Identity", [x], "hidden")
    shape = [B, e.classes] if e.front == "vit" else [B, T, D]
    graph = helper.make_graph(nodes, e.name, inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
                              inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qcompiler-synth")
    m.ir_version = 8
    return m


def build_cnn(c: Cnn):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(c.seed)
    nodes, inits, count = [], [], [0]

    def uid(p):
        count[0] += 1
        return f"{p}{count[0]}"

    def init(arr, p="c"):
        name = uid(p)
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, **kw):
        out = uid(op.lower())
        nodes.append(helper.make_node(op, ins, [out], **kw))
        return out

    def act(x, ch):
        if c.act == "relu":
            return node("Relu", [x])
        if c.act == "hardswish":
            return node("HardSwish", [x])
        return node("PRelu", [x, init((0.25 + 0.05 * rng.standard_normal((ch, 1, 1))).astype(np.float32))])

    def conv(x, cin, cout, k, stride=1, group=1, relu=True):
        w = (rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k))).astype(np.float32)
        y = node("Conv", [x, init(w), init((0.05 * rng.standard_normal(cout)).astype(np.float32))],
                 kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)
        bn = [init((1 + 0.1 * rng.standard_normal(cout)).astype(np.float32)),
              init((0.1 * rng.standard_normal(cout)).astype(np.float32)),
              init((0.1 * rng.standard_normal(cout)).astype(np.float32)),
              init((0.5 + rng.random(cout)).astype(np.float32))]
        y = node("BatchNormalization", [y] + bn, epsilon=1e-5)
        return act(y, cout) if relu else y

    x, ch = conv("img", 3, c.widths[0], 3, stride=2), c.widths[0]
    for si, w in enumerate(c.widths):
        for bi in range(c.depth):
            stride = 2 if (bi == 0 and si > 0 and c.block != "plain") else 1
            if c.block == "plain":
                x = conv(x, ch, w, 3)
            elif c.block == "res":
                mid = max(8, w // 4)
                y = conv(conv(conv(x, ch, mid, 1), mid, mid, 3, stride=stride), mid, w, 1, relu=False)
                sc = x if (stride == 1 and ch == w) else conv(x, ch, w, 1, stride=stride, relu=False)
                x = act(node("Add", [y, sc]), w)
            else:
                e = ch * 4
                y = conv(conv(conv(x, ch, e, 1), e, e, 3, stride=stride, group=e), e, w, 1, relu=False)
                x = node("Add", [y, x]) if (stride == 1 and ch == w) else y
            ch = w
        if c.block == "plain" and si < len(c.widths) - 1:
            x = node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = node("Flatten", [node("GlobalAveragePool", [x])], axis=1)
    if c.head:
        x = node("Gemm", [x, init((rng.standard_normal((ch, c.head)) / np.sqrt(ch)).astype(np.float32)),
                          init((0.05 * rng.standard_normal(c.head)).astype(np.float32))])
        x = node("Relu", [x]) if c.act == "relu" else node("PRelu", [x, init(np.full(c.head, 0.25, np.float32))]) \
            if c.act == "prelu" else node("HardSwish", [x])
        ch = c.head
    out = node("Gemm", [x, init((rng.standard_normal((ch, c.classes)) / np.sqrt(ch)).astype(np.float32)),
                        init((0.05 * rng.standard_normal(c.classes)).astype(np.float32))])
    graph = helper.make_graph(nodes, c.name, [helper.make_tensor_value_info("img", TensorProto.FLOAT,
                                                                             [c.batch, 3, c.size, c.size])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [c.batch, c.classes])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qcompiler-synth")
    m.ir_version = 8
    return m


def calibration(e: Encoder | Cnn, n: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    """``n`` random inputs: standard-normal images, or token ids with a random padded tail."""
    rng = np.random.default_rng(seed)
    if isinstance(e, Cnn):
        return {"img": rng.standard_normal((n, 3, e.size, e.size)).astype(np.float32)}
    if e.front == "vit":
        return {"img": rng.standard_normal((n, 3, e.img, e.img)).astype(np.float32)}
    lens = rng.integers(max(1, e.seq // 2), e.seq + 1, n)
    mask = (np.arange(e.seq)[None] < lens[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(0, e.vocab, (n, e.seq)).astype(np.int64) * mask, "attention_mask": mask}


def write(e: Encoder | Cnn, folder) -> str:
    """The model saved as ``folder/<name>.onnx`` (written atomically); its path."""
    import os
    from pathlib import Path

    import onnx

    p = Path(folder) / f"{e.name}.onnx"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    onnx.save(build(e), str(tmp))
    os.replace(tmp, p)
    return str(p)


