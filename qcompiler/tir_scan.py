"""Scan the PrimFuncs of a lowered module: is each one scheduled, and which touch floats?

docs/design.md §2 makes "no float op between the input quantize and the output dequantize" a checked
property; §7 makes "every kernel we ship has a schedule" one.  :func:`scan_tir` answers both for an
``IRModule`` (Relax + TIR, after legalization/fusion/scheduling, or a TIR-only module), and
:func:`scan_text` answers the same from the TVMScript text of one, so ``qc inspect`` can report
on a stored lowered module without the compiler state.

Per PrimFunc (:class:`FuncScan`):

* ``scheduled`` -- it has a parallel, vectorized or unrolled loop, a GPU thread binding
  (``T.thread_binding`` / ``T.launch_thread``), a vector-typed expression (a vectorized loop
  after ``VectorizeLoop``), a ``qc.*`` loop annotation (a loop the default CPU schedule left
  serial on purpose, for LLVM's vectorizer), or is trivially small (``trip_count`` <=
  ``TRIVIAL_TRIP_COUNT``);
* ``trip_count`` -- executions of innermost statements: the sum over loop nests of the product
  of their extents (both branches of an ``if`` counted, symbolic extents as 1; a block's ``init``
  is not counted, it runs once per output -- after ``decompose_reduction`` it is a loop nest of
  its own and is);
* ``float_dtypes`` -- every float type it touches: buffer element types (params and
  allocations), casts, float immediates, float-typed operations;
* ``float_params`` / ``read_params`` / ``written_params`` -- by name, from its loads and stores;
* ``boundary`` -- the ``qc.boundary`` PrimFunc attribute (``"quantize"`` / ``"dequantize"``) the
  compiler puts on the kernels it emits for the model's input quantize and output dequantize
  (``qcompiler.lowering.build``: each a PrimFunc of its own, opaque to FuseOps), or None;
* ``kind`` -- ``"integer"`` (touches no float), ``"entry_quantize"`` (touches floats; every
  param it reads is float, every param it writes is integer), ``"exit_dequantize"`` (every param
  it reads is integer, every param it writes is float) or ``"float"`` (anything else touching a
  float).

Boundaries.  A module in which some PrimFunc carries a ``qc.boundary`` marker is scanned
*exactly*: only a marked kernel can be a boundary, and only if its signature also fits (a marked
quantize that reads an integer tensor, or writes a float one, is a float op); an unmarked
float-touching kernel is a float op however its signature looks.  A module without markers (a
library from before the markers) falls back to the signature heuristic above
(``ScanReport.boundary_source`` says which).

:class:`ScanReport` adds the module-level summary: ``float_ops_between_boundaries`` counts the
``"float"`` functions, and ``integer_only`` is ``float_ops_between_boundaries == 0``.

Text: :func:`module_to_text` prints only the PrimFuncs of a module (with metadata, so it parses
back; the Relax part of a compiled model carries its weights as metadata and is not needed).
:func:`scan_text` parses a text with ``tvm.script.from_source`` (0.27 parses these modules back
structurally equal, with ``show_meta=True``); a text that does not parse as a whole (e.g.
``mod.script()`` of a Relax module with constants, printed without metadata) is split into its
``@T.prim_func`` definitions, each parsed alone; a definition that still does not parse is
scanned as text (regular expressions; ``FuncScan.parsed`` is False for it).
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir import IRModule

TRIVIAL_TRIP_COUNT = 4096
"""A PrimFunc with at most this many innermost executions needs no schedule (a few us scalar)."""

BOUNDARY_ATTR = "qc.boundary"
"""PrimFunc attribute marking a boundary kernel; its value is one of ``BOUNDARY_KINDS``."""
BOUNDARY_KINDS = {"quantize": "entry_quantize", "dequantize": "exit_dequantize"}

_FLOAT8_PREFIXES = ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "e8m0")
_SCHEDULED_KINDS = {
    tirx.ForKind.PARALLEL: "parallel",
    tirx.ForKind.VECTORIZED: "vectorized",
    tirx.ForKind.UNROLLED: "unrolled",
    tirx.ForKind.THREAD_BINDING: "thread_binding",
}


def is_float_dtype(dtype: str) -> bool:
    """float16/32/64, bfloat16, the float8/float4 families, and vectors of them."""
    dtype = str(dtype)
    return "float" in dtype or dtype.startswith(_FLOAT8_PREFIXES)


@dataclass(frozen=True)
class FuncScan:
    """What :func:`scan_tir` found in one PrimFunc (see the module docs for each field)."""

    name: str
    scheduled: bool
    schedule_marks: tuple[str, ...]
    trip_count: int
    trivially_small: bool
    float_dtypes: tuple[str, ...]
    param_dtypes: tuple[tuple[str, str], ...]
    float_params: tuple[str, ...]
    read_params: tuple[str, ...]
    written_params: tuple[str, ...]
    kind: str
    parsed: bool = True
    boundary: str | None = None

    def __post_init__(self):
        if self.kind not in ("integer", "entry_quantize", "exit_dequantize", "float"):
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.boundary is not None and self.boundary not in BOUNDARY_KINDS:
            raise ValueError(f"{self.name}: unknown boundary marker {self.boundary!r}")
        if self.trip_count < 0:
            raise ValueError("trip_count must be >= 0")
        if (self.kind == "integer") != (not self.float_dtypes):
            raise ValueError(f"{self.name}: kind {self.kind!r} disagrees with {self.float_dtypes}")

    @property
    def touches_float(self) -> bool:
        return bool(self.float_dtypes)


@dataclass(frozen=True)
class ScanReport:
    """Per-function scans plus the module-level summary."""

    functions: tuple[FuncScan, ...]
    source: str  # "ir", "text", "text:per-function"

    @property
    def num_functions(self) -> int:
        return len(self.functions)

    @property
    def unscheduled(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.functions if not f.scheduled)

    @property
    def all_scheduled(self) -> bool:
        return not self.unscheduled

    @property
    def float_functions(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.functions if f.touches_float)

    @property
    def entry_quantize(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.functions if f.kind == "entry_quantize")

    @property
    def exit_dequantize(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.functions if f.kind == "exit_dequantize")

    @property
    def float_ops_between_boundaries(self) -> int:
        return sum(1 for f in self.functions if f.kind == "float")

    @property
    def integer_only(self) -> bool:
        return self.float_ops_between_boundaries == 0

    @property
    def float_islands(self) -> tuple[str, ...]:
        """Names of the float functions between the boundaries."""
        return tuple(f.name for f in self.functions if f.kind == "float")

    @property
    def boundary_source(self) -> str:
        """``"marked"`` (boundaries told by the ``qc.boundary`` markers, exact) or ``"heuristic"``
        (no marker in the module: boundaries told by their signatures)."""
        return "marked" if any(f.boundary for f in self.functions) else "heuristic"

    @property
    def total_trip_count(self) -> int:
        return sum(f.trip_count for f in self.functions)

    def get(self, name: str) -> FuncScan:
        for f in self.functions:
            if f.name == name:
                return f
        raise KeyError(name)

    def summary(self) -> str:
        """A few lines for ``qc inspect``."""
        lines = [
            f"{self.num_functions} PrimFuncs, {self.num_functions - len(self.unscheduled)} "
            f"scheduled, {self.total_trip_count} innermost iterations in all",
            f"integer-only: {'yes' if self.integer_only else 'NO'} "
            f"({self.float_ops_between_boundaries} float functions between the boundaries; "
            f"entry quantize: {len(self.entry_quantize)}, exit dequantize: "
            f"{len(self.exit_dequantize)}; boundaries {self.boundary_source})",
        ]
        for f in self.functions:
            if f.kind == "float":
                lines.append(f"  float op: {f.name} ({', '.join(f.float_dtypes)})")
        for name in self.unscheduled:
            lines.append(f"  unscheduled: {name}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# IR scan
# --------------------------------------------------------------------------------------------


def scan_tir(mod: IRModule) -> ScanReport:
    """Scan every PrimFunc of ``mod`` (Relax functions are ignored)."""
    return _report(
        [scan_prim_func(func, gvar.name_hint) for gvar, func in _sorted_items(mod)
         if isinstance(func, tirx.PrimFunc)],
        "ir",
    )


def _report(scans, source: str) -> ScanReport:
    """The report over per-function scans; with a boundary marker anywhere, only marked
    functions are boundaries (module docs)."""
    scans = list(scans)
    if any(f.boundary for f in scans):
        scans = [_exact_kind(f) for f in scans]
    return ScanReport(functions=tuple(scans), source=source)


def _exact_kind(f: FuncScan) -> FuncScan:
    if f.kind == "integer":
        return f
    # the signature check of _classify holds for a true boundary; the marker must agree with it
    kind = f.kind if f.boundary is not None and BOUNDARY_KINDS[f.boundary] == f.kind else "float"
    return f if kind == f.kind else dataclasses.replace(f, kind=kind)


def boundary_of(func: tirx.PrimFunc) -> str | None:
    """The ``qc.boundary`` marker of a PrimFunc (None if absent or not a known kind)."""
    attrs = func.attrs
    if attrs is None or BOUNDARY_ATTR not in attrs:
        return None
    value = str(attrs[BOUNDARY_ATTR])
    return value if value in BOUNDARY_KINDS else None


def _sorted_items(mod: IRModule):
    return sorted(mod.functions_items(), key=lambda kv: kv[0].name_hint)


def _dtype_of(node) -> str | None:
    ty = getattr(node, "ty", None)
    return str(ty.dtype) if isinstance(ty, tvm.ir.PrimType) else None


def _buffer_dtype(buf) -> str | None:
    try:
        return str(buf.dtype)
    except Exception:  # pylint: disable=broad-except
        return None


def scan_prim_func(func: tirx.PrimFunc, name: str) -> FuncScan:
    """Scan one PrimFunc (see :class:`FuncScan`)."""
    params = list(func.params)
    param_names = [str(p.name) for p in params]
    param_dtypes = []
    for p in params:
        dtype = _buffer_dtype(p) if isinstance(getattr(p, "ty", None), tirx.BufferType) else None
        param_dtypes.append(dtype or _dtype_of(p) or "handle")

    floats: set[str] = set()
    marks: set[str] = set()
    loads, stores = [], []

    def _expr(node):
        dtype = _dtype_of(node)
        if dtype is not None and is_float_dtype(dtype):
            floats.add(dtype)
        if isinstance(node, (tirx.Ramp, tirx.Broadcast)):
            marks.add("vector")

    def _load(node):
        loads.append(node.source)
        _expr(node)

    def _store(node):
        stores.append(node.buffer)

    def _for(node):
        kind = _SCHEDULED_KINDS.get(node.kind)
        if kind is not None:
            marks.add(kind)
        annotations = node.annotations if node.annotations is not None else {}
        if any(str(k).startswith("qc.") for k in annotations.keys()):
            marks.add("annotated")

    def _attr(node):
        if node.attr_key in ("thread_extent", "virtual_thread"):
            marks.add("thread_binding")

    def _buffer_type(node):
        dtype = str(node.dtype) if hasattr(node, "dtype") else None
        if dtype is not None and is_float_dtype(dtype):
            floats.add(dtype)

    tvm_ffi.structural_walk(
        func.body,
        [
            (tvm.ir.TensorLoad, _load),
            (tirx.BufferStore, _store),
            (tirx.For, _for),
            (tirx.AttrStmt, _attr),
            (tirx.BufferType, _buffer_type),
            (tirx.Expr, _expr),
        ],
    )
    for dtype in param_dtypes:
        if is_float_dtype(dtype):
            floats.add(dtype)

    read = _match_params(params, loads)
    written = _match_params(params, stores)
    return _func_scan(name, marks, _trip_count(func.body), floats, tuple(zip(param_names, param_dtypes)),
                      [param_names[i] for i in sorted(read - written)], [param_names[i] for i in sorted(written)],
                      boundary=boundary_of(func))


def _func_scan(name, marks, trip, floats, param_dtypes, read, written, parsed: bool = True,
               boundary: str | None = None) -> FuncScan:
    """The FuncScan of one function's findings (the derived fields computed here, for both scans)."""
    small = trip <= TRIVIAL_TRIP_COUNT
    float_list = sorted(floats)
    return FuncScan(
        name=name,
        scheduled=bool(marks) or small,
        schedule_marks=tuple(sorted(marks)),
        trip_count=trip,
        trivially_small=small,
        float_dtypes=tuple(float_list),
        param_dtypes=tuple(param_dtypes),
        float_params=tuple(p for p, d in param_dtypes if is_float_dtype(d)),
        read_params=tuple(read),
        written_params=tuple(written),
        kind=_classify(float_list, read, written, dict(param_dtypes)),
        parsed=parsed,
        boundary=boundary,
    )


