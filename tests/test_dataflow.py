"""Data-flow (DFS) models on the tiny zoo: assembly by reference, scaling, folding, export, searches."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.architecture import BY_NAME
from evomerge.cli import main
from evomerge.errors import MergeError
from evomerge.ledger import Ledger
from evomerge.merge.dataflow import DataFlowModel, identity_recipe, load_donors
from evomerge.recipe import DFSRecipe, PathStep, recipe_from_dict
from evomerge.space import DataFlowSpace, DFSCodec
from tiny import experiment_file

LLAMA = BY_NAME["llama"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flow(session_tiny_zoo):
    from transformers import AutoModelForCausalLM

    dirs = {k: str(v) for k, v in session_tiny_zoo.models.items()}
    donors = load_donors(dirs)
    shell = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)
    return DataFlowModel(donors, shell), dirs


def _ids():
    return torch.randint(2, 60, (3, 14), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_identity_path_reproduces_each_source_exactly(flow):
    dfm, _ = flow
    ids = _ids()
    for name in ("base", "expert_a", "expert_b"):
        got = dfm.assemble(identity_recipe(name, dfm.num_layers(name)))(ids).logits
        assert torch.equal(got, dfm.donors[name](ids).logits)


@torch.no_grad()
def test_layers_are_shared_by_reference_not_copied(flow):
    dfm, _ = flow
    recipe = DFSRecipe(embed_from="base", layers=(PathStep(model="expert_a", layer=0),
                                                  PathStep(model="expert_a", layer=0)))
    shell = dfm.assemble(recipe)
    a0 = dfm.donors["expert_a"].model.layers[0]
    assert shell.model.layers[0].layer is a0 and shell.model.layers[1].layer is a0
    assert shell.model.embed_tokens is dfm.donors["base"].model.embed_tokens
    assert shell.lm_head is dfm.donors["base"].lm_head


@torch.no_grad()
def test_a_two_model_path_equals_a_hand_built_frankenmerge(flow):
    from transformers import AutoModelForCausalLM

    dfm, dirs = flow
    n = dfm.num_layers("expert_a")
    recipe = DFSRecipe(embed_from="expert_b", layers=(PathStep(model="expert_a", layer=0),
                                                      PathStep(model="expert_b", layer=n - 1)))
    got = dfm.assemble(recipe)(_ids()).logits
    # by hand: expert_b's model with its first layer replaced by expert_a's and only 2 layers
    state = {k: v.clone() for k, v in dfm.donors["expert_b"].state_dict().items()}
    hand = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for k, v in dfm.donors["expert_a"].state_dict().items():
        if k.startswith("model.layers.0."):
            hand[k] = v.clone()
    for k, v in state.items():
        if k.startswith(f"model.layers.{n - 1}."):
            hand[k.replace(f"model.layers.{n - 1}.", "model.layers.1.")] = v
    cfg = dfm.donors["expert_b"].config.__class__.from_pretrained(dirs["expert_b"])
    cfg.num_hidden_layers = 2
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(hand, strict=False)
    model.eval()
    assert torch.allclose(got, model(_ids()).logits, atol=1e-6)


@torch.no_grad()
def test_scales_fold_into_an_exported_plain_model(flow, tmp_path):
    from transformers import AutoModelForCausalLM

    dfm, dirs = flow
    recipe = DFSRecipe(embed_from="base", layers=(
        PathStep(model="expert_a", layer=0), PathStep(model="expert_b", layer=1, scale=1.3),
        PathStep(model="expert_a", layer=0, scale=0.7), PathStep(model="base", layer=1, scale=1.1)))
    search_time = dfm.assemble(recipe)
    ids = _ids()
    logits = search_time(ids).logits
    unscaled = dfm.assemble(recipe.model_copy(update={"layers": tuple(
        s.model_copy(update={"scale": 1.0}) for s in recipe.layers)}))(ids).logits
    assert not torch.allclose(logits, unscaled, atol=1e-3)  # the scales matter

    out = dfm.export(recipe, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # no trust_remote_code
    assert exported.config.num_hidden_layers == 4
    assert torch.allclose(exported(ids).logits, logits, atol=1e-5)  # the scored model, up to float rounding
    # a repeated layer keeps its own KV-cache slot: cached generation equals the plain model's
    prompt = ids[:1, :5]
    a = dfm.assemble(recipe).generate(prompt, max_new_tokens=8, do_sample=False)
    b = exported.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


@torch.no_grad()
def test_the_export_is_the_scored_model_where_the_norms_epsilon_matters(tmp_path):
    """Scaling the stream is dividing the residual writers only up to the norms' epsilon (a
    stream scaled by P meets it as eps / P**2): the search scores the divided form, so the
    export is the scored model. Donors whose epsilon dwarfs their hidden states' mean square
    (random init, eps 0.5) make any difference between the two forms plain."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dirs = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64, rms_norm_eps=0.5)).save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    dfm = DataFlowModel(load_donors(dirs), AutoModelForCausalLM.from_pretrained(dirs["a"], dtype=torch.float32))
    recipe = DFSRecipe(embed_from="a", layers=(
        PathStep(model="a", layer=0, scale=0.6), PathStep(model="b", layer=1, scale=1.5),
        PathStep(model="a", layer=1, scale=0.5), PathStep(model="b", layer=2, scale=1.4)))
    ids = _ids()
    logits = dfm.assemble(recipe)(ids).logits.clone()
    exported = AutoModelForCausalLM.from_pretrained(dfm.export(recipe, tmp_path / "hf"), dtype=torch.float32)
    assert (exported(ids).logits - logits).abs().max().item() <= 1e-5
    for name in dirs:  # outside a path the donors are themselves
        plain = AutoModelForCausalLM.from_pretrained(dirs[name], dtype=torch.float32).eval()
        assert torch.equal(dfm.donors[name](ids).logits, plain(ids).logits)


