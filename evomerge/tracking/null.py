"""A tracker that records nothing (tracking.backend: none); the ledger still records everything."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


class NullTracker:
    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        return ""

    def logged_trials(self) -> int:
        return 0

    def log_trials(self, trials) -> None:
        pass

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str) -> None:
        pass
