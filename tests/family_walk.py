"""Walk every model type transformers maps to a causal-LM class: build a tiny random model of each
(from its own config class), and check what evomerge does with it (tests/test_family_coverage.py).

For a type evomerge accepts for parameter-space merges, three tiny models (a base and two
perturbed fine-tunes) are saved, merged with a recipe whose weight differs in every tensor group,
and checked against a hand computation whose groups come from transformers' module tree and its
own save (each parameter filled with its index, saved, read back), not from evomerge's layout:
a value landing on the wrong layer fails. The merged model is exported (``export_hf``), loaded
with ``AutoModelForCausalLM`` and must give the merged model's logits.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

LAYERS = 2
TINY = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=128, max_position_embeddings=64, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, n_group=1, topk_group=1, n_embd=64, n_head=4, n_inner=64, n_positions=64, d_model=64,
            ffn_hidden_size=64, num_heads=4, sliding_window=8, d_ff=64, rotary_dim=16, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "max_window_layers")
# what a family's config needs besides the sizes above to build tiny (hybrids: an attention block
# among the few; state-space: heads x head size = expand x hidden), as its config class names it
TWEAKS: dict[str, dict[str, Any]] = {
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 8, "mamba_d_head": 16},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": 8, "mamba_d_head": 16},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "gemma4_text": {"vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}},
}
MAX_PARAMS = 5_000_000


@dataclass
class Outcome:
    model_type: str
    kind: str  # "dense" | "moe" | "encoder-decoder" | "multimodal" | "not built"
    status: str  # "PS (described)" | "PS (derived)" | "refused" | "not built" | "WRONG"
    detail: str = ""
    dfs: bool = False


def tiny_config(model_type: str, layers: int = LAYERS, minimal: bool = False):
    """A tiny config of ``model_type`` (its own config class, small sizes; ``minimal``: only the
    layer count and the vocabulary changed), or raises."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    names = set(defaults) | set(getattr(cls, "attribute_map", {}) or {})
    tiny = {k: v for k, v in TINY.items() if not minimal or k in ("vocab_size", "pad_token_id", "bos_token_id",
                                                                   "eos_token_id")}
    tiny.update({k: layers for k in LAYER_KEYS})
    kwargs = {k: v for k, v in tiny.items() if k in names}
    if "qk_rope_head_dim" in names:
        kwargs.pop("head_dim", None)  # multi-head latent attention: its head size follows the rope/nope parts
    if "layer_types" in defaults:
        kwargs["layer_types"] = None  # recomputed for this many layers
    if not minimal:
        kwargs.update(TWEAKS.get(model_type, {}))
    for _ in range(len(kwargs) + 1):
        try:
            return cls(**kwargs)
        except (AttributeError, TypeError, ValueError) as exc:  # a derived attribute that cannot be set
            bad = next((k for k in kwargs if k in str(exc)), None)
            if bad is None:
                raise
            kwargs.pop(bad)
    raise RuntimeError("no tiny config")


def _built(model_type: str):
    """(config, meta model, layers) of the smallest model of ``model_type`` that builds and runs."""
    import transformers as T

    errors: list[Exception] = []
    for layers, minimal, cap in ((LAYERS, False, MAX_PARAMS), (4, False, MAX_PARAMS), (LAYERS, True, 8 * MAX_PARAMS)):
        try:
            cfg = tiny_config(model_type, layers, minimal)
            with torch.device("meta"):
                meta = T.AutoModelForCausalLM.from_config(cfg)
            params = sum(p.numel() for p in meta.parameters())
            if params > cap:
                raise RuntimeError(f"its smallest config here has {params / 1e6:.0f}M parameters")
            with torch.no_grad():
                T.AutoModelForCausalLM.from_config(cfg).eval()(torch.tensor([[3, 4, 5, 6]]))  # it runs
            return cfg, meta
        except Exception as exc:
            errors.append(exc)
    error = errors[0]  # the tiniest try's reason
    raise error


