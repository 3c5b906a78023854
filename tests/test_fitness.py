"""Fitness suites: caching, stratified subsamples, lm-eval pass-through, generate_until tasks,
and bad suites refused at `evomerge validate` (real lm-eval on the tiny zoo)."""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.cli import main
from evomerge.ledger import Ledger
from tests.tiny import experiment_file

SUITE = {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}],
         "test_tasks": [{"name": "zoo_arith_l2_test"}], "batch_size": 64}


def _constant_space(tmp_path: Path) -> str:
    """A PS space whose every genome decodes to the same recipe (bounds narrower than the
    recipes' 12-decimal rounding): every candidate after the first is a repeat."""
    path = tmp_path / "constant.yaml"
    path.write_text(yaml.safe_dump({"kind": "ps", "method": "linear",
                                    "parameters": {"weight": {"low": 0.5, "high": 0.5 + 1e-14}}}))
    return str(path)


def test_repeated_candidates_cost_nothing_within_a_run(tmp_path, session_tiny_zoo, capsys):
    exp = experiment_file(tmp_path, "repeat", search_space=_constant_space(tmp_path), suite=SUITE,
                          budget={"max_trials": 6})
    run_dir = tmp_path / "run"
    assert main(["run", str(exp), "--run-dir", str(run_dir)]) == 0
    trials = Ledger(run_dir / "ledger.jsonl").records("trial")
    assert len({t["recipe_hash"] for t in trials}) == 1 and len(trials) == 6
    assert "cached_from" not in trials[0] and trials[0]["eval_seconds"] > 0
    assert all(t["cached_from"].endswith(": trial 0") and t["worker"] == "cache" and t["eval_seconds"] == 0
               for t in trials[1:])
    assert {t["fitness"] for t in trials} == {trials[0]["fitness"]}
    assert "6 (0 failed, 5 cached)" in capsys.readouterr().out  # the summary says how many
    assert main(["status", str(run_dir)]) == 0
    assert "5 from the fitness cache" in capsys.readouterr().out


