"""The scores beside the search: sources (baselines), the validation split, the test split."""

from __future__ import annotations

import time
from typing import Optional

from evomerge.ledger import Ledger
from evomerge.recipe import Recipe
from evomerge.run_dir import ItemLog, pack_values, unpack_values
from evomerge.search.progress import Progress
from evomerge.search.work import Work, packed_task_items
from evomerge.selection import task_values
from evomerge.worker import EvalRequest, EvalResult


class HeldOutScores:
    """The scores beside the search: each source's baseline (search split), the validation
    split's scores of the top trials, and the test split's scores of the winner (and of the
    search split's best, when validation chose another; and of a Pareto front's members) and
    of every source."""

    def __init__(self, ledger: Ledger, items: ItemLog, progress: Progress) -> None:
        self.ledger = ledger
        self.items = items
        self.progress = progress
        self.baselines: dict[str, float] = {}
        self.baselines_done: set[str] = set()
        self.tests_done: dict[tuple[str, Optional[str]], dict] = {}
        self.validations: dict[int, dict] = {}

    def replay(self, rec: dict) -> None:
        """A ``baseline``, ``validation`` or ``test`` ledger record on resume."""
        if rec["kind"] == "baseline":
            self.baselines_done.add(rec["model"])
            if rec["state"] == "complete":
                self.baselines[rec["model"]] = float(rec["fitness"])
        elif rec["kind"] == "validation":
            self.validations[rec["trial_id"]] = rec
        else:
            self.tests_done[(rec["model"], rec.get("recipe_hash"))] = rec

    def on_validation(self, work: Work, res: EvalResult) -> None:
        rec = {"kind": "validation", "trial_id": work.request.trial_id, "recipe_hash": work.recipe_hash,
               "split": "validation", "state": res.state, "fitness": res.fitness, "scores": res.scores,
               "eval_seconds": res.eval_seconds, "error": res.error, "finished_at": time.time(),
               **({"cached_from": res.cached_from} if res.cached_from else {})}
        if res.state == "complete" and res.items:
            rec["item_values"] = {task: pack_values(v) for task, v in task_values(res.items).items()}
        self.ledger.append(rec)
        self.validations[work.request.trial_id] = rec
        if res.state != "complete":
            self.progress.message(f"validation of trial {work.request.trial_id} failed: {res.error.splitlines()[0]}")

    def validation_scores(self) -> dict[int, float]:
        return {t: float(r["fitness"]) for t, r in self.validations.items() if r["state"] == "complete"}

    def validation_items(self) -> dict[int, dict[str, list[float]]]:
        """Each validated trial's per-item values by task (those recorded with them)."""
        return {t: {task: unpack_values(v) for task, v in r["item_values"].items()}
                for t, r in self.validations.items() if r["state"] == "complete" and r.get("item_values")}

    def on_baseline(self, work: Work, res: EvalResult) -> None:
        if res.state == "complete" and not res.cached_from:
            self.items.append(res.items, source=work.label)
        self.ledger.append({"kind": "baseline", "model": work.label, "split": res.split, "state": res.state,
                            "fitness": res.fitness, "scores": res.scores, "eval_seconds": res.eval_seconds,
                            "error": res.error, "finished_at": time.time(),
                            **({"cached_from": res.cached_from} if res.cached_from else {}),
                            **({"task_items": packed_task_items(res)} if res.items else {})})
        self.baselines_done.add(work.label)
        if res.state == "complete":
            self.baselines[work.label] = float(res.fitness)
        else:
            self.progress.message(f"baseline {work.label} failed: {res.error.splitlines()[0]}")

    def on_test(self, work: Work, res: EvalResult, trial_id: Optional[int]) -> None:
        rec = {"kind": "test", "model": work.label, "trial_id": trial_id,
               "recipe_hash": work.recipe_hash, "split": "test", "state": res.state, "fitness": res.fitness,
               "scores": res.scores, "eval_seconds": res.eval_seconds, "error": res.error,
               "finished_at": time.time(), **({"cached_from": res.cached_from} if res.cached_from else {}),
               **({"task_items": packed_task_items(res)} if res.items else {})}
        self.ledger.append(rec)
        self.tests_done[(work.label, work.recipe_hash)] = rec

    @staticmethod
    def test_works(recipes: dict[str, Recipe], sources: list[str]) -> list[Work]:
        """Test-split work for each labelled recipe (``best`` first) and every source."""
        wanted = [Work("test", EvalRequest(trial_id=i, recipe=recipe.to_dict(), split="test"), label=label,
                        recipe_hash=recipe.content_hash()) for i, (label, recipe) in enumerate(recipes.items())]
        return wanted + [Work("test", EvalRequest(trial_id=len(recipes) + i, source=name, split="test"), label=name)
                         for i, name in enumerate(sources)]

    def has_test(self, work: Work) -> bool:
        return (work.label, work.recipe_hash) in self.tests_done

    def test_scores(self, wanted: list[Work]) -> dict[str, float]:
        out = {}
        for w in wanted:
            rec = self.tests_done.get((w.label, w.recipe_hash))
            if rec is not None and rec["state"] == "complete":
                out[w.label] = float(rec["fitness"])
        return out
