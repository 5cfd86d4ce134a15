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
