"""LoRA adapters as sources: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` on a named base.

A source directory holding ``adapter_config.json`` is a LoRA adapter, not a full model. Its
weights are read as the low-rank factors PEFT saved, one :class:`LowRank` per adapted tensor of
the base, named as the base's files name them; :mod:`evomerge.merge.backend` keeps them so (a
few MB per adapter) beside one resident base, and merges them exactly as the same method
merges the full models PEFT's ``merge_and_unload`` would write:

* a linear layer's delta is ``(B @ A) * scaling`` (transposed for ``fan_in_fan_out`` layers,
  GPT-2's Conv1D), an embedding's ``(B @ A).T * scaling``, exactly as PEFT computes it;
* ``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with
  ``rank_pattern`` / ``alpha_pattern`` matched per module as PEFT matches them (a different rank
  per adapter, or per module, is fine: ``r`` is read from the factors' shapes).

What PEFT can save but cannot be written as base + low-rank delta is refused with the reason:
DoRA (a per-column magnitude rescales the whole weight), trained biases, ``modules_to_save``
(full copies of modules), other PEFT types, and an adapter whose saved embedding copy differs
from the base's (a resized vocabulary: a different base).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from evomerge.errors import ConfigError, MergeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                  r"|base_layer\.weight|base_layer\.bias|lora_magnitude_vector(?:\.weight)?)$")


@dataclass(frozen=True)
class LowRank:
    """One adapted tensor's delta as PEFT holds it: ``transpose(B @ A) * scaling``.

    ``B`` is ``[out, r]``, ``A`` ``[r, in]``; ``transpose`` for embeddings and ``fan_in_fan_out``
    layers, whose weight is stored ``[in, out]``.
    """

    B: Tensor
    A: Tensor
    scaling: float
    transpose: bool

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        out, inp = int(self.B.shape[0]), int(self.A.shape[1])
        return (inp, out) if self.transpose else (out, inp)

    def dense(self) -> Tensor:
        """The delta as a full tensor, computed as PEFT's ``get_delta_weight`` does (same ops, same order)."""
        product = self.B @ self.A
        return (product.T if self.transpose else product) * self.scaling

    def to(self, device: str | torch.device, dtype: torch.dtype) -> "LowRank":
        return LowRank(self.B.to(device=device, dtype=dtype), self.A.to(device=device, dtype=dtype),
                       self.scaling, self.transpose)

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()


@dataclass(frozen=True)
class AdapterConfig:
    """What of a PEFT LoRA ``adapter_config.json`` decides its delta."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    base_model_name_or_path: Optional[str]
    target_modules: Any

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's ``scaling`` of ``module`` (its full module path) with factors of rank ``rank``."""
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def adapter_location(path: str | Path, download: bool = False) -> Optional[Path]:
    """The local directory of the PEFT adapter at ``path`` (a directory, or ``hf:org/name`` in the
    Hub cache, or fetched from the Hub with ``download``: its config alone); None when ``path`` is
    no adapter (or a Hub repo not cached and not ``download``: not known yet)."""
    from evomerge.sources import cached_file, is_hub, parse_hub

    found = cached_file(str(path), ADAPTER_CONFIG)
    if found is None and download and is_hub(str(path)):
        from huggingface_hub import hf_hub_download

        repo, revision = parse_hub(str(path))
        try:
            found = Path(hf_hub_download(repo_id=repo, filename=ADAPTER_CONFIG, revision=revision))
        except Exception:  # no such file (a full model), or the Hub unreachable: model_config says which
            return None
    return found.parent if found is not None else None


def is_adapter_dir(path: str | Path, download: bool = False) -> bool:
    """``path`` holds a PEFT adapter (``adapter_config.json``), locally or in the Hub cache
    (``download``: or on the Hub)."""
    return adapter_location(path, download) is not None


