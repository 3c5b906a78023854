"""Build, cache and load a zoo: three Hugging Face model dirs, lm-eval task files, a manifest.

Layout of a zoo directory:
    models/{base,expert_a,expert_b}/   config.json, model.safetensors, generation_config.json,
                                       tokenizer.json, tokenizer_config.json
    models/<adapter>/                  adapter_config.json, adapter_model.safetensors (adapter kinds:
                                       LoRA adapters on the base instead of the two experts)
    tasks/zoo_arith_{l1,l2}_{search,validation,test}.{yaml,jsonl}
    tasks/zoo_arith_{l1,l2}_gen_{search,validation,test}.yaml   generate_until variants over the same data
    manifest.json                      written last: a zoo without it is not a zoo
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.corpus import ColourFacts, make_colour_facts
from evomerge.zoo.kinds import FORMAT_VERSION, ModelShape, Phase, ZooSpec, zoo_spec
from evomerge.zoo.lora import AdapterSpec, save_adapter, train_adapter
from evomerge.zoo.score import choice_accuracy
from evomerge.zoo.tasks import (
    LANGUAGES,
    SPLITS,
    PairSplit,
    data_path,
    make_task_items,
    make_validation_items,
    split_pairs,
    task_name,
    train_problems,
    write_task_data,
    write_task_yamls,
)
from evomerge.zoo.train import (
    SequenceMaker,
    StageConfig,
    StageResult,
    skill_maker,
    text_maker,
    train_stage,
)
from evomerge.zoo.vocab import BOS, PAD, VOCABULARY, build_tokenizer

MANIFEST = "manifest.json"
BASE_MODEL = "base"
TARGET_LANGUAGE = "l2"
_REQUIRED_KEYS = (
    "format_version", "kind", "seed", "base_model", "models", "tasks", "build_seconds",
)

Progress = Callable[[str], None]


class ZooError(RuntimeError):
    """A zoo directory is missing, incomplete or of another format version."""


@dataclass(frozen=True)
class Zoo:
    """A built zoo on disk."""

    root: Path
    kind: str
    models: dict[str, Path]
    base_model: str
    tasks_dir: Path
    search_tasks: tuple[str, ...]
    validation_tasks: tuple[str, ...]
    test_tasks: tuple[str, ...]
    other_tasks: tuple[str, ...]


def default_cache_dir() -> Path:
    """`$EVOMERGE_CACHE`, else `~/.cache/evomerge`."""
    configured = os.environ.get("EVOMERGE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "evomerge"


def zoo_dir(kind: str = "cross-skill", seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Where the zoo of `kind` and `seed` lives: `<cache>/zoo/<kind>-seed<seed>-v<FORMAT>`."""
    zoo_spec(kind)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return (cache / "zoo" / f"{kind}-seed{seed}-v{FORMAT_VERSION}").absolute()


