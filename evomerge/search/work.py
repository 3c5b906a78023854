"""A request in flight and what it is for; a result made consistent; the keys scores are cached by."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from evomerge.fitness_cache import recipe_key, source_key
from evomerge.islands import Candidate
from evomerge.run_dir import pack_values
from evomerge.selection import task_values
from evomerge.worker import EvalRequest, EvalResult


def failure_reason(error: Optional[str]) -> str:
    """A failed trial's reason as one short line (the first line of its error), for counting."""
    lines = (error or "").strip().splitlines()
    text = lines[0] if lines else "failed without a reason"
    return text if len(text) <= 200 else text[:197] + "..."


def normalized(res: EvalResult) -> EvalResult:
    """A "complete" result must carry a finite fitness; anything else is a failure with a reason."""
    if res.state == "complete" and (res.fitness is None or not math.isfinite(res.fitness)):
        res.state, res.error, res.fitness = "failed", f"fitness is not finite: {res.fitness}", None
    if res.state != "complete":
        res.fitness = None
        res.error = res.error or "failed without a reason"
    return res


def packed_task_items(res: EvalResult) -> dict[str, Any]:
    """A result's per-item values by suite task, packed as the ledger keeps them."""
    return {task: pack_values(v) for task, v in task_values(res.items).items()}


def cache_key(work: "Work") -> tuple[str, str]:
    """(what was scored, split): a recipe by its content hash, a source by its name."""
    if work.request.recipe is not None:
        return recipe_key(work.recipe_hash or work.candidate.recipe.content_hash()), work.request.split
    return source_key(work.request.source), work.request.split


@dataclass
class Work:
    """A request in flight and what it is for."""

    kind: str  # "trial" | "baseline" | "test"
    request: EvalRequest
    candidate: Optional[Candidate] = None
    label: str = ""
    recipe_hash: Optional[str] = None
