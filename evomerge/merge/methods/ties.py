"""TIES merging (Yadav et al., arXiv:2306.01708): trim by magnitude, elect sign, disjoint merge.

Matches mergekit's ``ties`` (``GeneralizedTaskArithmeticMerge`` with magnitude
sparsification and ``sum`` consensus; mergekit 0.1.5).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from evomerge.merge.methods.generalized_task_arithmetic import generalized_task_arithmetic


def ties(
    base: Tensor,
    deltas: Sequence[Tensor] | Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    rescale: bool = False,
) -> Tensor:
    """Keep the top ``density_i`` fraction of each ``|delta_i|``, elect signs, merge.

    mergekit defaults: ``normalize=True`` (per entry, divide by the summed weights of the
    models that agree with the elected sign), ``rescale=False``, ``lambda=1``,
    ``density=1``. Trimming keeps ``max(1, int(density * numel))`` entries (none for
    density <= 0); see :mod:`evomerge.merge.methods.sparsify` for ties at the threshold.
    """
    return generalized_task_arithmetic(
        base,
        deltas,
        weights,
        densities,
        sparsification="magnitude",
        consensus="sum",
        normalize=normalize,
        lambda_=lambda_,
        int8_mask=int8_mask,
        rescale=rescale,
    )
