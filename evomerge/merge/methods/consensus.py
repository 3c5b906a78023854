"""TIES sign election.

Matches ``get_mask`` in mergekit's ``merge_methods/generalized_task_arithmetic.py``
(mergekit 0.1.5), with its two consensus methods ``sum`` and ``count``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ConsensusMethod = Literal["sum", "count"]


def sign_consensus_mask(
    weighted_deltas: Tensor, method: ConsensusMethod = "sum", *, int8_mask: bool = False
) -> Tensor:
    """Boolean mask ``[n, ...]``: which (weighted) task-vector entries agree with the elected sign.

    ``weighted_deltas`` is stacked ``[n, ...]`` and already multiplied by the model
    weights (so a negative weight flips the vote). Per entry the elected sign is

    - ``sum``   (TIES paper): the sign of ``sum_i weighted_deltas[i]``;
    - ``count``: the sign of ``sum_i sign(weighted_deltas[i])`` (one vote per model);

    with ties (a zero sum) elected **positive**. An entry is in the mask when its sign
    equals the elected sign, so zero entries (trimmed or dropped) are never in it and do
    not count in TIES normalisation. ``int8_mask`` only changes the dtype of the
    intermediate sign tensors (mergekit's memory option); the result is identical.
    """
    mask_dtype = torch.int8 if int8_mask else weighted_deltas.dtype
    sign = weighted_deltas.sign().to(mask_dtype)
    if method == "sum":
        votes = weighted_deltas.sum(dim=0)
    elif method == "count":
        votes = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown consensus method {method!r}; known: sum, count")
    majority = (votes >= 0).to(mask_dtype) * 2 - 1
    return sign == majority
