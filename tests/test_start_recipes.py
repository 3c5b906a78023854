"""Start recipes (``optimizer.start_from``): presets and recipe files a CMA-ES search evaluates in
its first generation, at exactly their values, on the tiny zoo with real merges."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.config import OptimizerConfig, load_experiment
from evomerge.errors import ConfigError
from evomerge.ledger import Ledger
from evomerge.optimize import build_optimizer
from evomerge.presets import layer_swapping
from evomerge.recipe import ModelParams, Recipe
from evomerge.start_recipes import in_method, start_points
from evomerge.wiring import build_codec, resolve_worker_spec
from tiny import ROOT, crashed_copy, experiment_file

PER_LAYER = str(ROOT / "search_spaces" / "ps_ties_per_layer.yaml")
SWAP = "layer_swapping:outer=expert_b,inner=expert_a,k=0"


def _codec(path):
    exp = load_experiment(path)
    return exp, build_codec(exp, resolve_worker_spec(exp))


def _merged(tmp_path, exp_path, recipe, name):
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump(recipe.to_dict()))
    assert main(["merge", str(file), "--experiment", str(exp_path), "--out", str(tmp_path / name)]) == 0
    return load_file(str(tmp_path / name / "model.safetensors"))


def test_cma_es_evaluates_injected_genomes_first_at_exactly_their_values():
    corner = np.array([0.0, 1.0, 2 / 3, 0.02, 0.5, 1.0])  # on and near the bounds, where pycma's transform bends
    cfg = OptimizerConfig(popsize=6, seed=4)
    first = build_optimizer(cfg, 6, inject=(corner,)).ask()
    np.testing.assert_array_equal(first[0], corner)
    again = build_optimizer(cfg, 6, inject=(corner,)).ask()  # seeded: a resume re-asks the same generation
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    with pytest.raises(ValueError, match="raise the popsize"):
        build_optimizer(cfg, 6, inject=(corner,) * 7)
    with pytest.raises(ValueError, match="need optimizer cma_es"):
        build_optimizer(OptimizerConfig(name="random"), 6, inject=(corner,))


def test_layer_swapping_as_a_ties_search_point_is_the_same_model(tmp_path, session_tiny_zoo):
    """The Layer Swapping preset (a linear recipe) becomes a genome of the per-group TIES space;
    that genome's recipe merges to the very tensors the preset does."""
    path = experiment_file(tmp_path, "s", search_space=PER_LAYER,
                           optimizer={"name": "cma_es", "popsize": 6, "seed": 0, "islands": 1,
                                      "start_from": [{"preset": SWAP}]})
    exp, codec = _codec(path)
    [point] = start_points(exp, codec)
    assert point.label == SWAP and point.recipe.method == "ties"
    decoded = codec.decode(point.genome)
    layers = codec.num_layers
    assert decoded.model_params("expert_b").parameters["weight"] == (1.0,) + (0.0,) * layers + (1.0,)
    assert decoded.model_params("expert_a").parameters["density"] == (1.0,) * (layers + 2)
    preset = _merged(tmp_path, path, layer_swapping(["expert_a", "expert_b"], "base", layers, outer="expert_b",
                                                    inner="expert_a", k=0), "preset")
    searched = _merged(tmp_path, path, decoded, "searched")
    assert preset.keys() == searched.keys()
    for key in preset:
        assert np.allclose(preset[key].numpy(), searched[key].numpy(), atol=1e-6), key


