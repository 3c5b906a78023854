"""The layered zoo's building blocks: training confined to chosen blocks, noisy arithmetic text,
multi-phase experts, and the kind itself (spec, CLI, config). The real `layered` build takes
minutes, so the end-to-end test builds the same phase structure at the `tiny` kind's size."""

from __future__ import annotations

import dataclasses
import json
import random
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import evomerge.zoo.kinds as zoo_kinds
from evomerge.cli import ZOO_KINDS
from evomerge.config import ZooConfig
from evomerge.zoo import KINDS, build_zoo
from evomerge.zoo.corpus import Problem, make_colour_facts, pack_text, text_sentence, wrong_digit_fact
from evomerge.zoo.kinds import Phase, zoo_spec
from evomerge.zoo.train import StageConfig, train_stage
from evomerge.zoo.vocab import BOS, VOCABULARY, build_tokenizer, translate

FACTS_WORLD = make_colour_facts(random.Random(0))


def _tiny_model(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(VOCABULARY), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False,
    ))


def _train(model: LlamaForCausalLM, config: StageConfig) -> None:
    tokenizer = build_tokenizer()
    token_ids = dict(tokenizer.get_vocab())

    def make(rng: random.Random, length: int):
        return pack_text(rng, FACTS_WORLD, "l1", length), [True] * length

    train_stage("t", model, config, make, random.Random(0), token_ids, token_ids[BOS], lambda _: None)


def test_a_stage_with_blocks_changes_only_those_blocks() -> None:
    model = _tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    _train(model, StageConfig(steps=3, body_lr=1e-2, vocab_lr=0.0, warmup=1, batch_size=4, seq_len=16, blocks=(1,)))
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith("model.layers.1.") for name in changed), changed
    # Every parameter is trainable again afterwards (the next stage decides for itself).
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_a_stage_without_blocks_trains_every_block_and_the_final_norm() -> None:
    model = _tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    _train(model, StageConfig(steps=3, body_lr=1e-2, vocab_lr=0.0, warmup=1, batch_size=4, seq_len=16))
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert {name.split(".")[2] for name in changed if name.startswith("model.layers.")} == {"0", "1", "2"}
    assert "model.norm.weight" in changed
    assert not any("embed_tokens" in name or "lm_head" in name for name in changed)


def test_blocks_that_do_not_exist_are_refused() -> None:
    with pytest.raises(ValueError, match=r"blocks \[5\] do not exist in a model of 3 blocks"):
        _train(_tiny_model(), StageConfig(steps=1, body_lr=1e-3, warmup=1, batch_size=2, seq_len=8, blocks=(0, 5)))


@pytest.mark.parametrize("language", ["l1", "l2"])
def test_wrong_digit_facts_state_a_wrong_result(language: str) -> None:
    plus, period = translate(["plus", "."], language)
    rng = random.Random(1)
    for _ in range(300):
        words = wrong_digit_fact(rng, language)
        a, op, b, equals, *answer, end = words
        assert equals == "=" and end == period
        problem = Problem(int(a), int(b), "plus" if op == plus else "minus")
        stated = int("".join(answer))
        assert stated != problem.result() and 0 <= stated <= 18


def test_text_without_wrong_facts_is_the_plain_mixture() -> None:
    """wrong_facts=0 draws nothing extra, so kinds without noise train on the very same text."""
    plain_rng, noisy_rng = random.Random(7), random.Random(7)
    words: list[str] = []
    while len(words) < 200:
        words += text_sentence(plain_rng, FACTS_WORLD, "l2")
    assert pack_text(noisy_rng, FACTS_WORLD, "l2", 200) == words[:200]
    noisy = pack_text(random.Random(7), FACTS_WORLD, "l2", 2000, wrong_facts=0.5)
    assert noisy != pack_text(random.Random(7), FACTS_WORLD, "l2", 2000)


def test_the_layered_kind_is_offered_everywhere_kinds_are() -> None:
    assert ZOO_KINDS == list(KINDS)
    assert set(typing.get_args(ZooConfig.model_fields["kind"].annotation)) == set(KINDS)
    assert ZooConfig(kind="layered").kind == "layered"


def test_the_layered_spec_confines_each_expert_to_its_layers() -> None:
    spec = zoo_spec("layered")
    layers = spec.shape.layers
    middle = set(range(layers // 3, layers - layers // 3))
    (a_phase,) = spec.expert_a_phases
    assert set(a_phase.blocks) == middle and a_phase.vocab_lr == 0.0
    outer_phase, middle_phase = spec.expert_b_phases
    assert set(outer_phase.blocks) == set(range(layers)) - middle and outer_phase.vocab_lr != 0.0
    assert set(middle_phase.blocks) == middle and middle_phase.vocab_lr == 0.0 and middle_phase.wrong_facts > 0


def test_a_phased_zoo_confines_each_experts_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layered kind's structure at the tiny kind's size, built for real."""
    tiny = zoo_spec("tiny")
    spec = dataclasses.replace(
        tiny, shape=dataclasses.replace(tiny.shape, layers=3),
        expert_a_phases=(Phase(steps=20, body_lr=1e-3, vocab_lr=0.0, blocks=(1,)),),
        expert_b_phases=(Phase(steps=15, body_lr=1e-3, vocab_lr=3e-3, blocks=(0, 2)),
                         Phase(steps=10, body_lr=1e-3, vocab_lr=0.0, blocks=(1,), wrong_facts=0.3)),
    )
    monkeypatch.setitem(zoo_kinds.KINDS, "tiny-phased", spec)
    zoo = build_zoo("tiny-phased", seed=0, cache_dir=tmp_path)
    base = load_file(zoo.models["base"] / "model.safetensors")

    def changed(name: str) -> set[str]:
        tensors = load_file(zoo.models[name] / "model.safetensors")
        groups = set()
        for key, tensor in tensors.items():
            if not torch.equal(tensor, base[key]):
                groups.add(key.split(".")[2] if key.startswith("model.layers.") else key.rsplit(".", 1)[0])
        return groups

    assert changed("expert_a") == {"1"}
    assert changed("expert_b") == {"0", "1", "2", "model.embed_tokens", "lm_head"}
    manifest = json.loads((zoo.root / "manifest.json").read_text())
    phases = manifest["models"]["expert_b"]["training"]
    assert [phase["blocks"] for phase in phases] == [[0, 2], [1]]
    assert manifest["models"]["expert_a"]["training"]["blocks"] == [1]
    assert manifest["models"]["base"]["training"]["blocks"] is None
