"""``qc inspect``: a library's metadata, and whether it is integer-only, answered from its TIR.

The scheduled TIR stored in model.json at compile time is parsed back and scanned
(``qcompiler.tir_scan``): every PrimFunc touching a float type other than the entry quantize
(reads only float parameters, writes integer ones) and the exit dequantize (the converse) counts
as a float op between the boundaries; every loop nest without a parallel/vectorized/thread-bound
loop (and not trivially small) is listed as unscheduled.  A library whose boundary kernels carry
the ``qc.boundary`` marker is scanned exactly (only a marked kernel whose signature also fits is
a boundary; ``"boundaries": "marked"``); an older one by signatures alone (``"heuristic"``).  No
other flag set by the pipeline is trusted, and a marker never makes a kernel that computes in
float on integer data pass.

Float islands (``qc compile --allow-float``): ``float_islands`` lists, from model.json, each node
kept in float with its op, the reason and its kernels; ``integer_only`` is still the scan's answer
(false as soon as an island computes in float).

The library must be the one model.json describes (SHA-256 and size, ``artifact.read_metadata``); a
library built for CPU features this host lacks is still inspected (nothing of it runs).
"""

from __future__ import annotations

from .artifact import decode_text, read_metadata
from .errors import ArtifactError


def inspect_library(path) -> dict:
    meta = read_metadata(path)
    if "tir" not in meta:
        raise ArtifactError(f"{path}: the metadata holds no TIR to scan (compiled by another tool?)")
    from .tir_scan import scan_text

    scan = scan_text(decode_text(meta["tir"]))
    return {
        "library": str(path),
        "target": meta["target"], "precision": meta["precision"], "io": meta["io"], "batch": meta.get("batch"),
        "versions": {"qcompiler": meta.get("qcompiler_version"), "tvm": meta.get("tvm_version"),
                     "format": meta.get("format_version")},
        "library_sha256": meta.get("library", {}).get("sha256"),  # checked against the file by read_metadata
        "model": meta.get("model"), "calibration": meta.get("calibration"),
        "inputs": meta["inputs"], "outputs": meta["outputs"], "layers": meta["layers"],
        "symbolic_dims": meta.get("symbolic_dims"),
        "fixed_dims": meta.get("fixed_dims"),
        "integer_only": bool(scan.integer_only),
        "float_islands": list(meta.get("float_islands", [])),
        "kernels": scan.num_functions,
        "float_kernels_between_boundaries": scan.float_ops_between_boundaries,
        "float_kernels": [f.name for f in scan.functions if f.kind == "float"],
        "entry_quantize": list(scan.entry_quantize), "exit_dequantize": list(scan.exit_dequantize),
        "boundaries": scan.boundary_source,
        "unscheduled": list(scan.unscheduled),
        "generic_fallbacks": meta.get("kernels", {}).get("generic_fallbacks", []),
        "scan_source": scan.source,
    }