def test_start_recipes_that_are_not_points_of_the_space_are_named(tmp_path, session_tiny_zoo):
    lines_space = tmp_path / "lines.yaml"
    lines_space.write_text((ROOT / "search_spaces" / "ps_ties_lines.yaml").read_text())
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(yaml.safe_dump({"kind": "ps", "method": "ties", "granularity": "per_layer",
                                      "parameters": {"density": {"low": 0.1, "high": 1.0},
                                                     "weight": {"low": 0.0, "high": 0.5}}}))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"method": "ties", "base_model": "base", "models": [
        {"model": "expert_a", "parameters": {"weight": 0.4, "density": 0.5}},
        {"model": "stranger", "parameters": {"weight": 0.4, "density": 0.5}}]}))
    normalized = tmp_path / "normalized.yaml"  # the space fixes normalize: false; decoding would drop this
    normalized.write_text(yaml.safe_dump({"method": "ties", "base_model": "base", "parameters": {"normalize": True},
                                          "models": [{"model": "expert_a", "parameters": {"weight": 0.4,
                                                                                          "density": 0.5}}]}))
    cases = [
        (PER_LAYER, [{"recipe": str(normalized)}],
         "the search space cannot hold it exactly: normalize is True in the recipe, False in the space"),
        (str(lines_space), [{"preset": SWAP}], "optimizer.start_from.0: "),  # a lines space has no one-hot layers
        (PER_LAYER, [{"preset": "lines:alpha=0.2,beta=1"}], "task_arithmetic recipe has no exact equal in a ties"),
        (str(narrow), [{"preset": SWAP}], "outside the search space's bounds: expert_a.weight[block0]"),
        (PER_LAYER, [{"recipe": str(other)}], "not this search's"),
    ]
    for space, start, message in cases:
        path = experiment_file(tmp_path, "bad", search_space=space,
                               optimizer={"name": "cma_es", "popsize": 6, "seed": 0, "islands": 1,
                                          "start_from": start})
        exp, codec = _codec(path)
        with pytest.raises(ConfigError, match=re.escape(message)):
            start_points(exp, codec)
    path = experiment_file(tmp_path, "crowded", search_space=PER_LAYER,
                           optimizer={"name": "cma_es", "popsize": 2, "seed": 0, "islands": 1,
                                      "start_from": [{"preset": f"layer_swapping:k={k}"} for k in (0, 1, 0)]})
    exp, codec = _codec(path)
    with pytest.raises(ConfigError, match=re.escape("3 start recipes for a population of 2; list fewer")):
        start_points(exp, codec)
    half = Recipe(method="linear", base_model="base", parameters={"normalize": False}, models=(
        ModelParams(model="expert_a", parameters={"weight": (1.0, 0.5, 0.0, 0.0)}),
        ModelParams(model="expert_b", parameters={"weight": (0.0, 0.5, 1.0, 1.0)})))
    with pytest.raises(ValueError, match=r"group 1 has weights \[0.5, 0.5\]"):
        in_method(half, "ties", 2)


def test_start_from_is_checked_with_the_experiment(tmp_path, capsys):
    for optimizer, space, message in (
        ({"name": "random", "start_from": [{"preset": SWAP}]}, PER_LAYER, "they need name cma_es, not random"),
        ({"name": "cma_es", "start_from": [{"recipe": "missing.yaml"}]}, PER_LAYER,
         "optimizer.start_from.0.recipe: no recipe at"),
        ({"name": "cma_es", "start_from": [{"preset": "nope"}]}, PER_LAYER,
         "optimizer.start_from.0.preset: unknown preset 'nope'"),
        ({"name": "cma_es", "start_from": [{"preset": SWAP, "recipe": "x.yaml"}]}, PER_LAYER, "give one of"),
        ({"name": "cma_es", "start_from": [{"preset": SWAP}]}, str(ROOT / "search_spaces" / "dfs.yaml"),
         "a data-flow search starts from search_space.start"),
    ):
        path = experiment_file(tmp_path, "v", search_space=space, optimizer=optimizer)
        assert main(["validate", str(path)]) != 0
        assert message in capsys.readouterr().err


