"""Search-space schema: what may vary in a search (a YAML under ``search_spaces/``).

Two kinds: ``ps`` (parameter space: merge coefficients) and ``dfs`` (data-flow
space: which layers of which models the hidden state passes through, in order).

A parameter-space (PS) space names a merge method and, for every merged source
model, the per-model parameters the optimizer controls (e.g. ``density`` and
``weight`` for DARE-TIES), each with bounds; a *global* numeric parameter of the method
(e.g. SLERP's ``t``, ``lambda``) may be searched too, with one value for the whole merge; ``granularity: per_layer`` gives
each parameter one value per tensor group (embeddings, each transformer block,
final norm + lm_head) instead of one value for the whole model, and ``granularity: vocab_body``
two: one for the vocabulary groups (embeddings; final norm + lm_head) and one for the blocks.
Two low-dimensional layer-wise granularities sit between them: ``granularity: knots`` with
``knots: K`` searches K values per parameter, spread evenly over the blocks and linearly
interpolated (mergekit's ``gradient``; the embeddings and the head take the first knot's value,
as in mergekit), and ``granularity: lines`` two, a bottom and a top value, linearly interpolated
from the embeddings (bottom) through the blocks to the head (top), as LiNeS scales task vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


MAX_ABS_BOUND = 1e6
"""Largest magnitude of a searched bound: merge coefficients are O(1); 1e308 overflows."""


class Bounds(_Frozen):
    """A searched parameter: genome value g in [0, 1] maps to low + (high - low) * g."""

    low: float
    """the searched range's lower end"""
    high: float
    """the searched range's upper end"""

    @model_validator(mode="after")
    def _ordered(self) -> "Bounds":
        if max(abs(self.low), abs(self.high)) > MAX_ABS_BOUND:
            raise ValueError(f"bounds must lie within +-{MAX_ABS_BOUND:g}, got [{self.low}, {self.high}]")
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self


class ParameterSpace(_Frozen):
    """PS search space: a merge method with searched per-model parameters."""

    kind: Literal["ps"] = "ps"
    """ps: a parameter-space (merge coefficient) space"""
    method: str
    """the merge method (linear, task_arithmetic, ties, dare_ties, ...)"""
    granularity: Literal["global", "per_layer", "vocab_body", "knots", "lines"] = "global"
    """one value per model (global), per layer, for vocabulary and body tensors apart, by knots or by LiNeS lines"""
    knots: Optional[int] = Field(default=None, ge=2, le=64)
    """granularity knots: values at this many evenly spaced depths, interpolated between"""
    parameters: dict[str, Bounds] = Field(min_length=1)
    """each searched parameter's range"""
    fixed: dict[str, Union[bool, float]] = {}
    """global parameters held at a value"""

    @model_validator(mode="after")
    def _known_method(self) -> "ParameterSpace":
        from evomerge.method_specs import SPECS as METHODS

        problems = []
        if self.granularity == "knots" and self.knots is None:
            problems.append("knots: granularity knots needs the number of knots (knots: 2 or more)")
        elif self.granularity != "knots" and self.knots is not None:
            problems.append(f"knots: only for granularity knots (this space is {self.granularity})")
        if self.method not in METHODS:
            problems.append(f"method: unknown merge method {self.method!r}; known: {sorted(METHODS)}")
        else:
            spec = METHODS[self.method]
            legal = {**spec.model_parameters, **spec.global_parameters}
            for name, bounds in self.parameters.items():
                legal_range = legal[name].bounds if name in legal else None
                if legal_range is not None and not legal_range[0] <= bounds.low < bounds.high <= legal_range[1]:
                    problems.append(f"parameters.{name}: [{bounds.low}, {bounds.high}] leaves {self.method}'s legal "
                                    f"range {list(legal_range)}; every candidate outside it would fail")
                if name in spec.global_parameters and spec.global_parameters[name].kind is bool:
                    problems.append(f"parameters.{name}: {name!r} is true/false; set it under fixed")
                elif name not in spec.model_parameters and name not in spec.global_parameters:
                    problems.append(
                        f"parameters.{name}: method {self.method!r} has no parameter {name!r}; it has "
                        f"per model {sorted(spec.model_parameters)}, global {sorted(spec.global_parameters)}"
                    )
                if name in self.fixed:
                    problems.append(f"parameters.{name}: also under fixed; a parameter is searched or fixed")
            for name, value in self.fixed.items():
                legal_range = spec.global_parameters[name].bounds if name in spec.global_parameters else None
                if (legal_range is not None and not isinstance(value, bool)
                        and not legal_range[0] <= value <= legal_range[1]):
                    problems.append(f"fixed.{name}: {value} is outside {self.method}'s legal range {list(legal_range)}")
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
        from evomerge.yaml_strict import load_file

        data = load_file(path)
        if not isinstance(data, dict):
            raise yaml.YAMLError("a search space must be a mapping")
        return data


