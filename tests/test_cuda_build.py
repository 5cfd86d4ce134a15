"""`qc compile --target cuda --arch sm_XX --dump DIR` on a machine without a GPU: the library builds,
the dump holds the CUDA source, the cubin nvcc made from it and its SASS, and the SASS has the
tensor-core instructions of the INT8 kernels (IMMA 16x8x32 on sm_80+, 8x8x16 on sm_75).  The
integer-only scan of the stored TIR says yes and no loop nest is left unscheduled."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper

from qcompiler.cli import main
from tests.helpers import make_model, tensor

R = np.random.default_rng(1)

if shutil.which("nvcc") is None:
    try:
        from qcompiler.kernels.cuda_mma import _tool

        _tool("nvcc")
    except Exception:  # pragma: no cover - nvcc is part of the supported build machine
        pytest.skip("nvcc not found", allow_module_level=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "W1"], ["c1"], kernel_shape=[3, 3], group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "r"], ["s"]),
             helper.make_node("GlobalAveragePool", ["s"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W2"], ["logits"])]
    inits = [tensor("W", (R.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)),
             tensor("B", np.zeros(16, np.float32)),
             tensor("W1", (R.standard_normal((16, 4, 3, 3)) * 0.3).astype(np.float32)),
             tensor("W2", R.standard_normal((16, 10)).astype(np.float32))]
    m = make_model(nodes, [("x", ["N", 3, 12, 12])], [("logits", None)], inits)
    onnx.save(m, d / "m.onnx")
    np.savez(d / "calib.npz", x=R.standard_normal((4, 3, 12, 12)).astype(np.float32))
    return d


@pytest.mark.parametrize("arch,imma", [("sm_75", "IMMA.8816"), ("sm_80", "IMMA.16832"), ("sm_86", "IMMA.16832"),
                                       ("sm_89", "IMMA.16832"), ("sm_90", "IMMA.16832")])
def test_cuda_compile_dump_has_imma(model, arch, imma, capsys):
    d = model
    out, dump = d / f"m_{arch}.so", d / f"dump_{arch}"
    rc = main(["-q", "compile", str(d / "m.onnx"), "-o", str(out), "--calib", str(d / "calib.npz"),
               "--target", "cuda", "--arch", arch, "--dump", str(dump)])
    assert rc == 0
    meta = json.loads((d / f"m_{arch}.json").read_text())
    assert meta["target"]["arch"] == arch
    assert meta["kernels"]["gemm"] == "cuda_mma"
    # the two group-1 layers (conv, dense) are tensor-core kernels; the grouped conv falls back
    assert meta["kernels"]["gemm_kernels"] == {"conv_mma": 1, "dense_mma": 1}
    assert len(meta["kernels"]["generic_fallbacks"]) == 1
    assert list(dump.glob("source.*.cuda.cu")), "CUDA source missing from the dump"
    cubins = list(dump.glob(f"*.{arch}.cubin"))
    assert cubins, "no cubin in the dump"
    sass = "\n".join(p.read_text() for p in dump.glob(f"*.{arch}.sass"))
    found = set(re.findall(r"IMMA\.[0-9A-Z.]+", sass))
    assert any(f.startswith(imma) for f in found), f"{arch}: expected {imma} in the SASS, found {found}"
    assert "CALL" not in " ".join(l for l in sass.splitlines() if "IMMA" in l)
    capsys.readouterr()
    assert main(["-q", "inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["integer_only"] is True
    assert rep["unscheduled"] == []


def _sass_imma(dump, arch) -> set:
    sass = "\n".join(p.read_text() for p in dump.glob(f"*.{arch}.sass"))
    return set(re.findall(r"IMMA\.[0-9A-Z.]+", sass))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_symbolic_batch_and_sequence_build_tensor_core_kernels(tmp_path, arch, capsys):
    """--shape ranges with --target cuda: the conv / dense / attention matmul kernels take their
    rows (batch x sequence, batch x H x W) and the attention's batch and columns as run-time
    sizes (``kernels/cuda_mma.py`` ``_sym_rows``; bit-exact on the PTX simulator in
    ``tests/kernels/test_cuda_mma.py``): no layer falls back to the generic schedule."""
    from tests.test_symbolic_shapes import _encoder, _text_feeds

    onnx.save(_encoder(), tmp_path / "enc.onnx")
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "c.npz", **_text_feeds(4, 12, rng))
    out, dump = tmp_path / "enc.so", tmp_path / "dump"
    rc = main(["-q", "compile", str(tmp_path / "enc.onnx"), "-o", str(out), "--calib", str(tmp_path / "c.npz"),
               "--shape", "ids=1..8x1..40", "--target", "cuda", "--arch", arch, "--dump", str(dump)])
    assert rc == 0
    meta = json.loads((tmp_path / "enc.json").read_text())
    assert meta["kernels"]["generic_fallbacks"] == []
    assert meta["kernels"]["gemm_kernels"] == {"dense_mma": 3, "matmul_mma": 2}
    assert any(f.startswith("IMMA.16832") for f in _sass_imma(dump, arch))
    capsys.readouterr()
    assert main(["-q", "inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["integer_only"] is True and rep["unscheduled"] == []
    assert {k: (d["min"], d["max"]) for k, d in meta["symbolic_dims"].items()} == {"batch": (1, 8), "seq": (1, 40)}


def test_symbolic_batch_of_a_cnn_builds_the_implicit_gemm(model, tmp_path):
    out, dump = tmp_path / "cnn.so", tmp_path / "dump"
    rc = main(["-q", "compile", str(model / "m.onnx"), "-o", str(out), "--calib", str(model / "calib.npz"),
               "--shape", "x=1..16x3x12x12", "--target", "cuda", "--arch", "sm_80", "--dump", str(dump)])
    assert rc == 0
    meta = json.loads((tmp_path / "cnn.json").read_text())
    assert meta["kernels"]["gemm_kernels"] == {"conv_mma": 1, "dense_mma": 1}
    assert len(meta["kernels"]["generic_fallbacks"]) == 1     # the grouped conv, as with a fixed batch
    assert any(f.startswith("IMMA.16832") for f in _sass_imma(dump, "sm_80"))
