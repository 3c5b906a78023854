"""Placement: where each tensor of a model's files lives in the loaded model's parameters.

Merges are computed tensor by tensor on the tensors as the files name and shape them (as
mergekit does: a TIES threshold or a DARE draw is per file tensor). A loaded model may hold
them otherwise: renamed (GPT-NeoX's ``embed_out`` is ``lm_head``), or converted on loading
(transformers 5 stacks a mixture-of-experts layer's per-expert ``experts.{j}.w1/w3`` tensors
into one ``experts.gate_up_proj`` parameter, and splits fused files into several parameters).
:class:`Placement` maps each file tensor to the element ranges of the parameters it fills, so
a merged file tensor is written straight into the model, in place, with no conversion per
candidate.

It is found, not described: transformers' own reverse conversion (what ``save_pretrained``
applies) is run once on *index* tensors (each parameter element holding its own position),
which tells for every element of every file tensor which parameter element it is. Runs of
consecutive positions become slice copies (a stacked expert is one contiguous run); the map is
checked to write every parameter element exactly once (tied parameters count as one).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from evomerge.errors import MergeError

_MAX_RUNS = 64  # more pieces than this per file tensor: a scattered layout, written by index


@dataclass(frozen=True)
class _Run:
    """``flat(file tensor)[start:start + length]`` is ``flat(param)[offset:offset + length]``."""

    param: str
    start: int
    offset: int
    length: int


class Placement:
    """File tensor name -> where it goes in a model (see the module docstring)."""

    def __init__(self, params: Mapping[str, Tensor], runs: Mapping[str, tuple[_Run, ...]],
                 scattered: Mapping[str, tuple[str, Tensor]], shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._params = dict(params)
        self._runs = dict(runs)
        self._scattered = dict(scattered)
        self.shapes = dict(shapes)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def param_names(self, key: str) -> tuple[str, ...]:
        """The model parameters file tensor ``key`` is written into."""
        if key in self._scattered:
            return (self._scattered[key][0],)
        return tuple(dict.fromkeys(r.param for r in self._runs[key]))

    @torch.no_grad()
    def write(self, key: str, value: Tensor) -> None:
        """Copy ``value`` (file tensor ``key``, as the files shape it) into the model's parameters."""
        if tuple(value.shape) != self.shapes[key]:
            raise MergeError(f"tensor {key!r} has shape {tuple(value.shape)}, the model's files {self.shapes[key]}")
        flat = value.reshape(-1)
        if key in self._scattered:
            name, index = self._scattered[key]
            dest = self._params[name].view(-1)
            dest.index_copy_(0, index.to(dest.device), flat.to(device=dest.device, dtype=dest.dtype))
            return
        for run in self._runs[key]:
            dest = self._params[run.param]
            if run.length == dest.numel() and run.start == 0 and flat.numel() == run.length:
                dest.copy_(value.reshape(dest.shape))
            else:
                dest.view(-1)[run.offset:run.offset + run.length].copy_(flat[run.start:run.start + run.length])

    @classmethod
    @torch.no_grad()
    def for_model(cls, model: Any, file_keys: Iterable[str] | None = None) -> "Placement":
        """The placement of ``model``'s files in ``model`` (``file_keys``: the names its files hold,
        checked against the map when given)."""
        params = _parameters(model)
        saved = _saved_names(model, params)
        runs: dict[str, tuple[_Run, ...]] = {}
        scattered: dict[str, tuple[str, Tensor]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        plain = [n for n, (file_key, _) in saved.items() if file_key is not None]
        for name in plain:  # named and shaped alike in the files: the common case, no probe
            key = saved[name][0]
            runs[key] = (_Run(name, 0, 0, params[name].numel()),)
            shapes[key] = tuple(params[name].shape)
        for group in _groups([n for n, (file_key, _) in saved.items() if file_key is None]):
            _probe(model, params, group, runs, scattered, shapes)
        placement = cls(params, runs, scattered, shapes)
        placement._check_coverage(params)
        if file_keys is not None:
            file_keys = set(file_keys)
            if file_keys != set(shapes):
                missing, extra = sorted(set(shapes) - file_keys), sorted(file_keys - set(shapes))
                raise MergeError("the model's files are not named as transformers saves this model "
                                 + (f"(the files lack {missing[:3]}" if missing else "(")
                                 + (f"{'; ' if missing else ''}the model has no place for {extra[:3]}" if extra else "")
                                 + "); load it with transformers and save it again with save_pretrained")
        return placement

    def _check_coverage(self, params: Mapping[str, Tensor]) -> None:
        """Every element of every parameter is written exactly once."""
        covered: dict[str, int] = defaultdict(int)
        for key, pieces in self._runs.items():
            for run in pieces:
                covered[run.param] += run.length
        for name, (_, index) in self._scattered.items():
            covered[self._scattered[name][0]] += index.numel()
        for name, p in params.items():
            if covered[name] != p.numel():
                raise MergeError(f"parameter {name!r}: the model's files fill {covered[name]} of its {p.numel()} "
                                 "values; evomerge cannot place this family's weights")


def _parameters(model: Any) -> dict[str, Tensor]:
    """The model's state-dict tensors, one name per storage (a tied head is its embeddings)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict(keep_vars=False).items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.device.type != "meta" else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen.add(ident)
        out[name] = tensor
    return out


def _saved_names(model: Any, params: Mapping[str, Tensor]) -> dict[str, tuple[str | None, None]]:
    """For each parameter, its name in the files when the files hold it as it is (renamed or not),
    else None (it is converted: its placement is probed)."""
    from transformers.core_model_loading import revert_weight_conversion

    out: dict[str, tuple[str | None, None]] = {}
    for name, tensor in params.items():
        probe = {name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")}
        try:
            back = revert_weight_conversion(model, probe)
        except Exception:  # a converter that needs its group: probe it with the group
            back = {}
        if len(back) == 1:
            (key, t), = back.items()
            if tuple(t.shape) == tuple(tensor.shape) and _renamed_only(model, name):
                out[name] = (key, None)
                continue
        out[name] = (None, None)
    return out


def _renamed_only(model: Any, name: str) -> bool:
    """Whether no converter (only renamings, if anything) applies to parameter ``name``."""
    from transformers.core_model_loading import WeightConverter, apply_converters

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    reverse = [c.reverse_transform() for c in conversions or ()]
    converters = [c for c in reverse if isinstance(c, WeightConverter)]
    return apply_converters(name, converters)[1] is None


def _groups(names: list[str]) -> list[list[str]]:
    """Converted parameters probed together: those of one decoder layer (a converter may join
    several of them into one file tensor), the rest as one group."""
    import re

    by_layer: dict[str, list[str]] = defaultdict(list)
    for name in names:
        m = re.search(r"\.(\d+)\.", name)
        by_layer[name[:m.end()] if m else ""].append(name)
    return list(by_layer.values())


def _probe(model: Any, params: Mapping[str, Tensor], group: list[str], runs: dict, scattered: dict,
           shapes: dict) -> None:
    """Place the file tensors of converted parameters ``group``: revert index tensors."""
    from transformers.core_model_loading import revert_weight_conversion

    total = sum(params[n].numel() for n in group)
    dtype = torch.int32 if total < 2**31 else torch.int64
    offsets, probes, start = {}, {}, 0
    for name in group:
        n = params[name].numel()
        offsets[name] = start
        probes[name] = torch.arange(start, start + n, dtype=dtype).view(params[name].shape)
        start += n
    try:
        back = revert_weight_conversion(model, probes)
    except Exception as exc:
        raise MergeError(f"cannot tell how transformers saves {group[0]!r} ({type(exc).__name__}: {exc})") from None
    bounds = sorted((offsets[n], offsets[n] + params[n].numel(), n) for n in group)
    for key, index in back.items():
        flat = index.reshape(-1).to(torch.int64)
        shapes[key] = tuple(index.shape)
        pieces = _runs_of(flat, bounds, offsets)
        if pieces is None or len(pieces) > _MAX_RUNS:
            owner = _owner(flat, bounds)
            if owner is None:
                raise MergeError(f"file tensor {key!r} is scattered over several parameters; evomerge cannot place it")
            scattered[key] = (owner, flat - offsets[owner])
        else:
            runs[key] = tuple(pieces)


def _runs_of(flat: Tensor, bounds, offsets) -> list[_Run] | None:
    """Maximal runs of consecutive positions within one parameter; None if too many."""
    if flat.numel() == 0:
        return []
    breaks = torch.nonzero(flat[1:] - flat[:-1] != 1).flatten() + 1
    if breaks.numel() > _MAX_RUNS:
        return None
    edges = [0, *breaks.tolist(), flat.numel()]
    out: list[_Run] = []
    for a, b in zip(edges, edges[1:]):
        first, last = int(flat[a]), int(flat[b - 1])
        for lo, hi, name in bounds:  # a run may cross from one parameter into the next: split it
            if last < lo or first >= hi:
                continue
            s, e = max(first, lo), min(last + 1, hi)
            out.append(_Run(name, a + (s - first), s - offsets[name], e - s))
    return out


def _owner(flat: Tensor, bounds) -> str | None:
    lo_v, hi_v = int(flat.min()), int(flat.max())
    for lo, hi, name in bounds:
        if lo <= lo_v and hi_v < hi:
            return name
    return None
