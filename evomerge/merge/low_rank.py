"""Merging deltas held as LoRA factors: linear and task arithmetic in low rank, the rest densified.

A LoRA source's delta of one tensor is ``T(B @ A) * s`` (:class:`evomerge.adapters.LowRank`);
a tensor it does not adapt has a zero delta. Linear and task arithmetic are linear in the
deltas, so their sum is one product of concatenated factors::

    sum_i c_i * s_i * T(B_i @ A_i) = T([c_1 s_1 B_1 | ... | c_n s_n B_n] @ [A_1; ...; A_n])

(one matrix product of inner size ``sum_i r_i``, instead of ``n`` full-size task vectors). Every
other method sees the densified deltas of the adapted tensors (:func:`dense_rows`), and a tensor
no source adapts is the base's own for the methods whose result with all-zero deltas is the base
(:data:`ZERO_DELTAS_GIVE_BASE`). Each path equals the same method on the full models PEFT's
``merge_and_unload`` writes, up to the rounding of a different summation order (bit for bit where
the arithmetic is exact; tested both ways in ``tests/test_adapters.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from evomerge.adapters import LowRank
from evomerge.merge.methods.generalized_task_arithmetic import WEIGHT_SUM_EPS


class _Base:
    """The base model listed as an input (linear only: methods with a base drop it)."""

    def __repr__(self) -> str:
        return "BASE"


BASE = _Base()
Entry = Union[Tensor, LowRank, None, _Base]
"""One input of a tensor's merge: a dense delta, LoRA factors, ``None`` (a zero delta: the source
does not adapt this tensor) or :data:`BASE`."""

ZERO_DELTAS_GIVE_BASE = frozenset({"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                   "breadcrumbs_ties", "della", "della_linear"})
"""Methods whose result is exactly the base when every delta is zero (``base + 0``): sparsifying
zero keeps zero, and every weighting of zeros is zero. Linear (``sum w x / sum w``), SLERP and
model stock compute even then, so they see zero deltas."""

LOW_RANK_METHODS = frozenset({"linear", "task_arithmetic"})


def concatenate(factors: Sequence[LowRank], coefficients: Sequence[float]) -> LowRank:
    """``sum_i c_i * T(B_i @ A_i) * s_i`` as one factor pair, ``[c_1 s_1 B_1 | ...]`` and
    ``[A_1; ...]`` (rank ``sum_i r_i``, scaling 1)."""
    transpose = factors[0].transpose
    if any(f.transpose != transpose for f in factors):
        raise ValueError("factors of one tensor disagree on its layout (fan_in_fan_out)")
    B = torch.cat([f.B * (c * f.scaling) for f, c in zip(factors, coefficients, strict=True)], dim=1)
    return LowRank(B=B, A=torch.cat([f.A for f in factors], dim=0), scaling=1.0, transpose=transpose)


def add_combined(base: Tensor, factors: Sequence[LowRank], coefficients: Sequence[float]) -> Tensor:
    """``base + sum_i c_i * T(B_i @ A_i) * s_i`` in one fused ``addmm`` (one pass over the weight)."""
    joint = concatenate(factors, coefficients)
    if joint.transpose:
        return torch.addmm(base, joint.A.T, joint.B.T)  # (B @ A).T = A.T @ B.T
    return torch.addmm(base, joint.B, joint.A)


def delta_coefficients(method: str, params: Sequence[Mapping[str, float | bool]],
                       global_params: Mapping[str, float | bool]) -> Optional[list[float]]:
    """Per input, ``c_i`` with the merge ``= base + sum_i c_i delta_i`` exactly: task arithmetic
    (``lambda * w_i``, divided by ``sum w`` when normalising; a sum under 1e-8 counts as 1, as in
    :mod:`~evomerge.merge.methods.generalized_task_arithmetic`) and normalised linear (``w_i / sum w``);
    None for the methods whose merge is no such sum."""
    weights = [float(p["weight"]) for p in params]
    if method == "task_arithmetic":
        divisor = sum(weights) if global_params.get("normalize") else 1.0
        scale = float(global_params.get("lambda", 1.0)) / (1.0 if abs(divisor) < WEIGHT_SUM_EPS else divisor)
        return [w * scale for w in weights]
    if method == "linear" and global_params.get("normalize", True):
        total = sum(weights)
        return [w / total for w in weights]
    return None


def low_rank_merge(method: str, base: Tensor, entries: Sequence[Entry],
                   params: Sequence[Mapping[str, float | bool]],
                   global_params: Mapping[str, float | bool]) -> Optional[Tensor]:
    """Linear or task arithmetic over ``entries`` (none dense) without a full-size delta per source;
    None for another method, or when an entry is dense. May return ``base`` itself (no listed
    adapter touches the tensor): the caller copies it where it must not alias. ``params[i]``/``global_params``: the
    resolved parameters of entry i and of the method (see :func:`evomerge.merge.parameter_space.merge_tensor`).

    The formulas are the methods' own (:mod:`evomerge.merge.methods.linear`,
    :mod:`evomerge.merge.methods.task_arithmetic`), with ``sum_i w_i delta_i`` formed in low rank.
    """
    if method not in LOW_RANK_METHODS or any(isinstance(e, Tensor) for e in entries):
        return None
    if method == "task_arithmetic":
        used = [(e, c) for e, c in zip(entries, delta_coefficients(method, params, global_params), strict=True)
                if isinstance(e, LowRank)]
        if not used:
            return base
        return add_combined(base, [e for e, _ in used], [c for _, c in used])
    weights = [float(p["weight"]) for p in params]
    factors = [(e, w) for e, w in zip(entries, weights, strict=True) if isinstance(e, LowRank)]
    # linear: sum_i w_i (base + delta_i) = (sum_i w_i) base + sum_i w_i delta_i, accumulated in float32
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    total = sum(weights)
    result = base.to(acc) * total
    if factors:
        result += concatenate([f.to(base.device, acc) for f, _ in factors], [w for _, w in factors]).dense()
    if global_params.get("normalize", True):
        result /= total
    return result.to(base.dtype)


def dense_rows(base: Tensor, entries: Sequence[Entry]) -> list[Optional[Tensor]]:
    """The entries as :func:`~evomerge.merge.parameter_space.merge_tensor` takes them: dense deltas
    (zeros for a source that does not adapt the tensor), ``None`` for the base."""
    out: list[Optional[Tensor]] = []
    for e in entries:
        if e is BASE:
            out.append(None)
        elif e is None:
            out.append(torch.zeros_like(base))
        elif isinstance(e, LowRank):
            out.append(e.dense().to(base.dtype))
        else:
            out.append(e)
    return out
