"""Recipes a parameter-space search starts from (``optimizer.start_from``).

A user often knows good recipes before searching: a published preset (Layer Swapping with some
k, LiNeS) or an earlier run's best. ``start_from`` lists them; CMA-ES evaluates them in its first
generation (pycma's ``inject``, at exactly these values) and its first update moves towards the
ones that score well, so a search spends its budget improving on them instead of rediscovering
them, and its winner on the search split is never below theirs.

Each recipe must be expressible in the search space: the space's method and granularity, values
inside its bounds. One translation is exact and is made here: a ``linear`` recipe that takes every
tensor group whole from one model (per-group weights 1 for one model and 0 for the rest, as
Layer Swapping) is the same model as that recipe in a task-vector method (task arithmetic, TIES,
DARE) with the same weights, density 1 and lambda 1: base + (source - base) = source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from evomerge.errors import ConfigError
from evomerge.recipe import ModelParams, Recipe, load_recipe

if TYPE_CHECKING:
    from evomerge.config import Experiment, StartRecipe
    from evomerge.space.codec import PSCodec

# methods whose merge of one-hot weights at density 1 (and lambda 1) is the weighted source itself
WHOLE_GROUP_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear")


@dataclass(frozen=True)
class StartPoint:
    """One start recipe: what the user wrote, its genome, and the recipe that genome decodes to
    (what the search evaluates: the start recipe in the space's method, with the space's settings)."""

    label: str
    genome: np.ndarray
    recipe: Recipe


# settings that cannot change a merge of one-hot weights at density 1 (a sum of one task vector)
INERT_SETTINGS = ("normalize", "rescale", "int8_mask")


def in_method(recipe: Recipe, method: str, num_layers: int, fixed: Mapping[str, object] | None = None) -> Recipe:
    """``recipe`` as an equal recipe of ``method``: itself when the method matches, or a linear
    recipe that takes each tensor group whole from one model, as a task-vector method with the
    same weights, density 1 and lambda 1 (and ``fixed``'s values of the settings that cannot
    change such a merge). ValueError says why another recipe has no equal."""
    if recipe.method == method:
        return recipe
    if recipe.method != "linear" or method not in WHOLE_GROUP_METHODS:
        raise ValueError(f"a {recipe.method} recipe has no exact equal in a {method} search; give a {method} "
                         f"recipe (a linear one converts only to {', '.join(WHOLE_GROUP_METHODS)})")
    groups = num_layers + 2
    models = [m for m in recipe.models if m.model != recipe.base_model]  # a group taken from the base: weights 0
    weights = {m.model: tuple(m.value("weight", g, num_layers) for g in range(groups)) for m in recipe.models}
    for g in range(groups):
        column = [w[g] for w in weights.values()]
        if sorted(column) != [0.0] * (len(column) - 1) + [1.0]:
            raise ValueError(f"a linear recipe converts to {method} only when each tensor group comes whole from "
                             f"one model (weights 1 and 0); group {g} has weights {column}")
    extra = {"density": 1.0} if method != "task_arithmetic" else {}
    return Recipe(method=method, base_model=recipe.base_model, seed=recipe.seed, dtype=recipe.dtype,
                  parameters={"lambda": 1.0, **{k: v for k, v in (fixed or {}).items() if k in INERT_SETTINGS}},
                  models=tuple(ModelParams(model=m.model, parameters={"weight": weights[m.model], **extra})
                               for m in models))


def _recipe(entry: "StartRecipe", exp: "Experiment", num_layers: int) -> tuple[str, Recipe]:
    if entry.preset is not None:
        from evomerge.presets import preset_recipe

        return entry.preset, preset_recipe(entry.preset, exp.merged_models, exp.base_model, num_layers)
    from evomerge.run_dir import recipe_file

    path = recipe_file(entry.recipe or "")
    recipe = load_recipe(path)
    if not isinstance(recipe, Recipe):
        raise ValueError(f"{path} is a data-flow recipe; a parameter-space search starts from PS recipes")
    return str(path), recipe


def start_points(exp: "Experiment", codec: "PSCodec") -> list[StartPoint]:
    """Every ``optimizer.start_from`` entry as a genome of the search space; ConfigError names
    each entry that cannot be one (unknown model, another method, outside the bounds...), and
    more entries than one population holds."""
    points, problems = [], []
    for i, entry in enumerate(exp.optimizer.start_from):
        where = f"optimizer.start_from.{i}"
        try:
            label, recipe = _recipe(entry, exp, codec.num_layers)
            recipe = in_method(recipe, codec.space.method, codec.num_layers, codec.space.fixed)
            unknown = sorted({m.model for m in recipe.models} - set(codec.models))
            if unknown or recipe.base_model != codec.base_model:
                raise ValueError(f"its models {[m.model for m in recipe.models]} (base {recipe.base_model!r}) are not "
                                 f"this search's {list(codec.models)} (base {codec.base_model!r})")
            full = _with_defaults(recipe, codec)
            genome = codec.encode(full)
            outside = [name for name, x in zip(codec.names, genome) if not -1e-9 <= x <= 1 + 1e-9]
            if outside:
                raise ValueError(f"outside the search space's bounds: {', '.join(outside)}")
            genome = np.clip(genome, 0.0, 1.0)
            decoded = codec.decode(genome)
            differ = _differences(full, decoded, codec)
            if differ:
                raise ValueError("the search space cannot hold it exactly: " + "; ".join(differ))
            points.append(StartPoint(label, genome, decoded))
        except ConfigError as exc:
            problems.extend(f"{where}: {line}" for line in exc.problems)
        except (ValueError, KeyError, OSError) as exc:
            problems.append(f"{where}: {exc}")
    popsize = exp.optimizer.resolved_popsize(codec.dim)
    if len(exp.optimizer.start_from) > popsize:
        problems.append(f"optimizer.start_from: {len(exp.optimizer.start_from)} start recipes for a population of "
                        f"{popsize}; list fewer or raise optimizer.popsize")
    if problems:
        raise ConfigError(problems)
    return points


def _with_defaults(recipe: Recipe, codec: "PSCodec") -> Recipe:
    """The recipe with every searched parameter set: a model it leaves out gets weight 0 (it adds
    nothing), a missing per-model or global parameter its method's default (e.g. density 1)."""
    from evomerge.method_specs import SPECS

    spec = SPECS[codec.space.method]

    def filled(settings: dict, names: Sequence[str], specs: Mapping, where: str) -> dict:
        for p in names:
            if p not in settings:
                if specs[p].default is None:
                    raise ValueError(f"{where}{p}: not set, and {codec.space.method} has no default for it")
                settings[p] = specs[p].default
        return settings

    given = {m.model: m for m in recipe.models}
    models = [ModelParams(model=name, parameters=filled(
        dict(given[name].parameters) if name in given else {"weight": 0.0}, codec.model_params,
        spec.model_parameters, f"{name}.")) for name in codec.models]
    glob = filled(dict(recipe.parameters), codec.global_params, spec.global_parameters, "")
    return Recipe(method=recipe.method, base_model=recipe.base_model, models=tuple(models), parameters=glob,
                  seed=recipe.seed, dtype=recipe.dtype)


