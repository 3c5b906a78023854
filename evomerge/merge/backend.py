"""Source weights resident on one device for a whole search; merge into a preallocated model.

:class:`ResidentSources` loads every source model once (safetensors only), keeps the
base model's tensors and each other model's task vector (``source - base``, computed
once, in the merge dtype, stacked per tensor), and merges a :class:`~evomerge.recipe.Recipe`
tensor by tensor straight into a model's ``state_dict()``: per candidate only the
coefficients change, and no full-model temporary is made. A source that is a LoRA adapter
(:mod:`evomerge.adapters`) is kept as its low-rank factors, never as a full task vector
(:mod:`evomerge.merge.low_rank` merges them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from evomerge.adapters import LowRank, is_adapter_dir, load_factors
from evomerge.architecture import Architecture, for_model_dir, for_sources, for_tensor_names
from evomerge.errors import MergeError
from evomerge.merge.cpu_threads import merge_pool, one_thread
from evomerge.merge.low_rank import BASE, ZERO_DELTAS_GIVE_BASE, dense_rows, low_rank_merge
from evomerge.merge.methods import MergeMethod, get_method
from evomerge.merge.parameter_space import merge_tensor
from evomerge.recipe import ModelParams, Recipe, is_per_group, resolve_setting

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors' own error names neither the model nor the file
                raise MergeError(f"source {model!r}: cannot read {file} ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); the file is corrupt "
                                 "or truncated: download or copy it again") from None
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
    if _DTYPES[recipe.dtype] != dtype:
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


class ResidentSources:
    """Source weights held in memory (on one device) for a whole search; task vectors computed once."""

    def __init__(
        self,
        *,
        names: tuple[str, ...],
        base_model: str,
        base: dict[str, Tensor],
        deltas: dict[str, "Tensor | tuple[Tensor | LowRank | None, ...]"],
        num_layers: int,
        dtype: torch.dtype,
        arch: Architecture,
    ) -> None:
        """Use :meth:`from_model_dirs` or :meth:`from_state_dicts`.

        ``base`` holds every tensor of the base model; ``deltas[name]`` is the stacked
        ``[len(names) - 1, ...]`` task vectors of the other models (in ``names`` order)
        for each floating-point tensor, or, when some sources are LoRA adapters, one row per
        other model: a dense delta, the adapter's :class:`~evomerge.adapters.LowRank` factors, or
        None where the adapter leaves the tensor alone. Non-floating tensors (integer buffers) have
        no deltas and are copied from the base.
        """
        self.names = names
        self.base_model = base_model
        self.num_layers = num_layers
        self.dtype = dtype
        self.arch = arch
        self._base = base
        self._deltas = deltas
        self._rows = {m: i for i, m in enumerate(m for m in names if m != base_model)}
        self._largest_first = sorted(base, key=lambda k: base[k].numel(), reverse=True)  # balances the CPU pool

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
        or shards listed in ``model.safetensors.index.json``), or to a PEFT LoRA adapter's
        (``adapter_config.json``: kept as its factors, see :mod:`evomerge.adapters`). Tensors are
        read one at a time, so peak memory is the resident result plus one tensor per model.
        """
        adapter_dirs = {m: Path(d) for m, d in dirs.items() if is_adapter_dir(d)}
        if base_model in adapter_dirs:
            raise MergeError(f"base model {base_model!r} is a LoRA adapter ({adapter_dirs[base_model]}); the base "
                             "must be a full model (the adapters' own base)")
        full = {m: d for m, d in dirs.items() if m not in adapter_dirs}
        arch = None
        if base_model in dirs and (Path(dirs[base_model]) / "config.json").is_file():
            arch = for_model_dir(dirs[base_model])
        if arch is not None and arch.merge_space == "modules":
            if adapter_dirs:
                raise MergeError(f"LoRA adapters as sources ({', '.join(adapter_dirs)}) on a {arch.name} base: "
                                 "this family is merged as transformers loads it (stacked experts), which adapter "
                                 "factors are not named for; give the adapters merged into full models")
            return cls._from_loaded_models(dirs, base_model, device, dtype, arch)
        with ExitStack() as stack:
            handles = open_tensor_handles(full, stack)
            shapes = {
                model: {k: tuple(h.get_slice(k).get_shape()) for k, h in hs.items()}  # type: ignore[attr-defined]
                for model, hs in handles.items()
            }
            if arch is None and base_model in dirs:
                arch = for_sources(dirs[base_model], shapes[base_model])
            _check_configs(full, base_model)

            def get(m: str, k: str) -> Tensor:
                return handles[m][k].get_tensor(k)  # type: ignore[attr-defined]
            adapters = {}
            if adapter_dirs and base_model in shapes:
                module_name = (arch or for_tensor_names(shapes[base_model])).module_name
                adapters = {m: load_factors(d, shapes[base_model], module_name, where=f"source {m!r}",
                                            base_tensor=lambda k: get(base_model, k))
                            for m, d in adapter_dirs.items()}
            order = tuple(dirs)
            return cls._build({m: shapes[m] for m in order if m in shapes}, get, base_model, device, dtype, arch,
                              adapters=adapters, order=order)

    @classmethod
    def _from_loaded_models(cls, dirs: Mapping[str, Path], base_model: str, device: str, dtype: torch.dtype,
                            arch: Architecture) -> ResidentSources:
        """Sources of a family whose files hold its weights otherwise than the model does (transformers
        5 stacks a mixture-of-experts layer's per-expert tensors into one parameter on loading):
        loaded with transformers, one model at a time, and merged as the model holds them, as
        mergekit does (a TIES threshold or a DARE draw is per stacked parameter)."""
        from transformers import AutoModelForCausalLM

        _check_configs(dirs, base_model)
        state_dicts: dict[str, dict[str, Tensor]] = {}
        for name, directory in dirs.items():
            try:
                model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True,
                                                             trust_remote_code=False)
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise MergeError(f"source {name!r}: cannot load {directory} ({type(exc).__name__}: {first}); a "
                                 "corrupt or truncated safetensors file is copied or downloaded again") from None
            tied = set(getattr(model, "all_tied_weights_keys", None) or {})
            state_dicts[name] = {k: t for k, t in model.state_dict().items() if k not in tied}
            del model
        return cls.from_state_dicts(state_dicts, base_model, device, dtype, arch)

    @classmethod
    def from_state_dicts(
        cls,
        state_dicts: Mapping[str, Mapping[str, Tensor]],
        base_model: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        arch: Architecture | None = None,
    ) -> ResidentSources:
        """Sources from in-memory state dicts (copied to ``device``/``dtype``), named as files name
        them; ``arch`` by default from the tensor names."""
        shapes = {m: {k: tuple(t.shape) for k, t in sd.items()} for m, sd in state_dicts.items()}
        return cls._build(shapes, lambda m, k: state_dicts[m][k], base_model, device, dtype, arch)

    @classmethod
    @torch.no_grad()
    def _build(
        cls,
        shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
        get: Callable[[str, str], Tensor],
        base_model: str,
        device: str,
        dtype: torch.dtype,
        arch: Architecture | None,
        adapters: Mapping[str, Mapping[str, LowRank]] | None = None,
        order: tuple[str, ...] | None = None,
    ) -> ResidentSources:
        """``shapes``: the full models' tensors; ``adapters``: the LoRA sources' factors by base tensor
        name; ``order``: every source's name, in the order recipes list them (default: ``shapes``')."""
        adapters = dict(adapters or {})
        names = order or tuple(shapes)
        if base_model not in shapes:
            raise MergeError(f"base model {base_model!r} is not among the sources {list(names)}")
        if not dtype.is_floating_point:
            raise MergeError(f"merge dtype must be floating point, got {dtype}")
        _check_same_tensors(shapes, base_model)
        arch = arch or for_tensor_names(shapes[base_model])
        arch.check_names(shapes[base_model], f"base model {base_model!r}")
        others = [m for m in names if m != base_model]
        factors = {m: {k: f.to(device, dtype) for k, f in adapters[m].items()} for m in adapters}
        base: dict[str, Tensor] = {}
        deltas: dict[str, Tensor | tuple[Tensor | LowRank | None, ...]] = {}
        for key, shape in shapes[base_model].items():
            b = get(base_model, key).to(device)
            if not b.is_floating_point():
                base[key] = b
                continue
            b = b.to(dtype)
            base[key] = b
            if not adapters:
                stacked = torch.empty((len(others), *shape), dtype=dtype, device=device)
                for row, model in enumerate(others):
                    torch.sub(get(model, key).to(device=device, dtype=dtype), b, out=stacked[row])
                deltas[key] = stacked
                continue
            deltas[key] = tuple(factors[m].get(key) if m in factors
                                else get(m, key).to(device=device, dtype=dtype) - b for m in others)
        return cls(
            names=names,
            base_model=base_model,
            base=base,
            deltas=deltas,
            num_layers=arch.count_layers(base),
            dtype=dtype,
            arch=arch,
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
        return {k: self._source_tensor(k, row) for k in self._base}

    def _source_tensor(self, key: str, row: int) -> Tensor:
        b = self._base[key]
        if key not in self._deltas:
            return b.clone()
        delta = self._deltas[key][row]
        if delta is None:  # an adapter that leaves this tensor alone
            return b.clone()
        return b + (delta.dense().to(b.dtype) if isinstance(delta, LowRank) else delta)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The sources held as LoRA factors."""
        held = {m for rows in self._deltas.values() if isinstance(rows, tuple)
                for m, r in self._rows.items() if isinstance(rows[r], LowRank)}
        return tuple(m for m in self.names if m in held)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the base and what is kept of each other source (task vectors, adapter factors)."""
        total = sum(t.numel() * t.element_size() for t in self._base.values())
        for rows in self._deltas.values():
            parts = [rows] if isinstance(rows, Tensor) else rows
            for part in parts:
                if isinstance(part, LowRank):
                    total += part.nbytes
                elif part is not None:
                    total += part.numel() * part.element_size()
        return total

    # -- merging ------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, recipe: Recipe, target: "Mapping[str, Tensor] | torch.nn.Module") -> None:
        """Write the merge of ``recipe`` into ``target`` in place, tensor by tensor.

        ``target`` is a preallocated model, or its ``state_dict()`` (its tensors share storage
        with the parameters); every source tensor name must be in it with the same shape (dtype
        and device may differ: values are copied over); names are the files' (GPT-NeoX's
        ``embed_out``), mapped to the model's (``lm_head``) by the architecture, or the model's
        own for families merged as the model holds them (see :meth:`from_model_dirs`). Target
        entries the sources lack (e.g. a tied ``lm_head.weight``) are left alone. Everything is
        checked before anything is written.
        """
        plan = self._plan(recipe)
        write = self._writer(target)
        self._each_merged(plan, write)

    def _writer(self, target) -> Callable[[str, Tensor], None]:
        """How merged tensors are copied into ``target`` (see :meth:`merge_into`), checked first."""
        if isinstance(target, torch.nn.Module):
            target = target.state_dict()
        dests = {key: target.get(self.arch.module_name(key)) for key in self._base}
        for key, b in self._base.items():
            dest = dests[key]
            if dest is None:
                raise MergeError(f"target has no tensor {self.arch.module_name(key)!r}")
            if tuple(dest.shape) != tuple(b.shape):
                raise MergeError(f"target tensor {key!r} has shape {tuple(dest.shape)}, sources {tuple(b.shape)}")
        return lambda key, value: dests[key].copy_(value)

    def write_source(self, model: str, target) -> None:
        """Write source ``model``'s own weights into ``target`` (as :meth:`merge_into` does a merge)."""
        write = self._writer(target)
        for key, tensor in self.state_dict(model).items():
            write(key, tensor)

    @torch.no_grad()
    def merged_state_dict(self, recipe: Recipe) -> dict[str, Tensor]:
        """The merge of ``recipe`` as a new state dict (for export and tests)."""
        out: dict[str, Tensor] = {}
        self._each_merged(self._plan(recipe), out.__setitem__)
        return {key: out[key].clone() if out[key] is self._base[key] else out[key] for key in self._base}

    def _each_merged(self, plan: MergePlan, consume: Callable[[str, Tensor], None]) -> None:
        """``consume(key, tensor)`` for every merged tensor, called where it was merged.

        Sparsifying methods on CPU run one torch thread per tensor, on a pool (:mod:`evomerge.merge.cpu_threads`),
        so a merge is the same bit for bit whatever the caller's thread count (a reduction's
        rounding depends on how torch splits it): the search's workers, an export and a
        stand-alone merge get the same tensors."""
        pool = merge_pool(plan.method, next(iter(self._base.values())).device)
        if pool is None:
            for key in self._base:
                consume(key, self._merge_one(plan, key))
            return

        def merge(key: str) -> None:
            one_thread()
            with torch.no_grad():  # grad mode is per thread
                consume(key, self._merge_one(plan, key))

        for _ in pool.map(merge, self._largest_first):
            pass

    def _merge_one(self, plan: MergePlan, key: str) -> Tensor:
        """The merged tensor ``key``: a function of the plan and the key alone (DARE/DELLA
        seed a generator per tensor), so tensors may be merged in any order, concurrently. It may
        be the base's own tensor (a tensor no listed adapter touches): consumers copy it."""
        b = self._base[key]
        if key not in self._deltas:
            return b.clone()
        stacked = self._deltas[key]
        params, global_params = plan.tensor_params[key]
        deltas: list[Tensor | None] | Tensor
        if isinstance(stacked, tuple):  # some sources are LoRA adapters
            entries = [BASE if r is None else stacked[r] for r in plan.delta_rows]
            if plan.method.name in ZERO_DELTAS_GIVE_BASE and all(e is None for e in entries):
                return b  # no listed adapter touches this tensor: base + 0 (copied by the consumer)
            merged = low_rank_merge(plan.method.name, b, entries, params, global_params)
            if merged is not None:
                return merged
            deltas = dense_rows(b, entries)
        elif plan.all_rows:
            deltas = stacked
        else:
            deltas = [None if r is None else stacked[r] for r in plan.delta_rows]
        generator = None
        if plan.method.random:
            generator = torch.Generator(device=b.device)
            generator.manual_seed(tensor_seed(plan.seed, key))
        return merge_tensor(plan.method, b, deltas, params, global_params, generator)

    def rows(self, key: str) -> "Tensor | tuple[Tensor | LowRank | None, ...]":
        """What is kept of the other sources for tensor ``key`` (see :meth:`__init__`)."""
        return self._deltas[key]

    def base_tensor(self, key: str) -> Tensor:
        """The base's tensor ``key`` (not a copy)."""
        return self._base[key]

    def plan(self, recipe: Recipe) -> MergePlan:
        """Validate ``recipe`` against these sources; :class:`MergeError` lists every problem."""
        return self._plan(recipe)

    def _plan(self, recipe: Recipe) -> MergePlan:
        """Validate ``recipe`` against these sources; :class:`MergeError` lists every problem."""
        return plan_recipe(recipe, names=self.names, base_model=self.base_model, tensors=self._deltas,
                           num_layers=self.num_layers, dtype=self.dtype, arch=self.arch)


def _check_configs(dirs: Mapping[str, Path], base_model: str) -> None:
    """:class:`MergeError` listing why sources with ``config.json`` files cannot be merged in
    parameter space (another family, hidden size, layers, vocabulary, head layout): two
    families can share tensor names and shapes, so equal tensors alone do not prove it."""
    from evomerge.architecture import source_problems

    configs = {m: json.loads((Path(d) / "config.json").read_text()) for m, d in dirs.items()
               if (Path(d) / "config.json").is_file()}
    if base_model in configs and len(configs) > 1:
        problems = source_problems(configs, ps_models=tuple(configs), base_model=base_model)
        if problems:
            raise MergeError("the sources cannot be merged:\n" + "\n".join(problems))


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
