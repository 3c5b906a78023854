"""Data-flow (DFS) models: a path through the layers of several resident donor models.

:class:`DataFlowModel` keeps every donor model resident and assembles a candidate
(a :class:`~evomerge.recipe.DFSRecipe`) into one *shell* model **by reference**:
the shell's layer list becomes thin :class:`_PathLayer` wrappers around the donors'
own decoder layers (no weights copied per candidate), and its embeddings, final
norm and lm_head are the ``embed_from`` donor's modules. A layer may appear several
times on a path: each wrapper sets the attention's ``layer_idx`` to its own position
before running, so the KV cache gets one slot per path position; rotary embeddings
are computed once per forward by the shell and passed to every layer.

A path step's ``scale`` multiplies the hidden state entering that layer (the paper's W), so
the residual stream after step k is the unscaled one times ``P_k``, the product of the scales
so far. In a pre-norm family every branch starts with a scale-invariant norm, so that is the
same as dividing layer k's residual writers (Llama's ``o_proj`` and ``down_proj``) by ``P_k``;
in a sandwich-norm family (Gemma2, Gemma3, GLM-4) those outputs are normalised again before the
add, and the division goes into the post-branch norms. The two differ only by the norms'
epsilon, which a stream scaled by ``P_k`` meets as ``eps / P_k**2``: on a real model (SmolLM2,
``benchmarks/dfs_export_depth.py``) that alone moved the logits by 0.02 over 10 layers and by 1
over 60. So the search scores the divided form itself: each path position's writers (the
modules :meth:`~evomerge.architecture.Architecture.fold_targets` names) have their outputs
divided by ``P_k`` while it runs (hooks on the donors' modules, a no-op outside a path), and
:func:`folded_state_dict` writes the same division into the weights: the exported model is the
scored one, up to float rounding. A post-norm-only family (OLMo2) has no such form: its paths
scale the hidden state itself, and a path with scales is refused at export. Where things live
comes from the donors' :class:`~evomerge.architecture.Architecture`. The result loads with
``AutoModelForCausalLM`` without remote code.
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


class _WriterScale:
    """The factor the residual writers' outputs are multiplied by while a path position runs
    (1 outside a path: the donors run as themselves)."""

    def __init__(self) -> None:
        self.value = 1.0

    def hook(self, module: nn.Module, args, output):
        f = self.value
        if f == 1.0:
            return output
        if isinstance(output, tuple):
            return (output[0] * f, *output[1:])
        return output * f


class _PathLayer(nn.Module):
    """One position on a path: a shared donor layer, its KV-cache slot, its scale: the stream's
    cumulative scale divided out of its residual writers (``writer_scale`` = 1 / P_k, set on
    ``writers`` while it runs), or, where a family has no scale-invariant branches, its own
    scale applied to its input."""

    def __init__(self, layer: nn.Module, position: int, scale: float, attention: str = "self_attn",
                 writers: Optional[_WriterScale] = None, writer_scale: float = 1.0) -> None:
        super().__init__()
        self.layer = layer
        self.position = position
        self.scale = float(scale)
        self.attention = attention
        self.writers = writers
        self.writer_scale = float(writer_scale)

    def forward(self, hidden_states, *args, **kwargs):
        attn = getattr(self.layer, self.attention, None)
        own = getattr(attn, "layer_idx", None)
        if own is not None:
            attn.layer_idx = self.position  # one cache slot per path position, even for a repeated layer
        if self.writers is None:
            if self.scale != 1.0:
                hidden_states = hidden_states * self.scale
        else:
            self.writers.value = self.writer_scale
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:  # outside a path the donor is itself again
            if self.writers is not None:
                self.writers.value = 1.0
            if own is not None:
                attn.layer_idx = own


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
        self._writers: Optional[_WriterScale] = None
        if self.arch.can_fold_scales:
            self._writers = _WriterScale()
            targets = tuple(t.rstrip(".") for t in self.arch.fold_targets())
            for name in self.donors:
                for layer in self._layers(name):
                    for module_name, module in layer.named_modules():
                        if module_name in targets:
                            module.register_forward_hook(self._writers.hook)

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
        cumulative, layers = 1.0, []
        for k, s in enumerate(recipe.layers):
            cumulative *= s.scale
            layers.append(_PathLayer(self._layers(s.model)[s.layer], k, s.scale, arch.attention, self._writers,
                                     1.0 / cumulative))
        arch.set(self.shell, arch.layers, nn.ModuleList(layers))
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
