"""Workers and a dispatcher for exercising the controller: fault injection and simulation.

Used by the test suite and ``benchmarks/controller_scaling.py``; never by a real
search. They plug into the real controller and the real Ray dispatcher through
``worker_factory`` / ``dispatcher_factory``, so what they test is the real loop.

- :class:`FaultInjectingWorker`: a real :class:`~evomerge.worker.TrialWorker`
  that misbehaves on chosen trials (raise, NaN fitness, slow, hang, kill its own
  process once or every time).
- :class:`SimulatedWorker`: no model; sleeps for a per-trial duration and returns
  a smooth synthetic fitness of the recipe's coefficients.
- :class:`VirtualDispatcher`: ``num_workers`` simulated workers on a virtual clock
  (no sleeping, deterministic), which measures how busy the workers were.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Mapping, Optional

from evomerge.worker import EvalRequest, EvalResult, TrialWorker, WorkerSpec


def synthetic_fitness(recipe: Optional[dict]) -> float:
    """A smooth objective of a recipe's numbers with its optimum at 0.6 (sources score 0.5)."""
    if recipe is None:
        return 0.5
    values: list[float] = []
    for model in recipe.get("models", []):
        for v in model.get("parameters", {}).values():
            values.extend(v if isinstance(v, (list, tuple)) else [v])
    if not values:
        return 0.5
    return 1.0 - sum((float(v) - 0.6) ** 2 for v in values) / len(values)


def trial_duration(trial_id: int, split: str, low: float, spread: float) -> float:
    """A deterministic pseudo-random duration in [low, low * spread] for a request."""
    digest = hashlib.blake2b(f"{split}:{trial_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    return low * (1.0 + (spread - 1.0) * u)


class SimulatedWorker:
    """Sleeps instead of merging and scoring (controller benchmarks)."""

    def __init__(self, spec: WorkerSpec, *, low: float = 0.2, spread: float = 5.0) -> None:
        self.spec = spec
        self.low = low
        self.spread = spread
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, request: EvalRequest) -> EvalResult:
        seconds = trial_duration(request.trial_id, request.split, self.low, self.spread)
        time.sleep(seconds)
        return EvalResult(trial_id=request.trial_id, state="complete", fitness=synthetic_fitness(request.recipe),
                          scores={"synthetic": synthetic_fitness(request.recipe)}, eval_seconds=seconds,
                          worker=self.name, split=request.split)


class FaultInjectingWorker(TrialWorker):
    """A real worker that misbehaves on the search trials named in ``faults``.

    Modes: ``raise`` (an exception while scoring), ``nan`` (a NaN fitness),
    ``slow:<seconds>`` (sleep, then score normally), ``hang`` (sleep for an hour),
    ``die_once`` (SIGKILL its own process the first time, behave on the retry; a
    marker file in ``marker_dir`` remembers), ``die`` (SIGKILL every time).
    ``start_delay`` seconds are slept before the worker starts (a slow start-up: a big model,
    a busy machine).
    """

    def __init__(self, spec: WorkerSpec, *, faults: Mapping[int, str], marker_dir: str,
                 start_delay: float = 0.0) -> None:
        time.sleep(start_delay)
        super().__init__(spec)
        self.faults = dict(faults)
        self.marker_dir = Path(marker_dir)

    def run(self, request: EvalRequest) -> EvalResult:
        mode = self.faults.get(request.trial_id) if request.split == "search" and request.recipe else None
        if mode in ("die", "die_once"):
            marker = self.marker_dir / f"died-{request.trial_id}"
            if mode == "die" or not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "raise":
            return self._failing(request)
        elif mode == "hang":
            time.sleep(3600)
        elif mode is not None and mode.startswith("slow:"):
            time.sleep(float(mode.split(":", 1)[1]))
        result = super().run(request)
        if mode == "nan":
            result.fitness = math.nan  # as if scoring produced NaN; the controller must fail it
        return result

    def _failing(self, request: EvalRequest) -> EvalResult:
        original = self.evaluator.score

        def boom(*args, **kwargs):
            raise RuntimeError(f"injected failure in trial {request.trial_id}")

        self.evaluator.score = boom
        try:
            return super().run(request)
        finally:
            self.evaluator.score = original


class VirtualDispatcher:
    """``num_workers`` simulated workers on a virtual clock: instant, deterministic, and measured.

    A request starts when submitted (the controller only submits to free workers)
    and finishes ``trial_duration`` virtual seconds later. ``busy_fraction`` is the
    share of worker-time spent on requests between the first submission and the
    last completion.
    """

    def __init__(self, num_workers: int, *, low: float = 1.0, spread: float = 5.0) -> None:
        self.num_workers = num_workers
        self.low = low
        self.spread = spread
        self.now = 0.0
        self.busy_seconds = 0.0
        self.submitted = 0
        self._running: list[tuple[float, int, EvalRequest]] = []
        self._created = time.monotonic()

    def submit(self, request: EvalRequest) -> None:
        if len(self._running) >= self.num_workers:
            raise RuntimeError("submitted to a full VirtualDispatcher: the controller over-subscribed its workers")
        seconds = trial_duration(request.trial_id, request.split, self.low, self.spread)
        self.busy_seconds += seconds
        heapq.heappush(self._running, (self.now + seconds, self.submitted, request))
        self.submitted += 1

    def pending(self) -> int:
        return len(self._running)

    def wait(self, timeout: float | None = None) -> list[EvalResult]:
        if not self._running:
            return []
        end, _, request = heapq.heappop(self._running)
        self.now = end
        out = [request]
        while self._running and self._running[0][0] <= self.now:
            out.append(heapq.heappop(self._running)[2])
        return [EvalResult(trial_id=r.trial_id, state="complete", fitness=synthetic_fitness(r.recipe),
                           scores={"synthetic": synthetic_fitness(r.recipe)}, worker="virtual", split=r.split)
                for r in out]

    def worker_counts(self) -> dict[str, int]:
        return {"target": self.num_workers, "live": self.num_workers, "starting": 0, "restarting": 0}

    def worker_seconds(self) -> float:
        return self.num_workers * (time.monotonic() - self._created)

    @property
    def busy_fraction(self) -> float:
        return self.busy_seconds / (self.num_workers * self.now) if self.now else 0.0

    def close(self) -> None:
        self._running.clear()
