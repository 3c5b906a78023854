"""Which trial a run's winner is: the best on the search split, or the best on a validation split.

The trial with the best search fitness is the most optimistic estimate of all: it was picked
out of every trial for its score on those items, luck included (the winner's curse), and the
more dimensions a space has, the more of that luck a search can find. With
``suite.validation_tasks`` the controller scores the ``selection.top_k`` trials with the best
search fitness (one per recipe) on the validation split, a split the search never saw, and the
best of them there is the winner: ``best_recipe.yaml``, ``export``, ``status``, the model card.

The ledger holds a ``validation`` record per scored trial and a ``selection`` record naming
the winner and the candidates it was chosen from. A selection is current until a later
trial finishes (a resumed run given more trials): until the run selects again, its winner is
the search split's best, as during the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from evomerge.ledger import best_trial, counts_for_best


def top_trials(trials: Iterable[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` complete trials with the best search fitness, one per recipe (its first trial),
    best first; ties keep ledger order."""
    seen: set[str] = set()
    ranked = []
    for rec in trials:
        if rec.get("state") == "complete" and counts_for_best(rec) and rec["recipe_hash"] not in seen:
            seen.add(rec["recipe_hash"])
            ranked.append(rec)
    ranked.sort(key=lambda r: -float(r["fitness"]))  # stable: ties stay in ledger order
    return ranked[:k]


def pick(candidates: list[dict[str, Any]], validation: dict[int, float]) -> Optional[dict[str, Any]]:
    """The candidate with the best validation fitness (ties: better search fitness, then the
    earlier in ``candidates``); None when none has a validation score."""
    scored = [(i, c) for i, c in enumerate(candidates) if c["trial_id"] in validation]
    if not scored:
        return None
    return max(scored, key=lambda ic: (validation[ic[1]["trial_id"]], float(ic[1]["fitness"]), -ic[0]))[1]


def task_values(items: Mapping[str, Mapping[str, Any]]) -> dict[str, list[float]]:
    """A result's per-item values (``{leaf task: {"task", "docs", "values"}}``) by suite task,
    documents ordered by leaf task, then id: one order for every candidate scored on them."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    for leaf, entry in items.items():
        out.setdefault(entry["task"], []).extend((leaf, int(d), float(v)) for d, v in zip(entry["docs"], entry["values"]))
    return {task: [v for *_, v in sorted(rows)] for task, rows in out.items()}


@dataclass(frozen=True)
class ItemMatrix:
    """The candidates' per-item validation values, paired: row ``i`` is candidate ``i`` (best
    on search first), column ``j`` the same document for every candidate. ``weights`` make a
    row's fitness (``values @ weights``: each task's mean, weighted by the task's weight) and
    ``strata`` hold each task's columns, so a bootstrap resamples documents within each task."""

    values: np.ndarray
    weights: np.ndarray
    strata: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, per_candidate: Sequence[Mapping[str, Sequence[float]]], task_weights: Mapping[str, float]) -> "ItemMatrix":
        """From each candidate's ``{task: values}`` (documents in one order for every candidate);
        ValueError when the candidates were not scored on the same documents."""
        tasks = sorted(per_candidate[0])
        if any(sorted(c) != tasks or any(len(c[t]) != len(per_candidate[0][t]) for t in tasks)
               for c in per_candidate):
            raise ValueError("the candidates' validation items differ (not scored on the same documents)")
        total = sum(float(task_weights[t]) for t in tasks)
        columns, weights, strata, start = [], [], [], 0
        for t in tasks:
            n = len(per_candidate[0][t])
            if n == 0:
                raise ValueError(f"task {t!r} has no validation items")
            columns.append(np.array([c[t] for c in per_candidate], dtype=np.float64))
            weights.append(np.full(n, float(task_weights[t]) / total / n))
            strata.append(np.arange(start, start + n))
            start += n
        return cls(np.concatenate(columns, axis=1), np.concatenate(weights), tuple(strata))

    def fitness(self) -> np.ndarray:
        return self.values @ self.weights


def paired_z(values: np.ndarray, weights: np.ndarray, strata: Sequence[np.ndarray], i: int, j: int = 0) -> float:
    """How many paired standard errors candidate ``i`` is above candidate ``j`` on these items
    (the weighted mean of the per-item differences over its standard error, per task);
    +-inf when they differ on no item's spread but do in mean, 0 when they are equal."""
    d = values[i] - values[j]
    mean = float(d @ weights)
    var = 0.0
    for cols in strata:
        n = len(cols)
        if n > 1:
            share = float(weights[cols].sum())
            var += share * share * float(np.var(d[cols], ddof=1)) / n
    if var <= 0.0:
        return 0.0 if mean == 0.0 else float(np.copysign(np.inf, mean))
    return mean / float(np.sqrt(var))


def gated_index(values: np.ndarray, weights: np.ndarray, strata: Sequence[np.ndarray], min_z: float) -> int:
    """The rule ``selection.min_z``: among the candidates (row 0 the best on search) that beat
    row 0 on validation by at least ``min_z`` paired standard errors, the best on validation
    (ties: the earlier row, i.e. the better on search); row 0 when none does. ``min_z`` 0 is
    the plain best on validation."""
    fit = values @ weights
    best = 0
    for i in range(1, len(fit)):
        if fit[i] > fit[0] and fit[i] > fit[best] and paired_z(values, weights, strata, i) >= min_z:
            best = i
    return best


Rule = Callable[[np.ndarray, np.ndarray, Sequence[np.ndarray]], int]


def gate(min_z: float) -> Rule:
    """The rule ``selection.min_z`` as a function of (values, weights, strata): what
    :func:`winners_curse` re-applies to each replicate."""
    return lambda values, weights, strata: gated_index(values, weights, strata, min_z)


