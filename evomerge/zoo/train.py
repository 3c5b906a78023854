"""Training loops for the zoo's base model and its two experts.

AdamW (0.9, 0.98), no weight decay, linear warm-up then cosine decay to 10 % of the peak
learning rate, gradient clipping at 1.0. Embeddings and lm_head ("the vocabulary rows") can get
their own learning rate or be frozen; the rest of the model ("the body") has another.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import LlamaForCausalLM

from evomerge.zoo.corpus import ColourFacts, Problem, pack_problems, pack_text

IGNORE_INDEX = -100

# One training sequence: the words after `<bos>` and which of them carry a loss.
TrainingSequence = tuple[list[str], list[bool]]
# Makes one training sequence of the given number of words.
SequenceMaker = Callable[[random.Random, int], TrainingSequence]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class StageConfig:
    """Hyper-parameters of one training stage.

    `vocab_lr` is the learning rate of the embeddings and lm_head: None shares `body_lr`,
    0.0 freezes them. `blocks` are the transformer blocks trained (0-based); None trains
    every block and the final norm, a tuple freezes the other blocks and the final norm, so
    the stage's changes are confined to those layers.
    """

    steps: int
    body_lr: float
    vocab_lr: float | None = None
    warmup: int = 50
    min_lr_ratio: float = 0.1
    batch_size: int = 32
    seq_len: int = 32
    grad_clip: float = 1.0
    blocks: tuple[int, ...] | None = None

    @property
    def freezes_vocab(self) -> bool:
        """Whether the embeddings and lm_head stay fixed."""
        return self.vocab_lr == 0.0


@dataclass(frozen=True)
class StageResult:
    """What a stage reports for the manifest; `loss_ema` is the loss averaged over the last
    steps (exponential moving average, weight 0.1 per step)."""

    steps: int
    loss_ema: float
    seconds: float


def text_maker(facts: ColourFacts, l2_fraction: float, wrong_facts: float = 0.0) -> SequenceMaker:
    """Sequences of packed text, L2 with probability `l2_fraction`, loss on every word;
    `wrong_facts` of the sentences state a wrong single-digit result (see `pack_text`)."""

    def make(rng: random.Random, length: int) -> TrainingSequence:
        language = "l2" if rng.random() < l2_fraction else "l1"
        return pack_text(rng, facts, language, length, wrong_facts), [True] * length

    return make


def skill_maker(
    facts: ColourFacts, problems: list[Problem], problem_fraction: float
) -> SequenceMaker:
    """L1 solved problems (loss on answers only) with probability `problem_fraction`,
    else L1 text."""

    def make(rng: random.Random, length: int) -> TrainingSequence:
        if rng.random() < problem_fraction:
            return pack_problems(rng, problems, "l1", length)
        return pack_text(rng, facts, "l1", length), [True] * length

    return make


def make_batch(
    rng: random.Random,
    make: SequenceMaker,
    config: StageConfig,
    token_ids: dict[str, int],
    bos_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids `<bos> words...` and labels (IGNORE_INDEX where no loss), both (B, L)."""
    ids, labels = [], []
    for _ in range(config.batch_size):
        words, mask = make(rng, config.seq_len - 1)
        row = [token_ids[word] for word in words]
        ids.append([bos_id, *row])
        targets = [t if trained else IGNORE_INDEX for t, trained in zip(row, mask, strict=True)]
        labels.append([IGNORE_INDEX, *targets])
    return torch.tensor(ids), torch.tensor(labels)


def lr_factor(step: int, config: StageConfig) -> float:
    """Multiplier of the peak learning rate at `step` (0-based)."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * (step - config.warmup) / span))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def _vocab_parameters(model: LlamaForCausalLM) -> list[torch.nn.Parameter]:
    return [model.get_input_embeddings().weight, model.get_output_embeddings().weight]


def make_optimizer(model: LlamaForCausalLM, config: StageConfig) -> torch.optim.AdamW:
    """AdamW over the body and (unless frozen) the vocabulary rows, each at its own lr."""
    vocab = _vocab_parameters(model)
    vocab_ids = {id(p) for p in vocab}
    body = [p for p in model.parameters() if id(p) not in vocab_ids and p.requires_grad]
    groups = [{"params": body, "lr": config.body_lr}]
    if not config.freezes_vocab:
        vocab_lr = config.body_lr if config.vocab_lr is None else config.vocab_lr
        groups.append({"params": vocab, "lr": vocab_lr})
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0, fused=True)


def _set_trainable_blocks(model: LlamaForCausalLM, blocks: tuple[int, ...] | None) -> None:
    """Freeze every block not in `blocks`, and the final norm unless `blocks` is None."""
    layers = model.model.layers
    unknown = sorted(set(blocks or ()) - set(range(len(layers))))
    if unknown:
        raise ValueError(f"blocks {unknown} do not exist in a model of {len(layers)} blocks")
    for index, layer in enumerate(layers):
        for parameter in layer.parameters():
            parameter.requires_grad_(blocks is None or index in blocks)
    for parameter in model.model.norm.parameters():
        parameter.requires_grad_(blocks is None)


def lm_loss(model: LlamaForCausalLM, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def train_stage(
    name: str,
    model: LlamaForCausalLM,
    config: StageConfig,
    make: SequenceMaker,
    rng: random.Random,
    token_ids: dict[str, int],
    bos_id: int,
    progress: Progress,
    report_every_s: float = 3.0,
) -> StageResult:
    """Train `model` in place for `config.steps` steps on sequences from `make`."""
    for parameter in _vocab_parameters(model):
        parameter.requires_grad_(not config.freezes_vocab)
    _set_trainable_blocks(model, config.blocks)
    optimizer = make_optimizer(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = run_steps(name, model, optimizer, trainable, config, make, rng, token_ids, bos_id, progress,
                       report_every_s)
    _set_trainable_blocks(model, None)
    for parameter in _vocab_parameters(model):
        parameter.requires_grad_(True)
    return result


def run_steps(
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    config: StageConfig,
    make: SequenceMaker,
    rng: random.Random,
    token_ids: dict[str, int],
    bos_id: int,
    progress: Progress,
    report_every_s: float = 3.0,
) -> StageResult:
    """`config.steps` steps of `optimizer` on `trainable` (warm-up and cosine schedule, clipping),
    then `model` in eval mode; shared by the full-model stages and the LoRA adapters."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    model.train()
    start = last_report = time.monotonic()
    smoothed = float("nan")
    for step in range(1, config.steps + 1):
        ids, labels = make_batch(rng, make, config, token_ids, bos_id)
        loss = lm_loss(model, ids, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        scheduler.step()
        value = loss.item()
        smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
        now = time.monotonic()
        if now - last_report >= report_every_s or step == config.steps:
            progress(f"training {name}: step {step}/{config.steps} loss {smoothed:.3f}")
            last_report = now
    model.eval()
    return StageResult(config.steps, smoothed, time.monotonic() - start)
