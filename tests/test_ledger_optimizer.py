"""Ledger append/read (torn lines), CMA-ES seeding and bounds, the failure penalty."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.config import OptimizerConfig
from evomerge.islands import penalized
from evomerge.ledger import Ledger
from evomerge.optimize import build_optimizer


def test_ledger_round_trip_and_torn_line(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append({"kind": "trial", "trial_id": 0, "fitness": 0.5})
    led.append({"kind": "baseline", "model": "a", "fitness": 0.25})
    with open(led.path, "a") as f:
        f.write('{"kind": "trial", "trial_id": 1, "fit')  # process died mid-write
    assert [r["kind"] for r in led] == ["trial", "baseline"]
    assert led.records("trial") == [{"kind": "trial", "trial_id": 0, "fitness": 0.5}]


def test_ledger_refuses_nan(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(ValueError):
        led.append({"fitness": float("nan")})


def _run(seed: int, generations: int = 3) -> list[np.ndarray]:
    opt = build_optimizer(OptimizerConfig(seed=seed), dim=5)
    seen = []
    for _ in range(generations):
        gs = opt.ask()
        seen.extend(gs)
        opt.tell(gs, [-float(np.sum((g - 0.8) ** 2)) for g in gs])
    return seen


def test_cma_same_seed_same_genomes_and_bounds():
    a, b, c = _run(0), _run(0), _run(1)
    assert len(a) == 3 * (4 + 4)  # paper popsize for n=5: 4 + floor(3 ln 5) = 8
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    assert all(np.all((g >= 0) & (g <= 1)) for g in a)


def test_cma_improves_a_simple_objective():
    opt = build_optimizer(OptimizerConfig(seed=3, sigma0=0.2), dim=4)
    target = np.array([0.9, 0.1, 0.7, 0.3])
    for _ in range(40):
        gs = opt.ask()
        opt.tell(gs, [-float(np.sum((g - target) ** 2)) for g in gs])
    genome, value = opt.best()
    assert value > -1e-3
    np.testing.assert_allclose(genome, target, atol=0.05)


def test_cma_rejects_non_finite_fitness():
    opt = build_optimizer(OptimizerConfig(), dim=3)
    gs = opt.ask()
    with pytest.raises(ValueError):
        opt.tell(gs, [float("nan")] * len(gs))


def test_cma_one_dimension():
    opt = build_optimizer(OptimizerConfig(popsize=4), dim=1)
    for _ in range(5):
        gs = opt.ask()
        assert all(g.shape == (1,) for g in gs)
        opt.tell(gs, [float(g[0]) for g in gs])
    assert opt.best()[1] > 0.5


def test_penalty_ranks_failures_last():
    assert penalized("complete", 0.4, [], None) == 0.4
    assert penalized("failed", None, [0.4, 0.2], None) == pytest.approx(-0.8)
    assert penalized("failed", None, [], None) == -1.0
    assert penalized("failed", None, [0.4], -5.0) == -5.0
    assert penalized("complete", float("nan"), [0.3], None) == pytest.approx(-0.7)
