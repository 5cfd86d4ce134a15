"""qc bench --profile (qcompiler/bench_profile.py): every call timed and categorised, GEMM calls
matched to the model's conv / dense layers, categories adding up to the measured latency."""

import json
import subprocess
import sys

import numpy as np
import pytest
from onnx import helper

from qcompiler.bench_profile import CATEGORIES, categorize
from tests.helpers import make_model, save, tensor

R = np.random.default_rng(5)


@pytest.mark.parametrize("name,cat", [("conv_vnni3", "gemm/conv"), ("dense_vnni", "gemm/conv"),
                                      ("fused_conv2d_add_cast", "gemm/conv"), ("dwconv_cpu2", "depthwise"),
                                      ("qc_quantize", "boundary"), ("qc_dequantize1", "boundary"),
                                      ("fused_reshape6_transpose2", "layout"), ("qc_split", "layout"),
                                      ("fused_cast_multiply_add_right_shift_tir_clip_cast", "requant/elementwise"),
                                      ("vm.builtin.alloc_tensor", "vm-builtin")])
def test_categories(name, cat):
    assert categorize(name) == cat


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    from qcompiler import driver
    from qcompiler.targets import parse_target

    d = tmp_path_factory.mktemp("prof")
    W = (R.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    D = (R.standard_normal((8 * 6 * 6, 10)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "D"], ["y"])]
    m = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 10])], [tensor("W", W), tensor("D", D)])
    path = save(m, d)
    calib = {"x": R.standard_normal((8, 3, 6, 6)).astype(np.float32)}
    driver.compile_model(path, d / "m.so", calib, driver.CompileOptions(target=parse_target("cpu")))
    return str(d / "m.so")


def test_profile_matches_layers_and_adds_up(library):
    from qcompiler.bench_profile import profile
    from qcompiler.runtime import Library

    p = profile(Library(library), runs=5, bench_repeats=10)
    assert p["gemm_layers"] == 2 and p["gemm_layers_matched"] == 2
    assert [r["layer"] for r in p["rows"] if "layer" in r] == [layer["name"] for layer in Library(library).meta["layers"]]
    assert all(r["category"] in CATEGORIES for r in p["rows"]) and all(r["ms"] >= 0 for r in p["rows"])
    assert abs(sum(p["by_category_ms"].values()) - p["total_ms"]) < 1e-6
    assert all(r["gops"] > 0 for r in p["rows"] if "layer" in r)


def test_cli_profile_json(library):
    out = subprocess.run([sys.executable, "-m", "qcompiler.cli", "bench", library, "--profile", "--json",
                          "--repeats", "5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc["by_category_ms"]) == set(CATEGORIES) and doc["calls"] == len(doc["rows"])
    text = subprocess.run([sys.executable, "-m", "qcompiler.cli", "bench", library, "--profile", "--repeats", "5"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "VM call overhead" in text.stdout and "gemm/conv" in text.stdout


def test_builtins_scaled_to_fit_the_measured_latency():
    """Builtins timed in the model are mostly the hook's cost: where the calls would add up to more
    than the measured latency (a loop's thousands of allocations), they share what the kernels leave."""
    from qcompiler.bench_profile import _scale_builtins

    rows = [{"category": "gemm/conv", "timing": "in-model", "ms": 1.0},
            {"category": "vm-builtin", "timing": "in-model", "ms": 3.0},
            {"category": "vm-builtin", "timing": "in-model", "ms": 1.0}]
    assert _scale_builtins(rows, 3.0) == 0.5
    assert [r["ms"] for r in rows] == [1.0, 1.5, 0.5] and rows[1]["timing"] == "in-model, scaled"
    assert _scale_builtins(rows, 10.0) == 1.0 and rows[1]["ms"] == 1.5    # room left: unchanged


def test_macs_of_a_dense_layer_count_its_reduction():
    """A dense layer's weights are [K, N]: M x N outputs of K MACs each (the FFN's 384 -> 1536)."""
    from qcompiler.bench_profile import _macs

    assert _macs({"op": "dense", "out_shape": [128, 1536], "weight_shape": [384, 1536], "in_shape": [128, 384]}) \
        == 128 * 1536 * 384
    assert _macs({"op": "conv", "out_shape": [1, 8, 4, 4], "weight_shape": [8, 3, 3, 3], "in_shape": [1, 3, 4, 4]}) \
        == 8 * 16 * 27
