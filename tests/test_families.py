"""Every supported model family, end to end, on tiny random models made with transformers' own
config classes (hidden 64, 3 layers, the tiny zoo's tokenizer; nothing downloaded).

For each family: the PS merge equals a hand computation whose tensor groups come from
transformers' own module tree (not from our architecture description), so a value landing on
the wrong layer fails; the merge equals mergekit 0.1.5's (one mergekit process for all
families); a 3-trial search runs from the CLI, and its best recipe exports as a Hugging Face
dir that loads with ``AutoModelForCausalLM`` and gives the search-time logits, and as a
mergekit YAML; a data-flow path is assembled, gives the donors' own logits for an identity
path, and its folded export gives the search-time logits (or, for OLMo2 with scales, is
refused). Sources that cannot be merged are refused at ``validate``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from safetensors.torch import load_file

from evomerge.architecture import ARCHITECTURES, BY_NAME, for_model_dir
from evomerge.cli import main
from evomerge.errors import MergeError
from evomerge.merge.backend import ResidentSources
from evomerge.merge.dataflow import DataFlowModel, build_shell, identity_recipe, load_donors
from evomerge.mergekit_config import mergekit_yaml
from evomerge.recipe import DFSRecipe, Gradient, ModelParams, PathStep, Recipe

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 3
_ATTN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
# family -> (architecture, config class, its arguments)
FAMILIES = {
    "llama": ("llama", T.LlamaConfig, {**_ATTN, "tie_word_embeddings": False}),
    "llama_tied": ("llama", T.LlamaConfig, {**_ATTN, "tie_word_embeddings": True}),
    "mistral": ("mistral", T.MistralConfig, _ATTN),
    "qwen2": ("qwen2", T.Qwen2Config, _ATTN),
    "qwen3": ("qwen3", T.Qwen3Config, _ATTN),
    "gemma": ("gemma", T.GemmaConfig, _ATTN),
    "gemma2": ("gemma2", T.Gemma2Config, {**_ATTN, "sliding_window": 8}),
    "gemma3_text": ("gemma3_text", T.Gemma3TextConfig, {**_ATTN, "sliding_window": 8}),
    "phi3": ("phi3", T.Phi3Config, _ATTN),
    "olmo2": ("olmo2", T.Olmo2Config, _ATTN),
    "gpt_neox": ("gpt_neox", T.GPTNeoXConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                                   num_attention_heads=4)),
    "gpt2": ("gpt2", T.GPT2Config, dict(n_embd=64, n_layer=LAYERS, n_head=4, n_positions=64)),
    "smollm3": ("smollm3", T.SmolLM3Config, {**_ATTN, "no_rope_layer_interval": 2}),
    "granite": ("granite", T.GraniteConfig, {**_ATTN, "residual_multiplier": 0.5, "embedding_multiplier": 2.0}),
    "arcee": ("arcee", T.ArceeConfig, _ATTN),
    "helium": ("helium", T.HeliumConfig, _ATTN),
    "ministral": ("ministral", T.MinistralConfig, {**_ATTN, "sliding_window": 8}),
    "apertus": ("apertus", T.ApertusConfig, _ATTN),
    "olmo3": ("olmo3", T.Olmo3Config, {**_ATTN, "sliding_window": 8}),
    "exaone4": ("exaone4", T.Exaone4Config, {**_ATTN, "sliding_window": 8}),
    "glm4": ("glm4", T.Glm4Config, _ATTN),
    "cohere": ("cohere", T.CohereConfig, {**_ATTN, "use_qk_norm": True}),  # as mergekit's cohere has it
    "phi": ("phi", T.PhiConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                     num_attention_heads=4)),
    # Falcon-7B's layout (one norm, multi-query) and Falcon-40B/180B's (a norm per branch), which mergekit describes
    "falcon_7b": ("falcon", T.FalconConfig, dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4)),
    "falcon": ("falcon", T.FalconConfig, dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                              new_decoder_architecture=True, num_kv_heads=2,
                                              tie_word_embeddings=False)),
    "stablelm": ("stablelm", T.StableLmConfig, _ATTN),
    "starcoder2": ("starcoder2", T.Starcoder2Config, _ATTN),
}
SOURCES = ("base", "expert_a", "expert_b")


def test_every_described_architecture_is_tested_here():
    assert {a for a, _, _ in FAMILIES.values()} == {a.name for a in ARCHITECTURES}
    for arch, config_class, _ in FAMILIES.values():  # the description's defaults are the config class's
        assert BY_NAME[arch].tied_by_default == config_class().tie_word_embeddings, arch
        assert config_class().model_type in BY_NAME[arch].model_types


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, session_tiny_zoo) -> dict[str, dict[str, Path]]:
    """{family: {source: model dir}}: a random base and two perturbed fine-tunes per family."""
    return _make_dirs(FAMILIES, tmp_path_factory.mktemp("families"), session_tiny_zoo)


def _make_dirs(families, root: Path, zoo) -> dict[str, dict[str, Path]]:
    tokenizer = T.AutoTokenizer.from_pretrained(zoo.models["base"])
    from family_walk import fine_tunes

    out = {}
    for family, (_, config_class, kwargs) in families.items():
        cfg = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
        out[family] = fine_tunes(cfg, root / family, SOURCES, tokenizer)
    return out


def _files(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _groups_from_transformers(model_dir: Path) -> dict[str, int]:
    """Tensor name (as saved) -> group, from transformers' own module tree: parameters of the
    i-th module of the model's decoder-layer class (``_no_split_modules``) are layer i; of an
    ``nn.Embedding`` outside the layers, the embeddings group; everything else the head group."""
    model = T.AutoModelForCausalLM.from_pretrained(model_dir)
    layer_classes = set(model._no_split_modules)
    owner: dict[str, int] = {}
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ in layer_classes]
    assert len(layers) == LAYERS
    for i, (prefix, module) in enumerate(layers):
        for pname, _ in module.named_parameters():
            owner[f"{prefix}.{pname}"] = i + 1
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding) and not any(n.startswith(p + ".") for p, _ in layers):
            for pname, _ in m.named_parameters():
                owner[f"{n}.{pname}"] = 0
    # saved names may differ from module names (GPT-NeoX's embed_out is lm_head): fill parameter i
    # with the value i, save, and read each saved tensor's value back
    params = list(model.named_parameters())
    with torch.no_grad():
        for i, (_, p) in enumerate(params):
            p.fill_(float(i))
    out_dir = Path(model_dir).parent / f".{Path(model_dir).name}-groups"
    model.save_pretrained(out_dir)
    return {key: owner.get(params[int(t.flatten()[0])][0], LAYERS + 1) for key, t in _files(out_dir).items()}


def _recipe(method: str = "task_arithmetic") -> Recipe:
    per_group = tuple(0.1 * (g + 1) for g in range(LAYERS + 2))  # a different weight for every group
    return Recipe(method=method, base_model="base", dtype="float32", models=(
        ModelParams(model="expert_a", parameters={"weight": per_group}),
        ModelParams(model="expert_b", parameters={"weight": Gradient(gradient=(0.2, 1.0))}),
    ), parameters={"normalize": False})


def _gradient_at(g: int) -> float:
    t = 0.0 if g in (0, LAYERS + 1) else (g - 1) / (LAYERS - 1)
    return 0.2 + 0.8 * t


@pytest.mark.parametrize("family", FAMILIES)
def test_ps_merge_is_the_hand_computation_on_the_right_layers(family, family_dirs, tmp_path):
    dirs = family_dirs[family]
    assert for_model_dir(dirs["base"]).name == FAMILIES[family][0]
    files = {name: _files(d) for name, d in dirs.items()}
    groups = _groups_from_transformers(dirs["base"])
    assert set(groups) == set(files["base"])
    assert sorted(set(groups.values())) == list(range(LAYERS + 2))  # every group is populated

    sources = ResidentSources.from_model_dirs(dirs, "base")
    assert sources.num_layers == LAYERS
    model = T.AutoModelForCausalLM.from_pretrained(dirs["base"])
    sources.merge_into(_recipe(), model.state_dict())
    model.save_pretrained(tmp_path / "merged")
    merged = _files(tmp_path / "merged")
    assert set(merged) == set(files["base"])
    for key, base in files["base"].items():
        g = groups[key]
        want = (base + 0.1 * (g + 1) * (files["expert_a"][key] - base)
                + _gradient_at(g) * (files["expert_b"][key] - base))
        assert torch.allclose(merged[key], want, atol=1e-6), (key, g)


MERGEKIT_RUNNER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(config) as f:
        try:
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(f)), out,
                      options=MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False))
        except Exception as exc:
            print("FAILED", out, type(exc).__name__, str(exc).splitlines()[0])
"""
# families mergekit 0.1.5 cannot merge as transformers 5 saves them, and why
MERGEKIT_CANNOT = {
    "gpt_neox": "its gpt-neox description requires the attention.bias mask buffers, which transformers "
                "no longer saves",
    "falcon_7b": "its falcon description is the new decoder architecture's (ln_attn / ln_mlp) only",
}


