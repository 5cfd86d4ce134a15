"""Issue 20, concurrent use: one ``qcompiler.load(...)`` object called from 8 threads at once gives,
call for call, the single-threaded results (each thread runs its own Relax VM over the shared
module, ``qcompiler/runtime.py``)."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest

import qcompiler
from qcompiler.cli import main
from tests.helpers import call_concurrently, small_cnn

THREADS = 8
CALLS = 100  # per thread; distinct inputs per call so a result given to the wrong caller is seen


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("threads")
    r = np.random.default_rng(7)
    onnx.save(small_cnn(r, ["N", 3, 16, 16], 16, 10, pool=True), d / "m.onnx")
    np.savez(d / "calib.npz", x=r.standard_normal((8, 3, 16, 16)).astype(np.float32))
    assert main(["-q", "compile", str(d / "m.onnx"), "-o", str(d / "m.so"), "--calib", str(d / "calib.npz")]) == 0
    return d / "m.so"


def test_eight_threads_equal_single_threaded(lib):
    m = qcompiler.load(str(lib))
    r = np.random.default_rng(11)
    xs = [(r.standard_normal((1, 3, 16, 16)) * (0.5 + k % 5)).astype(np.float32) for k in range(THREADS * CALLS)]
    want = [m(x=x)["y"] for x in xs]
    assert len({w.tobytes() for w in want}) > THREADS * CALLS // 4  # the inputs really give different outputs
    got, errors = call_concurrently(lambda x: m(x=x)["y"], xs, THREADS)
    assert not errors, errors[:3]
    bad = [k for k in range(len(xs)) if got[k] is None or got[k].shape != want[k].shape
           or not np.array_equal(got[k], want[k])]
    assert not bad, f"{len(bad)} of {len(xs)} concurrent calls differ from the single-threaded result"


def test_each_thread_has_its_own_vm(lib):
    m = qcompiler.load(str(lib))
    vms = {}

    def grab(t):
        vms[t] = m.vm

    ths = [threading.Thread(target=grab, args=(t,)) for t in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert len({id(v) for v in vms.values()}) == 4 and m.vm is m.vm
