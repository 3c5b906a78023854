"""Merge methods: one pure tensor function per module, and their registry.

Each :class:`MergeMethod` is a method's spec from :mod:`evomerge.method_specs` (what
mergekit's same-named method accepts: per-model and global parameters with mergekit's
per-method defaults, whether a base model is required) with its tensor function.
Parameter names are mergekit's, so recipes export to mergekit YAML unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import Tensor

from evomerge.errors import MergeError
from evomerge.method_specs import SPECS, MethodSpec, ParamSpec
from evomerge.merge.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties
from evomerge.merge.methods.dare_linear import dare_linear
from evomerge.merge.methods.dare_ties import dare_ties
from evomerge.merge.methods.della import della, della_linear
from evomerge.merge.methods.linear import linear
from evomerge.merge.methods.model_stock import model_stock
from evomerge.merge.methods.slerp import slerp
from evomerge.merge.methods.task_arithmetic import task_arithmetic
from evomerge.merge.methods.ties import ties

FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_ties": dare_ties,
    "dare_linear": dare_linear,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
    "della": della,
    "della_linear": della_linear,
    "slerp": slerp,
    "model_stock": model_stock,
}


@dataclass(frozen=True)
class MergeMethod(MethodSpec):
    """A method's spec (:mod:`evomerge.method_specs`) with its tensor function."""

    fn: Callable[..., Tensor] = None  # type: ignore[assignment]


class UnknownMethodError(MergeError, KeyError):
    """A merge method name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


METHODS: dict[str, MergeMethod] = {
    name: MergeMethod(**{f.name: getattr(spec, f.name) for f in fields(MethodSpec)}, fn=FUNCTIONS[name])
    for name, spec in SPECS.items()
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
