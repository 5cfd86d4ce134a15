"""Epilogue fusion (passes/fuse_epilogue.py): residual adds and hard-swish folded into the conv / dense
node and the CPU kernel that computes it.

The fused graph equals the unfused one under the reference executor (structural: the steps run
the ops' own references), the three-way check (ONNX Runtime -> reference -> TVM bit for bit) holds
on a ResNet-style, a MobileNetV3-style and a BERT-style model, the fused steps run inside the GEMM
kernels (fewer kernels, none unscheduled, integer-only), and the tuning workloads do not change.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from costmodel import synth_models as S
from passes.fuse_epilogue import count_fused, fuse_epilogue
from qcompiler import reference
from qcompiler.driver import CompileOptions, prepare
from qcompiler.graph import Graph, Node
from qcompiler.intops.gemm import ConvOp
from qcompiler.lowering.build import build
from qcompiler.targets import parse_target
from qcompiler.tir_scan import scan_tir
from qcompiler.tune.workload import tasks_from_graph
from qcompiler.qtypes import dyadic_common
from tests.helpers import check_pipeline, save

RES = S.Cnn("res", (8, 16), size=16, batch=2, act="relu", seed=2)
MOBILE = S.Cnn("mobile", (8, 16), size=16, batch=2, act="hardswish", depth=2, seed=3)
BERT = S.Encoder("bert", blocks=2, dim=32, heads=4, mlp=64, batch=2, seq=12, vocab=50, seed=12)


def _unfused(e, calib):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return prepare(save(S.build(e), d), calib, CompileOptions(target=parse_target("cpu"), fuse_epilogue=False))


@pytest.mark.parametrize("e,want", [(RES, {"conv+add": 2}), (MOBILE, {"conv+requant+mul": 9, "conv+add": 3}),
                                    (BERT, {"dense+add": 4})],
                         ids=["resnet_block", "mobilenetv3_block", "bert_dense_residual"])
def test_fused_three_way_bit_exact_fewer_kernels(e, want):
    calib = S.calibration(e, 16, seed=3)
    test = {k: v[-e.batch:] for k, v in S.calibration(e, 16, seed=4).items()}
    prep, tv, ref = check_pipeline(S.build(e), calib, test, min_cos=0.99)  # fusion is on by default
    ig = prep.int_graph
    assert count_fused(ig) == want
    plain = _unfused(e, calib)
    # no standalone residual add / hard-swish mul is left next to a GEMM, and the fused graph is the
    # unfused one under the reference
    assert not any(n.op in ("add", "mul") for n in ig.nodes if e is not BERT)
    for feed in (test, {k: v[:e.batch] for k, v in calib.items()}):
        a, b = reference.execute(ig, feed), reference.execute(plain.int_graph, feed)
        for o in ig.outputs:
            np.testing.assert_array_equal(a[o], b[o])
    target = parse_target("cpu").tvm_target()
    fused, unfused = build(ig, target), build(plain.int_graph, target)
    names = [str(g.name_hint) for g in fused.tir.functions]
    assert len(fused.tir.functions) < len(unfused.tir.functions), names
    # the steps run in the GEMM kernels, e.g. conv_vnni_add / dwconv_cpu_requant_mul
    for pattern in (want if fused.gemm_name != "generic" else ()):
        tag = "_".join(pattern.split("+")[1:])
        assert any(n.rstrip("0123456789").endswith("_" + tag) for n in names), names
    rep = scan_tir(fused.tir)
    assert rep.integer_only and rep.all_scheduled, rep.summary()
    # tuning: the epilogue is not part of the workload key, a plain kernel's tuned config applies
    spec = parse_target("cpu")
    assert sorted(t.workload.key for t in tasks_from_graph(ig, spec)) == \
        sorted(t.workload.key for t in tasks_from_graph(plain.int_graph, spec))


def _conv_graph(extra_consumer=False, residual_shape=None, out_is_output=False, per_channel=False):
    """x -> conv -> add(conv, r) [-> clip]: the pass's unit cases on a hand-built integer graph."""
    rng = np.random.default_rng(0)
    ex = ConvOp.examples(rng)[0]  # 16 -> 32 channels, 3x3, pads 1, 9x8
    a = dict(ex.attrs)
    a["dtype"], a["lo"], a["hi"] = "int16", -32768, 32767
    shape = (1, 32, 9, 8)
    (ma, mb), s = dyadic_common([0.01, 0.7], "t")
    if per_channel:
        ma = np.full((1, 32, 1, 1), ma)
    g = Graph(nodes=[Node("conv", "conv", ["x"], ["c"], a),
                     Node("add", "add", ["c", "r"], ["s"], {"mult_a": ma, "mult_b": mb, "shift": s, "lo": 0,
                                                            "hi": 255, "dtype": "uint8"}),
                     Node("clip", "relu6", ["s"], ["y"], {"lo": 0, "hi": 200})],
              inputs=["x", "r"], outputs=["y"], shapes={"x": (1, 16, 9, 8), "r": residual_shape or shape, "c": shape,
                                                        "s": shape, "y": shape},
              dtypes={"x": "int8", "r": "int8", "c": "int16", "s": "uint8", "y": "uint8"})
    if extra_consumer:
        g.nodes.append(Node("clip", "other", ["c"], ["z"], {"lo": -5, "hi": 5}))
        g.shapes["z"], g.dtypes["z"] = shape, "int16"
        g.outputs.append("z")
    if out_is_output:
        g.outputs.append("c")
    return g