def kind_of(model_type: str, model: Optional[torch.nn.Module]) -> str:
    """The type's kind, from its config class's defaults (a causal-LM class may rewrite the config it
    is given: BART's sets ``is_encoder_decoder`` false) and the module tree's experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type]()
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder"
    text = getattr(getattr(cfg, "text_config", None), "model_type", None)
    if any(m in s for s in (getattr(cfg, "sub_configs", None) or {}) for m in ("vision", "audio", "speech", "image")) \
            or (text and text != model_type):
        return "multimodal"
    if model is not None and any("expert" in n.split(".")[-1] for n, _ in model.named_modules()):
        return "moe"
    return "dense"


def _files(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def module_groups(model_dir: Path) -> tuple[dict[str, int], int]:
    """File tensor -> group (0 embeddings, i + 1 block i, n + 1 the rest), and the block count n, from
    transformers' module tree: the blocks are the members of the model's top-level list of its block
    class (``_no_split_modules``; else of one class), the embeddings its ``nn.Embedding`` modules
    outside them; file names come from filling each parameter with its own index, saving, and
    reading the values back (a tied parameter belongs to the lowest group of its names)."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(model_dir)
    classes = set(model._no_split_modules or ())
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    lists = [(n, m) for n, m in lists if all(type(c).__name__ in classes for c in m)] or \
        [(n, m) for n, m in lists if len({type(c) for c in m}) == 1]
    lists = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists if o != n)]
    assert len(lists) == 1, f"block lists: {[n for n, _ in lists]}"
    prefix, blocks = lists[0]
    owner: dict[str, int] = {}
    for i, block in enumerate(blocks):
        for pname, _ in block.named_parameters(remove_duplicate=False):
            owner[f"{prefix}.{i}.{pname}"] = i + 1
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding) and not n.startswith(prefix + "."):
            for pname, _ in m.named_parameters(remove_duplicate=False):
                owner[f"{n}.{pname}"] = 0
    rest = len(blocks) + 1
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    params = list(model.named_parameters())
    group_of = [min((owner.get(n, rest) for n in names[id(p)]), default=rest) for _, p in params]
    with torch.no_grad():
        for i, (_, p) in enumerate(params):
            p.fill_(float(i))
    out_dir = Path(model_dir).parent / f".{Path(model_dir).name}-groups"
    model.save_pretrained(out_dir)
    return ({key: group_of[int(t.flatten()[0])] for key, t in _files(out_dir).items() if t.is_floating_point()},
            len(blocks))


