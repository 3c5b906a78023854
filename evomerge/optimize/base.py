"""The Optimizer protocol: ask/tell over bounded genomes in [0, 1]^dim.

Fitness is *higher is better*. The controller is the only caller; failed trials
arrive here already replaced by a penalty value (see ``controller.penalty``), so
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
