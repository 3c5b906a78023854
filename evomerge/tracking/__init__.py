"""Trackers: MLflow, or none."""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Optional

from evomerge.config import TrackingConfig
from evomerge.tracking.base import Tracker, run_url  # noqa: F401  (run_url: evomerge.tracking.run_url)


def default_tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite store inside the run dir."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def build_tracker(cfg: TrackingConfig, *, tracking_uri: str, experiment_name: str, run_id: Optional[str] = None) -> Tracker:
    if cfg.backend == "none":
        from evomerge.tracking.null import NullTracker

        return NullTracker()
    from evomerge.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(tracking_uri, experiment_name, run_id=run_id)


class _Job:
    """One tracker call for the uploader thread; ``done`` is set once it ran (or was dropped)."""

    __slots__ = ("what", "fn", "args", "result", "done")

    def __init__(self, what: str, fn, args: tuple) -> None:
        self.what, self.fn, self.args = what, fn, args
        self.result = None
        self.done = threading.Event()


class GuardedTracker:
    """Wraps a tracker so that tracking never stops, nor slows, a search.

    ``start`` runs on the caller's thread (it returns the tracker's run id, which goes into
    ``run.json``); the tracker keeps it short (``MlflowTracker``: no retries, a short timeout).
    Every later call runs on one daemon thread, in order, fed through a bounded queue: the
    controller hands over a call and goes on, it never waits on HTTP. ``logged_trials`` waits
    for its answer at most ``ask_seconds``; ``finish`` waits at most ``drain_seconds`` for the
    queued calls to go through.

    The ledger already holds everything; on the first failure (server down, disk full, a full
    queue, a wait that ran out) tracking is switched off for the rest of the process and the
    calls not yet made are dropped, so MLflow holds a prefix of the run's trials. The failure
    is reported once through ``warn``, on the caller's thread, and kept in ``error``
    (``run.json``'s ``tracking_error``); ``evomerge resume`` and ``evomerge sync`` log the
    trials the tracker missed.
    """

    queue_size = 1000  # calls waiting for the tracker; more means the search outruns the server
    ask_seconds = 30.0  # the longest logged_trials waits for its answer
    drain_seconds = 30.0  # the longest finish waits for the calls queued before it

    def __init__(self, inner: Tracker, warn) -> None:
        self.inner = inner
        self.warn = warn
        self.error: Optional[str] = None
        self._warned = False
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ failures
    def _fail(self, what: str, why: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = f"{what}: {why}"

    def _report(self) -> None:
        """Warn once, on the caller's thread, when tracking went off (maybe on the uploader's)."""
        if self.error is not None and not self._warned:
            self._warned = True
            self.warn(f"tracking is off for the rest of this run ({self.error}); the ledger has every "
                      "trial and `evomerge sync RUN_DIR` (or `evomerge resume`) logs the missing ones")

    def _call(self, what: str, fn, *args, default=None):
        if self.error is not None:
            return default
        try:
            return fn(*args)
        except Exception as exc:  # any tracker failure: keep searching, the ledger has it
            self._fail(what, f"{type(exc).__name__}: {exc}")
            return default

    # ------------------------------------------------------------------ the uploader thread
    def _post(self, what: str, fn, *args) -> Optional[_Job]:
        """Queue a call for the uploader thread; never waits."""
        self._report()
        if self.error is not None:
            return None
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="evomerge-tracker", daemon=True)
            self._thread.start()
        job = _Job(what, fn, args)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._fail(what, f"{self.queue_size} tracking calls were waiting for the tracker")
            self._report()
            return None
        return job

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            if self.error is None:  # after a failure the rest is dropped: MLflow keeps a prefix
                job.result = self._call(job.what, job.fn, *job.args)
            job.done.set()
            if job.what == "finish":  # nothing follows
                return

    def _wait(self, job: Optional[_Job], seconds: float, what: str, default=None):
        if job is None:
            return default
        if not job.done.wait(seconds):
            self._fail(what, f"no answer from the tracker within {seconds:g} s "
                             f"({self._queue.qsize()} more calls waiting)")
        self._report()
        return job.result if self.error is None else default

    # ------------------------------------------------------------------ the Tracker calls
    def start(self, run_name, params, tags) -> str:
        run_id = self._call("start", self.inner.start, run_name, params, tags, default="")
        self._report()
        return run_id

    def logged_trials(self) -> int:
        return self._wait(self._post("logged_trials", self.inner.logged_trials), self.ask_seconds,
                          "logged_trials", default=0)

    def log_trials(self, trials) -> None:
        self._post("log_trials", self.inner.log_trials, list(trials))

    def log_summary(self, metrics) -> None:
        self._post("log_summary", self.inner.log_summary, dict(metrics))

    def log_artifact(self, path) -> None:
        self._post("log_artifact", self.inner.log_artifact, path)

    def finish(self, status) -> None:
        self._wait(self._post("finish", self.inner.finish, status), self.drain_seconds, "finish")


__all__ = ["GuardedTracker", "Tracker", "build_tracker", "default_tracking_uri"]
