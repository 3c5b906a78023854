"""Genome <-> DFS recipe codec (the paper's indicator array + scaling matrix).

Layout: ``T = M * r`` indicator genes (position t stands for layer ``t mod M`` of the
concatenated donors, in donor order), then — with scaling — the ``M x M`` matrix W,
row-major (W[i, j] scales the hidden state passed from layer i to layer j).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from evomerge.recipe import DFSRecipe, PathStep, Recipe
from evomerge.space.schema import DataFlowSpace


@dataclass(frozen=True)
class DFSCodec:
    """Maps genomes in [0, 1]^dim to DFS recipes."""

    space: DataFlowSpace
    donors: tuple[str, ...]  # layer donors, in order (sources, then the PS donor if any)
    layers_per_donor: tuple[int, ...]
    embed_from: str
    donor_recipes: Optional[dict[str, Recipe]] = None
    dtype: str = "float32"  # the dtype paths are searched in (the run's dispatch.dtype)

    @property
    def total_layers(self) -> int:
        return sum(self.layers_per_donor)

    @property
    def path_genes(self) -> int:
        return self.total_layers * self.space.repetitions

    @property
    def dim(self) -> int:
        m = self.total_layers
        return self.path_genes + (m * m if self.space.scaling else 0)

    def layer(self, index: int) -> tuple[str, int]:
        """Global layer index (0..M-1) -> (donor, layer within it)."""
        for donor, n in zip(self.donors, self.layers_per_donor):
            if index < n:
                return donor, index
            index -= n
        raise IndexError(index)

    @property
    def names(self) -> tuple[str, ...]:
        m = self.total_layers
        labels = [f"{d}.{i}" for d, n in zip(self.donors, self.layers_per_donor) for i in range(n)]
        out = [f"path[{t}]:{labels[t % m]}" for t in range(self.path_genes)]
        if self.space.scaling:
            out += [f"W[{labels[i]}->{labels[j]}]" for i in range(m) for j in range(m)]
        return tuple(out)

    def path(self, genome: Sequence[float]) -> list[int]:
        """Global layer indices on the path, in order (indicator = gene - 0.5 > 0)."""
        g = np.asarray(genome, dtype=np.float64)
        if g.shape != (self.dim,):
            raise ValueError(f"genome has shape {g.shape}, expected ({self.dim},)")
        m = self.total_layers
        on = [t % m for t in range(self.path_genes) if g[t] - 0.5 > 0]
        if self.space.max_path_length is not None:
            on = on[: self.space.max_path_length]
        return on

    START_MARGIN = 0.25
    """How far from 0.5 the start puts an indicator gene: at sigma0 = 1/6 a gene flips in about
    7 % of the first generation's samples."""

    def start_genome(self) -> Optional[np.ndarray]:
        """The optimizer's start for ``space.start``: ``None`` for the centre; for ``embed_from``
        the genome whose path is the embed_from donor's layers in order, each scale 1."""
        if self.space.start == "centre":
            return None
        if self.embed_from not in self.donors:
            raise ValueError(f"start: embed_from needs {self.embed_from!r} among the layer donors "
                             f"{list(self.donors)}")
        g = np.full(self.dim, 0.5 - self.START_MARGIN)
        first = self.donors.index(self.embed_from)
        offset = sum(self.layers_per_donor[:first])
        g[offset: offset + self.layers_per_donor[first]] = 0.5 + self.START_MARGIN
        if self.space.scaling:
            low, high = self.space.scale.low, self.space.scale.high
            g[self.path_genes:] = min(1.0, max(0.0, (1.0 - low) / (high - low)))
        return g

    def decode(self, genome: Sequence[float]) -> DFSRecipe:
        g = np.clip(np.asarray(genome, dtype=np.float64), 0.0, 1.0)
        path = self.path(g)
        m = self.total_layers
        w = g[self.path_genes:].reshape(m, m) if self.space.scaling else None
        low, high = self.space.scale.low, self.space.scale.high
        steps = []
        for k, j in enumerate(path):
            scale = 1.0
            if w is not None and k > 0:
                scale = float(low + (high - low) * w[path[k - 1], j])
            donor, layer = self.layer(j)
            steps.append(PathStep(model=donor, layer=layer, scale=scale))
        return DFSRecipe(embed_from=self.embed_from, layers=tuple(steps), donors=dict(self.donor_recipes or {}),
                         dtype=self.dtype)
