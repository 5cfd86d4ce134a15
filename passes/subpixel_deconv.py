"""A transposed convolution whose kernel equals its stride, as a 1x1 convolution and a pixel shuffle.

ConvTranspose(x, W; stride s, kernel s, no padding, group 1) writes each input pixel's s x s output
block on its own (no two blocks overlap):

    y[n, co, h*s0 + i, w*s1 + j] = b[co] + sum_ci x[n, ci, h, w] * W[ci, co, i, j]

which is a 1x1 convolution with Cout * s0 * s1 output channels, c' = (co * s0 + i) * s1 + j,

    z[n, c', h, w] = b[co] + sum_ci W1[c', ci] x[n, ci, h, w],   W1[c', ci] = W[ci, co, i, j]

followed by the pixel shuffle z -> y (Reshape [N, Cout, s0, s1, H, W], Transpose (0, 1, 4, 2, 5, 3),
Reshape [N, Cout, H*s0, W*s1]; 1-D alike).  ``passes/canonicalize.py`` lowers every ConvTranspose as
zero insertion + a stride-1 conv, which for this case multiplies by zero in (s0 s1 - 1) / (s0 s1) of
its taps over an s0 s1 times larger image (a DBNet head's 2x2 / stride 2 upsampling: 4x the
multiply-adds, and one output channel padded to a whole vector lane); it marks the convs of this
case (``SUBPIXEL``) and this pass, run after BatchNorm folding and activation fusion (which apply to
the conv as to any), rewrites them.  The conv's weights at that point are the flipped, folded ones:
W[ci, co, i, j] = Wc[co, ci, s0-1-i, s1-1-j].  The 1x1 conv's output takes the calibration range of
the shuffled tensor (the same values: ``passes/quantize.py`` ``permuted_stats``).
"""

from __future__ import annotations

import numpy as np

from qcompiler.graph import Graph, Node

SUBPIXEL = "_subpixel"
"""Conv attribute set by ``passes/canonicalize.py`` (op_ConvTranspose): (strides, the ConvTranspose's input)."""


def subpixel_deconv(g: Graph) -> Graph:
    if not any(SUBPIXEL in n.attrs for n in g.nodes):
        return g
    g = g.copy()
    out: list[Node] = []
    for n in g.nodes:
        mark = n.attrs.pop(SUBPIXEL, None)
        if mark is None or n.op != "Conv" or n.inputs[1] not in g.consts:
            out.append(n)
            continue
        out.extend(_rewrite(g, n, tuple(int(v) for v in mark[0]), mark[1]))
    g.nodes = out
    g.prune()
    return g


def _rewrite(g: Graph, n: Node, s: tuple, x: str) -> list[Node]:
    nd = len(s)
    Wc = np.asarray(g.consts[n.inputs[1]])                       # [Cout, Cin, *s], flipped
    Cout, Cin = Wc.shape[:2]
    P = int(np.prod(s))
    W1 = np.flip(Wc, axis=tuple(range(2, 2 + nd)))               # W[ci, co, i, j] as [co, ci, i, j]
    W1 = np.moveaxis(W1, 1, -1).reshape(Cout * P, Cin)           # c' = (co * s0 + i) * s1 + j
    wname = g.add_const(g.fresh(n.inputs[1] + "_subpixel"), W1.reshape((Cout * P, Cin) + (1,) * nd).astype(Wc.dtype))
    ins = [x, wname]
    if len(n.inputs) > 2 and n.inputs[2]:
        b = np.asarray(g.consts[n.inputs[2]]).reshape(-1)
        ins.append(g.add_const(g.fresh(n.inputs[2] + "_subpixel"), np.repeat(b, P).astype(b.dtype)))
    y = n.outputs[0]
    xs, ys = g.shape(x), g.shape(y)
    N, sp = xs[0], tuple(xs[2:])
    dt = g.dtypes[y]

    def tensor(base: str, shape) -> str:
        t = g.fresh(f"{y}/{base}")
        g.shapes[t], g.dtypes[t] = tuple(int(d) for d in shape), dt
        return t

    z = tensor("subpixel", (N, Cout * P) + sp)
    attrs = {k: v for k, v in n.attrs.items() if k not in ("kernel_shape", "strides", "pads", "dilations")}
    conv = Node("Conv", n.name, ins, [z], {**attrs, "kernel_shape": [1] * nd, "strides": [1] * nd,
                                              "pads": [0] * (2 * nd), "dilations": [1] * nd, "group": 1})
    split = tensor("blocks", (N, Cout) + s + sp)
    # (N, Cout, s0, s1, H, W) -> (N, Cout, H, s0, W, s1); 1-D: (N, Cout, s, L) -> (N, Cout, L, s)
    perm = (0, 1) + tuple(x_ for ax in range(nd) for x_ in (2 + nd + ax, 2 + ax))
    moved = tensor("shuffled", (N, Cout) + tuple(d for ax in range(nd) for d in (sp[ax], s[ax])))
    return [conv,
            Node("Reshape", n.name + "/blocks", [z], [split], {"shape": g.shapes[split]}),
            Node("Transpose", n.name + "/shuffle", [split], [moved], {"perm": perm}),
            Node("Reshape", n.name + "/merge", [moved], [y], {"shape": tuple(int(d) for d in ys)})]
