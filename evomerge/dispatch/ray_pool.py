"""Ray dispatch (the only module that imports ``ray``).

One actor per worker slot; each builds a :class:`TrialWorker` once (sources
resident) and then receives only small EvalRequests. Every idle actor gets the
next queued request at once. An actor that dies mid-trial has its request
retried on a fresh actor up to ``max_retries`` times, then it is reported as a
failed result with the reason; the search goes on.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any, Optional

import ray
from ray.exceptions import RayActorError, RayError

from evomerge.worker import EvalRequest, EvalResult, TrialWorker, WorkerSpec

log = logging.getLogger(__name__)


@ray.remote
class _WorkerActor:
    def __init__(self, spec: WorkerSpec) -> None:
        self._worker = TrialWorker(spec)

    def ready(self) -> str:
        return self._worker.name

    def run(self, request: EvalRequest) -> EvalResult:
        return self._worker.run(request)


class RayDispatcher:
    """Keeps ``num_workers`` actors busy with queued requests."""

    def __init__(
        self,
        spec: WorkerSpec,
        num_workers: int,
        *,
        address: Optional[str] = None,
        num_gpus_per_worker: float = 0.0,
        max_retries: int = 2,
    ) -> None:
        self._owns_ray = False
        if not ray.is_initialized():
            env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "GIT_DIR": os.devnull, "TQDM_DISABLE": "1"}}
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                runtime_env=env,
                num_cpus=None if address else max(num_workers, os.cpu_count() or 1),
            )
            self._owns_ray = True
        self.num_workers = num_workers
        self._spec = spec
        self._options: dict[str, Any] = {"num_cpus": 1, "num_gpus": num_gpus_per_worker, "max_concurrency": 1}
        self._max_retries = max_retries
        self._idle: deque = deque()
        self._queue: deque[EvalRequest] = deque()
        self._running: dict[Any, tuple[Any, EvalRequest]] = {}  # ObjectRef -> (actor, request)
        self._attempts: dict[int, int] = {}
        self._ready: list[EvalResult] = []
        actors = [self._new_actor() for _ in range(num_workers)]
        # Fail fast and clearly if workers cannot start (bad model dir, unknown task, ...).
        try:
            ray.get([a.ready.remote() for a in actors])
        except RayError as exc:
            self.close()
            raise RuntimeError(f"a Ray worker failed to start: {_root_cause(exc)}") from None
        self._idle.extend(actors)

    def _new_actor(self):
        return _WorkerActor.options(**self._options).remote(self._spec)

    def submit(self, request: EvalRequest) -> None:
        self._queue.append(request)
        self._pump()

    def pending(self) -> int:
        return len(self._queue) + len(self._running) + len(self._ready)

    def _pump(self) -> None:
        while self._idle and self._queue:
            actor = self._idle.popleft()
            request = self._queue.popleft()
            self._running[actor.run.remote(request)] = (actor, request)

    def wait(self, timeout: float | None = None) -> list[EvalResult]:
        if not self._ready and self._running:
            done, _ = ray.wait(list(self._running), num_returns=1, timeout=timeout)
            # collect everything else that is already finished too
            if done:
                more, _ = ray.wait(list(self._running), num_returns=len(self._running), timeout=0)
                done = list({r: None for r in [*done, *more]})
            for ref in done:
                actor, request = self._running.pop(ref)
                try:
                    self._ready.append(ray.get(ref))
                    self._idle.append(actor)
                except RayActorError as exc:
                    self._on_actor_death(request, exc)
                except RayError as exc:
                    self._idle.append(actor)
                    self._ready.append(_failed(request, f"ray error: {_root_cause(exc)}"))
        self._pump()
        out, self._ready = self._ready, []
        return out

    def _on_actor_death(self, request: EvalRequest, exc: Exception) -> None:
        attempts = self._attempts.get(request.trial_id, 0) + 1
        self._attempts[request.trial_id] = attempts
        log.warning("worker died during trial %d (attempt %d): %s", request.trial_id, attempts, exc)
        self._idle.append(self._new_actor())
        if attempts <= self._max_retries:
            self._queue.appendleft(request)
        else:
            self._ready.append(_failed(request, f"worker died {attempts} times: {_root_cause(exc)}"))

    def close(self) -> None:
        for actor, _ in list(self._running.values()):
            ray.kill(actor)
        for actor in self._idle:
            ray.kill(actor)
        self._running.clear()
        self._idle.clear()
        if self._owns_ray:
            ray.shutdown()


def _failed(request: EvalRequest, reason: str) -> EvalResult:
    return EvalResult(trial_id=request.trial_id, state="failed", error=reason, split=request.split)


def _root_cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
