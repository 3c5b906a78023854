"""How sure a run's numbers are: standard errors of scores, and whether the winner beats its sources.

A fitness is a weighted mean of per-task metrics, each the mean of per-item values (accuracy,
exact match: 0 or 1 per document). Its standard error comes from those values:
``SE² = Σ_t (w_t / Σw)² · var_t / n_t``. A metric that is not the mean of its per-item values
(a corpus-level score) has none: ``standard_error`` returns None rather than a wrong number.

Whether the winner beats a source is a *paired* question (both scored on the same documents):
the mean of the per-item differences over its standard error, as the validation selection does
(:func:`evomerge.selection.paired_z`). :func:`evidence` asks it of the best source and of the base,
on the held-out test split when the run has one (the winner was not chosen there) and else on the
search split (where the winner was chosen: optimistic). A gain of under 2 standard errors is
called what it is — no clear gain — and a search whose candidates all scored the same had no
signal to follow.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from evomerge.selection import ItemMatrix, paired_z

Z_CLEAR = 2.0  # a gain of at least this many paired standard errors is called a gain
TaskValues = Mapping[str, Sequence[float]]  # {suite task: per-item values, documents in one order}


def standard_error(values: TaskValues, weights: Mapping[str, float],
                   scores: Optional[Mapping[str, float]] = None) -> Optional[float]:
    """The standard error of the weighted fitness of per-item ``values``; None without items, or
    when a task's reported score (``scores``) is not the mean of its values."""
    tasks = [t for t in values if len(values[t])]
    if not tasks or any(t not in weights for t in tasks):
        return None
    total = sum(float(weights[t]) for t in tasks)
    var = 0.0
    for t in tasks:
        v = np.asarray(values[t], dtype=np.float64)
        if scores is not None and t in scores and not math.isclose(float(v.mean()), float(scores[t]), abs_tol=1e-6):
            return None  # not a mean over items (e.g. a corpus-level metric): no honest SE from items
        if len(v) > 1:
            var += (float(weights[t]) / total) ** 2 * float(np.var(v, ddof=1)) / len(v)
    return math.sqrt(var)


def paired(a: TaskValues, b: TaskValues, weights: Mapping[str, float]) -> Optional[tuple[float, float, float]]:
    """(a - b, its paired standard error, z) over the same documents; None when they were not
    scored on the same documents."""
    try:
        m = ItemMatrix.of([a, b], weights)
    except (ValueError, KeyError):
        return None
    d = m.values[0] - m.values[1]
    gain = float(d @ m.weights)
    var = 0.0
    for cols in m.strata:
        if len(cols) > 1:
            share = float(m.weights[cols].sum())
            var += share * share * float(np.var(d[cols], ddof=1)) / len(cols)
    return gain, math.sqrt(var), paired_z(m.values, m.weights, m.strata, 0, 1)


def evidence(winner: Optional[TaskValues], sources: Mapping[str, TaskValues], source_scores: Mapping[str, float],
             weights: Mapping[str, float], base: str, split: str,
             trial_fitness: Sequence[float] = ()) -> dict[str, Any]:
    """Does the winner beat its sources? ``{"split", "against": [{"source", "gain", "se", "z"}],
    "verdict", "line"}``: verdict ``gain`` (at least 2 paired standard errors above the best
    source and above the base), ``no clear gain``, ``no signal`` (every candidate scored the same)
    or ``unknown`` (no per-item values to pair)."""
    out: dict[str, Any] = {"split": split, "against": [], "verdict": "unknown", "line": ""}
    if len(trial_fitness) > 1 and max(trial_fitness) == min(trial_fitness):
        out["verdict"] = "no signal"
        out["line"] = (f"every candidate scored the same ({trial_fitness[0]:.4f} on the search split): the fitness "
                       "gave the search nothing to follow; the winner is not an improvement")
        return out
    if winner is None or not source_scores:
        return out
    best = max(source_scores, key=lambda s: source_scores[s])
    for name in dict.fromkeys([best, base]):
        if name in sources:
            p = paired(winner, sources[name], weights)
            if p is not None:
                out["against"].append({"source": name, "gain": p[0], "se": p[1], "z": p[2]})
    if not out["against"]:
        return out
    worst = min(out["against"], key=lambda a: a["z"])
    where = "held-out test split" if split == "test" else "search split (where it was chosen: optimistic)"
    if all(a["z"] >= Z_CLEAR for a in out["against"]):
        out["verdict"] = "gain"
        out["line"] = (f"the winner beats {worst['source']} by {worst['gain']:+.4f} ± {worst['se']:.4f} "
                       f"({worst['z']:.1f} paired standard errors) on the {where}")
    else:
        out["verdict"] = "no clear gain"
        out["line"] = (f"no clear gain: the winner is {worst['gain']:+.4f} ± {worst['se']:.4f} against "
                       f"{worst['source']} on the {where} ({worst['z']:.1f} paired standard errors, under "
                       f"{Z_CLEAR:g}): it is not shown to beat its sources")
    return out


def evidence_row(evidence: Optional[Mapping[str, Any]]) -> Optional[tuple[str, str]]:
    """The summary's and ``status``'s row for the evidence of a gain: ``verdict`` on a clear gain,
    ``caution`` otherwise; None when there is no line to show."""
    if not evidence or not evidence.get("line"):
        return None
    return ("verdict" if evidence["verdict"] == "gain" else "caution", evidence["line"])


