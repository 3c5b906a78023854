"""Merge methods as data: the parameters each accepts, with mergekit 0.1.5's names, defaults and
per-method rules (``merge_methods/registry.py``), and whether it needs a base model.

Search spaces (``space/``), recipes, the mergekit export and the merge code all read these
specs; only :mod:`evomerge.merge.methods` attaches the tensor functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

ParamDefault = Union[bool, float, None]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method accepts.

    ``default`` is mergekit's default (``None``: required). ``kwarg`` is the function
    keyword it feeds (per-model values are passed as one sequence, e.g. ``weights``);
    ``None`` means mergekit accepts the parameter for this method but it has no effect.
    ``bounds`` (inclusive) is checked by evomerge; mergekit does not check it.
    """

    name: str
    default: ParamDefault
    kwarg: str | None
    kind: type = float
    bounds: tuple[float, float] | None = None

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class MethodSpec:
    """What a merge method accepts (as data: search spaces, recipes and exports read it without
    the tensor code)."""

    name: str
    model_parameters: Mapping[str, ParamSpec]
    global_parameters: Mapping[str, ParamSpec]
    needs_base: bool
    """True: ``fn(base, deltas, ...)`` and the base model is not a weighted input.
    False (linear): ``fn(tensors, ...)`` over the listed models, base included if listed."""
    random: bool
    """True: ``fn`` takes a ``generator`` (DARE)."""
    reference: str


def _specs(*specs: ParamSpec) -> dict[str, ParamSpec]:
    return {s.name: s for s in specs}


def _gta_globals(*, normalize: bool, rescale: bool, consensus: bool, sparsify: bool) -> dict[str, ParamSpec]:
    return _specs(
        ParamSpec("normalize", normalize, "normalize", bool),
        ParamSpec("rescale", rescale, "rescale" if sparsify else None, bool),
        ParamSpec("lambda", 1.0, "lambda_"),
        ParamSpec("int8_mask", False, "int8_mask" if consensus else None, bool),
    )


_WEIGHT = ParamSpec("weight", None, "weights")
_DENSITY = ParamSpec("density", 1.0, "densities", bounds=(0.0, 1.0))
_DENSITY_IGNORED = ParamSpec("density", 1.0, None, bounds=(0.0, 1.0))
_GAMMA = ParamSpec("gamma", 0.01, "gammas", bounds=(0.0, 1.0))
_EPSILON = ParamSpec("epsilon", 0.15, "epsilons", bounds=(0.0, 1.0))

SPECS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            name="linear",
            model_parameters=_specs(_WEIGHT),
            global_parameters=_specs(ParamSpec("normalize", True, "normalize", bool)),
            needs_base=False,
            random=False,
            reference="https://arxiv.org/abs/2203.05482",
        ),
        MethodSpec(
            name="task_arithmetic",
            model_parameters=_specs(_WEIGHT, _DENSITY_IGNORED),
            global_parameters=_gta_globals(normalize=False, rescale=False, consensus=False, sparsify=False),
            needs_base=True,
            random=False,
            reference="https://arxiv.org/abs/2212.04089",
        ),
        MethodSpec(
            name="ties",
            model_parameters=_specs(_WEIGHT, _DENSITY),
            global_parameters=_gta_globals(normalize=True, rescale=False, consensus=True, sparsify=True),
            needs_base=True,
            random=False,
            reference="https://arxiv.org/abs/2306.01708",
        ),
        MethodSpec(
            name="dare_ties",
            model_parameters=_specs(_WEIGHT, _DENSITY),
            global_parameters=_gta_globals(normalize=False, rescale=True, consensus=True, sparsify=True),
            needs_base=True,
            random=True,
            reference="https://arxiv.org/abs/2311.03099",
        ),
        MethodSpec(
            name="dare_linear",
            model_parameters=_specs(_WEIGHT, _DENSITY),
            global_parameters=_gta_globals(normalize=False, rescale=True, consensus=False, sparsify=True),
            needs_base=True,
            random=True,
            reference="https://arxiv.org/abs/2311.03099",
        ),
        MethodSpec(
            name="breadcrumbs",
            model_parameters=_specs(_WEIGHT, _DENSITY, _GAMMA),
            global_parameters=_gta_globals(normalize=False, rescale=False, consensus=False, sparsify=True),
            needs_base=True,
            random=False,
            reference="https://arxiv.org/abs/2312.06795",
        ),
        MethodSpec(
            name="breadcrumbs_ties",
            model_parameters=_specs(_WEIGHT, _DENSITY, _GAMMA),
            global_parameters=_gta_globals(normalize=False, rescale=False, consensus=True, sparsify=True),
            needs_base=True,
            random=False,
            reference="https://arxiv.org/abs/2312.06795",
        ),
        MethodSpec(
            name="della",
            model_parameters=_specs(_WEIGHT, _DENSITY, _EPSILON),
            global_parameters=_gta_globals(normalize=True, rescale=True, consensus=True, sparsify=True),
            needs_base=True,
            random=True,
            reference="https://arxiv.org/abs/2406.11617",
        ),
        MethodSpec(
            name="della_linear",
            model_parameters=_specs(_WEIGHT, _DENSITY, _EPSILON),
            global_parameters=_gta_globals(normalize=False, rescale=True, consensus=False, sparsify=True),
            needs_base=True,
            random=True,
            reference="https://arxiv.org/abs/2406.11617",
        ),
        MethodSpec(
            name="model_stock",
            model_parameters={},
            global_parameters=_specs(ParamSpec("filter_wise", False, "filter_wise", bool)),
            needs_base=True,
            random=False,
            reference="https://arxiv.org/abs/2403.19522",
        ),
        MethodSpec(
            name="slerp",
            model_parameters={},
            global_parameters=_specs(ParamSpec("t", None, "t", bounds=(0.0, 1.0))),
            needs_base=True,
            random=False,
            reference="https://en.wikipedia.org/wiki/Slerp",
        ),
    )
}
