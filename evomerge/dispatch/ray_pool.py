"""Ray dispatch (the actor pool; with ``ray_jobs.py`` the only modules importing ``ray``).

One actor per worker slot (``num_gpus=1`` each on a GPU cluster, CPU actors
locally); each builds a worker once (sources resident) and then receives only
small EvalRequests. Every idle actor gets the next queued request at once.

Faults: an actor that dies mid-trial (killed process, lost node) is replaced and
its request retried on the new actor up to ``max_retries`` times, then reported
as a failed result with the reason. A trial running longer than ``trial_timeout``
seconds has its actor killed and replaced and is reported failed (not retried:
it would hang again). The search goes on either way.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Callable, Optional

import ray
from ray.exceptions import RayActorError, RayError

from evomerge.worker import EvalRequest, EvalResult, TrialWorker, WorkerSpec

log = logging.getLogger(__name__)

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "GIT_DIR": os.devnull, "TQDM_DISABLE": "1"}


@ray.remote
class _WorkerActor:
    def __init__(self, factory: Callable[[WorkerSpec], Any], spec: WorkerSpec) -> None:
        for key, value in WORKER_ENV.items():
            os.environ.setdefault(key, value)
        self._worker = factory(spec)

    def ready(self) -> str:
        return str(getattr(self._worker, "name", os.getpid()))

    def run(self, request: EvalRequest) -> EvalResult:
        return self._worker.run(request)


def connect(address: Optional[str], num_workers: int) -> bool:
    """Start or join a Ray cluster unless this process already did; True if we started/joined it here.

    Inside a Ray Job the entrypoint's environment names the cluster (``RAY_ADDRESS``)
    and ``ray.init()`` joins it; only a fresh local instance is sized (one CPU slot per worker).
    """
    if ray.is_initialized():
        return False
    joining = bool(address or os.environ.get("RAY_ADDRESS"))
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": False, "logging_level": logging.ERROR}
    if not joining:
        kwargs.update(include_dashboard=False, num_cpus=max(num_workers, os.cpu_count() or 1),
                      runtime_env={"env_vars": dict(WORKER_ENV)})
    ray.init(**kwargs)
    return True


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
        trial_timeout: Optional[float] = None,
        worker_factory: Callable[[WorkerSpec], Any] = TrialWorker,
    ) -> None:
        self._owns_ray = connect(address, num_workers)
        self.num_workers = num_workers
        self._spec = spec
        self._factory = worker_factory
        self._options: dict[str, Any] = {"num_cpus": 1, "num_gpus": num_gpus_per_worker, "max_concurrency": 1}
        self._max_retries = max_retries
        self._timeout = trial_timeout
        self._idle: deque = deque()
        self._queue: deque[EvalRequest] = deque()
        self._running: dict[Any, tuple[Any, EvalRequest, float]] = {}  # ObjectRef -> (actor, request, started)
        self._attempts: dict[tuple[str, int], int] = {}
        self._ready: list[EvalResult] = []
        # replacement actors still starting (ready() ref -> actor): they get work once they are up, so
        # a trial's timeout never counts an actor's start-up (imports, loading the sources)
        self._starting: dict[Any, Any] = {}
        actors = [self._new_actor() for _ in range(num_workers)]
        # Fail fast and clearly if workers cannot start (bad model dir, unknown task, ...).
        try:
            ray.get([a.ready.remote() for a in actors])
        except RayError as exc:
            self.close()
            raise RuntimeError(f"a Ray worker failed to start: {_root_cause(exc)}") from None
        self._idle.extend(actors)

    def _new_actor(self):
        return _WorkerActor.options(**self._options).remote(self._factory, self._spec)

    def _replace_actor(self) -> None:
        """Start a new actor in place of a dead or killed one; it takes work once ready."""
        actor = self._new_actor()
        self._starting[actor.ready.remote()] = actor

    def _started(self, ref) -> None:
        actor = self._starting.pop(ref)
        try:
            ray.get(ref)
        except RayError as exc:
            log.warning("a replacement worker failed to start: %s", _root_cause(exc))
            ray.kill(actor)
            if not (self._idle or self._running or self._starting):  # no worker left to run anything
                while self._queue:
                    self._ready.append(_failed(self._queue.popleft(), "no worker could be started: "
                                                                     f"{_root_cause(exc)}"))
            return
        self._idle.append(actor)

    def submit(self, request: EvalRequest) -> None:
        self._queue.append(request)
        self._pump()

    def pending(self) -> int:
        return len(self._queue) + len(self._running) + len(self._ready)

    def _pump(self) -> None:
        while self._idle and self._queue:
            actor = self._idle.popleft()
            request = self._queue.popleft()
            self._running[actor.run.remote(request)] = (actor, request, time.monotonic())

    def wait(self, timeout: float | None = None) -> list[EvalResult]:
        if not self._ready and (self._running or (self._starting and self._queue)):
            if self._timeout is not None and self._running:
                first_deadline = min(t for _, _, t in self._running.values()) + self._timeout
                left = max(0.0, first_deadline - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            watched = [*self._running, *self._starting]
            done, _ = ray.wait(watched, num_returns=1, timeout=timeout)
            # collect everything else that is already finished too
            if done:
                more, _ = ray.wait(watched, num_returns=len(watched), timeout=0)
                done = list({r: None for r in [*done, *more]})
            for ref in done:
                if ref in self._starting:
                    self._started(ref)
                    continue
                actor, request, _ = self._running.pop(ref)
                try:
                    result = ray.get(ref)
                    result.attempts = self._attempts.pop(_key(request), 0) + 1
                    self._ready.append(result)
                    self._idle.append(actor)
                except RayActorError as exc:
                    self._on_actor_death(request, exc)
                except RayError as exc:
                    self._idle.append(actor)
                    self._ready.append(_failed(request, f"ray error: {_root_cause(exc)}"))
            self._expire()
        self._pump()
        out, self._ready = self._ready, []
        return out

    def _expire(self) -> None:
        """Stop trials that ran past the timeout: kill and replace their actor, report them failed."""
        if self._timeout is None:
            return
        now = time.monotonic()
        for ref, (actor, request, started) in list(self._running.items()):
            if now - started >= self._timeout:
                del self._running[ref]
                ray.kill(actor)
                self._replace_actor()
                self._ready.append(_failed(request, f"timed out after {self._timeout:g} s (dispatch.trial_timeout)"))

    def _on_actor_death(self, request: EvalRequest, exc: Exception) -> None:
        attempts = self._attempts.get(_key(request), 0) + 1
        self._attempts[_key(request)] = attempts
        log.warning("worker died during trial %d (attempt %d): %s", request.trial_id, attempts, exc)
        self._replace_actor()
        if attempts <= self._max_retries:
            self._queue.appendleft(request)
        else:
            del self._attempts[_key(request)]
            result = _failed(request, f"worker died {attempts} times: {_root_cause(exc)}")
            result.attempts = attempts
            self._ready.append(result)

    def close(self) -> None:
        for actor, _, _ in list(self._running.values()):
            ray.kill(actor)
        for actor in [*self._idle, *self._starting.values()]:
            ray.kill(actor)
        self._running.clear()
        self._idle.clear()
        self._starting.clear()
        if self._owns_ray:
            ray.shutdown()


def _key(request: EvalRequest) -> tuple[str, int]:
    return (request.split, request.trial_id)


def _failed(request: EvalRequest, reason: str) -> EvalResult:
    return EvalResult(trial_id=request.trial_id, state="failed", error=reason, split=request.split)


def _root_cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
