"""ResidentSources on three tiny random Llama models saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.errors import MergeError
from evomerge.merge.backend import ResidentSources
from evomerge.merge.merge_plan import tensor_seed
from evomerge.merge.methods.dare_ties import dare_ties
from evomerge.merge.methods.linear import linear
from evomerge.merge.methods.ties import ties
from evomerge.architecture import BY_NAME

LLAMA = BY_NAME["llama"]
from evomerge.recipe import ModelParams, Recipe

NAMES = ("base", "a", "b")


def tiny_config(intermediate_size: int = 64) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def save_tiny(path: Path, seed: int, intermediate_size: int = 64) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config(intermediate_size)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny(root / name, seed) for seed, name in enumerate(NAMES)}


@pytest.fixture(scope="module")
def sources(dirs: dict[str, Path]) -> ResidentSources:
    return ResidentSources.from_model_dirs(dirs, base_model="base")


@pytest.fixture(scope="module")
def weights(dirs: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(d / "model.safetensors")) for name, d in dirs.items()}


def recipe(method: str, models: dict[str, dict], seed: int = 0, **parameters) -> Recipe:
    return Recipe(
        method=method,
        base_model="base",
        models=tuple(ModelParams(model=m, parameters=p) for m, p in models.items()),
        parameters=parameters,
        seed=seed,
    )


def test_loads_names_layers_and_tensors(sources: ResidentSources, weights) -> None:
    assert sources.names == NAMES
    assert sources.num_layers == 2
    assert set(sources.tensor_names) == set(weights["base"])
    for name in NAMES:
        got = sources.state_dict(name)
        for key, value in weights[name].items():
            assert torch.allclose(got[key], value, atol=1e-6)


def test_merge_into_matches_merged_state_dict_and_per_tensor_calls(sources, weights) -> None:
    per_layer = (0.2, 0.4, 0.6, 0.8)  # embed, block 0, block 1, head
    r = recipe(
        "ties",
        {"a": {"weight": per_layer, "density": 0.5}, "b": {"weight": 0.3, "density": (0.9, 0.7, 0.5, 0.3)}},
    )
    merged = sources.merged_state_dict(r)
    model = LlamaForCausalLM(tiny_config())
    target = model.state_dict()
    sources.merge_into(r, target)
    for key, value in merged.items():
        assert torch.equal(target[key], value), key
        g = LLAMA.tensor_group(key, 2)
        base = weights["base"][key]
        expected = ties(
            base,
            [weights["a"][key] - base, weights["b"][key] - base],
            [per_layer[g], 0.3],
            [0.5, (0.9, 0.7, 0.5, 0.3)[g]],
        )
        assert torch.equal(value, expected), key
    # the parameters themselves were written (state_dict shares their storage)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, merged["model.layers.1.mlp.up_proj.weight"])
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()


def test_dare_is_seeded_per_tensor(sources, weights) -> None:
    r = recipe("dare_ties", {"a": {"weight": 0.6, "density": 0.4}, "b": {"weight": 0.5, "density": 0.7}}, seed=3)
    first, second = sources.merged_state_dict(r), sources.merged_state_dict(r)
    key = "model.layers.0.self_attn.q_proj.weight"
    base = weights["base"][key]
    expected = dare_ties(
        base,
        [weights["a"][key] - base, weights["b"][key] - base],
        [0.6, 0.5],
        [0.4, 0.7],
        generator=torch.Generator().manual_seed(tensor_seed(3, key)),
    )
    assert torch.equal(first[key], expected)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = sources.merged_state_dict(r.model_copy(update={"seed": 4}))
    assert not torch.equal(first[key], other[key])


def test_dare_does_not_depend_on_tensor_order(weights) -> None:
    reversed_sds = {m: dict(reversed(list(sd.items()))) for m, sd in weights.items()}
    forward = ResidentSources.from_state_dicts(weights, "base")
    backward = ResidentSources.from_state_dicts(reversed_sds, "base")
    r = recipe("dare_linear", {"a": {"weight": 0.6, "density": 0.4}, "b": {"weight": 0.5, "density": 0.7}}, seed=1)
    x, y = forward.merged_state_dict(r), backward.merged_state_dict(r)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_subset_and_order_of_models(sources, weights) -> None:
    r = recipe("ties", {"b": {"weight": 0.3, "density": 0.5}, "base": {"weight": 9.0}})
    merged = sources.merged_state_dict(r)
    key = "model.norm.weight"
    base = weights["base"][key]
    assert torch.equal(merged[key], ties(base, [weights["b"][key] - base], [0.3], [0.5]))


def test_linear_includes_listed_base(sources, weights) -> None:
    r = recipe("linear", {"base": {"weight": 1.0}, "a": {"weight": 3.0}})
    merged = sources.merged_state_dict(r)
    for key in merged:
        expected = linear([weights["base"][key], weights["a"][key]], [1.0, 3.0])
        assert torch.allclose(merged[key], expected, atol=1e-6), key


def test_recipe_problems_are_all_listed(sources) -> None:
    r = Recipe(
        method="ties",
        base_model="base",
        models=(
            ModelParams(model="a", parameters={"weight": (0.1, 0.2, 0.3), "density": 0.5}),
            ModelParams(model="zz", parameters={"weight": 1.0}),
            ModelParams(model="b", parameters={"density": 0.5}),
        ),
        parameters={"normalise": True},
        dtype="bfloat16",
    )
    with pytest.raises(MergeError) as err:
        sources.merged_state_dict(r)
    text = str(err.value)
    for fragment in (
        "3 per-group values, expected 4",
        "unknown model 'zz'",
        "b: missing required parameter 'weight'",
        "normalise",
        "dtype bfloat16",
    ):
        assert fragment in text


def test_unknown_method(sources) -> None:
    with pytest.raises(MergeError, match="known: breadcrumbs, .*dare_linear, .*slerp"):
        sources.merged_state_dict(recipe("slerpy", {"a": {"weight": 1.0}}))


def test_linear_zero_weight_sum_is_refused(sources) -> None:
    with pytest.raises(MergeError, match="sum to 0"):
        sources.merged_state_dict(recipe("linear", {"a": {"weight": 0.0}, "b": {"weight": 0.0}}))


def test_target_must_hold_every_tensor(sources) -> None:
    target = LlamaForCausalLM(tiny_config()).state_dict()
    del target["model.norm.weight"]
    with pytest.raises(MergeError, match="model.norm.weight"):
        sources.merge_into(recipe("task_arithmetic", {"a": {"weight": 1.0}}), target)


def test_mismatched_shapes(tmp_path: Path, dirs) -> None:
    odd = save_tiny(tmp_path / "odd", seed=5, intermediate_size=48)
    with pytest.raises(MergeError, match=r"models: odd has intermediate_size 48 but base has 64"):
        ResidentSources.from_model_dirs({"base": dirs["base"], "odd": odd}, base_model="base")
    (odd / "config.json").unlink()  # without configs, the tensors themselves are compared
    with pytest.raises(MergeError, match=r"mlp\.(down|gate|up)_proj\.weight.*'odd'"):
        ResidentSources.from_model_dirs({"base": dirs["base"], "odd": odd}, base_model="base")


def test_missing_tensor_and_missing_weights(tmp_path: Path, weights) -> None:
    short = dict(weights["a"])
    del short["lm_head.weight"]
    with pytest.raises(MergeError, match="lacks tensor 'lm_head.weight'"):
        ResidentSources.from_state_dicts({"base": weights["base"], "a": short}, "base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="no \\*.safetensors"):
        ResidentSources.from_model_dirs({"base": tmp_path / "empty"}, "base")
    with pytest.raises(MergeError, match="base model 'nope'"):
        ResidentSources.from_state_dicts(weights, "nope")


def test_integer_buffers_pass_through() -> None:
    sds = {
        m: {"model.embed_tokens.weight": torch.randn(4, 2), "position_ids": torch.arange(4)} for m in ("base", "a")
    }
    merged = ResidentSources.from_state_dicts(sds, "base").merged_state_dict(recipe("linear", {"a": {"weight": 1.0}}))
    assert torch.equal(merged["position_ids"], torch.arange(4))
    assert torch.allclose(merged["model.embed_tokens.weight"], sds["a"]["model.embed_tokens.weight"])


@pytest.mark.parametrize("method", ["dare_ties", "della", "breadcrumbs_ties"])
def test_concurrent_cpu_merge_equals_the_sequential_one(sources, dirs, method: str) -> None:
    """With several torch threads, CPU tensors are merged concurrently; the result is the
    one-thread result bit for bit (random methods seed each tensor on its own)."""
    params = {"a": {"weight": 0.7, "density": 0.5}, "b": {"weight": 0.4, "density": 0.6}}
    r = recipe(method, params, seed=3)
    threads = torch.get_num_threads()
    models = []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            model = LlamaForCausalLM.from_pretrained(dirs["base"])
            sources.merge_into(r, model.state_dict())
            models.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    want = sources.merged_state_dict(r)
    for got in models:
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_a_merge_is_the_same_bits_whatever_the_callers_thread_count(tmp_path, method: str) -> None:
    """Rescaling sums over a whole tensor; torch splits a large reduction by its thread count,
    and the rounding follows the split. Resident merges (state dict, in place) and the streaming
    merge give the same tensors under 1 and 4 threads (tensors large enough to be split)."""
    from safetensors.torch import save_file

    from evomerge.merge.streaming import stream_merge

    gen = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(1024, 1024, generator=gen),
            "model.layers.1.mlp.up_proj.weight": torch.randn(512, 1024, generator=gen),
            "model.embed_tokens.weight": torch.randn(64, 1024, generator=gen),
            "model.norm.weight": torch.ones(1024), "lm_head.weight": torch.randn(64, 1024, generator=gen)}
    dirs = {}
    for name in NAMES:
        sd = base if name == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        save_file(sd, str(dirs[name] / "model.safetensors"))
    r = recipe(method, {"a": {"weight": 0.7, "density": 0.5}, "b": {"weight": 0.4, "density": 0.6}}, seed=3)
    sources = ResidentSources.from_model_dirs(dirs, base_model="base")
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            got.append(sources.merged_state_dict(r))
            target = {k: torch.empty_like(v) for k, v in base.items()}
            sources.merge_into(r, target)
            got.append(target)
            stream_merge(r, dirs, tmp_path / f"streamed{n}")
            got.append(load_file(str(tmp_path / f"streamed{n}" / "model.safetensors")))
    finally:
        torch.set_num_threads(threads)
    for i, merged in enumerate(got[1:]):
        assert all(torch.equal(merged[k], got[0][k]) for k in base), (i, [k for k in base if not torch.equal(merged[k], got[0][k])])
