"""The Optimizer protocol: ask/tell over bounded genomes in [0, 1]^dim.

Fitness is *higher is better*. The controller is the only caller; failed trials
arrive here already replaced by a penalty value (see ``islands.penalized``), so
every value told is a finite float.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

Genome = np.ndarray


@runtime_checkable
class Optimizer(Protocol):
    dim: int
    popsize: int

    def ask(self) -> list[Genome]:
        """One generation of genomes to evaluate (each of shape (dim,), inside [0, 1])."""
        ...

    def tell(self, genomes: Sequence[Genome], fitness: Sequence[float]) -> None:
        """Report the fitness of a whole generation returned by ``ask``."""
        ...

    def best(self) -> tuple[Genome, float] | None:
        """Best genome told so far and its fitness."""
        ...

    def state(self) -> dict:
        """A small JSON-able summary of the internal state (e.g. generation, mean, step size).

        The controller records it with every tell and compares it when a resumed run
        replays the ledger, so a replay that diverges is detected, not silently continued.
        """
        ...
