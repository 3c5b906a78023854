"""Arithmetic task items and the lm-eval task files that score them.

Each item is a held-out two-digit problem (operand pairs are never trained on) scored as 4-way
log-likelihood multiple choice over the answer words: the correct result, the other
operation's result (so reading the operator word matters) and two near misses (+-1, +-2, +-9,
+-10, +-11). Chance is 0.25. Pairs whose operands are both < 10 are excluded (those facts are
in the text corpus). Search and test items use disjoint operand pairs.

lm-eval joins context and choice with `target_delimiter` " ": context `4 5 plus 2 7 =`,
continuation ` 7 2 .`. The whitespace word-level tokenizer splits the joined string at the
same place, so the scored tokens are exactly the answer words (digits and period).

Every task also has a `generate_until` variant over the same data file (`zoo_arith_l2_gen_search`
beside `zoo_arith_l2_search`): the model greedily writes the answer after the question, stopped
at its language's period (`.` in L1, `!` in L2) or after `GEN_MAX_TOKENS` tokens, and scores
`exact_match` against the correct choice. The gold answer is `choices[label]` without a template:
for `generate_until`, lm-eval indexes `doc_to_choice` by `doc_to_target`. Both sides are
compared with every whitespace and the period removed (`exact_match`'s `regexes_to_ignore`), so
`6 3 !`, ` 6 3` and `63` are the same answer: answer words are single digits, so nothing else
can collapse onto a gold answer. These YAMLs need no data of their own, so a zoo opened by
`load_zoo` gains them without a rebuild.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.zoo.corpus import OPERATIONS, Problem, answer_words, problem_prompt
from evomerge.zoo.vocab import PERIOD, Language

NEAR_MISS_OFFSETS: tuple[int, ...] = (1, -1, 2, -2, 9, -9, 10, -10, 11, -11)
N_CHOICES = 4
LANGUAGES: tuple[Language, ...] = ("l1", "l2")
SPLITS: tuple[str, ...] = ("search", "validation", "test")
# The longest answer is 4 tokens (`1 9 8 !`, 99 + 99); the rest is margin for a model that
# misses the period, so such an answer is cut off short and scored wrong.
GEN_MAX_TOKENS = 8
_TASK_NAME = re.compile(r"zoo_arith_(l1|l2)(_gen)?_(search|validation|test)")


@dataclass(frozen=True)
class PairSplit:
    """Operand pairs (a, b) for training, search items and test items; disjoint."""

    train: tuple[tuple[int, int], ...]
    search: tuple[tuple[int, int], ...]
    test: tuple[tuple[int, int], ...]


def task_name(language: Language, split: str, generate: bool = False) -> str:
    """lm-eval task name, e.g. `zoo_arith_l2_search`; its generate_until variant (`generate`)
    `zoo_arith_l2_gen_search`. Both read the data file `zoo_arith_l2_search.jsonl`."""
    return f"zoo_arith_{language}{'_gen' if generate else ''}_{split}"


def parse_task_name(name: str) -> tuple[Language, str, bool]:
    """(language, split, generate) of a zoo task name; ValueError for any other name."""
    match = _TASK_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"not a zoo task name: {name!r}")
    language: Language = "l1" if match.group(1) == "l1" else "l2"
    return language, match.group(3), match.group(2) is not None


def gen_task_name(name: str) -> str:
    """The generate_until variant of a multiple-choice zoo task:
    `zoo_arith_l2_search` -> `zoo_arith_l2_gen_search`."""
    language, split, _ = parse_task_name(name)
    return task_name(language, split, generate=True)


def task_metrics() -> dict[str, str]:
    """Every task a zoo writes, with the metric it reports (`acc`, or `exact_match` for the
    generate_until variants)."""
    return {task_name(language, split, generate): "exact_match" if generate else "acc"
            for language in LANGUAGES for generate in (False, True) for split in SPLITS}


def all_pairs() -> list[tuple[int, int]]:
    """Every operand pair with a >= b >= 1 and not both operands < 10."""
    return [(a, b) for a in range(10, 100) for b in range(1, a + 1)]


def split_pairs(rng: random.Random, n_search: int, n_test: int) -> PairSplit:
    """Hold out `n_search` + `n_test` operand pairs; the rest are for training."""
    pairs = all_pairs()
    rng.shuffle(pairs)
    held_out = n_search + n_test
    return PairSplit(
        train=tuple(sorted(pairs[held_out:])),
        search=tuple(sorted(pairs[:n_search])),
        test=tuple(sorted(pairs[n_search:held_out])),
    )


def train_problems(split: PairSplit) -> list[Problem]:
    """Every training problem (both operations on every training pair)."""
    return [Problem(a, b, op) for a, b in split.train for op in OPERATIONS]


def _choices(problem: Problem, rng: random.Random) -> list[int]:
    """The correct result, the other operation's result and two near misses, shuffled."""
    answer, other = problem.result(), problem.other_result()
    near = [answer + d for d in NEAR_MISS_OFFSETS if answer + d >= 0 and answer + d != other]
    values = [answer, other, *rng.sample(near, N_CHOICES - 2)]
    rng.shuffle(values)
    return values


