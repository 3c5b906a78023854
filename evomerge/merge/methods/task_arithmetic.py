"""Task arithmetic (Ilharco et al., arXiv:2212.04089).

Matches mergekit's ``task_arithmetic`` (a ``GeneralizedTaskArithmeticMerge`` with no
sparsification and no consensus; mergekit 0.1.5).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from evomerge.merge.methods.generalized_task_arithmetic import generalized_task_arithmetic


def task_arithmetic(
    base: Tensor,
    deltas: Sequence[Tensor] | Tensor,
    weights: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """``base + lambda * sum_i w_i delta_i`` (divided by ``sum_i w_i`` if ``normalize``).

    mergekit defaults: ``normalize=False``, ``lambda=1``. With ``normalize`` a weight sum
    of magnitude below 1e-8 is treated as 1. mergekit also accepts ``density``,
    ``rescale`` and ``int8_mask`` for this method and ignores them.
    """
    return generalized_task_arithmetic(
        base, deltas, weights, sparsification=None, consensus=None, normalize=normalize, lambda_=lambda_
    )
