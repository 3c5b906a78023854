"""Ray dispatch: a pool of worker actors that heals (with ``ray_jobs.py`` the only modules importing ``ray``).

The pool keeps ``num_workers`` actors (``gpus_per_worker`` / ``cpus_per_worker`` Ray resources
each); each builds a worker once (sources resident) and then receives only small EvalRequests.
Every idle actor gets the next queued request at once.

What it does when the cluster misbehaves:

- An actor that dies mid-trial (killed process, lost node) is replaced and its request retried
  on another actor up to ``max_retries`` times, then reported as a failed result with the
  reason. A trial running longer than ``trial_timeout`` seconds has its actor killed and
  replaced and is reported failed (not retried: it would hang again).
- An actor that fails to start (its node was lost, a source is missing there) is started again
  with backoff (1 s doubling to 60 s) for as long as the run lasts; an actor waiting for
  resources (the cluster is full) simply waits, and starts when a node joins. The search runs
  with as many workers as are up: it starts with the first, and uses each as it comes up.
- If every actor's first start fails in its own code (a bad task name, an unreadable source),
  or no worker is up for ``worker_timeout`` seconds, the pool raises :class:`NoWorkers`.
- A thread asks the cluster's head (the GCS) every 2 s whether it answers; after
  ``head_timeout`` seconds without an answer the pool raises :class:`ClusterLost` and makes no
  further Ray call (none would return), so the controller can record the run and exit.

Local directories (sources, the zoo, task dirs) reach workers on other nodes through
:mod:`evomerge.shipping`: a file server actor on the controller's node serves them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from evomerge.errors import ClusterLost, ConfigError, NoWorkers
from evomerge.shipping import DirManifest, FileServer, Mode, localize, run_manifests
from evomerge.worker import EvalRequest, EvalResult, TrialWorker, WorkerSpec

log = logging.getLogger(__name__)

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "GIT_DIR": os.devnull, "TQDM_DISABLE": "1"}
HEAD_CHECK_S = 2.0  # how often the head is asked whether it answers
BACKOFF_S = (1.0, 60.0)  # a failed worker start is tried again after 1 s, doubling up to 60 s
_START_FAILED = "evomerge worker start failed: "


class _StartFailed(Exception):
    """A worker's start-up failed in its own code; the message is one line naming the node."""


@ray.remote(num_cpus=0)
class _FileServerActor:
    """Serves the run's local directories from the controller's node (see :mod:`evomerge.shipping`)."""

    def __init__(self, manifests: tuple[DirManifest, ...]) -> None:
        self._server = FileServer(manifests)

    def read(self, path: str, rel: str, offset: int, length: int) -> bytes:
        return self._server.read(path, rel, offset, length)


@ray.remote
class _WorkerActor:
    def __init__(self, factory: Callable[[WorkerSpec], Any], spec: WorkerSpec, manifests: tuple[DirManifest, ...],
                 server: Any, ship: Mode) -> None:
        for key, value in WORKER_ENV.items():
            os.environ.setdefault(key, value)
        context = ray.get_runtime_context()
        node_id = context.get_node_id()
        self.node = f"{ray.util.get_node_ip_address()} ({node_id[:8]})"
        self.label = f"{socket.gethostname()}:{os.getpid()}@{node_id[:8]}"
        self.notes: list[str] = []
        try:
            # threads from this worker's own CPU allotment on its node, unless the experiment names them
            threads = spec.threads or max(1, int(context.get_assigned_resources().get("CPU", 1)))
            fetch = (lambda path, rel, offset, length: ray.get(server.read.remote(path, rel, offset, length))) \
                if server is not None else None
            where, self.notes = localize(manifests, fetch, ship, self.node)
            spec = replace(spec, threads=threads, model_dirs={k: where.get(v, v) for k, v in spec.model_dirs.items()},
                           task_paths=tuple(where.get(p, p) for p in spec.task_paths))
            self._worker = factory(spec)
        except Exception as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            if not text.startswith(f"node {self.node}"):
                text = f"node {self.node}: {type(exc).__name__}: {text}"
            raise _StartFailed(_START_FAILED + text) from None

    def ready(self) -> dict[str, Any]:
        notes, self.notes = self.notes, []  # said once (ready() also probes an actor out of reach)
        return {"worker": self.label, "node": self.node, "notes": notes}

    def run(self, request: EvalRequest) -> EvalResult:
        result = self._worker.run(request)
        result.worker = self.label
        return result