def test_bad_recipes_are_refused(flow):
    dfm, _ = flow
    with pytest.raises(MergeError, match="has no layer 99"):
        dfm.assemble(DFSRecipe(embed_from="base", layers=(PathStep(model="base", layer=99),)))
    with pytest.raises(MergeError, match="not a donor"):
        dfm.assemble(DFSRecipe(embed_from="nobody", layers=()))


def test_codec_indicators_scales_and_truncation():
    space = DataFlowSpace(repetitions=2, max_path_length=3, scale={"low": 0.5, "high": 1.5})
    codec = DFSCodec(space=space, donors=("a", "b"), layers_per_donor=(2, 2), embed_from="a")
    assert codec.total_layers == 4 and codec.path_genes == 8 and codec.dim == 8 + 16
    g = np.full(codec.dim, 0.5)  # centre: no layer on the path (indicator 0 is off), W = 1
    assert codec.decode(g).layers == ()
    g[[1, 2, 5, 6]] = 0.9  # positions 1, 2, 5, 6 -> layers a.1, b.0, a.1, b.0; truncated to 3
    w = g[8:].reshape(4, 4)
    w[1, 2] = 1.0  # a.1 -> b.0 scaled by 1.5
    recipe = codec.decode(g)
    assert [(s.model, s.layer) for s in recipe.layers] == [("a", 1), ("b", 0), ("a", 1)]
    assert [s.scale for s in recipe.layers] == [1.0, 1.5, 1.0]
    assert len(codec.names) == codec.dim and codec.names[9] == "W[a.0->a.1]"
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert DFSRecipe.from_yaml(recipe.to_yaml()).content_hash() == recipe.content_hash()


