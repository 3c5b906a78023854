"""mergekit's YAML config format, both ways: a recipe as a mergekit config, and a mergekit
config as a recipe.

``mergekit_yaml`` writes what ``evomerge export --format mergekit`` gives (a PS recipe as
the same merge; a data-flow path as a passthrough merge where mergekit can express it).
``from_mergekit`` reads a mergekit config of the ``models:`` form (one merge method over
whole models, which is what evomerge's PS recipes are) so ``evomerge merge`` can run a
config written for mergekit: plain lists become gradients, ``{filter, value}`` lists
filters, exactly as mergekit reads them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from evomerge.architecture import Architecture
from evomerge.errors import ConfigError, EvomergeError
from evomerge.recipe import Conditional, Gradient, Recipe

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


# -- recipe -> mergekit ----------------------------------------------------------------------

def _mergekit_value(value: Any, arch: Architecture) -> Any:
    """A recipe setting in mergekit's syntax: a gradient is mergekit's plain list; a per-group
    tuple becomes filters on ``arch``'s tensor names (the first match wins), because mergekit
    reads a plain list as a gradient interpolated over layers."""
    if isinstance(value, Gradient):
        return list(value.gradient)
    if isinstance(value, tuple) and value and isinstance(value[0], Conditional):
        return [{**({"filter": c.filter} if c.filter is not None else {}), "value": _mergekit_value(c.value, arch)}
                for c in value]
    if isinstance(value, tuple):
        layers = len(value) - 2
        return ([{"filter": prefix, "value": value[0]} for prefix in arch.embed_prefixes]
                + [{"filter": arch.layer_prefix(i), "value": value[i + 1]} for i in range(layers)]
                + [{"value": value[-1]}])
    return value


def _mergekit_model(path: str) -> str:
    """A source path as mergekit names it: ``hf:org/name@rev`` is mergekit's ``org/name@rev``."""
    return path[3:] if path.startswith("hf:") else path


def _mergekit_ps(recipe: Recipe, model_dirs: Mapping[str, str], arch: Architecture) -> str:
    """A mergekit YAML of a PS recipe: the same method, parameters and dtype.

    Deterministic methods give the same tensors as evomerge (tests/test_mergekit_parity.py).
    DARE/DELLA draw random masks: mergekit from one global generator (``mergekit-yaml
    --random-seed``), evomerge per tensor from (recipe seed, tensor name), so those merges
    agree in distribution (keep rate, rescale), not bit for bit.
    """
    import yaml

    from evomerge.method_specs import SPECS as METHODS

    config: dict = {
        "merge_method": recipe.method,
        "dtype": recipe.dtype,
        "models": [{"model": _mergekit_model(model_dirs[m.model]),
                    "parameters": {k: _mergekit_value(v, arch) for k, v in m.parameters.items()}} for m in recipe.models],
    }
    if METHODS[recipe.method].needs_base:
        config["base_model"] = _mergekit_model(model_dirs[recipe.base_model])
    if recipe.parameters:
        config["parameters"] = {k: _mergekit_value(v, arch) for k, v in recipe.parameters.items()}
    return yaml.safe_dump(config, sort_keys=False)


