"""DELLA (Deep, Bhardwaj & Poria, arXiv:2406.11617): magnitude-ranked random drop (MagPrune)
with rescale, then merge.

Matches mergekit's ``della`` (TIES sign election; defaults ``normalize=True``,
``rescale=True``) and ``della_linear`` (no consensus; ``normalize=False``, ``rescale=True``),
``GeneralizedTaskArithmeticMerge`` with ``della_magprune`` sparsification (mergekit 0.1.5):
per-model ``weight``, ``density`` (default 1) and ``epsilon`` (default 0.15). Randomness
comes from ``generator``, one draw per model in order (see ``sparsify.della_magprune``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.merge.methods.generalized_task_arithmetic import generalized_task_arithmetic


def della(base: Tensor, deltas: Sequence[Tensor] | Tensor, weights: Sequence[float], densities: Sequence[float],
          epsilons: Sequence[float], *, normalize: bool = True, lambda_: float = 1.0, int8_mask: bool = False,
          rescale: bool = True, generator: torch.Generator | None = None) -> Tensor:
    return generalized_task_arithmetic(base, deltas, weights, densities, sparsification="della", consensus="sum",
                                       normalize=normalize, lambda_=lambda_, int8_mask=int8_mask, rescale=rescale,
                                       generator=generator, epsilons=epsilons)


def della_linear(base: Tensor, deltas: Sequence[Tensor] | Tensor, weights: Sequence[float],
                 densities: Sequence[float], epsilons: Sequence[float], *, normalize: bool = False,
                 lambda_: float = 1.0, rescale: bool = True, generator: torch.Generator | None = None) -> Tensor:
    return generalized_task_arithmetic(base, deltas, weights, densities, sparsification="della", consensus=None,
                                       normalize=normalize, lambda_=lambda_, rescale=rescale, generator=generator,
                                       epsilons=epsilons)
