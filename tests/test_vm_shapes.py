"""qcompiler/lowering/vm_shapes.py: repeated shape-heap reads folded into one, outputs unchanged."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R
from tvm.script import tirx as T

from qcompiler.lowering.vm_shapes import DedupHeapReads, dedup_heap_reads


@tvm.script.ir_module
class Chain:
    @R.function
    def main(x: R.Tensor(("n", 4), "int32"), flag: R.Tensor((), "bool")):
        n = T.int64()
        with R.dataflow():
            a = R.add(x, x)
            b = R.reshape(a, R.shape([n * 4]))
            c = R.add(b, b)
            d = R.reshape(c, R.shape([n, 4]))
            e = R.multiply(d, d)
            R.output(e)
        if flag:  # a branch: its reads may reuse the ones above it, not the other branch's
            f = R.reshape(e, R.shape([n * 4]))
            g = R.add(f, f)
            h = R.reshape(g, R.shape([n, 4]))
        else:
            f2 = R.reshape(e, R.shape([n * 4]))
            h = R.reshape(f2, R.shape([n, 4]))
        return h


def _lowered(target):
    from tvm.relax.backend.cpu_generic import pipeline as p

    with target:
        m = tvm.transform.Sequential(p.legalize_passes(target))(Chain)
        return tvm.transform.Sequential(p.dataflow_lower_passes(target) + p.finalize_passes(target))(m)


def _count(mod, names=("vm.builtin.make_shape", "vm.builtin.make_prim_value")) -> int:
    n = 0

    def visit(e):
        nonlocal n
        if isinstance(e, relax.Call) and isinstance(e.op, relax.ExternFunc) and e.op.global_symbol in names:
            n += 1
    relax.analysis.post_order_visit(mod["main"].body, visit)
    return n


def test_repeated_make_shape_calls_are_folded_and_branches_keep_their_own():
    target = tvm.target.Target({"kind": "llvm"})
    before = _lowered(target)
    after, removed = dedup_heap_reads(before)
    assert removed > 0 and _count(after) == _count(before) - removed
    assert _count(after, ("vm.builtin.make_shape",)) >= 3  # [n*4] / [n, 4] above the If, and the branches' own
    tvm.ir.assert_structural_equal(dedup_heap_reads(after)[0], after)  # nothing left to fold


@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("flag", [True, False])
def test_the_folded_library_computes_the_same(n, flag):
    target = tvm.target.Target({"kind": "llvm"})

    def pipeline(extra):
        @tvm.transform.module_pass(opt_level=0)
        def finish(m, _ctx):
            from tvm.relax.backend.cpu_generic import pipeline as p

            return tvm.transform.Sequential(p.legalize_passes(target) + p.dataflow_lower_passes(target)
                                            + p.finalize_passes(target) + extra)(m)
        return finish

    x = np.arange(n * 4, dtype=np.int32).reshape(n, 4) - 7
    e = (4 * x) * (4 * x)
    want = 2 * e if flag else e
    for extra in ([], [DedupHeapReads]):
        ex = tvm.compile(Chain, target, relax_pipeline=pipeline(extra))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array(flag)))
        np.testing.assert_array_equal(got.numpy(), want)
