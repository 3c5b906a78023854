"""Racing (multi-fidelity fitness) and per-item scores: the race's arithmetic and rules, nested
stratified rungs, and real searches on the tiny zoo (real merges, real lm-eval, in-process),
including a crash at each point of a trial's race followed by `evomerge resume`."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from evomerge.cli import main
from evomerge.config import RacingConfig, TaskSpec
from evomerge.ledger import Ledger
from evomerge.racing import MIN_SEEN, Race, tallies_of
from evomerge.run_dir import read_items
from tiny import crashed_copy, experiment_file

RACING = {"rungs": [20, 60], "promote": 0.4}


def _items(task, values, start=0):
    return {task: {"task": task, "docs": list(range(start, start + len(values))), "values": values}}


def test_a_promoted_score_is_the_mean_over_every_item_seen():
    race = Race(RacingConfig(rungs=[4, 10]), [TaskSpec(name="a", weight=3), TaskSpec(name="b", weight=1)])
    first = {**_items("a", [1, 1, 0, 0]), **_items("b", [1, 0, 0, 0])}
    fitness, scores, se = race.add(7, 0, tallies_of(first))
    assert scores == {"a": 0.5, "b": 0.25} and fitness == pytest.approx((3 * 0.5 + 0.25) / 4)
    assert se == pytest.approx(((3 * (0.25 / 4) ** 0.5) ** 2 + ((0.1875 / 4) ** 0.5) ** 2) ** 0.5 / 4)
    more = {**_items("a", [1, 1, 1, 1, 1, 1], 4), **_items("b", [0, 0, 0, 0, 0, 1], 4)}
    fitness, scores, _ = race.add(7, 1, tallies_of(more))
    assert scores == {"a": pytest.approx(0.8), "b": pytest.approx(0.2)}
    assert fitness == pytest.approx((3 * 0.8 + 0.2) / 4)
    assert race.fitness_by_rung[7] == [pytest.approx((3 * 0.5 + 0.25) / 4), pytest.approx(0.65)]
    assert race.items_scored == 20


def test_rule_top_promotes_the_top_share_after_a_few_scores():
    race = Race(RacingConfig(rungs=[10, 20], rule="top", promote=0.4), [TaskSpec(name="a")])
    decisions = []
    for trial, value in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.05, 0.45, 0.35]):
        race.add(trial, 0, {"a": [10, 10 * value, 10 * value]})
        decisions.append(race.promote(0, value, 0.0))
    assert decisions[:MIN_SEEN] == [True] * MIN_SEEN  # too few scores to rank
    # 6 seen: top 40 % is the best 3 (>= 0.3); 7 seen: >= 0.4; 8 seen: >= 0.35
    assert decisions[MIN_SEEN:] == [False, True, True]
    assert race.promote(1, 0.9, 0.0) is False  # nothing above the last rung


def test_rule_elite_promotes_what_matches_one_of_the_best_on_the_same_items():
    race = Race(RacingConfig(rungs=[10, 20], elite=2), [TaskSpec(name="a")])
    assert RacingConfig(rungs=[10, 20]).rule == "elite"

    def trial(t, first, rest=None):
        race.add(t, 0, {"a": [10, 10 * first, 10 * first]})
        if rest is None or not race.promote(0, first, 0.0):
            race.finish(t, 0, first)
            return False
        fitness, _, _ = race.add(t, 1, {"a": [10, 10 * rest, 10 * rest]})
        race.finish(t, 1, fitness)
        return True

    assert trial(0, 0.2, 0.6) and trial(1, 0.5, 0.3)  # fewer than 2 finalists: promoted
    # finalists: trial 0 (0.4 final, 0.2 on rung 0) and trial 1 (0.4, 0.5): the bar is 0.2
    assert not trial(2, 0.1, 0.9) and trial(3, 0.2, 0.9)
    # trial 3 (0.55 final, 0.2 on rung 0) replaces trial 1 among the best two: bar still 0.2
    assert race.promote(0, 0.2, 0.0) and not race.promote(0, 0.19, 0.0)
    assert race.finalists[-1] == (pytest.approx(0.55), [0.2, pytest.approx(0.55)])


def test_rule_bound_promotes_while_the_upper_bound_reaches_the_best_final():
    race = Race(RacingConfig(rungs=[10, 20], rule="bound", z=2.0), [TaskSpec(name="a")])
    assert race.promote(0, 0.1, 0.01)  # nothing final yet
    race.finish(0, 1, 0.6)
    assert race.best_final == 0.6
    assert race.promote(0, 0.5, 0.06) and not race.promote(0, 0.5, 0.04)
    race.finish(1, 0, 0.9)  # a final score below the last rung does not raise the bar
    assert race.best_final == 0.6


def test_racing_needs_increasing_rungs_and_one_fitness(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="rungs must increase"):
        RacingConfig(rungs=[60, 20])
    path = experiment_file(tmp_path, "bad", optimizer={"name": "nsga2", "objectives": "per_task", "popsize": 4},
                           suite={"task_paths": ["zoo"], "racing": RACING,
                                  "tasks": [{"name": "zoo_arith_l2_search"}, {"name": "zoo_arith_l1_search"}]})
    assert main(["validate", str(path)]) == 2


def test_rungs_are_nested_stratified_prefixes(session_tiny_zoo):
    from lm_eval.tasks import TaskManager, get_task_dict

    from evomerge.evaluate.lm_eval_runner import stratified_order

    manager = TaskManager(include_path=[str(session_tiny_zoo.tasks_dir)], include_defaults=False)
    task = get_task_dict(["zoo_arith_l2_search"], manager)["zoo_arith_l2_search"]
    pool = list(range(len(task.eval_docs)))
    order = stratified_order(task, pool, 0, "zoo_arith_l2_search")
    assert sorted(order) == pool and order == stratified_order(task, pool, 0, "zoo_arith_l2_search")
    assert order != stratified_order(task, pool, 1, "zoo_arith_l2_search")
    targets = Counter(str(task.doc_to_target(d)) for d in task.eval_docs)
    for n in (8, 20, 33):
        got = Counter(str(task.doc_to_target(task.eval_docs[i])) for i in order[:n])
        for label, count in targets.items():  # every prefix within one item of its share
            assert abs(got[label] - n * count / len(pool)) <= 1.0, (n, label)


def _race_run(tmp_path, name="race", **over):
    path = experiment_file(tmp_path, name, suite={
        "task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search", "metric": "acc"}],
        "batch_size": 64, "racing": RACING}, budget={"max_trials": 12}, **over)
    run_dir = tmp_path / name
    assert main(["run", str(path), "--run-dir", str(run_dir), "--quiet"]) == 0
    return run_dir


def _records(run_dir):
    return list(Ledger(run_dir / "ledger.jsonl"))


def test_a_racing_search_records_rungs_items_and_picks_its_best_on_the_last_rung(tmp_path, session_tiny_zoo):
    run_dir = _race_run(tmp_path, tracking={"backend": "mlflow"})
    recs = _records(run_dir)
    trials = [r for r in recs if r["kind"] == "trial"]
    rungs = [r for r in recs if r["kind"] == "rung"]
    assert len(trials) == 12 and all(r["state"] == "complete" and r["last_rung"] == 1 for r in trials)
    at = Counter(r["rung"] for r in trials)
    assert at[0] > 0 and at[1] > 0  # some stopped early, some went on
    for t in trials:  # a trial's rung records: one per rung it reached, its final score the last one's
        mine = [r for r in rungs if r["trial_id"] == t["trial_id"]]
        assert [r["rung"] for r in mine] == list(range(t["rung"] + 1))
        assert [r["promoted"] for r in mine] == [True] * t["rung"] + [False]
        assert t["fitness"] == mine[-1]["fitness"] and t["rung_fitness"] == [r["fitness"] for r in mine]
        assert sum(r["tallies"]["zoo_arith_l2_search"][0] for r in mine) == [20, 60][t["rung"]]
    summary = json.loads((run_dir / "summary.json").read_text())
    best = max((t for t in trials if t["rung"] == 1), key=lambda t: t["fitness"])
    assert summary["best_trial"] == best["trial_id"]
    # per-item scores: each rung's new items, each baseline's last-rung items, values that add up
    items = read_items(run_dir)
    for r in rungs:
        (mine,) = [i for i in items if i.get("trial_id") == r["trial_id"] and i["rung"] == r["rung"]]
        n, total, _ = r["tallies"]["zoo_arith_l2_search"]
        assert len(mine["items"]) == n and sum(mine["items"].values()) == total
    sources = [i for i in items if "source" in i]
    assert {i["source"] for i in sources} == {"base", "expert_a", "expert_b"}
    assert all(len(i["items"]) == 60 for i in sources)
    first = {i["trial_id"]: set(i["items"]) for i in items if i.get("rung") == 0}
    later = {i["trial_id"]: set(i["items"]) for i in items if i.get("rung") == 1}
    assert len({frozenset(s) for s in first.values()}) == 1  # every candidate on the same rung-0 items
    assert all(not (later[t] & first[t]) for t in later)  # a promoted trial is scored on new items only
    # MLflow has the rung of each trial; status counts the stops and the item evaluations
    import mlflow

    info = json.loads((run_dir / "run.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    history = client.get_metric_history(info["mlflow_run_id"], "rung")
    assert sorted(int(m.value) for m in history) == sorted(t["rung"] for t in trials)
    from evomerge.status import run_status

    status = run_status(run_dir)
    assert status["racing"]["stopped_at_rung"] == [at[0], at[1]]
    assert status["racing"]["item_evaluations"] == sum(r["tallies"]["zoo_arith_l2_search"][0] for r in rungs)


@pytest.mark.parametrize("crash_after", ["promoted", "final"])
def test_a_crash_mid_race_resumes_without_scoring_anything_twice(tmp_path, session_tiny_zoo, crash_after):
    clean = _race_run(tmp_path, "clean")
    recs = _records(clean)
    # the process dies right after a rung record: one that sent its trial on, or one that ended it
    cut = next(i for i, r in enumerate(recs) if r["kind"] == "rung" and r["promoted"] == (crash_after == "promoted")
               and r["trial_id"] >= 4)
    crashed = crashed_copy(clean, tmp_path / "crashed", recs[: cut + 1])
    assert main(["resume", str(crashed), "--quiet"]) == 0
    after = _records(crashed)
    rung_keys = [(r["trial_id"], r["rung"]) for r in after if r["kind"] == "rung"]
    assert len(rung_keys) == len(set(rung_keys))  # no rung scored twice
    key = lambda r: (r["trial_id"], r["rung"], r["fitness"])  # noqa: E731
    assert sorted(map(key, (r for r in after if r["kind"] == "trial"))) == \
        sorted(map(key, (r for r in recs if r["kind"] == "trial")))  # the same trials as the clean run


def test_validate_refuses_racing_on_a_metric_that_is_not_a_mean(tmp_path, session_tiny_zoo):
    task = yaml.safe_load((session_tiny_zoo.tasks_dir / "zoo_arith_l2_search.yaml").read_text())
    task["task"] = "median_task"
    task["metric_list"] = [{"metric": "acc", "aggregation": "median", "higher_is_better": True}]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "median_task.yaml").write_text(yaml.safe_dump(task))
    suite = {"task_paths": [str(tasks)], "tasks": [{"name": "median_task", "metric": "acc"}], "racing": RACING}
    path = experiment_file(tmp_path, "median", suite=suite)
    assert main(["validate", str(path)]) == 2
    suite.pop("racing")
    assert main(["validate", str(experiment_file(tmp_path, "median_ok", suite=suite))]) == 0
