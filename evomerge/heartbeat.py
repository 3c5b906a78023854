"""The run's heartbeat: evidence, readable from any machine, that a run's controller is alive.

While a controller works on a run, a thread rewrites ``heartbeat.json`` in the run dir every
``INTERVAL`` seconds: the time, the controller's host and pid, and its worker pool's counts
(live, starting, restarting, of how many). ``status`` decides from it and from the run's lock
whether a run that ``run.json`` calls running still is (:func:`liveness`):

- on the controller's own host the lock decides (an flock dies with its process, even on
  SIGKILL): not held means the controller is gone;
- on any other host (a laptop reading the shared volume, a pod of another node, a file system
  whose locks are local to each machine) the heartbeat decides: older than ``STALE_AFTER``
  seconds means the controller (or its whole machine) is gone.

A controller that is alive but whose heartbeat is stale (stopped, swapping) stays running on
its host, with the heartbeat's age shown. Clocks of different hosts are assumed to agree to
within a few seconds; ``STALE_AFTER`` is six intervals.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from evomerge.run_dir import RunLock, heartbeat_path, write_json_atomic

INTERVAL = 5.0
STALE_AFTER = 30.0


class Heartbeat:
    """Writes the run's heartbeat every ``interval`` seconds from a daemon thread until stopped."""

    def __init__(self, run_dir: Path, interval: float = INTERVAL) -> None:
        self.path = heartbeat_path(run_dir)
        self.interval = interval
        self._workers: Optional[Callable[[], dict[str, int]]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="evomerge-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._write()
        self._thread.start()
        return self

    def watch(self, workers: Callable[[], dict[str, int]]) -> None:
        """Report the worker pool's counts (``live``, ``starting``, ...) with every beat."""
        self._workers = workers
        self._write()

    def _write(self) -> None:
        beat: dict[str, Any] = {"at": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        if self._workers is not None:
            try:
                beat["workers"] = dict(self._workers())
            except Exception:  # the pool's state is changing under us: report it next time
                pass
        try:
            write_json_atomic(self.path, beat)
        except OSError:
            pass  # a full or unreachable disk: the ledger's own writes report that

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)


def read_heartbeat(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(heartbeat_path(run_dir).read_text())
    except (OSError, ValueError):
        return None


def liveness(run_dir: Path, info: dict[str, Any]) -> tuple[bool, str]:
    """Whether the controller of a run that ``run.json`` calls running is alive, and why not (or a
    note on an alive one's stale heartbeat)."""
    beat = read_heartbeat(run_dir)
    host = (beat or info).get("host")
    pid = (beat or info).get("pid")
    who = f"pid {pid} on {host}" if host else "its controller"
    age = time.time() - float(beat["at"]) if beat else None
    here = host == socket.gethostname()
    if RunLock.is_held(run_dir):
        if age is not None and age > STALE_AFTER:
            return True, f"no heartbeat for {age:.0f} s: the controller ({who}) may be stopped or hung"
        return True, ""
    if beat is None or here:
        return False, f"its controller ({who}) is gone"
    if age > STALE_AFTER:
        return False, f"its controller ({who}) is gone: no heartbeat for {age:.0f} s"
    return True, ""
