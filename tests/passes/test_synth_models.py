"""The synthetic models of ``costmodel.synth_models`` (random weights), built small:

* ViT (patch-embedding conv, class token, position embedding, pre-norm blocks with attention and a
  GELU MLP, final LayerNorm, class-token head);
* BERT (token + position embedding Gathers, post-norm blocks, the attention mask added to the
  scores as (1 - mask) * -10000);
* CNNs of the three block kinds (plain + MaxPool with PRelu, ResNet bottlenecks, MobileNet inverted
  residuals with HardSwish), BatchNormalization after every conv, dense head.

For each: float passes exact, the integer model close to float, TVM == NumPy reference element for
element at batch 2, and the library integer-only by the TIR scan."""

from __future__ import annotations

import numpy as np
import pytest

from costmodel import synth_models as S
from tests.helpers import check_pipeline

VIT = S.Encoder("vit", blocks=2, dim=32, heads=4, mlp=64, batch=2, img=16, patch=4, seed=11)
BERT = S.Encoder("bert", blocks=2, dim=32, heads=4, mlp=64, batch=2, seq=12, vocab=50, seed=12)


def _integer_only(prep):
    from qcompiler.lowering.build import build
    from qcompiler.targets import parse_target
    from qcompiler.tir_scan import scan_tir

    rep = scan_tir(build(prep.int_graph, parse_target("cpu").tvm_target()).tir)
    assert rep.integer_only, rep


CNNS = [S.Cnn("plain", (8, 16), size=20, batch=2, act="prelu", head=12, seed=1),
        S.Cnn("res", (8, 16), size=16, batch=2, act="relu", seed=2),
        S.Cnn("mobile", (8, 16), size=16, batch=2, act="hardswish", depth=2, seed=3)]


def _check(e, want_ops: set):
    calib = S.calibration(e, 16, seed=3)
    test = {k: v[-e.batch:] for k, v in S.calibration(e, 16, seed=4).items()}
    prep, tv, ref = check_pipeline(S.build(e), calib, test, min_cos=0.99)
    ops = {n.op for n in prep.int_graph.nodes}
    assert want_ops <= ops, ops
    _integer_only(prep)


def test_vit_structure_bit_exact_and_integer_only():
    _check(VIT, {"conv", "layernorm", "gelu", "softmax", "matmul", "dense", "concat"})


def test_bert_structure_with_mask_bit_exact_and_integer_only():
    _check(BERT, {"layernorm", "gelu", "softmax", "matmul", "dense"})


@pytest.mark.parametrize("c", CNNS, ids=lambda c: c.block)
def test_cnn_structures_bit_exact_and_integer_only(c):
    _check(c, {"conv", "dense"})


def test_suite_names_unique_and_valid():
    names = [e.name for e in S.SUITE]
    assert len(set(names)) == len(names)
    assert all(S.by_name(n).name == n for n in names)
    try:
        S.Encoder("vit", blocks=1, dim=30, heads=4, mlp=8, batch=1, img=8, patch=4)
    except ValueError as err:
        assert "multiple of heads" in str(err)
    else:
        raise AssertionError("dim not divisible by heads accepted")
    with pytest.raises(ValueError, match="cnn block"):
        S.Cnn("dense", (8,), size=8, batch=1)
    assert np.all(S.calibration(BERT, 4)["attention_mask"][:, 0] == 1)
