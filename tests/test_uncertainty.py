"""Every score a run reports carries its standard error, and a winner that does not beat its
sources is called what it is (evomerge.uncertainty; summary, status, MLflow and model card)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evomerge.cli import main
from evomerge.uncertainty import evidence, paired, standard_error, uncertainty_metrics, with_se
from tiny import experiment_file


def test_the_standard_error_of_a_weighted_fitness_comes_from_its_items():
    values = {"a": [1.0] * 30 + [0.0] * 70}
    se = standard_error(values, {"a": 1.0})
    assert se == pytest.approx(math.sqrt(0.3 * 0.7 * 100 / 99 / 100))
    two = {"a": [1.0, 0.0] * 50, "b": [1.0] * 10 + [0.0] * 30}
    want = math.sqrt((0.75 ** 2) * np.var(two["a"], ddof=1) / 100 + (0.25 ** 2) * np.var(two["b"], ddof=1) / 40)
    assert standard_error(two, {"a": 3.0, "b": 1.0}) == pytest.approx(want)
    # a reported score that is not the mean of its items (a corpus-level metric): no SE from items
    assert standard_error(values, {"a": 1.0}, scores={"a": 0.55}) is None
    assert standard_error(values, {"a": 1.0}, scores={"a": 0.3}) == pytest.approx(se)
    assert standard_error({}, {"a": 1.0}) is None
    assert with_se(0.41234, 0.02837) == "0.4123 ± 0.0284" and with_se(0.5, None) == "0.5000"


def test_a_gain_is_paired_on_the_same_items_and_called_only_beyond_two_standard_errors():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.4).astype(float)
    better = base.copy()
    flips = rng.choice(np.flatnonzero(base == 0), 60, replace=False)
    better[flips] = 1.0  # right on 60 more items, wrong on none more: a clear paired gain
    gain, se, z = paired({"t": better}, {"t": base}, {"t": 1.0})
    assert gain == pytest.approx(60 / 400) and z > 5 and se == pytest.approx(gain / z)
    sources = {"base": {"t": list(base)}, "other": {"t": list(base[::-1])}}
    scores = {"base": float(base.mean()), "other": float(base.mean())}
    found = evidence({"t": list(better)}, sources, scores, {"t": 1.0}, "base", "test")
    assert found["verdict"] == "gain" and "held-out test split" in found["line"]
    slightly = base.copy()
    slightly[flips[:3]] = 1.0
    found = evidence({"t": list(slightly)}, sources, scores, {"t": 1.0}, "base", "search")
    assert found["verdict"] == "no clear gain" and "not shown to beat its sources" in found["line"]
    assert "optimistic" in found["line"]  # the search split chose the winner
    flat = evidence({"t": list(better)}, sources, scores, {"t": 1.0}, "base", "test", trial_fitness=[0.25] * 8)
    assert flat["verdict"] == "no signal" and "every candidate scored the same" in flat["line"]
    unpaired = evidence({"t": [1.0] * 10}, sources, scores, {"t": 1.0}, "base", "test")
    assert unpaired["verdict"] == "unknown"  # other documents: nothing to pair
    metrics = uncertainty_metrics({"search": 0.02, "baselines": {"base": 0.03}, "tests": {"best": 0.01}}, found)
    assert metrics["best_fitness_se"] == 0.02 and metrics["baseline.base_se"] == 0.03
    assert metrics["test.best_se"] == 0.01 and metrics["clear_gain"] == 0.0 and "gain_z" in metrics


def test_a_run_reports_its_scores_with_standard_errors_and_no_clear_gain_as_such(tmp_path, session_tiny_zoo,
                                                                                 capsys):
    """On the tiny zoo the winner does not beat expert_a: the summary, status, MLflow and the model
    card say so, and every score carries its standard error."""
    exp = experiment_file(tmp_path, "sure", budget={"max_trials": 8}, tracking={"backend": "mlflow"},
                          suite={"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search", "metric": "acc"}],
                                 "test_tasks": [{"name": "zoo_arith_l2_test", "metric": "acc"}], "batch_size": 64})
    run = tmp_path / "run"
    assert main(["run", str(exp), "--run-dir", str(run)]) == 0
    out = capsys.readouterr()
    summary = json.loads((run / "summary.json").read_text())
    se = summary["standard_errors"]
    assert se["search"] > 0 and set(se["baselines"]) == {"base", "expert_a", "expert_b"}
    assert all(v > 0 for v in se["baselines"].values()) and se["tests"]["best"] > 0
    assert summary["evidence"]["split"] == "test" and summary["evidence"]["verdict"] in ("gain", "no clear gain")
    assert f"± {se['search']:.4f}" in out.out and "test split: 4/4 scored" in out.err
    verdict = summary["evidence"]["verdict"]
    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert f"± {se['search']:.4f}" in status and summary["evidence"]["line"] in status

    from evomerge.run_dir import read_info
    from evomerge.tracking.mlflow_tracker import read_run

    info = read_info(run)
    metrics = read_run(info["tracking_uri"], info["mlflow_run_id"])["metrics"]
    assert metrics["best_fitness_se"] == pytest.approx(se["search"]) and "gain_z" in metrics
    assert metrics["clear_gain"] == (1.0 if verdict == "gain" else 0.0)

    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert ("evolved merge" in card) == (verdict == "gain")
    assert "## How sure" in card and f"± {se['search']:.4f}" in card
