"""Recipe: the decoded, human-readable merge plan.

A recipe is data: frozen, hashable by content, and round-trips through YAML.
It names source models by the names the experiment gives them, never by path,
so the same recipe can be applied on any machine that has those sources.

Per-group values
----------------
A parameter value is either a scalar (the same for every tensor) or a tuple
with one value per *group*. Groups are, in order::

    0            embed    (model.embed_tokens)
    1 .. L       block i  (model.layers.{i-1}.*)
    L + 1        head     (model.norm, lm_head, anything else)

so a per-group tuple has ``num_layers + 2`` entries. See
``evomerge.merge.parameter_space.tensor_group``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, field_validator

ParamValue = Union[float, tuple[float, ...]]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelParams(_Frozen):
    """Per-source-model parameters of a merge (e.g. weight, density)."""

    model: str
    parameters: dict[str, ParamValue]

    @field_validator("parameters")
    @classmethod
    def _finite(cls, v: dict[str, ParamValue]) -> dict[str, ParamValue]:
        for key, value in v.items():
            values = value if isinstance(value, tuple) else (value,)
            for x in values:
                if x != x or x in (float("inf"), float("-inf")):
                    raise ValueError(f"parameter {key!r} is not finite: {x}")
        return v

    def value(self, name: str, group: int) -> float:
        """The value of parameter ``name`` for tensor group ``group``."""
        v = self.parameters[name]
        if isinstance(v, tuple):
            return float(v[group])
        return float(v)


class _RecipeIO(_Frozen):
    """Identity and YAML I/O shared by every recipe kind (each defines to_dict / from_dict)."""

    def canonical_json(self) -> str:
        """Deterministic JSON text of the recipe (sorted keys, repr floats)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def content_hash(self) -> str:
        """Stable content hash: equal recipes hash equal across processes and machines."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str):
        return cls.from_dict(yaml.safe_load(text))

    def save(self, path: str | Path) -> None:
        """Write the YAML atomically (a reader never sees a half-written recipe)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_yaml(Path(path).read_text())


class Recipe(_RecipeIO):
    """A parameter-space merge plan (the thing users export)."""

    kind: Literal["ps"] = "ps"
    method: str
    base_model: str
    models: tuple[ModelParams, ...]
    parameters: dict[str, Union[bool, float]] = {}
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def model_params(self, name: str) -> ModelParams:
        for m in self.models:
            if m.model == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict:
        data = self.model_dump(mode="json")
        for m in data["models"]:
            m["parameters"] = {
                k: list(v) if isinstance(v, (list, tuple)) else v for k, v in m["parameters"].items()
            }
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """Inverse of ``to_dict`` (lists become per-group tuples)."""
        return cls.model_validate(_tuplify(data))


def _tuplify(data: dict) -> dict:
    data = dict(data)
    data["models"] = [
        {
            **m,
            "parameters": {
                k: tuple(float(x) for x in v) if isinstance(v, list) else v
                for k, v in m.get("parameters", {}).items()
            },
        }
        for m in data.get("models", [])
    ]
    return data


class PathStep(_Frozen):
    """One layer on a data-flow path: layer ``layer`` of ``model``, its input scaled by ``scale``."""

    model: str
    layer: int
    scale: float = 1.0


class DFSRecipe(_RecipeIO):
    """A data-flow (layer path) plan: embeddings/head from ``embed_from``, then ``layers`` in order.

    ``donors`` holds the PS recipes of merged layer donors (PS+DFS), so the recipe is
    self-contained: the same sources reproduce it anywhere.
    """

    kind: Literal["dfs"] = "dfs"
    embed_from: str
    layers: tuple[PathStep, ...]
    donors: dict[str, Recipe] = {}

    def to_dict(self) -> dict:
        data = self.model_dump(mode="json")
        data["donors"] = {k: v.to_dict() for k, v in self.donors.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DFSRecipe":
        data = dict(data)
        data["donors"] = {k: Recipe.from_dict(v) for k, v in (data.get("donors") or {}).items()}
        return cls.model_validate(data)


AnyRecipe = Union[Recipe, DFSRecipe]


def recipe_from_dict(data: dict) -> AnyRecipe:
    """A recipe of any kind from its dict (``kind: ps`` or ``kind: dfs``)."""
    return DFSRecipe.from_dict(data) if data.get("kind") == "dfs" else Recipe.from_dict(data)


def load_recipe(path: str | Path) -> AnyRecipe:
    """A recipe of any kind from a YAML file."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a mapping")
    return recipe_from_dict(data)
