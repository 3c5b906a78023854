"""Uniform random search: the baseline every other optimizer must beat at equal budget."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from evomerge.optimize.base import BestTracker, Fitness, Genome, check_finite


class RandomSearch:
    """Draws batches of ``popsize`` genomes uniformly from [0, 1]^dim; tells only update the best."""

    def __init__(self, dim: int, *, popsize: int, seed: int = 0, num_objectives: int = 1) -> None:
        if dim < 1:
            raise ValueError("dim must be >= 1")
        self.dim = dim
        self.popsize = popsize
        self.num_objectives = num_objectives
        self._rng = np.random.default_rng(seed)
        self._best = BestTracker()
        self._told = 0

    def ask(self) -> list[Genome]:
        return [self._rng.uniform(0.0, 1.0, self.dim) for _ in range(self.popsize)]

    def tell(self, genomes: Sequence[Genome], fitness: Sequence[Fitness]) -> None:
        values = check_finite(fitness, self.num_objectives)
        self._best.update(genomes, values)
        self._told += len(values)

    def best(self) -> tuple[Genome, Fitness] | None:
        return self._best.best

    def state(self) -> dict:
        return {"told": self._told}
