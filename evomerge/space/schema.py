"""Search-space schema: what may vary in a search (a YAML under ``search_spaces/``).

A parameter-space (PS) space names a merge method and, for every merged source
model, the per-model parameters the optimizer controls (e.g. ``density`` and
``weight`` for DARE-TIES), each with bounds; ``granularity: per_layer`` gives
each parameter one value per tensor group (embeddings, each transformer block,
final norm + lm_head) instead of one value for the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Bounds(_Frozen):
    """A searched parameter: genome value g in [0, 1] maps to low + (high - low) * g."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Bounds":
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self


class ParameterSpace(_Frozen):
    """PS search space: a merge method with searched per-model parameters."""

    kind: Literal["ps"] = "ps"
    method: str
    granularity: Literal["global", "per_layer"] = "global"
    parameters: dict[str, Bounds] = Field(min_length=1)
    fixed: dict[str, Union[bool, float]] = {}

    @model_validator(mode="after")
    def _known_method(self) -> "ParameterSpace":
        from evomerge.merge.methods import METHODS

        problems = []
        if self.method not in METHODS:
            problems.append(f"method: unknown merge method {self.method!r}; known: {sorted(METHODS)}")
        else:
            spec = METHODS[self.method]
            for name in self.parameters:
                if name not in spec.model_parameters:
                    problems.append(
                        f"parameters.{name}: method {self.method!r} has no per-model parameter "
                        f"{name!r}; it has {sorted(spec.model_parameters)}"
                    )
            for name in self.fixed:
                if name not in spec.global_parameters:
                    problems.append(
                        f"fixed.{name}: method {self.method!r} has no global parameter "
                        f"{name!r}; it has {sorted(spec.global_parameters)}"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @staticmethod
    def load_data(path: Path) -> dict[str, Any]:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise yaml.YAMLError("a search space must be a mapping")
        return data


SearchSpace = ParameterSpace