def _differences(recipe: Recipe, decoded: Recipe, codec: "PSCodec") -> list[str]:
    """Where the recipe its genome decodes to is not the start recipe (a setting the space fixes
    to another value, or leaves at a default the recipe does not use)."""
    from evomerge.method_specs import SPECS

    spec = SPECS[codec.space.method]
    out = []
    groups = codec.num_layers + 2
    for mp in decoded.models:
        want = recipe.model_params(mp.model)
        for name in sorted(set(mp.parameters) | set(want.parameters)):
            default = spec.model_parameters[name].default if name in spec.model_parameters else None
            a, b = ([m.value(name, g, codec.num_layers) if name in m.parameters else default for g in range(groups)]
                    for m in (want, mp))
            if any(x is None or y is None or abs(float(x) - float(y)) > 1e-9 for x, y in zip(a, b)):
                out.append(f"{mp.model}.{name} is {a} in the recipe, {b} in the space")
    for name in sorted(set(decoded.parameters) | set(recipe.parameters)):
        default = spec.global_parameters[name].default if name in spec.global_parameters else None
        a, b = recipe.parameters.get(name, default), decoded.parameters.get(name, default)
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-9):
            out.append(f"{name} is {a} in the recipe, {b} in the space")
    return out


def describe(points: Sequence[StartPoint]) -> str:
    """One line for the progress output."""
    return f"the first generation evaluates {len(points)} start recipe(s): " + "; ".join(p.label for p in points)
