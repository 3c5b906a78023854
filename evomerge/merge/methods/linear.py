"""Linear merge (weighted average of the models' tensors).

Matches ``linear_merge`` in mergekit's ``merge_methods/linear.py`` (mergekit 0.1.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def linear(
    tensors: Sequence[Tensor] | Tensor, weights: Sequence[float], *, normalize: bool = True
) -> Tensor:
    """``sum_i w_i x_i`` (divided by ``sum_i w_i`` if ``normalize``), in the inputs' dtype.

    As mergekit: accumulates in float32 (float64 for float64 inputs) with one
    ``addcmul_`` per model in order, and has **no** zero guard: ``normalize`` with weights
    summing to 0 gives inf/NaN. Linear takes no base model; a base is just one more
    weighted input when it is listed. ``tensors`` may be a sequence or a stacked
    ``[n, ...]`` tensor.
    """
    n = len(tensors)
    if n == 0:
        raise ValueError("linear merge needs at least one tensor")
    if len(weights) != n:
        raise ValueError(f"{n} tensors but {len(weights)} weights")
    first = tensors[0]
    if not first.is_floating_point():
        raise TypeError("linear merge needs floating-point tensors")
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weights), dtype=acc_dtype, device=first.device)
    result = torch.zeros_like(first, dtype=acc_dtype)
    for i in range(n):
        result.addcmul_(tensors[i], w[i])
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)
