"""``qc compile --dump DIR``: write what the compiler generated so anyone can read or re-check it.

  graph.txt      the integer graph (ops, dtypes, scales, shapes)
  relax.py       the lowered Relax module (before legalization)
  tir.py         the scheduled TIR of every kernel, as built
  source.*       generated host/device code (LLVM IR and assembly for CPU; CUDA C for GPUs)
  *.cubin        CUDA binaries compiled with nvcc for the target arch (CUDA only)
"""

from __future__ import annotations

import os
from pathlib import Path


def graph_text(ig) -> str:
    lines = [f"inputs: {ig.inputs}", f"outputs: {ig.outputs}"]
    for n in ig.nodes:
        o = n.outputs[0]
        q = ig.qparams.get(o)
        scale = f" scale={q.scale:.6g}" if q is not None else ""
        lines.append(f"{o}: {ig.dtypes[o]}{list(ig.shapes[o])}{scale} = {n.op}({', '.join(n.inputs)})  # {n.name}")
    return "\n".join(lines) + "\n"


def _modules(mod, seen=None):
    seen = seen if seen is not None else set()
    yield mod
    for m in getattr(mod, "imports", []) or []:
        if id(m) not in seen:
            seen.add(id(m))
            yield from _modules(m, seen)


def write_dump(d: Path, ig, res, tir_text: str, opts) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name, text, mode="w"):
        p = d / name
        with open(p, mode) as f:
            f.write(text)
        written.append(str(p))

    put("graph.txt", graph_text(ig))
    put("relax.py", res.relax_mod.script())
    put("tir.py", tir_text)
    for k, m in enumerate(_modules(res.executable.mod)):
        kind = getattr(m, "kind", None) or getattr(m, "type_key", "module")
        for fmt in ("ll", "asm", "cu", "ptx"):
            try:
                src = m.inspect_source(fmt)
            except Exception:
                continue
            if src:
                put(f"source.{k}.{kind}.{fmt}", src)
                if fmt == "cu" and opts.target.kind == "cuda":
                    written += _cubin(d, src, opts.target.arch, k)
    return written


def _cubin(d: Path, cu: str, arch: str, k: int) -> list[str]:
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    src = d / f"kernels.{k}.cu"
    out = d / f"kernels.{k}.{arch}.cubin"
    src.write_text(cu)
    r = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-o", str(out), str(src)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        (d / f"kernels.{k}.nvcc.log").write_text(r.stderr)
        return [str(src)]
    return [str(src), str(out)]
