"""Export a run's best (or any) recipe."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from evomerge.errors import ConfigError, EvomergeError
from evomerge.run_dir import (experiment_path, has_info, open_ledger, read_experiment_data, read_info,
                              require_run_dir)
from evomerge.mergekit_config import mergekit_yaml
from evomerge.recipe import AnyRecipe, recipe_from_dict
from evomerge.selection import current_selection, test_scores, winner

FORMATS = ("recipe", "hf", "mergekit", "adapter")


def find_recipe(run_dir: Path, trial: Optional[int] = None) -> tuple[AnyRecipe, dict]:
    """The run's winner's recipe (or trial ``trial``'s) and its ledger record: the best complete
    trial on the search split, or, where the run has a validation split, the best there among
    the top trials (see :mod:`evomerge.selection`)."""
    run_dir = Path(run_dir)
    require_run_dir(run_dir, ledger=True)
    records = open_ledger(run_dir).records()
    trials = [r for r in records if r.get("kind") == "trial"]
    if trial is not None:
        match = [r for r in trials if r["trial_id"] == trial]
        if not match:
            raise EvomergeError(f"run {run_dir.name} has no trial {trial} (it has {len(trials)} trials)")
        record = match[0]
    else:
        record = winner(records)[0]  # with a validation split: the best there among the top trials
        if record is None:
            raise EvomergeError(f"run {run_dir.name} has no complete trial to export")
    return recipe_from_dict(record["recipe"]), record


def pareto_members(run_dir: Path) -> tuple[list[str], list[dict]]:
    """The objective names and the Pareto-front trial records of a multi-objective run (from its
    ledger), each with its held-out ``test`` fitness (None when it was not scored)."""
    from evomerge.pareto import front_of

    run_dir = Path(run_dir)
    require_run_dir(run_dir, ledger=True)
    exp = read_experiment_data(run_dir)
    if exp.get("optimizer", {}).get("objectives") != "per_task":
        raise EvomergeError(f"run {run_dir.name} is single-objective (optimizer.objectives: weighted); "
                            "it has a best recipe, not a Pareto front")
    names = [t["name"] for t in exp["suite"]["tasks"]]
    records = open_ledger(run_dir).records()
    tests = test_scores(records)
    members = front_of([r for r in records if r.get("kind") == "trial"])
    return names, [{**m, "test": tests.get(m["recipe_hash"])} for m in members]


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """A fresh hidden directory beside ``out`` to write into; renamed to ``out`` when the block
    ends without error (removed if it fails), so ``out`` is either whole or absent, never a
    half-written model. A non-empty ``out`` is refused unless ``force``, and then replaced whole
    (no stale shards or index files of an earlier model stay beside the new ones)."""
    out = Path(out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError([f"--out: {out} is not empty; choose a new directory, or add --force to replace it whole"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def export(run_dir: Path, out_dir: Path, fmt: str = "recipe", trial: Optional[int] = None,
           rank: Optional[int] = None) -> Path:
    """Write the recipe in ``fmt`` under ``out_dir``; returns the written path.

    ``recipe``: the evomerge recipe YAML. ``hf``: a Hugging Face model dir (safetensors,
    config, tokenizer) built from the run's sources. ``mergekit``: a mergekit YAML
    (data-flow recipes whose path starts and ends in the ``embed_from`` model, as a
    passthrough merge with the scales folded into the family's residual writers; a LoRA
    source as mergekit's ``base+adapter``). ``adapter``: a merge of LoRA sources as one PEFT
    adapter (see :mod:`evomerge.merge.merged_adapter`: exact for linear and task arithmetic, a
    truncated SVD with its measured error otherwise; ``rank``: an SVD of that rank whatever the method).
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
        experiment = experiment_path(run_dir)
        if experiment.exists():  # beside the recipe, where `evomerge merge` looks for its sources
            shutil.copy(experiment, experiment_path(out_dir))
        return path
    if fmt == "hf":
        model_dirs, base_model = _run_sources(Path(run_dir))
        path = export_hf(recipe, model_dirs, base_model, out_dir)
        (path / "README.md").write_text(model_card(Path(run_dir), recipe, record))
        (path / "evomerge_recipe.yaml").write_text(header + recipe.to_yaml())
        return path
    if fmt == "adapter":
        model_dirs, base_model = _run_sources(Path(run_dir))
        base_name, _ = _run_sources(Path(run_dir), resolve=False)
        return export_adapter(recipe, model_dirs, base_name[base_model], out_dir / "adapter", header, rank)
    path = out_dir / "mergekit.yaml"
    model_dirs, base_model = _run_sources(Path(run_dir), resolve=False)
    from evomerge.adapters import is_adapter_dir

    model_dirs = {k: f"{model_dirs[base_model]}+{v}" if is_adapter_dir(v) else v for k, v in model_dirs.items()}
    path.write_text(header + mergekit_yaml(recipe, model_dirs, run_architecture(Path(run_dir))))
    return path


def merge_recipe(recipe_path: Optional[Path], out_dir: Path, model_dirs: dict[str, str], stream: bool = False,
                 shard_mb: int = 2048, preset: Optional[tuple[str, AnyRecipe]] = None) -> Path:
    """``evomerge merge``: materialise any recipe file (from a run, or written by hand), or a
    preset's recipe (``preset``: its spec and recipe, see :mod:`evomerge.presets`), as a Hugging
    Face model dir. ``model_dirs`` maps the recipe's model names to directories or ``hf:`` ids."""
    import yaml

    from evomerge.mergekit_config import from_mergekit, is_mergekit_config
    from evomerge.recipe import DFSRecipe, load_recipe
    from evomerge.sources import resolve_model_dir

    if preset is not None:
        path, (source, recipe) = Path(f"{preset[0].split(':')[0]}.preset"), preset
        source = f"--preset {source}"
    else:
        path = Path(recipe_path)
        source = str(path)
        if not path.is_file():
            raise EvomergeError(f"no recipe file {path}")
        try:
            data = yaml.safe_load(path.read_text())
            if is_mergekit_config(data):  # a mergekit config: its models are its sources
                recipe, mergekit_dirs = from_mergekit(data, base_dir=path.parent.resolve())
                model_dirs = {**mergekit_dirs, **model_dirs}
            else:
                recipe = load_recipe(path)
        except (ValueError, TypeError, yaml.YAMLError) as exc:
            raise EvomergeError(f"{path} is not a valid recipe:\n  " + str(exc).replace("\n", "\n  ")) from None
    if isinstance(recipe, DFSRecipe):
        needed = {s.model for s in recipe.layers} | {recipe.embed_from}
        needed -= set(recipe.donors)
        for donor in recipe.donors.values():
            needed |= {m.model for m in donor.models} | {donor.base_model}
        head = recipe.embed_from
    else:
        needed = {m.model for m in recipe.models} | {recipe.base_model}
        head = recipe.base_model
    missing = sorted(needed - set(model_dirs))
    beside = experiment_path(path.parent)
    if missing and preset is None and beside.is_file() and beside.resolve() != path.resolve():
        # `export --format recipe` writes the run's experiment next to the recipe: its sources
        found = experiment_sources(beside)
        model_dirs = {**{k: v for k, v in found.items() if k in missing}, **model_dirs}
        missing = sorted(needed - set(model_dirs))
    if missing:
        looked = f" (not in {beside} either)" if beside.is_file() else ""
        raise EvomergeError(f"the recipe uses model(s) {missing} with no path{looked}; pass --model NAME=PATH for "
                            "each (or --run RUN_DIR / --experiment EXP.yaml to take a run's or an experiment's "
                            "sources)")
    dirs = {k: str(resolve_model_dir(v)) for k, v in model_dirs.items() if k in needed}
    if head not in dirs:  # a DFS recipe whose head is a PS donor: the tokenizer of that donor's base
        head = next(iter(recipe.donors.values())).base_model if isinstance(recipe, DFSRecipe) else head
    if stream:
        if isinstance(recipe, DFSRecipe):
            raise EvomergeError("--stream merges parameter-space recipes; a data-flow recipe is exported whole")
        from evomerge.merge.streaming import stream_merge

        out = Path(out_dir)
        stream_merge(recipe, {k: Path(v) for k, v in dirs.items()}, out, shard_bytes=shard_mb * 1024 ** 2)
        if not (out / "tokenizer.json").exists() and not (out / "tokenizer.model").exists():
            copy_tokenizer(dirs[head], out)
    else:
        out = export_hf(recipe, dirs, head, Path(out_dir))
    (out / "evomerge_recipe.yaml").write_text(f"# merged by `evomerge merge {source}`\n" + recipe.to_yaml())
    kind = "data-flow (layer path)" if isinstance(recipe, DFSRecipe) else f"`{recipe.method}`"
    made = f"`{source}`" if preset is not None else f"`{path.name}`"
    lines = ["---", "library_name: transformers", "tags: [merge, evomerge]", "---", "",
             f"# {path.stem}", "", f"A {kind} merge made with `evomerge merge` from {made} "
             f"(recipe hash `{recipe.content_hash()}`).", "", "| name | model |", "|---|---|"]
    lines += [f"| {k} | `{model_dirs[k]}` |" for k in sorted(needed)]
    lines += ["", "```yaml", recipe.to_yaml().strip(), "```", ""]
    (out / "README.md").write_text("\n".join(lines))
    return out


def register(run_dir: Path, model_dir: Path, name: str) -> tuple[str, str]:
    """Register an exported model dir in the run's MLflow model registry (as a version of ``name``)."""
    from evomerge.run_dir import read_info

    info = read_info(Path(run_dir))
    if not info.get("mlflow_run_id") or not info.get("tracking_uri"):
        raise EvomergeError(f"run {Path(run_dir).name} has no MLflow run to register under; "
                            f"`evomerge sync {run_dir} --tracking-uri URI` uploads it first")
    from evomerge.tracking.mlflow_tracker import register_model

    return register_model(info["tracking_uri"], info["mlflow_run_id"], Path(model_dir), name)


def experiment_sources(path: Path) -> dict[str, str]:
    """The source model dirs (or ``hf:`` ids) an experiment file names, on this machine (building
    the embedded zoo if it uses one)."""
    from evomerge.config import load_experiment
    from evomerge.wiring import resolve_worker_spec

    return dict(resolve_worker_spec(load_experiment(path)).model_dirs)


def _spec_dirs(run_dir: Path) -> tuple[dict[str, str], str]:
    """The run's sources as its workers get them (building the embedded zoo if it used one: its dirs;
    Hub models as ``hf:`` ids), and its base."""
    from evomerge.run_dir import load_run_experiment
    from evomerge.wiring import resolve_worker_spec

    exp = load_run_experiment(run_dir)
    return resolve_worker_spec(exp).model_dirs, exp.base_model


def _named(path: str) -> str:
    """A source as files read elsewhere name it: a Hub model as ``org/name@rev``, a dir as its path."""
    from evomerge.sources import is_hub

    return path[3:] if is_hub(path) else path


def _run_sources(run_dir: Path, resolve: bool = True) -> tuple[dict[str, str], str]:
    """The run's source model dirs on this machine (Hub models fetched into the cache).

    ``resolve=False`` keeps Hub models as ids (``org/name@rev``), for files read elsewhere.
    """
    from evomerge.sources import resolve_model_dir

    dirs, base_model = _spec_dirs(run_dir)
    if not resolve:
        return {k: _named(v) for k, v in dirs.items()}, base_model
    return {k: str(resolve_model_dir(v)) for k, v in dirs.items()}, base_model


def run_architecture(run_dir: Path):
    """The :class:`~evomerge.architecture.Architecture` of a run's base model (its config.json:
    local, cached or declared; never downloaded)."""
    from evomerge.architecture import for_config
    from evomerge.run_dir import load_run_experiment
    from evomerge.wiring import resolve_worker_spec
    from evomerge.sources import model_config

    exp = load_run_experiment(run_dir)
    spec = resolve_worker_spec(exp)
    declared = {m.name: m.config for m in exp.models}
    config = model_config(spec.model_dirs[exp.base_model], declared.get(exp.base_model), download=False)
    return for_config(config, f"models: {exp.base_model}")


def model_card(run_dir: Path, recipe, record: dict) -> str:
    """README.md of an exported model: sources, method, recipe, fitness and test scores, MLflow link."""
    import yaml

    from evomerge.recipe import DFSRecipe

    exp = read_experiment_data(run_dir)
    info = read_info(run_dir) if has_info(run_dir) else {}
    sources = {m["name"]: m["path"] for m in exp["models"]}
    records = open_ledger(run_dir).records()
    tests = {r["model"]: r for r in records if r.get("kind") == "test" and r["state"] == "complete"}
    baselines = {r["model"]: r for r in records if r.get("kind") == "baseline" and r["state"] == "complete"}
    # this recipe's test and validation scores, whichever label it was scored under
    own_test = next((r for r in reversed(list(tests.values())) if r.get("recipe_hash") == record["recipe_hash"]), None)
    validations = [r for r in records if r.get("kind") == "validation" and r["state"] == "complete"]
    own_validation = next((r for r in reversed(validations) if r["recipe_hash"] == record["recipe_hash"]), None)
    validation_names = [t["name"] for t in exp["suite"].get("validation_tasks") or []]
    hub = [p[3:].split("@")[0] for p in sources.values() if p.startswith("hf:")]
    front = {"library_name": "transformers", "tags": ["merge", "evomerge"] + (["dfs"] if isinstance(recipe, DFSRecipe)
                                                                            else [recipe.method])}
    if hub:
        front["base_model"] = hub
    kind = ("data-flow (layer path) merge" if isinstance(recipe, DFSRecipe)
            else f"parameter-space merge, method `{recipe.method}`")
    from evomerge.uncertainty import record_se, run_uncertainty, split_weights, with_se

    found = run_uncertainty(records, exp["suite"], record, exp["base_model"])["evidence"] or {}
    gained = found.get("verdict") == "gain"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {exp['name']}: " + ("evolved merge" if gained else "merge found by evomerge (not shown to beat its "
                                     "sources)") + f" (trial {record['trial_id']})", "",
             f"A {kind} found by evomerge's evolutionary search ({info.get('popsize', '?')}-candidate generations, "
             f"{info.get('max_trials', '?')} trials, optimizer `{exp['optimizer']['name']}`, seed "
             f"{exp['optimizer']['seed']}).", ""]
    if found.get("line"):
        lines += ["## How sure", "", found["line"][0].upper() + found["line"][1:] + ".", ""]
    lines += ["## Sources", "", "| name | model |", "|---|---|"]
    lines += [f"| {n} | `{p}` |" for n, p in sources.items()]
    search = [t["name"] for t in exp["suite"]["tasks"]]
    test_names = [t["name"] for t in exp["suite"].get("test_tasks") or []]
    def cell(rec: Optional[dict], part: str = "test_tasks") -> str:
        """A score with its standard error (from the per-item values its record keeps)."""
        return with_se(rec["fitness"], record_se(rec, split_weights(exp["suite"], part))) if rec else "-"

    if validation_names:
        lines += ["", "## Scores", "",
                  f"Search split ({', '.join(search)}; drove the search), validation split "
                  f"({', '.join(validation_names)}; chose the winner among the search's top trials) and held-out "
                  f"test split ({', '.join(test_names) or 'none'}; never seen by the search or the choice):", "",
                  "| model | search fitness | validation fitness | test fitness |", "|---|---|---|---|",
                  f"| **this merge** | {cell(record, 'tasks')} | {cell(own_validation, 'validation_tasks')} | "
                  f"{cell(own_test)} |"]
        lines += [f"| {name} | {cell(baselines.get(name), 'tasks')} | - | {cell(tests.get(name))} |" for name in sources]
        chosen = current_selection(records)
        if chosen is not None and chosen["trial_id"] == record["trial_id"] and chosen.get("validation_corrected") is not None:
            lines += ["", f"Being the best on validation of {len(chosen['candidates'])} candidates flatters that score; "
                      f"less its winner's curse (a paired bootstrap of the validation items) it is "
                      f"{chosen['validation_corrected']:.4f}."]
    else:
        lines += ["", "## Scores", "",
                  f"Search split ({', '.join(search)}; drove the search) and held-out test split "
                  f"({', '.join(test_names) or 'none'}; never seen by the search):", "",
                  "| model | search fitness | test fitness |", "|---|---|---|",
                  f"| **this merge** | {cell(record, 'tasks')} | {cell(own_test)} |"]
        lines += [f"| {name} | {cell(baselines.get(name), 'tasks')} | {cell(tests.get(name))} |" for name in sources]
    lines += ["", "Scores are ± their standard errors (from the per-item values; none where a metric is not a mean "
              "over items)."]
    lines += ["", "## Recipe", "", f"Recipe hash `{recipe.content_hash()}`; the exact recipe "
              "(`evomerge_recipe.yaml`, also below) rebuilds these weights with `evomerge merge`-equivalent "
              "`evomerge export --format hf`.", "", "```yaml", recipe.to_yaml().strip(), "```", "",
              "## Provenance", "", f"- evomerge run `{info.get('run_id', run_dir.name)}` ({run_dir.resolve()})"]
    uri, run_id = info.get("tracking_uri"), info.get("mlflow_run_id")
    if uri and run_id:
        from evomerge.tracking import run_url

        link = run_url(uri, info["mlflow_experiment_id"], run_id) \
            if uri.startswith("http") and info.get("mlflow_experiment_id") else f"{uri}, run {run_id}"
        lines.append(f"- MLflow: {link}")
    return "\n".join(lines) + "\n"


def export_hf(recipe, model_dirs: dict[str, str], base_model: str, out_dir: Path) -> Path:
    """Materialise any recipe as a Hugging Face model dir that loads with AutoModelForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.merge.backend import ResidentSources
    from evomerge.merge.dataflow import DataFlowModel, load_donors
    from evomerge.recipe import DFSRecipe, Recipe

    def merged(ps: Recipe):
        dtype = getattr(torch, ps.dtype)
        sources = ResidentSources.from_model_dirs({k: Path(v) for k, v in model_dirs.items()}, base_model=ps.base_model,
                                                  dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dirs[ps.base_model], dtype=dtype,
                                                     use_safetensors=True, trust_remote_code=False)
        sources.merge_into(ps, model)  # its placement: renamed or fused tensors (MoE experts) too
        return model

    if isinstance(recipe, DFSRecipe):
        donors = load_donors({k: v for k, v in model_dirs.items()}, dtype=getattr(torch, recipe.dtype))
        for name, ps in recipe.donors.items():
            donors[name] = merged(ps)
        head = recipe.embed_from if recipe.embed_from in model_dirs else base_model
        out = DataFlowModel(donors, shell=None).export(recipe, out_dir)
        copy_tokenizer(model_dirs[head], out)
        return out
    model = merged(recipe)
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(model_dirs[recipe.base_model], Path(out_dir))
    return Path(out_dir)


def export_adapter(recipe, model_dirs: dict[str, str], base_name: str, out_dir: Path, header: str = "",
                   rank: Optional[int] = None) -> Path:
    """A merge of LoRA sources as one PEFT adapter dir (``adapter_config.json``,
    ``adapter_model.safetensors``, a README saying whether it is exact, else its measured error)."""
    import torch

    from evomerge.adapters import write_adapter
    from evomerge.merge.backend import ResidentSources
    from evomerge.merge.merged_adapter import merged_adapter
    from evomerge.recipe import Recipe

    if not isinstance(recipe, Recipe):
        raise EvomergeError("--format adapter exports parameter-space merges; a data-flow recipe is a full model")
    sources = ResidentSources.from_model_dirs({k: Path(v) for k, v in model_dirs.items()},
                                              base_model=recipe.base_model, dtype=getattr(torch, recipe.dtype))
    made = merged_adapter(sources, recipe, rank)
    out = write_adapter(out_dir, made.factors, sources.arch.module_name, base_model_name_or_path=base_name,
                        embeddings=made.embeddings)
    lines = [header.rstrip(), "", f"# LoRA adapter of recipe `{recipe.content_hash()}` on `{base_name}`", "",
             f"Made by {made.how}; rank {max((f.rank for f in made.factors.values()), default=0)} at most, "
             f"{len(made.factors)} modules."]
    if made.exact:
        lines.append("It is the merge itself: loading it on the base gives the exported full model "
                     "(up to float rounding).")
    else:
        lines.append(f"It approximates the merge: relative error {made.total_error:.3g} over all changed "
                     "weights (Frobenius norm of the missed delta / of the delta). Use the full model "
                     "(`--format hf`) for the exact merge.")
        worst = sorted(made.errors.items(), key=lambda kv: -kv[1])[:5]
        lines += ["", "| tensor | relative error |", "|---|---|"] + [f"| {k} | {v:.3g} |" for k, v in worst]
        if made.left_out:
            lines += ["", f"Left out (no matrix, cannot be in an adapter): {', '.join(made.left_out)}"]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "evomerge_recipe.yaml").write_text(header + recipe.to_yaml())
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "vocab.txt", "spiece.model", "tokenizer.tiktoken")


def copy_tokenizer(source_dir: str | Path, out_dir: Path) -> bool:
    """Copy ``source_dir``'s tokenizer files into ``out_dir`` byte for byte: the tokenizer is never
    loaded, so no code a source ships (an ``auto_map`` in its tokenizer_config.json) runs or is
    copied. A model dir without one gets a warning (the weights are still written, as
    ``mergekit-yaml --no-copy-tokenizer`` does)."""
    import sys

    found = [name for name in _TOKENIZER_FILES if (Path(source_dir) / name).is_file()]
    if not any(name in found for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                                          "spiece.model", "tokenizer.tiktoken")):
        print(f"warning: {source_dir} has no tokenizer files; {out_dir} gets the weights and config only",
              file=sys.stderr)
        return False
    for name in found:
        shutil.copyfile(Path(source_dir) / name, Path(out_dir) / name)
    return True
