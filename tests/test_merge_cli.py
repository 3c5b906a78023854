"""`evomerge merge RECIPE.yaml --out DIR`: any recipe, written by hand or from a run, to a model
dir that loads with AutoModelForCausalLM; sources by --model NAME=PATH, --run or --experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.merge.backend import ResidentSources
from evomerge.recipe import load_recipe
from tests.tiny import experiment_file


def _models(zoo) -> list[str]:
    return [arg for name in ("base", "expert_a", "expert_b") for arg in ("--model", f"{name}={zoo.models[name]}")]


def test_hand_written_ps_recipes_merge_exactly(tmp_path, session_tiny_zoo, capsys):
    zoo = session_tiny_zoo
    recipe = tmp_path / "bc.yaml"
    recipe.write_text(yaml.safe_dump({
        "kind": "ps", "method": "breadcrumbs_ties", "base_model": "base", "seed": 3,
        "models": [{"model": "expert_a", "parameters": {"weight": [0.9, 1.0, 0.7, 0.5], "density": 0.8,
                                                        "gamma": 0.02}},
                   {"model": "expert_b", "parameters": {"weight": 0.6, "density": 0.5}}],
        "parameters": {"normalize": False}}))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), "--out", str(out), *_models(zoo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(out)}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    want = ResidentSources.from_model_dirs({k: Path(v) for k, v in zoo.models.items()}, "base") \
        .merged_state_dict(load_recipe(recipe))
    got = load_file(str(out / "model.safetensors"))
    assert set(got) <= set(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert "breadcrumbs_ties" in (out / "README.md").read_text()
    assert load_recipe(out / "evomerge_recipe.yaml").content_hash() == load_recipe(recipe).content_hash()

    slerp = tmp_path / "slerp.yaml"
    slerp.write_text(yaml.safe_dump({"kind": "ps", "method": "slerp", "base_model": "base",
                                     "models": [{"model": "expert_a", "parameters": {}}],
                                     "parameters": {"t": 0.4}}))
    exp = experiment_file(tmp_path, "sources")
    assert main(["merge", str(slerp), "--out", str(tmp_path / "s"), "--experiment", str(exp)]) == 0
    ids = torch.tensor([[1, 4, 7, 9]])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "s")(ids).logits
    assert torch.isfinite(logits).all()


def test_dfs_recipes_and_clear_errors(tmp_path, session_tiny_zoo, capsys):
    zoo = session_tiny_zoo
    recipe = tmp_path / "path.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "dfs", "embed_from": "expert_b", "layers": [
        {"model": "expert_b", "layer": 0}, {"model": "expert_a", "layer": 1, "scale": 1.2},
        {"model": "expert_b", "layer": 1}]}))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "d"), *_models(zoo)]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.num_hidden_layers == 3
    capsys.readouterr()
    assert main(["merge", str(recipe), "--out", str(tmp_path / "x"), "--model", f"expert_a={zoo.models['expert_a']}"]) == 1
    assert "['expert_b'] with no path; pass --model NAME=PATH" in capsys.readouterr().err
    assert main(["merge", str(recipe), "--out", str(tmp_path / "x"), "--model", "expert_b"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "x")]) == 1
    assert "no recipe file" in capsys.readouterr().err


def test_a_slerp_search_searches_its_global_t(tmp_path, session_tiny_zoo, capsys):
    """A searched global parameter (SLERP's t): one genome dimension after the per-model block."""
    from evomerge.ledger import Ledger

    space = tmp_path / "slerp_space.yaml"
    space.write_text(yaml.safe_dump({"kind": "ps", "method": "slerp", "parameters": {"t": {"low": 0.0, "high": 1.0}}}))
    exp = experiment_file(tmp_path, "slerp", search_space=str(space), budget={"max_trials": 4},
                          models=[{"name": n, "path": f"zoo:{n}"} for n in ("base", "expert_a")],
                          optimizer={"name": "random", "seed": 0})
    assert main(["run", str(exp), "--dry-run"]) == 0
    assert "1 dimensions = 1 merged models x 0 parameters () x 1 group + 1 global (t)" in capsys.readouterr().out
    assert main(["run", str(exp), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    trials = Ledger(tmp_path / "run" / "ledger.jsonl").records("trial")
    ts = [t["recipe"]["parameters"]["t"] for t in trials]
    assert all(t["state"] == "complete" for t in trials) and len(set(ts)) == 4 and all(0 <= t <= 1 for t in ts)

    from evomerge.recipe import Recipe
    from evomerge.space.codec import PSCodec
    from evomerge.space.schema import ParameterSpace

    codec = PSCodec(space=ParameterSpace(method="dare_ties", parameters={
        "density": {"low": 0.1, "high": 1.0}, "lambda": {"low": 0.5, "high": 1.5}}),
        base_model="base", models=("expert_a", "expert_b"), num_layers=2)
    assert codec.names == ("expert_a.density", "expert_b.density", "global.lambda")
    recipe = codec.decode([0.5, 1.0, 0.25])
    assert isinstance(recipe, Recipe) and recipe.parameters["lambda"] == 0.75
    assert list(codec.encode(recipe)) == pytest.approx([0.5, 1.0, 0.25])
    bad = tmp_path / "bad_space.yaml"
    bad.write_text(yaml.safe_dump({"kind": "ps", "method": "ties", "parameters": {"normalize": {"low": 0, "high": 1},
                                                                                  "lambda": {"low": 0, "high": 2}},
                                   "fixed": {"lambda": 1.0}}))
    assert main(["validate", str(experiment_file(tmp_path, "bad", search_space=str(bad)))]) == 2
    err = capsys.readouterr().err
    assert "search_space.parameters.normalize: 'normalize' is true/false; set it under fixed" in err
    assert "search_space.parameters.lambda: also under fixed" in err


def test_streaming_merge_equals_the_resident_one_with_bounded_memory(tmp_path, session_tiny_zoo):
    """Tensor by tensor, a few input tensors alive at a time, shards written as they fill;
    the result equals the resident merge exactly (DARE's per-tensor seeds included)."""
    from evomerge.merge.streaming import stream_merge
    from evomerge.recipe import ModelParams, Recipe

    zoo = session_tiny_zoo
    dirs = {k: Path(v) for k, v in zoo.models.items()}
    recipe = Recipe(method="dare_ties", base_model="base", seed=5, models=(
        ModelParams(model="expert_a", parameters={"weight": 0.9, "density": (0.5, 0.6, 0.7, 0.8)}),
        ModelParams(model="expert_b", parameters={"weight": 0.6, "density": 0.4})))
    out = tmp_path / "streamed"
    stats = stream_merge(recipe, dirs, out, shard_bytes=64 * 1024)
    want = ResidentSources.from_model_dirs(dirs, "base").merged_state_dict(recipe)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert stats.shards > 2 and len(set(index["weight_map"].values())) == stats.shards
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(out / shard)))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # at most: the base tensor (as read and in the merge dtype) and one delta per source
    assert stats.max_resident_inputs <= 2 + 2 * 2
    largest = max(t.numel() * t.element_size() for t in want.values())
    assert stats.max_shard_bytes <= 64 * 1024 + largest
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # the CLI: `evomerge merge --stream`
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert main(["merge", str(path), "--out", str(tmp_path / "cli"), "--stream", "--shard-size", "1",
                 *_models(zoo)]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "cli").config.num_hidden_layers == 2


def test_mergekit_configs_are_read_with_every_problem_listed(tmp_path, capsys):
    """`evomerge merge` on a mergekit config: names from the paths, hub ids as hf: sources,
    plain lists as gradients; and what evomerge cannot do is said, all at once."""
    from evomerge.cli import main
    from evomerge.errors import ConfigError
    from evomerge.mergekit_config import from_mergekit
    from evomerge.recipe import Conditional, Gradient

    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    recipe, dirs = from_mergekit({
        "merge_method": "dare_ties", "base_model": "models/base",
        "parameters": {"int8_mask": True, "density": [0.2, 0.8]},
        "models": [{"model": "org/expert@v1", "parameters": {"weight": [{"filter": "mlp", "value": [0, 1]},
                                                                         {"value": 0.5}]}},
                   {"model": "other/expert", "parameters": {"weight": 0.3}}],
    }, base_dir=tmp_path)
    assert dirs == {"base": str((tmp_path / "models" / "base").resolve()), "expert": "hf:org/expert@v1",
                    "expert_2": "hf:other/expert"}
    assert recipe.base_model == "base" and recipe.dtype == "bfloat16"  # mergekit: the stored dtype
    assert recipe.parameters["density"] == Gradient(gradient=(0.2, 0.8))
    assert recipe.model_params("expert").parameters["weight"] == (
        Conditional(filter="mlp", value=Gradient(gradient=(0.0, 1.0))), Conditional(value=0.5))

    with pytest.raises(ConfigError) as err:
        from_mergekit({"merge_method": "nuslerp", "slices": [], "tokenizer_source": "union", "dtype": "int4",
                       "models": [{"model": "a/b+lora/x", "parameters": {"weight": ["x"]}}, {"mdl": "c"}]},
                      base_dir=tmp_path)
    problems = "\n".join(err.value.problems)
    for fragment in ("slices: layer slices/modules", "merge_method: 'nuslerp' is not one evomerge merges",
                     "tokenizer_source/tokenizer", "applies a LoRA", "models[0].parameters.weight: a list is per-group numbers",
                     "models[1]: expected a mapping with `model`", "dtype: 'int4'"):
        assert fragment in problems, fragment
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: ties\nmodels: [{model: nowhere}]\n")
    assert main(["merge", str(bad), "--out", str(tmp_path / "o")]) != 0
    err_text = capsys.readouterr().err
    assert "no model directory 'nowhere'" in err_text and "base_model: method 'ties' needs a base model" in err_text
