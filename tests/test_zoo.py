"""Tests of the embedded model zoo, on the `tiny` kind built into a temporary cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import evomerge.zoo.build as zoo_build
from evomerge.zoo import Zoo, ZooError, build_zoo, load_zoo, zoo_dir
from evomerge.zoo.score import choice_accuracy, choice_loglikelihoods
from evomerge.zoo.tasks import read_items
from evomerge.zoo.vocab import VOCABULARY


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """The tiny zoo, built once per test session."""
    return build_zoo("tiny", seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def _tensors(zoo: Zoo, name: str) -> dict[str, torch.Tensor]:
    return load_file(zoo.models[name] / "model.safetensors")


def _all_tasks(zoo: Zoo) -> list[str]:
    return [*zoo.search_tasks, *zoo.validation_tasks, *zoo.test_tasks, *zoo.other_tasks]


def test_layout_and_task_names(tiny_zoo: Zoo) -> None:
    assert tiny_zoo.root == zoo_dir("tiny", 0, tiny_zoo.root.parent.parent)
    assert set(tiny_zoo.models) == {"base", "expert_a", "expert_b"}
    assert tiny_zoo.base_model == "base"
    assert tiny_zoo.search_tasks == ("zoo_arith_l2_search",)
    assert tiny_zoo.validation_tasks == ("zoo_arith_l2_validation",)
    assert tiny_zoo.test_tasks == ("zoo_arith_l2_test",)
    assert tiny_zoo.other_tasks == ("zoo_arith_l1_search", "zoo_arith_l1_validation", "zoo_arith_l1_test")
    for task in _all_tasks(tiny_zoo):
        assert (tiny_zoo.tasks_dir / f"{task}.yaml").is_file()
        assert len(read_items(tiny_zoo.tasks_dir, task)) == 60


def test_search_and_test_items_use_disjoint_operand_pairs(tiny_zoo: Zoo) -> None:
    def pairs(task: str) -> set[tuple[int, int]]:
        return {(item["a"], item["b"]) for item in read_items(tiny_zoo.tasks_dir, task)}

    search = pairs("zoo_arith_l2_search") | pairs("zoo_arith_l1_search")
    validation = pairs("zoo_arith_l2_validation") | pairs("zoo_arith_l1_validation")
    test = pairs("zoo_arith_l2_test") | pairs("zoo_arith_l1_test")
    assert not search & test and not validation & search and not validation & test


def test_models_load_offline_from_disk(tiny_zoo: Zoo) -> None:
    for path in tiny_zoo.models.values():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert isinstance(model, LlamaForCausalLM)
        assert model.config.vocab_size == len(VOCABULARY) == len(tokenizer)
        assert not model.config.tie_word_embeddings
        assert (path / "generation_config.json").is_file()
        ids = tokenizer.encode("4 5 plus 2 7 = 7 2 .")
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.convert_ids_to_tokens(ids[1:]) == "4 5 plus 2 7 = 7 2 .".split()
        assert tokenizer.encode("7 2 .", add_special_tokens=False) == ids[-3:]


def test_models_differ_as_designed(tiny_zoo: Zoo) -> None:
    base, a, b = (_tensors(tiny_zoo, name) for name in ("base", "expert_a", "expert_b"))
    body = "model.layers.0.mlp.down_proj.weight"
    embeddings = "model.embed_tokens.weight"
    assert not torch.equal(base[body], a[body])
    assert not torch.equal(base[body], b[body])
    assert not torch.equal(a[body], b[body])
    # Expert A trains with embeddings and lm_head frozen; expert B moves them.
    assert torch.equal(base[embeddings], a[embeddings])
    assert torch.equal(base["lm_head.weight"], a["lm_head.weight"])
    assert not torch.equal(base[embeddings], b[embeddings])


def test_build_is_deterministic(tiny_zoo: Zoo, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    lines: list[str] = []
    again = build_zoo("tiny", seed=0, cache_dir=tmp_path, progress=lines.append)
    assert torch.get_num_threads() == threads
    assert any(line.startswith("training expert_a: step 80/80 loss") for line in lines)
    for name in tiny_zoo.models:
        first, second = _tensors(tiny_zoo, name), _tensors(again, name)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)
    for task in _all_tasks(tiny_zoo):
        assert read_items(tiny_zoo.tasks_dir, task) == read_items(again.tasks_dir, task)


def test_cached_zoo_is_returned_without_rebuilding(
    tiny_zoo: Zoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: object) -> None:
        raise AssertionError("the cached zoo was rebuilt")

    monkeypatch.setattr(zoo_build, "_build_into", fail)
    lines: list[str] = []
    cached = build_zoo("tiny", seed=0, cache_dir=tiny_zoo.root.parent.parent, progress=lines.append)
    assert cached == tiny_zoo
    assert lines == []


def test_failed_build_leaves_nothing_that_looks_like_a_zoo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: object) -> None:
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(zoo_build, "_save", fail)
    with pytest.raises(RuntimeError, match="killed while saving"):
        build_zoo("tiny", seed=0, cache_dir=tmp_path)
    assert not zoo_dir("tiny", 0, tmp_path).exists()
    assert not list((tmp_path / "zoo").glob(".tmp-*"))


def test_load_zoo_reports_missing_or_incomplete_zoos(tiny_zoo: Zoo, tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="manifest.json is missing"):
        load_zoo(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "tiny"}))
    with pytest.raises(ZooError, match="lacks"):
        load_zoo(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_zoo.root, copy)
    (copy / "models" / "expert_b" / "model.safetensors").unlink()
    with pytest.raises(ZooError, match="incomplete"):
        load_zoo(copy)


def test_unknown_kind_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown zoo kind"):
        build_zoo("no-such-kind", cache_dir=tmp_path)


def test_moved_zoo_points_its_tasks_at_the_new_place(tiny_zoo: Zoo, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(tiny_zoo.root, moved)
    zoo = load_zoo(moved)
    for task in _all_tasks(zoo):
        text = (zoo.tasks_dir / f"{task}.yaml").read_text()
        assert str(moved.resolve() / "tasks" / f"{task}.jsonl") in text
        assert str(tiny_zoo.root) not in text


def test_manifest_records_the_build(tiny_zoo: Zoo) -> None:
    manifest = json.loads((tiny_zoo.root / "manifest.json").read_text())
    assert manifest["kind"] == "tiny" and manifest["seed"] == 0
    assert manifest["build_seconds"] > 0
    for name, entry in manifest["models"].items():
        assert set(entry["accuracy"]) == set(_all_tasks(tiny_zoo))
        assert entry["parameters"] > 0
        assert (tiny_zoo.root / entry["path"]) == tiny_zoo.models[name]


def _evaluate_with_lm_eval(zoo: Zoo, name: str) -> dict:
    """lm-eval's results for every zoo task on one model, tasks indexed from the zoo only."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    task_manager = TaskManager(include_path=str(zoo.tasks_dir), include_defaults=False)
    task_dict = get_task_dict(_all_tasks(zoo), task_manager)
    model = AutoModelForCausalLM.from_pretrained(zoo.models[name]).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo.models[name])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=256)
    return evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0, verbosity="ERROR")


def test_lm_eval_scores_equal_the_bare_forward_pass(tiny_zoo: Zoo) -> None:
    manifest = json.loads((tiny_zoo.root / "manifest.json").read_text())
    name = "expert_a"
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo.models[name]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo.models[name])
    output = _evaluate_with_lm_eval(tiny_zoo, name)
    for task in _all_tasks(tiny_zoo):
        items = read_items(tiny_zoo.tasks_dir, task)
        bare = choice_loglikelihoods(model, tokenizer, items)
        samples = sorted(output["samples"][task], key=lambda sample: sample["doc_id"])
        lm_eval_loglikelihoods = torch.tensor(
            [[float(response[0]) for response in sample["filtered_resps"]] for sample in samples]
        )
        torch.testing.assert_close(lm_eval_loglikelihoods, bare, rtol=0, atol=1e-4)
        accuracy = output["results"][task]["acc,none"]
        assert accuracy == choice_accuracy(model, tokenizer, items)
        assert accuracy == manifest["models"][name]["accuracy"][task]