def connect(address: Optional[str], num_cpus: int, head_timeout: float) -> bool:
    """Join the Ray cluster at ``address``, or start a private local instance (``None`` / ``local``)
    with ``num_cpus`` CPU slots, unless this process already did; True if it was done here.

    A local instance is this run's own whatever else runs on the machine (a ``ray start`` head,
    a stale ``ray_current_cluster`` file). Joining an authenticated cluster sends the token found
    where Ray keeps it (see :func:`evomerge.dispatch.ray_jobs.auth_token`) with no other setting.
    """
    if ray.is_initialized():
        return False
    # Ray ends a driver that has not reached the head for 60 s, with exit code 0 or 1; the pool's
    # own watch (head_timeout) must decide first, so that the run is recorded as interrupted
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(int(head_timeout + 60)))
    if address in (None, "local"):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, runtime_env={"env_vars": dict(WORKER_ENV)})
        return True
    from evomerge.dispatch.ray_jobs import auth_token

    if "RAY_AUTH_MODE" not in os.environ and auth_token()[0]:
        # Ray's driver sends its token only in this mode, read from a config cached at import
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")
    _probe(address, head_timeout)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        raise ClusterLost(f"cannot join the Ray cluster at {address}: {_first_line(exc)}") from None
    return True


def _probe(address: str, timeout: float) -> None:
    """ClusterLost unless something listens at a ``HOST:PORT`` address within ``timeout`` seconds
    (``ray.init`` would otherwise try for minutes). Other forms (``auto``, ``ray://``) go to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ClusterLost(f"no Ray head answers at {address} ({exc.strerror or exc}) after "
                                  f"{timeout:g} s (dispatch.head_timeout)") from None
            time.sleep(1.0)


class _HeadWatch:
    """Asks the head (GCS) every 2 s whether it answers; ``silent_for()`` is how long it has not.

    It uses the driver's own GCS client (an internal KV read with a 5 s timeout), a private part
    of Ray: if a Ray upgrade moves it, the watch says so once and stands down (``silent_for`` is
    then 0) rather than calling a live head lost; tests/test_cluster_faults.py fails then.
    """

    def __init__(self, notify: Callable[[str], None]) -> None:
        self._last_answer = time.monotonic()
        self._notify = notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="evomerge-head-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            from ray._private.worker import global_worker

            ask = global_worker.gcs_client.internal_kv_get
        except (ImportError, AttributeError) as exc:
            self._notify(f"cannot watch the Ray head ({type(exc).__name__}: {exc}): a lost head is noticed only "
                         "when Ray ends this process")
            self._stop.set()
        while not self._stop.is_set():
            try:
                ask(b"evomerge-head-check", b"evomerge", timeout=5.0)
                self._last_answer = time.monotonic()
            except Exception:  # a timeout, an RPC error: the head did not answer
                pass
            self._stop.wait(HEAD_CHECK_S)

    def silent_for(self) -> float:
        return 0.0 if self._stop.is_set() else time.monotonic() - self._last_answer

    def stop(self) -> None:
        self._stop.set()


@dataclass
class _Slot:
    """One of the pool's ``num_workers`` places: its actor and how its starts went."""

    index: int
    actor: Any = None
    failures: int = 0  # start failures in a row
    due: float = 0.0  # when a failed start is tried again
    last_error: str = ""
    started: float = 0.0  # when its actor was asked for


