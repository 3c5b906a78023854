"""Log-likelihood scoring that computes each shared context once.

A multiple-choice item asks lm-eval for one ``(context, continuation)`` log-likelihood per
choice; lm-eval's ``HFLM`` runs the model over ``context + continuation`` for every one of them
(it only reuses logits when the continuations are a single token). Here requests that share a
context are grouped: the context runs once, its KV cache is copied to one row per
continuation, and only the continuation tokens run again. Groups are batched in order of
length (longest first), so padding stays small. A prefix that every context of a batch shares
(few-shot examples that the task's sampler makes identical, e.g. ``first_n``) runs once for
the batch, at least ``MIN_SHARED_PREFIX`` tokens long.

The result equals ``HFLM``'s for the same requests: the same left truncation to the model's
window, the same log-softmax over the same logits, the same greedy test (every continuation
token is the argmax). Only the batching differs, which moves log-likelihoods by float rounding.

Pure torch; the lm-eval adapter that feeds it lives in ``lm_eval_runner``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Request = tuple[Sequence[int], Sequence[int]]


@dataclass
class _Group:
    context: tuple[int, ...]
    rows: list[tuple[int, tuple[int, ...]]]  # (request index, continuation)


def truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The context ``HFLM`` keeps: ``(context + continuation)[-(max_length + 1):]`` minus the
    continuation, i.e. the context cut from the left so the model's input fits its window."""
    if not context or not continuation:
        raise ValueError("a log-likelihood request needs a non-empty context and continuation")
    if len(continuation) > max_length:
        raise ValueError(f"continuation of {len(continuation)} tokens exceeds the model's window ({max_length})")
    keep = max_length + 1 - len(continuation)
    return tuple(context[-keep:]), tuple(continuation)


def cache_argument(model) -> Optional[str]:
    """The name under which ``model``'s forward takes a KV cache (``cache`` in transformers
    >= 5.2x, ``past_key_values`` before), or None when it takes none, or no explicit positions
    and attention mask."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if not all(p in params for p in ("position_ids", "attention_mask")):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


@dataclass(frozen=True)
class _Calls:
    """How to call a model, read once per :func:`score` from its forward's signature and config."""

    cache_arg: Optional[str]  # the KV cache argument's name
    keep_last: dict  # {"logits_to_keep": 1} when the forward can skip the other positions' logits
    window: Optional[int]  # the smallest sliding attention window