def check(model_type: str, root: Path) -> Outcome:
    """What evomerge does with a tiny model of ``model_type`` (see the module docstring)."""
    import transformers as T

    from evomerge.architecture import BY_MODEL_TYPE, for_config
    from evomerge.errors import ConfigError

    try:
        cfg, meta = _built(model_type)
    except Exception as exc:
        return _unbuilt(model_type, exc)
    kind = kind_of(model_type, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dirs = _sources(cfg, root / model_type)
    config = json.loads((dirs["base"] / "config.json").read_text())
    if kind == "encoder-decoder":  # its full checkpoints are refused; its causal-LM class saves a decoder only
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        try:
            for_config(json.loads(CONFIG_MAPPING[model_type]().to_json_string()), "models: base")
            return Outcome(model_type, kind, "WRONG", "a full encoder-decoder checkpoint was accepted")
        except ConfigError:
            pass
    try:
        arch = for_config(config, "models: base")
    except ConfigError as exc:
        return Outcome(model_type, kind, "refused", exc.problems[0].split(": ", 2)[-1])
    try:
        _check_merge(dirs, root / model_type)
    except AssertionError as exc:
        return Outcome(model_type, kind, "WRONG", str(exc)[:300])
    except Exception as exc:  # evomerge accepted it and then failed: as wrong as a wrong value
        return Outcome(model_type, kind, "WRONG", f"{type(exc).__name__}: {_short(exc)}")
    status = "PS (derived)" if arch.derived else "PS (described)"
    note = ("full encoder-decoder checkpoints are refused; its causal-LM class's decoder-only checkpoints merge"
            if kind == "encoder-decoder" else "")
    return Outcome(model_type, kind, status, note, dfs=model_type in BY_MODEL_TYPE)


def _unbuilt(model_type: str, exc: Exception) -> Outcome:
    """No tiny model of the type: what evomerge says of its default config (nothing to check)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from evomerge.architecture import for_config
    from evomerge.errors import ConfigError

    detail = f"no tiny model to check it here ({_short(exc)})"
    try:
        kind = kind_of(model_type, None)
        try:
            import transformers as T

            with torch.device("meta"):
                kind = kind_of(model_type, T.AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type]()))
        except Exception:
            pass
        arch = for_config(json.loads(CONFIG_MAPPING[model_type]().to_json_string()), "models: base")
    except ConfigError as refusal:
        reason = refusal.problems[0].split(": ", 2)[-1]
        if reason.startswith("transformers cannot"):  # not even its default config builds
            return Outcome(model_type, "not built", "not built", detail)
        return Outcome(model_type, kind if "kind" in locals() else "not built", "refused", reason)
    except Exception:
        return Outcome(model_type, "not built", "not built", detail)
    return Outcome(model_type, kind, "not built", ("evomerge would merge it (PS, derived); " if arch.derived else "")
                   + detail)


def _sources(cfg: Any, root: Path) -> dict[str, Path]:
    # reloaded as transformers loads them (a few families change a value on loading, e.g. zero a
    # padding row): what a real checkpoint gives every user, and what the merge then starts from
    return fine_tunes(cfg, root, ("base", "expert_a", "expert_b"), reload=True)


def fine_tunes(cfg: Any, root: Path, names: tuple[str, ...], tokenizer: Any = None,
               reload: bool = False) -> dict[str, Path]:
    """A random model of ``cfg`` saved as ``names[0]`` and perturbed copies of it (fine-tunes) as
    the others, each under ``root / name``."""
    import transformers as T

    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(cfg).eval()
    dirs = {}
    for i, name in enumerate(names):
        model = base
        if i:
            model = T.AutoModelForCausalLM.from_config(cfg).eval()
            model.load_state_dict(base.state_dict())
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    if p.is_floating_point():
                        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        if tokenizer is not None:
            tokenizer.save_pretrained(dirs[name])
        if reload:
            T.AutoModelForCausalLM.from_pretrained(dirs[name]).save_pretrained(dirs[name])
    return dirs


@torch.no_grad()
def _check_merge(dirs: dict[str, Path], root: Path) -> None:
    import transformers as T

    from evomerge.export import export_hf
    from evomerge.merge.backend import ResidentSources
    from evomerge.recipe import ModelParams, Recipe

    groups, layers = module_groups(dirs["base"])
    sources = ResidentSources.from_model_dirs(dirs, "base")
    assert sources.num_layers == layers, f"{sources.num_layers} layers counted, {layers} built"
    recipe = Recipe(method="task_arithmetic", base_model="base", dtype="float32", models=(
        ModelParams(model="expert_a", parameters={"weight": tuple(0.1 * (g + 1) for g in range(layers + 2))}),
        ModelParams(model="expert_b", parameters={"weight": tuple(0.9 - 0.2 * g for g in range(layers + 2))}),
    ), parameters={"normalize": False})
    model = T.AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
    sources.merge_into(recipe, model)  # as a search's worker does, in place
    out = export_hf(recipe, {k: str(v) for k, v in dirs.items()}, "base", root / "export")
    files = {name: _files(d) for name, d in dirs.items()}
    merged = _files(out)
    assert set(merged) == set(files["base"]), "the export holds other tensors than the sources"
    for key, g in groups.items():
        b = files["base"][key]
        want = b + 0.1 * (g + 1) * (files["expert_a"][key] - b) + (0.9 - 0.2 * g) * (files["expert_b"][key] - b)
        assert torch.allclose(merged[key], want, atol=1e-5), f"{key} (group {g}) is not the hand computation"
    exported = T.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    got, want = exported(ids).logits, model(ids).logits
    assert torch.allclose(got, want, atol=1e-5), f"export logits differ by {(got - want).abs().max().item():.3g}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return re.sub(r"\s+", " ", text[0])[:200] if text else type(exc).__name__


def walk(types: Optional[list[str]] = None) -> list[Outcome]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    import transformers as T

    T.logging.set_verbosity_error()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            out.append(check(model_type, Path(tmp)))
    return out
