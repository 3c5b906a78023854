"""Recipe hashing / YAML round trip and the genome <-> recipe codec."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from evomerge.recipe import ModelParams, Recipe
from evomerge.space import Bounds, ParameterSpace, PSCodec, group_names


def _space(granularity="global") -> ParameterSpace:
    return ParameterSpace(
        method="dare_ties",
        granularity=granularity,
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