def _calls(model) -> _Calls:
    try:
        takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_keep = False
    return _Calls(cache_argument(model), {"logits_to_keep": 1} if takes_keep else {}, _sliding_window(model))


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def score(
    model,
    requests: Sequence[Request],
    *,
    max_length: int,
    batch_size: int,
    device: torch.device | str,
    softmax_dtype: Optional[torch.dtype] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    on_done: Optional[Callable[[int, tuple[float, bool]], None]] = None,
) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each request's continuation given its context.

    ``batch_size`` bounds the continuation rows per forward (a group is never split, so one
    context with more continuations than that runs as a batch of its own). ``on_done(i,
    answer)`` is called as request ``i`` is scored.
    """
    groups: dict[tuple[int, ...], _Group] = {}
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = truncate(context, continuation, max_length)
        groups.setdefault(ctx, _Group(ctx, [])).rows.append((i, cont))
    # longest first, like HFLM: memory problems show at once, and lengths in a batch are close
    ordered = sorted(groups.values(), key=lambda g: (-(len(g.context) + max(len(c) for _, c in g.rows)), g.context))
    out: list[Optional[tuple[float, bool]]] = [None] * len(requests)
    calls = _calls(model)
    batch: list[_Group] = []
    rows = 0
    for group in ordered:
        if batch and rows + len(group.rows) > max(1, batch_size):
            _score_batch(model, calls, batch, out, device, softmax_dtype, autocast_dtype, on_done)
            batch, rows = [], 0
        batch.append(group)
        rows += len(group.rows)
    if batch:
        _score_batch(model, calls, batch, out, device, softmax_dtype, autocast_dtype, on_done)
    return out  # type: ignore[return-value]


# A prefix common to every context of a batch (identical few-shot examples) runs once when it is
# at least this long; shorter ones are not worth the extra forward call.
MIN_SHARED_PREFIX = 16


def _common_prefix(contexts: Sequence[tuple[int, ...]]) -> int:
    """Length of the token prefix all ``contexts`` share, leaving each at least one own token."""
    first = contexts[0]
    n = min(len(c) for c in contexts) - 1
    for c in contexts[1:]:
        k = 0
        while k < n and c[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _sliding_window(model) -> Optional[int]:
    """The smallest attention window of ``model``'s layers, None if every layer sees everything."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and not any("sliding" in str(t) for t in types):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def _score_batch(model, calls: _Calls, groups, out, device, softmax_dtype, autocast_dtype, on_done) -> None:
    device = torch.device(device)
    n_groups = len(groups)
    cache_arg = calls.cache_arg
    # A prefix every context shares runs once. Its suffixes are left-padded after it, so pads sit
    # between prefix and suffix: harmless with explicit positions and mask, except that
    # sliding-window attention counts cache slots, so there only when the window spans everything.
    shared = _common_prefix([g.context for g in groups]) if n_groups > 1 else 0
    if shared >= MIN_SHARED_PREFIX:
        window = calls.window
        longest = max(len(g.context) + max(len(c) for _, c in g.rows) for g in groups)
        if window is not None and window < longest + max(len(g.context) for g in groups):
            shared = 0
    else:
        shared = 0
    prefix_cache = None
    if shared:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            prefix = model(
                input_ids=torch.tensor([groups[0].context[:shared]], device=device),
                attention_mask=torch.ones((1, shared), dtype=torch.long, device=device),
                position_ids=torch.arange(shared, device=device).unsqueeze(0),
                use_cache=True,
                **calls.keep_last,
            )
        prefix_cache = _cache_of(prefix)
        prefix_cache.reorder_cache(torch.zeros(n_groups, dtype=torch.long, device=device))
    suffixes = [g.context[shared:] for g in groups]
    ctx_lens = torch.tensor([len(g.context) for g in groups])
    width = max(len(x) for x in suffixes)
    ids = torch.zeros((n_groups, width), dtype=torch.long)
    ctx_mask = torch.zeros((n_groups, width), dtype=torch.long)
    for g, suffix in enumerate(suffixes):
        ids[g, width - len(suffix):] = torch.tensor(suffix)
        ctx_mask[g, width - len(suffix):] = 1
    # Left padding, as in generation: every context ends at the same slot, so the distance
    # between two cache slots is the distance between the tokens (sliding-window attention
    # masks by slot), and the last slot holds each context's last token. Positions count real
    # tokens; pads take the position of the prefix's end (0 without a prefix).
    ctx_pos = shared + (ctx_mask.cumsum(dim=1) - 1).clamp(min=0)
    if shared:
        ctx_mask = torch.cat([torch.ones((n_groups, shared), dtype=torch.long), ctx_mask], dim=1)

    rows = [(i, cont) for group in groups for i, cont in group.rows]
    owner = torch.tensor([g for g, group in enumerate(groups) for _ in group.rows])
    cont_lens = torch.tensor([len(cont) for _, cont in rows])
    span = int(cont_lens.max())
    targets = torch.zeros((len(rows), span), dtype=torch.long)
    for r, (_, cont) in enumerate(rows):
        targets[r, : len(cont)] = torch.tensor(cont)
    valid = torch.arange(span).unsqueeze(0) < cont_lens.unsqueeze(1)

    # only the logits of each context's last token (the last slot) are needed from the first pass
    kwargs = dict(calls.keep_last)
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                                         enabled=autocast_dtype is not None):
        if prefix_cache is not None:
            kwargs[cache_arg] = prefix_cache
        first = model(
            input_ids=ids.to(device),
            attention_mask=ctx_mask.to(device),
            position_ids=ctx_pos.to(device),
            use_cache=span > 1 or prefix_cache is not None,
            **kwargs,
        )
        logits = first.logits[:, -1]
        logits = logits[owner.to(logits.device)].unsqueeze(1)  # [rows, 1, vocab]
        if span > 1:
            cache = _cache_of(first)
            cache.reorder_cache(owner.to(device))
            fed = targets[:, :-1]
            positions = ctx_lens[owner].unsqueeze(1) + torch.arange(span - 1).unsqueeze(0)
            second = model(
                input_ids=fed.to(device),
                attention_mask=torch.cat([ctx_mask[owner], valid[:, :-1].long()], dim=1).to(device),
                position_ids=positions.to(device),
                use_cache=False,
                **{cache_arg: cache},
            )
            logits = torch.cat([logits, second.logits.to(logits.device)], dim=1)  # [rows, span, vocab]
        logp = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
        targets = targets.to(logp.device)
        valid = valid.to(logp.device)
        token_logp = logp.gather(2, targets.unsqueeze(2)).squeeze(2).masked_fill(~valid, 0.0)
        sums = token_logp.sum(dim=1).tolist()
        greedy = ((logp.argmax(dim=-1) == targets) | ~valid).all(dim=1).tolist()
    for r, (i, _) in enumerate(rows):
        answer = (float(sums[r]), bool(greedy[r]))
        out[i] = answer
        if on_done is not None:
            on_done(i, answer)