class RayDispatcher:
    """Keeps ``num_workers`` actors busy with queued requests, replacing those that are lost."""

    def __init__(
        self,
        spec: WorkerSpec,
        num_workers: int,
        *,
        address: Optional[str] = None,
        cpus_per_worker: Optional[float] = None,
        gpus_per_worker: float = 0.0,
        max_retries: int = 2,
        trial_timeout: Optional[float] = None,
        head_timeout: float = 30.0,
        worker_timeout: float = 300.0,
        ship_sources: Mode = "auto",
        worker_factory: Callable[[WorkerSpec], Any] = TrialWorker,
        notify: Optional[Callable[[str], None]] = None,
    ) -> None:
        local = address in (None, "local")
        cores = os.cpu_count() or 1
        cpus = cpus_per_worker or (max(1, cores // num_workers) if local else 1)
        self._owns_ray = connect(address, max(cores, int(num_workers * cpus + 0.999)), head_timeout)
        self.address = address or "local"
        self.num_workers = num_workers
        self._notify = notify or (lambda line: log.warning("%s", line))
        self._max_retries = max_retries
        self._timeout = trial_timeout
        self._head_timeout = head_timeout
        self._worker_timeout = worker_timeout
        self._lost: Optional[str] = None  # why the cluster was given up (then no Ray call is made)
        self._last_said = ""  # the last start failure reported
        self._up_seconds, self._up_since = 0.0, time.monotonic()  # live worker-seconds, integrated
        self._idle: deque = deque()
        self._queue: deque[EvalRequest] = deque()
        self._running: dict[Any, tuple[_Slot, EvalRequest, float]] = {}  # ObjectRef -> (slot, request, started)
        self._attempts: dict[tuple[str, int], int] = {}
        self._ready: list[EvalResult] = []
        # actors still starting (ready() ref -> slot): they get work once they are up, so a trial's
        # timeout never counts an actor's start-up (imports, loading the sources)
        self._starting: dict[Any, _Slot] = {}
        self._server = None
        self._watch: Optional[_HeadWatch] = None
        try:
            self._check_resources(gpus_per_worker)
            self._options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus_per_worker, "max_concurrency": 1}
            here = ray.get_runtime_context().get_node_id()
            if not local:  # which node's loss would take the controller with it
                self._notify(f"the controller is on Ray node {ray.util.get_node_ip_address()} ({here[:8]})")
            manifests = run_manifests(spec.model_dirs, spec.task_paths)
            # a local instance's workers are on this machine: they fetch nothing unless told to
            if manifests and (ship_sources == "always" or (ship_sources == "auto" and not local)):
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                self._server = _FileServerActor.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote(manifests)
            self._make = lambda: _WorkerActor.options(**self._options).remote(
                worker_factory, spec, manifests, self._server, ship_sources)
            self._watch = _HeadWatch(self._notify)
            self._slots = [_Slot(i) for i in range(num_workers)]
            for slot in self._slots:
                self._start(slot)
            self._last_live = time.monotonic()
            self._first_worker()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the pool
    def _check_resources(self, gpus: float) -> None:
        if gpus > 0 and not ray.cluster_resources().get("GPU", 0):
            where = "this machine's Ray instance" if self.address == "local" else f"the Ray cluster at {self.address}"
            raise ConfigError([f"dispatch: each worker asks for {gpus:g} GPU (device cuda), but {where} has no GPU; "
                               "run it on a cluster with GPU nodes (--address), or set dispatch.device: cpu"])

    def _start(self, slot: _Slot) -> None:
        slot.actor = self._make()
        slot.started = time.monotonic()
        self._starting[slot.actor.ready.remote()] = slot

    def _first_worker(self) -> None:
        """Wait until one worker is up (the others join the search as they come up)."""
        while not self._idle:
            if all(s.failures and s.last_error.startswith(_START_FAILED) for s in self._slots):
                # every first start failed in the worker's own code: another try would fail alike
                raise NoWorkers(f"no worker could start: {_strip(self._slots[0].last_error)}")
            self._tend(timeout=1.0)

    def _tend(self, timeout: float) -> list[Any]:
        """Check the head, start what is due, wait up to ``timeout`` for a start or a result; the
        finished trial refs (starts are handled here)."""
        self._check_head()
        now = time.monotonic()
        for slot in self._slots:
            if slot.actor is None and slot.due <= now:
                self._start(slot)
        if self._idle or self._running:
            self._last_live = now
        elif now - self._last_live > self._worker_timeout:
            last = next((s.last_error for s in self._slots if s.last_error), "")
            why = f"the last start failed: {_strip(last)}" if last else (
                f"none started: no node has {self._options['num_cpus']:g} CPU and {self._options['num_gpus']:g} "
                "GPU free for one (dispatch.cpus_per_worker / gpus_per_worker)")
            raise NoWorkers(f"no worker has run for {self._worker_timeout:g} s (dispatch.worker_timeout); {why}")
        watched = [*self._running, *self._starting]
        if not watched:
            time.sleep(min(timeout, max(0.0, min((s.due for s in self._slots if s.actor is None), default=now) - now)))
            return []
        done, _ = ray.wait(watched, num_returns=1, timeout=timeout)
        if done:  # everything else already finished too
            more, _ = ray.wait(watched, num_returns=len(watched), timeout=0)
            done = list({r: None for r in [*done, *more]})
        self._check_head()
        finished = []
        for ref in done:
            if ref in self._starting:
                self._started(ref)
            else:
                finished.append(ref)
        return finished

    def _started(self, ref) -> None:
        slot = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except RayError as exc:
            ray.kill(slot.actor)  # one that is only out of reach may still hold resources
            self._start_failed(slot, exc)
            return
        took = time.monotonic() - slot.started
        if slot.failures:
            self._notify(f"worker {slot.index + 1} is up again on node {info['node']} after {slot.failures} "
                         f"failed start(s)")
        elif took > 10:  # loading big sources: say when each worker is ready
            self._notify(f"worker {slot.index + 1} ready on node {info['node']} ({took:.0f} s)")
        slot.failures, slot.last_error = 0, ""
        for note in info["notes"]:
            self._notify(note)
        self.worker_seconds()  # the live count changes: integrate up to now
        self._idle.append(slot)

    def _start_failed(self, slot: _Slot, exc: BaseException) -> None:
        reason = _root_cause(exc)
        slot.failures += 1
        slot.last_error = reason
        slot.actor = None
        delay = min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (slot.failures - 1))
        slot.due = time.monotonic() + delay
        if slot.failures & (slot.failures - 1) == 0:  # its 1st, 2nd, 4th, 8th ... failure
            said = "the same reason as above" if reason == self._last_said else _strip(reason)
            self._last_said = reason
            self._notify(f"worker {slot.index + 1} could not start ({said}); trying again in {delay:g} s")

    def _replace(self, slot: _Slot) -> None:
        """Start a new actor in place of a dead or killed one; it takes work once ready."""
        slot.actor = None
        slot.due = 0.0

    def _check_head(self) -> None:
        if self._lost is None and self._watch is not None and self._watch.silent_for() > self._head_timeout:
            self._lost = (f"the Ray head at {self.address} has not answered for {self._head_timeout:g} s "
                          "(dispatch.head_timeout): the head or the network to it is gone")
        if self._lost is not None:
            raise ClusterLost(self._lost)

    # ------------------------------------------------------------------ the Dispatcher protocol
    def submit(self, request: EvalRequest) -> None:
        self._queue.append(request)
        self._pump()

    def pending(self) -> int:
        return len(self._queue) + len(self._running) + len(self._ready)

    def worker_seconds(self) -> float:
        now = time.monotonic()
        self._up_seconds += (len(self._idle) + len(self._running)) * (now - self._up_since)
        self._up_since = now
        return self._up_seconds

    def worker_counts(self) -> dict[str, int]:
        """Workers up (idle or busy), starting (or waiting for resources), and waiting to be started again."""
        live = len(self._idle) + len(self._running)
        return {"target": self.num_workers, "live": live, "starting": len(self._starting),
                "restarting": self.num_workers - live - len(self._starting)}

    def _pump(self) -> None:
        while self._idle and self._queue:
            slot = self._idle.popleft()
            request = self._queue.popleft()
            self._running[slot.actor.run.remote(request)] = (slot, request, time.monotonic())

    def wait(self, timeout: float | None = None) -> list[EvalResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready and (self._running or self._queue):
            step = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if self._timeout is not None and self._running:
                first_deadline = min(t for _, _, t in self._running.values()) + self._timeout
                step = min(step, max(0.0, first_deadline - time.monotonic()))
            for ref in self._tend(step):
                self.worker_seconds()  # the live count may change: integrate up to now
                slot, request, _ = self._running.pop(ref)
                try:
                    result = ray.get(ref)
                    result.attempts = self._attempts.pop(_key(request), 0) + 1
                    self._ready.append(result)
                    self._idle.append(slot)
                except RayActorError as exc:
                    self._on_actor_death(slot, request, exc)
                except RayError as exc:
                    self._idle.append(slot)
                    self._ready.append(_failed(request, f"ray error: {_root_cause(exc)}"))
            self._expire()
            self._pump()
            if deadline is not None and time.monotonic() >= deadline:
                break
        self._pump()
        out, self._ready = self._ready, []
        return out

    def _expire(self) -> None:
        """Stop trials that ran past the timeout: kill and replace their actor, report them failed."""
        if self._timeout is None:
            return
        now = time.monotonic()
        for ref, (slot, request, started) in list(self._running.items()):
            if now - started >= self._timeout:
                self.worker_seconds()
                del self._running[ref]
                ray.kill(slot.actor)
                self._replace(slot)
                self._ready.append(_failed(request, f"timed out after {self._timeout:g} s (dispatch.trial_timeout)"))

    def _on_actor_death(self, slot: _Slot, request: EvalRequest, exc: Exception) -> None:
        attempts = self._attempts.get(_key(request), 0) + 1
        self._attempts[_key(request)] = attempts
        if isinstance(exc, ActorUnavailableError):
            # out of reach for now (its node's raylet, the network): the trial goes elsewhere, and the
            # actor takes work again if it answers, else it is started again (see _started)
            self._notify(f"worker {slot.index + 1} stopped answering during trial {request.trial_id} (attempt "
                         f"{attempts}); the trial goes to another worker")
            self._starting[slot.actor.ready.remote()] = slot
        else:
            self._notify(f"worker {slot.index + 1} was lost during trial {request.trial_id} (attempt {attempts}): "
                         f"{_lost(exc)}; starting another")
            self._replace(slot)
        if attempts <= self._max_retries:
            self._queue.appendleft(request)
        else:
            del self._attempts[_key(request)]
            result = _failed(request, f"worker died {attempts} times: {_root_cause(exc)}")
            result.attempts = attempts
            self._ready.append(result)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if self._lost is None:  # with the head gone a Ray call can block for good: leave it to the process's end
            actors = [s.actor for s, _, _ in self._running.values()] + [s.actor for s in self._idle]
            actors += [s.actor for s in self._starting.values()] + ([self._server] if self._server else [])
            for actor in actors:
                ray.kill(actor)
        self._running.clear()
        self._idle.clear()
        self._starting.clear()
        if self._owns_ray and self._lost is None:
            ray.shutdown()

    @property
    def abandoned(self) -> bool:
        """The cluster was given up: this process's Ray connection is unusable (exit without Ray's cleanup)."""
        return self._lost is not None


def _key(request: EvalRequest) -> tuple[str, int]:
    return (request.split, request.trial_id)


def _failed(request: EvalRequest, reason: str) -> EvalResult:
    return EvalResult(trial_id=request.trial_id, state="failed", error=reason, split=request.split)


def _root_cause(exc: BaseException) -> str:
    text = str(exc)
    if _START_FAILED in text:  # a worker's own start-up error: its one line
        return _START_FAILED + text.split(_START_FAILED, 1)[1].strip().splitlines()[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if "never ran" in text or "cancelled before it started" in text:
        return "its node was lost before it started (the actor never ran)"
    return lines[-1] if lines else type(exc).__name__


def _lost(exc: BaseException) -> str:
    """Why an actor was lost, in a few words."""
    text = str(exc)
    if "unavailable" in text or "Socket closed" in text or "node" in text.lower():
        return "its process or node stopped answering"
    return _root_cause(exc)[:200]


def _strip(reason: str) -> str:
    return reason[len(_START_FAILED):] if reason.startswith(_START_FAILED) else reason


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
