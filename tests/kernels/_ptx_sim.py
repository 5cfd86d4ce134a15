"""A lock-step SIMT interpreter for the TIR of the CUDA tensor-core kernels (no GPU needed).

It executes the *unlowered* PrimFunc that ``qcompiler.kernels.cuda_mma`` emits, one thread block
at a time, every statement for all threads of the block at once (NumPy arrays over threadIdx.x),
and gives the PTX instructions their ISA meaning, written here from the PTX ISA's fragment tables
(section 9.7.16.5) independently of the kernel generator:

  ldmatrix.m8n8.x4.b16   lane l addresses row l % 8 of matrix l // 8; register j of lane t is
                         bytes 4(t%4)..4(t%4)+3 of row t // 4 of matrix j
  mma.m16n8k32 / m16n8k64 / m8n8k16 / m8n8k32 (s8 u8 s4 u4 -> s32)
  cp.async (with src-size zero fill), commit_group / wait_group N: copies are *deferred* until
                         the wait that retires their group, so a read of the ring before the
                         matching wait sees stale bytes and the result goes wrong
  ld.global / st.shared (.u32, .v2.u32, .v4.u32)

Integer semantics follow C/TIR: wrap-around of fixed-width types, floor division for
FloorDiv/FloorMod, arithmetic right shift of signed values.  Barriers are no-ops (lock step).
What this does not check: races between warps (it runs them in lock step), timing, and anything
the CUDA compiler does after TIR.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.ir import Call, TensorLoad
from tvm.ir.prim import expr as E
from tvm.tirx import stmt as S

_NP = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
       "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64, "bool": np.bool_}


def _dt(node) -> str:
    ty = node.ty
    return ty.dtype if hasattr(ty, "dtype") else "handle"


class _Mem:
    """A flat byte view of one buffer's storage."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.bytes = arr.reshape(-1).view(np.uint8)


class GAddr:
    def __init__(self, mem: _Mem, off: np.ndarray):
        self.mem, self.off = mem, off


class SimError(AssertionError):
    pass