class PSDonor(_Frozen):
    """A PS-merged model that joins the sources as a layer donor (the paper's PS+DFS).

    ``recipe``: a recipe YAML, or a run directory (its ``best_recipe.yaml``); relative
    paths resolve against the search-space file.
    """

    name: str = Field(default="ps_merged", pattern=r"^[A-Za-z0-9_.-]+$")
    """the donor's name on paths"""
    recipe: str
    """a recipe file, or a run directory (its best recipe); relative to the search-space file"""


class DataFlowSpace(_Frozen):
    """DFS search space (the paper's data-flow space).

    With M layers in total across the layer donors (``models``, default: every source;
    plus the ``ps_donor``) and ``repetitions`` r, the genome holds an indicator array of
    length T = M * r: position t stands for layer t mod M of the concatenated donors, and
    it is on the path when its gene is above 0.5 (indicator > 0 after centring, as in the
    paper). The path keeps at most ``max_path_length`` layers. With ``scaling`` the genome
    also holds W (M x M): the hidden state passed from layer i to layer j is scaled by
    W[i, j] in ``scale`` (the first layer receives the embeddings unscaled). Embeddings,
    final norm and lm_head come from ``embed_from`` (default: the base model).

    ``start``: ``centre`` starts the optimizer at the genome's centre (``optimizer.x0``: every
    indicator at 0.5, i.e. off, and the search finds its first paths at random). ``embed_from``
    starts it at the ``embed_from`` donor's own path (its layers in order, each scale 1: the
    donor model itself), which the first generation evaluates; paths near it are then searched.
    For PS+DFS (``embed_from`` = the PS donor) the search starts from the PS result, so its best
    is never worse on the search split. Needs ``optimizer.name: cma_es``.
    """

    kind: Literal["dfs"] = "dfs"
    """dfs: a data-flow (layer path) space"""
    models: Optional[tuple[str, ...]] = None
    """the layer donors (default: every source)"""
    repetitions: int = Field(default=3, ge=1)
    """r: how often each donor layer may appear on a path"""
    max_path_length: Optional[int] = Field(default=None, ge=1)
    """at most this many layers on a path"""
    scaling: bool = True
    """search the scales of the hidden state passed between layers (the matrix W)"""
    scale: Bounds = Bounds(low=0.5, high=1.5)
    """the range of each scale"""
    embed_from: Optional[str] = None
    """the donor of the embeddings, final norm and head (default: the base model)"""
    ps_donor: Optional[PSDonor] = None
    """a parameter-space merge that joins as a layer donor (PS+DFS)"""
    start: Literal["centre", "embed_from"] = "centre"
    """centre (the genome's centre) or embed_from (that donor's own path, evaluated first)"""

    @field_validator("scale")
    @classmethod
    def _positive_scales(cls, scale: Bounds) -> Bounds:
        if scale.low <= 0:
            raise ValueError("low must be positive (a layer input scaled by 0 or less cannot be "
                             "folded into the exported weights)")
        return scale


SearchSpace = Annotated[Union[ParameterSpace, DataFlowSpace], Field(discriminator="kind")]


def load_space_data(path: Path) -> dict[str, Any]:
    """Read a search-space YAML; a ``ps_donor.recipe`` path resolves against the file's directory."""
    data = ParameterSpace.load_data(path)
    donor = data.get("ps_donor")
    if isinstance(donor, dict) and isinstance(donor.get("recipe"), str):
        data = {**data, "ps_donor": {**donor, "recipe": str((Path(path).parent / donor["recipe"]).resolve())}}
    data.setdefault("kind", "ps")
    return data
