"""Streaming merge: a PS recipe written to disk tensor by tensor, for models larger than memory.

:class:`~evomerge.merge.backend.ResidentSources` keeps every source in memory (the search's
fast path). ``stream_merge`` never does: it opens each source's safetensors files lazily,
and for one tensor name at a time reads the base's and the sources' tensors, merges them with
the same per-tensor function and the same per-tensor DARE/DELLA seeds (so its output equals
the resident merge exactly), and appends the result to the current output shard, which is
written out and released whenever it reaches ``shard_bytes``. Peak memory is one tensor per
source, the merge's scratch, and one shard. The result is a standard sharded Hugging Face
model dir (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import shutil
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from evomerge.architecture import for_sources
from evomerge.errors import MergeError
from evomerge.merge.merge_plan import DTYPES, plan_recipe, tensor_seed
from evomerge.merge.source_files import check_same_tensors, open_tensor_handles
from evomerge.merge.cpu_threads import merge_pool, one_thread
from evomerge.merge.parameter_space import merge_tensor
from evomerge.recipe import Recipe

# files of the base model's dir that describe the model rather than hold weights
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "vocab.json", "merges.txt")


@dataclass
class StreamStats:
    tensors: int = 0
    shards: int = 0
    max_resident_inputs: int = 0  # source tensors alive at once (read for the current tensor)
    max_shard_bytes: int = 0
    bytes_written: int = 0


class _Alive:
    """Counts the tensors read for the merge that are still alive (weak references)."""

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []

    def add(self, t: torch.Tensor) -> None:
        self._refs.append(weakref.ref(t))

    def count(self) -> int:
        self._refs = [r for r in self._refs if r() is not None]
        return len(self._refs)


def stream_merge(recipe: Recipe, model_dirs: Mapping[str, Path], out_dir: Path,
                 shard_bytes: int = 2 * 1024 ** 3) -> StreamStats:
    """Merge ``recipe`` from the model dirs into ``out_dir`` without loading any model whole."""
    from evomerge.adapters import is_adapter_dir

    adapters = sorted(m for m, d in model_dirs.items() if is_adapter_dir(d))
    if adapters:
        raise MergeError(f"{', '.join(adapters)}: LoRA adapters; a streaming merge reads full models tensor by "
                         "tensor, and adapters are merged resident (the base once, each adapter as its small "
                         "factors): merge without --stream")
    dtype = DTYPES[recipe.dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = StreamStats()
    alive = _Alive()
    with ExitStack() as stack:
        handles = open_tensor_handles(model_dirs, stack)
        if recipe.base_model not in handles:
            raise MergeError(f"base model {recipe.base_model!r} is not among the sources {list(handles)}")
        shapes = {m: {k: tuple(h.get_slice(k).get_shape()) for k, h in hs.items()} for m, hs in handles.items()}
        check_same_tensors(shapes, recipe.base_model)
        names = tuple(handles)
        arch = for_sources(model_dirs[recipe.base_model], shapes[recipe.base_model])
        if arch.merge_space == "modules":
            raise MergeError(f"{arch.name}'s files hold its weights otherwise than the model does (e.g. one tensor per "
                             "expert, which transformers stacks on loading), and merges work on the model's; a "
                             "streaming merge reads the files tensor by tensor: merge without --stream")
        arch.check_names(shapes[recipe.base_model], f"base model {recipe.base_model!r}")
        num_layers = arch.count_layers(shapes[recipe.base_model])
        # validation, input order and per-tensor parameters exactly as the resident backend's
        floating = [k for k, h in handles[recipe.base_model].items()
                    if h.get_slice(k).get_dtype().startswith(("F", "BF"))]  # type: ignore[attr-defined]
        plan = plan_recipe(recipe, names=names, base_model=recipe.base_model, tensors=floating,
                           num_layers=num_layers, dtype=dtype, arch=arch)
        inputs = [None if row is None else mp.model for mp, row in zip(plan.models, plan.delta_rows)]

        def read(model: str, key: str) -> torch.Tensor:
            t = handles[model][key].get_tensor(key)  # type: ignore[attr-defined]
            alive.add(t)
            return t

        shard: dict[str, torch.Tensor] = {}
        shard_size = 0
        weight_map: dict[str, int] = {}

        def flush() -> None:
            nonlocal shard, shard_size
            if not shard:
                return
            stats.shards += 1
            save_file(shard, str(out_dir / f".shard-{stats.shards:05d}.safetensors"), metadata={"format": "pt"})
            stats.bytes_written += shard_size
            for k in shard:
                weight_map[k] = stats.shards
            shard, shard_size = {}, 0

        pool = merge_pool(plan.method, torch.device("cpu"))
        for key in shapes[recipe.base_model]:
            with torch.no_grad():
                base = read(recipe.base_model, key)
                if base.is_floating_point():
                    base = base.to(dtype)
                    alive.add(base)
                    deltas = []
                    for model in inputs:
                        if model is None:
                            deltas.append(None)
                        else:
                            delta = read(model, key).to(dtype) - base
                            alive.add(delta)
                            deltas.append(delta)
                    params, global_params = plan.tensor_params[key]
                    generator = None
                    if plan.method.random:
                        generator = torch.Generator().manual_seed(tensor_seed(plan.seed, key))
                    stats.max_resident_inputs = max(stats.max_resident_inputs, alive.count())
                    if pool is None:
                        merged = merge_tensor(plan.method, base, deltas, params, global_params, generator)
                    else:  # one torch thread, as the resident merge: the same bits (see cpu_threads)
                        merged = pool.submit(_merge_no_grad, plan.method, base, deltas, params, global_params,
                                             generator).result()
                    del deltas
                else:
                    merged = base
            merged = merged.contiguous()
            if shard and shard_size + merged.numel() * merged.element_size() > shard_bytes:
                flush()
            shard[key] = merged
            shard_size += merged.numel() * merged.element_size()
            stats.max_shard_bytes = max(stats.max_shard_bytes, shard_size)
            stats.tensors += 1
            del merged, base
        flush()

    # final names: model.safetensors for one shard, else model-0000i-of-0000n + an index
    if stats.shards == 1:
        (out_dir / ".shard-00001.safetensors").rename(out_dir / "model.safetensors")
    else:
        names_of = {i: f"model-{i:05d}-of-{stats.shards:05d}.safetensors" for i in range(1, stats.shards + 1)}
        for i, name in names_of.items():
            (out_dir / f".shard-{i:05d}.safetensors").rename(out_dir / name)
        index = {"metadata": {"total_size": stats.bytes_written},
                 "weight_map": {k: names_of[i] for k, i in weight_map.items()}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    base_dir = Path(model_dirs[recipe.base_model])
    for name in _COPY:
        if (base_dir / name).is_file():
            shutil.copy(base_dir / name, out_dir / name)
    config = out_dir / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["dtype"] = recipe.dtype
        data.pop("torch_dtype", None)
        config.write_text(json.dumps(data, indent=2))
    return stats


def _merge_no_grad(*args) -> "torch.Tensor":
    one_thread()
    with torch.no_grad():  # grad mode is per thread
        return merge_tensor(*args)
