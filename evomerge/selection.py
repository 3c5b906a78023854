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

from typing import Any, Iterable, Optional

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


def selection_record(winner: dict[str, Any], candidates: list[dict[str, Any]], validation: dict[int, float],
                     search_best: dict[str, Any]) -> dict[str, Any]:
    """The ledger record of a selection by validation."""
    return {"kind": "selection", "by": "validation", "trial_id": winner["trial_id"],
            "recipe_hash": winner["recipe_hash"], "search_fitness": float(winner["fitness"]),
            "validation_fitness": validation[winner["trial_id"]], "search_best_trial": search_best["trial_id"],
            "candidates": [{"trial_id": c["trial_id"], "search": float(c["fitness"]),
                            "validation": validation.get(c["trial_id"])} for c in candidates]}


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
    return out | {"validation_fitness": float(selection["validation_fitness"]),
                  "selected_trial": float(selection["trial_id"])}
