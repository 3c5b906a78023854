"""Choosing the winner on a validation split: the rules (top trials, ties, a stale selection)
and real searches on the tiny zoo (real merges, real lm-eval, in-process): the ledger, the
best recipe, the summary, MLflow, status, export, the model card, and resume of a finished run,
also with more trials."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.cli import main
from evomerge.config import parse_experiment
from evomerge.errors import ConfigError
from evomerge.ledger import Ledger
from evomerge.recipe import Recipe
from evomerge.selection import current_selection, pick, top_trials, winner
from tiny import experiment_file

SUITE = {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}], "batch_size": 64,
         "validation_tasks": [{"name": "zoo_arith_l2_validation"}], "test_tasks": [{"name": "zoo_arith_l2_test"}]}


def _trial(t, fitness, recipe=None, state="complete", **extra):
    return {"kind": "trial", "trial_id": t, "fitness": fitness, "state": state,
            "recipe_hash": recipe or f"r{t}", "recipe": {}, **extra}


def test_top_trials_are_the_best_on_search_one_per_recipe_ties_in_ledger_order():
    trials = [_trial(0, 0.5), _trial(1, 0.7), _trial(2, 0.7, recipe="r1"), _trial(3, None, state="failed"),
              _trial(4, 0.7), _trial(5, 0.9, rung=0, last_rung=1), _trial(6, 0.6)]
    # trial 2 repeats trial 1's recipe; trial 5 stopped racing early, so it cannot win
    assert [r["trial_id"] for r in top_trials(trials, 3)] == [1, 4, 6]
    assert [r["trial_id"] for r in top_trials(trials, 10)] == [1, 4, 6, 0]


def test_the_winner_is_the_best_on_validation_then_on_search_then_the_earlier():
    cands = [_trial(1, 0.8), _trial(4, 0.7), _trial(6, 0.7)]
    assert pick(cands, {1: 0.5, 4: 0.6, 6: 0.55})["trial_id"] == 4
    assert pick(cands, {1: 0.6, 4: 0.6, 6: 0.6})["trial_id"] == 1  # a tie: the better search fitness
    assert pick(cands, {4: 0.6, 6: 0.6})["trial_id"] == 4  # then the earlier; 1 failed validation
    assert pick(cands, {}) is None


def test_a_selection_holds_until_a_later_trial_finishes():
    sel = {"kind": "selection", "trial_id": 0, "candidates": []}
    records = [_trial(0, 0.5), _trial(1, 0.7), sel]
    assert current_selection(records) is sel and winner(records)[0]["trial_id"] == 0
    later = records + [_trial(2, 0.6)]  # a resumed run given more trials: the search's best until it selects again
    assert current_selection(later) is None and winner(later) == (later[1], None)
    assert winner([_trial(0, 0.5), _trial(1, 0.4)])[0]["trial_id"] == 0  # no validation: the search's best


def test_validation_tasks_must_be_held_out_from_search_and_test(tmp_path):
    data = yaml.safe_load(experiment_file(tmp_path, "v", suite={
        **SUITE, "validation_tasks": [{"name": "zoo_arith_l2_search"}, {"name": "zoo_arith_l2_test"}]}).read_text())
    with pytest.raises(ConfigError) as err:
        parse_experiment(data, tmp_path)
    text = str(err.value)
    assert "suite.validation_tasks: ['zoo_arith_l2_search'] are also search tasks" in text
    assert "suite.validation_tasks: ['zoo_arith_l2_test'] are also test tasks" in text
    data["suite"]["validation_tasks"] = [{"name": "zoo_arith_l2_validation"}]
    data["selection"] = {"top_k": 0}
    with pytest.raises(ConfigError, match="selection.top_k"):
        parse_experiment(data, tmp_path)


def test_validate_names_an_unknown_validation_task(tmp_path, session_tiny_zoo, capsys):
    path = experiment_file(tmp_path, "v", suite={**SUITE, "validation_tasks": [{"name": "zoo_arith_l2_validaton"}]})
    assert main(["validate", str(path)]) != 0
    assert "suite.validation_tasks.0.name" in capsys.readouterr().err


def _records(run_dir):
    return list(Ledger(run_dir / "ledger.jsonl"))


def test_a_search_with_a_validation_split_exports_the_best_there(tmp_path, session_tiny_zoo, capsys):
    path = experiment_file(tmp_path, "val", suite=SUITE, selection={"top_k": 4}, budget={"max_trials": 12},
                           tracking={"backend": "mlflow"})
    run_dir = tmp_path / "val"
    assert main(["run", str(path), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    recs = _records(run_dir)
    trials = [r for r in recs if r["kind"] == "trial"]
    top = top_trials(trials, 4)
    validations = [r for r in recs if r["kind"] == "validation"]
    assert sorted(r["trial_id"] for r in validations) == sorted(r["trial_id"] for r in top)
    assert all(r["state"] == "complete" and r["split"] == "validation" for r in validations)
    scores = {r["trial_id"]: r["fitness"] for r in validations}
    (sel,) = [r for r in recs if r["kind"] == "selection"]
    chosen = pick(top, scores)
    assert sel["trial_id"] == chosen["trial_id"] and sel["validation_fitness"] == scores[chosen["trial_id"]]
    assert sel["search_best_trial"] == top[0]["trial_id"]
    # the winner is what best_recipe.yaml, the summary, status and export say
    assert Recipe.load(run_dir / "best_recipe.yaml").content_hash() == chosen["recipe_hash"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_trial"] == chosen["trial_id"] and summary["best_fitness"] == chosen["fitness"]
    assert summary["validation"] == {str(t): v for t, v in scores.items()}
    assert summary["search_best_trial"] == top[0]["trial_id"]
    assert "chosen on validation" in out and f"(drop {chosen['fitness'] - scores[chosen['trial_id']]:+.4f})" in out
    tests = {r["model"]: r for r in recs if r["kind"] == "test"}
    assert tests["best"]["recipe_hash"] == chosen["recipe_hash"] and tests["best"]["trial_id"] == chosen["trial_id"]
    if chosen["trial_id"] != top[0]["trial_id"]:  # the search split's best is tested too, to compare
        assert tests["search_best"]["recipe_hash"] == top[0]["recipe_hash"]
    assert {"base", "expert_a", "expert_b"} <= set(tests)
    from evomerge.status import format_status, run_status

    status = run_status(run_dir)
    assert status["best_trial"] == chosen["trial_id"] and status["best_validation"] == sel["validation_fitness"]
    assert status["best_test"] == tests["best"]["fitness"]
    assert any(k == "best's scores" and "validation" in v for k, v in format_status(status))
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "model")]) == 0
    card = (tmp_path / "model" / "README.md").read_text()
    assert "| model | search fitness | validation fitness | test fitness |" in card
    assert (f"| **this merge** | {chosen['fitness']:.4f} | {scores[chosen['trial_id']]:.4f} | "
            f"{tests['best']['fitness']:.4f} |") in card
    import mlflow

    info = json.loads((run_dir / "run.json").read_text())
    run = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").get_run(info["mlflow_run_id"])
    assert run.data.metrics["validation_fitness"] == sel["validation_fitness"]
    assert run.data.metrics["selected_trial"] == chosen["trial_id"]
    assert {f"validation.{t}" for t in scores} <= set(run.data.metrics)

    # resume of the finished run: nothing is scored again, the same winner
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    again = _records(run_dir)[len(recs):]
    assert not [r for r in again if r["kind"] in ("trial", "validation", "test")]
    assert [r["trial_id"] for r in again if r["kind"] == "selection"] == [chosen["trial_id"]]

    # more trials: the top 4 is recomputed, and only its new members are scored on validation
    assert main(["resume", str(run_dir), "--quiet", "--max-trials", "20"]) == 0
    recs = _records(run_dir)
    trials = [r for r in recs if r["kind"] == "trial"]
    assert len(trials) == 20
    validated = [r["trial_id"] for r in recs if r["kind"] == "validation"]
    assert len(validated) == len(set(validated))  # no trial scored on validation twice
    top = top_trials(trials, 4)
    assert {r["trial_id"] for r in top} <= set(validated)
    final = [r for r in recs if r["kind"] == "selection"][-1]
    scores = {r["trial_id"]: r["fitness"] for r in recs if r["kind"] == "validation"}
    assert final["trial_id"] == pick(top, scores)["trial_id"] == winner(recs)[0]["trial_id"]
    assert Recipe.load(run_dir / "best_recipe.yaml").content_hash() == winner(recs)[0]["recipe_hash"]


def test_the_plan_counts_the_validation_evaluations(tmp_path, session_tiny_zoo, capsys):
    path = experiment_file(tmp_path, "plan", suite=SUITE, selection={"top_k": 4}, budget={"max_trials": 12})
    assert main(["run", str(path), "--dry-run", "--json", "--trial-seconds", "1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in plan["validation_tasks"]] == ["zoo_arith_l2_validation"] and plan["top_k"] == 4
    # 3 baselines, 4 validations, then the winner, the search's best and 3 sources on test
    assert plan["extra_evaluations"] == 3 + 4 + 5
    assert main(["run", str(path), "--dry-run", "--trial-seconds", "1"]) == 0
    assert "the top 4 trials by search fitness, the best there wins" in capsys.readouterr().out
