"""M2N2: fitness sharing, attraction, crossover over layer groups, archive replacement, and a
real search on the tiny zoo (per-item scores from lm-eval, through the ledger) that resumes
after a crash to exactly the genomes of an uninterrupted run."""

from __future__ import annotations


import numpy as np
import pytest

from evomerge.cli import main
from evomerge.ledger import Ledger
from evomerge.optimize.m2n2 import M2N2
from evomerge.run_dir import unpack_values
from tiny import ROOT, crashed_copy, experiment_file


def _filled(opt: M2N2, rows: list[list[float]], genomes=None) -> M2N2:
    genomes = genomes or [np.full(opt.dim, i / 10) for i in range(len(rows))]
    opt.tell(genomes, [float(np.mean(r)) for r in rows], items=rows)
    return opt


def test_shared_fitness_divides_each_item_among_the_members_that_solve_it():
    opt = _filled(M2N2(2, popsize=3, archive_size=3), [[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    # item loads 2, 1, 1: member 0 gets 1/2 + 1, member 1 gets 1/2, member 2 gets 1
    np.testing.assert_allclose(opt.shared_fitness(), [1.5, 0.5, 1.0], atol=1e-6)
    plain = _filled(M2N2(2, popsize=3, archive_size=3, alpha=0.0), [[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(plain.shared_fitness(), [2, 1, 1])  # alpha 0: the plain score


def test_attraction_favours_a_partner_strong_where_the_parent_is_weak_on_scarce_items():
    opt = _filled(M2N2(2, popsize=3, archive_size=4), [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]])
    pull = opt.attraction(0)
    # member 1 adds item 2 (load 1), member 2 adds item 3 (load 1), member 3 adds nothing
    np.testing.assert_allclose(pull, [0, 1, 1, 0], atol=1e-6)
    assert opt.attraction(1)[0] == 0  # nothing to offer a parent that solves a superset


def test_a_member_that_holds_a_niche_outlives_duplicates_with_a_higher_mean():
    rows = [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]]  # three copies (mean 0.5) and a niche (0.25)
    shared = _filled(M2N2(1, popsize=4, archive_size=3), rows)
    assert sorted(shared._fitness) == [0.25, 0.5, 0.5]  # a copy left, the niche stayed
    plain = _filled(M2N2(1, popsize=4, archive_size=3, alpha=0.0), rows)
    assert sorted(plain._fitness) == [0.5, 0.5, 0.5]  # without sharing the niche is the one to go


def test_crossover_mixes_two_parents_per_layer_group_with_one_ratio_and_its_complement():
    groups = (0, 1, 2, 0, 1, 2, -1)  # two parameters over three groups, and a global gene
    opt = M2N2(7, popsize=4, archive_size=2, gene_groups=groups, seed=3)
    a, b = np.zeros(7), np.ones(7)
    opt.tell([a, b], [0.5, 0.5], items=[[1, 0], [0, 1]])
    opt._asked = 2  # the archive is full: the next asks are children
    splits = set()
    for child in opt.ask() + opt.ask():
        t = child  # child = t*b + (1-t)*a per gene, as a, b are 0 and 1
        by_group = {g: {round(x, 12) for x, gg in zip(t, np.maximum(groups, 0)) if gg == g} for g in range(3)}
        assert all(len(v) == 1 for v in by_group.values())  # one value per group
        values = {v for s in by_group.values() for v in s}
        assert len(values) <= 2 and (len(values) == 1 or abs(sum(values) - 1) < 1e-9)  # w and 1 - w
        assert round(t[6], 12) in by_group[0]  # the global gene goes with the first part
        splits.add(tuple(sorted(by_group[g].pop() for g in range(3))))
    assert len(splits) > 1


def test_without_items_the_archive_is_an_elite_and_failures_solve_nothing():
    opt = M2N2(3, popsize=2, archive_size=2)
    opt.tell([np.zeros(3), np.ones(3)], [0.2, 0.9])
    opt.tell([np.full(3, 0.5), np.full(3, 0.6)], [0.5, 0.1])
    assert sorted(opt._fitness) == [0.5, 0.9]
    with pytest.raises(ValueError, match="one genome"):
        opt.tell([np.zeros(3)], [0.1], items=[None, None])


def test_build_needs_two_parents_and_matching_groups():
    with pytest.raises(ValueError, match="archive_size"):
        M2N2(3, popsize=2, archive_size=1)
    with pytest.raises(ValueError, match="gene_groups"):
        M2N2(3, popsize=2, gene_groups=(0, 1))


def _m2n2_run(tmp_path, name, trials):
    path = experiment_file(tmp_path, name, search_space=str(ROOT / "search_spaces" / "ps_ties_per_layer.yaml"),
                           optimizer={"name": "m2n2", "popsize": 4, "seed": 1, "islands": 1,
                                      "m2n2": {"archive_size": 4}},
                           budget={"max_trials": trials})
    return path, tmp_path / name


def test_an_m2n2_search_tells_per_item_scores_and_resumes_to_the_same_genomes(tmp_path, session_tiny_zoo):
    path, clean = _m2n2_run(tmp_path, "clean", 12)
    assert main(["run", str(path), "--run-dir", str(clean), "--quiet"]) == 0
    recs = list(Ledger(clean / "ledger.jsonl"))
    trials = [r for r in recs if r["kind"] == "trial"]
    assert len(trials) == 12 and all(r["state"] == "complete" for r in trials)
    for r in trials:  # the per-item scores the optimizer was told are in the trial record
        values = unpack_values(r["item_values"])
        assert len(values) == 60 and np.mean(values) == pytest.approx(r["fitness"])
    tells = [r for r in recs if r["kind"] == "tell"]
    assert [len(t["state"]["archive"]) for t in tells] == [4, 4, 4]  # filled, then replaced in place
    # the process dies after the 7th trial; resume continues to the very same genomes and tells
    cut = [i for i, r in enumerate(recs) if r["kind"] == "trial"][6]
    crashed = crashed_copy(clean, tmp_path / "crashed", recs[: cut + 1])
    assert main(["resume", str(crashed), "--quiet"]) == 0
    after = list(Ledger(crashed / "ledger.jsonl"))
    genomes = lambda rs: {r["trial_id"]: r["genome"] for r in rs if r["kind"] == "trial"}  # noqa: E731
    assert genomes(after) == genomes(recs)
    assert [t["state"] for t in after if t["kind"] == "tell"] == [t["state"] for t in tells]


def test_m2n2_refuses_racing(tmp_path, capsys):
    path = experiment_file(tmp_path, "race", optimizer={"name": "m2n2", "popsize": 4},
                           suite={"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}],
                                  "racing": {"rungs": [20, 60]}})
    assert main(["validate", str(path)]) != 0
    assert "m2n2 shares each search item" in capsys.readouterr().err
