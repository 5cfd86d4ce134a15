"""Input shapes a library accepts: ``--shape NAME=DIMS`` and the symbolic dims of model.json.

``DIMS`` is one entry per axis joined by ``x``: an integer fixes the dim (``1x3x224x224``), ``A..B``
keeps it symbolic over that range (``input_ids=1..32x1..256``, ``x=1x3x48x32..1280``), ``?`` leaves
it as the model declares it.  A dim the ONNX model declares fixed can only be given its own size.

A library with symbolic dims (``qcompiler/symbolic.py``) records them in model.json:
``"symbolic_dims": {"seq": {"min": 1, "max": 256, "calibrated": 24, "where": [["input_ids", 1], ...]}}``
and each input's ``shape`` names its symbolic dims by those names.  Dims declared under one name in
the ONNX model (``batch_size`` in ``input_ids`` and ``attention_mask``) are one variable: the inputs
must agree on it.  ``check_feeds`` is the run-time check (one line per violation: the input, its
shape and the rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import InputError, ModelError

_DIM = re.compile(r"^(?:(\d+)|(\d+)\.\.(\d+)(?::(\d+))?|\?)$")


@dataclass
class DimRange:
    lo: int
    hi: int
    step: int = 1   # sizes are multiples of it (``32..1280:32``: an image width through strided convs)


def parse(specs: list[str] | None) -> dict[str, list]:
    """``["ids=1..32x1..256", ...]`` -> {input: [int | DimRange | None, ...]} (None: as declared)."""
    out: dict[str, list] = {}
    for s in specs or []:
        name, sep, dims = s.partition("=")
        if not sep or not name or not dims:
            raise ModelError(f"--shape '{s}': expected NAME=DIMS, e.g. input_ids=1..32x1..256 or x=1x3x224x224")
        parsed = []
        for d in dims.split("x"):
            m = _DIM.match(d.strip())
            if not m:
                raise ModelError(f"--shape '{s}': dim '{d}' is neither a size (224), a range (1..256) nor '?'")
            if m.group(1):
                v = int(m.group(1))
                if v < 1:
                    raise ModelError(f"--shape '{s}': a dim must be >= 1")
                parsed.append(v)
            elif m.group(2):
                lo, hi, step = int(m.group(2)), int(m.group(3)), int(m.group(4) or 1)
                if not 1 <= lo <= hi:
                    raise ModelError(f"--shape '{s}': range {lo}..{hi} must satisfy 1 <= min <= max")
                if step < 1 or lo % step or hi % step:
                    raise ModelError(f"--shape '{s}': in {lo}..{hi}:{step} the step must divide both ends")
                parsed.append(DimRange(lo, hi, step) if lo < hi else lo)
            else:
                parsed.append(None)
        if name in out:
            raise ModelError(f"--shape gives input '{name}' twice")
        out[name] = parsed
    return out


@dataclass
class Resolved:
    """What ``resolve`` makes of the declared inputs and ``--shape``."""
    fixed: dict = field(default_factory=dict)     # input -> {axis: size} fixed by --shape
    ranges: dict = field(default_factory=dict)    # variable name -> DimRange
    where: dict = field(default_factory=dict)     # variable name -> [(input, axis)]
    auto: set = field(default_factory=set)        # variables kept symbolic by default (``add_declared``)


def resolve(specs, given: dict[str, list]) -> Resolved:
    """Check ``--shape`` against the model's declared inputs (``frontend.InputSpec``): a dim the model
    fixes keeps its size; a range makes a declared symbolic dim a variable (named by its dim_param,
    so inputs sharing a name share it; an unnamed one '<input>_<axis>')."""
    names = {s.name: s for s in specs}
    unknown = [k for k in given if k not in names]
    if unknown:
        raise ModelError(f"--shape names input(s) {unknown}; the model's inputs are {list(names)}")
    res = Resolved()
    for s in specs:
        dims = given.get(s.name)
        if dims is None:
            continue
        if len(dims) != len(s.shape):
            raise ModelError(f"--shape {s.name}: {len(dims)} dims given; the model declares {len(s.shape)} "
                             f"({_text(s.shape)})")
        for ax, (want, decl) in enumerate(zip(dims, s.shape)):
            if want is None:
                continue
            if isinstance(decl, int):
                if want != decl:
                    raise ModelError(f"--shape {s.name}: dim {ax} is {decl} in the model; {_text([want])} contradicts it")
                continue
            if isinstance(want, int):
                res.fixed.setdefault(s.name, {})[ax] = want
                continue
            var = decl if decl != "?" else f"{s.name}_{ax}"
            prev = res.ranges.get(var)
            if prev is not None and (prev.lo, prev.hi, prev.step) != (want.lo, want.hi, want.step):
                raise ModelError(f"--shape: dim '{var}' is given ranges {_text([prev])} and {_text([want])}; "
                                 "inputs declaring the same dim must agree")
            res.ranges[var] = want
            res.where.setdefault(var, []).append((s.name, ax))
    # every other occurrence of a variable's name (an input not named in --shape) follows it
    for s in specs:
        for ax, decl in enumerate(s.shape):
            if isinstance(decl, str) and decl in res.ranges and (s.name, ax) not in res.where[decl]:
                if given.get(s.name) is not None and given[s.name][ax] is not None:
                    continue
                res.where[decl].append((s.name, ax))
    return res


AUTO_MAX = 2048
"""The default upper end of a declared-symbolic dim that ``--shape`` leaves open (a bound the model
sets, a 512-row position table, narrows it: ``driver.symbolic_graph``)."""


AUTO_STEPS = (2, 4, 8, 16, 32, 64)
"""The steps tried, smallest first, for a declared-symbolic dim that follows a stride (an image width
through strided convs): it stays symbolic over multiples of the first step under which the model's
tensor dims are polynomials (``driver._keep_symbolic``), instead of falling back to its calibration size."""


def add_declared(specs, res: Resolved) -> Resolved:
    """Keep every dim the model declares symbolic (a dim_param or an unnamed dim) symbolic by default,
    over ``1..AUTO_MAX``, unless ``--shape`` fixes or bounds it or it is a batch axis (the batch stays
    ``--batch``: a library of that many samples that ``qcompiler.load`` runs in chunks).  Such
    variables are marked ``auto``: one the compiler cannot keep symbolic (an image dim through a
    strided conv, a recurrence unrolled over time) falls back to its calibration size, said in one
    warning, instead of failing the compile (``driver.compile_model``)."""
    from .frontend import batch_axis, batch_dim_names

    bnames = batch_dim_names(specs)
    fixed = {(i, ax) for i, axes in res.fixed.items() for ax in axes}
    occ: dict[str, list] = {}
    for s in specs:
        bax = batch_axis(s, bnames)
        for ax, decl in enumerate(s.shape):
            if not isinstance(decl, str):
                continue
            var = decl if decl != "?" else f"{s.name}_{ax}"
            # (an unnamed dim is the batch only as the input's batch axis: "?" names no variable)
            occ.setdefault(var, []).append((s.name, ax, ax == bax or (decl != "?" and decl in bnames)))
    for var, where in occ.items():
        if var in res.ranges or any(b or (i, ax) in fixed for i, ax, b in where):
            continue
        res.ranges[var] = DimRange(1, AUTO_MAX)
        res.where[var] = [(i, ax) for i, ax, _ in where]
        res.auto.add(var)
    return res


def _text(dims) -> str:
    return "x".join((f"{d.lo}..{d.hi}" + (f":{d.step}" if d.step > 1 else "")) if isinstance(d, DimRange) else str(d)
                    for d in dims)


# ---- run time ----------------------------------------------------------------------------------

def input_dims(meta: dict, spec: dict) -> list:
    """The input's dims: ints, and names of symbolic dims (model.json ``symbolic_dims``)."""
    return list(spec["shape"])


