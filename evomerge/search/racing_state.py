"""A racing run's trials between rungs (``suite.racing``; the rules are :mod:`evomerge.racing`)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from typing import Optional

from evomerge.ledger import Ledger
from evomerge.racing import Race, tallies_of
from evomerge.search.work import Work
from evomerge.worker import EvalResult


class RacingState:
    """A racing run's trials between rungs: the race, the trials promoted to their next rung, the
    seconds each has spent so far and its last ``rung`` record (for resume)."""

    def __init__(self, race: Race) -> None:
        self.race = race
        self.promoted: deque[Work] = deque()
        self.spent: dict[int, list[float]] = {}
        self.last_rungs: dict[int, dict] = {}

    def replay(self, rec: dict) -> None:
        """A ledger record on resume: a ``rung`` one, or a ``trial`` that ended its race."""
        if rec["kind"] == "rung":
            self.race.replay(rec)
            self.last_rungs[rec["trial_id"]] = rec
            self._spend(rec["trial_id"], rec.get("merge_seconds", 0.0), rec.get("eval_seconds", 0.0))
        else:
            self.race.finish(rec["trial_id"], rec.get("rung", self.race.last), rec["fitness"])
            self.race.fitness_by_rung.pop(rec["trial_id"], None)
            self.last_rungs.pop(rec["trial_id"], None)
            self.spent.pop(rec["trial_id"], None)

    def resumed(self, work: Work) -> tuple[Optional[Work], Optional[EvalResult]]:
        """A trial that was in flight at the crash: the work to queue, or the final result of a
        trial whose last rung was final but whose trial record was lost."""
        last = self.last_rungs.get(work.request.trial_id)
        if last is None:
            return work, None
        if last["promoted"]:  # it was on its way to the next rung: go on from there
            return replace(work, request=replace(work.request, rung=last["rung"] + 1)), None
        return None, EvalResult(trial_id=work.request.trial_id, state="complete", fitness=last["fitness"],
                                scores=dict(last["scores"]), worker=last.get("worker", ""), rung=last["rung"])

    def _spend(self, trial_id: int, merge: float, evaluation: float) -> None:
        spent = self.spent.setdefault(trial_id, [0.0, 0.0])
        spent[0] += merge
        spent[1] += evaluation

    def on_rung(self, work: Work, res: EvalResult, ledger: Ledger) -> Optional[EvalResult]:
        """One rung's result: recorded, then the trial is promoted (None) or its final result returned."""
        rung = work.request.rung
        self._spend(res.trial_id, res.merge_seconds, res.eval_seconds)
        if res.state != "complete":
            return res
        tallies = tallies_of(res.items)
        try:
            fitness, scores, se = self.race.add(res.trial_id, rung, tallies)
        except ValueError as exc:  # a rung without items for a task: the suite cannot race
            return replace(res, state="failed", fitness=None, error=str(exc))
        promoted = self.race.promote(rung, fitness, se)
        rec = {"kind": "rung", "trial_id": res.trial_id, "rung": rung, "fitness": fitness, "scores": scores,
               "stderr": se, "tallies": tallies, "promoted": promoted, "merge_seconds": res.merge_seconds,
               "eval_seconds": res.eval_seconds, "worker": res.worker, "at": time.time()}
        ledger.append(rec)
        self.last_rungs[res.trial_id] = rec
        if promoted:
            self.promoted.append(replace(work, request=replace(work.request, rung=rung + 1)))
            return None
        return replace(res, fitness=fitness, scores=scores, rung=rung)

    def finish(self, res: EvalResult) -> tuple[EvalResult, dict]:
        """A trial's final result with the seconds of all its rungs, and its record's racing fields."""
        spent = self.spent.pop(res.trial_id, None)
        if spent is not None:
            res = replace(res, merge_seconds=spent[0], eval_seconds=spent[1])
        self.last_rungs.pop(res.trial_id, None)
        rung = res.rung if res.rung is not None else self.race.last
        self.race.finish(res.trial_id, rung, res.fitness if res.state == "complete" else None)
        fields = {"rung": rung, "last_rung": self.race.last,
                  "rung_fitness": self.race.fitness_by_rung.pop(res.trial_id, [])}
        return res, fields
