"""A merge of LoRA sources written back as one PEFT LoRA adapter.

Linear (normalised) and task arithmetic are linear in the deltas, so their merge of LoRA
sources *is* a LoRA adapter: per tensor, the concatenated factors ``[c_1 s_1 B_1 | ... ]`` and
``[A_1; ...]`` (rank ``sum_i r_i``), exact up to float rounding. Every other method (TIES, DARE,
DELLA, breadcrumbs, SLERP, model stock, linear without normalising) changes the weights by
something that is no low-rank sum: its adapter is a truncated SVD of each changed tensor's delta,
at the rank the listed adapters have there together (or ``rank``), and says how far it is from the
merge (relative Frobenius error per tensor and over all). Tensors that change but are no matrix
(norms, biases: only when full models are among the sources) cannot be in an adapter; they are
listed as left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from evomerge.adapters import LowRank
from evomerge.errors import MergeError
from evomerge.merge.low_rank import BASE, LOW_RANK_METHODS, concatenate, delta_coefficients
from evomerge.recipe import Recipe


@dataclass
class MergedAdapter:
    """The factors (``{base tensor name: LowRank}``) and how well they hold the merge."""

    factors: dict[str, LowRank]
    exact: bool
    how: str
    errors: dict[str, float] = field(default_factory=dict)
    """relative Frobenius error of each approximated tensor's delta (SVD only)"""
    total_error: float = 0.0
    """relative Frobenius error over every changed tensor together, left-out ones included"""
    left_out: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()


def merged_adapter(sources, recipe: Recipe, rank: Optional[int] = None) -> MergedAdapter:
    """The merge of ``recipe`` over ``sources`` (a :class:`~evomerge.merge.backend.ResidentSources`
    with LoRA sources) as one adapter; see the module docstring."""
    if not sources.adapters:
        raise MergeError("no source of this merge is a LoRA adapter: export the full model (--format hf)")
    plan = sources.plan(recipe)
    embeds = tuple(sources.arch.embed_prefixes)
    embeddings = []
    entries = {key: [BASE if r is None else sources.rows(key)[r] for r in plan.delta_rows]
               for key in plan.tensor_params}
    coefficients: dict[str, Optional[list[float]]] = {}
    if rank is None and not any(isinstance(e, Tensor) for es in entries.values() for e in es):
        coefficients = {key: delta_coefficients(plan.method.name, *plan.tensor_params[key]) for key in entries}
    exact = bool(coefficients) and all(c is not None for c in coefficients.values())
    factors: dict[str, LowRank] = {}
    if exact:
        for key, es in entries.items():
            used = [(e, c) for e, c in zip(es, coefficients[key], strict=True) if isinstance(e, LowRank)]
            if not used:
                continue
            factors[key] = concatenate([e for e, _ in used], [c for _, c in used])
            if key.startswith(embeds):
                embeddings.append(key)
        return MergedAdapter(factors, True, f"{plan.method.name}: concatenated factors (exact)",
                             embeddings=tuple(embeddings))
    merged = sources.merged_state_dict(recipe)
    errors: dict[str, float] = {}
    left_out = []
    changed_sq = missed_sq = 0.0
    for key, es in entries.items():
        base = sources.base_tensor(key)
        delta = (merged[key] - base).to(torch.float32)
        norm_sq = float(delta.pow(2).sum())
        if norm_sq == 0.0:
            continue
        changed_sq += norm_sq
        if delta.dim() != 2:
            left_out.append(key)
            missed_sq += norm_sq
            continue
        embedding = key.startswith(embeds)
        transpose = embedding or any(isinstance(e, LowRank) and e.transpose for e in es)
        k = rank or sum(e.rank for e in es if isinstance(e, LowRank)) or min(delta.shape)
        matrix = delta.T if transpose else delta  # [out, in] as PEFT's B @ A
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        k = min(k, S.numel())
        B = (U[:, :k] * S[:k]).to(base.dtype)
        A = Vh[:k].to(base.dtype)
        factor = LowRank(B=B.contiguous(), A=A.contiguous(), scaling=1.0, transpose=transpose)
        miss = float((factor.dense().to(torch.float32) - delta).pow(2).sum())
        errors[key] = math.sqrt(miss / norm_sq)
        missed_sq += miss
        factors[key] = factor
        if embedding:
            embeddings.append(key)
    total = math.sqrt(missed_sq / changed_sq) if changed_sq else 0.0
    if plan.method.name not in LOW_RANK_METHODS:
        why = f"{plan.method.name} is no low-rank sum of the adapters"
    elif rank is not None:
        why = f"rank {rank} asked for"
    else:
        why = "the merge scales the base itself (linear without normalize), or a full model is among the sources"
    return MergedAdapter(factors, False, f"truncated SVD per tensor ({why})", errors, total, tuple(left_out),
                         tuple(embeddings))
