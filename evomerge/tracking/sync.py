"""`evomerge sync RUN_DIR`: upload what a run's ledger holds and its tracker lacks.

A run whose MLflow server was unreachable (at the start, or for a while) went on with its
ledger (``GuardedTracker``). ``sync_run`` opens the run's MLflow run — or creates it, when
the server was down from the start — logs every trial from the first step MLflow lacks,
the baseline and test scores, the artifacts (experiment, summary, ledger, best recipe,
Pareto front, plots) and the run's final status, and records the MLflow run in ``run.json``.
It does not touch a run that is still in progress (that run logs itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from evomerge.errors import EvomergeError

_STATUS = {"finished": "FINISHED", "killed": "KILLED", "failed": "FAILED", "interrupted": "KILLED"}


def sync_run(run_dir: Path, tracking_uri: Optional[str] = None) -> dict[str, Any]:
    from evomerge import __version__
    from evomerge.plots import write_plots
    from evomerge.run_dir import RunLock, artifacts, load_run_experiment, open_ledger, read_info, write_info
    from evomerge.tracking.metrics import trial_metric_rows
    from evomerge.selection import selection_metrics, winner
    from evomerge.tracking import build_tracker

    run_dir = Path(run_dir)
    exp = load_run_experiment(run_dir)
    if RunLock.is_held(run_dir):
        raise EvomergeError(f"{run_dir} is running; it logs to MLflow itself (sync it after it stops)")
    info = read_info(run_dir)
    uri = tracking_uri or info.get("tracking_uri")
    if not uri:
        raise EvomergeError(f"{run_dir} has no tracking URI; pass --tracking-uri")
    if exp.tracking.backend == "none" and not tracking_uri:
        raise EvomergeError(f"{run_dir} ran with tracking.backend: none; pass --tracking-uri to upload it anyway")
    same_store = uri == info.get("tracking_uri")
    cfg = exp.tracking.model_copy(update={"backend": "mlflow"})
    tracker = build_tracker(cfg, tracking_uri=uri, experiment_name=exp.tracking.experiment_name or exp.name,
                            run_id=(info.get("mlflow_run_id") or None) if same_store else None)
    run_id = tracker.start(info.get("run_id", run_dir.name),
                           params={"experiment": exp.name, "optimizer": exp.optimizer.name,
                                   "max_trials": exp.budget.max_trials, "seed": exp.optimizer.seed,
                                   "popsize": info.get("popsize"), "islands": info.get("islands")},
                           tags={"evomerge.version": __version__, "evomerge.experiment": exp.name,
                                 "evomerge.run_dir": str(run_dir.resolve()),
                                 "evomerge.seed": str(exp.optimizer.seed), "evomerge.synced": "true"})
    records = open_ledger(run_dir).records()
    trials = [r for r in records if r.get("kind") == "trial"]
    logged = tracker.logged_trials()
    rows = trial_metric_rows(trials, exp.optimizer.objectives == "per_task", logged)
    if rows:
        tracker.log_trials(rows)
    done = [r for r in records if r.get("state") == "complete"]
    baselines = {r["model"]: r["fitness"] for r in done if r.get("kind") == "baseline"}
    tests = {r["model"]: r["fitness"] for r in done if r.get("kind") == "test"}
    best, chosen = winner(records)
    summary = {f"baseline.{k}": v for k, v in baselines.items()} | {f"test.{k}": v for k, v in tests.items()}
    if chosen is not None:
        summary |= selection_metrics(chosen)
    if best is not None:
        summary["best_fitness_final"] = best["fitness"]
    if summary:
        tracker.log_summary(summary)
    plots = write_plots(run_dir, info.get("run_id", run_dir.name), trials, baselines,
                        (best["trial_id"], best["recipe"]) if best else None)
    for path in artifacts(run_dir) + [p for p in plots if p.exists()]:
        tracker.log_artifact(path)
    state = info.get("status", "finished")
    tracker.finish(_STATUS.get(state, "FINISHED"))
    info.update({"tracking_uri": uri, "mlflow_run_id": run_id,
                 "mlflow_experiment_id": getattr(tracker, "experiment_id", "") or info.get("mlflow_experiment_id", "")})
    info.pop("tracking_error", None)
    write_info(run_dir, info)
    return {"run_dir": str(run_dir), "tracking_uri": uri, "mlflow_run_id": run_id,
            "trials_uploaded": len(rows), "trials": len(trials), "status": state}
