"""MLflow metric rows of trial records: what the controller logs per trial and ``sync`` uploads."""

from __future__ import annotations

from typing import Optional

from evomerge.pareto import ParetoFront
from evomerge.ledger import counts_for_best


def trial_metric_rows(trials: list[dict], multi_objective: bool, start: int = 0) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) of each trial record from ``start`` on, with the best so far (and Pareto size)."""
    rows = []
    best: Optional[float] = None
    front = ParetoFront()
    for step, rec in enumerate(trials):
        if rec["state"] == "complete" and counts_for_best(rec):
            best = rec["fitness"] if best is None else max(best, rec["fitness"])
            if multi_objective:
                front.add(rec["trial_id"], rec["objectives"])
        if step >= start:
            rows.append((step, trial_metrics(rec, best, len(front.members) if multi_objective else None)))
    return rows


def trial_metrics(rec: dict, best: Optional[float], pareto_size: Optional[int] = None) -> dict[str, float]:
    metrics = {"trial_id": float(rec["trial_id"]), "island": float(rec["island"]),
               "generation": float(rec["generation"]), "merge_seconds": rec["merge_seconds"],
               "eval_seconds": rec["eval_seconds"], "failed": float(rec["state"] != "complete"),
               "cached": float(bool(rec.get("cached_from")))}
    if best is not None:
        metrics["best_fitness"] = best
    if pareto_size is not None:
        metrics["pareto_size"] = float(pareto_size)
    if rec.get("rung") is not None:  # racing: the rung the trial's score is from
        metrics["rung"] = float(rec["rung"])
    if rec["fitness"] is not None:
        metrics["fitness"] = rec["fitness"]
        metrics.update({f"score.{k}": v for k, v in rec["scores"].items()})
    metrics.update(_recipe_metrics(rec.get("recipe") or {}))
    return metrics


MAX_PARAM_METRICS = 64  # more per-trial curves than this would slow the MLflow UI down for nothing


def _recipe_metrics(recipe: dict) -> dict[str, float]:
    """A trial's recipe as MLflow curves: PS coefficients (``param.<model>.<name>[.<group>]``,
    up to MAX_PARAM_METRICS values; all are in the ledger), DFS path length and mean scale."""
    if recipe.get("kind") == "dfs":
        scales = [s["scale"] for s in recipe.get("layers", [])]
        return {"path_length": float(len(scales)), "path_mean_scale": sum(scales) / len(scales) if scales else 0.0}
    out: dict[str, float] = {}
    for m in recipe.get("models", []):
        for name, v in m.get("parameters", {}).items():
            if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
                groups = ["embed", *(f"block{i}" for i in range(len(v) - 2)), "head"]
                out.update({f"param.{m['model']}.{name}.{g}": float(x) for g, x in zip(groups, v)})
            elif isinstance(v, (int, float)):
                out[f"param.{m['model']}.{name}"] = float(v)
            # gradients and filters (hand-written start recipes) have no single curve value
    return out if len(out) <= MAX_PARAM_METRICS else {}
