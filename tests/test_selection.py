"""Choosing the winner on a validation split: the rules (top trials, ties, a stale selection)
and real searches on the tiny zoo (real merges, real lm-eval, in-process): the ledger, the
best recipe, the summary, MLflow, status, export, the model card, and resume of a finished run,
also with more trials."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from evomerge.cli import main
from evomerge.config import parse_experiment
from evomerge.errors import ConfigError
from evomerge.ledger import Ledger
from evomerge.recipe import Recipe
from evomerge.selection import (ItemMatrix, choose, current_selection, gate, gated_index, paired_z, pick,
                                task_values, top_trials, winner, winners_curse)
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


def _matrix(rows, weights=None):
    per = [{"t": list(r)} for r in rows]
    return ItemMatrix.of(per, {"t": 1.0} if weights is None else weights)


def test_task_values_order_documents_by_leaf_then_id_and_the_matrix_weights_tasks():
    items = {"b": {"task": "T", "docs": [3, 1], "values": [1.0, 0.0]},
             "a": {"task": "T", "docs": [2], "values": [1.0]}, "c": {"task": "U", "docs": [0, 1], "values": [0, 1]}}
    assert task_values(items) == {"T": [1.0, 0.0, 1.0], "U": [0.0, 1.0]}
    m = ItemMatrix.of([{"T": [1, 0, 1], "U": [0, 1]}, {"T": [0, 0, 0], "U": [1, 1]}], {"T": 3.0, "U": 1.0})
    assert m.fitness() == pytest.approx([0.75 * 2 / 3 + 0.25 * 0.5, 0.25])  # each task's mean, weighted
    with pytest.raises(ValueError, match="not scored on the same documents"):
        ItemMatrix.of([{"T": [1, 0]}, {"T": [1]}], {"T": 1.0})


def test_paired_z_counts_standard_errors_of_the_per_item_differences():
    m = _matrix([[1, 0, 1, 0, 1, 0, 1, 0], [1, 1, 1, 0, 1, 0, 1, 0], [1, 0, 1, 0, 1, 0, 1, 0]])
    d = np.array([0, 1, 0, 0, 0, 0, 0, 0], dtype=float)
    assert paired_z(m.values, m.weights, m.strata, 1) == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(8)))
    assert paired_z(m.values, m.weights, m.strata, 2) == 0.0  # the same items solved
    assert paired_z(m.values, m.weights, m.strata, 0, 1) < 0


def test_the_gate_keeps_the_search_pick_unless_a_candidate_beats_it_clearly():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.5).astype(float)
    close = base.copy()
    close[np.flatnonzero(base == 0)[:3]] = 1  # 3 items better: z ~ 1.7
    far = base.copy()
    far[np.flatnonzero(base == 0)[:30]] = 1  # 30 better, 2 worse
    far[np.flatnonzero(base == 1)[:2]] = 0
    m = _matrix([base, close, far])
    assert gated_index(m.values, m.weights, m.strata, 0.0) == 2  # the plain best on validation
    assert gated_index(m.values, m.weights, m.strata, 2.0) == 2
    m2 = _matrix([base, close])
    assert gated_index(m2.values, m2.weights, m2.strata, 0.0) == 1
    assert gated_index(m2.values, m2.weights, m2.strata, 2.0) == 0  # 3 items are not evidence
    assert gated_index(m2.values, m2.weights, m2.strata, 1.0) == 1
    assert gated_index(_matrix([base, base]).values, m2.weights, m2.strata, 0.0) == 0  # a tie keeps row 0


def test_the_winners_curse_correction_removes_the_bias_of_picking_the_best_of_equals():
    # 8 candidates of the same true score 0.5, each scored on its own 300 items: the best of
    # them on those items overstates its score by ~1.4 standard errors (~4 points); less its
    # bootstrap winner's curse, the estimate is unbiased within a point
    rng = np.random.default_rng(1)

    rule = gate(0.0)
    raw, corrected = [], []
    for draw in range(60):
        m = _matrix(rng.random((8, 300)) < 0.5)
        j = rule(m.values, m.weights, m.strata)
        curse = winners_curse(m, rule, seed=draw, replicates=200)
        raw.append(m.fitness()[j] - 0.5)
        corrected.append(m.fitness()[j] - curse - 0.5)
    assert np.mean(raw) > 0.03
    assert abs(np.mean(corrected)) < 0.012
    # one candidate, or candidates that solve the same items: no curse
    assert winners_curse(_matrix([[1, 0, 1]]), rule) == 0.0
    same = _matrix([[1, 0] * 100, [1, 0] * 100])  # row 0 always picked: its replicate mean is unbiased
    assert winners_curse(same, rule, replicates=200) == pytest.approx(0.0, abs=0.01)


def test_choose_applies_min_z_and_corrects_only_what_it_can_resample():
    cands = [_trial(1, 0.8), _trial(4, 0.7), _trial(6, 0.7)]
    base = [1, 0] * 50
    better = [1] * 20 + base[20:]  # 10 more items solved, none lost
    items = {1: {"t": base}, 4: {"t": better}, 6: {"t": base}}
    val = {1: 0.5, 4: 0.6, 6: 0.5}
    plain = choose(cands, val, items, {"t": 1.0}, 0.0)
    assert plain.winner["trial_id"] == 4 and plain.z[1] == 0.0 and plain.z[4] > 2 and plain.z[6] == 0.0
    assert plain.winners_curse is not None
    assert choose(cands, val, items, {"t": 1.0}, 10.0).winner["trial_id"] == 1  # not 10 standard errors
    assert choose(cands, val, items, {"t": 1.0}, 1.0).winner["trial_id"] == 4
    # a candidate scored without per-item values: min_z 0 still lets it win, no curse is computed
    partial = choose(cands, {**val, 6: 0.9}, {1: items[1], 4: items[4]}, {"t": 1.0}, 0.0)
    assert partial.winner["trial_id"] == 6 and partial.winners_curse is None
    # ... but above 0 it cannot displace the search's pick, nor can anyone when that pick has none
    assert choose(cands, {**val, 6: 0.9}, {1: items[1], 4: items[4]}, {"t": 1.0}, 1.0).winner["trial_id"] == 4
    assert choose(cands, val, {4: items[4]}, {"t": 1.0}, 1.0).winner["trial_id"] == 1
    # the search's pick failed validation: the plain best there
    assert choose(cands, {4: 0.6, 6: 0.5}, items, {"t": 1.0}, 1.0).winner["trial_id"] == 4
    assert choose(cands, {}, {}, {"t": 1.0}, 1.0) is None


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
    # min_z 0: the plain best on validation (the default 2 is tested below)
    path = experiment_file(tmp_path, "val", suite=SUITE, selection={"top_k": 4, "min_z": 0}, budget={"max_trials": 12},
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
    # each validation record keeps its per-item values (the tiny zoo: 60 items), which make its
    # fitness; the selection pairs the candidates on them and corrects the winner's score
    values = {r["trial_id"]: {t: [float(c) for c in v] for t, v in r["item_values"].items()} for r in validations}
    assert all(list(v) == ["zoo_arith_l2_validation"] and len(v["zoo_arith_l2_validation"]) == 60
               for v in values.values())
    assert all(np.mean(values[t]["zoo_arith_l2_validation"]) == pytest.approx(scores[t]) for t in scores)
    assert sel["min_z"] == 0.0 and sel["candidates"][0]["z"] == 0.0
    assert all(c["z"] is not None for c in sel["candidates"])
    assert sel["winners_curse"] is not None and sel["validation_corrected"] == pytest.approx(
        sel["validation_fitness"] - sel["winners_curse"])
    # the winner is what best_recipe.yaml, the summary, status and export say
    assert Recipe.load(run_dir / "best_recipe.yaml").content_hash() == chosen["recipe_hash"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_trial"] == chosen["trial_id"] and summary["best_fitness"] == chosen["fitness"]
    assert summary["validation"] == {str(t): v for t, v in scores.items()}
    assert summary["search_best_trial"] == top[0]["trial_id"]
    assert "chosen on validation" in out and f"(drop {chosen['fitness'] - scores[chosen['trial_id']]:+.4f})" in out
    assert summary["validation_corrected"] == sel["validation_corrected"]
    assert f"{sel['validation_corrected']:.4f}: the validation score less its winner's curse" in out
    tests = {r["model"]: r for r in recs if r["kind"] == "test"}
    assert tests["best"]["recipe_hash"] == chosen["recipe_hash"] and tests["best"]["trial_id"] == chosen["trial_id"]
    if chosen["trial_id"] != top[0]["trial_id"]:  # the search split's best is tested too, to compare
        assert tests["search_best"]["recipe_hash"] == top[0]["recipe_hash"]
    assert {"base", "expert_a", "expert_b"} <= set(tests)
    from evomerge.status import format_status, run_status

    status = run_status(run_dir)
    assert status["best_trial"] == chosen["trial_id"] and status["best_validation"] == sel["validation_fitness"]
    assert status["best_validation_corrected"] == sel["validation_corrected"]
    assert status["best_test"] == tests["best"]["fitness"]
    assert any(k == "best's scores" and "validation" in v for k, v in format_status(status))
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "model")]) == 0
    card = (tmp_path / "model" / "README.md").read_text()
    assert "| model | search fitness | validation fitness | test fitness |" in card
    assert (f"| **this merge** | {chosen['fitness']:.4f} ± " in card and f" | {scores[chosen['trial_id']]:.4f} ± " in card
            and f" | {tests['best']['fitness']:.4f} ± " in card)  # each with its standard error
    assert f"less its winner's curse (a paired bootstrap of the validation items) it is {sel['validation_corrected']:.4f}." in card
    import mlflow

    info = json.loads((run_dir / "run.json").read_text())
    run = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}").get_run(info["mlflow_run_id"])
    assert run.data.metrics["validation_fitness"] == sel["validation_fitness"]
    assert run.data.metrics["validation_corrected"] == pytest.approx(sel["validation_corrected"])
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
    assert ("the top 4 trials by search fitness, the best there wins if it beats the search split's best there by "
            "2 paired standard errors") in capsys.readouterr().out  # the default min_z


def test_min_z_keeps_the_search_pick_without_evidence(tmp_path, session_tiny_zoo, capsys):
    # no candidate beats the search split's best by 10 paired standard errors on 60 items
    path = experiment_file(tmp_path, "gate", suite=SUITE, selection={"top_k": 4, "min_z": 10},
                           budget={"max_trials": 8})
    run_dir = tmp_path / "gate"
    assert main(["run", str(path), "--run-dir", str(run_dir), "--quiet"]) == 0
    recs = _records(run_dir)
    top = top_trials([r for r in recs if r["kind"] == "trial"], 4)
    (sel,) = [r for r in recs if r["kind"] == "selection"]
    assert sel["min_z"] == 10 and sel["trial_id"] == top[0]["trial_id"] == winner(recs)[0]["trial_id"]
    assert all(c["z"] < 10 for c in sel["candidates"])
    assert Recipe.load(run_dir / "best_recipe.yaml").content_hash() == top[0]["recipe_hash"]
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "if it beats the search split's best there by 10 paired standard errors" in capsys.readouterr().out


def test_a_shared_cache_keeps_the_validation_items(tmp_path, session_tiny_zoo):
    # a second run answered by the shared fitness cache pairs its candidates on the same items
    path = experiment_file(tmp_path, "shared", suite={**SUITE, "cache": "shared"}, selection={"top_k": 2},
                           budget={"max_trials": 4})
    for name in ("a", "b"):
        assert main(["run", str(path), "--run-dir", str(tmp_path / name), "--quiet"]) == 0
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    va = {r["trial_id"]: r for r in a if r["kind"] == "validation"}
    vb = {r["trial_id"]: r for r in b if r["kind"] == "validation"}
    assert all(r.get("cached_from", "").startswith("a: ") for r in vb.values())
    assert {t: r["item_values"] for t, r in vb.items()} == {t: r["item_values"] for t, r in va.items()}
    (sa,), (sb,) = ([r for r in recs if r["kind"] == "selection"] for recs in (a, b))
    assert sb["winners_curse"] is not None and sb["validation_corrected"] == sa["validation_corrected"]
    # the default rule: the search split's best unless a candidate beats it by 2 paired standard errors
    assert sa["min_z"] == 2.0
    gate = [c for c in sa["candidates"] if c["z"] >= 2 and c["validation"] > sa["candidates"][0]["validation"]]
    assert sa["trial_id"] == (max(gate, key=lambda c: c["validation"])["trial_id"] if gate
                              else sa["candidates"][0]["trial_id"])
