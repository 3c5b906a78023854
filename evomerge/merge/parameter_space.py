"""Parameter-space (PS) merging: tensor groups and the per-tensor method dispatcher.

A recipe's per-group values (see :mod:`evomerge.recipe`) are resolved per tensor with
:meth:`evomerge.architecture.Architecture.tensor_group`; :func:`merge_tensor` applies a registered method to one tensor,
filling in mergekit's defaults for parameters the recipe leaves out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from evomerge.errors import MergeError
from evomerge.merge.methods import MergeMethod, ParamSpec, get_method

def _check_value(spec: ParamSpec, value: object, where: str) -> bool | float:
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise MergeError(f"{where}: parameter {spec.name!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeError(f"{where}: parameter {spec.name!r} must be a number, got {value!r}")
    if spec.bounds is not None and not spec.bounds[0] <= value <= spec.bounds[1]:
        raise MergeError(f"{where}: parameter {spec.name!r} = {value} is outside {list(spec.bounds)}")
    return float(value)


def resolve_parameters(
    specs: Mapping[str, ParamSpec], given: Mapping[str, object], where: str
) -> dict[str, bool | float]:
    """Values for every parameter in ``specs``: ``given`` ones checked, defaults for the rest.

    Raises :class:`MergeError` on an unknown name, a missing required one, or a wrong type.
    """
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise MergeError(f"{where}: unknown parameter(s) {unknown}; accepted: {sorted(specs)}")
    out: dict[str, bool | float] = {}
    for name, spec in specs.items():
        if name in given:
            out[name] = _check_value(spec, given[name], where)
        elif spec.required:
            raise MergeError(f"{where}: missing required parameter {name!r}")
        else:
            out[name] = spec.default  # type: ignore[assignment]
    return out


def merge_tensor(
    method: str | MergeMethod,
    base: Tensor,
    deltas: Sequence[Tensor | None] | Tensor,
    per_model_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, bool | float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Merge one tensor with ``method``.

    ``deltas[i]`` is the task vector (source - ``base``) of the i-th listed model, in
    recipe order, and ``per_model_params[i]`` its scalar parameters for this tensor;
    ``None`` marks the base model itself. Methods with a base (all but linear) skip the
    base entry and its parameters, as mergekit does; linear merges ``base + delta_i``
    (``base`` for the base entry; equal to the source itself whenever the subtraction was
    exact, as for a fine-tune within a factor 2 of its base, else within 1 ulp). A stacked ``[n, ...]`` tensor of deltas is passed on
    without copying. Missing optional parameters take mergekit's defaults.
    ``generator`` feeds DARE's random drop (``None``: torch's global generator).
    """
    spec = method if isinstance(method, MergeMethod) else get_method(method)
    if len(deltas) != len(per_model_params):
        raise MergeError(f"{len(deltas)} deltas but {len(per_model_params)} parameter sets")
    global_values = resolve_parameters(spec.global_parameters, global_params, spec.name)
    kwargs: dict[str, object] = {
        s.kwarg: global_values[name] for name, s in spec.global_parameters.items() if s.kwarg
    }

    inputs: Sequence[Tensor] | Tensor
    params = list(per_model_params)
    if isinstance(deltas, Tensor):
        inputs = deltas if spec.needs_base else base + deltas
    elif spec.needs_base:
        keep = [i for i, d in enumerate(deltas) if d is not None]
        inputs = [deltas[i] for i in keep]  # type: ignore[misc]
        params = [per_model_params[i] for i in keep]
    else:
        inputs = [base if d is None else base + d for d in deltas]

    resolved = [resolve_parameters(spec.model_parameters, p, spec.name) for p in params]
    for name, s in spec.model_parameters.items():
        if s.kwarg:
            kwargs[s.kwarg] = [r[name] for r in resolved]
    if spec.random:
        kwargs["generator"] = generator
    if spec.needs_base:
        return spec.fn(base, inputs, **kwargs)
    return spec.fn(inputs, **kwargs)
