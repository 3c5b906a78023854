"""Model Stock (Jang, Yun, Han, 2024): the interpolation ratio toward the fine-tunes' average
from the angle between their task vectors.

Matches mergekit's ``model_stock`` (mergekit 0.1.5, ``merge_methods/model_stock.py``): with
N ≥ 2 fine-tuned models around the base, the mean pairwise cosine of their task vectors
(over the whole tensor, or per output row with ``filter_wise``; a 1-d tensor is one row)
gives ``t = N cos / (1 + (N - 1) cos)``, and the merge is ``t · mean(models) + (1 - t) · base``.
Where the denominator vanishes (``|1 + (N - 1) cos| < 1e-6``) the base is kept. Norms are
clamped at 1e-6, cosines to [-1, 1]; the arithmetic is in the tensors' dtype, as mergekit's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def model_stock(base: Tensor, deltas: Sequence[Tensor] | Tensor, *, filter_wise: bool = False) -> Tensor:
    """``deltas``: the task vectors (``model - base``) of the fine-tuned models."""
    count = len(deltas)
    if count < 2:
        raise ValueError(f"Model Stock needs at least two fine-tuned models besides the base, got {count}")
    models = [base + d for d in deltas]  # mergekit works from the models themselves
    w0 = base
    if filter_wise:
        if w0.dim() == 1:
            w0, models = w0.unsqueeze(0), [m.unsqueeze(0) for m in models]
    else:
        w0, models = w0.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [m - w0 for m in models]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    count * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(models) / count
    return (t * average + (1 - t) * w0).reshape(base.shape)
