"""Generalized task arithmetic: the shared core of task_arithmetic, ties, dare_ties, dare_linear.

Matches ``GeneralizedTaskArithmeticMerge.merge_group`` in mergekit's
``merge_methods/generalized_task_arithmetic.py`` (mergekit 0.1.5)::

    delta_i   = sparsify(x_i - base, density_i)        (magnitude | random | none)
    wd_i      = weight_i * delta_i
    mask_i    = sign(wd_i) == elected sign              (only with a consensus method)
    mixed     = sum_i wd_i [* mask_i]
    divisor   = sum_i weight_i [* mask_i]                (per entry with consensus)
    mixed    /= divisor                                  (only if normalize)
    mixed    *= lambda                                   (only if lambda != 1)
    result    = base + mixed

Divisor guards, as in mergekit: with a consensus mask an entry whose divisor is exactly
0 (no model agrees, or agreeing weights cancel) uses 1; without one, a weight sum with
``|sum| < 1e-8`` uses 1, so ``normalize`` with all-zero weights yields ``base``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from evomerge.merge.methods.consensus import ConsensusMethod, consensus_mask
from evomerge.merge.methods.sparsify import bernoulli, della_magprune, magnitude, magnitude_outliers

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della"]

WEIGHT_SUM_EPS = 1e-8
"""Without consensus, mergekit treats ``|sum of weights| < 1e-8`` as 1 when normalising."""


def stack(tensors: Sequence[Tensor] | Tensor) -> Tensor:
    """``[n, ...]`` view of already-stacked input, else ``torch.stack`` of the sequence."""
    return tensors if isinstance(tensors, Tensor) else torch.stack(list(tensors))


def generalized_task_arithmetic(
    base: Tensor,
    deltas: Sequence[Tensor] | Tensor,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    sparsification: Sparsification | None,
    consensus: ConsensusMethod | None,
    normalize: bool,
    lambda_: float,
    int8_mask: bool = False,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
) -> Tensor:
    """Merge task vectors ``deltas`` (each ``source - base``, same dtype as ``base``) into ``base``.

    ``deltas`` is a sequence of tensors or one stacked ``[n, ...]`` tensor, in the
    order mergekit would see the models (the config's ``models`` order, base excluded);
    it is never modified. ``densities`` is required with a sparsification. With no
    deltas the result is (a copy of) ``base``, as in mergekit. Random sparsification
    draws one Bernoulli mask per model, in order, from ``generator``.
    """
    n = len(deltas)
    if len(weights) != n:
        raise ValueError(f"{n} deltas but {len(weights)} weights")
    if n == 0:
        return base.clone()
    if sparsification is not None:
        if densities is None or len(densities) != n:
            raise ValueError(f"sparsification {sparsification!r} needs one density per delta")
        if sparsification == "magnitude":
            parts = [magnitude(deltas[i], densities[i], rescale=rescale) for i in range(n)]
        elif sparsification == "magnitude_outliers":
            g = list(gammas) if gammas is not None else [0.01] * n
            parts = [magnitude_outliers(deltas[i], densities[i], gamma=g[i], rescale=rescale) for i in range(n)]
        elif sparsification == "della":
            e = list(epsilons) if epsilons is not None else [0.15] * n
            parts = [della_magprune(deltas[i], densities[i], epsilon=e[i], rescale=rescale, generator=generator)
                     for i in range(n)]
        else:
            parts = [
                bernoulli(deltas[i], densities[i], rescale=rescale, generator=generator)
                for i in range(n)
            ]
        stacked = torch.stack(parts)
    else:
        stacked = stack(deltas)

    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    w = w.reshape((n,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * w

    if consensus is not None:
        mask = consensus_mask(weighted, consensus, int8_mask=int8_mask)  # 1/0 in the merge dtype
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor.masked_fill_(divisor == 0, 1)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < WEIGHT_SUM_EPS] = 1

    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)
