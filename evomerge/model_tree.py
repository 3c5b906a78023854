"""A family's layout read from transformers' own module tree, for families with no hand description.

A parameter-space merge needs to know, of each tensor in a model's files, whether it belongs to
the embeddings, to decoder block *i*, or to the rest (final norm, head); the layer count; and
whether the head is tied to the embeddings. For the families described by hand in
:mod:`evomerge.architecture` that is written down; for every other decoder-only causal LM that
transformers ships it is derived here, from a model built on the meta device from the source's
own ``config.json`` (no weights, no memory):

- the decoder blocks are the one ``ModuleList`` of the model's block class
  (``_no_split_modules``), nearest the root, as long as the config's layer count;
- the embeddings are the ``nn.Embedding`` modules outside the blocks (the input embeddings and
  any position embeddings); everything else outside the blocks is the rest;
- names are the model's own. When its files hold the same tensors under the same names (tied
  parameters left out, as ``save_pretrained`` leaves them out; transformers' reverse conversion
  run on meta tensors says what the files hold), a merge reads the files tensor by tensor; when
  they do not (renamed modules, or the per-expert tensors of a mixture-of-experts layer, which
  transformers 5 stacks into one parameter on loading), a merge loads the sources with
  transformers and works on the parameters as the model holds them, as mergekit does;
- the result is checked: every block has weights, and there are input embeddings outside them.

Refused, in one line that says why: encoder-decoder models (their decoder is not the whole
model), multimodal wrappers (merge their text model), models whose blocks are not one list
(blocks outside the list, or several lists: which layer's values would apply is ambiguous), and
types transformers has no causal-LM class for. Data-flow merges need where the norms sit and
which tensors write the residual stream, which the tree does not say: derived families do
parameter-space merges only.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Mapping, Optional

from evomerge.errors import ConfigError

_STANDARD_ROLES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "vocab_size")
_MODALITIES = ("vision", "audio", "speech", "image", "video")


class Refusal(ConfigError):
    """A family evomerge cannot merge, with the reason in one line."""


# families read from the module tree that mergekit 0.1.5 also describes (their exports as mergekit
# YAML are checked tensor for tensor in tests/test_families.py): model_type -> mergekit's name
MERGEKIT_DERIVED = {"mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}


def derive(config: Mapping[str, Any], where: str = "model") -> dict[str, Any]:
    """The fields of the :class:`~evomerge.architecture.Architecture` of a ``config.json`` mapping,
    derived from transformers' module tree (data: this module does not import the class, which
    uses it); :class:`Refusal` (a ConfigError) with the reason otherwise."""
    key = json.dumps(config, sort_keys=True, default=str)
    try:
        return _derive(key)
    except Refusal as exc:
        raise Refusal([f"{where}: {line}" for line in exc.problems]) from None


@lru_cache(maxsize=64)
def _derive(config_json: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = json.loads(config_json)
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise Refusal([f"architecture {model_type!r} has no causal language-model class in transformers "
                       f"{_tf_version()}: it is not a decoder evomerge can merge"])
    try:
        cfg = config_object(config)
    except Exception as exc:
        raise Refusal([f"transformers cannot read its config.json as {model_type!r} ({_short(exc)})"]) from None
    if getattr(cfg, "is_encoder_decoder", False):
        raise Refusal([f"{model_type!r} is an encoder-decoder model: merging its decoder alone is not supported"])
    sub = {name for name in (getattr(cfg, "sub_configs", None) or {})}
    modal = sorted(s for s in sub if any(m in s for m in _MODALITIES))
    text = getattr(getattr(cfg, "text_config", None), "model_type", None)
    if modal or (text and text != model_type):
        raise Refusal([f"{model_type!r} is a multimodal model" + (f" ({', '.join(modal)})" if modal else "")
                       + ": merge its text model" + (f" (model_type {text!r})" if text else "") + " instead"])
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:
        raise Refusal([f"transformers cannot build {model_type!r} from its config.json ({_short(exc)})"]) from None

    layers_path, count = _decoder_layers(model, model_type, _configured_layers(type(cfg), config))
    layer_key = _layer_count_key(type(cfg), config, count)  # "": the config gives the count otherwise
    tied = _tied_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    module_layer = re.compile(re.escape(layers_path) + r"\.(\d+)\.")
    populated = {int(m.group(1)) for name in state if (m := module_layer.match(name))}
    if populated != set(range(count)):
        raise Refusal([f"{model_type!r}: some of its {count} decoder blocks have no weights"])
    embeddings = tuple(n for n, mod in model.named_modules()
                       if isinstance(mod, torch.nn.Embedding) and not n.startswith(layers_path + ".")
                       and any(k.startswith(n + ".") for k in state))
    if not embeddings:
        raise Refusal([f"{model_type!r}: no input embeddings found outside its blocks"])
    saved = _saved(model, state)
    # files named and shaped as the model holds them: merged from the files; else as the model holds them
    space = "files" if saved == {k: tuple(v.shape) for k, v in state.items()} else "modules"
    head = model.get_output_embeddings()
    head_path = next((n for n, mod in model.named_modules() if mod is head), "lm_head") if head is not None else ""
    amap = dict(getattr(type(cfg), "attribute_map", {}) or {})
    return dict(
        name=model_type, model_types=(model_type,), embeddings=embeddings, layers=layers_path, final_norm="",
        head=head_path, layer_count_key=layer_key, fixed_layers=count if not layer_key else None,
        tied_by_default=bool(getattr(type(cfg)(), "tie_word_embeddings", False)),
        config_keys={role: amap[role] for role in _STANDARD_ROLES if role in amap},
        mergekit=MERGEKIT_DERIVED.get(model_type), merge_space=space, derived=True,
        dfs_reason=f"no data-flow description for {model_type!r} (its norm placement and residual writers are not "
                   "in the module tree)")


def config_object(config: Mapping[str, Any], **overrides: Any):
    """The transformers config object of a ``config.json`` mapping (special floats such as
    ``{"__float__": "Infinity"}`` decoded as transformers writes them), with ``overrides``."""
    from transformers import AutoConfig, PretrainedConfig

    rest = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version",
                                                          "auto_map")}
    rest = PretrainedConfig._decode_special_floats(rest)
    return AutoConfig.for_model(config["model_type"], **{**rest, **overrides})


def _decoder_layers(model: Any, model_type: str, count: Optional[int] = None) -> tuple[str, int]:
    """The path and length of the model's decoder block list (see the module docstring)."""
    import torch

    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    blocks = [(n, m) for n, m in lists if block_classes and all(type(c).__name__ in block_classes for c in m)]
    if not blocks and count:  # no block class declared: a list of one class, as long as the config says
        blocks = [(n, m) for n, m in lists if len(m) == count and len({type(c) for c in m}) == 1]
    if not blocks:
        raise Refusal([f"{model_type!r}: no list of decoder blocks found in its module tree"])
    top = [(n, m) for n, m in blocks if not any(n.startswith(o + ".") for o, _ in blocks if o != n)]
    if len(top) > 1:
        raise Refusal([f"{model_type!r}: its blocks are in several lists ({', '.join(n for n, _ in top)}): which "
                       "layer's values would apply to each is ambiguous"])
    path, layers = top[0]
    return path, len(layers)


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def _configured_layers(config_class: type, config: Mapping[str, Any]) -> Optional[int]:
    amap = getattr(config_class, "attribute_map", {}) or {}
    for key in (amap.get("num_hidden_layers", "num_hidden_layers"), *_LAYER_KEYS):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _layer_count_key(config_class: type, config: Mapping[str, Any], count: int) -> str:
    """The config key that holds the block count; "" when none does (a hybrid's layer pattern gives it)."""
    amap = getattr(config_class, "attribute_map", {}) or {}
    keys = (amap.get("num_hidden_layers", "num_hidden_layers"), *_LAYER_KEYS)
    for key in keys:
        if config.get(key) == count:
            return key
    stated = next((f"{k} is {config[k]}" for k in keys if isinstance(config.get(k), int)), None)
    if stated:
        raise Refusal([f"{config.get('model_type')!r}: its module tree has {count} decoder blocks but its config.json "
                       f"says {stated}"])
    return ""


def _tied_names(model: Any) -> set[str]:
    """Parameters the files leave out because they are tied to another (a tied head), as the
    model itself worked them out from its config."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def _saved(model: Any, state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The names and shapes the files give the model's tensors (transformers' reverse conversion,
    what ``save_pretrained`` applies, run on meta tensors)."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, dict(state)).items()}
    except Exception as exc:
        raise Refusal([f"cannot tell how transformers saves {model.config.model_type!r} ({_short(exc)})"]) from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _tf_version() -> str:
    import transformers

    return transformers.__version__
