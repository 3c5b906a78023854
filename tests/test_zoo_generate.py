"""The zoo's generate_until tasks (`zoo_arith_{l1,l2}_gen_{search,test}`): written beside the
multiple-choice ones over the same data, accepted by `evomerge validate`, scored by real lm-eval
through HFLM on the tiny zoo, and compared so that whitespace never fails a right answer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main
from evomerge.zoo import Zoo, load_zoo
from evomerge.zoo.tasks import GEN_MAX_TOKENS, gen_task_name, read_items, task_metrics
from tests.tiny import experiment_file

os.environ.setdefault("GIT_DIR", os.devnull)  # lm-eval's "fatal: not a git repository" noise

GEN_SUITE = {"task_paths": ["zoo"], "batch_size": 64,
             "tasks": [{"name": "zoo_arith_l2_gen_search", "metric": "exact_match"}],
             "test_tasks": [{"name": "zoo_arith_l2_gen_test", "metric": "exact_match"}]}


def _mc_tasks(zoo: Zoo) -> list[str]:
    return [*zoo.search_tasks, *zoo.validation_tasks, *zoo.test_tasks, *zoo.other_tasks]


def _gen_task(zoo: Zoo, name: str):
    """The lm-eval task object of one of the zoo's tasks (its dataset loaded)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(zoo.tasks_dir), include_defaults=False)
    return get_task_dict([name], manager)[name]


def test_gen_yamls_are_written_over_the_same_data(session_tiny_zoo: Zoo, tmp_path: Path) -> None:
    assert [gen_task_name(t) for t in _mc_tasks(session_tiny_zoo)] == [
        "zoo_arith_l2_gen_search", "zoo_arith_l2_gen_validation", "zoo_arith_l2_gen_test",
        "zoo_arith_l1_gen_search", "zoo_arith_l1_gen_validation", "zoo_arith_l1_gen_test"]
    assert {n for n, metric in task_metrics().items() if metric == "exact_match"} == {
        gen_task_name(t) for t in _mc_tasks(session_tiny_zoo)}
    for task in _mc_tasks(session_tiny_zoo):
        config = yaml.safe_load((session_tiny_zoo.tasks_dir / f"{gen_task_name(task)}.yaml").read_text())
        period = "!" if "_l2_" in task else "."
        assert config["task"] == gen_task_name(task) and config["output_type"] == "generate_until"
        assert config["dataset_kwargs"]["data_files"]["test"] == str(session_tiny_zoo.tasks_dir / f"{task}.jsonl")
        assert config["generation_kwargs"] == {"until": [period], "max_gen_toks": GEN_MAX_TOKENS,
                                               "do_sample": False, "temperature": 0.0}
        assert [m["metric"] for m in config["metric_list"]] == ["exact_match"]
        # plain field names, no per-document Jinja
        assert (config["doc_to_text"], config["doc_to_choice"], config["doc_to_target"]) == (
            "question", "choices", "label")
    # a zoo built before the gen tasks existed gains them when it is opened: no rebuild
    old = tmp_path / "old"
    shutil.copytree(session_tiny_zoo.root, old)
    for path in (old / "tasks").glob("*_gen_*.yaml"):
        path.unlink()
    zoo = load_zoo(old)
    assert all((zoo.tasks_dir / f"{gen_task_name(t)}.yaml").is_file() for t in _mc_tasks(zoo))
    assert str(old.resolve() / "tasks" / "zoo_arith_l2_search.jsonl") in (
        zoo.tasks_dir / "zoo_arith_l2_gen_search.yaml").read_text()


def test_validate_accepts_the_gen_tasks_and_checks_their_metric(session_tiny_zoo, tmp_path, capsys) -> None:
    from evomerge.config import load_experiment
    from evomerge.wiring import suite_problems

    good = experiment_file(tmp_path, "gen", suite=GEN_SUITE)
    assert main(["validate", str(good)]) == 0
    wrong = {**GEN_SUITE, "tasks": [{"name": "zoo_arith_l2_gen_search", "metric": "acc"}]}
    assert main(["validate", str(experiment_file(tmp_path, "wrong", suite=wrong))]) != 0
    assert "zoo_arith_l2_gen_search does not produce 'acc'; it reports ['exact_match']" in capsys.readouterr().err
    # a zoo that is not built: checked by name and metric only
    unbuilt = {"kind": "tiny", "seed": 12345}
    assert suite_problems(load_experiment(experiment_file(tmp_path, "u1", zoo=unbuilt, suite=GEN_SUITE))) == []
    problems = suite_problems(load_experiment(experiment_file(tmp_path, "u2", zoo=unbuilt, suite=wrong)))
    assert problems == ["suite.tasks.0.metric: zoo_arith_l2_gen_search reports 'exact_match', not 'acc'"]


