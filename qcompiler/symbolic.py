"""Symbolic dims: one integer graph for every size of a dynamic input dim, found by retracing.

The frontend, the float passes and quantization all run on concrete shapes (calibration runs the
model in onnxruntime; constant folding resolves every Shape / Gather / Concat chain of the export).
The scales do not depend on the shape (one per tensor), so quantizing the same model at another size
of a dynamic dim with the same calibration statistics gives the same integer graph except for the
integers that depend on that size: tensor dims, Reshape targets, constant index maps, per-position
constants.  So the graph is traced at a few sizes (a grid of two values per variable plus one more
point to check) and every such integer is fitted as a multilinear polynomial with integer
coefficients in the variables (``Poly``: ``batch * seq``, ``12 * batch``, ``seq + 1``, ...):

  * tensor dims and integer attributes (``reshape`` targets, ...) -- ``Poly``;
  * constant arrays whose extent follows a variable (a per-position requantization constant
    broadcast over the batch, position embeddings folded into an Add) -- ``SymArray``: stored once at
    the variable's largest size and sliced to the run's size, or stored with extent 1 where every
    slice along that axis is the same (a broadcast);
  * constant index maps of data-movement ops (``passes/index_map.py``: an Expand or Slice copied
    through a gather, a nearest-neighbour Resize by an integer factor) -- ``AffineMap``: flat index
    = c0 + sum_i c_i * (coordinate_i // d_i), each ``c`` a ``Poly``, each ``d`` a constant (1 but
    for the upsampled axes).

Every fitted integer and index map is checked against the trace at the largest sizes too.
Anything else (the number of nodes changes -- a recurrence unrolled over the dim --, a dim that is
no multilinear polynomial -- a strided conv's floor((W + p - k) / s) + 1 --, an index map of
another form -- a Resize by a fractional factor, a Tile of a symbolic dim) cannot be made symbolic: ``SymbolicError`` names the tensor or node and
the variable, and the caller fixes that variable (``--shape``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .errors import ModelError
from .graph import Graph


class SymbolicError(ModelError):
    """A dim cannot stay symbolic (the message names the tensor / node, the variable and why)."""


class StrideError(SymbolicError):
    """A tensor dim follows a variable in no polynomial way at consecutive sizes (a strided conv's
    floor((W + p - k) / s) + 1): the variable may still stay symbolic on a lattice of sizes, multiples
    of the model's stride (``SymVar.step``)."""


# ---- expressions -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Poly:
    """sum of coef * prod(vars) over monomials (frozensets of variable names); integer coefficients."""
    terms: tuple  # ((frozenset(vars), int coef), ...) sorted, no zero coefficients

    @staticmethod
    def const(c: int) -> "Poly":
        return Poly(((frozenset(), int(c)),) if c else ())

    @staticmethod
    def var(name: str) -> "Poly":
        return Poly(((frozenset([name]), 1),))

    @property
    def is_const(self) -> bool:
        return all(not m for m, _ in self.terms)

    @property
    def value(self) -> int:
        return sum(c for m, c in self.terms if not m)

    def vars(self) -> set[str]:
        return set().union(*[m for m, _ in self.terms]) if self.terms else set()

    def __call__(self, point: dict[str, int]) -> int:
        return int(sum(c * int(np.prod([point[v] for v in m], dtype=np.int64)) for m, c in self.terms))

    def to_prim(self, tvars: dict):
        """A TIR expression (int64) over the variables ``tvars`` (name -> tir.Var)."""
        from tvm import tirx

        e = None
        for m, c in self.terms:
            t = None
            for v in sorted(m):
                t = tvars[v] if t is None else t * tvars[v]
            t = tirx.const(int(c), "int64") if t is None else (t if c == 1 else t * int(c))
            e = t if e is None else e + t
        return e if e is not None else tirx.const(0, "int64")

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for m, c in self.terms:
            names = "*".join(sorted(m))
            parts.append(str(c) if not m else (names if c == 1 else f"{c}*{names}"))
        return " + ".join(parts).replace("+ -", "- ")

    __repr__ = __str__


