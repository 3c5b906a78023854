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
    return consensus_mask(weighted_deltas, method, int8_mask=int8_mask) > 0


def consensus_mask(weighted_deltas: Tensor, method: ConsensusMethod = "sum", *, int8_mask: bool = False) -> Tensor:
    """:func:`sign_consensus_mask` as 1/0 in ``weighted_deltas``' dtype, from float ops only.

    With ``s`` the elected sign (+1 or -1) per entry, an entry agrees when ``x * s > 0``:
    ``sign(max(x * s, 0))`` is 1 there and 0 (or -0) elsewhere. On CPU this is several times
    faster than comparing signs through boolean tensors, and the mask multiplies without
    torch's slow mixed-dtype path.
    """
    if method == "sum":
        votes = weighted_deltas.sum(dim=0)
    elif method == "count":
        mask_dtype = torch.int8 if int8_mask else weighted_deltas.dtype
        votes = weighted_deltas.sign().to(mask_dtype).sum(dim=0).to(weighted_deltas.dtype)
    else:
        raise ValueError(f"unknown consensus method {method!r}; known: sum, count")
    elected = torch.sign(torch.sign(votes) + 0.5)  # -1, or +1 for a positive or zero vote
    return torch.clamp_(weighted_deltas * elected, min=0).sign_()
