"""Architecture descriptions: where a decoder family keeps its parts, read by every part of evomerge.

One :class:`Architecture` per supported family says, by module path (the in-memory model)
and by tensor name (the safetensors files), where the embeddings, the decoder layers, the
final norm and the output head live; which config key counts the layers; which tensors of a
layer write into the residual stream; and where the norms sit. PS grouping (per-group values
and gradients), the resident and streaming merges, DFS assembly and its folded export,
planning and the mergekit export all read it instead of assuming Llama's names. (The idea
is mergekit's architecture JSON files; the descriptions here are our own and also carry
what a data-flow fold needs.)

Tensor names are as ``save_pretrained`` writes them (transformers 5). Where the loaded
module is named differently (GPT-NeoX's ``embed_out`` loads as ``lm_head``),
:meth:`Architecture.module_name` maps one to the other.

The families described here are the ones data-flow merges support, each tested in
``tests/test_families.py`` (tiny random models made with transformers' own config classes). Every
other decoder-only causal LM transformers ships is read from its module tree by
:mod:`evomerge.model_tree` for parameter-space merges (``tests/test_family_coverage.py`` walks
them all); a family neither can place is refused at ``evomerge validate`` with the reason. To add
data-flow support for one: describe it below, add it to ``FAMILIES`` in that test, and run it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Mapping, Optional

from evomerge.errors import ConfigError, MergeError

NormPlacement = Literal["pre", "sandwich", "post"]

_SHAPE_ROLES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size")


@dataclass(frozen=True)
class Architecture:
    """Where one decoder family keeps its parts (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    """``model_type`` values in ``config.json`` this describes."""
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    """Module paths of the input embeddings (GPT-2 has token and position embeddings)."""
    layers: str = "model.layers"
    """Module path of the decoder layer list; tensor ``{layers}.{i}.*`` belongs to layer i."""
    final_norm: str = "model.norm"
    head: str = "lm_head"
    head_in_files: Optional[str] = None
    """The head's tensor prefix in checkpoint files when it differs from its module path."""
    layer_count_key: str = "num_hidden_layers"
    tied_by_default: bool = False
    """``tie_word_embeddings`` when the config leaves it out (the family's config class default):
    a tied model's files have no head tensor, it reads the embeddings'."""
    attention: str = "self_attn"
    """Attribute of a decoder layer holding its attention (whose ``layer_idx`` picks a KV-cache slot)."""
    residual_writers: tuple[str, ...] = ("self_attn.o_proj.", "mlp.down_proj.")
    """Tensor prefixes inside a layer whose outputs are added to the residual stream."""
    norms: NormPlacement = "pre"
    """``pre``: every branch starts with a norm (the stream is scale invariant); ``sandwich``: also a
    norm on each branch's output before the add; ``post``: norms only on the branch outputs."""
    post_norms: tuple[str, ...] = ()
    """``sandwich``/``post``: the norms on the branch outputs, inside a layer."""
    norm_offset: float = 0.0
    """Norms compute ``x_normed * (norm_offset + weight)`` (Gemma: 1)."""
    fused: tuple[str, ...] = ()
    """Fused projections (one tensor holding q/k/v or gate/up): merged as one tensor, never split."""
    mergekit: Optional[str] = None
    """mergekit 0.1.5's architecture file for the family."""
    config_keys: Mapping[str, str] = field(default_factory=dict)
    """Config keys with another name in this family (role -> key), e.g. GPT-2's ``n_embd``."""
    merge_space: Literal["files", "modules"] = "files"
    """Which names and shapes a merge works on: the files' (read lazily, tensor by tensor), or, for a
    family whose files hold its weights otherwise than the loaded model (renamed, or per-expert
    tensors that transformers stacks), the model's own, loaded with transformers (mergekit merges
    those stacked parameters whole too)."""
    fixed_layers: Optional[int] = None
    """The layer count when no config key holds it (``layer_count_key`` ""; derived families)."""
    derived: bool = False
    """Read from transformers' module tree (:mod:`evomerge.model_tree`), not described by hand:
    parameter-space merges only (``final_norm`` and the fields below it are unknown)."""
    dfs_reason: str = ""
    """Why data-flow merges are refused for this family ("" when they are supported)."""

    # -- tensor names ---------------------------------------------------------------------
    @cached_property
    def _layer_re(self) -> re.Pattern:
        return re.compile(re.escape(self.layers) + r"\.(\d+)\.")

    @property
    def embed_prefixes(self) -> tuple[str, ...]:
        return tuple(p + "." for p in self.embeddings)

    @property
    def head_prefix(self) -> str:
        """The head's tensor prefix as the files name it."""
        return (self.head_in_files or self.head) + "."

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."

    def layer_of(self, name: str) -> Optional[int]:
        """Index of the decoder layer tensor ``name`` belongs to; None outside the layers."""
        m = self._layer_re.match(name)
        return int(m.group(1)) if m else None

    def tensor_group(self, name: str, num_layers: int) -> int:
        """Group of tensor ``name``: 0 embeddings, ``i + 1`` layer i, ``num_layers + 1`` the rest
        (final norm, head): the groups a recipe's per-group values and gradients address."""
        if name.startswith(self.embed_prefixes):
            return 0
        i = self.layer_of(name)
        if i is None:
            return num_layers + 1
        if i >= num_layers:
            raise MergeError(f"tensor {name!r} is in layer {i}, but the model has {num_layers} layers")
        return i + 1

    def count_layers(self, names) -> int:
        """Number of decoder layers among tensor names (highest index + 1)."""
        found = [i for n in names if (i := self.layer_of(n)) is not None]
        return max(found) + 1 if found else 0

    def check_names(self, names, where: str) -> None:
        """:class:`MergeError` unless tensor ``names`` have this family's embeddings and layers
        (a checkpoint named otherwise, e.g. an old GPT-2 file without the ``transformer.``
        prefix, would otherwise merge with every tensor in the head group)."""
        names = list(names)
        numbered = any(re.search(r"\.\d+\.", n) for n in names)  # blocks, however named
        if not any(n.startswith(self.embed_prefixes) for n in names) or (numbered and not self.count_layers(names)):
            raise MergeError(f"{where}: its tensors are not named as transformers names a {self.name} model "
                             f"(expected {self.embed_prefixes[0]}* and {self.layers}.N.*, found e.g. {names[:2]}); "
                             "load it with transformers and save it again with save_pretrained")

    def module_name(self, file_name: str) -> str:
        """The loaded model's ``state_dict`` key of a tensor named ``file_name`` in the files."""
        if self.head_in_files and file_name.startswith(self.head_in_files + "."):
            return self.head + file_name[len(self.head_in_files):]
        return file_name

    # -- config ---------------------------------------------------------------------------
    def config_key(self, role: str) -> str:
        return self.config_keys.get(role, role)

    def num_layers(self, config: Mapping[str, Any]) -> int:
        """Layer count from a ``config.json`` mapping."""
        key = self.layer_count_key
        if not key and self.fixed_layers is not None:
            return self.fixed_layers
        if key not in config:
            raise ConfigError([f"config.json of a {self.name} model has no {key!r} (its layer count)"])
        return int(config[key])

    def shape(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """What fixes tensor shapes and the attention layout, by role (defaults filled in)."""
        get = {role: config.get(self.config_key(role)) for role in _SHAPE_ROLES}
        hidden, heads = get["hidden_size"], get["num_attention_heads"]
        if get["num_key_value_heads"] is None:
            get["num_key_value_heads"] = heads
        if get["head_dim"] is None and hidden and heads:
            get["head_dim"] = int(hidden) // int(heads)
        if get["intermediate_size"] is None and hidden:
            get["intermediate_size"] = 4 * int(hidden)  # GPT-2's n_inner: None means 4 * n_embd
        get["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", self.tied_by_default))
        return get

    # -- modules --------------------------------------------------------------------------
    @staticmethod
    def get(model: Any, path: str) -> Any:
        for part in path.split("."):
            model = getattr(model, part)
        return model

    @staticmethod
    def set(model: Any, path: str, value: Any) -> None:
        *parents, last = path.split(".")
        for part in parents:
            model = getattr(model, part)
        setattr(model, last, value)

    # -- data-flow fold -------------------------------------------------------------------
    @property
    def can_fold_scales(self) -> bool:
        """Whether a path's input scales fold exactly into a plain model of this family.

        Pre-norm: scaling the stream by ``P`` equals dividing the residual writers by ``P``.
        Sandwich: the branch outputs are normalised again, so the fold goes into those norms.
        Post-norm only (OLMo2): a branch's input is not normalised, so a scale changes what the
        layer computes in a way no plain model of the family can: not foldable."""
        return self.norms in ("pre", "sandwich")

    def fold_targets(self) -> tuple[str, ...]:
        """The tensor prefixes inside a layer that a path scale is folded into."""
        if self.norms == "pre":
            return self.residual_writers
        if self.norms == "sandwich":
            return tuple(p if p.endswith(".") else p + "." for p in self.post_norms)
        return ()

    def fold(self, name: str, tensor, cumulative: float):
        """Tensor ``name`` (inside a layer) of a plain model whose stream is the path's divided by
        ``cumulative`` (the product of the path's scales so far)."""
        if cumulative == 1.0 or not name.startswith(self.fold_targets()):
            return tensor
        if not self.can_fold_scales:
            raise MergeError(f"{self.name} layers are not scale invariant; a path with scales cannot be "
                             "written as a plain model")
        if self.norms == "pre":
            return tensor / cumulative
        # a norm's output scales with (offset + weight): divide that, in float32
        t = tensor.float()
        return ((t + self.norm_offset) / cumulative - self.norm_offset).to(tensor.dtype)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), mergekit="llama"),
    Architecture("mistral", ("mistral",), mergekit="mistral"),
    Architecture("qwen2", ("qwen2",), mergekit="qwen2"),
    Architecture("qwen3", ("qwen3",), mergekit="qwen3"),
    Architecture("gemma", ("gemma",), norm_offset=1.0, tied_by_default=True, mergekit="gemma"),
    Architecture("gemma2", ("gemma2",), norms="sandwich",
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_offset=1.0,
                 tied_by_default=True, mergekit="gemma2"),
    Architecture("gemma3_text", ("gemma3_text",), norms="sandwich",
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_offset=1.0,
                 tied_by_default=True, mergekit="gemma3"),
    Architecture("phi3", ("phi3",), fused=("self_attn.qkv_proj", "mlp.gate_up_proj"), mergekit="phi3"),
    Architecture("olmo2", ("olmo2",), norms="post",
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), mergekit="olmo2"),
    Architecture("gpt_neox", ("gpt_neox",), embeddings=("gpt_neox.embed_in",), layers="gpt_neox.layers",
                 final_norm="gpt_neox.final_layer_norm", head_in_files="embed_out", attention="attention",
                 residual_writers=("attention.dense.", "mlp.dense_4h_to_h."),
                 fused=("attention.query_key_value",), mergekit="gpt-neox"),
    # Llama's layout (pre-norm RMSNorm, o_proj and down_proj write the stream)
    Architecture("smollm3", ("smollm3",), tied_by_default=True),  # NoPE layers: a per-layer flag, kept by each layer
    Architecture("granite", ("granite",), mergekit="granite"),  # residual_multiplier scales both writers' outputs
    Architecture("arcee", ("arcee",), mergekit="arcee"),  # no gate_proj (ReLU² MLP)
    Architecture("helium", ("helium",)),
    Architecture("ministral", ("ministral", "ministral3")),
    Architecture("apertus", ("apertus",), mergekit="apertus"),  # attention_layernorm / feedforward_layernorm
    # norms after each branch only, like OLMo2: data-flow paths without scales
    Architecture("olmo3", ("olmo3",), norms="post",
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    Architecture("exaone4", ("exaone4",), norms="post",
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    # GLM-4: a norm before and after each branch, fused gate/up
    Architecture("glm4", ("glm4",), norms="sandwich", post_norms=("post_self_attn_layernorm", "post_mlp_layernorm"),
                 fused=("mlp.gate_up_proj",), mergekit="glm4"),
    # attention and MLP side by side on one normed input (parallel residual)
    Architecture("cohere", ("cohere",), tied_by_default=True, mergekit="cohere"),
    Architecture("phi", ("phi",), final_norm="model.final_layernorm",
                 residual_writers=("self_attn.dense.", "mlp.fc2."), mergekit="phi2"),  # LayerNorm, partial rotary
    Architecture("falcon", ("falcon",), embeddings=("transformer.word_embeddings",), layers="transformer.h",
                 final_norm="transformer.ln_f", tied_by_default=True, attention="self_attention",
                 residual_writers=("self_attention.dense.", "mlp.dense_4h_to_h."),
                 fused=("self_attention.query_key_value",), mergekit="falcon",
                 config_keys={"num_key_value_heads": "num_kv_heads"}),
    # LayerNorm with biases; a writer's bias scales with it
    Architecture("stablelm", ("stablelm",), mergekit="stablelm"),
    Architecture("starcoder2", ("starcoder2",), tied_by_default=True, residual_writers=("self_attn.o_proj.", "mlp.c_proj."),
                 mergekit="starcoder2"),
    Architecture("gpt2", ("gpt2",), embeddings=("transformer.wte", "transformer.wpe"), layers="transformer.h",
                 final_norm="transformer.ln_f", layer_count_key="n_layer", tied_by_default=True, attention="attn",
                 residual_writers=("attn.c_proj.", "mlp.c_proj."), fused=("attn.c_attn",), mergekit="gpt2",
                 config_keys={"hidden_size": "n_embd", "intermediate_size": "n_inner",
                              "num_attention_heads": "n_head", "num_key_value_heads": "n_head"}),
)
BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}
BY_NAME = {a.name: a for a in ARCHITECTURES}



