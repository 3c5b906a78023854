"""Source models' files: lazy safetensors handles, and the checks that sources can be merged at all.

The resident and the streaming merge read full models' weights from here (one tensor at a time,
never a pickled checkpoint) and refuse, before merging anything, sources whose tensors or
``config.json`` files differ from the base's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

from safetensors import safe_open

from evomerge.errors import MergeError

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



def check_configs(dirs: Mapping[str, Path], base_model: str) -> None:
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


def check_same_tensors(shapes: Mapping[str, Mapping[str, tuple[int, ...]]], base_model: str) -> None:
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