class Sim:
    def __init__(self, func, args: list[np.ndarray]):
        self.func = func
        self.storage = {}     # buffer Var -> _Mem (global and shared)
        self.local = {}       # buffer Var -> np array [NT, n]
        self.alias = {}       # DeclBuffer Var -> the buffer Var whose storage it views
        for p, a in zip(func.params, args, strict=True):
            buf = p
            if tuple(int(s) for s in buf.shape) != a.shape or str(buf.dtype) != str(a.dtype):
                raise SimError(f"arg {buf.name}: expected {buf.shape} {buf.dtype}, got {a.shape} {a.dtype}")
            self.storage[buf] = _Mem(a)
        self.env = {}
        self.nt = None
        self.smem_base = {}
        self.pending = None

    # ---------------------------------------------------------------- driver
    def run(self):
        self._block_loops(self.func.body, {})

    def _block_loops(self, stmt, fixed):
        """Walk down to the threadIdx loop, iterating blockIdx loops in Python."""
        if isinstance(stmt, S.SeqStmt):
            for s in stmt.seq:
                self._block_loops(s, fixed)
            return
        if isinstance(stmt, S.DeclBuffer):
            self._decl(stmt)
            return
        if isinstance(stmt, S.For) and stmt.thread_binding is not None:
            tag = stmt.thread_binding.thread_tag
            if tag.startswith("blockIdx"):
                for i in range(int(stmt.extent)):
                    self.env[stmt.loop_var] = np.int32(i)
                    self._block_loops(stmt.body, fixed)
                return
            if tag == "threadIdx.x":
                self.nt = int(stmt.extent)
                if self.nt % 32:
                    raise SimError("block size must be whole warps")
                self.env[stmt.loop_var] = np.arange(self.nt, dtype=np.int32)
                self.local, self.pending = {}, [[] for _ in range(self.nt)]
                self.groups = [[] for _ in range(self.nt)]
                mask = np.ones(self.nt, dtype=bool)
                self.exec(stmt.body, mask)
                for t in range(self.nt):
                    if self.pending[t] or any(self.groups[t]):
                        # outstanding copies at exit are harmless only if never read; flush
                        pass
                return
        raise SimError(f"unexpected statement outside the thread loop: {type(stmt).__name__}")

    def _decl(self, st):
        self.alias[st.buffer] = self._data_owner(st.data)

    def _data_owner(self, data):
        if isinstance(data, Call) and data.op.name == "tirx.buffer_data":
            return self._buf(data.args[0])
        raise SimError(f"unsupported buffer data expression {data}")

    def _buf(self, b):
        while b in self.alias:
            b = self.alias[b]
        return b

    # ---------------------------------------------------------------- statements
    def exec(self, stmt, mask):
        self.mask = mask
        if isinstance(stmt, S.SeqStmt):
            for s in stmt.seq:
                self.exec(s, mask)
        elif isinstance(stmt, S.AllocBuffer):
            buf = stmt.buffer
            n = int(np.prod([int(s) for s in buf.shape]))
            scope = buf.scope()
            if scope == "local":
                self.local[buf] = np.zeros((self.nt, n), dtype=_NP[str(buf.dtype)])
            elif scope.startswith("shared"):
                arr = np.full(n, 0x5A, dtype=_NP[str(buf.dtype)])  # garbage, not zeros
                self.storage[buf] = _Mem(arr)
                self.smem_base[buf] = 0
            else:
                raise SimError(f"alloc in scope {scope}")
        elif isinstance(stmt, S.DeclBuffer):
            self._decl(stmt)
        elif isinstance(stmt, S.BufferStore):
            self.store(stmt, mask)
        elif isinstance(stmt, S.For):
            if stmt.thread_binding is not None:
                raise SimError("nested thread binding")
            lo, ext = self.scalar(stmt.min), self.scalar(stmt.extent)
            for i in range(lo, lo + ext):
                self.env[stmt.loop_var] = np.int32(i)
                self.exec(stmt.body, mask)
            self.mask = mask
        elif isinstance(stmt, S.IfThenElse):
            c = np.broadcast_to(self.ev(stmt.condition), (self.nt,)).astype(bool)
            if (mask & c).any():
                self.exec(stmt.then_case, mask & c)
            if stmt.else_case is not None and (mask & ~c).any():
                self.exec(stmt.else_case, mask & ~c)
            self.mask = mask
        elif isinstance(stmt, S.Evaluate):
            self.call_stmt(stmt.value, mask)
        elif isinstance(stmt, S.AttrStmt):
            self.exec(stmt.body, mask)
        else:
            raise SimError(f"statement {type(stmt).__name__} not supported")

    @staticmethod
    def _view(mem, declared):
        """The storage as the declared buffer's element type (a DeclBuffer may re-type it)."""
        dt = _NP[str(declared.dtype)]
        if dt == mem.arr.dtype:
            return mem.arr.reshape(-1)
        return mem.bytes[: mem.bytes.size // np.dtype(dt).itemsize * np.dtype(dt).itemsize].view(dt)

    def _flat_index(self, buf, indices):
        idx = [np.broadcast_to(self.ev(i), (self.nt,)).astype(np.int64) for i in indices]
        shape = [int(s) for s in buf.shape]
        flat = np.zeros(self.nt, dtype=np.int64)
        for x, s in zip(idx, shape, strict=True):
            flat = flat * s + x
        return flat

    def store(self, st, mask):
        buf = self._buf(st.buffer)
        val = np.broadcast_to(self.ev(st.value), (self.nt,))
        flat = self._flat_index(st.buffer, st.indices)
        dt = _NP[str(buf.dtype)]
        if buf in self.local:
            arr = self.local[buf]
            if ((flat < 0) | (flat >= arr.shape[1]))[mask].any():
                raise SimError(f"local {buf.name} index out of range")
            rows = np.nonzero(mask)[0]
            arr[rows, flat[rows]] = val[rows].astype(dt)
            return
        mem = self.storage[buf]
        view = self._view(mem, st.buffer)
        n = view.size
        if ((flat < 0) | (flat >= n))[mask].any():
            raise SimError(f"store to {buf.name} out of bounds")
        rows = np.nonzero(mask)[0]
        if len(np.unique(flat[rows])) != len(rows):
            raise SimError(f"two threads store the same element of {buf.name}")
        view[flat[rows]] = val[rows].astype(view.dtype)

    # ---------------------------------------------------------------- expressions
    def scalar(self, e) -> int:
        v = self.ev(e)
        v = np.asarray(v)
        if v.ndim and not (v == v.flat[0]).all():
            raise SimError("expected a thread-invariant value")
        return int(v.flat[0])

    def ev(self, e):
        if isinstance(e, int):
            return np.int32(e)
        if isinstance(e, E.IntImm):
            return np.array(int(e.value)).astype(_NP[_dt(e)])
        if isinstance(e, tvm.ir.Var):
            if e in self.env:
                return self.env[e]
            raise SimError(f"unbound var {e}")
        if isinstance(e, TensorLoad):
            return self.load(e)
        if isinstance(e, E.Cast):
            v = self.ev(e.value)
            dt = _dt(e)
            if dt == "bool":
                return np.asarray(v) != 0
            return np.asarray(v).astype(_NP[dt])
        if isinstance(e, (E.Add, E.Sub, E.Mul, E.FloorDiv, E.FloorMod, E.Div, E.Mod, E.Min, E.Max,
                          E.BitwiseAnd, E.BitwiseOr, E.BitwiseXor, E.LShift, E.RShift)):
            return self.binop(e)
        if isinstance(e, (E.LT, E.LE, E.GT, E.GE, E.EQ, E.NE)):
            a, b = self.ev(e.a), self.ev(e.b)
            a, b = np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64)
            return {E.LT: np.less, E.LE: np.less_equal, E.GT: np.greater, E.GE: np.greater_equal,
                    E.EQ: np.equal, E.NE: np.not_equal}[type(e)](a, b)
        if isinstance(e, E.And):
            return np.logical_and(self.ev(e.a), self.ev(e.b))
        if isinstance(e, E.Or):
            return np.logical_or(self.ev(e.a), self.ev(e.b))
        if isinstance(e, E.Not):
            return np.logical_not(self.ev(e.a))
        if isinstance(e, E.Select):
            c = self.ev(e.condition)
            return np.where(c, self.ev(e.true_value), self.ev(e.false_value)).astype(_NP[_dt(e)])
        if isinstance(e, Call):
            return self.call_expr(e)
        raise SimError(f"expression {type(e).__name__} not supported: {e}")

    def binop(self, e):
        dt = _NP[_dt(e)]
        a = np.asarray(self.ev(e.a)).astype(dt)
        b = np.asarray(self.ev(e.b)).astype(dt)
        with np.errstate(over="ignore"):
            if isinstance(e, E.Add):
                r = a + b
            elif isinstance(e, E.Sub):
                r = a - b
            elif isinstance(e, E.Mul):
                r = a * b
            elif isinstance(e, E.FloorDiv):
                if (b == 0).any():
                    raise SimError("division by zero")
                r = np.floor_divide(a, b)
            elif isinstance(e, E.FloorMod):
                r = np.mod(a, b)
            elif isinstance(e, E.Div):
                r = (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b)))
            elif isinstance(e, E.Mod):
                r = a - (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))) * b
            elif isinstance(e, E.Min):
                r = np.minimum(a, b)
            elif isinstance(e, E.Max):
                r = np.maximum(a, b)
            elif isinstance(e, E.BitwiseAnd):
                r = a & b
            elif isinstance(e, E.BitwiseOr):
                r = a | b
            elif isinstance(e, E.BitwiseXor):
                r = a ^ b
            elif isinstance(e, E.LShift):
                r = np.left_shift(a, b)
            else:
                r = np.right_shift(a, b)
        return np.asarray(r).astype(dt)

    def load(self, e):
        buf = self._buf(e.source)
        flat = self._flat_index(e.source, e.indices)
        if buf in self.local:
            arr = self.local[buf]
            return arr[np.arange(self.nt), flat]
        mem = self.storage[buf]
        view = self._view(mem, e.source)
        bad = (flat < 0) | (flat >= view.size)
        if (bad & self.mask).any():
            raise SimError(f"load from {buf.name} out of bounds: {flat[self.mask].min()}..{flat[self.mask].max()} of {view.size}")
        return view[np.where(bad, 0, flat)]

    def call_expr(self, c):
        name = c.op.name
        if name == "prim.if_then_else":
            cond = np.broadcast_to(self.ev(c.args[0]), (self.nt,)).astype(bool)
            # evaluate both sides lazily: branches may be out of bounds where not selected
            out = np.zeros(self.nt, dtype=_NP[_dt(c)])
            outer = self.mask
            for sel, arg in ((cond, c.args[1]), (~cond, c.args[2])):
                if (sel & outer).any():
                    self.mask = outer & sel
                    out[sel] = np.broadcast_to(self.ev(arg), (self.nt,))[sel]
            self.mask = outer
            return out
        if name in ("tirx.reinterpret", "prim.reinterpret"):
            v = np.broadcast_to(self.ev(c.args[0]), (self.nt,))
            return np.ascontiguousarray(v).view(_NP[_dt(c)])
        if name in ("tirx.shift_left", "prim.shift_left"):
            dt = _NP[_dt(c)]
            return np.left_shift(np.asarray(self.ev(c.args[0])).astype(dt), np.asarray(self.ev(c.args[1])).astype(dt))
        if name in ("tirx.shift_right", "prim.shift_right"):
            dt = _NP[_dt(c)]
            return np.right_shift(np.asarray(self.ev(c.args[0])).astype(dt), np.asarray(self.ev(c.args[1])).astype(dt))
        if name in ("tirx.bitwise_and", "prim.bitwise_and"):
            dt = _NP[_dt(c)]
            return np.asarray(self.ev(c.args[0])).astype(dt) & np.asarray(self.ev(c.args[1])).astype(dt)
        if name == "tirx.address_of":
            ld = c.args[0]
            buf = self._buf(ld.source)
            flat = self._flat_index(ld.source, ld.indices)
            mem = self.storage[buf]
            return GAddr(mem, flat * np.dtype(_NP[str(buf.dtype)]).itemsize)  # checked where used
        if name == "tirx.cuda.cvta_generic_to_shared":
            ap = c.args[0]
            if not (isinstance(ap, Call) and ap.op.name == "tirx.tvm_access_ptr"):
                raise SimError("cvta of something other than an access_ptr")
            off = self.scalar(ap.args[2]) * np.dtype(_NP[str(ap.args[0].ty.dtype)]).itemsize
            return np.full(self.nt, off, dtype=np.uint32)
        raise SimError(f"call {name} not supported")

    # ---------------------------------------------------------------- PTX
    def _ring(self):
        if len(self.smem_base) != 1:
            raise SimError("expected exactly one shared buffer")
        return self.storage[next(iter(self.smem_base))].bytes

    def call_stmt(self, c, mask):
        name = c.op.name
        if name == "tirx.tvm_storage_sync":
            return
        if not name.startswith("tirx.ptx."):
            raise SimError(f"statement call {name} not supported")
        entry = name[len("tirx.ptx."):]
        args = list(c.args)
        if entry.startswith("cp_async_commit_group"):
            for t in np.nonzero(mask)[0]:
                self.groups[t].append(self.pending[t])
                self.pending[t] = []
            return
        if entry.startswith("cp_async_wait_group"):
            n = self.scalar(args[0])
            for t in np.nonzero(mask)[0]:
                while len(self.groups[t]) > n:
                    for op in self.groups[t].pop(0):
                        op()
            return
        if entry.startswith("cp_async_ca") or entry.startswith("cp_async_cg"):
            dst = np.broadcast_to(self.ev(args[0]), (self.nt,)).astype(np.int64)
            src = self.ev(args[1])
            size = self.scalar(args[2])
            if "src_size" in entry:
                ssz = np.broadcast_to(self.ev(args[3]), (self.nt,)).astype(np.int64)
            else:
                ssz = np.full(self.nt, size)
            ring = self._ring()
            for t in np.nonzero(mask)[0]:
                d, s, n = int(dst[t]), int(src.off[t]), int(ssz[t])
                if d % size or s % size:
                    raise SimError(f"cp.async of {size} bytes misaligned (dst {d}, src {s})")
                if n:
                    if s < 0 or s + n > src.mem.bytes.size:
                        raise SimError("cp.async reads out of bounds")
                    data = src.mem.bytes[s:s + n].copy()
                else:
                    data = np.zeros(0, np.uint8)

                def op(d=d, data=data, size=size):
                    if d < 0 or d + size > ring.size:
                        raise SimError("cp.async writes outside shared memory")
                    ring[d:d + size] = 0
                    ring[d:d + len(data)] = data

                self.pending[t].append(op)
            return
        if entry in ("ld", "ld_vec"):
            nreg = len(args) - 1 - self._ntokens(c)
            regs, addr = args[:nreg], self.ev(args[nreg])
            if isinstance(addr, GAddr):
                mem, offs = addr.mem.bytes, addr.off
            else:                                   # a shared-window address
                mem, offs = self._ring(), np.broadcast_to(addr, (self.nt,)).astype(np.int64)
            for t in np.nonzero(mask)[0]:
                s = int(offs[t])
                if s % (4 * nreg) or s < 0 or s + 4 * nreg > mem.size:
                    raise SimError("ld misaligned or out of bounds")
                words = mem[s:s + 4 * nreg].view(np.uint32)
                for j, r in enumerate(regs):
                    self._set_reg(r, t, words[j])
            return
        if entry in ("st", "st_vec"):
            nreg = len(args) - 1 - self._ntokens(c)
            addr = np.broadcast_to(self.ev(args[0]), (self.nt,)).astype(np.int64)
            vals = [np.broadcast_to(self.ev(r), (self.nt,)).astype(np.uint32) for r in args[1:1 + nreg]]
            ring = self._ring()
            for t in np.nonzero(mask)[0]:
                d = int(addr[t])
                if d % (4 * nreg):
                    raise SimError("st.shared misaligned")
                ring[d:d + 4 * nreg] = np.array([v[t] for v in vals], dtype=np.uint32).view(np.uint8)
            return
        if entry == "ldmatrix":
            self._ldmatrix(args, mask)
            return
        if entry == "mma_int":
            self._mma(c, args, mask)
            return
        raise SimError(f"ptx instruction {entry} not supported")

    def _ntokens(self, c):
        return sum(1 for a in c.args if type(a).__name__ == "StringImm")

    def _set_reg(self, ref, t, value):
        if not isinstance(ref, TensorLoad):
            raise SimError("register operand is not a buffer element")
        buf = self._buf(ref.source)
        flat = self._flat_index(buf, ref.indices)
        self.local[buf][t, flat[t]] = value

    def _regs(self, refs):
        return [np.broadcast_to(self.ev(r), (self.nt,)).astype(np.uint32) for r in refs]

    def _ldmatrix(self, args, mask):
        tokens = [str(a.value) for a in args if type(a).__name__ == "StringImm"]
        if "x4" not in tokens or "trans" in tokens:
            raise SimError(f"ldmatrix form {tokens} not modelled")
        regs, addr = args[:4], np.broadcast_to(self.ev(args[4]), (self.nt,)).astype(np.int64)
        if not mask.all():
            raise SimError("ldmatrix under divergent control flow")
        ring = self._ring()
        for w in range(self.nt // 32):
            lanes = np.arange(32) + 32 * w
            for j in range(4):                       # matrix j
                for t in range(32):
                    row_addr = int(addr[32 * w + 8 * j + t // 4])
                    if row_addr % 16:
                        raise SimError("ldmatrix row address not 16-byte aligned")
                    b = ring[row_addr + 4 * (t % 4): row_addr + 4 * (t % 4) + 4]
                    self._set_reg(regs[j], lanes[t], b.view(np.uint32)[0])

    def _mma(self, c, args, mask):
        tokens = [str(a.value) for a in args if type(a).__name__ == "StringImm"]
        shape = next(tk for tk in tokens if tk.startswith("m"))
        types = [tk for tk in tokens if tk in ("s8", "u8", "s4", "u4")]
        at, bt = types
        m, n, k = (int(x) for x in shape[1:].replace("n", " ").replace("k", " ").split())
        bits = 4 if at in ("s4", "u4") else 8
        na = m * k * bits // 32 // 32        # registers per lane
        nb = n * k * bits // 32 // 32
        nc = m * n // 32
        ops = [a for a in args if type(a).__name__ != "StringImm"]
        d, a, b, cc = ops[:nc], ops[nc:nc + na], ops[nc + na:nc + na + nb], ops[nc + na + nb:nc + na + nb + nc]
        if not mask.all():
            raise SimError("mma under divergent control flow")
        A, B, C = self._regs(a), self._regs(b), self._regs(cc)
        per = 32 // bits

        def elems(regs, lane, signed):
            out = []
            for r in regs:
                v = int(r[lane])
                for i in range(per):
                    x = (v >> (bits * i)) & ((1 << bits) - 1)
                    if signed and x >= 1 << (bits - 1):
                        x -= 1 << bits
                    out.append(x)
            return out

        for w in range(self.nt // 32):
            Am = np.zeros((m, k), np.int64)
            Bm = np.zeros((k, n), np.int64)
            Cm = np.zeros((m, n), np.int64)
            for lane in range(32):
                g, tq = lane // 4, lane % 4
                ae = elems(A, 32 * w + lane, at[0] == "s")
                be = elems(B, 32 * w + lane, bt[0] == "s")
                for i, x in enumerate(ae):
                    Am[_a_row(m, k, bits, g, i), _a_col(m, k, bits, tq, i)] = x
                for i, x in enumerate(be):
                    Bm[_b_row(k, bits, tq, i), g] = x
                for i in range(nc):
                    Cm[g + 8 * (i >= 2), 2 * tq + (i & 1)] = np.int64(np.uint32(C[i][32 * w + lane]).view(np.int32))
            Dm = Am @ Bm + Cm
            for lane in range(32):
                g, tq = lane // 4, lane % 4
                for i in range(nc):
                    v = np.int64(Dm[g + 8 * (i >= 2), 2 * tq + (i & 1)])
                    self._set_reg(d[i], 32 * w + lane, np.uint32(v & 0xFFFFFFFF))


# fragment tables, PTX ISA 9.7.16.5.x ("Matrix Fragments for mma.m16n8k32 / m16n8k64 / m8n8k16 /
# m8n8k32"); i is the element index within the lane's A (or B) fragment
def _a_row(m, k, bits, g, i):
    if m == 8:
        return g
    half = 4 if bits == 8 else 8        # elements per register
    return g + 8 * ((i // half) % 2)


def _a_col(m, k, bits, tq, i):
    per = 4 if bits == 8 else 8
    if m == 8:
        return tq * per + i
    return tq * per + (i % per) + (k // 2) * (i // (2 * per))


def _b_row(k, bits, tq, i):
    per = 4 if bits == 8 else 8
    return tq * per + (i % per) + (k // 2) * (i // per)


def run_kernel(func, *args):
    """Execute ``func`` on the given arrays in place (the last ones are outputs)."""
    Sim(func, list(args)).run()