def supported() -> str:
    """The families with a hand description (data-flow merges)."""
    return ", ".join(a.name for a in ARCHITECTURES)


def for_config(config: Mapping[str, Any], where: str = "model") -> Architecture:
    """The description of a ``config.json`` mapping: by hand, else derived from transformers' module
    tree; :class:`ConfigError` naming it and saying why if neither can place its tensors."""
    model_type = config.get("model_type")
    arch = BY_MODEL_TYPE.get(model_type)  # type: ignore[arg-type]
    if arch is not None:
        return arch
    if not isinstance(model_type, str):
        raise ConfigError([f"{where}: config.json has no model_type, so its architecture is unknown"])
    from evomerge.model_tree import derive

    return Architecture(**derive(config, where))


def capabilities(config: Mapping[str, Any]) -> str:
    """What evomerge can do with a source of this config, in one line: ``PS: yes · DFS: yes``,
    ``PS: yes (derived) · DFS: no (...)``, or ``PS: no (...) · DFS: no``."""
    try:
        arch = for_config(config)
    except ConfigError as exc:
        reason = exc.problems[0].split(": ", 1)[-1]
        return f"PS: no ({reason}) · DFS: no"
    if arch.derived:
        return f"PS: yes (derived) · DFS: no ({arch.dfs_reason})"
    return "PS: yes · DFS: yes" + ("" if arch.can_fold_scales else " (without scales: no norm before each branch)")


