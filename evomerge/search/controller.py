"""The controller: one experiment into one run directory, or a run resumed, start to end.

It turns the experiment into its parts (worker spec, codec, islands of optimizers, the score
cache, the tracker), rebuilds the run's state from the ledger on resume, starts the workers,
hands the state to the loop (:mod:`evomerge.search.loop`), and records how the run ended —
finished, failed, interrupted or killed, with the reason — in ``run.json``, whatever happens.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

from evomerge import __version__
from evomerge.config import Experiment
from evomerge.dispatch.base import Dispatcher
from evomerge.errors import ConfigError, EvomergeError, RunInterrupted
from evomerge.fitness_cache import FitnessCache
from evomerge.heartbeat import Heartbeat
from evomerge.islands import build_islands
from evomerge.ledger import DAMAGED, Ledger
from evomerge.optimize import build_optimizer
from evomerge.plots import write_plots
from evomerge.run_dir import (RUN_INFO, RunLock, artifacts, experiment_path, has_info, has_ledger,
                              load_run_experiment, open_ledger, read_experiment_data, read_info, write_experiment,
                              write_info, write_summary)
from evomerge.search.loop import Search
from evomerge.search.progress import NoProgress, Progress
from evomerge.search.run_state import RunState
from evomerge.search.score_cache import ScoreCache
from evomerge.search.summary import RunSummary
from evomerge.search.work import failure_reason
from evomerge.tracking import GuardedTracker, build_tracker, default_tracking_uri
from evomerge.wiring import (build_codec, build_dispatcher, cluster_address, resolve_worker_spec, source_problems,
                             suite_problems)
from evomerge.worker import TrialWorker, WorkerSpec


class Controller:
    """Runs one experiment into one run directory, or resumes it."""

    def __init__(
        self,
        exp: Experiment,
        run_dir: Path,
        *,
        progress: Optional[Progress] = None,
        worker_factory: Callable[[WorkerSpec], Any] = TrialWorker,
        dispatcher_factory: Optional[Callable[[Experiment, WorkerSpec], Dispatcher]] = None,
        source: Optional[Path] = None,
        address: Optional[str] = None,
    ) -> None:
        """``worker_factory`` builds a worker from its spec inside each worker process;
        ``dispatcher_factory`` replaces the experiment's dispatcher (simulations); ``source``:
        the experiment file as the user wrote it (kept and logged next to the resolved config);
        ``address``: the Ray cluster to run on this time (``--address``; see
        :func:`evomerge.wiring.cluster_address`), ``local`` for a local instance."""
        self.exp = exp
        self.address = address
        self.source = Path(source) if source else None
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.progress = progress or NoProgress()
        self.worker_factory = worker_factory
        self.dispatcher_factory = dispatcher_factory
        self._repair = self._restart = False  # resume's options

    # ------------------------------------------------------------------ entry points
    def run(self) -> RunSummary:
        """Start a new run; the run directory must not hold one."""
        if has_ledger(self.run_dir) or has_info(self.run_dir):
            raise ConfigError([f"run directory {self.run_dir} already holds a run; choose another --run-dir "
                               f"or continue it with `evomerge resume {self.run_dir}`"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self._execute(resuming=False)

    @classmethod
    def for_resume(cls, run_dir: Path, *, max_trials: Optional[int] = None, progress: Optional[Progress] = None,
                   worker_factory: Callable[[WorkerSpec], Any] = TrialWorker,
                   dispatcher_factory: Optional[Callable[[Experiment, WorkerSpec], Dispatcher]] = None,
                   address: Optional[str] = None, runtime: Optional[Experiment] = None,
                   ) -> "Controller":
        """A controller that continues the run in ``run_dir`` (optionally with a larger budget, on
        the cluster at ``address``, with ``runtime``'s run-time dispatch settings)."""
        run_dir = Path(run_dir)
        exp = load_run_experiment(run_dir)
        if max_trials is not None:
            if max_trials < exp.budget.max_trials:
                raise ConfigError([f"--max-trials: can only extend a run; {run_dir.name} has max_trials "
                                   f"{exp.budget.max_trials}"])
            exp = exp.model_copy(update={"budget": exp.budget.model_copy(update={"max_trials": max_trials})})
        if runtime is not None:
            exp = exp.with_runtime(runtime.dispatch)
        return cls(exp, run_dir, progress=progress, worker_factory=worker_factory,
                   dispatcher_factory=dispatcher_factory, address=address)

    def resume(self, repair: bool = False, restart: bool = False) -> RunSummary:
        """Continue the run. ``repair``: move damaged ledger lines aside first (see
        :meth:`Ledger.salvage`). ``restart``: the ledger is gone; search again from the start
        into a new MLflow run (refused while a ledger exists)."""
        self._repair, self._restart = repair, restart
        return self._execute(resuming=True)

    # ------------------------------------------------------------------ the run
    def _execute(self, resuming: bool) -> RunSummary:
        t_start = time.perf_counter()
        exp = self.exp
        lock = RunLock(self.run_dir)
        lock.acquire()
        try:
            return self._execute_locked(exp, resuming, t_start)
        finally:
            lock.release()

    def _execute_locked(self, exp: Experiment, resuming: bool, t_start: float) -> RunSummary:
        info = read_info(self.run_dir) if resuming else {}
        if not resuming:
            kept = write_experiment(self.run_dir, exp, self.source)
        elif exp.model_dump(mode="json") != read_experiment_data(self.run_dir):
            write_experiment(self.run_dir, exp)  # an extended budget, new run-time settings: the run's now
        ledger = open_ledger(self.run_dir)
        if resuming:
            check_ledger(ledger, info, self.run_dir, self.progress, restart=self._restart, repair=self._repair)
        ledger.repair()

        spec = resolve_worker_spec(exp, progress=self.progress.message)
        problems = suite_problems(exp, spec.task_paths) + source_problems(exp, spec.model_dirs, download=True)
        if problems:  # before any worker starts
            raise ConfigError(problems)
        codec = build_codec(exp, spec)
        popsize = exp.optimizer.resolved_popsize(codec.dim)
        n_islands = int(info.get("islands") or min(exp.optimizer.resolved_islands(exp.dispatch.num_workers, popsize),
                                                   exp.budget.max_trials))
        n_objectives = len(exp.suite.tasks) if exp.optimizer.objectives == "per_task" else 1
        start = codec.start_genome()
        inject: tuple = ()
        start_labels: dict[str, str] = {}  # recipe hash -> what the user wrote, of the start recipes
        if exp.optimizer.start_from:  # island 0 (seeded optimizer.seed) evaluates them first
            from evomerge.start_recipes import describe, start_points

            points = start_points(exp, codec)
            inject = tuple(p.genome for p in points)
            self.progress.message(describe(points))
            start_labels = {p.recipe.content_hash(): p.label for p in points}
        scheduler = build_islands(
            n_islands, lambda seed: build_optimizer(exp.optimizer, codec.dim, seed=seed, num_objectives=n_objectives,
                                                    start=start, gene_groups=getattr(codec, "gene_groups", None),
                                                    inject=inject if seed == exp.optimizer.seed else ()),
            codec.decode,
            exp.budget.max_trials, exp.optimizer.failure_fitness, exp.optimizer.seed,
        )
        state = RunState(self.run_id, self.run_dir, self.progress, exp, ledger, scheduler)
        from evomerge.zoo.build import default_cache_dir

        state.cache = ScoreCache(FitnessCache.for_run(exp.suite.cache, default_cache_dir(), exp, spec.model_dirs,
                                                       spec.task_paths), self.run_id)
        state.load(resuming)

        tracking_uri = info.get("tracking_uri") or default_tracking_uri(exp.tracking, self.run_dir)
        tracker = GuardedTracker(
            build_tracker(exp.tracking, tracking_uri=tracking_uri,
                          experiment_name=exp.tracking.experiment_name or exp.name,
                          run_id=info.get("mlflow_run_id") or None),
            warn=self.progress.message,
        )
        mlflow_run_id = tracker.start(
            self.run_id,
            params=run_params(exp, codec, popsize, n_islands),
            tags={"evomerge.version": __version__, "evomerge.experiment": exp.name,
                  "evomerge.run_dir": str(self.run_dir.resolve()), "evomerge.seed": str(exp.optimizer.seed)},
        ) or info.get("mlflow_run_id", "")
        info.update({
            "run_id": self.run_id, "experiment": exp.name, "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id, "mlflow_experiment_id": getattr(tracker.inner, "experiment_id", "")
            or info.get("mlflow_experiment_id", ""), "status": "running", "dimension_names": list(codec.names),
            "popsize": popsize, "islands": n_islands, "max_trials": exp.budget.max_trials,
            "num_workers": exp.dispatch.num_workers, "pid": os.getpid(), "host": socket.gethostname(),
            "updated_at": _dt.datetime.now().isoformat(),
        })
        info.setdefault("created_at", info["updated_at"])
        for key in ("reason", "ended_at"):  # of the last session
            info.pop(key, None)
        if not resuming:
            ledger.path.touch()  # with run.json: from now on a missing ledger is a lost one (_check_ledger)
        write_info(self.run_dir, info)
        state.feed.tracker = tracker
        if not resuming:
            for path in kept:
                tracker.log_artifact(path)
        state.feed.catch_up(state.board)
        if resuming:
            self.progress.message(f"resuming {self.run_id}: {state.finished} trials done, "
                                  f"{len(state.redo)} to run again, {len(state.missing_tells)} tells replayed")

        heartbeat = Heartbeat(self.run_dir).start()
        dispatcher: Optional[Dispatcher] = None
        status, reason = "FAILED", None
        try:
            dispatcher = self._dispatcher(spec, info, n_islands, popsize)
            heartbeat.watch(dispatcher.worker_counts)
            if resuming:  # a session that got its workers (a failed start is no resumption)
                info["resumed"] = int(info.get("resumed", 0)) + 1
                write_info(self.run_dir, info)
            summary = Search(state).search(dispatcher)
            summary.start_trials = {str(r["trial_id"]): start_labels[r["recipe_hash"]]
                                    for r in sorted(state.board.records, key=lambda r: r["trial_id"])
                                    if r.get("recipe_hash") in start_labels}
            summary.tracking_uri = tracking_uri
            summary.mlflow_run_id = mlflow_run_id
            summary.seconds = time.perf_counter() - t_start
            summary.islands = n_islands
            summary.resumed = resuming
            write_summary(self.run_dir, summary.to_json())
            for path in artifacts(self.run_dir):
                if path.name != experiment_path(self.run_dir).name:  # logged at the start
                    tracker.log_artifact(path)
            best = next(((r["trial_id"], r["recipe"]) for r in state.board.records  # the winner (validation)
                         if r["trial_id"] == summary.best_trial), None)
            try:
                plots = write_plots(self.run_dir, self.run_id, state.board.records, state.baselines, best)
            except Exception as exc:  # a plot must never fail a finished search
                plots = []
                self.progress.message(f"plots skipped: {type(exc).__name__}: {exc}")
            for plot in plots:
                tracker.log_artifact(plot)
            status = "FINISHED"
            return summary
        except KeyboardInterrupt:
            status, reason = "KILLED", "stopped by a signal (Ctrl-C, SIGTERM, `evomerge stop`)"
            raise
        except RunInterrupted as exc:
            status, reason = "INTERRUPTED", f"{exc.what}: {exc.reason}"
            exc.run_dir = self.run_dir
            raise
        except BaseException as exc:
            reason = failure_reason(str(exc) if isinstance(exc, EvomergeError) else f"{type(exc).__name__}: {exc}")
            raise
        finally:
            heartbeat.stop()
            if dispatcher is not None:
                dispatcher.close()
            tracker.finish("KILLED" if status == "INTERRUPTED" else status)
            info["status"] = status.lower()
            info["updated_at"] = info["ended_at"] = _dt.datetime.now().isoformat()
            if reason:
                info["reason"] = reason
            if tracker.error:
                info["tracking_error"] = tracker.error
            try:
                write_info(self.run_dir, info)
            except OSError as exc:  # never hide the error that stopped the run behind this one
                self.progress.message(f"could not update {RUN_INFO} ({type(exc).__name__}: {exc})")
                if status == "FINISHED":
                    raise
            self.progress.close()

    def _dispatcher(self, spec: WorkerSpec, info: dict, n_islands: int, popsize: int) -> Dispatcher:
        """Start the workers (where this session runs them is recorded in ``run.json``)."""
        exp = self.exp
        if self.dispatcher_factory is not None:
            return self.dispatcher_factory(exp, spec)
        where = "in this process"
        if exp.dispatch.backend == "ray":
            address, origin = cluster_address(exp, self.address)
            info["ray_address"] = address or "local"
            where = (f"on the Ray cluster at {address} ({origin})" if address else
                     "on a local Ray instance" + (" (--address local)" if origin == "--address" else ""))
        self.progress.message(f"starting {exp.dispatch.num_workers} {exp.dispatch.backend} worker(s) {where}, "
                              f"{n_islands} island(s) of popsize {popsize}")
        if exp.dispatch.backend != "ray":
            return build_dispatcher(exp, spec, self.worker_factory)
        return build_dispatcher(exp, spec, self.worker_factory, address=address, notify=self.progress.message)


def check_ledger(ledger: Ledger, info: dict, run_dir: Path, progress: Progress, *, restart: bool,
                 repair: bool) -> None:
    """Before resuming: a lost ledger is refused (unless ``restart``), damaged lines are named
    (or, with ``repair``, moved aside)."""
    if not ledger.path.exists():
        if not restart:
            raise ConfigError([f"{ledger.path} is missing, but {RUN_INFO} says a run started in {run_dir}: "
                               "resuming would evaluate every trial again and log them twice to its MLflow "
                               f"run. Put the ledger back, or `evomerge resume {run_dir} --restart` to "
                               "search again from the start (into a new MLflow run)"])
        for key in ("mlflow_run_id", "mlflow_experiment_id"):
            info.pop(key, None)
        progress.message(f"{ledger.path.name} is missing: searching again from the start (--restart)")
        return
    if restart:
        raise ConfigError([f"--restart: {run_dir} still has its ledger; `evomerge resume {run_dir}` "
                           "continues it"])
    if repair:
        moved = ledger.salvage()
        if moved:
            progress.message(f"--repair: moved {len(moved)} damaged ledger line(s) (line "
                             f"{', '.join(map(str, moved[:10]))}) to {DAMAGED}")
    for _ in ledger:  # a damaged line stops here, naming the file and line, before anything starts
        pass


def run_params(exp: Experiment, codec, popsize: int, islands: int) -> dict[str, Any]:
    """The run's parameters as the tracker logs them."""
    space = exp.search_space
    if space.kind == "ps":
        shape = {"space": "ps", "method": space.method, "granularity": space.granularity}
    else:
        shape = {"space": "dfs", "repetitions": space.repetitions, "scaling": space.scaling,
                 "layer_donors": ",".join(codec.donors), "max_path_length": space.max_path_length}
    return {
        "experiment": exp.name,
        **shape,
        "dimensions": codec.dim,
        "popsize": popsize,
        "islands": islands,
        "optimizer": exp.optimizer.name,
        "x0": exp.optimizer.x0,
        "sigma0": exp.optimizer.sigma0,
        "seed": exp.optimizer.seed,
        "max_trials": exp.budget.max_trials,
        "num_workers": exp.dispatch.num_workers,
        "models": ",".join(m.name for m in exp.models),
        "base_model": exp.base_model,
        "search_tasks": ",".join(t.name for t in exp.suite.tasks),
        "test_tasks": ",".join(t.name for t in exp.suite.test_tasks),
        "batch_size": exp.suite.batch_size,
        "num_fewshot": exp.suite.num_fewshot,
    }
