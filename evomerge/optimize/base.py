"""The Optimizer protocol: ask/tell over bounded genomes in [0, 1]^dim.

Fitness is *higher is better*: one float per genome, or one vector per genome
(``num_objectives`` > 1, multi-objective optimizers). The controller is the only
caller; failed trials arrive here already replaced by a penalty (see
``islands.penalized``), so every value told is finite. Every implementation
passes tests/test_optimizer_contract.py:

- ``ask()`` returns a batch (a generation) of genomes of shape (dim,) inside [0, 1];
  ``popsize`` is the size of the next batch (it may grow, e.g. on an IPOP restart);
- ``tell(genomes, fitness)`` takes back a whole batch from the last ``ask``, in order;
- the same seed and the same tells give the same genomes (resume replays the ledger
  through ask/tell and checks every genome), and ``state()`` is a small JSON-able
  summary that two equal histories share.
"""

from __future__ import annotations

from typing import Protocol, Sequence, Union, runtime_checkable

import numpy as np

Genome = np.ndarray
Fitness = Union[float, Sequence[float]]


@runtime_checkable
class Optimizer(Protocol):
    dim: int
    popsize: int
    num_objectives: int

    def ask(self) -> list[Genome]:
        """One generation of genomes to evaluate (each of shape (dim,), inside [0, 1])."""
        ...

    def tell(self, genomes: Sequence[Genome], fitness: Sequence[Fitness]) -> None:
        """Report the fitness of a whole generation returned by ``ask``."""
        ...

    def best(self) -> tuple[Genome, Fitness] | None:
        """Best genome told so far and its fitness (multi-objective: by the mean of the objectives)."""
        ...

    def state(self) -> dict:
        """A small JSON-able summary of the internal state (e.g. generation, mean, step size).

        The controller records it with every tell and compares it when a resumed run
        replays the ledger, so a replay that diverges is detected, not silently continued.
        """
        ...


def check_finite(fitness: Sequence[Fitness], num_objectives: int) -> list:
    """Validate told values: finite, and scalars or vectors of the right length."""
    out = []
    for f in fitness:
        v = np.atleast_1d(np.asarray(f, dtype=np.float64))
        if v.shape != (num_objectives,):
            raise ValueError(f"expected {num_objectives} objective value(s) per genome, got {f!r}")
        if not np.all(np.isfinite(v)):
            raise ValueError("fitness told to the optimizer must be finite (the controller applies the penalty)")
        out.append(float(v[0]) if num_objectives == 1 else [float(x) for x in v])
    return out


def scalar(f: Fitness) -> float:
    """One number for ranking: the value itself, or the mean of the objectives."""
    return float(np.mean(np.atleast_1d(np.asarray(f, dtype=np.float64))))


class BestTracker:
    """Remembers the best genome told so far (the first one on ties)."""

    def __init__(self) -> None:
        self.best: tuple[Genome, Fitness] | None = None

    def update(self, genomes: Sequence[Genome], values: Sequence[Fitness]) -> None:
        for g, v in zip(genomes, values):
            if self.best is None or scalar(v) > scalar(self.best[1]):
                self.best = (np.asarray(g, dtype=np.float64).copy(), v)
