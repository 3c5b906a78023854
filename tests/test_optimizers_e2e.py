"""Every optimizer by name from the experiment YAML, and a multi-objective run with its Pareto front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.ledger import Ledger
from evomerge.pareto import dominates, front_of
from evomerge.recipe import Recipe
from tiny import experiment_file



def _experiment(tmp_path: Path, name: str, optimizer: dict, tasks: list[str], max_trials: int,
                test_tasks: tuple[str, ...] = ()) -> Path:
    return experiment_file(tmp_path, name, budget={"max_trials": max_trials},
                           optimizer={"popsize": 4, "seed": 2, "islands": 1, **optimizer},
                           suite={"task_paths": ["zoo"], "tasks": [{"name": t} for t in tasks], "batch_size": 64,
                                  "test_tasks": [{"name": t} for t in test_tasks]})


@pytest.mark.parametrize("name", ["tpe", "optuna_cmaes", "random"])
def test_each_optimizer_runs_a_search_by_name(tmp_path, session_tiny_zoo, name):
    exp = _experiment(tmp_path, name, {"name": name}, ["zoo_arith_l2_search"], 8)
    run_dir = tmp_path / "run"
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--quiet"]) == 0
    led = Ledger(run_dir / "ledger.jsonl")
    trials = led.records("trial")
    assert len(trials) == 8 and all(t["state"] == "complete" for t in trials)
    assert len({t["recipe_hash"] for t in trials}) == 8
    assert [t["generation"] for t in led.records("tell")] == [0, 1]


def test_multi_objective_search_keeps_and_exports_the_pareto_front(tmp_path, session_tiny_zoo, capsys):
    tasks = ["zoo_arith_l2_search", "zoo_arith_l1_search"]  # the target skill in L2 vs the same skill in L1
    opt = {"name": "nsga2", "objectives": "per_task"}
    exp = _experiment(tmp_path, "mo", opt, tasks, 8, test_tasks=("zoo_arith_l2_test",))
    run_dir = tmp_path / "mo"
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--quiet"]) == 0

    trials = Ledger(run_dir / "ledger.jsonl").records("trial")
    assert all(t["objectives"] == [t["scores"][n] for n in tasks] for t in trials)
    tells = Ledger(run_dir / "ledger.jsonl").records("tell")
    assert all(len(v) == 2 for t in tells for v in t["values"])  # NSGA-II is told vectors
    front = front_of(trials)
    assert front
    for m in front:  # nothing dominates a member; every non-member is dominated or equal to one
        assert not any(dominates(t["objectives"], m["objectives"]) for t in trials)
    pareto = json.loads((run_dir / "pareto.json").read_text())
    assert pareto["objectives"] == tasks
    assert [m["trial_id"] for m in pareto["members"]] == [m["trial_id"] for m in front]

    capsys.readouterr()
    assert main(["export", str(run_dir), "--pareto", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["trial_id"] for m in listed] == [m["trial_id"] for m in front]
    # every member was scored on the held-out test split, and the listing shows it
    tests = {r["recipe_hash"]: r["fitness"] for r in Ledger(run_dir / "ledger.jsonl").records("test")
             if r.get("recipe_hash")}
    assert all(m["test"] is not None and m["test"] == tests[m["recipe_hash"]] for m in listed)
    assert main(["export", str(run_dir), "--pareto"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "test" in table[0].split() and all(f"{m['test']:.4f}" in line for m, line in zip(listed, table[1:]))
    member = front[-1]
    assert main(["export", str(run_dir), "--trial", str(member["trial_id"]), "--out", str(tmp_path / "x")]) == 0
    assert Recipe.load(tmp_path / "x" / "recipe.yaml").content_hash() == member["recipe_hash"]

    # resume with a larger budget replays NSGA-II's history (vectors, penalties) exactly
    assert main(["resume", str(run_dir), "--quiet", "--max-trials", "12"]) == 0
    ref_dir = tmp_path / "mo12"
    assert main(["run", str(_experiment(tmp_path, "mo12", opt, tasks, 12, test_tasks=("zoo_arith_l2_test",))),
                 "--run-dir", str(ref_dir), "--quiet"]) == 0
    got = {t["trial_id"]: t["genome"] for t in Ledger(run_dir / "ledger.jsonl").records("trial")}
    ref = {t["trial_id"]: t["genome"] for t in Ledger(ref_dir / "ledger.jsonl").records("trial")}
    assert got == ref  # one island, one worker: trial ids are deterministic too

    # a single-objective run has no front
    single = tmp_path / "single"
    assert main(["run", str(_experiment(tmp_path, "single", {"name": "random"}, tasks[:1], 2)),
                 "--run-dir", str(single), "--quiet"]) == 0
    assert main(["export", str(single), "--pareto"]) == 1
    assert "single-objective" in capsys.readouterr().err


def test_per_task_objectives_need_two_tasks_and_a_multi_objective_optimizer(tmp_path, capsys):
    exp = _experiment(tmp_path, "bad", {"name": "cma_es", "objectives": "per_task"}, ["zoo_arith_l2_search"], 4)
    assert main(["validate", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "per_task needs a multi-objective optimizer" in err
