"""SLERP: spherical interpolation between the base model and one other model.

Matches mergekit's ``slerp`` (mergekit 0.1.5, ``merge_methods/slerp.py``): a required global
``t`` (0 = the base, 1 = the other model); each tensor pair is treated as two flat vectors
with one angle between them (mergekit's batched kernel keeps a leading axis for the batch
of tensors, one row per tensor); (anti)collinear pairs (``|cos| > 0.9995``) are interpolated
linearly. Work in float32 (float64 inputs stay float64), a zero-norm vector counts as norm 1,
and the result takes the base's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(base: Tensor, deltas: Sequence[Tensor] | Tensor, *, t: float) -> Tensor:
    """``deltas[0]`` is the other model's task vector (``other - base``)."""
    if len(deltas) != 1:
        raise ValueError(f"SLERP merges the base with exactly one other model, got {len(deltas)}")
    if not base.is_floating_point():
        raise TypeError("SLERP needs floating-point tensors")
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a = base.reshape(1, -1).to(dtype)
    b = (a + deltas[0].reshape(a.shape).to(dtype))
    if a.shape[1] == 0:
        return ((1 - t) * a + t * b).reshape(base.shape).to(base.dtype)
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(base.shape).to(base.dtype)