def mergekit_yaml(recipe, model_dirs: Mapping[str, str], arch: Architecture) -> str:
    """A mergekit YAML for a recipe of ``arch`` models: PS recipes as the same merge; data-flow
    recipes where mergekit can express them.

    mergekit's passthrough takes the embeddings from the first slice's model and the final
    norm / lm_head from the last slice's, and knows nothing of evomerge's PS donors, so the
    path must start and end in ``embed_from`` and use source models only. Its ``scale``
    multiplies tensors, which folds a path's scales into a pre-norm family's residual
    writers, but not into a sandwich norm's ``(1 + weight)``.
    """
    import yaml

    from evomerge.recipe import DFSRecipe

    if arch.mergekit is None:
        raise EvomergeError(f"mergekit has no architecture for {arch.name}; use --format hf")
    if not isinstance(recipe, DFSRecipe):
        return _mergekit_ps(recipe, model_dirs, arch)
    steps = recipe.layers
    if recipe.donors or any(s.model not in model_dirs for s in steps):
        raise EvomergeError("this path uses a PS-merged donor, which mergekit cannot express; use --format hf")
    ends = (("starts", steps[0]), ("ends", steps[-1])) if steps else ()
    wrong = [f"{where} in {step.model}" for where, step in ends if step.model != recipe.embed_from]
    if not steps or wrong:
        raise EvomergeError(f"mergekit's passthrough takes the embeddings from the first layer's model and the head "
                            f"from the last layer's, so the path must start and end in embed_from "
                            f"({recipe.embed_from}); this one {' and '.join(wrong) or 'is empty'}; use --format hf")
    slices, cumulative = [], 1.0
    for k, step in enumerate(steps):
        cumulative *= step.scale
        source = {"model": _mergekit_model(model_dirs[step.model]), "layer_range": [step.layer, step.layer + 1]}
        if cumulative != 1.0:
            if arch.norms != "pre":
                raise EvomergeError(f"layers.{k}: this path scales the stream, which mergekit's passthrough cannot "
                                    f"fold into {arch.name}'s {arch.norms}-norm layers; use --format hf")
            inverse = 1.0 / cumulative
            source["parameters"] = {"scale": [*({"filter": w.rstrip("."), "value": inverse}
                                                for w in arch.residual_writers), {"value": 1.0}]}
        slices.append({"sources": [source]})
    return yaml.safe_dump({"merge_method": "passthrough", "dtype": recipe.dtype, "slices": slices}, sort_keys=False)


# -- mergekit -> recipe ----------------------------------------------------------------------

def is_mergekit_config(data: object) -> bool:
    """True for a mapping that looks like a mergekit config (it names a ``merge_method``)."""
    return isinstance(data, dict) and "merge_method" in data


def _recipe_syntax(value: Any) -> Any:
    """A mergekit setting in recipe syntax: mergekit's plain list of numbers (a gradient) is
    spelled ``{gradient: [...]}``, inside filters too; the recipe parser checks the rest."""
    if isinstance(value, list) and value and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 for x in value):
        return {"gradient": value}
    if isinstance(value, list):
        return [_recipe_syntax(x) for x in value]
    if isinstance(value, dict) and "value" in value:
        return {**value, "value": _recipe_syntax(value["value"])}
    return value


def _model_ref(ref: Any, where: str, base_dir: Path, problems: list[str]) -> str | None:
    """A mergekit model reference as an evomerge source path (a directory or ``hf:org/name``)."""
    if isinstance(ref, dict):
        if "path" not in ref:
            problems.append(f"{where}: a model reference mapping needs `path`")
            return None
        ref = ref["path"] + (f"@{ref['revision']}" if ref.get("revision") else "")
    if not isinstance(ref, str) or not ref:
        problems.append(f"{where}: expected a model path or Hugging Face id, got {ref!r}")
        return None
    if "+" in ref:
        problems.append(f"{where}: {ref!r} applies a LoRA (`model+lora`), which evomerge does not merge; "
                        "merge the adapter into its model first")
        return None
    for candidate in (Path(ref).expanduser(), base_dir / ref):
        if candidate.is_dir():
            return str(candidate.resolve())
    if _HUB_ID.match(ref):
        return f"hf:{ref}"
    problems.append(f"{where}: no model directory {ref!r} (relative paths are tried from the working "
                    f"directory and from {base_dir}), and it is not a Hugging Face id")
    return None


def _names(paths: list[str]) -> list[str]:
    """Short unique recipe names for the models: each path's last component."""
    names: list[str] = []
    for path in paths:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.split("@")[0].rstrip("/").split("/")[-1]) or "model"
        name, i = stem, 2
        while name in names:
            name, i = f"{stem}_{i}", i + 1
        names.append(name)
    return names