def check_feeds(meta: dict, feeds: dict, skip: dict | None = None) -> None:
    """Each input's shape against the library's dims: fixed dims equal, symbolic ones in range and
    equal wherever one variable occurs.  Raises ``InputError`` (one line).  ``skip``: input -> an axis
    not checked (a fixed batch axis the caller runs in chunks)."""
    sym = meta.get("symbolic_dims") or {}
    seen: dict[str, tuple[int, str]] = {}
    for spec in meta["inputs"]:
        name = spec["name"]
        a = feeds[name]
        dims = input_dims(meta, spec)
        if a.ndim != len(dims):
            raise InputError(f"input '{name}' has shape {tuple(a.shape)}; the library takes rank {len(dims)} "
                             f"({_describe(dims, sym)})")
        for ax, (d, got) in enumerate(zip(dims, a.shape)):
            if skip and skip.get(name) == ax:
                continue
            if isinstance(d, str):
                r = sym[d]
                if not r["min"] <= got <= r["max"]:
                    raise InputError(f"input '{name}' has shape {tuple(a.shape)}: dim {ax} ('{d}') must be in "
                                     f"{r['min']}..{r['max']} (the range the library was compiled for)")
                if got % r.get("step", 1):
                    raise InputError(f"input '{name}' has shape {tuple(a.shape)}: dim {ax} ('{d}') must be a "
                                     f"multiple of {r['step']} (the library was compiled for {r['min']}..{r['max']}:"
                                     f"{r['step']})")
                prev = seen.setdefault(d, (got, name))
                if prev[0] != got:
                    raise InputError(f"inputs '{prev[1]}' and '{name}' must agree in dim '{d}' (got {prev[0]} and "
                                     f"{got})")
            elif got != d:
                raise InputError(f"input '{name}' has shape {tuple(a.shape)}; the library was compiled for "
                                 f"{_describe(dims, sym)} (dim {ax} must be {d})")


def _describe(dims, sym) -> str:
    return "(" + ", ".join(f"{d}={sym[d]['min']}..{sym[d]['max']}" if isinstance(d, str) else str(d)
                           for d in dims) + ")"