def _match_params(params, buffers) -> set[int]:
    """Indices of the params the given buffers are (by identity, shared data, or name: a
    flattened ``x_1 = T.decl_buffer(..., data=x.data)`` after lowering)."""
    out = set()
    by_name = {str(p.name): i for i, p in enumerate(params)}
    datas = {}
    for i, p in enumerate(params):
        try:
            datas[i] = p.data
        except Exception:  # pylint: disable=broad-except
            pass
    for buf in buffers:
        hit = next((i for i, p in enumerate(params) if buf.same_as(p)), None)
        if hit is None:
            data = getattr(buf, "data", None)
            if data is not None:
                hit = next((i for i, d in datas.items() if d is not None and d.same_as(data)), None)
        if hit is None:
            name = re.sub(r"_\d+$", "", str(buf.name))
            hit = by_name.get(str(buf.name), by_name.get(name))
        if hit is not None:
            out.add(hit)
    return out


def _classify(floats, read_names, written_names, dtype_of) -> str:
    if not floats:
        return "integer"
    reads = [dtype_of.get(n, "") for n in read_names]
    writes = [dtype_of.get(n, "") for n in written_names]
    if reads and writes:
        if all(is_float_dtype(d) for d in reads) and not any(is_float_dtype(d) for d in writes):
            return "entry_quantize"
        if not any(is_float_dtype(d) for d in reads) and all(is_float_dtype(d) for d in writes):
            return "exit_dequantize"
    return "float"