def from_mergekit(data: Mapping[str, Any], base_dir: Path = Path(".")) -> tuple[Recipe, dict[str, str]]:
    """A mergekit config (``models:`` form) as a recipe and its sources ``{name: path}``.

    :class:`ConfigError` lists every problem: slices/modules (layer stacking), LoRA
    references, tokenizer merging, an unknown method, malformed settings.
    """
    from evomerge.method_specs import SPECS as METHODS

    problems: list[str] = []
    supported = {"merge_method", "models", "base_model", "dtype", "out_dtype", "parameters",
                 "tokenizer_source", "tokenizer", "chat_template", "name"}
    for key in sorted(set(data) - supported):
        if key in ("slices", "modules"):
            problems.append(f"{key}: layer slices/modules (stacking layers) are not a parameter-space merge; "
                            "evomerge merges whole models (`models:`); data-flow layer paths are evomerge's DFS recipes")
        else:
            problems.append(f"{key}: not a mergekit config key evomerge reads")
    method = data.get("merge_method")
    if method not in METHODS:
        problems.append(f"merge_method: {method!r} is not one evomerge merges; known: {', '.join(sorted(METHODS))}")
    if data.get("tokenizer_source") not in (None, "base") or data.get("tokenizer"):
        problems.append("tokenizer_source/tokenizer: evomerge merges models that share one vocabulary and uses "
                        "the base model's tokenizer (mergekit's `tokenizer_source: base`)")
    out_dtype = data.get("out_dtype")
    dtype_name = data.get("dtype") or out_dtype
    if out_dtype and data.get("dtype") and _DTYPES.get(out_dtype) != _DTYPES.get(data["dtype"]):
        problems.append("out_dtype: evomerge writes the merge in its merge dtype; give one dtype")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        problems.append("models: a non-empty list of {model, parameters}")
        models = []
    paths: list[str | None] = []
    settings: list[dict] = []  # one per models entry (empty for a malformed one), so indices match
    for i, entry in enumerate(models):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            problems.append(f"models[{i}]: expected a mapping with `model`")
            settings.append({})
            continue
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            problems.append(f"models[{i}]: unknown key(s) {unknown}")
        paths.append(_model_ref(entry["model"], f"models[{i}].model", base_dir, problems))
        settings.append({k: _recipe_syntax(v) for k, v in (entry.get("parameters") or {}).items()})
    base_path = None
    if data.get("base_model") is not None:
        base_path = _model_ref(data["base_model"], "base_model", base_dir, problems)
    elif method in METHODS and METHODS[method].needs_base:
        problems.append(f"base_model: method {method!r} needs a base model")
    try:  # the settings, parsed and checked by the recipe's own parser (names come later)
        draft = Recipe.from_dict({
            "method": str(method), "base_model": "base",
            "models": [{"model": f"model{i}", "parameters": s} for i, s in enumerate(settings)],
            "parameters": {k: _recipe_syntax(v) for k, v in (data.get("parameters") or {}).items()},
        })
    except ValueError as exc:
        problems.extend(str(exc).splitlines())
    if dtype_name is not None and dtype_name not in _DTYPES:
        problems.append(f"dtype: {dtype_name!r}; evomerge merges in {sorted(set(_DTYPES.values()))}")
    if problems:
        raise ConfigError(problems)

    all_paths = [p for p in paths if p is not None]
    if base_path is not None and base_path not in all_paths:
        all_paths.append(base_path)
    names = dict(zip(all_paths, _names(all_paths)))
    if base_path is None:  # linear without a base: the first model's tokenizer and config
        base_path = all_paths[0]
    dtype = _DTYPES[dtype_name] if dtype_name else _stored_dtype(base_path)
    recipe = draft.model_copy(update={
        "base_model": names[base_path],
        "models": tuple(m.model_copy(update={"model": names[p]}) for p, m in zip(paths, draft.models)),  # type: ignore[index]
        "dtype": dtype,
    })
    return recipe, {name: path for path, name in names.items()}


def _stored_dtype(path: str) -> str:
    """mergekit merges in the stored dtype when the config names none: the model config's dtype."""
    config = Path(path) / "config.json"
    if not path.startswith("hf:") and config.is_file():
        stored = json.loads(config.read_text())
        name = str(stored.get("dtype") or stored.get("torch_dtype") or "float32").removeprefix("torch.")
        return _DTYPES.get(name, "float32")
    return "float32"


__all__ = ["from_mergekit", "is_mergekit_config", "mergekit_yaml"]
