"""Genome <-> Recipe codec for parameter-space searches.

The genome is the optimizer's flat vector in [0, 1]^n. Dimensions are laid out
model-major, then parameter (in the space's order), then group::

    expert_a.density, expert_a.weight, expert_b.density, expert_b.weight       (global)
    expert_a.density[embed], expert_a.density[block0], ..., expert_a.density[head], ...  (per_layer)
    expert_a.density[vocab], expert_a.density[body], ...                                (vocab_body)

``vocab_body`` gives each model one value for its vocabulary tensors (the embeddings group and
the head group: final norm + lm_head) and one for its transformer blocks: the structure that
matters when one source brings a language (new vocabulary rows) and another a skill (its body).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from evomerge.recipe import Gradient, ModelParams, Recipe, is_per_group
from evomerge.space.schema import ParameterSpace


def group_names(num_layers: int) -> tuple[str, ...]:
    """Names of the tensor groups, in the order per-group tuples use."""
    return ("embed", *(f"block{i}" for i in range(num_layers)), "head")


# What a start recipe's per-group values must look like, per granularity (per_layer takes any).
_SHAPES = {"global": "one value per model", "vocab_body": "one value for embed and head and one for every block"}


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
    def _slots(self) -> tuple[int, ...]:
        """For each tensor group (embed, each block, head), the genome value per parameter that
        sets it: the one mapping every granularity is read through."""
        layers = self.num_layers + 2
        if self.space.granularity == "per_layer":
            return tuple(range(layers))
        if self.space.granularity == "vocab_body":
            return (0, *([1] * self.num_layers), 0)
        return (0,) * layers

    @property
    def groups(self) -> int:
        """Genome values per model and parameter."""
        if self.space.granularity == "knots":
            return int(self.space.knots)
        if self.space.granularity == "lines":
            return 2
        return max(self._slots) + 1

    @property
    def group_labels(self) -> tuple[str, ...]:
        """What each of a parameter's genome values sets (empty for ``global``)."""
        if self.space.granularity == "per_layer":
            return group_names(self.num_layers)
        if self.space.granularity == "knots":
            return tuple(f"knot{i}" for i in range(self.groups))
        if self.space.granularity == "lines":
            return ("bottom", "top")
        return ("vocab", "body") if self.space.granularity == "vocab_body" else ()

    def _per_group(self, values: list[float]):
        """A parameter's genome values as the recipe writes them: a scalar (``global``), one value
        per tensor group, or (``knots``) mergekit's gradient over the knots."""
        if self.space.granularity == "knots":
            return Gradient(gradient=tuple(values))
        if self.space.granularity == "lines":
            last = self.num_layers + 1  # embed = 0 (bottom value) ... head = L + 1 (top value)
            return tuple(round(values[0] + (values[1] - values[0]) * g / last, 12) for g in range(last + 1))
        if self.groups == 1:
            return values[0]
        return tuple(values[slot] for slot in self._slots)

    @property
    def model_params(self) -> tuple[str, ...]:
        """Searched per-model parameters (the rest of ``space.parameters`` are global)."""
        from evomerge.method_specs import SPECS as METHODS

        return tuple(p for p in self.space.parameters if p in METHODS[self.space.method].model_parameters)

    @property
    def global_params(self) -> tuple[str, ...]:
        """Searched global parameters: one value each, after the per-model block of the genome."""
        return tuple(p for p in self.space.parameters if p not in self.model_params)

    @property
    def dim(self) -> int:
        return len(self.models) * len(self.model_params) * self.groups + len(self.global_params)

    @property
    def gene_groups(self) -> tuple[int, ...]:
        """Each genome value's tensor-group slot (``groups`` of them per model and parameter; -1
        for the global parameters), in genome order: where M2N2 may split a genome."""
        per_model = tuple(range(self.groups)) * len(self.model_params)
        return per_model * len(self.models) + (-1,) * len(self.global_params)

    @property
    def names(self) -> tuple[str, ...]:
        """One human-readable name per genome dimension."""
        out = []
        for model in self.models:
            for param in self.model_params:
                if self.group_labels:
                    out.extend(f"{model}.{param}[{g}]" for g in self.group_labels)
                else:
                    out.append(f"{model}.{param}")
        out.extend(f"global.{p}" for p in self.global_params)
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
            for name in self.model_params:
                b = self.space.parameters[name]
                chunk = g[i : i + self.groups]
                i += self.groups
                values = [round(float(b.low + (b.high - b.low) * x), 12) for x in chunk]
                params[name] = self._per_group(values)
            models.append(ModelParams(model=model, parameters=params))
        return Recipe(
            method=self.space.method,
            base_model=self.base_model,
            models=tuple(models),
            parameters={**self.space.fixed, **{
                name: round(float(self.space.parameters[name].low + (self.space.parameters[name].high
                                                                       - self.space.parameters[name].low) * x), 12)
                for name, x in zip(self.global_params, g[i:])}},
            seed=self.seed,
            dtype=self.dtype,
        )

    def start_genome(self) -> None:
        """The optimizer starts at ``optimizer.x0`` (a PS space has no start of its own; see
        :meth:`DFSCodec.start_genome`)."""
        return None

    def _low_dim_values(self, model: str, name: str, v) -> tuple[float, ...]:
        """A knots or lines parameter's genome values from a recipe value: a scalar (every knot,
        or bottom = top), a gradient with as many knots, or per-group values on a line."""
        if isinstance(v, (int, float)):
            return (float(v),) * self.groups
        if self.space.granularity == "knots" and isinstance(v, Gradient) and len(v.gradient) == self.groups:
            return tuple(float(x) for x in v.gradient)
        if self.space.granularity == "lines" and is_per_group(v) and len(v) == self.num_layers + 2:
            values = tuple(self._per_group([float(v[0]), float(v[-1])]))
            if np.allclose(values, v, atol=1e-9):
                return float(v[0]), float(v[-1])
        want = (f"a gradient of {self.groups} values" if self.space.granularity == "knots"
                else "values on a line from the embeddings to the head")
        raise ValueError(f"{model}.{name}: a {self.space.granularity} search starts from a number or {want}; "
                         f"got {v!r}")

    def encode(self, recipe: Recipe) -> np.ndarray:
        """Recipe -> genome (the inverse of decode for recipes inside the bounds)."""
        out = []
        for model in self.models:
            mp = recipe.model_params(model)
            for name in self.model_params:
                b = self.space.parameters[name]
                v = mp.parameters[name]
                layers = self.num_layers + 2  # embed, blocks, head
                if self.space.granularity in ("knots", "lines"):
                    out.extend((x - b.low) / (b.high - b.low) for x in self._low_dim_values(model, name, v))
                    continue
                if isinstance(v, (int, float)):
                    values: tuple = (float(v),) * layers
                elif is_per_group(v):
                    values = v  # type: ignore[assignment]
                elif isinstance(v, Gradient) and self.groups > 1:
                    values = tuple(mp.value(name, g, self.num_layers) for g in range(layers))
                else:
                    kind = "gradient" if isinstance(v, Gradient) else "filtered"
                    raise ValueError(f"{model}.{name}: a {kind} setting has no single value per "
                                     f"{'tensor group' if self.groups > 1 else 'model'}, so it cannot "
                                     f"start a {self.space.granularity} search")
                if len(values) != layers:
                    raise ValueError(f"{model}.{name}: {len(values)} values, expected {layers} (embed, "
                                     f"{self.num_layers} blocks, head)")
                slotted = [{x for x, slot in zip(values, self._slots) if slot == i} for i in range(self.groups)]
                if any(len(xs) > 1 for xs in slotted):
                    raise ValueError(f"{model}.{name}: a {self.space.granularity} search has "
                                     f"{_SHAPES[self.space.granularity]}; got {list(values)}")
                values = tuple(xs.pop() for xs in slotted)
                out.extend((x - b.low) / (b.high - b.low) for x in values)
        for name in self.global_params:
            b = self.space.parameters[name]
            out.append((float(recipe.parameters[name]) - b.low) / (b.high - b.low))
        return np.asarray(out, dtype=np.float64)
