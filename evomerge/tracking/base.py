"""The Tracker protocol: where a run's parameters, per-trial metrics and artifacts go."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Open (or reopen) the run; returns the tracker's run id."""
        ...

    def log_trial(self, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics of one finished trial (fitness, best-so-far, timings, trial_id); step = completion order."""
        ...

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        ...

    def log_artifact(self, path: Path) -> None:
        ...

    def finish(self, status: str) -> None:
        """status: "FINISHED", "FAILED" or "KILLED"."""
        ...