def read_config(directory: str | Path, where: str = "adapter") -> AdapterConfig:
    """The adapter's config; :class:`ConfigError` listing why evomerge cannot merge it exactly."""
    file = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError([f"{where}: cannot read {file} ({type(exc).__name__}: {exc})"]) from None
    problems = []
    if raw.get("peft_type", "LORA") != "LORA":
        problems.append(f"{where}: a {raw.get('peft_type')} adapter; only LoRA adapters can be sources")
    if raw.get("use_dora"):
        problems.append(f"{where}: a DoRA adapter (use_dora); its magnitude vector rescales the whole weight, "
                        "which is no low-rank delta: merge it into a full model (PEFT merge_and_unload) and "
                        "give that directory instead")
    if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
        problems.append(f"{where}: the adapter trains biases (bias: {raw.get('bias')!r}, lora_bias: "
                        f"{raw.get('lora_bias')!r}); only weight deltas are merged: give the merged full model instead")
    if raw.get("modules_to_save"):
        problems.append(f"{where}: the adapter saves whole modules ({raw['modules_to_save']}); give the merged "
                        "full model (PEFT merge_and_unload) instead")
    if raw.get("layer_replication"):
        problems.append(f"{where}: the adapter replicates layers (layer_replication): a model of another depth")
    if raw.get("target_parameters"):
        problems.append(f"{where}: the adapter targets parameters ({raw['target_parameters']}), not modules; "
                        "not supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(raw.get(key), (int, float)) or isinstance(raw.get(key), bool) or raw.get(key) <= 0:
            problems.append(f"{where}: {ADAPTER_CONFIG} has no positive {key!r}")
    if problems:
        raise ConfigError(problems)
    return AdapterConfig(
        r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]), use_rslora=bool(raw.get("use_rslora")),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out")), rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        base_model_name_or_path=raw.get("base_model_name_or_path"), target_modules=raw.get("target_modules"))


def _names(path: str) -> set[str]:
    """The names one base path goes by: as written, without ``hf:``/a revision, resolved if local."""
    names = {path}
    if path.startswith("hf:"):
        names.add(path[3:].split("@", 1)[0])
    else:
        try:
            names.add(str(Path(path).expanduser().resolve()))
        except OSError:
            pass
    return names


def base_problem(adapter: str, config: AdapterConfig, base_name: str, base_path: str,
                 trained_on: Optional[str] = None) -> Optional[str]:
    """Why adapter source ``adapter`` does not name the experiment's base (``base_name`` at
    ``base_path``), or None. ``trained_on`` (the source's ``base`` key) is the user's word that the
    base is the model the adapter names (a local copy of a Hub model); it must be that name."""
    named = config.base_model_name_or_path
    if trained_on is not None:
        if named and not (_names(trained_on) & _names(named)):
            return (f"models: {adapter}: `base: {trained_on}` is not what its {ADAPTER_CONFIG} names "
                    f"({named!r})")
        return None
    if not named or _names(named) & _names(base_path):
        return None  # an adapter that names no base is checked by its factors' shapes alone
    return (f"models: {adapter}: a LoRA adapter trained on {named!r}, but the experiment's base "
            f"{base_name!r} is {base_path}; if that is a copy of {named!r}, say so with `base: {named}` "
            "on the adapter's entry")


