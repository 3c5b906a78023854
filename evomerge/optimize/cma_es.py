"""CMA-ES through pycma (the only module that imports ``cma``), with IPOP restarts.

Bounds are handled by pycma's BoundTransform (candidates are mapped into the
box smoothly, not just clipped), the genome lives in [0, 1]^dim, and the same
seed gives the same sequence of genomes. Each instance samples from its own
``numpy.random.Generator`` (pycma's default draws from the global NumPy
stream, so several instances in one process — islands — would perturb each
other depending on the order of their asks).

``separable`` runs pycma's separable CMA-ES (``CMA_diagonal``: a diagonal covariance matrix):
its learning rates scale with the dimension instead of its square, so in a space of tens or
hundreds of dimensions and a budget of a hundred trials it adapts where full CMA-ES has barely
started, at the price of ignoring correlations between genes.

``inject``: genomes evaluated in the first generation besides the sampled ones (start recipes,
``optimizer.start_from``), at exactly these values; the first update learns from them as from
any other member.

IPOP: when a population stalls — pycma's own termination criteria fire (e.g.
tolx, tolfun, flat fitness) or the best fitness has not improved for
``stall_generations`` generations — a new CMA-ES starts from a uniformly random
point of the box (drawn from the same generator) with twice the population,
up to ``max_restarts`` times. The best over all restarts is kept.
"""

from __future__ import annotations

from typing import Sequence

import cma
import numpy as np

from evomerge.optimize.base import BestTracker, Fitness, Genome, check_finite


class CMAESOptimizer:
    """Maximises fitness with pycma's CMAEvolutionStrategy (which minimises -fitness)."""

    num_objectives = 1

    def __init__(self, dim: int, *, x0: float | np.ndarray = 0.5, sigma0: float = 1 / 6, popsize: int, seed: int = 0,
                 restarts: str = "ipop", max_restarts: int = 9, stall_generations: int = 20,
                 separable: bool = False, inject: Sequence[np.ndarray] = ()) -> None:
        if dim < 1:
            raise ValueError("dim must be >= 1")
        if restarts not in ("none", "ipop"):
            raise ValueError(f"unknown restart strategy {restarts!r}")
        self.dim = dim
        self.sigma0 = float(sigma0)
        self.restart_strategy = restarts
        self.max_restarts = max_restarts
        self.stall_generations = stall_generations
        self.separable = bool(separable)
        self._rng = np.random.default_rng(seed)
        self.restarts = 0
        self.generation = 0
        self._best = BestTracker()
        start = np.full(dim, float(x0)) if np.ndim(x0) == 0 else np.asarray(x0, dtype=np.float64)
        if start.shape != (dim,):
            raise ValueError(f"x0 has shape {start.shape}, expected ({dim},)")
        self._start(start, popsize)
        first = ([start] if np.ndim(x0) else []) + [np.asarray(g, dtype=np.float64) for g in inject]
        if len(first) > popsize:
            raise ValueError(f"{len(first)} start genomes for a population of {popsize}; raise the popsize")
        if any(g.shape != (dim,) or not np.all((g >= 0) & (g <= 1)) for g in first):
            raise ValueError(f"start genomes must lie in [0, 1]^{dim}")
        # a chosen start point (not the box centre) and the injected genomes are the first
        # generation's first members, at exactly these values (pycma takes genotypes: the inverse
        # of its bound transform, which is not the identity near the bounds)
        pad = [] if dim > 1 else [0.5]
        self._es.inject([self._es.boundary_handler.inverse(np.concatenate([g, pad])) for g in first], force=True)
        self._injected = first  # the transform's round trip is exact to ~1e-16: ask() returns these values

    def _start(self, x0: np.ndarray, popsize: int) -> None:
        self.popsize = popsize
        rng = self._rng
        options = {
            "bounds": [0.0, 1.0],
            "popsize": popsize,
            "randn": lambda *shape: rng.standard_normal(shape),
            "seed": float("nan"),  # pycma only seeds the global stream, which we do not use
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        if self.separable:  # sep-CMA-ES: a diagonal covariance, learned faster in high dimensions
            options["CMA_diagonal"] = True
        if self.dim == 1:
            x0 = np.concatenate([x0, [0.5]])  # pycma refuses 1-d problems; pad with an inert dimension
        self._es = cma.CMAEvolutionStrategy(x0, self.sigma0, options)
        self._asked: dict[bytes, np.ndarray] = {}
        self._injected: list[np.ndarray] = []
        self._run_best = -np.inf
        self._since_improvement = 0

    def ask(self) -> list[Genome]:
        out = []
        injected, self._injected = self._injected, []
        for i, x in enumerate(self._es.ask()):
            g = np.clip(np.asarray(x[: self.dim], dtype=np.float64), 0.0, 1.0)  # BoundTransform already maps in
            if i < len(injected) and np.allclose(g, injected[i], rtol=0, atol=1e-9):
                g = injected[i].copy()
            self._asked[g.tobytes()] = np.asarray(x, dtype=np.float64)
            out.append(g)
        return out

    def tell(self, genomes: Sequence[Genome], fitness: Sequence[Fitness]) -> None:
        values = check_finite(fitness, 1)
        xs = []
        for g in genomes:
            g = np.asarray(g, dtype=np.float64)
            # tell pycma the exact vector it sampled (incl. the pad dimension when dim == 1)
            xs.append(self._asked.pop(g.tobytes(), g if self.dim > 1 else np.concatenate([g, [0.5]])))
        self._es.tell(xs, [-v for v in values])
        self.generation += 1
        self._best.update(genomes, values)
        top = max(values)
        if top > self._run_best + 1e-12:
            self._run_best, self._since_improvement = top, 0
        else:
            self._since_improvement += 1
        if self.restart_strategy == "ipop" and self.restarts < self.max_restarts and self._stalled():
            self.restarts += 1
            self._start(self._rng.uniform(0.0, 1.0, self.dim), 2 * self.popsize)

    def _stalled(self) -> bool:
        return bool(self._es.stop()) or self._since_improvement >= self.stall_generations

    def best(self) -> tuple[Genome, float] | None:
        return self._best.best

    def state(self) -> dict:
        """A small JSON-able summary (generation, restarts, popsize, mean, step size) used to verify a replay."""
        return {
            "generation": int(self.generation),
            "restarts": int(self.restarts),
            "popsize": int(self.popsize),
            "mean": [float(x) for x in self._es.mean[: self.dim]],
            "sigma": float(self._es.sigma),
        }
