"""The Tracker protocol: where a run's parameters, per-trial metrics and artifacts go."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Open the run, or reopen it if the tracker was built with a run id (resume); returns the run id."""
        ...

    def logged_trials(self) -> int:
        """How many trial records (steps) the run holds already; a resumed run logs the rest."""
        ...

    def log_trials(self, trials: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """Metrics of finished trials, as (step, metrics) pairs (fitness, best-so-far, timings, trial_id);
        step = completion order. One call may carry several trials (one round trip)."""
        ...

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        ...

    def log_artifact(self, path: Path) -> None:
        ...

    def finish(self, status: str) -> None:
        """status: "FINISHED", "FAILED" or "KILLED"."""
        ...


def run_url(server: str, experiment_id: str, run_id: str) -> str:
    """The page of one run in the MLflow UI at ``server``, in its model-training view.

    MLflow 3 opens in its GenAI view (traces), where a search's runs do not show;
    ``workflowType=machine_learning`` selects the model-training view for this page.
    """
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