def with_se(value: Optional[float], se: Optional[float], digits: int = 4) -> str:
    """``0.4123 ± 0.0284`` (or the value alone without a standard error)."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _unpack(packed: Mapping[str, Any]) -> dict[str, list[float]]:
    from evomerge.run_dir import unpack_values

    return {task: unpack_values(v) for task, v in packed.items()}


def split_weights(suite: Mapping[str, Any], part: str) -> dict[str, float]:
    """``{task: weight}`` of one split of a suite given as data (``tasks``, ``validation_tasks``,
    ``test_tasks``)."""
    return {t["name"]: float(t.get("weight", 1.0)) for t in suite.get(part) or []}


def record_se(rec: Mapping[str, Any], weights: Mapping[str, float]) -> Optional[float]:
    """The standard error of a ledger record's score, from the per-item values it keeps
    (``task_items``, or a validation record's ``item_values``); None without them."""
    packed = rec.get("task_items") or (rec.get("item_values") if isinstance(rec.get("item_values"), dict) else None)
    return standard_error(_unpack(packed), weights, rec.get("scores")) if packed else None


def run_uncertainty(records: Sequence[Mapping[str, Any]], suite: Mapping[str, Any], winner: Optional[Mapping],
                    base_model: str, selection: Optional[Mapping] = None) -> dict[str, Any]:
    """The standard errors of a run's reported scores and its evidence, from its ledger records
    (those written with per-item values): ``{"search": se of the winner's search fitness,
    "validation": se, "baselines": {source: se}, "tests": {label: se}, "evidence": {...}}``.
    ``suite``: the experiment's suite as data (task names and weights)."""
    search_w, test_w, val_w = (split_weights(suite, p) for p in ("tasks", "test_tasks", "validation_tasks"))
    out: dict[str, Any] = {"search": None, "validation": None, "baselines": {}, "tests": {}, "evidence": None}
    trials = [r for r in records if r.get("kind") == "trial"]
    win_items = None
    if winner is not None and winner.get("task_items"):
        win_items = _unpack(winner["task_items"])
        out["search"] = standard_error(win_items, search_w, winner.get("scores"))
    if selection is not None:
        rec = next((r for r in records if r.get("kind") == "validation" and r.get("trial_id") == selection["trial_id"]
                    and r.get("item_values")), None)
        if rec is not None:
            out["validation"] = record_se(rec, val_w)
    base_items: dict[str, dict] = {}
    base_scores: dict[str, float] = {}
    for r in records:
        if r.get("kind") == "baseline" and r.get("state") == "complete":
            base_scores[r["model"]] = float(r["fitness"])
            if r.get("task_items"):
                base_items[r["model"]] = _unpack(r["task_items"])
                out["baselines"][r["model"]] = standard_error(base_items[r["model"]], search_w, r.get("scores"))
    test_items: dict[str, dict] = {}
    test_scores: dict[str, float] = {}
    win_test = None
    for r in records:
        if r.get("kind") == "test" and r.get("state") == "complete" and r.get("task_items"):
            items = _unpack(r["task_items"])
            out["tests"][r["model"]] = standard_error(items, test_w, r.get("scores"))
            if not r.get("recipe_hash"):  # a source
                test_items[r["model"]], test_scores[r["model"]] = items, float(r["fitness"])
            elif winner is not None and r["recipe_hash"] == winner.get("recipe_hash"):
                win_test = items
    fitness = [float(r["fitness"]) for r in trials if r.get("state") == "complete" and r.get("fitness") is not None]
    if win_test is not None and test_items:
        out["evidence"] = evidence(win_test, test_items, test_scores, test_w, base_model, "test", fitness)
    else:
        out["evidence"] = evidence(win_items, base_items, base_scores, search_w, base_model, "search", fitness)
    return out


def uncertainty_metrics(standard_errors: Mapping[str, Any], found: Optional[Mapping[str, Any]]) -> dict[str, float]:
    """What MLflow gets: ``best_fitness_se``, ``validation_se``, ``baseline.<source>_se``,
    ``test.<label>_se`` and, of the evidence, the gain over the closest source with its standard
    error and z (``gain``, ``gain_se``, ``gain_z``) and ``clear_gain`` (1 or 0)."""
    out: dict[str, float] = {}
    if standard_errors.get("search") is not None:
        out["best_fitness_se"] = float(standard_errors["search"])
    if standard_errors.get("validation") is not None:
        out["validation_se"] = float(standard_errors["validation"])
    for part, prefix in (("baselines", "baseline"), ("tests", "test")):
        for name, se in (standard_errors.get(part) or {}).items():
            if se is not None:
                out[f"{prefix}.{name}_se"] = float(se)
    if found and found.get("against"):
        worst = min(found["against"], key=lambda a: a["z"])
        z = worst["z"] if math.isfinite(worst["z"]) else math.copysign(1e9, worst["z"])
        out |= {"gain": float(worst["gain"]), "gain_se": float(worst["se"]), "gain_z": float(z)}
    if found and found.get("verdict") in ("gain", "no clear gain", "no signal"):
        out["clear_gain"] = 1.0 if found["verdict"] == "gain" else 0.0
    return out
