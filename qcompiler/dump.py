"""``qc compile --dump DIR``: write what the compiler generated so anyone can read or re-check it.

  graph.txt      the integer graph (ops, dtypes, scales, shapes)
  relax.py       the lowered Relax module (before legalization)
  tir.py         the scheduled TIR of every kernel, as built
  source.*       generated host/device code (LLVM IR and assembly for CPU; CUDA C for GPUs)
  *.cubin        CUDA binaries compiled with nvcc for the target arch (CUDA only)
"""

from __future__ import annotations

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
        fmts = ("cuda",) if kind == "cuda" else ("ll", "asm")
        for fmt in fmts:
            try:
                src = m.inspect_source(fmt)
            except Exception:
                continue
            if src:
                ext = "cu" if fmt == "cuda" else fmt
                put(f"source.{k}.{kind}.{ext}", src)
                if kind == "cuda":
                    written += _cubin(d, src, opts.target.arch, k)
    return written


def _cubin(d: Path, cu: str, arch: str, k: int) -> list[str]:
    """Compile the CUDA source with nvcc for ``arch`` (no GPU needed) and disassemble it."""
    from qcompiler.errors import TargetError
    from qcompiler.kernels.cuda_mma import compile_cubin, sass_of_cubin

    out = d / f"kernels.{k}.{arch}.cubin"
    try:
        cubin = compile_cubin(cu, arch)
    except TargetError as e:
        (d / f"kernels.{k}.nvcc.log").write_text(str(e))
        return [str(d / f"kernels.{k}.nvcc.log")]
    out.write_bytes(cubin)
    written = [str(out)]
    try:
        sass = d / f"kernels.{k}.{arch}.sass"
        sass.write_text(sass_of_cubin(cubin))
        written.append(str(sass))
    except TargetError:
        pass
    return written
