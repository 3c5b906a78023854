"""The Dispatcher protocol: hand EvalRequests to workers, collect EvalResults as they complete."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from evomerge.worker import EvalRequest, EvalResult


@runtime_checkable
class Dispatcher(Protocol):
    num_workers: int

    def submit(self, request: EvalRequest) -> None:
        """Queue a request; it starts as soon as a worker is idle."""
        ...

    def pending(self) -> int:
        """Requests submitted whose results have not been returned by ``wait`` yet."""
        ...

    def wait(self, timeout: float | None = None) -> list[EvalResult]:
        """Block until at least one result is ready (or timeout); return all ready results."""
        ...

    def worker_counts(self) -> dict[str, int]:
        """The pool as it is now: ``target`` workers, ``live`` (idle or busy), ``starting``,
        ``restarting`` (waiting to be started again after a failure)."""
        ...

    def worker_seconds(self) -> float:
        """Seconds of live workers, summed over workers, since the dispatcher started (what a busy
        share is measured against)."""
        ...

    def close(self) -> None:
        ...
