"""Model Breadcrumbs (Davari & Belilovsky, arXiv:2312.06795): drop the largest-magnitude
outliers and the smallest entries of each task vector, then merge.

Matches mergekit's ``breadcrumbs`` (no consensus) and ``breadcrumbs_ties`` (TIES sign
election), both ``GeneralizedTaskArithmeticMerge`` with ``magnitude_outliers``
sparsification (mergekit 0.1.5): per-model ``weight``, ``density`` (default 1) and ``gamma``
(default 0.01); defaults ``normalize=False``, ``rescale=False``, ``lambda=1``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from evomerge.merge.methods.generalized_task_arithmetic import generalized_task_arithmetic


def breadcrumbs(base: Tensor, deltas: Sequence[Tensor] | Tensor, weights: Sequence[float],
                densities: Sequence[float], gammas: Sequence[float], *, normalize: bool = False,
                lambda_: float = 1.0, rescale: bool = False) -> Tensor:
    return generalized_task_arithmetic(base, deltas, weights, densities, sparsification="magnitude_outliers",
                                       consensus=None, normalize=normalize, lambda_=lambda_, rescale=rescale,
                                       gammas=gammas)


def breadcrumbs_ties(base: Tensor, deltas: Sequence[Tensor] | Tensor, weights: Sequence[float],
                     densities: Sequence[float], gammas: Sequence[float], *, normalize: bool = False,
                     lambda_: float = 1.0, int8_mask: bool = False, rescale: bool = False) -> Tensor:
    return generalized_task_arithmetic(base, deltas, weights, densities, sparsification="magnitude_outliers",
                                       consensus="sum", normalize=normalize, lambda_=lambda_, int8_mask=int8_mask,
                                       rescale=rescale, gammas=gammas)
