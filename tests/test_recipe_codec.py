"""Recipe hashing / YAML round trip and the genome <-> recipe codec."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from evomerge.recipe import ModelParams, Recipe
from evomerge.space import Bounds, ParameterSpace, PSCodec, group_names


def _space(granularity="global", knots=None) -> ParameterSpace:
    return ParameterSpace(
        method="dare_ties",
        granularity=granularity,
        knots=knots,
        parameters={"density": Bounds(low=0.1, high=1.0), "weight": Bounds(low=0.0, high=1.5)},
        fixed={"normalize": False},
    )


def test_codec_global_decode_values_and_names():
    codec = PSCodec(_space(), "base", ("a", "b"), num_layers=4, seed=3)
    assert codec.dim == 4
    assert codec.names == ("a.density", "a.weight", "b.density", "b.weight")
    r = codec.decode([0.0, 1.0, 0.5, 0.2])
    assert r.method == "dare_ties" and r.base_model == "base" and r.seed == 3
    assert r.model_params("a").parameters == {"density": pytest.approx(0.1), "weight": pytest.approx(1.5)}
    assert r.model_params("b").parameters["density"] == pytest.approx(0.55)
    assert r.model_params("b").parameters["weight"] == pytest.approx(0.3)
    assert r.parameters == {"normalize": False}


def test_codec_per_layer_round_trip():
    codec = PSCodec(_space("per_layer"), "base", ("a", "b"), num_layers=3)
    assert codec.groups == 5 and codec.dim == 2 * 2 * 5
    assert codec.names[:5] == tuple(f"a.density[{g}]" for g in group_names(3))
    rng = np.random.default_rng(0)
    g = rng.random(codec.dim)
    recipe = codec.decode(g)
    assert len(recipe.model_params("a").parameters["density"]) == 5
    np.testing.assert_allclose(codec.encode(recipe), g, atol=1e-9)


def test_codec_vocab_body_sets_embed_and_head_apart_from_the_blocks():
    codec = PSCodec(_space("vocab_body"), "base", ("a", "b"), num_layers=3)
    assert codec.groups == 2 and codec.dim == 2 * 2 * 2
    assert codec.names[:4] == ("a.density[vocab]", "a.density[body]", "a.weight[vocab]", "a.weight[body]")
    recipe = codec.decode([0.0, 1.0, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5])
    # per-group values (embed, block0..2, head): vocab on embed and head, body on every block
    assert recipe.model_params("a").parameters["density"] == pytest.approx((0.1, 1.0, 1.0, 1.0, 0.1))
    assert recipe.model_params("a").parameters["weight"] == pytest.approx((0.3, 0.6, 0.6, 0.6, 0.3))
    g = np.random.default_rng(1).random(codec.dim)
    np.testing.assert_allclose(codec.encode(codec.decode(g)), g, atol=1e-9)
    # a start recipe: a scalar fills both; per-group values must have the vocab/body shape
    start = Recipe(method="dare_ties", base_model="base", models=(
        ModelParams(model="a", parameters={"density": 0.55, "weight": (0.3, 0.6, 0.6, 0.6, 0.3)}),
        ModelParams(model="b", parameters={"density": 0.55, "weight": 0.75})))
    np.testing.assert_allclose(codec.encode(start), [0.5, 0.5, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5], atol=1e-9)
    uneven = start.model_copy(update={"models": (
        ModelParams(model="a", parameters={"density": 0.5, "weight": (0.3, 0.6, 0.9, 0.6, 0.3)}), start.models[1])})
    with pytest.raises(ValueError, match="one value for embed and head and one for every block"):
        codec.encode(uneven)


def test_codec_knots_are_mergekit_gradients_with_as_many_genes_whatever_the_depth():
    from evomerge.recipe import Gradient

    for layers in (4, 32):
        codec = PSCodec(_space("knots", knots=3), "base", ("a", "b"), num_layers=layers)
        assert codec.groups == 3 and codec.dim == 2 * 2 * 3
        assert codec.names[:3] == ("a.density[knot0]", "a.density[knot1]", "a.density[knot2]")
        assert codec.gene_groups == (0, 1, 2) * 4
    recipe = codec.decode([0.0, 0.5, 1.0] + [0.2] * 9)
    density = recipe.model_params("a").parameters["density"]
    assert density == Gradient(gradient=(0.1, 0.55, 1.0))
    # mergekit's gradient: the blocks spread over the knots, embeddings and head at the first
    values = [recipe.model_params("a").value("density", g, 32) for g in range(34)]
    assert values[0] == values[-1] == pytest.approx(0.1) and values[32] == pytest.approx(1.0)
    assert values[16] == pytest.approx(0.1 + 0.9 * 15 / 31)
    g = np.random.default_rng(2).random(codec.dim)
    np.testing.assert_allclose(codec.encode(codec.decode(g)), g, atol=1e-9)
    with pytest.raises(ValueError, match="gradient of 3 values"):
        codec.encode(PSCodec(_space("per_layer"), "base", ("a", "b"), num_layers=32).decode(np.full(136, 0.3)))


def test_codec_lines_run_from_a_bottom_to_a_top_value():
    codec = PSCodec(_space("lines"), "base", ("a", "b"), num_layers=3)
    assert codec.groups == 2 and codec.dim == 8 and codec.names[:2] == ("a.density[bottom]", "a.density[top]")
    recipe = codec.decode([0.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    # embed, block0..2, head: linear from the bottom value to the top value
    assert recipe.model_params("a").parameters["density"] == pytest.approx((0.1, 0.325, 0.55, 0.775, 1.0))
    assert recipe.model_params("a").parameters["weight"] == pytest.approx((1.5, 1.125, 0.75, 0.375, 0.0))
    g = np.random.default_rng(3).random(codec.dim)
    np.testing.assert_allclose(codec.encode(codec.decode(g)), g, atol=1e-9)
    start = Recipe(method="dare_ties", base_model="base", models=(
        ModelParams(model="a", parameters={"density": 0.55, "weight": 0.75}),
        ModelParams(model="b", parameters={"density": 0.55, "weight": (0.3, 0.6, 0.9, 0.6, 0.3)})))
    with pytest.raises(ValueError, match="values on a line"):
        codec.encode(start)


def test_knots_are_given_with_granularity_knots_only():
    with pytest.raises(ValueError, match="granularity knots needs the number of knots"):
        _space("knots")
    with pytest.raises(ValueError, match="only for granularity knots"):
        _space("per_layer", knots=3)


def test_codec_clips_and_rejects_bad_genomes():
    codec = PSCodec(_space(), "base", ("a",), num_layers=2)
    r = codec.decode([-0.5, 2.0])
    assert r.model_params("a").parameters == {"density": pytest.approx(0.1), "weight": pytest.approx(1.5)}
    with pytest.raises(ValueError):
        codec.decode([0.5])
    with pytest.raises(ValueError):
        codec.decode([0.5, float("nan")])


def _recipe(**kw) -> Recipe:
    base = dict(
        method="dare_ties",
        base_model="base",
        models=(
            ModelParams(model="a", parameters={"density": 0.5, "weight": (0.1, 0.2, 0.3)}),
            ModelParams(model="b", parameters={"density": 0.9, "weight": 1.0}),
        ),
        parameters={"normalize": True},
        seed=7,
    )
    base.update(kw)
    return Recipe(**base)


def test_recipe_yaml_round_trip_and_hash_stable():
    r = _recipe()
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r
    assert again.content_hash() == r.content_hash()
    assert Recipe.from_dict(r.to_dict()) == r
    # hash depends on content
    assert _recipe(seed=8).content_hash() != r.content_hash()
    assert _recipe(parameters={"normalize": False}).content_hash() != r.content_hash()


def test_recipe_hash_same_in_another_process():
    r = _recipe()
    code = ("from evomerge.recipe import Recipe; import sys; "
            "print(Recipe.from_yaml(sys.stdin.read()).content_hash())")
    out = subprocess.run([sys.executable, "-c", code], input=r.to_yaml(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == r.content_hash()


def test_recipe_value_lookup_and_validation():
    r = _recipe()
    assert r.model_params("a").value("weight", 2) == pytest.approx(0.3)
    assert r.model_params("b").value("weight", 2) == pytest.approx(1.0)
    with pytest.raises(KeyError):
        r.model_params("zzz")
    with pytest.raises(Exception):
        ModelParams(model="a", parameters={"weight": float("nan")})
    with pytest.raises(Exception):
        Recipe.from_dict({**r.to_dict(), "colour": "blue"})


def test_gradient_and_filter_settings_follow_mergekit():
    """Gradients are read at t = i / (L - 1) for block i and t = 0 for embed/head; filters are
    substrings, first match wins, no match falls through (None)."""
    from evomerge.recipe import Conditional, Gradient, layer_t, resolve_setting

    g = Gradient(gradient=(0.0, 1.0, 0.5))
    L = 5
    assert [layer_t(grp, L) for grp in range(L + 2)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 0.0]
    assert [resolve_setting(g, "x", grp, L) for grp in range(L + 2)] == pytest.approx(
        [0.0, 0.0, 0.5, 1.0, 0.75, 0.5, 0.0])
    assert layer_t(1, 1) == 1.0  # mergekit: a one-layer slice sits at t = 1
    filt = (Conditional(filter="self_attn", value=0.3), Conditional(filter="mlp", value=g))
    assert resolve_setting(filt, "model.layers.2.self_attn.q_proj.weight", 3, L) == 0.3
    assert resolve_setting(filt, "model.layers.2.mlp.up_proj.weight", 3, L) == 1.0
    assert resolve_setting(filt, "model.norm.weight", L + 1, L) is None
    catch_all = filt + (Conditional(value=0.9),)
    assert resolve_setting(catch_all, "model.norm.weight", L + 1, L) == 0.9
    assert resolve_setting((Conditional(filter="*", value=0.1),), "lm_head.weight", L + 1, L) == 0.1


def test_gradient_and_filter_recipes_round_trip_and_hash():
    text = """
