"""Data-flow (DFS) models: a path through the layers of several resident donor models.

:class:`DataFlowModel` keeps every donor model resident and assembles a candidate
(a :class:`~evomerge.recipe.DFSRecipe`) into one *shell* model **by reference**:
the shell's layer list becomes thin :class:`_PathLayer` wrappers around the donors'
own decoder layers (no weights copied per candidate), and its embeddings, final
norm and lm_head are the ``embed_from`` donor's modules. A layer may appear several
times on a path: each wrapper sets the attention's ``layer_idx`` to its own position
before running, so the KV cache gets one slot per path position; rotary embeddings
are computed once per forward by the shell and passed to every layer.

A path step's ``scale`` multiplies the hidden state entering that layer (the
paper's W). :func:`folded_state_dict` turns a recipe into a plain state dict of the
donors' family with one layer per path position. In a pre-norm family every branch
starts with a scale-invariant norm, so scaling the residual stream by ``P_k`` (the
product of the scales so far) is the same as dividing layer k's residual writers
(Llama's ``o_proj`` and ``down_proj``) by ``P_k``. In a sandwich-norm family (Gemma2,
Gemma3) those outputs are normalised again before the add, so the division goes into the
post-branch norms instead. Both are exact up to the norms' epsilon. A post-norm-only
family (OLMo2) has no exact fold: a path with scales is refused there. Where things live
comes from the donors' :class:`~evomerge.architecture.Architecture`. The result loads
with ``AutoModelForCausalLM`` without remote code.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from evomerge.architecture import Architecture, for_config
from evomerge.errors import MergeError
from evomerge.recipe import DFSRecipe, PathStep


class _PathLayer(nn.Module):
    """One position on a path: a shared donor layer, its KV-cache slot, its input scale."""

    def __init__(self, layer: nn.Module, position: int, scale: float, attention: str = "self_attn") -> None:
        super().__init__()
        self.layer = layer
        self.position = position
        self.scale = float(scale)
        self.attention = attention

    def forward(self, hidden_states, *args, **kwargs):
        attn = getattr(self.layer, self.attention, None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = self.position  # one cache slot per path position, even for a repeated layer
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)


def identity_recipe(model: str, num_layers: int) -> DFSRecipe:
    """The path that is exactly ``model`` (all its layers, in order, unscaled)."""
    return DFSRecipe(embed_from=model, layers=tuple(PathStep(model=model, layer=i) for i in range(num_layers)))


class DataFlowModel:
    """Resident donor models and one shell model that candidates are assembled into."""

    def __init__(self, donors: Mapping[str, nn.Module], shell: Optional[nn.Module]) -> None:
        self.donors = dict(donors)
        self.shell = shell
        self._layer_types = {name: list(getattr(m.config, "layer_types", None) or []) for name, m in donors.items()}
        archs = {name: for_config(m.config.to_dict(), f"donor {name}") for name, m in self.donors.items()}
        kinds = sorted({a.name for a in archs.values()})
        if len(kinds) > 1:
            raise MergeError(f"data-flow donors must be one architecture, got {kinds}")
        self.arch: Architecture = next(iter(archs.values()))

    def _layers(self, donor: str) -> nn.ModuleList:
        return self.arch.get(self.donors[donor], self.arch.layers)

    def num_layers(self, donor: str) -> int:
        return len(self._layers(donor))

    def check(self, recipe: DFSRecipe) -> None:
        problems = []
        if recipe.embed_from not in self.donors:
            problems.append(f"embed_from {recipe.embed_from!r} is not a donor ({sorted(self.donors)})")
        for k, step in enumerate(recipe.layers):
            if step.model not in self.donors:
                problems.append(f"layers.{k}: {step.model!r} is not a donor ({sorted(self.donors)})")
            elif not 0 <= step.layer < self.num_layers(step.model):
                problems.append(f"layers.{k}: {step.model} has no layer {step.layer}")
            if not step.scale > 0:
                problems.append(f"layers.{k}: scale must be positive, got {step.scale}")
        head = self.donors.get(recipe.embed_from)
        for name in sorted({s.model for s in recipe.layers} & set(self.donors)) if head is not None else ():
            hidden = self.donors[name].config.hidden_size
            if hidden != head.config.hidden_size:
                problems.append(f"{name} has hidden size {hidden} but embed_from {recipe.embed_from} has "
                                f"{head.config.hidden_size}: their layers cannot share a path")
        if problems:
            raise MergeError("invalid data-flow recipe: " + "; ".join(problems))

    def assemble(self, recipe: DFSRecipe) -> nn.Module:
        """Point the shell at the recipe's layers (by reference) and return it."""
        self.check(recipe)
        if self.shell is None:
            raise MergeError("this data-flow model has no shell to assemble into (it was built for export)")
        head = self.donors[recipe.embed_from]
        arch = self.arch
        for path in (*arch.embeddings, arch.final_norm, arch.head):
            arch.set(self.shell, path, arch.get(head, path))
        arch.set(self.shell, arch.layers, nn.ModuleList(
            _PathLayer(self._layers(s.model)[s.layer], k, s.scale, arch.attention) for k, s in enumerate(recipe.layers)
        ))
        cfg = self.shell.config
        cfg.num_hidden_layers = len(recipe.layers)
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [self._layer_type(s) for s in recipe.layers]
        return self.shell

    def _per_layer_settings(self) -> dict[str, dict[str, list]]:
        """Config lists with one entry per layer (``no_rope_layers`` ...; ``layer_types`` apart):
        ``{key: {donor: list}}``, so that a path's config takes each step's entry from its donor."""
        out: dict[str, dict[str, list]] = {}
        for name, model in self.donors.items():
            n = self.num_layers(name)
            for key, value in vars(model.config).items():
                if "layer" in key and key != "layer_types" and isinstance(value, list) and len(value) == n:
                    out.setdefault(key, {})[name] = list(value)
        return {k: v for k, v in out.items() if len(v) == len(self.donors)}

    def _layer_type(self, step: PathStep) -> str:
        types = self._layer_types.get(step.model) or []
        return types[step.layer] if step.layer < len(types) else "full_attention"

    def folded_state_dict(self, recipe: DFSRecipe) -> tuple[object, dict[str, torch.Tensor]]:
        """(config, state dict) of a plain model equal to the recipe's path (scales folded).

        :class:`MergeError` when the family cannot hold the path's scales (see the module
        docstring): a model that differs from the searched one is never written."""
        self.check(recipe)
        arch = self.arch
        if not arch.can_fold_scales:
            cumulative = 1.0
            for k, step in enumerate(recipe.layers):
                cumulative *= step.scale
                if cumulative != 1.0:
                    raise MergeError(f"layers.{k}: this path scales the stream (x{cumulative:.4g}), but {arch.name} "
                                     "layers have no norm before each branch, so no plain model computes the same; "
                                     "only paths without scales can be exported for this family")
        head = self.donors[recipe.embed_from]
        config = copy.deepcopy(head.config)
        config.num_hidden_layers = len(recipe.layers)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [self._layer_type(s) for s in recipe.layers]
        for key, per_donor in self._per_layer_settings().items():  # e.g. SmolLM3's no_rope_layers
            setattr(config, key, [per_donor[s.model][s.layer] for s in recipe.layers])
        out: dict[str, torch.Tensor] = {}
        layers_prefix = arch.layers + "."
        for name, t in head.state_dict().items():
            if not name.startswith(layers_prefix):
                out[name] = t.detach().clone()
        cumulative = 1.0
        for k, step in enumerate(recipe.layers):
            cumulative *= step.scale
            layer = self._layers(step.model)[step.layer]
            for name, t in layer.state_dict().items():
                out[f"{arch.layer_prefix(k)}{name}"] = arch.fold(name, t.detach().clone(), cumulative)
        return config, out

    def export(self, recipe: DFSRecipe, out_dir: Path) -> Path:
        """Write a standard Hugging Face model dir (safetensors and config) for the recipe, in
        the donors' dtype (the dtype the path was searched in)."""
        from transformers import AutoModelForCausalLM

        config, state = self.folded_state_dict(recipe)
        dtype = next(iter(state.values())).dtype
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise MergeError(f"folded state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        return out_dir


def build_shell(model_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                trust_remote_code: bool = False) -> nn.Module:
    """The model a path is assembled into: ``model_dir``'s family and config without layers. Its
    layers, embeddings, final norm and head are always the donors' (by reference), so it is
    built without layers and never loads weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    cfg.num_hidden_layers = 0  # layer_types stay: Gemma3 builds one rotary embedding per layer type in them
    shell = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    return shell.to(device).eval()


def load_donors(model_dirs: Mapping[str, str], device: str = "cpu", trusted: tuple[str, ...] = (),
                dtype: torch.dtype = torch.float32) -> dict:
    """Each donor as a resident model (safetensors only), in eval mode; only the donors named in
    ``trusted`` may run code of their own (``trust_remote_code``)."""
    from transformers import AutoModelForCausalLM

    donors = {}
    for name, path in model_dirs.items():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=name in trusted).to(device)
        except Exception as exc:  # safetensors' own error names neither the donor nor the file
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise MergeError(f"donor {name!r}: cannot load {path} ({type(exc).__name__}: {first}); a corrupt or "
                             "truncated safetensors file is copied or downloaded again") from None
        model.eval()
        donors[name] = model
    return donors
