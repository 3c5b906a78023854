"""CMA-ES through pycma (the only module that imports ``cma``).

Bounds are handled by pycma's BoundTransform (candidates are mapped into the
box smoothly, not just clipped), the genome lives in [0, 1]^dim, and the same
seed gives the same sequence of genomes. Each instance samples from its own
``numpy.random.Generator`` (pycma's default draws from the global NumPy
stream, so several instances in one process — islands — would perturb each
other depending on the order of their asks).
"""

from __future__ import annotations

from typing import Sequence

import cma
import numpy as np

from evomerge.optimize.base import Genome


class CMAESOptimizer:
    """Maximises fitness with pycma's CMAEvolutionStrategy (which minimises -fitness)."""

    def __init__(self, dim: int, *, x0: float = 0.5, sigma0: float = 1 / 6, popsize: int, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError("dim must be >= 1")
        self.dim = dim
        self.popsize = popsize
        rng = np.random.default_rng(seed)
        options = {
            "bounds": [0.0, 1.0],
            "popsize": popsize,
            "randn": lambda *shape: rng.standard_normal(shape),
            "seed": float("nan"),  # pycma only seeds the global stream, which we do not use
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        x0_vec = np.full(dim, float(x0))
        if dim == 1:
            # pycma refuses 1-d problems; pad with an inert dimension.
            x0_vec = np.full(2, float(x0))
        self._es = cma.CMAEvolutionStrategy(x0_vec, float(sigma0), options)
        self._best: tuple[Genome, float] | None = None
        self._asked: dict[bytes, np.ndarray] = {}

    def ask(self) -> list[Genome]:
        out = []
        for x in self._es.ask():
            g = np.clip(np.asarray(x[: self.dim], dtype=np.float64), 0.0, 1.0)
            self._asked[g.tobytes()] = np.asarray(x, dtype=np.float64)
            out.append(g)
        return out

    def tell(self, genomes: Sequence[Genome], fitness: Sequence[float]) -> None:
        values = [float(f) for f in fitness]
        if any(not np.isfinite(v) for v in values):
            raise ValueError("fitness told to the optimizer must be finite (the controller applies the penalty)")
        xs = []
        for g in genomes:
            g = np.asarray(g, dtype=np.float64)
            # tell pycma the exact vector it sampled (incl. the pad dimension when dim == 1)
            xs.append(self._asked.pop(g.tobytes(), g if self.dim > 1 else np.concatenate([g, [0.5]])))
        self._es.tell(xs, [-v for v in values])
        for g, v in zip(genomes, values):
            if self._best is None or v > self._best[1]:
                self._best = (np.asarray(g, dtype=np.float64).copy(), v)

    def best(self) -> tuple[Genome, float] | None:
        return self._best

    def state(self) -> dict:
        """A small JSON-able summary (generation, mean, step size) used to verify a replay."""
        return {
            "generation": int(self._es.countiter),
            "mean": [float(x) for x in self._es.mean[: self.dim]],
            "sigma": float(self._es.sigma),
        }