def for_model_dir(path, where: Optional[str] = None) -> Architecture:
    """The description of the model in directory ``path`` (its ``config.json``)."""
    import json
    from pathlib import Path

    file = Path(path) / "config.json"
    if not file.is_file():
        raise MergeError(f"{where or path}: no config.json in {path} (its architecture is unknown)")
    return for_config(json.loads(file.read_text()), where or str(path))


def for_sources(model_dir, names) -> Architecture:
    """The description of a source: its ``config.json`` when the dir has one, else by tensor names."""
    from pathlib import Path

    if (Path(model_dir) / "config.json").is_file():
        return for_model_dir(model_dir)
    return for_tensor_names(names)


def for_tensor_names(names) -> Architecture:
    """The description whose embedding tensors are among ``names`` (for state dicts without a
    config; families sharing Llama's names read the same, so the first match is right)."""
    names = list(names)
    for arch in ARCHITECTURES:
        if any(n.startswith(arch.embed_prefixes) for n in names):
            return arch
    raise MergeError(f"no described architecture has tensors named like {names[:3]}; supported: {supported()}")


# -- sources that can be merged together ---------------------------------------------------

def source_problems(configs: Mapping[str, Mapping[str, Any]], *, ps_models: tuple[str, ...] = (),
                    base_model: str = "", dfs_donors: tuple[str, ...] = (), dfs_scaling: bool = False) -> list[str]:
    """Every reason ``configs`` (source name -> config.json) cannot be merged as asked, each named.

    Every source must be a described architecture, and all of them one architecture.
    ``ps_models``: sources merged in parameter space with ``base_model`` (also the same shapes
    and layer count). ``dfs_donors``: sources whose layers share one path (the same shapes;
    layer counts may differ). ``dfs_scaling``: the path has scales (the family must fold them)."""
    problems: list[str] = []
    archs: dict[str, Architecture] = {}
    for name, cfg in configs.items():
        try:
            archs[name] = for_config(cfg, f"models: {name}")
        except ConfigError as exc:
            problems.extend(exc.problems)
    if not archs:
        return problems
    first = base_model if base_model in archs else next(iter(archs))
    for name, arch in archs.items():
        if arch != archs[first]:
            problems.append(f"models: {name} is {arch.name} but {first} is {archs[first].name}; sources merged "
                            "together must be one architecture")

    def compare(group: tuple[str, ...], reference: str, what: str, with_layers: bool) -> None:
        if reference not in archs or archs[reference] != archs[first]:
            return
        arch = archs[reference]

        def shape(name: str) -> dict[str, Any]:
            out = arch.shape(configs[name])
            if with_layers:
                out["layers"] = arch.num_layers(configs[name])
            return out

        want = shape(reference)
        for name in group:
            if name == reference or name not in archs or archs[name] != arch:
                continue
            got = shape(name)
            for role, value in want.items():
                if got[role] != value:
                    problems.append(f"models: {name} has {role} {got[role]} but {reference} has {value}; "
                                    f"{what} need the same {role}")

    if ps_models:
        compare(ps_models, base_model, "sources merged in parameter space", True)
    known = [d for d in dfs_donors if d in archs]
    derived = sorted({archs[d].name for d in known if archs[d].derived})
    for name in derived:
        arch = next(archs[d] for d in known if archs[d].name == name)
        problems.append(f"search_space: a data-flow merge needs a description of the family: {arch.dfs_reason}; "
                        "parameter-space merges of it work")
    if known and not derived:
        compare(dfs_donors, known[0], "data-flow donors (layers on one path)", False)
        arch = archs[known[0]]
        if dfs_scaling and not arch.can_fold_scales:
            problems.append(f"search_space.scaling: {arch.name} layers have no norm before each branch, so a "
                            "path with scales cannot be exported as a plain model; set scaling: false")
    return problems


def param_count(config: Mapping[str, Any]) -> int:
    """Parameters of the model a ``config.json`` describes: models of one and two layers are built
    on the meta device (no memory, no init cost of a full model) and the difference is one layer's."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.model_tree import config_object

    arch = for_config(config)
    layers = arch.num_layers(config)
    cfg = {k: v for k, v in config.items() if k != "layer_types"}
    if not arch.layer_count_key:  # the count is not one key: the whole model, on the meta device
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(config_object(config)).parameters())

    def count(n: int) -> int:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config_object(cfg, **{arch.layer_count_key: n}))
        return sum(p.numel() for p in model.parameters())

    one = count(1)
    return one + (layers - 1) * (count(2) - one)
