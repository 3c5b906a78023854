"""The names of a run directory's files, and where a recipe given as a run lives.

Names only, no reading or writing (that is :mod:`evomerge.run_dir`): the configuration
(:mod:`evomerge.config`) takes a recipe as a file or as a run directory, and must not depend on
the run directory's machinery, which depends on it.
"""

from __future__ import annotations

from pathlib import Path

RUN_INFO = "run.json"
LEDGER = "ledger.jsonl"
SUMMARY = "summary.json"
BEST_RECIPE = "best_recipe.yaml"
PARETO = "pareto.json"
EXPERIMENT_COPY = "experiment.yaml"
EXPERIMENT_SOURCE = "experiment.source.yaml"  # the file as the user wrote it (paths unresolved)
PLOTS = "plots"
LOCK = ".lock"
ITEMS = "items.jsonl"
HEARTBEAT = "heartbeat.json"


def experiment_path(run_dir: Path) -> Path:
    """Where a run (or an exported recipe's directory) keeps its resolved experiment."""
    return Path(run_dir) / EXPERIMENT_COPY


def best_recipe_path(run_dir: Path) -> Path:
    return Path(run_dir) / BEST_RECIPE


def recipe_file(path: str | Path) -> Path:
    """A recipe given as a file, or as a run directory (its ``best_recipe.yaml``)."""
    path = Path(path)
    return best_recipe_path(path) if path.is_dir() else path


def heartbeat_path(run_dir: Path) -> Path:
    return Path(run_dir) / HEARTBEAT


def pareto_path(run_dir: Path) -> Path:
    return Path(run_dir) / PARETO


def plots_dir(run_dir: Path) -> Path:
    return Path(run_dir) / PLOTS
