"""MLflow tracking (the only module that imports ``mlflow``).

One MLflow run per evomerge run. Per-trial values are *stepped metrics* on that
run (step = order of completion; the trial id is the metric `trial_id`), drawn as curves; logged with
``MlflowClient.log_batch`` (one call per batch of finished trials).

MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits up
to 120 s for an answer (``MLFLOW_HTTP_REQUEST_*``): about 4 minutes per call against a dead
server. The calls made here use their own, shorter settings (``_HTTP_START``, ``_HTTP_LOG``)
unless those variables are set in the environment; ``GuardedTracker`` makes every call
after ``start`` off the controller's thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from evomerge.tracking.base import run_url

# MLflow 3's UI labels an experiment with this tag as "Machine learning" and picks the model-training
# view for it when the URL names no view; a URL that carries workflowType=genai (the home page's
# links) still wins, so `evomerge ui` prints URLs with workflowType=machine_learning (tracking.run_url).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

# MLflow reads these on every request (mlflow.utils.rest_utils.http_request), not at import.
# start() is on the search's critical path: one try, a short timeout, then the run goes on without
# tracking. Later calls run on GuardedTracker's thread: a few quick retries ride out a blip.
_HTTP_START = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
_HTTP_LOG = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_HTTP_LOCK = threading.Lock()


@contextlib.contextmanager
def _http(settings: Mapping[str, str]):
    """MLflow's HTTP settings for the calls inside, where the environment does not set them already
    (an explicit ``MLFLOW_HTTP_REQUEST_*`` wins). The environment is the process's: one call at a time."""
    with _HTTP_LOCK:
        added = [k for k in settings if k not in os.environ]
        os.environ.update({k: settings[k] for k in added})
        try:
            yield
        finally:
            for k in added:
                os.environ.pop(k, None)


class MlflowTracker:
    def __init__(self, tracking_uri: str, experiment_name: str, run_id: Optional[str] = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_id = run_id
        self.experiment_id = ""
        self._lazy_client: Optional[MlflowClient] = None

    @property
    def _client(self) -> MlflowClient:
        # made on first use, so an unusable store fails inside start() (guarded), not at construction
        if self._lazy_client is None:
            self._lazy_client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._lazy_client

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        with _http(_HTTP_START):
            return self._start(run_name, params, tags)

    def _start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        if self.run_id is None:
            exp = self._client.get_experiment_by_name(self.experiment_name)
            exp_id = exp.experiment_id if exp else self._client.create_experiment(
                self.experiment_name, artifact_location=_artifact_location(self.tracking_uri),
                tags={EXPERIMENT_KIND: MODEL_TRAINING})
            if exp is not None and EXPERIMENT_KIND not in exp.tags:  # made by an older evomerge, or by hand
                self._client.set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_TRAINING)
            run = self._client.create_run(exp_id, run_name=run_name, tags=dict(tags))
            self.run_id = run.info.run_id
            self.experiment_id = exp_id
            items = [Param(k, _param_text(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[i : i + 100])
        else:
            self._client.update_run(self.run_id, status="RUNNING")
            self.experiment_id = self._client.get_run(self.run_id).info.experiment_id
            self._relocate_artifacts()
        return self.run_id

    def _relocate_artifacts(self) -> None:
        """A run dir that was copied or moved: its sqlite store still names the old dir's artifact
        folder (MLflow keeps absolute artifact URIs), so plots logged now would land there. Point
        the experiment and the run at this store's own ``mlartifacts`` (the copy holds the earlier
        artifacts already). Only for a sqlite store, which is the run dir's own file."""
        here = _artifact_location(self.tracking_uri)
        if here is None:
            return
        old_root = self._client.get_experiment(self.experiment_id).artifact_location
        if old_root == here:
            return
        old_uri = self._client.get_run(self.run_id).info.artifact_uri
        import sqlite3

        with sqlite3.connect(self.tracking_uri[len("sqlite:///"):]) as db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                       (here, int(self.experiment_id)))
            if old_uri.startswith(old_root):
                db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?",
                           (here + old_uri[len(old_root):], self.run_id))

    def logged_trials(self) -> int:
        with _http(_HTTP_LOG):
            return len(self._client.get_metric_history(self.run_id, "trial_id"))

    def log_trials(self, trials: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        now = int(time.time() * 1000)
        batch: list[Metric] = []
        with _http(_HTTP_LOG):
            for step, metrics in trials:
                items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
                # MLflow's per-request limit is 1000 metrics; a trial is never split across requests
                if batch and len(batch) + len(items) > 1000:
                    self._client.log_batch(self.run_id, metrics=batch)
                    batch = []
                batch.extend(items)
            for i in range(0, len(batch), 1000):
                self._client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        with _http(_HTTP_LOG):
            self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        with _http(_HTTP_LOG):
            self._client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        # MLflow would print "View run at ..." on stdout for server stores; stdout is for results
        # (--json), and redirecting it would catch the controller's output too (this runs on
        # GuardedTracker's thread), so the link goes to stderr from here
        with _http({**_HTTP_LOG, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):
            self._client.set_terminated(self.run_id, status=status)
        if self.tracking_uri.startswith(("http://", "https://")) and self.experiment_id:
            print(f"View run at: {run_url(self.tracking_uri, self.experiment_id, self.run_id)}",
                  file=sys.stderr, flush=True)

    @property
    def run_url_hint(self) -> str:
        return f"{self.tracking_uri} (experiment {self.experiment_name!r}, run {self.run_id})"


def _artifact_location(tracking_uri: str) -> Optional[str]:
    """Artifacts of a sqlite store go next to its database (``<db dir>/mlartifacts``), not into
    ``./mlruns`` under whatever directory the run was started from (MLflow's default); a
    server decides for itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()


def _param_text(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 6000 else text[:5997] + "..."


def read_run(tracking_uri: str, run_id: str) -> dict:
    """A run's params, latest metrics, metric histories and artifact names (used by tests and `status`)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    histories = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
    return {
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "history": histories,
        "artifacts": [a.path for a in client.list_artifacts(run_id)],
        "experiment_name": client.get_experiment(run.info.experiment_id).name,
    }


def register_model(tracking_uri: str, run_id: str, model_dir: Path, name: str) -> tuple[str, str]:
    """Log a model dir as the run's ``model`` artifacts and register it as a new version of
    ``name`` in the MLflow model registry; returns (name, version)."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Merged model found by evomerge")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={"evomerge.model_dir": str(model_dir)})
    return name, str(version.version)