def test_a_search_started_from_presets_evaluates_them_first_and_resumes(tmp_path, session_tiny_zoo, capsys):
    starts = [{"preset": f"layer_swapping:outer=expert_b,inner=expert_a,k={k}"} for k in (0, 1)]
    prior = tmp_path / "prior.yaml"  # an earlier run's recipe file, relative to the experiment file
    prior.write_text(yaml.safe_dump({"method": "ties", "base_model": "base", "parameters": {"normalize": False},
                                     "models": [{"model": "expert_a", "parameters": {"weight": 0.9, "density": 0.6}},
                                                {"model": "expert_b", "parameters": {"weight": 0.3, "density": 0.8}}]}))
    path = experiment_file(tmp_path, "warm", search_space=PER_LAYER, budget={"max_trials": 12},
                           optimizer={"name": "cma_es", "popsize": 6, "seed": 2, "islands": 1,
                                      "start_from": starts + [{"recipe": "prior.yaml"}]})
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "the first generation evaluates 3 start recipe(s)" in capsys.readouterr().out
    clean = tmp_path / "clean"
    assert main(["run", str(path), "--run-dir", str(clean), "--quiet"]) == 0
    recs = list(Ledger(clean / "ledger.jsonl"))
    trials = sorted((r for r in recs if r["kind"] == "trial"), key=lambda r: r["trial_id"])
    exp, codec = _codec(path)
    want = [p.genome for p in start_points(exp, codec)]
    for t, genome in zip(trials[:3], want):  # the first generation's first members, exactly
        assert t["generation"] == 0
        np.testing.assert_allclose(t["genome"], genome, atol=1e-12)
    assert trials[2]["recipe"]["models"][0]["parameters"]["weight"] == [0.9] * (codec.num_layers + 2)
    summary = json.loads((clean / "summary.json").read_text())  # the run names its start trials
    assert summary["start_trials"] == {"0": starts[0]["preset"], "1": starts[1]["preset"], "2": str(prior)}
    assert all(t["state"] == "complete" for t in trials) and len(trials) == 12
    # the process dies after the 4th trial: resume re-creates the injected generation and goes on identically
    cut = [i for i, r in enumerate(recs) if r["kind"] == "trial"][3]
    crashed = crashed_copy(clean, tmp_path / "crashed", recs[: cut + 1])
    assert main(["resume", str(crashed), "--quiet"]) == 0
    genomes = lambda rs: {r["trial_id"]: r["genome"] for r in rs if r["kind"] == "trial"}  # noqa: E731
    assert genomes(Ledger(crashed / "ledger.jsonl")) == genomes(recs)


def test_a_submitted_experiment_carries_its_start_recipe_files(tmp_path):
    from evomerge.config import portable_experiment
    from evomerge.dispatch.ray_jobs import STAGED_EXPERIMENT, stage_files

    prior = tmp_path / "runs" / "earlier"
    prior.mkdir(parents=True)
    (prior / "best_recipe.yaml").write_text(yaml.safe_dump({"method": "ties", "base_model": "base", "models": [
        {"model": "expert_a", "parameters": {"weight": 0.9, "density": 0.6}}]}))
    path = experiment_file(tmp_path, "ship", search_space=PER_LAYER,
                           optimizer={"name": "cma_es", "start_from": [{"preset": SWAP}, {"recipe": "runs/earlier"}]})
    exp = load_experiment(path)
    assert exp.optimizer.start_from[1].recipe == str(prior)  # resolved against the experiment file
    data, files = portable_experiment(exp)
    staging = tmp_path / "job"
    staging.mkdir()
    (staging / STAGED_EXPERIMENT).write_text(yaml.safe_dump(data, sort_keys=False))
    stage_files(staging, files)
    staged = load_experiment(staging / STAGED_EXPERIMENT)
    shipped = staged.optimizer.start_from[1].recipe
    assert shipped == str(staging / "files" / "start_1.yaml")
    assert (staging / "files" / "start_1.yaml").read_text() == (prior / "best_recipe.yaml").read_text()
    assert staged.optimizer.start_from[0] == exp.optimizer.start_from[0]
