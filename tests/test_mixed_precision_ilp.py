"""The mixed-precision ILP (qcompiler/mixed/ilp.py, TVM-free) equals brute force on random small
instances: latency / size / BOPS budgets, pins, ties, unavailable choices and infeasible cases."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.mixed import ilp

TIE_KEY = (8, 8, 16)  # W8A8, W4A8, W8A16: activation bits, what tied layers share


def _instance(rng, L: int) -> ilp.Problem:
    C = 3
    omega = np.zeros((L, C))
    omega[:, 1] = rng.uniform(0, 1, L) * (rng.random(L) < 0.9)    # W4A8 costs accuracy
    omega[:, 2] = -rng.uniform(0, 0.3, L) * (rng.random(L) < 0.7)  # W8A16 may buy it back
    lat = np.empty((L, C))
    lat[:, 0] = rng.uniform(0.1, 2.0, L)
    lat[:, 1] = lat[:, 0] * rng.uniform(0.5, 1.0, L)
    lat[:, 2] = lat[:, 0] * rng.uniform(1.0, 2.0, L)
    w = rng.integers(100, 5000, L).astype(float)
    size = np.stack([w, w / 2, w], 1)
    macs = rng.integers(1000, 100000, L).astype(float)
    bops = np.stack([macs * 64, macs * 32, macs * 128], 1)
    allowed = np.ones((L, C), bool)
    allowed[:, 2] = rng.random(L) < 0.7
    allowed[:, 1] = rng.random(L) < 0.95
    budgets = {}
    for r, arr in (("latency", lat), ("size", size), ("bops", bops)):
        if rng.random() < 0.7:
            lo, hi = arr.min(1).sum(), arr.max(1).sum()
            budgets[r] = float(rng.uniform(lo * 0.95, hi))
    pins = {}
    for _ in range(rng.integers(0, 3)):
        pins[int(rng.integers(L))] = int(rng.integers(C))
    ties = []
    if L >= 3 and rng.random() < 0.5:
        idx = rng.choice(L, size=int(rng.integers(2, min(L, 4) + 1)), replace=False)
        ties.append(tuple(int(i) for i in idx))
    return ilp.Problem(omega, lat, size, bops, allowed, budgets, pins, ties, TIE_KEY)


def test_ilp_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(18)
    n_feasible = n_infeasible = n_tied = n_pinned = 0
    for _ in range(320):
        p = _instance(rng, int(rng.integers(1, 8)))
        ref = ilp.brute_force(p)
        if ref is None:
            with pytest.raises(ilp.Infeasible) as ei:
                ilp.solve(p)
            n_infeasible += 1
            e = ei.value
            if e.resource is not None:  # the smallest value named is really not within the budget
                assert e.smallest > e.budget
            continue
        sol = ilp.solve(p)
        n_feasible += 1
        n_tied += bool(p.ties)
        n_pinned += bool(p.pins)
        assert sol.objective == pytest.approx(ref.objective, abs=1e-7)
        ev = p.evaluate(sol.choice)
        for r, b in p.budgets.items():
            assert ev[r] <= b * (1 + 1e-9) + 1e-9
        for l_, c in p.pins.items():
            assert sol.choice[l_] == c
        for g in p.ties:
            assert len({TIE_KEY[sol.choice[i]] for i in g}) == 1
        assert all(p.allowed[i, c] for i, c in enumerate(sol.choice))
    assert n_feasible >= 150 and n_infeasible >= 20 and n_tied >= 30 and n_pinned >= 50


def test_infeasible_latency_names_smallest_achievable():
    lat = np.array([[1.0, 0.5, 2.0], [1.0, 0.6, 2.0]])
    p = ilp.Problem(np.zeros((2, 3)), lat, np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3), bool),
                    {"latency": 0.9}, {}, [], TIE_KEY)
    with pytest.raises(ilp.Infeasible) as ei:
        ilp.solve(p)
    assert ei.value.resource == "latency" and ei.value.smallest == pytest.approx(1.1)
    assert "smallest achievable 1.1" in str(ei.value)


def test_pins_contradicting_ties():
    p = ilp.Problem(np.zeros((2, 3)), np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3), bool),
                    {}, {0: 0, 1: 2}, [(0, 1)], TIE_KEY)
    with pytest.raises(ilp.Infeasible) as ei:
        ilp.solve(p)
    assert ei.value.resource is None


def test_cuda_offers_no_w8a16_to_the_ilp():
    """On CUDA no tensor-core kernel takes 16-bit activations: the ILP is not offered W8A16 there
    (qcompiler/mixed/plan.py ``for_target``); on CPUs it is."""
    import numpy as np

    from qcompiler.mixed.plan import CHOICES, for_target
    from qcompiler.mixed.sensitivity import Sensitivity
    from qcompiler.targets import parse_target

    L, C = 3, len(CHOICES)
    s = Sensitivity(["a", "b", "c"], np.zeros((L, C)), np.zeros((L, C)), np.ones((L, C), bool))
    ci = list(CHOICES).index("w8a16")
    cu = for_target(s, parse_target("cuda", arch="sm_80"))
    assert not cu.available[:, ci].any() and cu.available[:, [i for i in range(C) if i != ci]].all()
    assert "16-bit activations" in cu.reasons["a/w8a16"]
    assert for_target(s, parse_target("cpu")).available.all() and s.available.all()
