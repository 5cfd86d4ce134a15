"""`qc compile --precision w4a8|mixed --target cuda --arch sm_80|sm_90` on a machine without a GPU.

The 4-bit conv and dense layers go through the CUDA GEMM backends (``qcompiler/kernels/backends/``
``cuda_w4a8``) to the W4A8 kernels (``conv_w4a8`` / ``dense_w4a8``: int4 weights unpacked in
registers into the s8 IMMA), and their SASS (nvcc + cuobjdump, from ``--dump``) shows
``IMMA.16832.S8.S8``, no s4 form, no emulation subroutine and no local-memory spills; the weights
are stored packed (half the INT8 bytes).  ``--precision int4`` is refused in one line naming w4a8
(sm_90 has no s4 tensor cores; on sm_80 the quantizer makes no 4-bit activations yet).
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import helper

from qcompiler.cli import main
from qcompiler.kernels import backends as KB
from tests.helpers import make_model, tensor

R = np.random.default_rng(7)

try:
    from qcompiler.kernels.cuda_mma import _tool

    _tool("nvcc"), _tool("cuobjdump")
except Exception:  # pragma: no cover - nvcc / cuobjdump are part of the supported build machine
    pytest.skip("nvcc or cuobjdump not found", allow_module_level=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_w4")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "W1", "B1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W2"], ["logits"])]
    inits = [tensor("W", (R.standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32)),
             tensor("B", (R.standard_normal(32) * 0.1).astype(np.float32)),
             tensor("W1", (R.standard_normal((64, 32, 3, 3)) * 0.1).astype(np.float32)),
             tensor("B1", (R.standard_normal(64) * 0.1).astype(np.float32)),
             tensor("W2", R.standard_normal((64, 10)).astype(np.float32))]
    m = make_model(nodes, [("x", ["N", 3, 16, 16])], [("logits", None)], inits)
    onnx.save(m, d / "m.onnx")
    np.savez(d / "calib.npz", x=R.standard_normal((8, 3, 16, 16)).astype(np.float32))
    return d


def sass_functions(text: str) -> dict[str, str]:
    """cuobjdump --dump-sass output cut per kernel: {function name: its SASS}."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def _compile(d, tag, *args):
    out, dump = d / f"m_{tag}.so", d / f"dump_{tag}"
    rc = main(["-q", "compile", str(d / "m.onnx"), "-o", str(out), "--calib", str(d / "calib.npz"),
               "--target", "cuda", "--dump", str(dump), *args])
    assert rc == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    sass = "\n".join(p.read_text() for p in dump.glob("*.sass"))
    return meta, sass_functions(sass)


def _check_w4a8_kernels(funcs: dict, arch: str, expect: set):
    w4 = {k: v for k, v in funcs.items() if "w4a8" in k}
    kinds = {("conv" if k.startswith("conv") else "dense") for k in w4}
    assert kinds == expect, (arch, sorted(funcs))
    for name, text in w4.items():
        forms = set(re.findall(r"\bIMMA\.[0-9A-Z.]+", text))
        assert forms and all(f.startswith("IMMA.16832.") and ".S4" not in f and ".U4" not in f for f in forms), \
            (arch, name, forms)
        assert not re.search(r"\bRET\.|\bCALL\b", text), f"{arch} {name}: emulated instruction (CALL/RET)"
        assert not re.search(r"\b(?:LDL|STL)\b", text), f"{arch} {name}: local memory (spills)"
        assert "LDSM" in text and "LDGSTS" in text, (arch, name)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_w4a8_cuda_build_has_int8_imma_for_4bit_layers(model, arch):
    meta, funcs = _compile(model, f"w4_{arch}", "--arch", arch, "--precision", "w4a8")
    assert meta["kernels"]["gemm"] == "cuda_mma"
    assert meta["kernels"]["gemm_kernels"] == {"conv_w4a8": 2, "dense_w4a8": 1}, meta["kernels"]
    assert meta["kernels"]["generic_fallbacks"] == []
    assert {lay["weight_bits"] for lay in meta["layers"]} == {4}
    _check_w4a8_kernels(funcs, arch, {"conv", "dense"})


def test_mixed_cuda_build_routes_each_layer(model):
    """--precision mixed with a size budget: the ILP's W4A8 layers get W4A8 kernels, the W8A8 ones
    INT8 kernels (each call names its backend)."""
    meta, funcs = _compile(model, "mixed_sm_80", "--arch", "sm_80", "--precision", "mixed", "--size-budget", "0.7",
                           "--pin", "Conv_0=8")
    plan = meta["mixed_precision"]["layers"]
    n4 = sum(1 for c in plan.values() if c == "w4a8")
    assert n4 >= 1 and plan["Conv_0"] == "w8a8", plan
    gk = meta["kernels"]["gemm_kernels"]
    assert sum(v for k, v in gk.items() if k.endswith("_w4a8")) == n4, (gk, plan)
    assert gk.get("conv_mma", 0) >= 1
    four = {("conv" if k.startswith("Conv") else "dense") for k, c in plan.items() if c == "w4a8"}
    _check_w4a8_kernels(funcs, "sm_80", four)


