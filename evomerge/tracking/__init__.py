"""Trackers: MLflow, or none."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from evomerge.config import TrackingConfig
from evomerge.tracking.base import Tracker


def default_tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite store inside the run dir."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def run_url(server: str, experiment_id: str, run_id: str) -> str:
    """The page of one run in the MLflow UI at ``server``, in its model-training view.

    MLflow 3 opens in its GenAI view (traces), where a search's runs do not show;
    ``workflowType=machine_learning`` selects the model-training view for this page.
    """
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def build_tracker(cfg: TrackingConfig, *, tracking_uri: str, experiment_name: str, run_id: Optional[str] = None) -> Tracker:
    if cfg.backend == "none":
        from evomerge.tracking.null import NullTracker

        return NullTracker()
    from evomerge.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(tracking_uri, experiment_name, run_id=run_id)


class GuardedTracker:
    """Wraps a tracker so that a tracking failure never stops a search.

    The ledger already holds everything; if the tracker raises (server down, disk
    full), the failure is reported once through ``warn`` and the tracker is
    switched off for the rest of the process. ``evomerge resume`` reopens the run
    and logs the trials the tracker missed.
    """

    def __init__(self, inner: Tracker, warn) -> None:
        self.inner = inner
        self.warn = warn
        self.error: Optional[str] = None

    def _call(self, what: str, fn, *args, default=None):
        if self.error is not None:
            return default
        try:
            return fn(*args)
        except Exception as exc:  # any tracker failure: keep searching, the ledger has it
            self.error = f"{what}: {type(exc).__name__}: {exc}"
            self.warn(f"tracking is off for the rest of this run ({self.error}); "
                      "the ledger has every trial and `evomerge resume` logs the missing ones")
            return default

    def start(self, run_name, params, tags) -> str:
        return self._call("start", self.inner.start, run_name, params, tags, default="")

    def logged_trials(self) -> int:
        return self._call("logged_trials", self.inner.logged_trials, default=0)

    def log_trials(self, trials) -> None:
        self._call("log_trials", self.inner.log_trials, trials)

    def log_summary(self, metrics) -> None:
        self._call("log_summary", self.inner.log_summary, metrics)

    def log_artifact(self, path) -> None:
        self._call("log_artifact", self.inner.log_artifact, path)

    def finish(self, status) -> None:
        self._call("finish", self.inner.finish, status)


__all__ = ["GuardedTracker", "Tracker", "build_tracker", "default_tracking_uri"]
