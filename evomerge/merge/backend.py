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

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from evomerge.adapters import LowRank, is_adapter_dir, load_factors
from evomerge.architecture import Architecture, for_model_dir, for_sources, for_tensor_names
from evomerge.errors import MergeError
from evomerge.merge.cpu_threads import merge_pool, one_thread
from evomerge.merge.low_rank import BASE, ZERO_DELTAS_GIVE_BASE, dense_rows, low_rank_merge
from evomerge.merge.merge_plan import MergePlan, plan_recipe, tensor_seed
from evomerge.merge.parameter_space import merge_tensor
from evomerge.merge.source_files import check_configs, check_same_tensors, open_tensor_handles
from evomerge.recipe import Recipe


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
            check_configs(full, base_model)

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

        check_configs(dirs, base_model)
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
        check_same_tensors(shapes, base_model)
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
