"""Source weights resident on one device for a whole search; merge into a preallocated model.

:class:`ResidentSources` loads every source model once (safetensors only), keeps the
base model's tensors and each other model's task vector (``source - base``, computed
once, in the merge dtype, stacked per tensor), and merges a :class:`~evomerge.recipe.Recipe`
tensor by tensor straight into a model's ``state_dict()``: per candidate only the
coefficients change, and no full-model temporary is made.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from evomerge.errors import MergeError
from evomerge.merge.methods import MergeMethod, get_method
from evomerge.merge.parameter_space import merge_tensor, resolve_parameters, tensor_group
from evomerge.recipe import ModelParams, Recipe

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BLOCK = re.compile(r"model\.layers\.(\d+)\.")


def tensor_seed(seed: int, tensor_name: str) -> int:
    """Seed of the DARE generator for one tensor: a stable hash of ``(seed, tensor_name)``.

    It depends on nothing else (not the order tensors are merged in, the process, or
    the machine), so a recipe's random drops are reproducible anywhere.
    """
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def open_tensor_handles(dirs: Mapping[str, Path], stack: ExitStack) -> dict[str, dict[str, object]]:
    """``{model: {tensor name: open safetensors handle}}`` over each model dir's files (lazy:
    nothing is read until ``get_tensor``); the handles close with ``stack``."""
    handles: dict[str, dict[str, object]] = {}
    for model, directory in dirs.items():
        handles[model] = {}
        for file in _safetensors_files(Path(directory)):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for key in handle.keys():
                if key in handles[model]:
                    raise MergeError(f"{model}: tensor {key!r} appears in more than one file")
                handles[model][key] = handle
    return handles


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [directory / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MergeError(
            f"{directory}: no *.safetensors weights found (weights are loaded only from "
            "safetensors, never from pickled checkpoints)"
        )
    return files


@dataclass(frozen=True)
class _Plan:
    """A validated recipe, ready to apply tensor by tensor."""

    method: MergeMethod
    models: tuple[ModelParams, ...]  # the inputs the method sees, in recipe order
    delta_rows: tuple[int | None, ...]  # row of each input in the stacked deltas; None: base
    all_rows: bool  # the inputs are exactly the stored deltas, in order (no copy needed)
    global_params: Mapping[str, bool | float]
    seed: int


class ResidentSources:
    """Source weights held in memory (on one device) for a whole search; task vectors computed once."""

    def __init__(
        self,
        *,
        names: tuple[str, ...],
        base_model: str,
        base: dict[str, Tensor],
        deltas: dict[str, Tensor],
        num_layers: int,
        dtype: torch.dtype,
    ) -> None:
        """Use :meth:`from_model_dirs` or :meth:`from_state_dicts`.

        ``base`` holds every tensor of the base model; ``deltas[name]`` is the stacked
        ``[len(names) - 1, ...]`` task vectors of the other models (in ``names`` order)
        for each floating-point tensor. Non-floating tensors (integer buffers) have no
        deltas and are copied from the base.
        """
        self.names = names
        self.base_model = base_model
        self.num_layers = num_layers
        self.dtype = dtype
        self._base = base
        self._deltas = deltas
        self._rows = {m: i for i, m in enumerate(m for m in names if m != base_model)}

    # -- construction -------------------------------------------------------
    @classmethod
    def from_model_dirs(
        cls,
        dirs: Mapping[str, Path],
        base_model: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ResidentSources:
        """Load source models from Hugging Face model directories (safetensors only).

        ``dirs`` maps each source model's name to its directory (``model.safetensors``,
        or shards listed in ``model.safetensors.index.json``). Tensors are read one at a
        time, so peak memory is the resident result plus one tensor per model.
        """
        with ExitStack() as stack:
            handles = open_tensor_handles(dirs, stack)
            shapes = {
                model: {k: tuple(h.get_slice(k).get_shape()) for k, h in hs.items()}  # type: ignore[attr-defined]
                for model, hs in handles.items()
            }
            return cls._build(
                shapes, lambda m, k: handles[m][k].get_tensor(k), base_model, device, dtype  # type: ignore[attr-defined]
            )

    @classmethod
    def from_state_dicts(
        cls,
        state_dicts: Mapping[str, Mapping[str, Tensor]],
        base_model: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ResidentSources:
        """Sources from in-memory state dicts (copied to ``device``/``dtype``)."""
        shapes = {m: {k: tuple(t.shape) for k, t in sd.items()} for m, sd in state_dicts.items()}
        return cls._build(shapes, lambda m, k: state_dicts[m][k], base_model, device, dtype)

    @classmethod
    @torch.no_grad()
    def _build(
        cls,
        shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
        get: Callable[[str, str], Tensor],
        base_model: str,
        device: str,
        dtype: torch.dtype,
    ) -> ResidentSources:
        names = tuple(shapes)
        if base_model not in shapes:
            raise MergeError(f"base model {base_model!r} is not among the sources {list(names)}")
        if not dtype.is_floating_point:
            raise MergeError(f"merge dtype must be floating point, got {dtype}")
        _check_same_tensors(shapes, base_model)
        others = [m for m in names if m != base_model]
        base: dict[str, Tensor] = {}
        deltas: dict[str, Tensor] = {}
        for key, shape in shapes[base_model].items():
            b = get(base_model, key).to(device)
            if not b.is_floating_point():
                base[key] = b
                continue
            b = b.to(dtype)
            stacked = torch.empty((len(others), *shape), dtype=dtype, device=device)
            for row, model in enumerate(others):
                torch.sub(get(model, key).to(device=device, dtype=dtype), b, out=stacked[row])
            base[key] = b
            deltas[key] = stacked
        layers = [int(m.group(1)) for k in base if (m := _BLOCK.match(k))]
        return cls(
            names=names,
            base_model=base_model,
            base=base,
            deltas=deltas,
            num_layers=max(layers) + 1 if layers else 0,
            dtype=dtype,
        )

    # -- inspection ---------------------------------------------------------
    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(self._base)

    @torch.no_grad()
    def state_dict(self, model: str) -> dict[str, Tensor]:
        """The weights of source ``model`` (``base + delta``; the base's exactly), as new tensors."""
        if model not in self.names:
            raise MergeError(f"unknown source model {model!r}; known: {list(self.names)}")
        if model == self.base_model:
            return {k: t.clone() for k, t in self._base.items()}
        row = self._rows[model]
        return {
            k: (t + self._deltas[k][row]) if k in self._deltas else t.clone() for k, t in self._base.items()
        }

    # -- merging ------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, recipe: Recipe, target: Mapping[str, Tensor]) -> None:
        """Write the merge of ``recipe`` into ``target`` in place, tensor by tensor.

        ``target`` is typically ``model.state_dict()`` of a preallocated model (its
        tensors share storage with the parameters); every source tensor name must be in
        it with the same shape (dtype and device may differ: values are copied over).
        Target entries the sources lack (e.g. a tied ``lm_head.weight``) are left alone.
        Everything is checked before anything is written.
        """
        plan = self._plan(recipe)
        for key, b in self._base.items():
            dest = target.get(key)
            if dest is None:
                raise MergeError(f"target has no tensor {key!r}")
            if tuple(dest.shape) != tuple(b.shape):
                raise MergeError(f"target tensor {key!r} has shape {tuple(dest.shape)}, sources {tuple(b.shape)}")
        for key, merged in self._merged(plan):
            target[key].copy_(merged)

    @torch.no_grad()
    def merged_state_dict(self, recipe: Recipe) -> dict[str, Tensor]:
        """The merge of ``recipe`` as a new state dict (for export and tests)."""
        return dict(self._merged(self._plan(recipe)))

    def _merged(self, plan: _Plan) -> Iterator[tuple[str, Tensor]]:
        for key, b in self._base.items():
            if key not in self._deltas:
                yield key, b.clone()
                continue
            group = tensor_group(key, self.num_layers)
            stacked = self._deltas[key]
            params = [{p: mp.value(p, group) for p in mp.parameters} for mp in plan.models]
            deltas: list[Tensor | None] | Tensor
            if plan.all_rows:
                deltas = stacked
            else:
                deltas = [None if r is None else stacked[r] for r in plan.delta_rows]
            generator = None
            if plan.method.random:
                generator = torch.Generator(device=b.device)
                generator.manual_seed(tensor_seed(plan.seed, key))
            yield key, merge_tensor(plan.method, b, deltas, params, plan.global_params, generator)

    def _plan(self, recipe: Recipe) -> _Plan:
        """Validate ``recipe`` against these sources; :class:`MergeError` lists every problem."""
        method = get_method(recipe.method)
        problems: list[str] = []
        if _DTYPES[recipe.dtype] != self.dtype:
            problems.append(f"recipe dtype {recipe.dtype} differs from the sources' merge dtype {self.dtype}")
        if recipe.base_model != self.base_model:
            problems.append(f"recipe base_model {recipe.base_model!r} is not the sources' base {self.base_model!r}")
        seen: set[str] = set()
        groups = self.num_layers + 2
        for mp in recipe.models:
            if mp.model not in self.names:
                problems.append(f"unknown model {mp.model!r}; sources: {list(self.names)}")
            if mp.model in seen:
                problems.append(f"model {mp.model!r} is listed twice")
            seen.add(mp.model)
            is_input = not (method.needs_base and mp.model == self.base_model)
            for name, value in mp.parameters.items():
                where = f"{mp.model}.{name}"
                spec = method.model_parameters.get(name)
                if spec is None:
                    problems.append(
                        f"{where}: method {method.name!r} has no per-model parameter {name!r}; "
                        f"accepted: {sorted(method.model_parameters)}"
                    )
                    continue
                values = value if isinstance(value, tuple) else (value,)
                if isinstance(value, tuple) and len(value) != groups:
                    problems.append(
                        f"{where}: {len(value)} per-group values, expected {groups} "
                        f"(embed, {self.num_layers} blocks, head)"
                    )
                if spec.bounds is not None and any(not spec.bounds[0] <= v <= spec.bounds[1] for v in values):
                    problems.append(f"{where}: values {list(values)} outside {list(spec.bounds)}")
            if is_input:
                for name, spec in method.model_parameters.items():
                    if spec.required and name not in mp.parameters:
                        problems.append(f"{mp.model}: missing required parameter {name!r}")
        try:
            global_params = resolve_parameters(method.global_parameters, recipe.parameters, "parameters")
        except MergeError as exc:
            problems.append(str(exc))
            global_params = {}
        inputs = tuple(mp for mp in recipe.models if not (method.needs_base and mp.model == self.base_model))
        if not method.needs_base:
            if not inputs:
                problems.append(f"method {method.name!r} needs at least one model")
            elif global_params.get("normalize") and not problems:
                for g in range(groups):
                    if sum(mp.value("weight", g) for mp in inputs) == 0:
                        problems.append(
                            f"weights sum to 0 in group {g} and normalize is on: the merge would "
                            "divide by zero (mergekit writes inf/NaN)"
                        )
                        break
        if problems:
            raise MergeError(f"recipe cannot be merged ({len(problems)} problems):\n" + "\n".join(problems))
        rows = tuple(None if mp.model == self.base_model else self._rows[mp.model] for mp in inputs)
        return _Plan(
            method=method,
            models=inputs,
            delta_rows=rows,
            all_rows=method.needs_base and rows == tuple(range(len(self._rows))),
            global_params=global_params,
            seed=recipe.seed,
        )


def _check_same_tensors(shapes: Mapping[str, Mapping[str, tuple[int, ...]]], base_model: str) -> None:
    """:class:`MergeError` naming the first tensor whose name or shape differs from the base."""
    reference = shapes[base_model]
    for model, model_shapes in shapes.items():
        if model == base_model:
            continue
        missing = sorted(set(reference) - set(model_shapes))
        if missing:
            raise MergeError(f"source {model!r} lacks tensor {missing[0]!r} of base {base_model!r}")
        extra = sorted(set(model_shapes) - set(reference))
        if extra:
            raise MergeError(f"source {model!r} has tensor {extra[0]!r} that base {base_model!r} lacks")
        for key, shape in reference.items():
            if tuple(model_shapes[key]) != tuple(shape):
                raise MergeError(
                    f"tensor {key!r} has shape {tuple(model_shapes[key])} in {model!r} "
                    f"but {tuple(shape)} in base {base_model!r}"
                )