def test_codec_start_is_the_embed_from_path():
    space = DataFlowSpace(repetitions=2, max_path_length=8, scale={"low": 0.5, "high": 2.0}, start="embed_from")
    codec = DFSCodec(space=space, donors=("a", "b", "ps"), layers_per_donor=(2, 3, 3), embed_from="ps")
    start = codec.start_genome()
    assert start.shape == (codec.dim,) and start.min() >= 0 and start.max() <= 1
    recipe = codec.decode(start)
    assert recipe.layers == tuple(PathStep(model="ps", layer=i, scale=1.0) for i in range(3))
    assert codec.decode(start).embed_from == "ps"
    centre = DFSCodec(space=space.model_copy(update={"start": "centre"}), donors=("a",), layers_per_donor=(2,),
                      embed_from="a")
    assert centre.start_genome() is None
    with pytest.raises(ValueError, match="among the layer donors"):
        DFSCodec(space=space, donors=("a",), layers_per_donor=(2,), embed_from="b").start_genome()


def test_cma_es_evaluates_a_given_start_point_first():
    from evomerge.optimize.cma_es import CMAESOptimizer

    start = np.linspace(0.1, 0.9, 7)
    opt = CMAESOptimizer(7, x0=start, popsize=5, seed=3)
    first = opt.ask()
    assert len(first) == 5 and np.allclose(first[0], start)
    assert np.allclose(opt.state()["mean"], start)
    opt.tell(first, [float(-np.sum((g - 0.5) ** 2)) for g in first])  # tells the injected point like any other
    assert not any(np.allclose(g, start) for g in opt.ask())


def _experiment(tmp_path: Path, space: str, max_trials: int = 6) -> Path:
    return experiment_file(
        tmp_path, f"tiny_{space}", search_space=str(ROOT / "search_spaces" / f"{space}.yaml"),
        suite={"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}],
               "test_tasks": [{"name": "zoo_arith_l2_test"}], "batch_size": 64},
        optimizer={"popsize": 3, "seed": 0, "islands": 1}, budget={"max_trials": max_trials})


@pytest.mark.parametrize("space", ["dfs", "ps_dfs"])
def test_dfs_and_ps_dfs_searches_run_from_the_cli(tmp_path, session_tiny_zoo, space):
    run_dir = tmp_path / "run"
    assert main(["run", str(_experiment(tmp_path, space)), "--run-dir", str(run_dir), "--quiet"]) == 0
    led = Ledger(run_dir / "ledger.jsonl")
    trials = led.records("trial")
    assert len(trials) == 6 and all(t["state"] == "complete" for t in trials), [t["error"] for t in trials]
    recipes = [recipe_from_dict(t["recipe"]) for t in trials]
    assert all(isinstance(r, DFSRecipe) for r in recipes)
    assert len({r.content_hash() for r in recipes}) == 6
    # source baselines run as identity paths (exactly the sources, see the identity test)
    assert {b["model"] for b in led.records("baseline")} == {"base", "expert_a", "expert_b"}
    assert all(b["state"] == "complete" for b in led.records("baseline"))
    assert {r["model"] for r in led.records("test")} == {"best", "base", "expert_a", "expert_b"}
    if space == "ps_dfs":
        assert all("ps_merged" in r.donors and r.embed_from == "ps_merged" for r in recipes)
        assert any(s.model == "ps_merged" for r in recipes for s in r.layers)
        # `start: embed_from`: the first candidate is the PS donor's own path, i.e. the PS model
        n = json.loads((Path(session_tiny_zoo.models["base"]) / "config.json").read_text())["num_hidden_layers"]
        assert recipes[0].layers == tuple(PathStep(model="ps_merged", layer=i) for i in range(n))


