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


def build_tracker(cfg: TrackingConfig, *, tracking_uri: str, experiment_name: str, run_id: Optional[str] = None) -> Tracker:
    if cfg.backend == "none":
        from evomerge.tracking.null import NullTracker

        return NullTracker()
    from evomerge.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(tracking_uri, experiment_name, run_id=run_id)


__all__ = ["Tracker", "build_tracker", "default_tracking_uri"]