def test_w16_cuda_build_runs_two_int8_mma_kernels(model):
    """--pin NODE=16 on CUDA: the 16-bit-weight layer runs the INT8 tensor-core kernel twice (its
    halves, qcompiler/intops/gemm.py lower_w16), no generic fallback."""
    meta, funcs = _compile(model, "w16_sm_80", "--arch", "sm_80", "--pin", "Conv_0=16")
    bits = {lay["name"]: lay["weight_bits"] for lay in meta["layers"]}
    assert bits["Conv_0"] == 16
    assert meta["kernels"]["generic_fallbacks"] == []
    assert meta["kernels"]["gemm_kernels"].get("conv_mma", 0) >= 2, meta["kernels"]


@pytest.mark.parametrize("arch,needle", [("sm_90", "sm_90 has none"), ("sm_80", "no 4-bit activations")])
def test_int4_refused_in_one_line_naming_w4a8(model, tmp_path, capsys, arch, needle):
    rc = main(["compile", str(model / "m.onnx"), "-o", str(tmp_path / "x.so"), "--calib", str(model / "calib.npz"),
               "--target", "cuda", "--arch", arch, "--precision", "int4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "w4a8" in err[0] and needle in err[0], err


def test_select_cuda():
    """The CUDA backend registry: native s4 only with 4-bit activations where the arch has s4 mma,
    W4A8 for 4-bit weights on every arch with integer mma, INT8 otherwise, none for 16-bit inputs."""
    name = lambda b: b.name if b is not None else None  # noqa: E731
    assert name(KB.select_cuda("sm_80", 4, 4)) == "cuda_mma_s4"
    assert name(KB.select_cuda("sm_90", 4, 4)) == "cuda_mma_w4"
    for arch in ("sm_75", "sm_80", "sm_90"):
        assert name(KB.select_cuda(arch, 4, 8)) == "cuda_mma_w4"
        assert name(KB.select_cuda(arch, 8, 8)) == "cuda_mma"
        assert KB.select_cuda(arch, 8, 16) is None
    assert KB.select_cuda("sm_70", 8, 8) is None
    assert [b.name for b in KB.cuda_fallbacks(KB.get("cuda_mma_s4"), "sm_80")] == ["cuda_mma_w4", "cuda_mma"]
    assert KB.cpu_names() == tuple(KB.get(n).name for n in KB.cpu_names())   # the CPU registry is unchanged
    assert KB.cuda_names() == ("cuda_mma_s4", "cuda_mma_w4", "cuda_mma") and KB.get("cuda_mma").isa is None
    w = np.arange(-8, 8, dtype=np.int8).reshape(2, 8).repeat(4, axis=1)      # [K=2, N=32]... as [K, N]
    packed, dt = KB.get("cuda_mma_w4").pack_dense(w)
    assert dt == "int32" and packed.shape == (32, 4)


def test_cuda_backend_tuning_interface():
    """What the tuner needs of a CUDA backend: default config, config space and TIR builder of a
    workload (``Workload`` with the backend's name), for the W4A8 conv and dense kinds."""
    from qcompiler.tune.workload import Workload

    be = KB.get("cuda_mma_w4")
    conv = Workload(be.name, "conv2d", (1, 8, 8, 32, 64, 3, 3), "uint8", "int8", 0, 127, "cuda:sm_90", (1, 1),
                    (1, 1, 1, 1), (1, 1))
    dense = Workload(be.name, "dense", (4, 256, 512), "int8", "int8", -128, 127, "cuda:sm_80")
    for wl in (conv, dense):
        cfg = be.default_for(wl)
        assert cfg.bk % 64 == 0
        pts = list(be.config_points(wl))
        assert pts and all(p["bk"] % 64 == 0 for p in pts)
        f = be.make_func(wl, be.config_class()(**pts[0]))
        assert f.attrs["qc.kernel"] == "cuda_mma.w4a8"
    assert be.make_func(conv).attrs["qc.kernel"] == "cuda_mma.w4a8"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tuning_tasks_name_the_backends_the_lowering_uses(model, arch):
    """`qc tune --precision w4a8 --target cuda` tunes the workloads the compiler looks its configs up
    by: 4-bit layers as ``cuda_mma_w4`` conv2d / dense (the lowering's ``select_cuda``), INT8 ones as
    ``cuda_mma``; each builds its kernel from the backend's own TIR builder."""
    from qcompiler.targets import parse_target
    from qcompiler.tune.tuner import extract_tasks

    spec = parse_target("cuda", arch=arch)
    calib = dict(np.load(model / "calib.npz"))
    for precision, backend in (("w4a8", "cuda_mma_w4"), ("int8", "cuda_mma")):
        tasks = extract_tasks([str(model / "m.onnx")], spec, calib=calib, precision=precision)
        kinds = sorted((t.workload.backend, t.workload.kind) for t in tasks)
        assert kinds and all(b == backend for b, _ in kinds), kinds
        assert {"conv2d", "dense"} <= {k for _, k in kinds}
        for t in tasks:
            wl = t.workload
            assert type(wl.default_config()).__name__ == "MmaConfig"
            assert wl.make_func(wl.default_config()) is not None