# mixture-of-experts families, read from transformers' module tree (no hand description), that
# mergekit 0.1.5 describes: their files hold one tensor per expert, which both tools merge
MOE = {
    "mixtral": (T.MixtralConfig, dict(hidden_size=64, intermediate_size=32, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "qwen3_moe": (T.Qwen3MoeConfig, dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                         mlp_only_layers=[])),
}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, session_tiny_zoo) -> dict[str, dict[str, Path]]:
    return _make_dirs({f: (None, c, k) for f, (c, k) in MOE.items()}, tmp_path_factory.mktemp("moe"),
                      session_tiny_zoo)


def test_ps_merges_equal_mergekits_for_every_family(family_dirs, moe_dirs, tmp_path):
    """Every family mergekit 0.1.5 describes (hand-described and MoE): mergekit's TIES merge of
    the same recipe, tensor for tensor; the others are refused at export ("use --format hf")."""
    pytest.importorskip("mergekit")
    args = []
    families = {**family_dirs, **moe_dirs}
    for family, dirs in families.items():
        arch = for_model_dir(dirs["base"])
        if arch.mergekit is None:
            with pytest.raises(Exception, match=f"mergekit has no architecture for {arch.name}; use --format hf"):
                mergekit_yaml(_recipe("ties"), {k: str(v) for k, v in dirs.items()}, arch)
            continue
        config = tmp_path / f"{family}.yml"
        config.write_text(mergekit_yaml(_recipe("ties"), {k: str(v) for k, v in dirs.items()}, arch))
        args += [str(config), str(tmp_path / family)]
    done = subprocess.run([sys.executable, "-c", MERGEKIT_RUNNER, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = {Path(line.split()[1]).name: line for line in done.stdout.splitlines() if line.startswith("FAILED")}
    print(failed)
    assert set(failed) == set(MERGEKIT_CANNOT)
    compared = []
    for family, dirs in families.items():
        if family in MERGEKIT_CANNOT or for_model_dir(dirs["base"]).mergekit is None:
            continue
        ours = ResidentSources.from_model_dirs(dirs, "base").merged_state_dict(_recipe("ties"))
        theirs = _files(tmp_path / family)
        assert set(theirs) == set(ours), family
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        print(f"mergekit parity {family}: max abs diff {worst:.3g}")
        assert worst == 0.0, family
        compared.append(family)
    assert {"mixtral", "qwen3_moe", "llama", "falcon", "cohere"} <= set(compared)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def _path(scaled: bool) -> DFSRecipe:
    s = (lambda x: x) if scaled else (lambda x: 1.0)
    return DFSRecipe(embed_from="base", layers=(
        PathStep(model="expert_a", layer=0), PathStep(model="base", layer=1, scale=s(1.3)),
        PathStep(model="expert_a", layer=1, scale=s(0.8)), PathStep(model="expert_a", layer=1, scale=s(1.1)),
        PathStep(model="base", layer=2, scale=s(0.9))))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_dfs_paths_assemble_and_export_the_searched_model(family, family_dirs, tmp_path):
    dirs = {k: str(v) for k, v in family_dirs[family].items()}
    dfm = DataFlowModel(load_donors(dirs), build_shell(dirs["base"]))
    ids = _ids(dfm.donors["base"].config.vocab_size)
    for name in SOURCES:  # the shell with a donor's own path is that donor
        got = dfm.assemble(identity_recipe(name, dfm.num_layers(name)))(ids).logits
        assert torch.allclose(got, dfm.donors[name](ids).logits, atol=1e-5), name
    arch = BY_NAME[FAMILIES[family][0]]
    for scaled in (False, True):
        recipe = _path(scaled)
        searched = dfm.assemble(recipe)(ids).logits.clone()
        out = tmp_path / f"export-{scaled}"
        if scaled and not arch.can_fold_scales:
            with pytest.raises(MergeError, match="no norm before each branch"):
                dfm.export(recipe, out)
            continue
        dfm.export(recipe, out)
        exported = T.AutoModelForCausalLM.from_pretrained(out).eval()
        diff = (exported(ids).logits - searched).abs().max().item()
        assert diff <= 1e-4, (family, scaled, diff)
        if scaled:  # the scales matter: without them the model is another one
            plain = dfm.assemble(_path(False))(ids).logits
            assert (plain - searched).abs().max().item() > 1e-3


def test_dfs_export_keeps_the_search_dtype(family_dirs, tmp_path):
    dirs = {k: str(v) for k, v in family_dirs["gemma2"].items()}
    dfm = DataFlowModel(load_donors(dirs, dtype=torch.bfloat16), build_shell(dirs["base"], torch.bfloat16))
    dfm.export(_path(True), tmp_path / "bf16")
    assert {t.dtype for t in _files(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def _experiment(tmp_path: Path, family: str, dirs: dict[str, Path], tasks_dir: Path, space: str, **extra) -> Path:
    data = {
        "name": f"fam-{family}",
        "models": [{"name": n, "path": str(d)} for n, d in dirs.items()],
        "base_model": "base",
        "search_space": str(ROOT / "search_spaces" / space) if space.endswith(".yaml") else yaml.safe_load(space),
        "suite": {"task_paths": [str(tasks_dir)], "batch_size": 64,
                  "tasks": [{"name": "zoo_arith_l2_search", "metric": "acc", "limit": 8}]},
        "optimizer": {"name": "cma_es", "popsize": 3, "seed": 0, "islands": 1},
        "budget": {"max_trials": 3},
        "dispatch": {"backend": "local", "num_workers": 1},
        "tracking": {"backend": "none"},
        **extra,
    }
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("family", [*FAMILIES, *MOE])
@torch.no_grad()
def test_a_search_exports_a_model_that_loads_and_scores_as_searched(family, family_dirs, moe_dirs, session_tiny_zoo,
                                                                      tmp_path, capsys):
    """A 3-trial per-layer TIES search from the CLI on the family, exported as a model dir that gives
    the searched logits and as a mergekit YAML (where mergekit describes the family); mixture-of-
    experts families are merged as the model holds them (stacked experts) and exported per expert."""
    dirs = {**family_dirs, **moe_dirs}[family]
    exp = _experiment(tmp_path, family, dirs, session_tiny_zoo.tasks_dir, "ps_ties_per_layer.yaml")
    assert main(["validate", str(exp)]) == 0
    run = tmp_path / "run"
    assert main(["run", str(exp), "--run-dir", str(run), "--quiet"]) == 0
    records = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    trials = [r for r in records if r.get("kind") == "trial"]
    assert len(trials) == 3 and all(r["state"] == "complete" for r in trials), trials
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    mergekit = for_model_dir(dirs["base"]).mergekit
    assert main(["export", str(run), "--format", "mergekit", "--out", str(tmp_path / "mk")]) == (0 if mergekit else 1)
    if not mergekit:
        assert "mergekit has no architecture for" in capsys.readouterr().err
    capsys.readouterr()
    best = Recipe.from_yaml((tmp_path / "hf" / "evomerge_recipe.yaml").read_text())
    searched = T.AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
    ResidentSources.from_model_dirs(dirs, "base").merge_into(best, searched.state_dict())
    exported = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(searched.config.vocab_size)
    assert torch.allclose(exported(ids).logits, searched(ids).logits, atol=1e-5)
    assert T.AutoTokenizer.from_pretrained(tmp_path / "hf") is not None
    if mergekit:
        mk = yaml.safe_load((tmp_path / "mk" / "mergekit.yaml").read_text())
        assert mk["merge_method"] == "ties" and len(mk["models"]) == 2 and mk["base_model"] == str(dirs["base"])


DFS_SPACE = "{kind: dfs, repetitions: 1, scaling: true, scale: {low: 0.8, high: 1.25}, start: embed_from}"


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "gpt_neox"])
def test_a_dfs_search_runs_and_exports_for_other_layouts(family, family_dirs, session_tiny_zoo, tmp_path, capsys):
    dirs = family_dirs[family]
    exp = _experiment(tmp_path, family, dirs, session_tiny_zoo.tasks_dir, DFS_SPACE)
    run = tmp_path / "run"
    assert main(["run", str(exp), "--run-dir", str(run), "--quiet"]) == 0
    trials = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert [r["state"] for r in trials if r.get("kind") == "trial"] == ["complete"] * 3
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf") is not None


def test_sources_that_cannot_be_merged_are_refused_at_validate(family_dirs, moe_dirs, session_tiny_zoo, tmp_path,
                                                                capsys):
    tasks = session_tiny_zoo.tasks_dir
    fam = family_dirs
    # architectures evomerge cannot merge: no causal-LM class; an encoder-decoder
    t5, bart = tmp_path / "t5", tmp_path / "bart"
    for d, cfg in ((t5, {"model_type": "t5"}), (bart, T.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2,
                                                                    vocab_size=500).to_dict())):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
    cases = {
        "unsupported": ({"base": fam["llama"]["base"], "other": t5}, "ps_ties.yaml",
                        ["models: other: architecture 't5' has no causal language-model class in transformers"]),
        "encoder-decoder": ({"base": fam["llama"]["base"], "other": bart}, "ps_ties.yaml",
                            ["models: other: 'bart' is an encoder-decoder model"]),
        "dfs of a derived family": (moe_dirs["mixtral"], DFS_SPACE,
                                    ["search_space: a data-flow merge needs a description of the family: no data-flow "
                                     "description for 'mixtral'"]),
        "llama+gemma": ({"base": fam["llama"]["base"], "g": fam["gemma"]["expert_a"]}, "ps_ties.yaml",
                        ["models: g is gemma but base is llama"]),
        "vocab+layers": ({"base": fam["llama"]["base"], "n": fam["gpt_neox"]["base"]}, "ps_ties.yaml",
                         ["models: n is gpt_neox but base is llama"]),
        "tied+untied": ({"base": fam["llama"]["base"], "t": fam["llama_tied"]["expert_a"]}, "ps_ties.yaml",
                        ["models: t has tie_word_embeddings True but base has False"]),
        "dfs scaling olmo2": (fam["olmo2"], DFS_SPACE, ["search_space.scaling: olmo2 layers have no norm"]),
        "llama+qwen2 donors": ({"base": fam["llama"]["base"], "q": fam["qwen2"]["expert_a"]}, DFS_SPACE,
                               ["models: q is qwen2 but base is llama"]),
    }
    # a hidden-size mismatch inside one family
    wide = tmp_path / "wide"
    cfg = T.LlamaConfig(**{**_ATTN, "hidden_size": 96, "vocab_size": 400})
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(wide)
    cases["hidden"] = ({"base": fam["llama"]["base"], "w": wide}, DFS_SPACE,
                       ["models: w has hidden_size 96 but base has 64", "models: w has vocab_size 400 but base has"])
    for label, (models, space, expected) in cases.items():
        exp = _experiment(tmp_path, label.replace(" ", "_").replace("+", "_"), models, tasks, space)
        code = main(["validate", str(exp), "--json"])
        report = json.loads(capsys.readouterr().out)
        assert code == 2 and not report["ok"], label
        text = "\n".join(report["problems"])
        for part in expected:
            assert part in text, (label, text)


def test_a_corrupt_safetensors_file_is_named(family_dirs, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(family_dirs["llama"]["expert_a"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(MergeError, match=r"source 'expert_a': cannot read .*broken/model.safetensors.*corrupt"):
        ResidentSources.from_model_dirs({"base": family_dirs["llama"]["base"], "expert_a": broken}, "base")
    with pytest.raises(MergeError, match=r"donor 'expert_a': cannot load .*broken"):
        load_donors({"expert_a": str(broken)})


def test_mergekit_refusals_name_the_wrong_end():
    arch = BY_NAME["llama"]
    dirs = {"a": "/a", "b": "/b"}
    with pytest.raises(Exception, match=r"this one ends in b; use --format hf"):
        mergekit_yaml(DFSRecipe(embed_from="a", layers=(PathStep(model="a", layer=0), PathStep(model="b", layer=1))),
                      dirs, arch)
    with pytest.raises(Exception, match=r"this one starts in b; use"):
        mergekit_yaml(DFSRecipe(embed_from="a", layers=(PathStep(model="b", layer=0), PathStep(model="a", layer=1))),
                      dirs, arch)
    with pytest.raises(Exception, match="cannot fold into gemma2's sandwich-norm"):
        mergekit_yaml(DFSRecipe(embed_from="a", layers=(PathStep(model="a", layer=0),
                                                        PathStep(model="a", layer=1, scale=1.2))),
                      dirs, BY_NAME["gemma2"])


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "gemma3_text", "phi3"])
def test_streaming_merges_and_dry_runs_read_the_family(family, family_dirs, session_tiny_zoo, tmp_path, capsys):
    from evomerge.merge.streaming import stream_merge

    dirs = family_dirs[family]
    stats = stream_merge(_recipe(), dirs, tmp_path / "streamed", shard_bytes=64 * 1024)
    assert stats.shards > 1
    want = ResidentSources.from_model_dirs(dirs, "base").merged_state_dict(_recipe())
    got = _files(tmp_path / "streamed")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    exp = _experiment(tmp_path, family, dirs, session_tiny_zoo.tasks_dir, "ps_ties_per_layer.yaml")
    assert main(["run", str(exp), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    params = sum(p.numel() for p in T.AutoModelForCausalLM.from_pretrained(dirs["base"]).parameters())
    assert [m["layers"] for m in plan["models"]] == [LAYERS] * 3
    assert plan["models"][0]["params_b"] * 1e9 == pytest.approx(params)
    assert plan["dim"] == 2 * 2 * (LAYERS + 2)


def test_a_checkpoint_named_otherwise_is_refused_not_merged_into_one_group(family_dirs, tmp_path):
    from safetensors.torch import save_file

    dirs = {}
    for name, d in family_dirs["gpt2"].items():  # GPT-2 as old Hub checkpoints name it: no "transformer."
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        (dirs[name] / "config.json").write_text((d / "config.json").read_text())
        save_file({k.removeprefix("transformer."): t.contiguous() for k, t in _files(d).items()},
                  str(dirs[name] / "model.safetensors"))
    with pytest.raises(MergeError, match="not named as transformers names a gpt2 model"):
        ResidentSources.from_model_dirs(dirs, "base")


def test_a_hand_written_merge_of_two_families_is_refused(family_dirs, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "linear", "base_model": "base", "models": [
        {"model": "base", "parameters": {"weight": 0.5}}, {"model": "g", "parameters": {"weight": 0.5}}]}))
    code = main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--model",
                 f"base={family_dirs['llama']['base']}", "--model", f"g={family_dirs['gemma']['base']}"])
    err = capsys.readouterr().err
    assert code != 0 and "models: g is gemma but base is llama" in err, err


def test_a_derived_family_plans_and_refuses_streaming_clearly(moe_dirs, session_tiny_zoo, tmp_path, capsys):
    """Mixtral (no hand description): the dry run counts its layers and parameters from the module
    tree; `validate` says what it can do; a streaming merge, which reads files tensor by tensor, is
    refused in one line (its files hold one tensor per expert, the model stacks them)."""
    from evomerge.merge.streaming import stream_merge

    dirs = moe_dirs["mixtral"]
    exp = _experiment(tmp_path, "mixtral", dirs, session_tiny_zoo.tasks_dir, "ps_ties_per_layer.yaml")
    assert main(["validate", str(exp)]) == 0
    assert ("base: mixtral: PS: yes (derived) · DFS: no (no data-flow description for 'mixtral'"
            in capsys.readouterr().out)
    assert main(["run", str(exp), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    params = sum(p.numel() for p in T.AutoModelForCausalLM.from_pretrained(dirs["base"]).parameters())
    assert [m["layers"] for m in plan["models"]] == [LAYERS] * 3
    assert plan["models"][0]["params_b"] * 1e9 == pytest.approx(params)
    with pytest.raises(MergeError, match="merge without --stream"):
        stream_merge(_recipe(), dirs, tmp_path / "streamed")
