"""Published fixed layer-wise merges (Layer Swapping, LiNeS, Model Stock) as recipes, and
`evomerge merge --preset` on the tiny zoo (real models, tensors checked against the sources)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.presets import layer_swapping, lines, model_stock, parse_preset, preset_recipe
from tiny import experiment_file

EXPERTS = ["expert_a", "expert_b"]


def test_layer_swapping_takes_the_outer_blocks_embeddings_and_head_from_one_expert():
    r = layer_swapping(EXPERTS, "base", 4, outer="expert_b", inner="expert_a", k=1)
    weights = {m.model: m.parameters["weight"] for m in r.models}
    # groups: embed, block 0..3, head
    assert weights["expert_b"] == (1, 1, 0, 0, 1, 1) and weights["expert_a"] == (0, 0, 1, 1, 0, 0)
    assert r.method == "linear" and r.parameters == {"normalize": False}
    assert layer_swapping(EXPERTS, "base", 4, k=0).models[0].parameters["weight"] == (1, 0, 0, 0, 0, 1)
    assert layer_swapping(EXPERTS, "base", 4, k=2).models[0].parameters["weight"] == (1,) * 6
    for bad in ({"k": 3}, {"outer": "expert_a", "inner": "expert_a"}, {"outer": "nope"}):
        with pytest.raises(ConfigError, match="layer_swapping"):
            layer_swapping(EXPERTS, "base", 4, **bad)


def test_lines_scales_every_task_vector_linearly_from_bottom_to_top():
    r = lines(EXPERTS, "base", 4, alpha=0.2, beta=1.0)
    assert r.method == "task_arithmetic"
    for m in r.models:
        assert m.parameters["weight"] == pytest.approx((0.2, 0.36, 0.52, 0.68, 0.84, 1.0))


def test_model_stock_needs_two_experts_and_specs_are_checked():
    assert model_stock(EXPERTS, "base", 2, filter_wise="true").parameters == {"filter_wise": True}
    with pytest.raises(ConfigError, match="at least two experts"):
        model_stock(["expert_a"], "base", 2)
    assert parse_preset("lines:alpha=0.1, beta=0.9") == ("lines", {"alpha": 0.1, "beta": 0.9})
    for bad, message in (("nope", "unknown preset"), ("lines:alpha", "key=value"), ("lines:alpha=x", "a number"),
                         ("lines:gamma=1", "unknown setting")):
        with pytest.raises(ConfigError, match=message):
            preset_recipe(bad, EXPERTS, "base", 2)
    assert preset_recipe("model_stock", EXPERTS, "base", 2).content_hash() == \
        model_stock(EXPERTS, "base", 2).content_hash()  # a preset is a recipe like any other


def test_merge_writes_a_preset_as_a_model(tmp_path, session_tiny_zoo, capsys):
    exp = experiment_file(tmp_path, "p")
    src = {name: load_file(str(session_tiny_zoo.models[name] / "model.safetensors"))
           for name in ("base", "expert_a", "expert_b")}
    out = tmp_path / "swap"
    assert main(["merge", "--preset", "layer_swapping:outer=expert_b,inner=expert_a,k=0", "--experiment", str(exp),
                 "--out", str(out)]) == 0
    merged = load_file(str(out / "model.safetensors"))
    for key, value in merged.items():  # embeddings and head from expert_b, every block from expert_a
        owner = "expert_a" if key.startswith("model.layers.") else "expert_b"
        other = "expert_b" if owner == "expert_a" else "expert_a"
        # the models are held as base + (model - base): equal up to float32 rounding of that sum
        assert torch.allclose(value, src[owner][key], rtol=0, atol=1e-6), key
        assert torch.equal(src[owner][key], src[other][key]) or not torch.allclose(value, src[other][key]), key
    assert "--preset layer_swapping" in (out / "README.md").read_text()
    out = tmp_path / "lines"
    assert main(["merge", "--preset", "lines:alpha=0,beta=1", "--experiment", str(exp), "--out", str(out)]) == 0
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged["model.embed_tokens.weight"], src["base"]["model.embed_tokens.weight"])  # alpha 0
    head = src["base"]["lm_head.weight"] + sum(src[e]["lm_head.weight"] - src["base"]["lm_head.weight"] for e in EXPERTS)
    assert torch.allclose(merged["lm_head.weight"], head, atol=1e-6)  # beta 1: plain task arithmetic
    out = tmp_path / "stock"
    assert main(["merge", "--preset", "model_stock", "--experiment", str(exp), "--out", str(out)]) == 0
    assert "method: model_stock" in (out / "evomerge_recipe.yaml").read_text()
    capsys.readouterr()
    assert main(["merge", "--preset", "model_stock", "--out", str(tmp_path / "x")]) == 2
    assert "--preset: needs --experiment" in capsys.readouterr().err
    assert main(["merge", "--out", str(tmp_path / "y")]) == 2
    assert "give a recipe file or --preset" in capsys.readouterr().err