def _trip_count(stmt) -> int:
    """Innermost executions: For multiplies, sequences add, both branches of an if count, a
    block's init does not."""
    if stmt is None:
        return 0
    if isinstance(stmt, tirx.For):
        ext = stmt.extent
        n = int(ext) if isinstance(ext, tirx.IntImm) else 1
        return n * _trip_count(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        return sum(_trip_count(s) for s in stmt.seq)
    if isinstance(stmt, tirx.IfThenElse):
        return _trip_count(stmt.then_case) + _trip_count(stmt.else_case)
    if isinstance(stmt, tvm.s_tir.SBlockRealize):
        return _trip_count(stmt.block)
    if isinstance(stmt, tvm.s_tir.SBlock):
        return _trip_count(stmt.body)
    body = getattr(stmt, "body", None)
    if isinstance(body, tirx.Stmt):
        return _trip_count(body)
    return 1


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------


def module_to_text(mod: IRModule) -> str:
    """TVMScript of the PrimFuncs of ``mod`` (metadata included), for :func:`scan_text`."""
    tir = IRModule({gvar: func for gvar, func in _sorted_items(mod) if isinstance(func, tirx.PrimFunc)})
    return tir.script(show_meta=True)


def scan_text(text: str) -> ScanReport:
    """:func:`scan_tir` from the TVMScript text of a module (see the module docs)."""
    try:
        parsed = tvm.script.from_source(_strip_imports(text))
    except Exception:  # pylint: disable=broad-except
        parsed = None
    if isinstance(parsed, IRModule):
        report = scan_tir(parsed)
        return ScanReport(functions=report.functions, source="text")
    if isinstance(parsed, tirx.PrimFunc):
        name = _first_def_name(text) or "main"
        return _report([scan_prim_func(parsed, name)], "text")
    scans = []
    for name, chunk in _prim_func_chunks(text):
        try:
            func = tvm.script.from_source(chunk)
            if not isinstance(func, tirx.PrimFunc):
                raise TypeError(type(func).__name__)
            scans.append(scan_prim_func(func, name))
        except Exception:  # pylint: disable=broad-except
            scans.append(_scan_chunk_regex(name, chunk))
    scans.sort(key=lambda s: s.name)
    return _report(scans, "text:per-function")


def _strip_imports(text: str) -> str:
    """from_source accepts no import statements (printed scripts carry them as comments)."""
    return "\n".join(
        "" if re.match(r"\s*(from\s+\S+\s+)?import\s", line) else line for line in text.splitlines()
    )


def _first_def_name(text: str) -> str | None:
    m = re.search(r"^\s*def\s+(\w+)\s*\(", text, re.M)
    return m.group(1) if m else None


_DECORATOR = re.compile(r"^(?P<indent>[ \t]*)@T\.prim_func\b.*$", re.M)


def _prim_func_chunks(text: str) -> list[tuple[str, str]]:
    """Each ``@T.prim_func`` definition of a printed module: (name, dedented source)."""
    lines = _strip_imports(text).splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = _DECORATOR.match(lines[i])
        if not m:
            i += 1
            continue
        indent = len(m.group("indent").expandtabs())
        j = i + 1
        while j < len(lines) and not re.match(r"\s*def\s", lines[j]):
            j += 1  # more decorators
        k = j + 1
        while k < len(lines):
            line = lines[k]
            if line.strip() and len(line.expandtabs()) - len(line.expandtabs().lstrip()) <= indent:
                break
            k += 1
        chunk = textwrap.dedent("\n".join(lines[i:k]))
        name = _first_def_name(chunk) or f"func{len(out)}"
        out.append((name, chunk))
        i = k
    return out


_PARAM = re.compile(r"(\w+)\s*:\s*T\.(Buffer|handle|int\d+|uint\d+|float\d+|bool)\b\(?")


def _split_header(chunk: str) -> tuple[str, str]:
    """(the ``def name(...)`` signature, the rest) of one printed PrimFunc."""
    m = re.search(r"\bdef\s+\w+\s*\(", chunk)
    if not m:
        return "", chunk
    depth, i = 1, m.end()
    while i < len(chunk) and depth:
        depth += {"(": 1, ")": -1}.get(chunk[i], 0)
        i += 1
    return chunk[m.end() : i - 1], chunk[i:]


def _params_from_header(header: str):
    """(name, dtype) of each parameter; a buffer's dtype is the first string in its T.Buffer."""
    for part in _split_top(header):
        m = _PARAM.match(part.strip())
        if not m:
            continue
        if m.group(2) == "Buffer":
            d = re.search(r"\"(\w+)\"", part)
            yield m.group(1), d.group(1) if d else "float32"
        else:
            yield m.group(1), m.group(2)
_FLOAT_TOKEN = re.compile(r"\b(bfloat16|float(?:8|16|32|64)\w*|e[2-8]m[0-3]\w*)\b")
_GRID = re.compile(
    r"for\s+[\w\s,]+\s+in\s+T\.(grid|serial|parallel|vectorized|unroll|thread_binding)\((.*)\)\s*:\s*$"
)
_RANGE = re.compile(r"for\s+\w+\s+in\s+range\((.*)\)\s*:\s*$")
_BOUNDARY_TEXT = re.compile(r"T\.func_attr\(\{[^}]*\"" + re.escape(BOUNDARY_ATTR) + r"\":\s*\"(\w+)\"")


def _scan_chunk_regex(name: str, chunk: str) -> FuncScan:
    """A text-only scan of one printed PrimFunc, for a definition ``from_source`` rejects."""
    header, body = _split_header(chunk)
    param_dtypes = tuple(_params_from_header(header))
    floats = set(_FLOAT_TOKEN.findall(chunk))
    marks = set()
    for pattern, mark in (
        (r"T\.parallel\(", "parallel"),
        (r"T\.vectorized\(", "vectorized"),
        (r"T\.unroll\(", "unrolled"),
        (r"T\.thread_binding\(|T\.launch_thread\(|threadIdx|blockIdx", "thread_binding"),
        (r"T\.Ramp\(|T\.Broadcast\(", "vector"),
        (r"annotations=\{[^}]*\"qc\.", "annotated"),  # a loop annotation, not T.func_attr
    ):
        if re.search(pattern, body):
            marks.add(mark)
    written = []
    read = []
    for p, _ in param_dtypes:
        access = rf"\b{re.escape(p)}(?:_\d+)?\["  # x[...] or its flattened x_1[...]
        store = access + r"[^\]]*\]\s*=(?!=)"
        if re.search(store, body):
            written.append(p)
        if re.search(access, re.sub(store, "", body)):
            read.append(p)
    read = [p for p in read if p not in written]
    m = _BOUNDARY_TEXT.search(chunk)
    boundary = m.group(1) if m and m.group(1) in BOUNDARY_KINDS else None
    return _func_scan(name, marks, _regex_trip_count(body), floats, param_dtypes, read, written, parsed=False,
                      boundary=boundary)


def _regex_trip_count(body: str) -> int:
    """Sum over innermost loop lines of the product of the extents of the loops enclosing
    them, from indentation (extents that are not integer literals count as 1)."""
    stack: list[tuple[int, int]] = []  # (indent, extent product so far)
    total = 0
    init_indent = None  # inside `with T.init():` (not counted, as in the IR scan)
    for line in body.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if init_indent is not None:
            if indent > init_indent:
                continue
            init_indent = None
        if re.match(r"\s*with\s+T\.init\(\)\s*:", line):
            init_indent = indent
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        ext = None
        m = _GRID.search(line)
        if m:
            ext = math.prod(_literal_ints(m.group(2), grid=m.group(1) == "grid"))
        else:
            m = _RANGE.search(line)
            if m:
                ext = math.prod(_literal_ints(m.group(1), grid=False))
        if ext is not None:
            outer = stack[-1][1] if stack else 1
            stack.append((indent, outer * ext))
            continue
        if re.search(r"\]\s*=(?!=)", line):  # a store
            total += stack[-1][1] if stack else 1
    return total


def _literal_ints(args: str, grid: bool) -> list[int]:
    """Extents of ``T.grid(a, b, ...)``, or of ``range(n)`` / ``range(lo, hi)`` / ``T.parallel``
    and friends; a non-literal extent counts as 1."""
    vals = []
    for a in _split_top(args):
        a = a.strip()
        if "=" in a and not a.startswith("("):
            continue  # keyword argument (thread="...", annotations=...)
        m = re.fullmatch(r"(?:T\.int(?:8|16|32|64)\()?\s*(-?\d+)\s*\)?", a)
        vals.append(int(m.group(1)) if m else None)
    if grid:
        return [v if v is not None else 1 for v in vals] or [1]
    if len(vals) >= 2 and vals[0] is not None and vals[1] is not None:
        return [max(0, vals[1] - vals[0])]
    return [vals[0] if vals and vals[0] is not None else 1]


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return parts


# --------------------------------------------------------------------------------------------
# what a float function does (for compile-time errors)
# --------------------------------------------------------------------------------------------

_OP_NAMES = {"Mul": "multiply", "Add": "add", "Sub": "subtract", "Div": "divide", "Mod": "mod",
             "FloorDiv": "floor_divide", "FloorMod": "floor_mod", "Min": "min", "Max": "max"}
_CMP_NAMES = ("EQ", "NE", "LT", "LE", "GT", "GE")


def float_ops(func: tirx.PrimFunc) -> tuple[str, ...]:
    """The float operations of a PrimFunc, by name, sorted: arithmetic on float values
    (``multiply``, ``add``, ...), intrinsic calls (``round``, ``exp``, ...), comparisons of floats,
    and ``cast`` to or from a float type; ``load/store`` when it only moves float data."""
    ops: set[str] = set()
    moves = []

    def _expr(node):
        kind = type(node).__name__
        dtype = _dtype_of(node)
        is_f = dtype is not None and is_float_dtype(dtype)
        if kind == "Cast":
            if is_f or is_float_dtype(_dtype_of(node.value) or ""):
                ops.add("cast")
        elif kind in _OP_NAMES:
            if is_f:
                ops.add(_OP_NAMES[kind])
        elif kind in _CMP_NAMES:
            if is_float_dtype(_dtype_of(node.a) or ""):
                ops.add("compare")
        elif kind == "Call":
            if is_f or any(is_float_dtype(_dtype_of(a) or "") for a in node.args):
                name = str(getattr(node.op, "name", node.op))
                ops.add(name.split(".")[-1])
        elif kind == "Select":
            if is_f:
                ops.add("select")
        elif is_f:
            moves.append(kind)

    def _buffer_type(node):
        if is_float_dtype(str(getattr(node, "dtype", ""))):
            moves.append("buffer")

    tvm_ffi.structural_walk(func.body, [(tirx.BufferType, _buffer_type), (tirx.Expr, _expr)])
    if not ops and (moves or any(_param_is_float(p) for p in func.params)):
        ops.add("load/store")
    return tuple(sorted(ops))


def _param_is_float(p) -> bool:
    dtype = _buffer_dtype(p) if isinstance(getattr(p, "ty", None), tirx.BufferType) else _dtype_of(p)
    return bool(dtype) and is_float_dtype(dtype)


def describe_float_functions(mod: IRModule, report: ScanReport | None = None, limit: int = 5) -> str:
    """One line naming the float functions between the boundaries of ``mod`` and what float ops
    each holds: ``name (float32: cast, multiply, round); ...`` (at most ``limit``, then a count)."""
    report = report if report is not None else scan_tir(mod)
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    parts = []
    for name in report.float_islands[:limit]:
        scan = report.get(name)
        ops = float_ops(funcs[name]) if name in funcs else ()
        parts.append(f"{name} ({', '.join(scan.float_dtypes)}: {', '.join(ops) or 'float data'})")
    more = len(report.float_islands) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
