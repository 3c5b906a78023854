"""Multiple-choice accuracy by a bare batched forward pass (no lm-eval).

Used to record each zoo model's accuracy in the manifest at build time; it scores exactly what
the lm-eval tasks score: `<bos>` + question words as context, the choice words as continuation,
summed log-likelihood, argmax (first on ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _sequences(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[dict[str, Any]]
) -> tuple[list[list[int]], list[int]]:
    """Token ids of every (item, choice) and the length of its context."""
    sequences: list[list[int]] = []
    context_lengths: list[int] = []
    for item in items:
        context = tokenizer.encode(item["question"], add_special_tokens=True)
        for choice in item["choices"]:
            continuation = tokenizer.encode(choice, add_special_tokens=False)
            sequences.append(context + continuation)
            context_lengths.append(len(context))
    return sequences, context_lengths


@torch.inference_mode()
def choice_loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[dict[str, Any]],
    batch_size: int = 1024,
) -> torch.Tensor:
    """Summed log-likelihood of each choice's words, shape (len(items), n_choices)."""
    sequences, context_lengths = _sequences(tokenizer, items)
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    scores: list[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(sequence) for sequence in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        target_mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (sequence, context_length) in enumerate(
            zip(batch, context_lengths[start:start + batch_size], strict=True)
        ):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            target_mask[row, context_length : len(sequence)] = True
        ids = ids.to(device)
        # Right padding needs no attention mask: causal attention never looks ahead.
        logprobs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        token_logprobs = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        scores.append((token_logprobs * target_mask[:, 1:].to(device)).sum(dim=1).cpu())
    n_choices = len(items[0]["choices"])
    return torch.cat(scores).view(len(items), n_choices)


def choice_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[dict[str, Any]],
) -> float:
    """Fraction of items whose correct choice has the highest log-likelihood."""
    predictions = choice_loglikelihoods(model, tokenizer, items).argmax(dim=1)
    labels = torch.tensor([item["label"] for item in items])
    return int((predictions == labels).sum()) / len(items)
