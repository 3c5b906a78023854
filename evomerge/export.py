"""Export a run's best (or any) recipe."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from evomerge.errors import EvomergeError
from evomerge.ledger import Ledger, best_trial
from evomerge.recipe import AnyRecipe, recipe_from_dict

FORMATS = ("recipe", "hf", "mergekit")


def find_recipe(run_dir: Path, trial: Optional[int] = None) -> tuple[AnyRecipe, dict]:
    """The best complete trial's recipe (or trial ``trial``'s) and its ledger record."""
    run_dir = Path(run_dir)
    ledger_path = run_dir / "ledger.jsonl"
    if not ledger_path.exists():
        raise EvomergeError(f"{run_dir} is not an evomerge run directory (no ledger.jsonl)")
    trials = Ledger(ledger_path).records("trial")
    if trial is not None:
        match = [r for r in trials if r["trial_id"] == trial]
        if not match:
            raise EvomergeError(f"run {run_dir.name} has no trial {trial} (it has {len(trials)} trials)")
        record = match[0]
    else:
        record = best_trial(trials)
        if record is None:
            raise EvomergeError(f"run {run_dir.name} has no complete trial to export")
    return recipe_from_dict(record["recipe"]), record


def pareto_members(run_dir: Path) -> tuple[list[str], list[dict]]:
    """The objective names and the Pareto-front trial records of a multi-objective run (from its ledger)."""
    import yaml

    from evomerge.pareto import front_of

    run_dir = Path(run_dir)
    if not (run_dir / "ledger.jsonl").exists():
        raise EvomergeError(f"{run_dir} is not an evomerge run directory (no ledger.jsonl)")
    exp = yaml.safe_load((run_dir / "experiment.yaml").read_text())
    if exp.get("optimizer", {}).get("objectives") != "per_task":
        raise EvomergeError(f"run {run_dir.name} is single-objective (optimizer.objectives: weighted); "
                            "it has a best recipe, not a Pareto front")
    names = [t["name"] for t in exp["suite"]["tasks"]]
    return names, front_of(Ledger(run_dir / "ledger.jsonl").records("trial"))


def export(run_dir: Path, out_dir: Path, fmt: str = "recipe", trial: Optional[int] = None) -> Path:
    """Write the recipe in ``fmt`` under ``out_dir``; returns the written path.

    ``recipe``: the evomerge recipe YAML. ``hf``: a Hugging Face model dir (safetensors,
    config, tokenizer) built from the run's sources. ``mergekit``: a mergekit YAML
    (data-flow recipes whose path starts and ends in the ``embed_from`` model, as a
    passthrough merge with the scales folded into o_proj/down_proj).
    """
    if fmt not in FORMATS:
        raise EvomergeError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    recipe, record = find_recipe(run_dir, trial)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = (
        f"# evomerge recipe from run {Path(run_dir).name}, trial {record['trial_id']}\n"
        f"# search fitness {record['fitness']:.6f}, recipe hash {recipe.content_hash()}\n"
    )
    if fmt == "recipe":
        path = out_dir / "recipe.yaml"
        path.write_text(header + recipe.to_yaml())
        experiment = Path(run_dir) / "experiment.yaml"
        if experiment.exists():
            shutil.copy(experiment, out_dir / "experiment.yaml")
        return path
    model_dirs, base_model = _run_sources(Path(run_dir))
    if fmt == "hf":
        return export_hf(recipe, model_dirs, base_model, out_dir)
    path = out_dir / "mergekit.yaml"
    path.write_text(header + mergekit_yaml(recipe, model_dirs))
    return path


def _run_sources(run_dir: Path) -> tuple[dict[str, str], str]:
    """The run's source model dirs on this machine (building the embedded zoo if it used one)."""
    from evomerge.controller import load_run_experiment, resolve_worker_spec
    from evomerge.sources import resolve_model_dir

    exp = load_run_experiment(run_dir)
    spec = resolve_worker_spec(exp)
    return {k: str(resolve_model_dir(v)) for k, v in spec.model_dirs.items()}, exp.base_model


def export_hf(recipe, model_dirs: dict[str, str], base_model: str, out_dir: Path) -> Path:
    """Materialise any recipe as a Hugging Face model dir that loads with AutoModelForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.backend import ResidentSources
    from evomerge.merge.dataflow import DataFlowModel, load_donors
    from evomerge.recipe import DFSRecipe, Recipe

    def merged(ps: Recipe):
        dtype = getattr(torch, ps.dtype)
        sources = ResidentSources.from_model_dirs({k: Path(v) for k, v in model_dirs.items()}, base_model=ps.base_model,
                                                  dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dirs[ps.base_model], dtype=dtype,
                                                     use_safetensors=True)
        sources.merge_into(ps, model.state_dict())
        return model

    if isinstance(recipe, DFSRecipe):
        donors = load_donors({k: v for k, v in model_dirs.items()})
        for name, ps in recipe.donors.items():
            donors[name] = merged(ps)
        head = recipe.embed_from if recipe.embed_from in model_dirs else base_model
        return DataFlowModel(donors, shell=None).export(recipe, out_dir, tokenizer_dir=Path(model_dirs[head]))
    model = merged(recipe)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dirs[recipe.base_model]).save_pretrained(out_dir)
    return Path(out_dir)


def mergekit_yaml(recipe, model_dirs: dict[str, str]) -> str:
    """A mergekit YAML for a data-flow recipe, where mergekit can express it.

    mergekit's passthrough takes the embeddings from the first slice's model and the final
    norm / lm_head from the last slice's, and knows nothing of evomerge's PS donors, so the
    path must start and end in ``embed_from`` and use source models only.
    """
    import yaml

    from evomerge.recipe import DFSRecipe

    if not isinstance(recipe, DFSRecipe):
        raise EvomergeError("mergekit export of parameter-space recipes is not implemented yet; "
                            "use --format recipe or hf")
    steps = recipe.layers
    if recipe.donors or any(s.model not in model_dirs for s in steps):
        raise EvomergeError("this path uses a PS-merged donor, which mergekit cannot express; use --format hf")
    if not steps or steps[0].model != recipe.embed_from or steps[-1].model != recipe.embed_from:
        raise EvomergeError(f"mergekit's passthrough takes embeddings from the first layer's model and the head "
                            f"from the last layer's; this path starts in {steps[0].model if steps else 'nothing'} "
                            f"and ends in {steps[-1].model if steps else 'nothing'}, not {recipe.embed_from}; "
                            "use --format hf")
    slices, cumulative = [], 1.0
    for step in steps:
        cumulative *= step.scale
        source = {"model": model_dirs[step.model], "layer_range": [step.layer, step.layer + 1]}
        if cumulative != 1.0:
            inverse = 1.0 / cumulative
            source["parameters"] = {"scale": [{"filter": "o_proj", "value": inverse},
                                              {"filter": "down_proj", "value": inverse}, {"value": 1.0}]}
        slices.append({"sources": [source]})
    return yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "slices": slices}, sort_keys=False)
