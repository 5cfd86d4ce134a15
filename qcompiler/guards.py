"""Run-time guards of a specialized library (``passes/specialize_if.py``).

An ONNX ``If`` whose condition took one value on every calibration sample is compiled as the
branch it took; the library also outputs the condition (``qc_guard/<node>``, int64 1 or 0),
computed integer-only from the inputs.  model.json ``guards`` lists them; a run whose condition
differs would need the other branch, which the library does not have: ``check`` refuses it in one
line naming the node and the inputs that steer it, and drops the guard outputs from the results.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def guard_outputs(meta: dict) -> set[str]:
    return {g["output"] for g in meta.get("guards", [])}


def check(meta: dict, outputs: dict) -> dict:
    """``outputs`` (name -> array) without the guard outputs; InputError if a guard fails."""
    for g in meta.get("guards", []):
        v = outputs.get(g["output"])
        if v is None:
            continue
        if np.any(np.asarray(v).reshape(-1) != g["expected"]):
            steer = ", ".join(f"'{i}'" for i in g.get("inputs", [])) or "the inputs"
            raise InputError(f"these inputs take the other branch of If node '{g['node']}' (steered by {steer}); "
                             f"the library holds only the branch every calibration sample took: compile a library "
                             f"with calibration data of this kind for them")
    hidden = guard_outputs(meta)
    return {k: v for k, v in outputs.items() if k not in hidden}
