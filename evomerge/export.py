"""Export a run's best (or any) recipe."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from evomerge.errors import EvomergeError
from evomerge.ledger import Ledger
from evomerge.recipe import Recipe

FORMATS = ("recipe",)


def find_recipe(run_dir: Path, trial: Optional[int] = None) -> tuple[Recipe, dict]:
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
        complete = [r for r in trials if r["state"] == "complete"]
        if not complete:
            raise EvomergeError(f"run {run_dir.name} has no complete trial to export")
        record = max(complete, key=lambda r: (r["fitness"], -r["trial_id"]))
    return Recipe.from_dict(record["recipe"]), record


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
    """Write the recipe in ``fmt`` under ``out_dir``; returns the written path."""
    if fmt not in FORMATS:
        raise EvomergeError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    recipe, record = find_recipe(run_dir, trial)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "recipe.yaml"
    header = (
        f"# evomerge recipe from run {Path(run_dir).name}, trial {record['trial_id']}\n"
        f"# search fitness {record['fitness']:.6f}, recipe hash {recipe.content_hash()}\n"
    )
    path.write_text(header + recipe.to_yaml())
    experiment = Path(run_dir) / "experiment.yaml"
    if experiment.exists():
        shutil.copy(experiment, out_dir / "experiment.yaml")
    return path
