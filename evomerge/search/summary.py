"""A finished run's summary (``summary.json``) and how it is drawn from the run's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from evomerge.racing import stopped_per_rung
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.search.run_state import RunState


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    trials: int
    failed: int
    best_trial: Optional[int]
    best_fitness: Optional[float]
    best_recipe_hash: Optional[str]
    baselines: dict[str, float] = field(default_factory=dict)
    test_scores: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    seconds: float = 0.0
    islands: int = 1
    resumed: bool = False
    worker_busy_fraction: Optional[float] = None  # busy seconds / seconds workers were up, in the search
    worker_seconds: Optional[float] = None  # seconds of live workers in the search, summed over workers
    controller_ms_per_trial: Optional[float] = None
    search_seconds: Optional[float] = None  # the search loop alone (no start-up, no test split)
    steady_busy_fraction: Optional[float] = None  # busy share until the budget was all handed out
    pareto_trials: list[int] = field(default_factory=list)  # multi-objective runs: the Pareto front
    cached_trials: int = 0  # trials answered by the fitness cache (no worker)
    failure_reasons: list[list] = field(default_factory=list)  # [[reason, count], ...], commonest first
    # racing: finished trials per rung they stopped at, and item evaluations of the search's trials
    racing_stopped: list[int] = field(default_factory=list)
    item_evaluations: Optional[int] = None
    # validation (suite.validation_tasks): best_* is the winner on validation among the top_k by
    # search fitness; validation: {trial id: validation fitness} of those top_k
    validation: dict[str, float] = field(default_factory=dict)
    validation_fitness: Optional[float] = None
    # the winner's validation score less its winner's curse (a bootstrap of the validation items)
    validation_corrected: Optional[float] = None
    search_best_trial: Optional[int] = None
    search_best_fitness: Optional[float] = None
    start_trials: dict[str, str] = field(default_factory=dict)  # {trial id: start recipe} (optimizer.start_from)
    # standard errors of the scores above (from per-item values; None where there are none):
    # {"search", "validation", "baselines": {source: se}, "tests": {label: se}}
    standard_errors: dict[str, Any] = field(default_factory=dict)
    evidence: Optional[dict[str, Any]] = None  # does the winner beat its sources (see evomerge.uncertainty)

    @property
    def all_failed(self) -> bool:
        """Every trial of the run failed: there is no result to export."""
        return self.trials > 0 and self.failed == self.trials

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["run_dir"] = str(self.run_dir)
        return d


def summarize(state: "RunState", stats: dict[str, float], test_scores: dict[str, float],
               num_workers: int, winner: Optional[tuple[int, float, Recipe]],
               selection: Optional[dict]) -> RunSummary:
    """The summary of a finished search: the winner, baselines, validation and test scores,
    racing, worker use."""
    board = state.board
    summary = RunSummary(
        run_id=state.run_id, run_dir=state.run_dir, trials=state.finished, failed=board.failed,
        best_trial=winner[0] if winner else None, best_fitness=winner[1] if winner else None,
        best_recipe_hash=winner[2].content_hash() if winner else None,
        baselines=dict(state.baselines), test_scores=test_scores,
        pareto_trials=board.front.trial_ids() if board.multi_objective else [],
        cached_trials=board.cached, failure_reasons=board.failure_reasons(),
    )
    from evomerge.selection import winner as winner_of
    from evomerge.uncertainty import run_uncertainty

    records = state.ledger.records()
    won, chosen = winner_of(records)
    sure = run_uncertainty(records, state.exp.suite.model_dump(mode="json"), won, state.exp.base_model, chosen)
    summary.evidence = sure.pop("evidence")
    summary.standard_errors = sure
    if selection is not None:
        summary.validation = {str(c["trial_id"]): c["validation"] for c in selection["candidates"]
                              if c["validation"] is not None}
        summary.validation_fitness = selection["validation_fitness"]
        summary.validation_corrected = selection.get("validation_corrected")
        summary.search_best_trial = state.best[0]
        summary.search_best_fitness = state.best[1]
    if state.racing is not None:
        summary.racing_stopped = stopped_per_rung(board.records)
        summary.item_evaluations = state.racing.race.items_scored
    loop_s, handled = stats["loop_s"], stats["handled"]
    if loop_s > 0 and handled:
        summary.search_seconds = loop_s
        # of the time workers were up: a pool starts searching with its first worker, and one lost
        # and started again is not idle while it is away
        summary.worker_seconds = stats["up_s"] or num_workers * loop_s
        summary.worker_busy_fraction = stats["busy"] / summary.worker_seconds
        summary.controller_ms_per_trial = 1000.0 * (loop_s - stats["wait_s"]) / handled
        if stats["steady_s"]:
            summary.steady_busy_fraction = stats["steady_busy"] / (stats["steady_up_s"] or num_workers * stats["steady_s"])
    return summary
