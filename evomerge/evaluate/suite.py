"""Suite: turns per-task lm-eval scores into one fitness (higher is better)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from evomerge.config import TaskSpec
from evomerge.errors import EvaluationError


def weighted_fitness(tasks: Sequence[TaskSpec], scores: Mapping[str, float]) -> float:
    """Weighted mean of each task's metric; raises EvaluationError on a missing or non-finite score."""
    total = 0.0
    weight = 0.0
    for t in tasks:
        if t.name not in scores:
            raise EvaluationError(f"task {t.name!r} produced no {t.metric!r} score")
        v = float(scores[t.name])
        if not math.isfinite(v):
            raise EvaluationError(f"task {t.name!r} metric {t.metric!r} is not finite: {v}")
        total += t.weight * v
        weight += t.weight
    return total / weight
