"""LoRA adapters as sources (issue 39): exact merges against PEFT's merge_and_unload, the merged
adapter export, refusals, planning, and a real search over the tiny adapter zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from evomerge.adapters import base_problem, load_factors, read_config, write_adapter  # noqa: E402
from evomerge.cli import main  # noqa: E402
from evomerge.errors import ConfigError, MergeError  # noqa: E402
from evomerge.ledger import Ledger  # noqa: E402
from evomerge.merge.backend import ResidentSources  # noqa: E402
from evomerge.merge.merged_adapter import merged_adapter  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (rank, alpha, targets, extra LoraConfig settings): different ranks, rsLoRA, a rank pattern,
# an embedding and an output head adapted, modules adapted by one adapter only
ADAPTERS = {
    "a": (4, 8, ["q_proj", "v_proj", "embed_tokens"], {}),
    "b": (2, 8, ["q_proj", "down_proj", "lm_head"], {"use_rslora": False}),
    "c": (4, 8, ["k_proj", "o_proj", "up_proj", "v_proj"], {"use_rslora": True, "rank_pattern": {"up_proj": 1}}),
}


def _grid(tensor: torch.Tensor, step: float, span: int, generator: torch.Generator) -> torch.Tensor:
    """Values ``k * step``, ``|k| <= span``: sums and products of a few stay exact in float32."""
    return torch.randint(-span, span + 1, tensor.shape, generator=generator).to(tensor.dtype) * step


def _make(root: Path, grid: bool) -> dict[str, Path]:
    """A tiny Llama base, three PEFT LoRA adapters on it (saved by PEFT), and the full models PEFT's
    merge_and_unload makes of them. ``grid``: every weight on a coarse dyadic grid, so every sum the
    merges make is exact and both paths must agree bit for bit."""
    g = torch.Generator().manual_seed(7 if grid else 8)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=48, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    if grid:
        with torch.no_grad():
            for p in base.parameters():
                p.copy_(_grid(p, 1 / 256, 64, g))
    base.save_pretrained(root / "base")
    dirs = {"base": root / "base"}
    for name, (r, alpha, targets, extra) in ADAPTERS.items():
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                               LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                                          **extra))
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_" in key:
                    p.copy_(_grid(p, 1 / 16, 4, g) if grid else torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(root / name)
        full = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), root / name)
        full.merge_and_unload().save_pretrained(root / f"{name}_full")
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def grid_dirs(tmp_path_factory) -> dict[str, Path]:
    return _make(tmp_path_factory.mktemp("lora-grid"), grid=True)


@pytest.fixture(scope="module")
def random_dirs(tmp_path_factory) -> dict[str, Path]:
    return _make(tmp_path_factory.mktemp("lora-random"), grid=False)


def _both(dirs: dict[str, Path]) -> tuple[ResidentSources, ResidentSources]:
    adapters = ResidentSources.from_model_dirs(dirs, "base")
    full = ResidentSources.from_model_dirs({k: v if k == "base" else v.parent / f"{k}_full" for k, v in dirs.items()},
                                           "base")
    return adapters, full


WEIGHTS = {"a": 0.75, "b": 0.5, "c": 0.25}  # dyadic: the low-rank sums stay exact on the grid


def _recipe(method: str) -> Recipe:
    if method == "slerp":
        return Recipe.from_dict({"method": "slerp", "base_model": "base", "parameters": {"t": 0.375},
                                 "models": [{"model": "base"}, {"model": "a"}]})
    if method == "model_stock":
        return Recipe.from_dict({"method": method, "base_model": "base", "models": [{"model": m} for m in "abc"]})
    extra = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.625},
             "breadcrumbs": {"density": 0.75, "gamma": 0.0625}, "breadcrumbs_ties": {"density": 0.75, "gamma": 0.0625},
             "della": {"density": 0.5, "epsilon": 0.125}, "della_linear": {"density": 0.5, "epsilon": 0.125}}
    models = [{"model": m, "parameters": {"weight": w, **extra.get(method, {})}} for m, w in WEIGHTS.items()]
    if method == "linear":
        models.append({"model": "base", "parameters": {"weight": 0.5}})
    return Recipe.from_dict({"method": method, "base_model": "base", "models": models, "seed": 11,
                             "parameters": {"lambda": 1.5} if method == "task_arithmetic" else {}})


METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
           "della_linear", "slerp", "model_stock"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_on_adapters_equals_it_on_the_merged_full_models(grid_dirs, method) -> None:
    adapters, full = _both(grid_dirs)
    assert adapters.adapters == ("a", "b", "c") and full.adapters == ()
    recipe = _recipe(method)
    ours, theirs = adapters.merged_state_dict(recipe), full.merged_state_dict(recipe)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), (method, key, (ours[key] - theirs[key]).abs().max())


def test_sources_alone_are_peft_merge_and_unload(grid_dirs, random_dirs) -> None:
    for dirs in (grid_dirs, random_dirs):
        adapters, full = _both(dirs)
        for name in "abc":
            ours, theirs = adapters.state_dict(name), full.state_dict(name)
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0 if dirs is grid_dirs else 1e-6)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_real_valued_adapters_agree_up_to_float_rounding(random_dirs, method) -> None:
    adapters, full = _both(random_dirs)
    recipe = _recipe(method)
    ours, theirs = adapters.merged_state_dict(recipe), full.merged_state_dict(recipe)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_untouched_tensors_stay_the_base_and_memory_is_the_factors(random_dirs) -> None:
    adapters, full = _both(random_dirs)
    merged = adapters.merged_state_dict(_recipe("ties"))
    base = adapters.state_dict("base")
    for key in ("model.norm.weight", "model.layers.0.mlp.gate_proj.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(merged[key], base[key])
    factor_bytes = sum(f.stat().st_size for n in "abc" for f in random_dirs[n].glob("*.safetensors"))
    base_bytes = sum(t.numel() * 4 for t in base.values())
    # the base once + the factors (PEFT's file also holds a copy of the adapted embedding: not kept)
    assert adapters.resident_bytes < base_bytes + factor_bytes
    assert full.resident_bytes >= 3 * base_bytes


def test_the_merged_adapter_is_exact_for_linear_merges_and_peft_loads_it(random_dirs, tmp_path) -> None:
    adapters, _ = _both(random_dirs)
    for method in ("task_arithmetic", "linear"):
        recipe = _recipe(method)
        made = merged_adapter(adapters, recipe)
        assert made.exact
        out = write_adapter(tmp_path / method, made.factors, adapters.arch.module_name,
                            base_model_name_or_path=str(random_dirs["base"]), embeddings=made.embeddings)
        loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(random_dirs["base"]), out)
        theirs = loaded.merge_and_unload().state_dict()
        ours = adapters.merged_state_dict(recipe)
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, rtol=1e-5, atol=2e-6)


def test_a_sparsified_merge_exports_as_svd_with_its_measured_error(random_dirs, tmp_path) -> None:
    adapters, _ = _both(random_dirs)
    recipe = _recipe("ties")
    made = merged_adapter(adapters, recipe)
    assert not made.exact and 0 < made.total_error < 1 and made.errors
    out = write_adapter(tmp_path / "ties", made.factors, adapters.arch.module_name, base_model_name_or_path=None,
                        embeddings=made.embeddings)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(random_dirs["base"]), out)
    theirs = loaded.merge_and_unload().state_dict()
    ours = adapters.merged_state_dict(recipe)
    base = adapters.state_dict("base")
    missed = sum(float((theirs[k] - ours[k]).pow(2).sum()) for k in ours)
    changed = sum(float((ours[k] - base[k]).pow(2).sum()) for k in ours)
    assert abs((missed / changed) ** 0.5 - made.total_error) < 1e-3
    full_rank = merged_adapter(adapters, recipe, rank=64)  # every singular value kept: all but rounding
    assert full_rank.total_error < 1e-5


def test_fan_in_fan_out_layers_gpt2(tmp_path) -> None:
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=48, n_positions=16)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    for name, r in (("a", 4), ("b", 2)):
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                               LoraConfig(r=r, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                          init_lora_weights=False))
        model.save_pretrained(tmp_path / name)
        PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / name) \
            .merge_and_unload().save_pretrained(tmp_path / f"{name}_full")
    adapters = ResidentSources.from_model_dirs({"base": tmp_path / "base", "a": tmp_path / "a", "b": tmp_path / "b"},
                                               "base")
    full = ResidentSources.from_model_dirs({"base": tmp_path / "base", "a": tmp_path / "a_full",
                                            "b": tmp_path / "b_full"}, "base")
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base_model": "base",
                               "models": [{"model": "a", "parameters": {"weight": 0.6}},
                                          {"model": "b", "parameters": {"weight": 0.9}}]})
    ours, theirs = adapters.merged_state_dict(recipe), full.merged_state_dict(recipe)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    made = merged_adapter(adapters, recipe)
    out = write_adapter(tmp_path / "merged", made.factors, adapters.arch.module_name, base_model_name_or_path=None)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), out).merge_and_unload()
    for key, value in loaded.state_dict().items():
        if key in ours:
            torch.testing.assert_close(value, ours[key], rtol=1e-5, atol=2e-6)


def test_what_cannot_be_merged_exactly_is_refused_with_the_reason(random_dirs, tmp_path) -> None:
    dora = get_peft_model(LlamaForCausalLM.from_pretrained(random_dirs["base"]),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="DoRA"):
        read_config(tmp_path / "dora")
    with pytest.raises(MergeError, match="DoRA|magnitude"):
        ResidentSources.from_model_dirs({"base": random_dirs["base"], "d": tmp_path / "dora"}, "base")
    # an adapter of another base: its factors do not fit this base's weights
    other = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=48))
    get_peft_model(other, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "o")
    with pytest.raises(MergeError, match="another base"):
        ResidentSources.from_model_dirs({"base": random_dirs["base"], "o": tmp_path / "o"}, "base")
    with pytest.raises(MergeError, match="base model 'a' is a LoRA adapter"):
        ResidentSources.from_model_dirs({"a": random_dirs["a"], "base": random_dirs["base"]}, "a")
    # the base it names
    config = read_config(random_dirs["a"])
    named = {**json.loads((random_dirs["a"] / "adapter_config.json").read_text()),
             "base_model_name_or_path": "org/model"}
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "adapter_config.json").write_text(json.dumps(named))
    config = read_config(tmp_path / "named")
    assert "trained on 'org/model'" in base_problem("x", config, "base", "/models/other")
    assert base_problem("x", config, "base", "hf:org/model@main") is None
    assert base_problem("x", config, "base", "/models/copy", trained_on="org/model") is None
    assert "is not what its" in base_problem("x", config, "base", "/models/copy", trained_on="org/else")


def test_a_saved_embedding_copy_must_be_the_bases(random_dirs, tmp_path) -> None:
    target = tmp_path / "a"
    target.mkdir()
    (target / "adapter_config.json").write_text((random_dirs["a"] / "adapter_config.json").read_text())
    tensors = load_file(random_dirs["a"] / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(target / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match="differs from the base"):
        ResidentSources.from_model_dirs({"base": random_dirs["base"], "a": target}, "base")


# -- the tiny adapter zoo, end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_zoo(zoo_cache):
    from evomerge.zoo import build_zoo

    return build_zoo(kind="tiny-adapters", seed=0)


def test_the_zoos_adapters_load_in_peft_as_we_read_them(adapter_zoo) -> None:
    sources = ResidentSources.from_model_dirs({k: adapter_zoo.models[k] for k in ("base", "arith", "l2")}, "base")
    for name in ("arith", "l2"):
        loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(adapter_zoo.models["base"]),
                                           adapter_zoo.models[name]).merge_and_unload().state_dict()
        ours = sources.state_dict(name)
        for key, value in ours.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert load_factors  # the reader the backend uses


def _experiment(tmp_path: Path, **overrides) -> Path:
    data = {
        "name": "adapters",
        "zoo": {"kind": "tiny-adapters", "seed": 0},
        "models": [{"name": "base", "path": "zoo:base"}, {"name": "arith", "path": "zoo:arith"},
                   {"name": "l2", "path": "zoo:l2"}, {"name": "mixed", "path": "zoo:mixed"}],
        "base_model": "base",
        "search_space": str(ROOT / "search_spaces" / "ps_ties.yaml"),
        "suite": {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search", "metric": "acc"}],
                  "validation_tasks": [{"name": "zoo_arith_l2_validation", "metric": "acc"}],
                  "test_tasks": [{"name": "zoo_arith_l2_test", "metric": "acc"}], "batch_size": 64,
                  "racing": {"rungs": [20, 40], "promote": 0.5}},
        "optimizer": {"name": "cma_es", "popsize": 4, "seed": 1, "islands": 1},
        "budget": {"max_trials": 6},
        "selection": {"top_k": 2},
        "dispatch": {"backend": "ray", "num_workers": 2},
        "tracking": {"backend": "mlflow"},
        **overrides,
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_search_over_adapters_runs_resumes_and_exports(tmp_path, adapter_zoo, ray_session, capsys) -> None:
    exp = _experiment(tmp_path)
    assert main(["validate", str(exp)]) == 0
    assert "LoRA adapter on the base" in capsys.readouterr().out
    assert main(["run", str(exp), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["memory_detail"].startswith("the base, 3 LoRA adapters as their factors")
    assert [m.get("adapter", False) for m in plan["models"]] == [False, True, True, True]
    full_copies = 2 * plan["models"][0]["params_b"] * 1e9 * 4 / 1024 ** 3  # base + the model merged into
    assert full_copies < plan["worker_memory_gib"] < full_copies * 1.2
    run_dir = tmp_path / "run"
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--quiet"]) == 0
    assert main(["resume", str(run_dir), "--quiet", "--max-trials", "10"]) == 0
    trials = Ledger(run_dir / "ledger.jsonl").records("trial")
    assert sorted(t["trial_id"] for t in trials) == list(range(10))
    assert all(t["state"] == "complete" for t in trials)
    assert main(["export", str(run_dir), "--format", "adapter", "--out", str(tmp_path / "ad")]) == 0
    card = (tmp_path / "ad" / "adapter" / "README.md").read_text()
    assert "truncated SVD" in card and "relative error" in card
    assert main(["export", str(run_dir), "--format", "adapter", "--rank", "1", "--out", str(tmp_path / "r1")]) == 0
    assert "rank 1 at most" in (tmp_path / "r1" / "adapter" / "README.md").read_text()
    assert json.loads((tmp_path / "r1" / "adapter" / "adapter_config.json").read_text())["r"] == 1
    assert main(["export", str(run_dir), "--format", "hf", "--rank", "1", "--out", str(tmp_path / "x")]) == 2
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(run_dir), "--format", "mergekit", "--out", str(tmp_path / "mk")]) == 0
    mk = yaml.safe_load((tmp_path / "mk" / "mergekit.yaml").read_text())
    assert any("+" in str(m["model"]) for m in mk["models"])


def test_a_dataflow_search_or_a_foreign_adapter_is_refused_at_validate(tmp_path, adapter_zoo, capsys) -> None:
    exp = _experiment(tmp_path, search_space={"kind": "dfs", "models": ["base", "arith"], "repetitions": 1},
                      suite={"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search", "metric": "acc"}]})
    assert main(["validate", str(exp)]) != 0
    assert "data-flow search stacks layers of full models" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    config = json.loads((adapter_zoo.models["arith"] / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    (foreign / "adapter_model.safetensors").write_bytes((adapter_zoo.models["arith"] / "adapter_model.safetensors")
                                                      .read_bytes())
    exp = _experiment(tmp_path, models=[{"name": "base", "path": "zoo:base"}, {"name": "arith", "path": "zoo:arith"},
                                        {"name": "f", "path": str(foreign)}])
    assert main(["validate", str(exp)]) != 0
    assert "trained on 'org/other'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_mergekit_on_base_plus_adapter_sources_agrees(random_dirs, tmp_path, method) -> None:
    """mergekit 0.1.5 reads `base+adapter` sources by merging each adapter into its base with PEFT;
    the YAML `export --format mergekit` writes for adapter sources says so."""
    pytest.importorskip("mergekit")
    import subprocess
    import sys

    from evomerge.architecture import BY_NAME
    from evomerge.mergekit_config import mergekit_yaml

    recipe = _recipe(method)
    dirs = {k: (str(v) if k == "base" else f"{random_dirs['base']}+{v}") for k, v in random_dirs.items()}
    config = tmp_path / "mergekit.yml"
    config.write_text(mergekit_yaml(recipe, dirs, BY_NAME["llama"]))
    cli = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(cli), str(config), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet",
                    "--lora-merge-cache", str(tmp_path / "cache")], check=True, capture_output=True, timeout=600)
    theirs = load_file(tmp_path / "out" / "model.safetensors")
    ours = ResidentSources.from_model_dirs(random_dirs, "base").merged_state_dict(recipe)
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, rtol=1e-5, atol=2e-6)


def test_adapters_from_the_hub_cache_run_offline(tmp_path, adapter_zoo) -> None:
    """`hf:` adapters are recognised from the Hub cache (HF_HUB_OFFLINE: nothing is downloaded);
    `base:` vouches that a base under another name is the one the adapter names."""
    import os
    import shutil
    import subprocess
    import sys

    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, name in (("org/base", "base"), ("org/arith-lora", "arith"), ("org/l2-lora", "l2")):
        folder = hub / f"models--{repo.replace('/', '--')}"
        shutil.copytree(adapter_zoo.models[name], folder / "snapshots" / commit)
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
    exp = _experiment(tmp_path, models=[{"name": "base", "path": "hf:org/base"},
                                        {"name": "arith", "path": "hf:org/arith-lora", "base": "zoo:base"},
                                        {"name": "l2", "path": "hf:org/l2-lora", "base": "zoo:base"}],
                      dispatch={"backend": "local", "num_workers": 1}, tracking={"backend": "none"},
                      budget={"max_trials": 3}, selection={"top_k": 1})
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)

    done = cli("validate", str(exp))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("a LoRA adapter on the base") == 2
    done = cli("run", str(exp), "--run-dir", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert len(Ledger(tmp_path / "run" / "ledger.jsonl").records("trial")) == 3
    # without `base:`, the adapters name a base the experiment does not have
    data = yaml.safe_load(exp.read_text())
    for m in data["models"][1:]:
        del m["base"]
    exp.write_text(yaml.safe_dump(data))
    done = cli("validate", str(exp))
    assert done.returncode != 0 and "trained on 'zoo:base'" in done.stderr
