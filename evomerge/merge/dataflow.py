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
paper's W). :func:`folded_state_dict` turns a recipe into a plain Llama-style state
dict with one layer per path position: because RMSNorm is scale invariant, scaling
the residual stream by ``P_k`` (the product of the scales so far) is the same as
dividing layer k's ``o_proj`` and ``down_proj`` (the two projections that write into
the residual stream) by ``P_k`` — exact up to RMSNorm's epsilon. The result loads
with ``AutoModelForCausalLM`` without remote code.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from evomerge.errors import MergeError
from evomerge.recipe import DFSRecipe, PathStep

# the projections that write into the residual stream (Llama / Mistral / Qwen2 naming)
RESIDUAL_WRITERS = ("self_attn.o_proj.", "mlp.down_proj.")


class _PathLayer(nn.Module):
    """One position on a path: a shared donor layer, its KV-cache slot, its input scale."""

    def __init__(self, layer: nn.Module, position: int, scale: float) -> None:
        super().__init__()
        self.layer = layer
        self.position = position
        self.scale = float(scale)

    def forward(self, hidden_states, *args, **kwargs):
        attn = getattr(self.layer, "self_attn", None)
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

    def __init__(self, donors: Mapping[str, nn.Module], shell: nn.Module) -> None:
        self.donors = dict(donors)
        self.shell = shell
        self._layer_types = {name: list(getattr(m.config, "layer_types", None) or []) for name, m in donors.items()}

    def num_layers(self, donor: str) -> int:
        return len(self.donors[donor].model.layers)

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
        if problems:
            raise MergeError("invalid data-flow recipe: " + "; ".join(problems))

    def assemble(self, recipe: DFSRecipe) -> nn.Module:
        """Point the shell at the recipe's layers (by reference) and return it."""
        self.check(recipe)
        head = self.donors[recipe.embed_from]
        inner = self.shell.model
        inner.embed_tokens = head.model.embed_tokens
        inner.norm = head.model.norm
        self.shell.lm_head = head.lm_head
        inner.layers = nn.ModuleList(
            _PathLayer(self.donors[s.model].model.layers[s.layer], k, s.scale) for k, s in enumerate(recipe.layers)
        )
        cfg = self.shell.config
        cfg.num_hidden_layers = len(recipe.layers)
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [self._layer_type(s) for s in recipe.layers]
        return self.shell

    def _layer_type(self, step: PathStep) -> str:
        types = self._layer_types.get(step.model) or []
        return types[step.layer] if step.layer < len(types) else "full_attention"

    def folded_state_dict(self, recipe: DFSRecipe) -> tuple[object, dict[str, torch.Tensor]]:
        """(config, state dict) of a plain model equal to the recipe's path (scales folded)."""
        self.check(recipe)
        head = self.donors[recipe.embed_from]
        config = copy.deepcopy(head.config)
        config.num_hidden_layers = len(recipe.layers)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [self._layer_type(s) for s in recipe.layers]
        out: dict[str, torch.Tensor] = {}
        for name, t in head.state_dict().items():
            if not name.startswith("model.layers."):
                out[name] = t.detach().clone()
        cumulative = 1.0
        for k, step in enumerate(recipe.layers):
            cumulative *= step.scale
            layer = self.donors[step.model].model.layers[step.layer]
            for name, t in layer.state_dict().items():
                t = t.detach().clone()
                if name.startswith(RESIDUAL_WRITERS):
                    t = t / cumulative
                out[f"model.layers.{k}.{name}"] = t
        return config, out

    def export(self, recipe: DFSRecipe, out_dir: Path) -> Path:
        """Write a standard Hugging Face model dir (safetensors and config) for the recipe."""
        from transformers import AutoModelForCausalLM

        config, state = self.folded_state_dict(recipe)
        model = AutoModelForCausalLM.from_config(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise MergeError(f"folded state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        return out_dir


def load_donors(model_dirs: Mapping[str, str], device: str = "cpu", trust_remote_code: bool = False,
                dtype: torch.dtype = torch.float32) -> dict:
    """Each donor as a resident model (safetensors only), in eval mode."""
    from transformers import AutoModelForCausalLM

    donors = {}
    for name, path in model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code).to(device)
        model.eval()
        donors[name] = model
    return donors
