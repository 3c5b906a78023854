"""The finished trials of a run (best, failures, Pareto front) and their metrics' way to the tracker."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

from evomerge.pareto import ParetoFront
from evomerge.racing import counts_for_best
from evomerge.recipe import Recipe, recipe_from_dict
from evomerge.run_dir import write_json_atomic
from evomerge.search.work import failure_reason
from evomerge.tracking.base import Tracker
from evomerge.tracking.metrics import trial_metric_rows
from evomerge.tracking.null import NullTracker


class Scoreboard:
    """The finished trials of a run: their records, the failure count, the best (ties: the
    earliest finished) and, for a multi-objective run, the Pareto front."""

    def __init__(self, multi_objective: bool) -> None:
        self.multi_objective = multi_objective
        self.records: list[dict] = []
        self.failed = 0
        self.best: Optional[tuple[int, float, Recipe]] = None
        self.front = ParetoFront()
        self.cached = 0

    def note(self, rec: dict) -> bool:
        """Count a finished trial record; True if the Pareto front changed."""
        self.records.append(rec)
        self.cached += bool(rec.get("cached_from"))
        if rec["state"] != "complete":
            self.failed += 1
            return False
        if counts_for_best(rec) and (self.best is None or rec["fitness"] > self.best[1]):
            self.best = (rec["trial_id"], float(rec["fitness"]), recipe_from_dict(rec["recipe"]))
        return self.multi_objective and self.front.add(rec["trial_id"], rec["objectives"])

    def told_input(self, rec: dict):
        """What a trial record tells its island: the fitness, or the vector of objectives."""
        return rec.get("objectives") if self.multi_objective else rec["fitness"]

    def write_pareto(self, path: Path, objectives: list[str]) -> None:
        by_id = {r["trial_id"]: r for r in self.records}
        write_json_atomic(path, {
            "objectives": objectives,
            "members": [{"trial_id": t, "objectives": self.front.members[t], "fitness": by_id[t]["fitness"],
                         "recipe_hash": by_id[t]["recipe_hash"]} for t in self.front.trial_ids()],
        })

    def failure_reasons(self) -> list[list]:
        """The three commonest failure reasons with their counts."""
        return [[reason, n] for reason, n in Counter(
            failure_reason(t.get("error")) for t in self.records if t.get("state") != "complete").most_common(3)]


class TrackerFeed:
    """Per-trial metrics on their way to the tracker: queued as trials finish, sent when the free
    workers have their next candidates (the ledger has them already)."""

    def __init__(self) -> None:
        self.tracker: Tracker = NullTracker()
        self._backlog: list[tuple[int, dict[str, float]]] = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self._backlog.append((step, metrics))

    def flush(self) -> None:
        if self._backlog:
            self.tracker.log_trials(self._backlog)
            self._backlog = []

    def catch_up(self, board: Scoreboard) -> None:
        """Log the trials the tracker missed (it was down, or the process died between ledger and tracker)."""
        self._backlog.extend(trial_metric_rows(board.records, board.multi_objective, self.tracker.logged_trials()))
        self.flush()