def test_a_shared_cache_answers_a_second_run_and_misses_when_the_suite_changes(tmp_path, session_tiny_zoo):
    suite = {**SUITE, "cache": "shared"}
    exp = experiment_file(tmp_path, "first", suite=suite, budget={"max_trials": 4})
    assert main(["run", str(exp), "--run-dir", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["run", str(exp), "--run-dir", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = Ledger(tmp_path / "a" / "ledger.jsonl"), Ledger(tmp_path / "b" / "ledger.jsonl")
    assert [t["fitness"] for t in a.records("trial")] == [t["fitness"] for t in b.records("trial")]
    second = b.records("trial") + b.records("baseline") + b.records("test")
    assert len(second) == 4 + 3 + 4  # trials, source baselines, test split (best + 3 sources)
    assert all(r.get("cached_from", "").startswith("a: ") for r in second), [r.get("cached_from") for r in second]
    assert all(r["eval_seconds"] == 0 for r in second)
    # another suite (a subsample of the search task): another fingerprint, nothing reused
    other = experiment_file(tmp_path, "first", suite={**suite, "tasks": [{"name": "zoo_arith_l2_search",
                                                                            "subsample": 20}]},
                            budget={"max_trials": 2})
    assert main(["run", str(other), "--run-dir", str(tmp_path / "c"), "--quiet"]) == 0
    c = Ledger(tmp_path / "c" / "ledger.jsonl")
    assert not any("cached_from" in r for r in c.records("trial") + c.records("baseline"))


def test_stratified_subsample_is_fixed_proportional_and_seeded(session_tiny_zoo):
    from evomerge.evaluate.lm_eval_runner import stratified_subsample, task_manager
    from lm_eval.tasks import get_task_dict

    manager = task_manager([str(session_tiny_zoo.tasks_dir)], ["zoo_arith_l2_test"])
    task = get_task_dict(["zoo_arith_l2_test"], manager)["zoo_arith_l2_test"]
    docs = task.eval_docs
    first = stratified_subsample(task, 20, seed=0, name="zoo_arith_l2_test")
    assert first == stratified_subsample(task, 20, seed=0, name="zoo_arith_l2_test")
    assert first != stratified_subsample(task, 20, seed=1, name="zoo_arith_l2_test")
    assert len(first) == len(set(first)) == 20 and first == sorted(first)
    labels = [docs[i]["label"] for i in range(len(docs))]
    for label in set(labels):
        share = labels.count(label) / len(labels) * 20
        got = sum(1 for i in first if labels[i] == label)
        assert abs(got - share) < 1  # largest remainders: within one item of proportional
    assert stratified_subsample(task, 10_000, seed=0, name="x") == list(range(len(docs)))


def test_generate_until_tasks_with_gen_kwargs_and_per_task_fewshot(tmp_path, session_tiny_zoo):
    """A generation task (greedy answer, exact match) next to a multiple-choice one, with suite
    gen_kwargs passed through to lm-eval and a per-task num_fewshot."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = session_tiny_zoo.tasks_dir / "zoo_arith_l2_search.jsonl"
    (tasks / "zoo_gen.yaml").write_text(yaml.safe_dump({
        "task": "zoo_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{choices[label]}}", "target_delimiter": " ",
        "generation_kwargs": {"until": ["!"], "max_gen_toks": 64, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }))
    suite = {"task_paths": ["zoo", str(tasks)], "batch_size": 32, "gen_kwargs": {"max_gen_toks": 6},
             "tasks": [{"name": "zoo_gen", "metric": "exact_match", "limit": 8},
                       {"name": "zoo_arith_l2_search", "limit": 8, "num_fewshot": 1}]}
    exp = experiment_file(tmp_path, "gen", suite=suite, budget={"max_trials": 2})
    assert main(["validate", str(exp)]) == 0

    from evomerge.config import load_experiment
    from evomerge.wiring import resolve_worker_spec
    from evomerge.worker import EvalRequest, TrialWorker

    worker = TrialWorker(resolve_worker_spec(load_experiment(exp)))
    _, task_dict, items = worker.evaluator._splits["search"]
    assert items == {"zoo_gen": list(range(8)), "zoo_arith_l2_search": list(range(8))}
    assert task_dict["zoo_gen"].config.generation_kwargs["max_gen_toks"] == 6  # suite gen_kwargs win
    assert task_dict["zoo_gen"].config.generation_kwargs["until"] == ["!"]      # the task's own stay
    assert task_dict["zoo_arith_l2_search"].config.num_fewshot == 1
    res = worker.run(EvalRequest(trial_id=0, source="expert_a"))
    assert res.state == "complete", res.error
    assert set(res.scores) == {"zoo_gen", "zoo_arith_l2_search"} and 0 <= res.scores["zoo_gen"] <= 1


def test_bad_suites_fail_at_validate_naming_the_field(tmp_path, session_tiny_zoo, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lost.yaml").write_text(yaml.safe_dump({
        "task": "lost_data", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "missing.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": "choices", "doc_to_target": "label"}))
    suite = {"task_paths": ["zoo", str(tasks)], "model_args": {"max_lenght": 64},
             "tasks": [{"name": "zoo_arith_l2_serch"}, {"name": "lost_data", "metric": "acc"},
                       {"name": "zoo_arith_l2_search", "metric": "exact_match"}]}
    exp = experiment_file(tmp_path, "bad", suite=suite)
    assert main(["validate", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "suite.model_args.max_lenght: not an argument of lm-eval's HFLM" in err
    assert "suite.tasks.0.name: no lm-eval task 'zoo_arith_l2_serch'" in err and "did you mean zoo_arith_l2_search" in err
    assert f"suite.tasks.1.name: lost_data's data file {tmp_path / 'missing.jsonl'} does not exist" in err
    assert "suite.tasks.2.metric: zoo_arith_l2_search does not produce 'exact_match'; it reports ['acc']" in err
    # config-level rules
    both = experiment_file(tmp_path, "both", suite={**SUITE, "tasks": [{"name": "zoo_arith_l2_search", "limit": 5,
                                                                        "subsample": 5}],
                                                     "fewshot_as_multiturn": True, "model_args": {"device": "cuda"}})
    assert main(["validate", str(both)]) == 2
    err = capsys.readouterr().err
    assert "suite.tasks.0.subsample: give limit" in err
    assert "suite.fewshot_as_multiturn: needs apply_chat_template" in err
    assert "suite.model_args.device: set by evomerge" in err


def test_installed_lm_eval_tasks_are_found_by_name(tmp_path, session_tiny_zoo, capsys):
    """A task from lm-eval's own catalogue needs no task_paths (the catalogue is indexed only then)."""
    suite = {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}],
             "test_tasks": [{"name": "arc_easy", "metric": "acc_norm"}, {"name": "arc_eazy"}]}
    exp = experiment_file(tmp_path, "catalogue", suite=suite)
    assert main(["validate", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "arc_easy'" not in err.replace("'arc_eazy'", "")  # the real one is found
    assert "suite.test_tasks.1.name: no lm-eval task 'arc_eazy'" in err and "arc_easy" in err