def build_zoo(
    kind: str = "cross-skill",
    seed: int = 0,
    cache_dir: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Zoo:
    """The zoo of `kind` and `seed`, built first unless a complete one is cached.

    The build happens in a temporary directory beside the final one and is moved into place
    with `os.replace`, under a file lock, so concurrent callers build it once and a killed
    build never leaves a directory that looks complete.
    """
    report = progress or (lambda _line: None)
    final = zoo_dir(kind, seed, cache_dir)
    if not force and _is_complete(final):
        return load_zoo(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{final.name}.lock"):
        if not force and _is_complete(final):
            return load_zoo(final)
        _remove_stale_temporaries(final)
        temporary = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with _thread_limit(zoo_spec(kind).max_threads):
                _build_into(temporary, final, kind, seed, report)
            _move_into_place(temporary, final)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    report(f"zoo ready at {final}")
    return load_zoo(final)


def load_zoo(path: Path) -> Zoo:
    """Open a built zoo from its manifest.json; ZooError if it is missing or incomplete.

    If the directory was moved since it was built, its task YAMLs are rewritten to point at
    the data files' new absolute paths. The YAMLs are written from this evomerge's templates
    each time, so a zoo built before a task variant existed (the generate_until ones) gains it.
    """
    root = Path(path).absolute()
    manifest = _read_manifest(root)
    models = {name: root / entry["path"] for name, entry in manifest["models"].items()}
    tasks_dir = root / "tasks"
    tasks = manifest["tasks"]
    names = [*tasks["search"], *tasks["validation"], *tasks["test"], *tasks["other"]]
    adapter_files = ("adapter_config.json", "adapter_model.safetensors")
    required = [models[name] / file for name, entry in manifest["models"].items()
                for file in (adapter_files if entry.get("adapter") else
                             ("config.json", "model.safetensors", "tokenizer.json"))]
    required += [data_path(tasks_dir, name) for name in names]
    missing = [str(path) for path in required if not path.is_file()]
    if missing:
        raise ZooError(f"zoo at {root} is incomplete; missing: {', '.join(missing)}")
    write_task_yamls(tasks_dir, tasks_dir, names)
    return Zoo(
        root=root,
        kind=manifest["kind"],
        models=models,
        base_model=manifest["base_model"],
        tasks_dir=tasks_dir,
        search_tasks=tuple(tasks["search"]),
        validation_tasks=tuple(tasks["validation"]),
        test_tasks=tuple(tasks["test"]),
        other_tasks=tuple(tasks["other"]),
    )


def _read_manifest(root: Path) -> dict[str, Any]:
    """The parsed manifest of the zoo at `root`, validated."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ZooError(
            f"no zoo at {root}: {MANIFEST} is missing "
            "(build one with build_zoo or `evomerge zoo build`)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ZooError(f"zoo manifest {manifest_path} is not valid JSON: {error}") from error
    absent = [key for key in _REQUIRED_KEYS if key not in manifest]
    if absent:
        raise ZooError(f"zoo manifest {manifest_path} lacks: {', '.join(absent)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ZooError(
            f"zoo at {root} has format version {manifest['format_version']}, "
            f"this evomerge reads version {FORMAT_VERSION}; rebuild it"
        )
    return manifest


def _is_complete(root: Path) -> bool:
    try:
        _read_manifest(root)
    except ZooError:
        return False
    return True


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `lock_path` (the file itself is left in place)."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(final: Path) -> None:
    """Delete leftovers of killed builds of this zoo (safe: we hold its lock)."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in final.parent.glob(f".old-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _move_into_place(temporary: Path, final: Path) -> None:
    """Replace `final` (if any) by `temporary`."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, final)


def _rng(seed: int, purpose: str) -> random.Random:
    """An independent, reproducible random stream per seed and purpose."""
    return random.Random(f"evomerge-zoo/seed={seed}/{purpose}")


def _task_names() -> dict[str, list[str]]:
    """Target-language tasks per split, and the rest (expert A's own L1 skill)."""
    other_languages = [language for language in LANGUAGES if language != TARGET_LANGUAGE]
    return {
        "search": [task_name(TARGET_LANGUAGE, "search")],
        "validation": [task_name(TARGET_LANGUAGE, "validation")],
        "test": [task_name(TARGET_LANGUAGE, "test")],
        "other": [task_name(language, split) for language in other_languages for split in SPLITS],
    }


def _model_config(shape: ModelShape, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        dtype="float32",
    )


def _stages(
    spec: ZooSpec, facts: ColourFacts, pairs: PairSplit
) -> dict[str, list[tuple[StageConfig, SequenceMaker]]]:
    """Each model's training phases, in training order.

    The D4b recipes: base: 95 % L1 + 5 % L2 text. expert A: 70 % L1 two-digit problems
    (training pairs only) + 30 % L1 text, embeddings and lm_head frozen. expert B: L2 text, fast
    vocabulary rows. A kind's `expert_*_phases` replace an expert's one D4b phase: expert A's
    phases train on A's data, expert B's on L2 text (with `wrong_facts` of noisy arithmetic).
    """
    warmup = spec.warmup
    problems = train_problems(pairs)

    def phases(
        custom: tuple[Phase, ...], make: Callable[[Phase], SequenceMaker]
    ) -> list[tuple[StageConfig, SequenceMaker]]:
        return [(StageConfig(phase.steps, body_lr=phase.body_lr, vocab_lr=phase.vocab_lr,
                             warmup=warmup, blocks=phase.blocks), make(phase)) for phase in custom]

    stages: dict[str, list[tuple[StageConfig, SequenceMaker]]] = {
        "base": [(StageConfig(spec.base_steps, body_lr=1e-3, warmup=warmup),
                  text_maker(facts, l2_fraction=0.05))],
    }
    if spec.adapters:  # adapters instead of the experts (see _build_adapters)
        return stages
    # The D4b experts are one phase each.
    a_phases = spec.expert_a_phases or (
        Phase(spec.expert_a_steps, body_lr=5e-4, vocab_lr=0.0),
    )
    b_phases = spec.expert_b_phases or (
        Phase(spec.expert_b_steps, body_lr=1e-4, vocab_lr=3e-3),
    )
    stages["expert_a"] = phases(
        a_phases, lambda _phase: skill_maker(facts, problems, problem_fraction=0.7)
    )
    stages["expert_b"] = phases(
        b_phases, lambda phase: text_maker(facts, l2_fraction=1.0, wrong_facts=phase.wrong_facts)
    )
    return stages


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bars, restoring their previous state."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Save a model dir loadable offline by AutoModelForCausalLM and AutoTokenizer."""
    with _quiet_progress_bars():
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@contextmanager
def _thread_limit(max_threads: int | None) -> Iterator[None]:
    """Cap torch's intra-op threads at `max_threads` for the duration, then restore them."""
    previous = torch.get_num_threads()
    if max_threads is not None and max_threads < previous:
        torch.set_num_threads(max_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _training_record(configs: list[StageConfig]) -> dict[str, Any] | list[dict[str, Any]]:
    """A model's training settings for the manifest: one phase's dict, or a list of phases."""
    records = [asdict(config) for config in configs]
    return records[0] if len(records) == 1 else records


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _adapter_maker(spec: AdapterSpec, facts: ColourFacts, pairs: PairSplit) -> SequenceMaker:
    if spec.data == "arith":
        return skill_maker(facts, train_problems(pairs), problem_fraction=spec.problem_fraction)
    return text_maker(facts, l2_fraction=spec.l2_fraction, wrong_facts=spec.wrong_facts)


def _build_adapters(spec: ZooSpec, base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, facts: ColourFacts,
                    pairs: PairSplit, items: dict[str, Any], temporary: Path, seed: int,
                    report: Progress) -> dict[str, dict[str, Any]]:
    """Train and save the kind's LoRA adapters from ``base``; their manifest entries."""
    token_ids = dict(tokenizer.get_vocab())
    meta = {}
    for adapter in spec.adapters:
        model, deltas, loss, seconds = train_adapter(
            base, adapter, _adapter_maker(adapter, facts, pairs), _rng(seed, f"adapter/{adapter.name}"),
            seed, token_ids, token_ids[BOS], report, warmup=spec.warmup)
        directory = save_adapter(deltas, adapter, temporary / "models" / adapter.name)
        meta[adapter.name] = {
            "path": f"models/{adapter.name}", "parent": BASE_MODEL, "adapter": True,
            "training": asdict(adapter), "loss_ema": loss, "train_seconds": round(seconds, 2),
            "parameters": sum(d.A.numel() + d.B.numel() for d in deltas.values()),
            "sha256": _sha256(directory / "adapter_model.safetensors"),
            "accuracy": {task: choice_accuracy(model, tokenizer, task_items) for task, task_items in items.items()},
        }
    return meta


def _build_into(temporary: Path, final: Path, kind: str, seed: int, report: Progress) -> None:
    """Build the whole zoo in `temporary`; its task YAMLs point at `final`."""
    started = time.monotonic()
    spec = zoo_spec(kind)
    report(f"building zoo {kind} seed {seed} in {temporary}")
    facts = make_colour_facts(_rng(seed, "world"))
    pairs = split_pairs(_rng(seed, "pairs"), spec.search_pairs, spec.test_pairs)
    items = make_task_items(_rng(seed, "items"), pairs, spec.n_search, spec.n_test)
    items.update(make_validation_items(_rng(seed, "validation"), pairs, items, spec.n_validation))
    names = _task_names()
    write_task_data(temporary / "tasks", items)
    write_task_yamls(temporary / "tasks", final.resolve() / "tasks", list(items))

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = spec.shape.max_positions
    token_ids = dict(tokenizer.get_vocab())
    bos_id = token_ids[BOS]
    stages = _stages(spec, facts, pairs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = LlamaForCausalLM(_model_config(spec.shape, tokenizer))
    trained: dict[str, LlamaForCausalLM] = {}
    results: dict[str, list[StageResult]] = {}
    for name, model_phases in stages.items():
        model = base if name == BASE_MODEL else copy.deepcopy(trained[BASE_MODEL])
        results[name] = []
        for index, (config, make) in enumerate(model_phases):
            # The first phase's stream keeps the name it had before phases existed, so the
            # single-phase kinds train exactly as they did.
            purpose = f"train/{name}" if index == 0 else f"train/{name}/phase{index}"
            label = name if len(model_phases) == 1 else f"{name} phase {index + 1}/{len(model_phases)}"
            results[name].append(train_stage(
                label, model, config, make, _rng(seed, purpose), token_ids, bos_id, report
            ))
        trained[name] = model
        _save(model, tokenizer, temporary / "models" / name)

    report("scoring models on the tasks")
    models_meta = {
        name: {
            "path": f"models/{name}",
            "parent": None if name == BASE_MODEL else BASE_MODEL,
            "training": _training_record([config for config, _ in stages[name]]),
            "loss_ema": results[name][-1].loss_ema,
            "train_seconds": round(sum(result.seconds for result in results[name]), 2),
            "parameters": sum(p.numel() for p in model.parameters()),
            "sha256": _sha256(temporary / "models" / name / "model.safetensors"),
            "accuracy": {task: choice_accuracy(model, tokenizer, task_items)
                         for task, task_items in items.items()},
        }
        for name, model in trained.items()
    }
    if spec.adapters:
        models_meta.update(_build_adapters(spec, trained[BASE_MODEL], tokenizer, facts, pairs, items, temporary,
                                           seed, report))
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "seed": seed,
        "base_model": BASE_MODEL,
        "models": models_meta,
        "tasks": names,
        "task_items": {task: len(task_items) for task, task_items in items.items()},
        "shape": asdict(spec.shape),
        "build_seconds": round(time.monotonic() - started, 2),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
