"""A recipe validated against a set of sources, resolved per tensor; the seed of each tensor's random draws.

:func:`plan_recipe` checks a recipe against the sources' names, base and tensors (every problem
listed at once) and resolves each setting (scalars, per-group values, gradients, filters,
recipe-wide fallbacks, mergekit's defaults) for every tensor; the resident merge
(:mod:`evomerge.merge.backend`) and the streaming merge (:mod:`evomerge.merge.streaming`) both
merge from the :class:`MergePlan` it returns, so they accept and refuse the same recipes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from evomerge.architecture import Architecture
from evomerge.errors import MergeError
from evomerge.merge.methods import MergeMethod, get_method
from evomerge.recipe import ModelParams, Recipe, is_per_group, resolve_setting

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensor_seed(seed: int, tensor_name: str) -> int:
    """Seed of the DARE generator for one tensor: a stable hash of ``(seed, tensor_name)``.

    It depends on nothing else (not the order tensors are merged in, the process, or
    the machine), so a recipe's random drops are reproducible anywhere.
    """
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class MergePlan:
    """A recipe validated against a set of sources, with every parameter resolved per tensor."""

    method: MergeMethod
    models: tuple[ModelParams, ...]  # the inputs the method sees, in recipe order
    delta_rows: tuple[int | None, ...]  # row of each input in the stacked deltas; None: base
    all_rows: bool  # the inputs are exactly the stored deltas, in order (no copy needed)
    tensor_params: Mapping[str, tuple[tuple[dict[str, bool | float], ...], dict[str, bool | float]]]
    """``{tensor: (per-input parameters, global parameters)}``, defaults filled in."""
    seed: int


def plan_recipe(
    recipe: Recipe,
    *,
    names: tuple[str, ...],
    base_model: str,
    tensors: Iterable[str],
    num_layers: int,
    dtype: torch.dtype,
    arch: Architecture,
) -> MergePlan:
    """Validate ``recipe`` for sources ``names`` (base ``base_model``) with floating-point
    tensors ``tensors`` (named as ``arch`` names them) and resolve its settings (scalars, per-group values, gradients,
    filters, recipe-wide fallbacks, defaults) for every tensor. :class:`MergeError` lists
    every problem found."""
    method = get_method(recipe.method)
    found: dict[object, str] = {}  # every problem, in first-seen order, each once

    def problem(message: str, once_per: object = None) -> None:
        found.setdefault(message if once_per is None else once_per, message)
    if DTYPES[recipe.dtype] != dtype:
        problem(f"recipe dtype {recipe.dtype} differs from the sources' merge dtype {dtype}")
    if recipe.base_model != base_model:
        problem(f"recipe base_model {recipe.base_model!r} is not the sources' base {base_model!r}")
    groups = num_layers + 2
    unusable: set[tuple[str, str]] = set()  # (scope, name) whose setting cannot be resolved

    def check_shape(scope: str, name: str, value: object) -> None:
        if is_per_group(value) and len(value) != groups:  # type: ignore[arg-type]
            unusable.add((scope, name))
            problem(f"{scope}.{name}: {len(value)} per-group values, expected {groups} "  # type: ignore[arg-type]
                    f"(embed, {num_layers} blocks, head); for mergekit's gradient write {{gradient: [...]}}")

    known = {**method.model_parameters, **method.global_parameters}
    for name, value in recipe.parameters.items():
        if name not in known:
            problem(f"parameters.{name}: method {method.name!r} has no parameter {name!r}; "
                    f"accepted: {sorted(known)}")
        check_shape("parameters", name, value)
    seen: set[str] = set()
    for mp in recipe.models:
        if mp.model not in names:
            problem(f"unknown model {mp.model!r}; sources: {list(names)}")
        if mp.model in seen:
            problem(f"model {mp.model!r} is listed twice")
        seen.add(mp.model)
        for name, value in mp.parameters.items():
            if name not in method.model_parameters:
                problem(f"{mp.model}.{name}: method {method.name!r} has no per-model parameter {name!r}; "
                        f"accepted: {sorted(method.model_parameters)}")
            check_shape(mp.model, name, value)
    inputs = tuple(mp for mp in recipe.models if not (method.needs_base and mp.model == base_model))
    if not method.needs_base and not inputs:
        problem(f"method {method.name!r} needs at least one model")

    def check(spec, value, where: str, key: str) -> bool | float:
        if value is None:
            problem(f"{where}: missing required parameter {spec.name!r} (first for tensor {key})",
                    ("missing", where, spec.name))
            return 0.0
        if spec.kind is bool:
            if not isinstance(value, bool):
                problem(f"{where}: parameter {spec.name!r} must be true or false, got {value!r}",
                        ("type", where, spec.name))
            return value
        if isinstance(value, bool):
            problem(f"{where}: parameter {spec.name!r} must be a number, got {value!r}", ("type", where, spec.name))
            return float(value)
        if spec.bounds is not None and not spec.bounds[0] <= value <= spec.bounds[1]:
            problem(f"{where}.{spec.name}: value {value} (first for tensor {key}) is outside {list(spec.bounds)}",
                    ("bounds", where, spec.name))
        return float(value)

    def setting(scope: str, own: Mapping[str, object], name: str, key: str, group: int):
        for where, values in ((scope, own), ("parameters", recipe.parameters)):
            if name in values and (where, name) not in unusable:
                value = resolve_setting(values[name], key, group, num_layers)  # type: ignore[arg-type]
                if value is not None:
                    return value
            elif (where, name) in unusable:
                return 0.0  # already reported
        return None

    tensor_params: dict[str, tuple[tuple[dict[str, bool | float], ...], dict[str, bool | float]]] = {}
    for key in tensors:
        group = arch.tensor_group(key, num_layers)
        global_values: dict[str, bool | float] = {}
        for name, spec in method.global_parameters.items():
            value = setting("parameters", {}, name, key, group)
            global_values[name] = check(spec, spec.default if value is None else value, "parameters", key)
        per_input = []
        for mp in inputs:
            values: dict[str, bool | float] = {}
            for name, spec in method.model_parameters.items():
                value = setting(mp.model, mp.parameters, name, key, group)
                values[name] = check(spec, spec.default if value is None else value, mp.model, key)
            per_input.append(values)
        if not method.needs_base and global_values.get("normalize") and "weight" in method.model_parameters:
            if sum(v["weight"] for v in per_input) == 0:
                problem(f"weights sum to 0 for tensor {key} and normalize is on: the merge would "
                        "divide by zero (mergekit writes inf/NaN)", "zero-sum")
        tensor_params[key] = (tuple(per_input), global_values)
    if found:
        raise MergeError(f"recipe cannot be merged ({len(found)} problems):\n" + "\n".join(found.values()))
    others = [m for m in names if m != base_model]
    rows = tuple(None if mp.model == base_model else others.index(mp.model) for mp in inputs)
    return MergePlan(
        method=method,
        models=inputs,
        delta_rows=rows,
        all_rows=method.needs_base and rows == tuple(range(len(others))),
        tensor_params=tensor_params,
        seed=recipe.seed,
    )
