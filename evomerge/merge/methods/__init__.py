"""Merge methods: one pure tensor function per module, and their registry.

Each :class:`MergeMethod` records what mergekit's same-named method accepts (mergekit
0.1.5, ``merge_methods/registry.py``): per-model parameters (``weight``, ``density``),
global parameters (``normalize``, ``rescale``, ``lambda``, ``int8_mask``) with mergekit's
per-method defaults, and whether a base model is required. Parameter names are
mergekit's, so recipes export to mergekit YAML unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union

from torch import Tensor

from evomerge.errors import MergeError
from evomerge.merge.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties
from evomerge.merge.methods.dare_linear import dare_linear
from evomerge.merge.methods.dare_ties import dare_ties
from evomerge.merge.methods.della import della, della_linear
from evomerge.merge.methods.linear import linear
from evomerge.merge.methods.slerp import slerp
from evomerge.merge.methods.task_arithmetic import task_arithmetic
from evomerge.merge.methods.ties import ties

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
class MergeMethod:
    """A registered merge method: its function and the parameters it accepts."""

    name: str
    fn: Callable[..., Tensor]
    model_parameters: Mapping[str, ParamSpec]
    global_parameters: Mapping[str, ParamSpec]
    needs_base: bool
    """True: ``fn(base, deltas, ...)`` and the base model is not a weighted input.
    False (linear): ``fn(tensors, ...)`` over the listed models, base included if listed."""
    random: bool
    """True: ``fn`` takes a ``generator`` (DARE)."""
    reference: str


class UnknownMethodError(MergeError, KeyError):
    """A merge method name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


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

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            name="linear",
            fn=linear,
            model_parameters=_specs(_WEIGHT),
            global_parameters=_specs(ParamSpec("normalize", True, "normalize", bool)),
            needs_base=False,
            random=False,
            reference="https://arxiv.org/abs/2203.05482",
        ),
        MergeMethod(
            name="task_arithmetic",
            fn=task_arithmetic,
            model_parameters=_specs(_WEIGHT, _DENSITY_IGNORED),
            global_parameters=_gta_globals(normalize=False, rescale=False, consensus=False, sparsify=False),
            needs_base=True,
            random=False,
            reference="https://arxiv.org/abs/2212.04089",
        ),
        MergeMethod(
            name="ties",
            fn=ties,
            model_parameters=_specs(_WEIGHT, _DENSITY),
            global_parameters=_gta_globals(normalize=True, rescale=False, consensus=True, sparsify=True),
            needs_base=True,
            random=False,
            reference="https://arxiv.org/abs/2306.01708",
        ),
        MergeMethod(
            name="dare_ties",
            fn=dare_ties,
            model_parameters=_specs(_WEIGHT, _DENSITY),
            global_parameters=_gta_globals(normalize=False, rescale=True, consensus=True, sparsify=True),
            needs_base=True,
            random=True,
            reference="https://arxiv.org/abs/2311.03099",
        ),
        MergeMethod(
            name="dare_linear",
            fn=dare_linear,
            model_parameters=_specs(_WEIGHT, _DENSITY),
            global_parameters=_gta_globals(normalize=False, rescale=True, consensus=False, sparsify=True),
            needs_base=True,
            random=True,
            reference="https://arxiv.org/abs/2311.03099",
        ),
        MergeMethod(
            name="breadcrumbs",
            fn=breadcrumbs,
            model_parameters=_specs(_WEIGHT, _DENSITY, _GAMMA),
            global_parameters=_gta_globals(normalize=False, rescale=False, consensus=False, sparsify=True),
            needs_base=True,
            random=False,
            reference="https://arxiv.org/abs/2312.06795",
        ),
        MergeMethod(
            name="breadcrumbs_ties",
            fn=breadcrumbs_ties,
            model_parameters=_specs(_WEIGHT, _DENSITY, _GAMMA),
            global_parameters=_gta_globals(normalize=False, rescale=False, consensus=True, sparsify=True),
            needs_base=True,
            random=False,
            reference="https://arxiv.org/abs/2312.06795",
        ),
        MergeMethod(
            name="della",
            fn=della,
            model_parameters=_specs(_WEIGHT, _DENSITY, _EPSILON),
            global_parameters=_gta_globals(normalize=True, rescale=True, consensus=True, sparsify=True),
            needs_base=True,
            random=True,
            reference="https://arxiv.org/abs/2406.11617",
        ),
        MergeMethod(
            name="della_linear",
            fn=della_linear,
            model_parameters=_specs(_WEIGHT, _DENSITY, _EPSILON),
            global_parameters=_gta_globals(normalize=False, rescale=True, consensus=False, sparsify=True),
            needs_base=True,
            random=True,
            reference="https://arxiv.org/abs/2406.11617",
        ),
        MergeMethod(
            name="slerp",
            fn=slerp,
            model_parameters={},
            global_parameters=_specs(ParamSpec("t", None, "t", bounds=(0.0, 1.0))),
            needs_base=True,
            random=False,
            reference="https://en.wikipedia.org/wiki/Slerp",
        ),
    )
}


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; :class:`UnknownMethodError` lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}"
        ) from None


__all__ = [
    "METHODS",
    "MergeMethod",
    "ParamSpec",
    "UnknownMethodError",
    "dare_linear",
    "dare_ties",
    "get_method",
    "linear",
    "task_arithmetic",
    "ties",
]
