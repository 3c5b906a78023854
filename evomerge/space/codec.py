"""Genome <-> Recipe codec for parameter-space searches.

The genome is the optimizer's flat vector in [0, 1]^n. Dimensions are laid out
model-major, then parameter (in the space's order), then group::

    expert_a.density, expert_a.weight, expert_b.density, expert_b.weight       (global)
    expert_a.density[embed], expert_a.density[block0], ..., expert_a.density[head], ...  (per_layer)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from evomerge.recipe import ModelParams, Recipe
from evomerge.space.schema import ParameterSpace


def group_names(num_layers: int) -> tuple[str, ...]:
    """Names of the tensor groups, in the order per-group tuples use."""
    return ("embed", *(f"block{i}" for i in range(num_layers)), "head")


@dataclass(frozen=True)
class PSCodec:
    """Maps genomes in [0, 1]^dim to PS recipes and back."""

    space: ParameterSpace
    base_model: str
    models: tuple[str, ...]
    num_layers: int
    seed: int = 0
    dtype: str = "float32"  # the dtype candidates are merged in (the run's dispatch.dtype)

    @property
    def groups(self) -> int:
        return self.num_layers + 2 if self.space.granularity == "per_layer" else 1

    @property
    def dim(self) -> int:
        return len(self.models) * len(self.space.parameters) * self.groups

    @property
    def names(self) -> tuple[str, ...]:
        """One human-readable name per genome dimension."""
        out = []
        for model in self.models:
            for param in self.space.parameters:
                if self.space.granularity == "per_layer":
                    out.extend(f"{model}.{param}[{g}]" for g in group_names(self.num_layers))
                else:
                    out.append(f"{model}.{param}")
        return tuple(out)

    def decode(self, genome: Sequence[float]) -> Recipe:
        """Genome -> recipe. Values outside [0, 1] are clipped to the bounds."""
        g = np.asarray(genome, dtype=np.float64)
        if g.shape != (self.dim,):
            raise ValueError(f"genome has shape {g.shape}, expected ({self.dim},)")
        if not np.all(np.isfinite(g)):
            raise ValueError("genome contains non-finite values")
        g = np.clip(g, 0.0, 1.0)
        models = []
        i = 0
        for model in self.models:
            params = {}
            for name, b in self.space.parameters.items():
                chunk = g[i : i + self.groups]
                i += self.groups
                values = [round(float(b.low + (b.high - b.low) * x), 12) for x in chunk]
                params[name] = tuple(values) if self.space.granularity == "per_layer" else values[0]
            models.append(ModelParams(model=model, parameters=params))
        return Recipe(
            method=self.space.method,
            base_model=self.base_model,
            models=tuple(models),
            parameters=dict(self.space.fixed),
            seed=self.seed,
            dtype=self.dtype,
        )

    def encode(self, recipe: Recipe) -> np.ndarray:
        """Recipe -> genome (the inverse of decode for recipes inside the bounds)."""
        out = []
        for model in self.models:
            mp = recipe.model_params(model)
            for name, b in self.space.parameters.items():
                v = mp.parameters[name]
                values = v if isinstance(v, tuple) else (v,) * self.groups
                if len(values) != self.groups:
                    raise ValueError(f"{model}.{name}: {len(values)} values, expected {self.groups}")
                out.extend((x - b.low) / (b.high - b.low) for x in values)
        return np.asarray(out, dtype=np.float64)