@torch.inference_mode()
def _greedy(model, tokenizer, questions: list[str], period: str) -> list[str]:
    """The answer words a bare greedy decode writes before the period, for each question.
    Questions of one length decode together, so no padding is involved (lm-eval left-pads)."""
    encoded = [tokenizer.encode(question) for question in questions]
    answers = [""] * len(questions)
    for length in {len(ids) for ids in encoded}:
        rows = [i for i, ids in enumerate(encoded) if len(ids) == length]
        ids = torch.tensor([encoded[i] for i in rows])
        words: list[list[str]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(GEN_MAX_TOKENS):
            tokens = model(input_ids=ids).logits[:, -1].argmax(dim=-1)
            for row, token in enumerate(tokens.tolist()):
                word = tokenizer.convert_ids_to_tokens(token)
                done[row] = done[row] or token == tokenizer.eos_token_id or word == period
                if not done[row]:
                    words[row].append(word)
            ids = torch.cat([ids, tokens[:, None]], dim=1)
        for row, i in enumerate(rows):
            answers[i] = " ".join(words[row])
    return answers


def test_lm_eval_scores_the_gen_tasks_as_a_bare_greedy_decode(session_tiny_zoo: Zoo) -> None:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    name = "expert_a"
    model = AutoModelForCausalLM.from_pretrained(session_tiny_zoo.models[name]).eval()
    tokenizer = AutoTokenizer.from_pretrained(session_tiny_zoo.models[name])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=16)  # left-padded batches
    tasks = ["zoo_arith_l1_gen_search", "zoo_arith_l2_gen_search"]
    manager = TaskManager(include_path=str(session_tiny_zoo.tasks_dir), include_defaults=False)
    output = evaluate(lm=lm, task_dict=get_task_dict(tasks, manager), bootstrap_iters=0,
                      verbosity="ERROR", log_samples=True)
    for task in tasks:
        score = output["results"][task]["exact_match,none"]
        assert 0.0 <= score <= 1.0
        period = "!" if "_l2_" in task else "."
        items = read_items(session_tiny_zoo.tasks_dir, task.replace("_gen", ""))
        samples = sorted(output["samples"][task], key=lambda sample: sample["doc_id"])
        bare = _greedy(model, tokenizer, [item["question"] for item in items], period)
        assert [sample["filtered_resps"][0].strip() for sample in samples] == bare
        gold = [item["choices"][item["label"]].removesuffix(f" {period}") for item in items]
        assert score == pytest.approx(sum(b == g for b, g in zip(bare, gold, strict=True)) / len(items))


@pytest.mark.parametrize("task", ["zoo_arith_l2_gen_search", "zoo_arith_l1_gen_test"])
def test_exact_match_ignores_whitespace_and_the_period(session_tiny_zoo: Zoo, task: str) -> None:
    lm_task = _gen_task(session_tiny_zoo, task)
    doc = lm_task.eval_docs[0]
    gold = doc["choices"][doc["label"]]                       # e.g. "6 3 !"
    digits = gold.split()[:-1]
    right = [" ".join(digits), f"  {' '.join(digits)} \n", "".join(digits), gold, f" {gold} "]
    for generation in right:
        assert lm_task.process_results(doc, [generation]) == {"exact_match": 1.0}, generation
    wrong_digit = str((int(digits[-1]) + 1) % 10)
    wrong = ["", " ".join([*digits[:-1], wrong_digit]), " ".join([*digits, "0"]),
             " ".join([*digits, "the"]), " ".join(digits[:-1])]
    for generation in wrong:
        assert lm_task.process_results(doc, [generation]) == {"exact_match": 0.0}, generation
