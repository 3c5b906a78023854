"""A short real search on the tiny zoo: real Ray, real merges, real lm-eval, real MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.run_dir import read_info
from evomerge.cli import main
from evomerge.wiring import num_layers_of
from evomerge.ledger import Ledger, best_trial
from evomerge.recipe import Recipe
from evomerge.tracking.mlflow_tracker import read_run

ROOT = Path(__file__).resolve().parents[1]


def _experiment(tmp_path: Path, **overrides) -> Path:
    data = {
        "name": "e2e",
        "zoo": {"kind": "tiny", "seed": 0},
        "models": [
            {"name": "base", "path": "zoo:base"},
            {"name": "expert_a", "path": "zoo:expert_a"},
            {"name": "expert_b", "path": "zoo:expert_b"},
        ],
        "base_model": "base",
        "search_space": str(ROOT / "search_spaces" / "ps_ties_dare.yaml"),
        "suite": {
            "task_paths": ["zoo"],
            "tasks": [{"name": "zoo_arith_l2_search", "metric": "acc"}],
            "test_tasks": [{"name": "zoo_arith_l2_test", "metric": "acc"}],
            "batch_size": 64,
        },
        "optimizer": {"name": "cma_es", "popsize": 4, "seed": 1, "islands": 2},
        "budget": {"max_trials": 10},
        "dispatch": {"backend": "ray", "num_workers": 2},
        "tracking": {"backend": "mlflow"},
    }
    for key, value in overrides.items():
        data[key] = value
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# In-process dispatch and no tracker: the cheap setting for runs that check one behaviour.
LOCAL = {"dispatch": {"backend": "local", "num_workers": 1}, "tracking": {"backend": "none"}}


def _run_local(tmp_path: Path, **overrides) -> tuple[Path, list[dict]]:
    """Run an in-process search through the CLI; returns its run dir and trial records."""
    exp_path = _experiment(tmp_path, **{**LOCAL, **overrides})
    run_dir = tmp_path / "run"
    assert main(["run", str(exp_path), "--run-dir", str(run_dir), "--quiet"]) == 0
    return run_dir, Ledger(run_dir / "ledger.jsonl").records("trial")


def test_search_end_to_end(tmp_path, session_tiny_zoo, ray_session, capsys):
    exp_path = _experiment(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["run", str(exp_path), "--run-dir", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "best fitness (search)" in out and "source expert_a (search)" in out
    assert f"evomerge ui {run_dir}" in out  # what to do next, with this run's directory
    assert f"evomerge export {run_dir} --format hf" in out

    # ledger: every trial, with all its fields; baselines for every source; test-split scores
    ledger = Ledger(run_dir / "ledger.jsonl")
    trials = ledger.records("trial")
    assert sorted(t["trial_id"] for t in trials) == list(range(10))
    for t in trials:
        assert t["state"] == "complete", t["error"]
        assert 0.0 <= t["fitness"] <= 1.0
        assert set(t["scores"]) == {"zoo_arith_l2_search"}
        assert len(t["genome"]) == 4 and t["merge_seconds"] > 0 and t["eval_seconds"] > 0
        assert Recipe.from_dict(t["recipe"]).content_hash() == t["recipe_hash"]
    assert {b["model"] for b in ledger.records("baseline")} == {"base", "expert_a", "expert_b"}
    assert {r["model"] for r in ledger.records("test")} == {"best", "base", "expert_a", "expert_b"}
    assert len({t["recipe_hash"] for t in trials}) == 10  # CMA-ES proposes distinct candidates
    # sources really differ from each other on the task
    base_scores = {b["model"]: b["fitness"] for b in ledger.records("baseline")}
    assert len(set(base_scores.values())) > 1 or len({t["fitness"] for t in trials}) > 1

    # the best recipe on disk is the best trial's
    best = best_trial(trials)  # ties: the first finished, as the controller keeps it
    assert Recipe.load(run_dir / "best_recipe.yaml").content_hash() == best["recipe_hash"]

    # MLflow: one run with params, the config artifact and a fitness curve over trials
    import json

    info = read_info(run_dir)
    assert info["status"] == "finished"
    mlrun = read_run(info["tracking_uri"], info["mlflow_run_id"])
    assert mlrun["status"] == "FINISHED"
    assert mlrun["params"]["method"] == "dare_ties" and mlrun["params"]["dimensions"] == "4"
    assert mlrun["tags"]["evomerge.experiment"] == "e2e"
    steps = [s for s, _ in mlrun["history"]["fitness"]]
    assert sorted(steps) == list(range(10))
    assert sorted(v for _, v in mlrun["history"]["trial_id"]) == list(range(10))
    best_curve = [v for _, v in sorted(mlrun["history"]["best_fitness"])]
    assert best_curve == sorted(best_curve)  # best-so-far never decreases over completion order
    assert best_curve[-1] == pytest.approx(best["fitness"])
    assert {"experiment.yaml", "ledger.jsonl", "best_recipe.yaml", "summary.json"} <= set(mlrun["artifacts"])

    # export
    out_dir = tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "recipe", "--out", str(out_dir)]) == 0
    assert Recipe.load(out_dir / "recipe.yaml").content_hash() == best["recipe_hash"]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "t3"), "--trial", "3"]) == 0
    assert Recipe.load(tmp_path / "t3" / "recipe.yaml").content_hash() == trials[[t["trial_id"] for t in trials].index(3)]["recipe_hash"]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "t99"), "--trial", "99"]) == 1

    # same seed -> same trials per (island, generation, member), whatever the dispatcher and completion order
    local_exp = _experiment(tmp_path, **LOCAL)
    again = tmp_path / "again"
    assert main(["run", str(local_exp), "--run-dir", str(again), "--quiet", "--max-trials", "6"]) == 0
    by_key = {(t["island"], t["generation"], t["member"]): t for t in trials}
    local_trials = Ledger(again / "ledger.jsonl").records("trial")
    assert len(local_trials) == 6
    for t in local_trials:
        ref = by_key[(t["island"], t["generation"], t["member"])]
        assert t["genome"] == ref["genome"]
        assert t["recipe_hash"] == ref["recipe_hash"]
        assert t["fitness"] == pytest.approx(ref["fitness"], abs=1e-9)


def test_failing_candidates_do_not_crash_the_search(tmp_path, session_tiny_zoo, capsys):
    """Every candidate fails (its worker raises while scoring): the run still completes and records why."""
    from functools import partial

    from evomerge.config import load_experiment
    from evomerge.search import Controller
    from evomerge.testing import FaultInjectingWorker

    exp = load_experiment(_experiment(tmp_path, **LOCAL, budget={"max_trials": 5},
                                      optimizer={"name": "cma_es", "popsize": 4, "seed": 1, "islands": 1}))
    run_dir = tmp_path / "run"
    factory = partial(FaultInjectingWorker, faults={i: "raise" for i in range(5)}, marker_dir=str(tmp_path))
    Controller(exp, run_dir, worker_factory=factory).run()
    trials = Ledger(run_dir / "ledger.jsonl").records("trial")
    assert len(trials) == 5
    assert all(t["state"] == "failed" and "injected failure" in t["error"] for t in trials), trials[0]["error"]
    tells = Ledger(run_dir / "ledger.jsonl").records("tell")
    assert [t["values"] for t in tells] == [[-1.0] * 4]  # one full generation told, with the penalty
    assert not (run_dir / "best_recipe.yaml").exists()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x")]) == 1
    assert "no complete trial" in capsys.readouterr().err


def test_a_suite_whose_task_lacks_the_metric_is_refused_before_any_worker_starts(tmp_path, session_tiny_zoo, capsys):
    exp_path = _experiment(tmp_path, **LOCAL, suite={
        "task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search", "metric": "bleu"}]})
    assert main(["run", str(exp_path), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    assert "suite.tasks.0.metric: zoo_arith_l2_search does not produce 'bleu'; it reports ['acc']" \
        in capsys.readouterr().err
    assert not (tmp_path / "run" / "ledger.jsonl").exists()


def test_run_refuses_an_existing_run_dir(tmp_path, session_tiny_zoo, capsys):
    exp_path = _experiment(tmp_path, **LOCAL)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ledger.jsonl").write_text("")
    assert main(["run", str(exp_path), "--run-dir", str(run_dir), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_per_layer_search_runs(tmp_path, session_tiny_zoo):
    """A per-layer space: one density and weight per group (embed, each block, head) per expert."""
    _, trials = _run_local(
        tmp_path,
        search_space=str(ROOT / "search_spaces" / "ps_ties_dare_per_layer.yaml"),
        budget={"max_trials": 3},
    )
    layers = num_layers_of(str(session_tiny_zoo.models["base"]))
    assert len(trials) == 3 and all(t["state"] == "complete" for t in trials)
    for t in trials:
        assert len(t["genome"]) == 2 * 2 * (layers + 2)
        recipe = Recipe.from_dict(t["recipe"])
        assert all(len(recipe.model_params(m).parameters["density"]) == layers + 2 for m in ("expert_a", "expert_b"))