def test_pass_folds_add_and_clip_and_keeps_the_reference():
    g = _conv_graph()
    plain = copy.deepcopy(g)
    fuse_epilogue(g)
    assert [n.op for n in g.nodes] == ["conv"]
    n = g.nodes[0]
    assert n.name == "conv" and n.inputs == ["x", "r"] and n.outputs == ["y"]
    assert [s["op"] for s in n.attrs["epilogue"]] == ["add", "clip"]
    assert n.attrs["epilogue"][0]["args"] == ("y", "in1")
    rng = np.random.default_rng(1)
    for kind in ("random", "extreme"):
        if kind == "random":
            feed = {"x": rng.integers(-128, 128, (1, 16, 9, 8)).astype(np.int8),
                    "r": rng.integers(-128, 128, (1, 32, 9, 8)).astype(np.int8)}
        else:
            feed = {"x": np.full((1, 16, 9, 8), 127, np.int8), "r": np.full((1, 32, 9, 8), -128, np.int8)}
        np.testing.assert_array_equal(reference.execute(g, feed)["y"], reference.execute(plain, feed)["y"])
    from passes.overflow import check_overflow

    assert check_overflow(g)["y"] == check_overflow(plain)["y"]


@pytest.mark.parametrize("case", ["two_consumers", "broadcast_residual", "graph_output", "per_channel_add"])
def test_pass_leaves_what_it_cannot_fuse(case):
    g = _conv_graph(extra_consumer=case == "two_consumers",
                    residual_shape=(1, 32, 1, 1) if case == "broadcast_residual" else None,
                    out_is_output=case == "graph_output", per_channel=case == "per_channel_add")
    ops = [n.op for n in g.nodes]
    fuse_epilogue(g)
    assert [n.op for n in g.nodes] == ops and not any(n.attrs.get("epilogue") for n in g.nodes)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["cpu_kernel", "generic_relax"])
def test_fused_node_builds_bit_exact_on_both_lowerings(use_kernels):
    """The CPU kernel with the epilogue inside, and the generic path (GEMM in Relax, then the steps'
    own Relax lowerings: what CUDA and the grouped convs do) equal the reference."""
    from tests.helpers import run_tvm

    g = fuse_epilogue(_conv_graph())
    res = build(g, parse_target("cpu").tvm_target(), use_kernels=use_kernels)
    rng = np.random.default_rng(2)
    feed = {"x": rng.integers(-128, 128, (1, 16, 9, 8)).astype(np.int8),
            "r": rng.integers(-128, 128, (1, 32, 9, 8)).astype(np.int8)}
    np.testing.assert_array_equal(run_tvm(res.executable, g, feed)["y"], reference.execute(g, feed)["y"])
    names = [str(f.name_hint) for f in res.tir.functions]
    # conv_vnni_add_clip (conv_avx2_add_clip on an AVX2-only CPU)
    assert any(n.startswith("conv_") and "_add_clip" in n for n in names) == use_kernels, names
