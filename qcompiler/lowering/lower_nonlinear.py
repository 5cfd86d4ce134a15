"""Relax lowering of the integer transformer nonlinearities (LayerNorm, GELU): a mixin of
``relax_lower.Lowering`` providing ``op_<name>`` methods; arithmetic identical to ``qcompiler.ref_nonlinear``.

All arithmetic is int64 Relax ops (legalized to TIR by LegalizeOps): ``right_shift`` is arithmetic,
``floor_divide`` is a floor division, ``minimum``/``where`` select; no float appears.  The integer
square root is the reference's ``steps`` unrolled Newton steps x = min(x, (x + V // x) >> 1) from
x0 = 1 << #{j : V >= 4^j} (= 2^ceil(bits(V)/2)), on the per-row [.., 1] tensor.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from qcompiler.ref_nonlinear import POW4


def _i64(v) -> relax.Expr:
    return relax.const(np.asarray(v, dtype=np.int64), "int64")


class NonlinearOps:
    """Mixin: ``op_layernorm``, ``op_gelu`` (see ``qcompiler.ref_nonlinear`` for the math)."""

    def _isqrt(self, V, steps: int):
        R = relax.op
        ge = self.emit(R.greater_equal(V, _i64(POW4)))                       # [.., 1] vs [32] -> [.., 32]
        e = self.emit(R.sum(self.cast(ge, "int64"), axis=[-1], keepdims=True))
        x = self.emit(R.left_shift(_i64(1), e))
        for _ in range(steps):
            q = self.emit(R.floor_divide(V, self.emit(R.maximum(x, _i64(1)))))
            nx = self.emit(R.right_shift(self.emit(R.add(x, q)), _i64(1)))
            x = self.emit(R.minimum(x, nx))
        return x

    def op_layernorm(self, n, x):
        from .relax_lower import Value

        a = n.attrs
        R = relax.op
        x = self.logical(x)
        C = x.shape[-1]
        xi = self.cast(x.expr, "int64")
        if a["pre_shift"]:
            xi = self.emit(R.right_shift(xi, _i64(a["pre_shift"])))
        s = self.emit(R.sum(xi, axis=[-1], keepdims=True))
        y = self.emit(R.subtract(self.emit(R.multiply(xi, _i64(C))), s))
        V = self.emit(R.add(self.emit(R.sum(self.emit(R.multiply(y, y)), axis=[-1], keepdims=True)),
                            _i64(a["eps_int"])))
        sd = self._isqrt(V, int(a["steps"]))
        Rb, F = int(a["R"]), int(a["F"])
        k = self.emit(R.floor_divide(_i64(1 << Rb), sd))
        f = self.emit(R.right_shift(self.emit(R.add(self.emit(R.multiply(y, k)), _i64(1 << (Rb - F - 1)))),
                                    _i64(Rb - F)))
        shift = np.asarray(a["shift"], np.int64)
        rnd = np.asarray(a["bias"], np.int64) + np.left_shift(np.int64(1), shift - 1)
        t = self.emit(R.multiply(f, self.c(a["mult"], "int64", x)))
        t = self.emit(R.add(t, self.c(rnd, "int64", x)))
        t = self.emit(R.right_shift(t, self.c(shift, "int64", x)))
        t = self.emit(R.clip(t, int(a["lo"]), int(a["hi"])))
        return Value(self.cast(t, a["dtype"]), x.perm, x.shape, a["dtype"])

    def op_gelu(self, n, x):
        from .relax_lower import Value

        a = n.attrs
        R = relax.op
        q = self.cast(x.expr, "int64")
        aq = self.emit(R.abs(q))
        u = int(a["u"])
        ae = self.emit(R.left_shift(aq, _i64(u)) if u >= 0 else R.right_shift(aq, _i64(-u)))
        neg = self.emit(R.less(q, _i64(0)))
        if a["variant"] == "igelu":
            t = self.emit(R.add(self.emit(R.minimum(ae, _i64(-a["q_b"]))), _i64(a["q_b"])))
            poly = self.emit(R.add(self.emit(R.multiply(t, t)), _i64(a["q_c"])))
            s = self.emit(R.add(self.emit(R.where(neg, self.emit(R.negative(poly)), poly)), _i64(a["q_c"])))
        else:
            d = self.emit(R.negative(ae))
            v = self.emit(R.subtract(self.emit(R.add(d, self.emit(R.right_shift(d, _i64(1))))),
                                     self.emit(R.right_shift(d, _i64(4)))))
            z = self.emit(R.floor_divide(self.emit(R.negative(v)), _i64(a["q_1"])))
            r = self.emit(R.add(v, self.emit(R.multiply(z, _i64(a["q_1"])))))
            base = self.emit(R.add(self.emit(R.right_shift(r, _i64(1))), _i64(a["q_1"])))
            sh = self.emit(R.subtract(_i64(a["N"]), self.emit(R.minimum(z, _i64(a["N"])))))
            e = self.emit(R.left_shift(base, sh))
            e0 = int(a["q_1"]) << int(a["N"])
            num = self.emit(R.where(neg, e, _i64(e0)))
            s = self.emit(R.floor_divide(self.emit(R.left_shift(num, _i64(a["K"]))),
                                         self.emit(R.add(e, _i64(e0)))))
        p = self.emit(R.multiply(q, s))
        shift = int(a["shift"])
        t = self.emit(R.multiply(p, _i64(a["mult"])))
        t = self.emit(R.add(t, _i64(1 << (shift - 1))))
        t = self.emit(R.right_shift(t, _i64(shift)))
        t = self.emit(R.clip(t, int(a["lo"]), int(a["hi"])))
        return Value(self.cast(t, a["dtype"]), x.perm, x.shape, a["dtype"])
