"""DARE-TIES (Yu et al., arXiv:2311.03099): random drop + rescale, then TIES sign election.

Matches mergekit's ``dare_ties`` (``GeneralizedTaskArithmeticMerge`` with random
sparsification and ``sum`` consensus; mergekit 0.1.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.merge.methods.generalized_task_arithmetic import generalized_task_arithmetic


def dare_ties(
    base: Tensor,
    deltas: Sequence[Tensor] | Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Drop each entry of ``delta_i`` with probability ``1 - density_i``, elect signs, merge.

    mergekit defaults: ``normalize=False`` (unlike ``ties``), ``rescale=True`` (L1 norm of
    each delta restored after the drop), ``lambda=1``, ``density=1``. Randomness comes
    from ``generator`` (one Bernoulli draw per model, in order); see
    :func:`evomerge.merge.methods.sparsify.bernoulli` for how that relates to mergekit's
    global RNG.
    """
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        densities,
        sparsification="random",
        consensus="sum",
        normalize=normalize,
        lambda_=lambda_,
        int8_mask=int8_mask,
        rescale=rescale,
        generator=generator,
    )
