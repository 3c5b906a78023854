"""DARE with linear (task-arithmetic) combination (Yu et al., arXiv:2311.03099).

Matches mergekit's ``dare_linear`` (``GeneralizedTaskArithmeticMerge`` with random
sparsification and no consensus; mergekit 0.1.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.merge.methods.generalized_task_arithmetic import generalized_task_arithmetic


def dare_linear(
    base: Tensor,
    deltas: Sequence[Tensor] | Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Drop each entry of ``delta_i`` with probability ``1 - density_i``, then task arithmetic.

    mergekit defaults: ``normalize=False``, ``rescale=True``, ``lambda=1``, ``density=1``;
    with ``normalize`` a weight sum below 1e-8 in magnitude is treated as 1. mergekit
    also accepts ``int8_mask`` here and ignores it. Randomness: see
    :func:`evomerge.merge.methods.sparsify.bernoulli`.
    """
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        densities,
        sparsification="random",
        consensus=None,
        normalize=normalize,
        lambda_=lambda_,
        rescale=rescale,
        generator=generator,
    )