def test_export_hf_and_mergekit_from_a_dfs_run(tmp_path, session_tiny_zoo, flow):
    """`evomerge export --format hf` loads as a plain model with the search-time logits;
    `--format mergekit` gives a passthrough YAML that mergekit-yaml turns into the same tensors."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from evomerge.mergekit_config import mergekit_yaml

    run_dir = tmp_path / "run"
    assert main(["run", str(_experiment(tmp_path, "dfs", max_trials=3)), "--run-dir", str(run_dir), "--quiet"]) == 0
    trial = Ledger(run_dir / "ledger.jsonl").records("trial")[0]
    recipe = recipe_from_dict(trial["recipe"])
    dfm, dirs = flow
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--format", "hf", "--trial", str(trial["trial_id"]), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dfm.assemble(recipe)(ids).logits, atol=1e-3)

    # mergekit: a path that starts and ends in embed_from, with scales
    path = DFSRecipe(embed_from="expert_b", layers=(
        PathStep(model="expert_b", layer=0), PathStep(model="expert_a", layer=1, scale=1.25),
        PathStep(model="expert_a", layer=1, scale=0.8), PathStep(model="expert_b", layer=1, scale=1.1)))
    (tmp_path / "mk.yaml").write_text(mergekit_yaml(path, dirs, LLAMA))
    cli = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(cli), str(tmp_path / "mk.yaml"), str(tmp_path / "mk"), "--no-lazy-unpickle"],
                   check=True, capture_output=True)
    theirs = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(f))
    _, ours = dfm.folded_state_dict(path)
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert torch.allclose(theirs[name].float(), tensor, atol=1e-6), name
    # not expressible: a path that does not start in embed_from
    with pytest.raises(Exception, match="first layer's model"):
        mergekit_yaml(DFSRecipe(embed_from="expert_b", layers=(PathStep(model="expert_a", layer=0),)), dirs, LLAMA)


def test_the_ps_donor_may_be_a_run_directory(tmp_path):
    import shutil

    from evomerge.config import parse_experiment
    from evomerge.errors import ConfigError

    run = tmp_path / "some-run"
    run.mkdir()
    space = yaml.safe_load((ROOT / "search_spaces" / "ps_dfs.yaml").read_text())
    data = yaml.safe_load(_experiment(tmp_path, "ps_dfs").read_text())
    data["search_space"] = {**space, "ps_donor": {"name": "ps_merged", "recipe": str(run)}}
    with pytest.raises(ConfigError, match="no recipe at .*best_recipe.yaml"):
        parse_experiment(data, ROOT)
    shutil.copy(ROOT / "experiments" / "recipes" / "zoo_ties_tuned.yaml", run / "best_recipe.yaml")
    exp = parse_experiment(data, ROOT)
    assert exp.search_space.ps_donor.recipe == str(run)


def test_bad_dfs_spaces_are_reported_by_field(tmp_path):
    from evomerge.config import parse_experiment
    from evomerge.errors import ConfigError

    data = yaml.safe_load(_experiment(tmp_path, "dfs").read_text())
    data["search_space"] = {"kind": "dfs", "models": ["expert_a", "nobody"], "scale": {"low": 0.0, "high": 1.0},
                            "repetitions": 0}
    with pytest.raises(ConfigError) as err:
        parse_experiment(data, ROOT)
    text = "\n".join(err.value.problems)
    assert "search_space.repetitions" in text and "search_space.scale" in text
    data["search_space"] = {"kind": "dfs", "models": ["expert_a", "nobody"], "embed_from": "ghost"}
    with pytest.raises(ConfigError) as err:
        parse_experiment(data, ROOT)
    text = "\n".join(err.value.problems)
    assert "search_space.models.1: 'nobody' is not one of models" in text
    assert "search_space.embed_from: 'ghost'" in text
    data["search_space"] = {"kind": "dfs", "models": ["expert_a"], "embed_from": "expert_b", "start": "embed_from"}
    data["optimizer"] = {"name": "random"}
    with pytest.raises(ConfigError) as err:
        parse_experiment(data, ROOT)
    text = "\n".join(err.value.problems)
    assert "search_space.start: embed_from starts at 'expert_b'" in text and "add it to search_space.models" in text
    assert "search_space.start: embed_from needs optimizer.name cma_es (not random)" in text