def make_item(problem: Problem, language: Language, rng: random.Random) -> dict[str, Any]:
    """One lm-eval document: question text, choice texts and the index of the correct one."""
    values = _choices(problem, rng)
    return {
        "question": " ".join(problem_prompt(problem, language)),
        "choices": [" ".join(answer_words(value, language)) for value in values],
        "label": values.index(problem.result()),
        "a": problem.a,
        "b": problem.b,
        "op": problem.op,
    }


def sample_items(
    rng: random.Random, pairs: Sequence[tuple[int, int]], n: int, language: Language
) -> list[dict[str, Any]]:
    """`n` distinct problems on `pairs` (either operation), as documents in `language`."""
    problems = [Problem(a, b, op) for a, b in pairs for op in OPERATIONS]
    if n > len(problems):
        raise ValueError(f"asked for {n} items but only {len(problems)} problems exist")
    return [make_item(problem, language, rng) for problem in rng.sample(problems, n)]


def make_task_items(
    rng: random.Random, split: PairSplit, n_search: int, n_test: int
) -> dict[str, list[dict[str, Any]]]:
    """Items of every task: {L1, L2} x {search, test}."""
    items: dict[str, list[dict[str, Any]]] = {}
    for language in LANGUAGES:
        items[task_name(language, "search")] = sample_items(rng, split.search, n_search, language)
        items[task_name(language, "test")] = sample_items(rng, split.test, n_test, language)
    return items


def make_validation_items(
    rng: random.Random, split: PairSplit, items: dict[str, list[dict[str, Any]]], n: int
) -> dict[str, list[dict[str, Any]]]:
    """Items of the validation split of each language: `n` problems on the held-out operand pairs
    that no search or test item (of any language) uses, so validation shares no operand pair
    with either split, and the models, search and test items stay as they were."""
    used = {(item["a"], item["b"]) for documents in items.values() for item in documents}
    free = sorted(set(split.search + split.test) - used)
    return {task_name(language, "validation"): sample_items(rng, free, n, language) for language in LANGUAGES}


def data_path(tasks_dir: Path, name: str) -> Path:
    """The jsonl file of a task."""
    return tasks_dir / f"{name}.jsonl"


def yaml_path(tasks_dir: Path, name: str) -> Path:
    """The lm-eval YAML file of a task."""
    return tasks_dir / f"{name}.yaml"


def _over_data(name: str, data_file: Path) -> dict[str, Any]:
    """The part of a task config that names the task and its JSONL data (the test split)."""
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test"}


def task_yaml(name: str, data_file: Path) -> str:
    """lm-eval task config text for one task; `data_file` must be absolute."""
    config = {
        **_over_data(name, data_file),
        "output_type": "multiple_choice",
        "doc_to_text": "question",  # a field name: no Jinja template compiled per document per call
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return yaml.safe_dump(config, sort_keys=False)


def gen_task_yaml(name: str, data_file: Path, language: Language) -> str:
    """lm-eval config text of a generate_until task over a multiple-choice task's data file."""
    period = PERIOD[language]
    config = {
        **_over_data(name, data_file),
        "output_type": "generate_until",
        "doc_to_text": "question",
        # generate_until with doc_to_choice: the gold answer is choices[label] (no template)
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "generation_kwargs": {
            "until": [period],
            "max_gen_toks": GEN_MAX_TOKENS,
            "do_sample": False,
            "temperature": 0.0,
        },
        "metric_list": [{
            "metric": "exact_match",
            "aggregation": "mean",
            "higher_is_better": True,
            # applied to the generation and the gold answer alike: `6 3 !` and ` 6 3 ` -> `63`
            "regexes_to_ignore": [r"\s+", re.escape(period)],
        }],
        "metadata": {"version": 1.0},
    }
    return yaml.safe_dump(config, sort_keys=False)


def _write_text(path: Path, text: str) -> None:
    """Write a file atomically (readers never see a partial file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_task_data(tasks_dir: Path, items: dict[str, list[dict[str, Any]]]) -> None:
    """Write one jsonl data file per task."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name, documents in items.items():
        lines = "".join(json.dumps(document, sort_keys=True) + "\n" for document in documents)
        _write_text(data_path(tasks_dir, name), lines)


def write_task_yamls(tasks_dir: Path, data_dir: Path, names: Sequence[str]) -> None:
    """Write (or refresh) the YAMLs in `tasks_dir`, pointing at the data files in `data_dir`:
    for each (multiple-choice) task in `names`, its own YAML and its generate_until variant's.

    `data_dir` is where the data will live when the YAMLs are used, which differs from
    `tasks_dir` while a zoo is being built in a temporary directory.
    """
    for name in names:
        data_file = data_path(data_dir.resolve(), name)
        language, _, _ = parse_task_name(name)
        generate = gen_task_name(name)
        for task, text in ((name, task_yaml(name, data_file)),
                           (generate, gen_task_yaml(generate, data_file, language))):
            target = yaml_path(tasks_dir, task)
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                _write_text(target, text)


def read_items(tasks_dir: Path, name: str) -> list[dict[str, Any]]:
    """The documents of a task, in file order."""
    with data_path(tasks_dir, name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