def winners_curse(items: ItemMatrix, rule: Rule, seed: int = 0, replicates: int = 1000) -> float:
    """The bootstrap estimate of how much the validation score of ``rule``'s pick overstates
    that pick's true score (its winner's curse): documents are resampled within each task,
    the same for every candidate (paired), ``rule`` picks again on each replicate, and the
    bias is the mean of (the pick's replicate score - its score on the real items). 0 for a
    single candidate; subtract it from the pick's validation score."""
    if items.values.shape[0] < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    fit = items.fitness()
    # a replicate's columns are laid out task by task as the real ones are, so the strata and
    # the weights (a task's share over its size) stay those of the real items
    total = 0.0
    for _ in range(replicates):
        cols = np.concatenate([rng.choice(s, size=len(s)) for s in items.strata])
        sample = items.values[:, cols]
        j = rule(sample, items.weights, items.strata)
        total += float(sample[j] @ items.weights) - float(fit[j])
    return total / replicates


@dataclass(frozen=True)
class Choice:
    """A selection's outcome: the winning candidate, each paired candidate's z against the
    search split's best (``z``), and the winner's curse of the winner's validation score
    (None when some scored candidate has no per-item values to resample)."""

    winner: dict[str, Any]
    z: dict[int, float]
    winners_curse: Optional[float]


def choose(candidates: list[dict[str, Any]], validation: Mapping[int, float],
           items: Mapping[int, Mapping[str, Sequence[float]]], task_weights: Mapping[str, float],
           min_z: float = 0.0, seed: int = 0) -> Optional[Choice]:
    """The winner among ``candidates`` (best on search first) by ``selection.min_z``.

    ``validation``: each scored candidate's validation fitness; ``items``: its per-item values
    by task. ``min_z`` 0 is :func:`pick` (the plain best on validation). Above 0, only a
    candidate with per-item values can displace the search split's best; when that one has
    none (or failed validation: then the plain best on validation wins) nothing is paired.
    None when no candidate has a validation score."""
    scored = [c for c in candidates if c["trial_id"] in validation]
    if not scored:
        return None
    incumbent = candidates[0]
    paired = [c for c in scored if c["trial_id"] in items]
    matrix = None
    if paired and paired[0] is incumbent:
        try:
            matrix = ItemMatrix.of([items[c["trial_id"]] for c in paired], task_weights)
        except ValueError:
            matrix = None
    z = ({c["trial_id"]: paired_z(matrix.values, matrix.weights, matrix.strata, i) for i, c in enumerate(paired)}
         if matrix is not None else {})

    rule = gate(min_z)
    if min_z == 0.0 or incumbent["trial_id"] not in validation:
        winner = pick(candidates, dict(validation))
    elif matrix is None:
        winner = incumbent
    else:
        winner = paired[rule(matrix.values, matrix.weights, matrix.strata)]
    curse = winners_curse(matrix, rule, seed=seed) if matrix is not None and len(paired) == len(scored) else None
    return Choice(winner=winner, z=z, winners_curse=curse)


def selection_record(choice: Choice, candidates: list[dict[str, Any]], validation: Mapping[int, float],
                     min_z: float = 0.0) -> dict[str, Any]:
    """The ledger record of a selection by validation: the winner, its validation score and
    that score less its winner's curse (``validation_corrected``), and every candidate."""
    winner = choice.winner
    score = float(validation[winner["trial_id"]])
    return {"kind": "selection", "by": "validation", "trial_id": winner["trial_id"],
            "recipe_hash": winner["recipe_hash"], "search_fitness": float(winner["fitness"]),
            "validation_fitness": score, "min_z": min_z, "winners_curse": choice.winners_curse,
            "validation_corrected": None if choice.winners_curse is None else score - choice.winners_curse,
            "search_best_trial": candidates[0]["trial_id"],
            "candidates": [{"trial_id": c["trial_id"], "search": float(c["fitness"]),
                            "validation": validation.get(c["trial_id"]), "z": choice.z.get(c["trial_id"])}
                           for c in candidates]}


def current_selection(records: Iterable[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The last ``selection`` record, unless a trial finished after it (then None)."""
    current = None
    for rec in records:
        kind = rec.get("kind")
        if kind == "selection":
            current = rec
        elif kind == "trial" and current is not None:
            current = None
    return current


def winner(records: list[dict[str, Any]]) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """(the winning trial record, the selection record that chose it or None) of a ledger's
    records: the current selection's trial, else the search split's best."""
    trials = [r for r in records if r.get("kind") == "trial"]
    chosen = current_selection(records)
    if chosen is not None:
        for rec in trials:
            if rec["trial_id"] == chosen["trial_id"]:
                return rec, chosen
    return best_trial(trials), None


def test_scores(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Each recipe's held-out test fitness from the ledger's complete ``test`` records, by recipe
    hash (the winner, the search split's best, Pareto members; sources have no hash)."""
    return {r["recipe_hash"]: float(r["fitness"]) for r in records
            if r.get("kind") == "test" and r.get("recipe_hash") and r.get("state") == "complete"}


def selection_metrics(selection: dict[str, Any]) -> dict[str, float]:
    """What MLflow gets of a selection: ``validation.<trial>`` per candidate, the winner's
    ``validation_fitness`` and ``selected_trial``."""
    out = {f"validation.{c['trial_id']}": float(c["validation"]) for c in selection["candidates"]
           if c["validation"] is not None}
    if selection.get("validation_corrected") is not None:
        out["validation_corrected"] = float(selection["validation_corrected"])
    return out | {"validation_fitness": float(selection["validation_fitness"]),
                  "selected_trial": float(selection["trial_id"])}
