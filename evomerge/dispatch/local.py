"""In-process dispatch: one TrialWorker in this process (tests, debugging, a single GPU)."""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from evomerge.worker import EvalRequest, EvalResult, TrialWorker, WorkerSpec


class LocalDispatcher:
    """Runs requests one at a time, in submission order, inside ``wait``."""

    num_workers = 1

    def __init__(self, spec: WorkerSpec, worker_factory: Callable[[WorkerSpec], TrialWorker] = TrialWorker) -> None:
        self._worker = worker_factory(spec)
        self._queue: deque[EvalRequest] = deque()
        self._started = time.monotonic()

    def submit(self, request: EvalRequest) -> None:
        self._queue.append(request)

    def pending(self) -> int:
        return len(self._queue)

    def wait(self, timeout: float | None = None) -> list[EvalResult]:
        if not self._queue:
            return []
        return [self._worker.run(self._queue.popleft())]

    def worker_counts(self) -> dict[str, int]:
        return {"target": 1, "live": 1, "starting": 0, "restarting": 0}

    def worker_seconds(self) -> float:
        return time.monotonic() - self._started

    def close(self) -> None:
        self._queue.clear()
