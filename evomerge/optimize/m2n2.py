"""M2N2 (Model Merging of Natural Niches; Abrantes, Lange, Tang, Sakana AI, 2025) over recipe genomes.

An archive of recipes evolves by crossover alone, as in the paper:

- **Crossover with an evolving boundary.** Two archive members A and B make a child with a
  split point ``s`` over the layer groups (embeddings, each block, head) and a mixing ratio
  ``w``, both drawn afresh for every child: genes of the groups before ``s`` take
  ``w·A + (1−w)·B``, the others ``(1−w)·A + w·B``. Genes without a group (global parameters)
  go with the first part. A space without layer groups splits over its gene positions.
- **Competition for resources (fitness sharing).** Each item of the search split is a resource
  shared by the archive: member i's shared fitness is ``Σ_j s_ij / (Σ_k s_kj + ε)^α`` over
  items j, so an item that few members solve is worth more to each of them (α = 1: plain
  sharing; α = 0: the mean score).
- **Attraction.** Parent A is drawn with probability proportional to its shared fitness; B
  with probability proportional to its attraction to A, ``Σ_j c_j · max(s_Bj − s_Aj, 0)`` with
  ``c_j = 1 / (Σ_k s_kj + ε)``: a partner strong where A is weak, on scarce items.
- **Replacement.** Each child joins the archive and the member with the lowest shared fitness
  (recomputed with the child) leaves, so the archive keeps its size.

The archive starts with ``archive_size`` uniform random genomes (the paper starts from the
seed models; a recipe space has no models to start from), asked in generations of
``popsize`` like every other optimizer here. Children are told in member order, so the same
seed and the same tells give the same genomes (resume replays the ledger).

Per-item scores come with every tell (``wants_items``): the controller passes each trial's
per-item values of the search split, in a fixed order (the evaluator's leaf tasks by name,
documents in order); a failed trial has none and counts as solving nothing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from evomerge.optimize.base import BestTracker, Fitness, Genome, check_finite

EPS = 1e-9


class M2N2:
    """Ask/tell M2N2 over [0, 1]^dim; ``gene_groups`` gives each gene's layer group (-1: none)."""

    wants_items = True

    def __init__(self, dim: int, *, popsize: int, seed: int = 0, archive_size: int = 16, alpha: float = 1.0,
                 mutation: float = 0.0, gene_groups: Optional[Sequence[int]] = None) -> None:
        if dim < 1:
            raise ValueError("dim must be >= 1")
        if archive_size < 2:
            raise ValueError("archive_size must be >= 2 (crossover needs two parents)")
        self.dim = dim
        self.popsize = popsize
        self.num_objectives = 1
        self.archive_size = archive_size
        self.alpha = float(alpha)
        self.mutation = float(mutation)
        groups = np.arange(dim) if gene_groups is None else np.asarray(gene_groups, dtype=int)
        if groups.shape != (dim,):
            raise ValueError(f"gene_groups has {groups.shape[0]} entries, the genome {dim}")
        self._groups = np.where(groups < 0, 0, groups)
        self._n_groups = int(self._groups.max()) + 1
        self._rng = np.random.default_rng(seed)
        self._best = BestTracker()
        self._told = 0
        self._asked = 0
        # the archive: genomes, raw fitness, per-item values (rows), in insertion order
        self._genomes: list[np.ndarray] = []
        self._fitness: list[float] = []
        self._items: list[np.ndarray] = []
        self._n_items: Optional[int] = None

    # ------------------------------------------------------------------ ask / tell
    def ask(self) -> list[Genome]:
        out = []
        for _ in range(self.popsize):
            if self._asked < self.archive_size or len(self._genomes) < 2:
                child = self._rng.uniform(0.0, 1.0, self.dim)
            else:
                child = self._child()
            self._asked += 1
            out.append(child)
        return out

    def tell(self, genomes: Sequence[Genome], fitness: Sequence[Fitness],
             items: Optional[Sequence[Optional[Sequence[float]]]] = None) -> None:
        values = check_finite(fitness, 1)
        if items is None:
            items = [None] * len(values)
        if len(items) != len(values) or len(genomes) != len(values):
            raise ValueError("tell needs one genome, one fitness and one item vector (or None) per member")
        self._best.update(genomes, values)
        for genome, value, row in zip(genomes, values, items):
            self._admit(np.asarray(genome, dtype=np.float64), float(value), row)
        self._told += len(values)

    def best(self) -> tuple[Genome, Fitness] | None:
        return self._best.best

    def state(self) -> dict:
        return {"told": self._told, "archive": [round(f, 6) for f in self._fitness]}

    # ------------------------------------------------------------------ the algorithm
    def shared_fitness(self, scores: Optional[np.ndarray] = None) -> np.ndarray:
        """Each archive member's shared fitness (``scores``: items as columns; default the archive's)."""
        s = self._matrix() if scores is None else scores
        if s.size == 0:
            return np.zeros(len(s))
        load = s.sum(axis=0) + EPS
        return (s / load ** self.alpha).sum(axis=1)

    def attraction(self, a: int, scores: Optional[np.ndarray] = None) -> np.ndarray:
        """Every archive member's attraction to member ``a``."""
        s = self._matrix() if scores is None else scores
        scarcity = 1.0 / (s.sum(axis=0) + EPS)
        return (np.clip(s - s[a], 0.0, None) * scarcity).sum(axis=1)

    def _matrix(self) -> np.ndarray:
        return np.stack(self._items) if self._items else np.zeros((0, 0))

    def _draw(self, weights: np.ndarray, exclude: Optional[int] = None) -> int:
        w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
        if exclude is not None:
            w[exclude] = 0.0
        if not np.isfinite(w).all() or w.sum() <= 0:
            w = np.ones(len(w))
            if exclude is not None:
                w[exclude] = 0.0
        return int(self._rng.choice(len(w), p=w / w.sum()))

    def _child(self) -> np.ndarray:
        s = self._matrix()
        a = self._draw(self.shared_fitness(s))
        b = self._draw(self.attraction(a, s), exclude=a)
        split = int(self._rng.integers(0, self._n_groups + 1))
        w = float(self._rng.uniform(0.0, 1.0))
        A, B = self._genomes[a], self._genomes[b]
        first = self._groups < split
        child = np.where(first, w * A + (1 - w) * B, (1 - w) * A + w * B)
        if self.mutation > 0:
            child = child + self._rng.normal(0.0, self.mutation, self.dim)
        return np.clip(child, 0.0, 1.0)

    def _admit(self, genome: np.ndarray, fitness: float, row: Optional[Sequence[float]]) -> None:
        if row is None:
            vector = None
        else:
            vector = np.asarray(row, dtype=np.float64)
            if self._n_items is None:
                self._n_items = len(vector)
            elif len(vector) != self._n_items:
                raise ValueError(f"item vectors must all have {self._n_items} values, got {len(vector)}")
        if vector is None:  # a failed trial (or no per-item scores): it solves nothing
            vector = np.zeros(self._n_items or 0)
        if self._items and len(self._items[0]) == 0 and len(vector):
            self._items = [np.zeros(len(vector)) for _ in self._items]  # the first real vector sets the width
        self._genomes.append(genome)
        self._fitness.append(fitness)
        self._items.append(vector)
        if len(self._genomes) > self.archive_size:
            shared = self.shared_fitness()
            # the lowest shared fitness leaves; ties: the lower raw fitness, then the oldest
            worst = min(range(len(shared)), key=lambda i: (shared[i], self._fitness[i], i))
            for store in (self._genomes, self._fitness, self._items):
                del store[worst]
