"""Recipe: the decoded, human-readable merge plan.

A recipe is data: frozen, hashable by content, and round-trips through YAML.
It names source models by the names the experiment gives them, never by path,
so the same recipe can be applied on any machine that has those sources.

Per-group values
----------------
A parameter value is either a scalar (the same for every tensor) or a tuple
with one value per *group*. Groups are, in order::

    0            embed    (Llama: model.embed_tokens; GPT-2: transformer.wte and .wpe)
    1 .. L       block i  (Llama: model.layers.{i-1}.*; GPT-2: transformer.h.{i-1}.*)
    L + 1        head     (final norm, lm_head, anything else)

so a per-group tuple has ``num_layers + 2`` entries. Each family's names come from its
description: see ``evomerge.architecture.Architecture.tensor_group``. Searches write scalars and per-group tuples.

Hand-written recipes may also use mergekit's two other forms, with mergekit's meaning:

* a **gradient**, ``{gradient: [v0, v1, ...]}``: the values are spread evenly over the
  blocks and linearly interpolated; block ``i`` of ``L`` reads the gradient at
  ``t = i / (L - 1)`` (``t = 1`` for a one-block model) and the embed and head groups at
  ``t = 0``. (mergekit writes a gradient as a plain list; in an evomerge recipe a plain
  list is per-group values, so a gradient is spelled out.)
* **filters**, ``[{filter: self_attn, value: 0.3}, {filter: mlp, value: 0.7}, {value: 0.5}]``:
  the first entry whose ``filter`` is a substring of the tensor's name (or that has no
  filter, or ``"*"``) gives the value, itself a scalar or a gradient. When none matches,
  the recipe-wide value of the same name applies, else the method's default.

A per-model parameter may also be given once in the recipe-wide ``parameters``: it then
applies to every model that does not set it (mergekit's precedence). :func:`resolve_setting`
evaluates any form for one tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator



class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_finite(values, what: str) -> None:
    for x in values:
        if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
            raise ValueError(f"{what} is not finite: {x}")


class Gradient(_Frozen):
    """mergekit's gradient: ``values`` spread evenly over the blocks, linearly interpolated."""

    gradient: tuple[float, ...]

    @field_validator("gradient")
    @classmethod
    def _check(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("a gradient needs at least one value")
        _check_finite(v, "gradient value")
        return v

    def at(self, t: float) -> float:
        """The value at ``t`` in [0, 1], computed as mergekit computes it (bit for bit)."""
        values = self.gradient
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]


class Conditional(_Frozen):
    """One entry of a filtered setting: ``value`` for tensors whose name contains ``filter``
    (every tensor when ``filter`` is None or ``"*"``)."""

    filter: Optional[str] = None
    value: Union[bool, float, Gradient]

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in tensor_name


ParamValue = Union[float, tuple[float, ...], Gradient, tuple[Conditional, ...]]
GlobalValue = Union[bool, float, tuple[float, ...], Gradient, tuple[Conditional, ...]]


def layer_t(group: int, num_layers: int) -> float:
    """mergekit's gradient position of tensor group ``group``: 0 for embed and head,
    ``i / (L - 1)`` for block i (1 when the model has one block)."""
    if group <= 0 or group > num_layers:
        return 0.0
    return (group - 1) / (num_layers - 1) if num_layers > 1 else 1.0


def resolve_setting(value: GlobalValue, tensor_name: str, group: int, num_layers: int) -> bool | float | None:
    """The value of a setting for tensor ``tensor_name`` (in group ``group`` of a model with
    ``num_layers`` blocks); ``None`` when it has filters and none matches."""
    if isinstance(value, Gradient):
        return value.at(layer_t(group, num_layers))
    if isinstance(value, tuple):
        if value and isinstance(value[0], Conditional):
            for cond in value:
                if cond.matches(tensor_name):  # type: ignore[union-attr]
                    return resolve_setting(cond.value, tensor_name, group, num_layers)  # type: ignore[union-attr]
            return None
        return float(value[group])  # type: ignore[arg-type]
    return value


def is_per_group(value: object) -> bool:
    """True for a per-group tuple (one value per tensor group)."""
    return isinstance(value, tuple) and bool(value) and not isinstance(value[0], Conditional)


def _parse_setting(value: object, where: str, problems: list[str]) -> object:
    """A YAML/JSON setting in recipe form: lists of numbers become per-group tuples, lists of
    mappings filters, ``{gradient: [...]}`` a gradient, one ``{filter, value}`` mapping a filter.
    Malformed settings are described in ``problems`` (and returned as they are)."""
    if isinstance(value, list):
        if value and all(isinstance(x, dict) for x in value):
            out = tuple(_parse_conditional(x, f"{where}[{i}]", problems) for i, x in enumerate(value))
            return value if None in out else out
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            return tuple(value)
        problems.append(f"{where}: a list is per-group numbers or {{filter, value}} entries, got {value!r}")
    elif isinstance(value, dict):
        if set(value) == {"gradient"}:
            return value
        if "value" in value and set(value) <= {"filter", "value"}:
            cond = _parse_conditional(value, where, problems)
            return value if cond is None else (cond,)
        problems.append(f"{where}: a mapping is {{gradient: [numbers]}} or {{filter: text, value: setting}}, "
                        f"got keys {sorted(value)}")
    return value