method: ties
base_model: base
models:
- model: a
  parameters: {weight: {gradient: [1, 0.2]}, density: [{filter: mlp, value: {gradient: [0.3, 0.9]}}, {value: 0.5}]}
- model: b
  parameters: {weight: {filter: self_attn, value: 0.4}}
parameters: {weight: 0.7, lambda: {gradient: [0.8, 1.2]}, normalize: false}
"""
    from evomerge.recipe import Conditional, Gradient

    r = Recipe.from_yaml(text)
    assert r.model_params("a").parameters["weight"] == Gradient(gradient=(1.0, 0.2))
    assert r.model_params("b").parameters["weight"] == (Conditional(filter="self_attn", value=0.4),)
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r and again.content_hash() == r.content_hash()
    with pytest.raises(Exception, match="not finite"):
        Recipe.from_yaml(text.replace("[1, 0.2]", "[1, .nan]"))
    with pytest.raises(Exception, match="at least one value"):
        Recipe.from_yaml(text.replace("[1, 0.2]", "[]"))
    # hashes of scalar / per-group recipes are what they were before these forms existed
    assert _recipe().content_hash() == Recipe.from_yaml(_recipe().to_yaml()).content_hash()


def test_settings_problems_are_listed_per_parameter_not_per_tensor():
    import torch

    from evomerge.errors import MergeError
    from evomerge.merge.backend import ResidentSources
    from evomerge.recipe import Conditional, Gradient

    sd = {"model.embed_tokens.weight": torch.zeros(4, 2), "model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2),
          "model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2), "model.layers.1.mlp.up_proj.weight": torch.zeros(2, 2),
          "lm_head.weight": torch.zeros(4, 2)}
    src = ResidentSources.from_state_dicts({"base": sd, "a": sd, "b": sd}, "base")
    bad = Recipe(method="ties", base_model="base", models=(
        ModelParams(model="a", parameters={"weight": (Conditional(filter="mlp", value=0.5),),  # no weight elsewhere
                                           "density": Gradient(gradient=(0.5, 1.5))}),  # > 1 from t = .5 on
        ModelParams(model="b", parameters={"weight": 1.0, "density": (0.5, 0.5)}),  # 2 per-group values, 4 groups
    ), parameters={"colour": 1.0})
    with pytest.raises(MergeError) as err:
        src.merged_state_dict(bad)
    text = str(err.value)
    assert "(4 problems)" in text, text
    assert "parameters.colour: method 'ties' has no parameter 'colour'" in text
    assert "b.density: 2 per-group values, expected 4" in text and "{gradient: [...]}" in text
    assert "a: missing required parameter 'weight' (first for tensor model.embed_tokens.weight)" in text
    assert "a.density: value 1.5 (first for tensor model.layers.1.mlp.up_proj.weight) is outside [0.0, 1.0]" in text
    # a recipe-wide weight fills in where a's filters do not match
    ok = bad.model_copy(update={"parameters": {"weight": 0.25}, "models": (
        bad.models[0].model_copy(update={"parameters": {"weight": bad.models[0].parameters["weight"]}}),
        ModelParams(model="b", parameters={"weight": 1.0}))})
    src.merged_state_dict(ok)


def test_codec_starts_from_a_gradient_but_not_from_filters():
    from evomerge.recipe import Conditional, Gradient
    from evomerge.space.codec import PSCodec
    from evomerge.space.schema import ParameterSpace

    space = ParameterSpace.model_validate({"kind": "ps", "method": "ties", "granularity": "per_layer",
                                           "parameters": {"weight": {"low": 0, "high": 1}}})
    codec = PSCodec(space=space, models=("a",), base_model="base", num_layers=3)
    r = Recipe(method="ties", base_model="base", models=(
        ModelParams(model="a", parameters={"weight": Gradient(gradient=(0.0, 1.0))}),))
    assert list(codec.encode(r)) == pytest.approx([0.0, 0.0, 0.5, 1.0, 0.0])
    filtered = r.model_copy(update={"models": (ModelParams(model="a", parameters={
        "weight": (Conditional(filter="mlp", value=0.2),)}),)})
    with pytest.raises(ValueError, match="filtered setting has no single value per tensor group"):
        codec.encode(filtered)