def _monomials(names: list[str]) -> list[frozenset]:
    return [frozenset(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


def fit_int(values: list[int], points: list[dict[str, int]], names: list[str]) -> Poly | None:
    """The multilinear polynomial with integer coefficients through (points, values), or None.
    The first ``2^k`` points must be a grid of two values per variable (unisolvent); the rest check."""
    if all(v == values[0] for v in values):
        return Poly.const(values[0])
    monos = _monomials(names)
    n = len(monos)
    A = [[Fraction(int(np.prod([p[v] for v in m]))) for m in monos] for p in points[:n]]
    b = [Fraction(int(v)) for v in values[:n]]
    coef = _solve(A, b)
    if coef is None or any(c.denominator != 1 for c in coef):
        return None
    poly = Poly(tuple(sorted(((m, int(c)) for m, c in zip(monos, coef) if c), key=lambda t: (len(t[0]), sorted(t[0])))))
    if any(poly(p) != int(v) for p, v in zip(points, values)):
        return None
    return poly


def _solve(A, b):
    """Exact Gaussian elimination over the rationals; None when singular."""
    n = len(A)
    M = [row[:] + [b[i]] for i, row in enumerate(A)]
    for c in range(n):
        piv = next((r for r in range(c, n) if M[r][c] != 0), None)
        if piv is None:
            return None
        M[c], M[piv] = M[piv], M[c]
        for r in range(n):
            if r != c and M[r][c] != 0:
                f = M[r][c] / M[c][c]
                M[r] = [x - f * y for x, y in zip(M[r], M[c])]
    return [M[i][n] / M[i][i] for i in range(n)]


@dataclass
class SymArray:
    """A constant whose extent along ``axes`` follows variables: ``data`` holds it at the largest
    size (sliced to ``sizes[axis]`` at run time) or with extent 1 where it is a broadcast."""
    data: np.ndarray
    sizes: dict  # axis -> Poly (the run's extent); broadcast axes are absent (data extent 1)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype


@dataclass
class AffineMap:
    """A constant index map: flat index into the source = c0 + sum_i coef[i] * (coordinate_i // div[i])
    over an output of shape ``shape`` (c0, coef, shape Polys; ``div`` constant positive ints, 1 for
    an affine coordinate: a nearest-neighbour upsampling by an integer factor f reads input row
    o // f, ``passes/index_map.py``)."""
    c0: Poly
    coef: tuple
    shape: tuple
    div: tuple = ()

    def divisors(self) -> tuple:
        return self.div or (1,) * len(self.coef)

    def at(self, point: dict) -> np.ndarray:
        """The map's array at the variables' values ``point`` (int64)."""
        ev = lambda p: p(point) if isinstance(p, Poly) else int(p)  # noqa: E731
        shape = tuple(ev(d) for d in self.shape)
        grids = np.indices(shape, dtype=np.int64)
        return ev(self.c0) + sum((ev(c) * (grids[ax] // d) for ax, (c, d) in enumerate(zip(self.coef, self.divisors()))),
                                 np.zeros(shape, np.int64))


@dataclass
class SymTable:
    """A constant that follows one variable in no polynomial way (the divisor of a mean over a
    symbolic dim folded into a requantization multiplier): its value for every u of the variable's
    range, ``data[u - lo]``, traced one by one; the run picks its row."""
    var: str
    lo: int
    data: np.ndarray

    @property
    def shape(self):
        return self.data.shape[1:]


TABLE_MAX = 128
"""The most sizes a table may span (each is one trace of the model at that size)."""


@dataclass
class SymVar:
    """One dynamic dim: its name, range, where it occurs and the size the graph was calibrated at."""
    name: str
    lo: int
    hi: int
    where: list = field(default_factory=list)   # [(input name, axis)]
    calibrated: int = 0                          # its size in the calibration samples (tuning bucket)
    step: int = 1                                # sizes are step * u; the graph is fitted in u
    auto: bool = False                           # kept symbolic by default, not by --shape: falls back to
                                                 # its calibrated size where it cannot stay symbolic


def probe_values(var: SymVar, taken: set[int]) -> list[int]:
    """Three distinct values of u (the size / step) inside the range to trace at: small primes first
    (a size 1 may take special-cased paths, equal values of two variables would make their dims
    indistinguishable)."""
    cands = [7, 11, 13, 5, 17, 19, 3, 23, 29, 31, 37, 2, 41, 43, 47]
    lo, hi = -(-var.lo // var.step), var.hi // var.step
    out = [c for c in cands if lo <= c <= hi and c not in taken]
    rest = [c for c in range(max(lo, 2), hi + 1) if c not in taken and c not in out]
    out = (out + rest)[:3]
    if len(out) < 3:
        raise SymbolicError(f"dim '{var.name}' has too small a range [{var.lo}, {var.hi}] to stay symbolic; fix it "
                            f"with --shape")
    return out


def probe_points(vars_: list[SymVar]) -> list[dict[str, int]]:
    """The grid of two values per variable, then one check point (the third values); values of u
    (a variable's size is step * u)."""
    taken: set[int] = set()
    vals = {}
    for v in vars_:
        vals[v.name] = probe_values(v, taken)
        taken |= set(vals[v.name])
    names = [v.name for v in vars_]
    grid = [dict(zip(names, combo)) for combo in itertools.product(*[vals[n][:2] for n in names])]
    return grid + [{n: vals[n][2] for n in names}]


# ---- fitting a graph -------------------------------------------------------------------------

def fit_graph(traces: list[Graph], points: list[dict[str, int]], names: list[str], at_max=None,
              tabulate=None, max_point: dict[str, int] | None = None) -> Graph:
    """The symbolic graph: ``traces[0]`` with every size-dependent integer replaced (module
    docstring).  ``at_max()``: the graph traced at each variable's largest size, ``max_point``,
    where per-position constants are taken from.  ``tabulate(var)``: [(u, graph)] for every u of
    ``var``'s range, the others at their first grid value (``SymTable``; only when an integer follows
    one variable in no polynomial way).

    The probe points are close together, and an integer may follow a size in steps they do not
    show: the shift of a mean's dyadic multiplier 1 / W is the same at W = 7, 11, 13 and grows by
    one at each power of two.  So every integer fitted as a constant or a polynomial is checked
    against the other traces there are -- the one at the largest sizes (given ``max_point``) and
    those of a variable's table once one was made -- and tabulated (or refused) where it fails."""
    g0 = traces[0]
    if at_max is not None:
        at_max = _Lazy(at_max)
    global _TABULATE, _CHECKS
    _TABULATE = tabulate
    _CHECKS = _Checks(at_max if max_point is not None else None, max_point, tabulate, points[0])
    _check_structure(traces, names, points)
    out = g0.copy()
    for t, shp in g0.shapes.items():
        shapes = [tr.shapes[t] for tr in traces]
        if any(len(s) != len(shp) for s in shapes):
            raise SymbolicError(f"tensor '{t}' changes rank with {_names(names)}")
        dims = []
        for ax in range(len(shp)):
            p = fit_int([s[ax] for s in shapes], points, names)
            if p is None:
                raise SymbolicError(f"dim {ax} of tensor '{t}' takes sizes {[s[ax] for s in shapes]} at "
                                    f"{_pts(points)}: no polynomial in {_names(names)}")
            dims.append(p.value if p.is_const else p)
        out.shapes[t] = tuple(dims)
    for k, n in enumerate(g0.nodes):
        others = [tr.nodes[k] for tr in traces]
        mx = _Lazy(lambda k=k: at_max().nodes[k]) if at_max is not None else None
        out.nodes[k].attrs = {a: _fit_leaf(v, [o.attrs[a] for o in others], points, names, n, a,
                                           _Lazy(lambda a=a, mx=mx: mx().attrs[a]) if mx is not None else None,
                                           lambda g, k=k, a=a: g.nodes[k].attrs[a])
                              for a, v in n.attrs.items()}
    for c, arr in g0.consts.items():
        out.consts[c] = _fit_leaf(arr, [tr.consts[c] for tr in traces], points, names, None, c,
                                  _Lazy(lambda c=c: at_max().consts[c]) if at_max is not None else None,
                                  lambda g, c=c: g.consts[c])
    return out


_TABULATE = None
_CHECKS = None


class _Checks:
    """The traces a fitted integer is checked against beyond the probe points (``fit_graph``): the
    largest sizes, and every size of a variable whose table was made (``_Memo.seen`` of ``tabulate``)."""

    def __init__(self, at_max, max_point, tabulate, p0):
        self.at_max, self.max_point, self.tabulate, self.p0 = at_max, max_point, tabulate, p0

    def traces(self):
        if self.at_max is not None:
            yield self.max_point, self.at_max()
        for var, rows in (getattr(self.tabulate, "seen", None) or {}).items():
            for u, g in rows:
                yield {**self.p0, var: u}, g


def _holds(value_at, acc) -> bool:
    """Whether the fitted leaf (``value_at(point)``, an int or an array) equals the traced one,
    ``acc(graph)``, in every trace of ``_CHECKS``."""
    if acc is None or _CHECKS is None:
        return True
    for point, g in _CHECKS.traces():
        try:
            want = np.asarray(acc(g))
        except (IndexError, KeyError):  # a trace of another structure: the fit fails on it elsewhere
            return False
        got = np.asarray(value_at(point))
        if want.shape != got.shape or not np.array_equal(want, got):
            return False
    return True


def _variables_followed(vals, points, names) -> list[str]:
    """The variables whose equal values give equal values (the candidates the values may follow)."""
    found = []
    for v in names:
        groups: dict = {}
        ok = True
        for p, x in zip(points, vals):
            x = np.asarray(x)
            prev = groups.setdefault(p[v], x)
            if prev.shape != x.shape or not np.array_equal(prev, x):
                ok = False
                break
        if ok:
            found.append(v)
    return found


def _table(vals, points, names, acc, where):
    """A ``SymTable`` of the leaf (``acc(graph)``) over the one variable it follows, or None: each
    candidate's table over its range must give the traced value at every traced point."""
    if _TABULATE is None:
        return None
    for var in _variables_followed(vals, points, names):
        rows = _TABULATE(var)
        data = [np.asarray(acc(g)) for _, g in rows]
        if any(d.shape != data[0].shape for d in data):
            continue
        lo = rows[0][0]
        if all(0 <= p[var] - lo < len(data) and np.array_equal(data[p[var] - lo], np.asarray(x))
               for p, x in zip(points, vals)):
            return SymTable(var, lo, np.stack(data))
    return None


class _Lazy:
    """A value computed on first call (the trace at the largest sizes is made only when needed)."""

    def __init__(self, f):
        self.f, self.done, self.v = f, False, None

    def __call__(self):
        if not self.done:
            self.v, self.done = self.f(), True
        return self.v


def _names(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _pts(points) -> str:
    return "; ".join(",".join(f"{k}={v}" for k, v in p.items()) for p in points)


def _check_structure(traces, names, points) -> None:
    g0 = traces[0]
    for tr, p in zip(traces[1:], points[1:]):
        if len(tr.nodes) != len(g0.nodes) or any(a.op != b.op or a.name != b.name for a, b in zip(g0.nodes, tr.nodes)):
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(g0.nodes, tr.nodes) if a.op != b.op or a.name != b.name),
                        f"{len(g0.nodes)} vs {len(tr.nodes)} nodes")
            raise SymbolicError(f"the integer graph changes with {_names(names)} ({diff} at {_pts([points[0], p])}): "
                                "the model is unrolled or specialized over that dim; fix it with --shape")
        if tr.inputs != g0.inputs or tr.outputs != g0.outputs:
            raise SymbolicError(f"the graph's inputs / outputs change with {_names(names)}")


def _fit_leaf(v, vals, points, names, node, attr, at_max, acc=None):
    where = f"attribute '{attr}' of {node!r}" if node is not None else f"constant '{attr}'"
    if isinstance(v, dict):
        return {k: _fit_leaf(x, [o[k] for o in vals], points, names, node, f"{attr}.{k}",
                             _sub(at_max, k), (lambda g, k=k: acc(g)[k]) if acc else None) for k, x in v.items()}
    if isinstance(v, Graph):  # a loop's body: the same step at every size (qcompiler/intops/recurrent.py)
        if all(_same(o, v) for o in vals):
            return v
        raise SymbolicError(f"{where} (the loop body) changes with {_names(names)}")
    if isinstance(v, (list, tuple)) and not (v and hasattr(v[0], "op") and hasattr(v[0], "attrs")):
        if any(not isinstance(o, (list, tuple)) or len(o) != len(v) for o in vals):
            raise SymbolicError(f"{where} changes length with {_names(names)}")
        items = [_fit_leaf(x, [o[i] for o in vals], points, names, node, f"{attr}[{i}]",
                           _sub(at_max, i), (lambda g, i=i: acc(g)[i]) if acc else None) for i, x in enumerate(v)]
        return type(v)(items) if isinstance(v, tuple) else items
    if isinstance(v, (list, tuple)):  # nested nodes (epilogues): fit their attrs
        out = []
        for i, sub in enumerate(v):
            subs = [o[i] for o in vals]
            mx = _sub(at_max, i)
            out.append(dataclasses.replace(sub, attrs={a: _fit_leaf(x, [s.attrs[a] for s in subs], points, names, sub, a,
                                                                      _Lazy(lambda a=a, mx=mx: mx().attrs[a])
                                                                      if mx is not None else None,
                                                                      (lambda g, i=i, a=a: acc(g)[i].attrs[a]) if acc
                                                                      else None)
                                                       for a, x in sub.attrs.items()}))
        return type(v)(out)
    if isinstance(v, (bool, np.bool_)) or v is None or isinstance(v, (str, float, np.floating)):
        if any(o != v for o in vals):
            raise SymbolicError(f"{where} changes with {_names(names)} ({v!r} vs {vals[1]!r})")
        return v
    if isinstance(v, (int, np.integer)):
        p = fit_int([int(o) for o in vals], points, names)
        if p is not None and not _holds(p, acc):  # follows a size in a way the probe points did not show
            p = None
        if p is None:
            t = _table(vals, points, names, acc, where) if acc is not None else None
            if t is not None:
                return t
            raise SymbolicError(f"{where} takes values {[int(o) for o in vals]} at {_pts(points)}: no polynomial "
                                f"in {_names(names)}")
        return p.value if p.is_const else p
    if isinstance(v, np.ndarray):
        try:
            a = _fit_array(v, vals, points, names, where, attr, at_max, acc)
            if a is v and not _holds(lambda _: v, acc):
                raise SymbolicError(f"{where} follows {_names(names)} beyond the traced sizes")
            return a
        except SymbolicError:
            t = _table(vals, points, names, acc, where) if acc is not None else None
            if t is None:
                raise
            return t
    if all(_same(o, v) for o in vals):
        return v
    raise SymbolicError(f"{where} ({type(v).__name__}) changes with {_names(names)}")


def _sub(at_max, key):
    return _Lazy(lambda: at_max()[key]) if at_max is not None else None


def _same(a, b) -> bool:
    """Deep equality: arrays element for element, graphs (a ``loop`` body) field by field."""
    if isinstance(a, Graph) or isinstance(b, Graph):
        return isinstance(a, Graph) and isinstance(b, Graph) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(Graph))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return a is b


def _fit_array(v: np.ndarray, vals, points, names, where, attr, at_max, acc=None):
    if all(o.shape == v.shape and np.array_equal(o, v) for o in vals):
        return v
    if any(o.ndim != v.ndim for o in vals):
        raise SymbolicError(f"{where} changes rank with {_names(names)}")
    sizes = {}
    for ax in range(v.ndim):
        p = fit_int([o.shape[ax] for o in vals], points, names)
        if p is None:
            raise SymbolicError(f"{where}: extent of axis {ax} follows no polynomial in {_names(names)}")
        sizes[ax] = p
    var_axes = [ax for ax, p in sizes.items() if not p.is_const]
    if attr.endswith("indices") and np.issubdtype(v.dtype, np.integer):
        m = _fit_affine(vals, points, names, sizes)
        if m is not None and (acc is None or _holds(m.at, acc)):
            return m
    # a broadcast along the varying axes: every slice equal to the first
    if var_axes and all(_broadcast_along(o, var_axes) for o in vals):
        first = vals[0][tuple(slice(0, 1) if ax in var_axes else slice(None) for ax in range(v.ndim))]
        if all(np.array_equal(o[tuple(slice(0, 1) if ax in var_axes else slice(None) for ax in range(v.ndim))], first)
               for o in vals):
            return SymArray(np.ascontiguousarray(first), {})
    # per-position constants: every trace a prefix of the trace at the largest sizes
    if at_max is not None and var_axes:
        mx = np.asarray(at_max())
        ok = mx.ndim == v.ndim and all(
            all(o.shape[ax] <= mx.shape[ax] for ax in range(v.ndim))
            and np.array_equal(mx[tuple(slice(0, o.shape[ax]) for ax in range(v.ndim))], o) for o in vals)
        if ok:
            # broadcast axes (all slices equal at the largest size too) keep extent 1
            bcast = [ax for ax in var_axes if _broadcast_along(mx, [ax])]
            data = mx[tuple(slice(0, 1) if ax in bcast else slice(None) for ax in range(v.ndim))]
            return SymArray(np.ascontiguousarray(data), {ax: sizes[ax] for ax in var_axes if ax not in bcast})
    raise SymbolicError(f"{where}: a constant whose values change with {_names(names)} in no way the compiler can "
                        "express (neither a broadcast, a prefix of the largest size, nor an affine index map)")


def _broadcast_along(a: np.ndarray, axes) -> bool:
    for ax in axes:
        if a.shape[ax] > 1 and not np.all(a == np.take(a, [0], axis=ax)):
            return False
    return True


def _fit_affine(vals, points, names, sizes) -> AffineMap | None:
    """idx = c0 + sum_i c_i * (coord_i // d_i) on every trace, the c's polynomials in the variables,
    each d_i the same positive integer in every trace (the first coordinate along axis i where the
    index moves; 1: affine)."""
    per = []
    for o in vals:
        o = np.asarray(o, np.int64)
        if o.size == 0:
            return None
        c0 = int(o.reshape(-1)[0])
        coef, div = [], []
        for ax in range(o.ndim):
            line = np.take(o, np.arange(o.shape[ax]), axis=ax)[tuple(slice(None) if a == ax else 0
                                                                     for a in range(o.ndim))] - c0
            moved = np.flatnonzero(line)
            d = int(moved[0]) if moved.size else 1
            coef.append(int(line[d]) if moved.size else 0)
            div.append(d)
        grids = np.indices(o.shape, dtype=np.int64)
        pred = c0 + sum(c * (grids[ax] // d) for ax, (c, d) in enumerate(zip(coef, div)))
        if not np.array_equal(pred, o):
            return None
        per.append((c0, coef, div))
    c0 = fit_int([p[0] for p in per], points, names)
    if c0 is None:
        return None
    coefs, divs = [], []
    for ax in range(len(per[0][1])):
        moving = [q for q in per if q[1][ax] != 0]
        if not moving:  # the index never moves along this axis (a broadcast, or extent 1)
            coefs.append(Poly.const(0))
            divs.append(1)
            continue
        d = moving[0][2][ax]
        if len(moving) != len(per) or any(q[2][ax] != d for q in per):
            return None  # a step seen in some traces only, or a divisor that changes with the sizes
        p = fit_int([q[1][ax] for q in per], points, names)
        if p is None:
            return None
        coefs.append(p)
        divs.append(d)
    return AffineMap(c0, tuple(coefs), tuple(sizes[ax] for ax in sorted(sizes)),
                     tuple(divs) if any(d != 1 for d in divs) else ())


# ---- to TIR ----------------------------------------------------------------------------------

def tir_name(name: str) -> str:
    """The TIR variable name of a symbolic dim: an identifier (FuseTIR loses a variable whose name has
    other characters, such as Paddle2ONNX's ``p2o.DynamicDimension.1``)."""
    import re

    s = re.sub(r"\W", "_", name)
    return s if s and not s[0].isdigit() else "d_" + s


def tir_vars(names) -> dict:
    """One int64 TIR variable per symbolic dim (the Relax function's shape variables), by dim name."""
    from tvm import tirx

    return {n: tirx.Var(tir_name(n), "int64") for n in names}


def to_tir(sg: Graph, tvars: dict) -> Graph:
    """``sg`` with every ``Poly`` (dims, attributes, sizes of ``SymArray`` / ``AffineMap``) as a TIR
    expression over ``tvars``: what the Relax lowering takes."""
    def conv(v):
        if isinstance(v, Poly):
            return v.value if v.is_const else v.to_prim(tvars)
        if isinstance(v, SymArray):
            return SymArray(v.data, {ax: conv(p) for ax, p in v.sizes.items()})
        if isinstance(v, AffineMap):
            return AffineMap(conv(v.c0), tuple(conv(c) for c in v.coef), tuple(conv(d) for d in v.shape), v.div)
        if isinstance(v, SymTable):
            return SymTable(tvars[v.var], v.lo, v.data)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, tuple) and v and hasattr(v[0], "attrs") and hasattr(v[0], "op"):
            return tuple(dataclasses.replace(n, attrs=conv(n.attrs)) for n in v)
        if isinstance(v, list) and v and hasattr(v[0], "attrs") and hasattr(v[0], "op"):
            return [dataclasses.replace(n, attrs=conv(n.attrs)) for n in v]
        if isinstance(v, (tuple, list)):
            return type(v)(conv(x) for x in v)
        return v

    out = sg.copy()
    out.shapes = {t: tuple(conv(d) for d in s) for t, s in sg.shapes.items()}
    for n in out.nodes:
        n.attrs = conv(n.attrs)
    out.consts = {k: conv(v) for k, v in sg.consts.items()}
    return out


def sym_data(a) -> np.ndarray:
    """The array of a constant attribute (a ``SymArray``'s stored data, a ``SymTable``'s rows)."""
    return np.asarray(a.data if isinstance(a, (SymArray, SymTable)) else a)


def shape_prod(dims):
    """The product of dims (ints, or TIR expressions: then an expression)."""
    out = 1
    for d in dims:
        out = out * (int(d) if is_static(d) else d)
    return out


def is_static(d) -> bool:
    return isinstance(d, (int, np.integer))


def same_shape(a, b) -> bool:
    """Whether two shapes (ints and TIR expressions) are provably equal."""
    if len(a) != len(b):
        return False
    from tvm.sym import Analyzer

    an = Analyzer()
    return all((int(x) == int(y)) if is_static(x) and is_static(y) else an.can_prove_equal(x, y) for x, y in zip(a, b))