def _parse_conditional(entry: dict, where: str, problems: list[str]) -> Optional[dict]:
    unknown = sorted(set(entry) - {"filter", "value"})
    if unknown or "value" not in entry:
        problems.append(f"{where}: a filter entry has `value` and optionally `filter`"
                        + (f"; unknown key(s) {unknown}" if unknown else "; `value` is missing"))
        return None
    inner = entry["value"]
    if isinstance(inner, list) or (isinstance(inner, dict) and set(inner) != {"gradient"}):
        problems.append(f"{where}.value: a number, true/false or {{gradient: [numbers]}}, got {inner!r}")
        return None
    return entry


class ModelParams(_Frozen):
    """Per-source-model parameters of a merge (e.g. weight, density)."""

    model: str
    parameters: dict[str, ParamValue]

    @field_validator("parameters")
    @classmethod
    def _finite(cls, v: dict[str, ParamValue]) -> dict[str, ParamValue]:
        return _finite_settings(v)

    def value(self, name: str, group: int, num_layers: int | None = None) -> float:
        """The value of parameter ``name`` for tensor group ``group`` (a gradient needs
        ``num_layers``; a filtered setting has no single value per group: use
        :func:`resolve_setting` with the tensor's name)."""
        v = self.parameters[name]
        if isinstance(v, Gradient) and num_layers is None:
            raise ValueError(f"{self.model}.{name} is a gradient: its per-group value needs num_layers")
        if isinstance(v, tuple) and not is_per_group(v):
            raise ValueError(f"{self.model}.{name} has filters: its value depends on the tensor, not only the group")
        return float(resolve_setting(v, "", group, num_layers or 0))  # type: ignore[arg-type]


def _finite_settings(settings: dict) -> dict:
    for key, value in settings.items():
        _check_finite(_numbers(value), f"parameter {key!r}")
    return settings


def _numbers(value: object) -> list:
    """Every number in a setting (for the finiteness check)."""
    if isinstance(value, Gradient):
        return list(value.gradient)
    if isinstance(value, tuple):
        return [x for v in value for x in (_numbers(v.value) if isinstance(v, Conditional) else [v])]
    return [value]


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
    parameters: dict[str, GlobalValue] = {}
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def model_params(self, name: str) -> ModelParams:
        for m in self.models:
            if m.model == name:
                return m
        raise KeyError(name)

    @field_validator("parameters")
    @classmethod
    def _finite_globals(cls, v: dict[str, GlobalValue]) -> dict[str, GlobalValue]:
        return _finite_settings(v)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """Inverse of ``to_dict`` (lists become per-group tuples)."""
        return _validated(cls, _tuplify(data))


def _tuplify(data: dict) -> dict:
    """Recipe data with its settings in recipe form; ValueError lists every malformed one."""
    data = dict(data)
    problems: list[str] = []
    models = data.get("models")
    if isinstance(models, list):
        data["models"] = [
            {**m, "parameters": {k: _parse_setting(v, f"models[{i}].parameters.{k}", problems)
                                 for k, v in (m.get("parameters") or {}).items()}}
            if isinstance(m, dict) and isinstance(m.get("parameters") or {}, dict) else m
            for i, m in enumerate(models)
        ]
    if isinstance(data.get("parameters"), dict):
        data["parameters"] = {k: _parse_setting(v, f"parameters.{k}", problems) for k, v in data["parameters"].items()}
    if problems:
        raise ValueError("\n".join(problems))
    return data


def _validated(cls, data: dict):
    """``cls.model_validate(data)``; ValueError names every bad field (one per line)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        found: dict[str, str] = {}  # field -> first message (a union reports once per alternative)
        for e in err.errors():
            loc = ""
            for part in e["loc"]:
                if isinstance(part, int):
                    loc += f"[{part}]"
                elif part not in _UNION_MEMBERS and not part.startswith(("tuple[", "function-")):
                    loc += f".{part}" if loc else part
            found.setdefault(loc, e["msg"])
        # the most specific report per field: drop a field's line when a deeper one exists
        lines = [f"{loc}: {msg}" if loc else msg for loc, msg in found.items()
                 if not any(other != loc and other.startswith((loc + ".", loc + "[")) for other in found)]
        raise ValueError("\n".join(lines)) from None


_UNION_MEMBERS = {"bool", "float", "Gradient", "Conditional"}


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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype the path was searched in; export writes the model in it."""

    def canonical_json(self) -> str:
        data = self.model_dump(mode="json")
        if data["dtype"] == "float32":
            del data["dtype"]  # recipes written before the field hash as they did
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict:
        data = self.model_dump(mode="json")
        data["donors"] = {k: v.to_dict() for k, v in self.donors.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DFSRecipe":
        data = dict(data)
        data["donors"] = {k: Recipe.from_dict(v) for k, v in (data.get("donors") or {}).items()}
        return _validated(cls, data)


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