def load_factors(directory: str | Path, base_shapes: Mapping[str, tuple[int, ...]],
                 module_name: Callable[[str], str], where: str = "adapter",
                 base_tensor: Optional[Callable[[str], Tensor]] = None) -> dict[str, LowRank]:
    """``{base tensor name: LowRank}`` of the adapter in ``directory``.

    ``base_shapes`` are the base's tensors as its files name them; ``module_name`` maps such a name
    to the model's module path, which PEFT's keys use. Every factor must meet a base weight of the
    right shape; :class:`MergeError` names the first that does not. Saved copies of the base's
    embedding layers (PEFT saves them beside embedding adapters) are checked against
    ``base_tensor`` and must equal it.
    """
    from safetensors import safe_open

    try:
        config = read_config(directory, where)
    except ConfigError as exc:
        raise MergeError("\n".join(exc.problems)) from None
    file = Path(directory) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise MergeError(f"{where}: {file} is missing (adapters are read from safetensors only)")
    by_module = {module_name(k)[: -len(".weight")]: k for k in base_shapes if k.endswith(".weight")}
    parts: dict[str, dict[str, Tensor]] = {}
    try:
        handle_cm = safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:
        raise MergeError(f"{where}: cannot read {file} ({type(exc).__name__}); copy or download it again") from None
    with handle_cm as handle:
        for key in handle.keys():
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _KEY.match(name)
            if m is None:
                raise MergeError(f"{where}: {ADAPTER_WEIGHTS} holds {key!r}, which is no LoRA factor evomerge "
                                 "knows (lora_A/lora_B, lora_embedding_A/B)")
            part = m.group("part")
            if part.startswith("lora_magnitude"):
                raise MergeError(f"{where}: holds a DoRA magnitude vector ({key!r}); DoRA is not a low-rank delta")
            if part == "base_layer.bias":
                raise MergeError(f"{where}: holds a bias ({key!r}); only weight deltas are merged")
            parts.setdefault(m.group("module"), {})[part] = handle.get_tensor(key)
    out: dict[str, LowRank] = {}
    for module, found in sorted(parts.items()):
        tensor = by_module.get(module)
        if tensor is None:
            raise MergeError(f"{where}: adapts module {module!r}, which the base has no weight for")
        if "base_layer.weight" in found:
            copy = found.pop("base_layer.weight")
            own = base_tensor(tensor) if base_tensor is not None else None
            if tuple(copy.shape) != tuple(base_shapes[tensor]) or (
                    own is not None and not torch.equal(copy.to(own.dtype), own)):
                raise MergeError(f"{where}: its saved copy of {module!r} differs from the base's (a resized or "
                                 "retrained vocabulary): it was trained on another base")
        if not found:
            continue
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_key not in found or b_key not in found:
            raise MergeError(f"{where}: module {module!r} has {sorted(found)} but needs both {a_key} and {b_key}")
        A, B = found[a_key], found[b_key]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MergeError(f"{where}: module {module!r}: factors of shapes {tuple(B.shape)} @ {tuple(A.shape)} "
                             "do not multiply (only linear and embedding layers are supported)")
        factor = LowRank(B=B, A=A, scaling=config.scaling(module, int(A.shape[0])),
                         transpose=embedding or config.fan_in_fan_out)
        if factor.shape != tuple(base_shapes[tensor]):
            raise MergeError(f"{where}: module {module!r}: its delta is {factor.shape}, the base's weight "
                             f"{tuple(base_shapes[tensor])}: trained on another base")
        out[tensor] = factor
    if not out:
        raise MergeError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA factors")
    return out


def adapter_params(directory: str | Path) -> int:
    """How many numbers the adapter's LoRA factors hold (what a worker keeps of it; saved copies of
    the base's embeddings are not kept). Reads the file's header only."""
    from safetensors import safe_open

    total = 0
    with safe_open(str((adapter_location(directory) or Path(directory)) / ADAPTER_WEIGHTS), framework="pt", device="cpu") as handle:
        for key in handle.keys():
            if ".lora_" in key:
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def write_adapter(directory: str | Path, factors: Mapping[str, LowRank], module_name: Callable[[str], str], *,
                  base_model_name_or_path: Optional[str], embeddings: Iterable[str] = ()) -> Path:
    """A PEFT LoRA adapter dir from ``factors`` (``{base tensor name: LowRank}``): PEFT loads it.

    Each module keeps its own rank and scaling through ``rank_pattern`` / ``alpha_pattern``
    (anchored patterns: one module each). ``embeddings``: tensor names of embedding layers,
    written as ``lora_embedding_A/B``.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    embeddings = set(embeddings)
    layouts = {f.transpose for name, f in factors.items() if name not in embeddings}
    if len(layouts) > 1:
        raise MergeError("the adapter would mix fan_in_fan_out layers with others, which one PEFT config cannot say")
    fan_in_fan_out = layouts == {True}
    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    targets = []
    for name, factor in factors.items():
        module = module_name(name)[: -len(".weight")]
        targets.append(module)
        if name in embeddings:
            tensors[f"{_PREFIX}{module}.lora_embedding_A"] = factor.A.contiguous()
            tensors[f"{_PREFIX}{module}.lora_embedding_B"] = factor.B.contiguous()
        else:
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = factor.A.contiguous()
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = factor.B.contiguous()
        pattern = "^" + re.escape(module)
        rank_pattern[pattern] = factor.rank
        alpha_pattern[pattern] = factor.scaling * factor.rank  # scaling = alpha / r
    ranks = [f.rank for f in factors.values()] or [1]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": max(ranks), "lora_alpha": float(max(ranks)),
        "target_modules": sorted(set(targets)), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory
