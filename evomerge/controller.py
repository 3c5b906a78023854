"""The controller owns the search loop: ask → dispatch → tell → record.

Libraries never own the loop: the optimizers only answer ask/tell, the
dispatcher only runs requests, the tracker only records. The loop is
asynchronous and steady-state: whenever a worker is free it gets the next
candidate of some island (see ``islands.py``), so no worker waits for a
generation barrier. Every dispatch, result and tell is appended to the ledger
(the run's source of truth) before anything else sees it; ``resume`` rebuilds a
killed run from the ledger alone. Failed trials (exception, non-finite fitness,
worker death, timeout) are recorded with their reason and told to the optimizer
with a penalty — in ``islands.penalized`` only.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from evomerge import __version__
from evomerge.config import Experiment
from evomerge.dispatch.base import Dispatcher
from evomerge.errors import ConfigError, EvomergeError, RunInterrupted
from evomerge.heartbeat import Heartbeat
from evomerge.fitness_cache import FitnessCache, recipe_key, source_key
from evomerge.islands import Candidate, IslandScheduler, ReplayError, Tell, build_islands, replay
from evomerge.ledger import DAMAGED, Ledger
from evomerge.racing import Race, counts_for_best, stopped_per_rung, tallies_of
from evomerge.run_dir import (RUN_INFO, ItemLog, RunLock, artifacts, experiment_path, has_info, has_ledger,
                              load_run_experiment, open_ledger, pack_values, pareto_path, read_experiment_data,
                              read_info, save_best_recipe, unpack_values, write_experiment, write_info,
                              write_json_atomic, write_summary)
from evomerge.optimize import build_optimizer
from evomerge.pareto import ParetoFront
from evomerge.recipe import Recipe, recipe_from_dict
from evomerge.selection import choose, selection_metrics, selection_record, task_values, top_trials
from evomerge.uncertainty import uncertainty_metrics
from evomerge.tracking import GuardedTracker, build_tracker, default_tracking_uri
from evomerge.tracking.base import Tracker
from evomerge.tracking.metrics import trial_metric_rows, trial_metrics
from evomerge.tracking.null import NullTracker
from evomerge.plots import write_plots
from evomerge.wiring import (build_codec, build_dispatcher, cluster_address, resolve_worker_spec, source_problems,
                             suite_problems)
from evomerge.worker import EvalRequest, EvalResult, TrialWorker, WorkerSpec


class Progress(Protocol):
    def start(self, total: int, done: int = 0) -> None: ...
    def advance(self, best: Optional[float], failed: int) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class _NoProgress:
    def start(self, total: int, done: int = 0) -> None:
        pass

    def advance(self, best: Optional[float], failed: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    trials: int
    failed: int
    best_trial: Optional[int]
    best_fitness: Optional[float]
    best_recipe_hash: Optional[str]
    baselines: dict[str, float] = field(default_factory=dict)
    test_scores: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    seconds: float = 0.0
    islands: int = 1
    resumed: bool = False
    worker_busy_fraction: Optional[float] = None  # busy seconds / seconds workers were up, in the search
    worker_seconds: Optional[float] = None  # seconds of live workers in the search, summed over workers
    controller_ms_per_trial: Optional[float] = None
    search_seconds: Optional[float] = None  # the search loop alone (no start-up, no test split)
    steady_busy_fraction: Optional[float] = None  # busy share until the budget was all handed out
    pareto_trials: list[int] = field(default_factory=list)  # multi-objective runs: the Pareto front
    cached_trials: int = 0  # trials answered by the fitness cache (no worker)
    failure_reasons: list[list] = field(default_factory=list)  # [[reason, count], ...], commonest first
    # racing: finished trials per rung they stopped at, and item evaluations of the search's trials
    racing_stopped: list[int] = field(default_factory=list)
    item_evaluations: Optional[int] = None
    # validation (suite.validation_tasks): best_* is the winner on validation among the top_k by
    # search fitness; validation: {trial id: validation fitness} of those top_k
    validation: dict[str, float] = field(default_factory=dict)
    validation_fitness: Optional[float] = None
    # the winner's validation score less its winner's curse (a bootstrap of the validation items)
    validation_corrected: Optional[float] = None
    search_best_trial: Optional[int] = None
    search_best_fitness: Optional[float] = None
    start_trials: dict[str, str] = field(default_factory=dict)  # {trial id: start recipe} (optimizer.start_from)
    # standard errors of the scores above (from per-item values; None where there are none):
    # {"search", "validation", "baselines": {source: se}, "tests": {label: se}}
    standard_errors: dict[str, Any] = field(default_factory=dict)
    evidence: Optional[dict[str, Any]] = None  # does the winner beat its sources (see evomerge.uncertainty)

    @property
    def all_failed(self) -> bool:
        """Every trial of the run failed: there is no result to export."""
        return self.trials > 0 and self.failed == self.trials

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["run_dir"] = str(self.run_dir)
        return d


def failure_reason(error: Optional[str]) -> str:
    """A failed trial's reason as one short line (the first line of its error), for counting."""
    lines = (error or "").strip().splitlines()
    text = lines[0] if lines else "failed without a reason"
    return text if len(text) <= 200 else text[:197] + "..."


def _normalized(res: EvalResult) -> EvalResult:
    """A "complete" result must carry a finite fitness; anything else is a failure with a reason."""
    if res.state == "complete" and (res.fitness is None or not math.isfinite(res.fitness)):
        res.state, res.error, res.fitness = "failed", f"fitness is not finite: {res.fitness}", None
    if res.state != "complete":
        res.fitness = None
        res.error = res.error or "failed without a reason"
    return res


def _task_items(res: EvalResult) -> dict[str, Any]:
    """A result's per-item values by suite task, packed as the ledger keeps them."""
    return {task: pack_values(v) for task, v in task_values(res.items).items()}


def _cache_key(work: "_Work") -> tuple[str, str]:
    """(what was scored, split): a recipe by its content hash, a source by its name."""
    if work.request.recipe is not None:
        return recipe_key(work.recipe_hash or work.candidate.recipe.content_hash()), work.request.split
    return source_key(work.request.source), work.request.split


@dataclass
class _Work:
    """A request in flight and what it is for."""

    kind: str  # "trial" | "baseline" | "test"
    request: EvalRequest
    candidate: Optional[Candidate] = None
    label: str = ""
    recipe_hash: Optional[str] = None


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
        self.progress = progress or _NoProgress()
        self.worker_factory = worker_factory
        self.dispatcher_factory = dispatcher_factory

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

    def _check_ledger(self, ledger: Ledger, info: dict) -> None:
        """Before resuming: a lost ledger is refused (unless ``restart``), damaged lines are named
        (or, with ``repair``, moved aside)."""
        restart, repair = getattr(self, "_restart", False), getattr(self, "_repair", False)
        if not ledger.path.exists():
            if not restart:
                raise ConfigError([f"{ledger.path} is missing, but {RUN_INFO} says a run started in {self.run_dir}: "
                                   "resuming would evaluate every trial again and log them twice to its MLflow "
                                   f"run. Put the ledger back, or `evomerge resume {self.run_dir} --restart` to "
                                   "search again from the start (into a new MLflow run)"])
            for key in ("mlflow_run_id", "mlflow_experiment_id"):
                info.pop(key, None)
            self.progress.message(f"{ledger.path.name} is missing: searching again from the start (--restart)")
            return
        if restart:
            raise ConfigError([f"--restart: {self.run_dir} still has its ledger; `evomerge resume {self.run_dir}` "
                               "continues it"])
        if repair:
            moved = ledger.salvage()
            if moved:
                self.progress.message(f"--repair: moved {len(moved)} damaged ledger line(s) (line "
                                      f"{', '.join(map(str, moved[:10]))}) to {DAMAGED}")
        for _ in ledger:  # a damaged line stops here, naming the file and line, before anything starts
            pass

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
            self._check_ledger(ledger, info)
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
        state = _RunState(self, exp, ledger, scheduler)
        from evomerge.zoo.build import default_cache_dir

        state.cache = _ScoreCache(FitnessCache.for_run(exp.suite.cache, default_cache_dir(), exp, spec.model_dirs,
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
            params=self._params(codec, popsize, n_islands),
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
            summary = state.search(dispatcher)
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

    def _params(self, codec, popsize: int, islands: int) -> dict[str, Any]:
        exp = self.exp
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


class _Scoreboard:
    """The finished trials of a run: their records, the failure count, the best (ties: the
    earliest finished) and, for a multi-objective run, the Pareto front."""

    def __init__(self, multi_objective: bool) -> None:
        self.multi_objective = multi_objective
        self.records: list[dict] = []
        self.failed = 0
        self.best: Optional[tuple[int, float, Recipe]] = None
        self.front = ParetoFront()
        self.cached = 0

    def note(self, rec: dict) -> bool:
        """Count a finished trial record; True if the Pareto front changed."""
        self.records.append(rec)
        self.cached += bool(rec.get("cached_from"))
        if rec["state"] != "complete":
            self.failed += 1
            return False
        if counts_for_best(rec) and (self.best is None or rec["fitness"] > self.best[1]):
            self.best = (rec["trial_id"], float(rec["fitness"]), recipe_from_dict(rec["recipe"]))
        return self.multi_objective and self.front.add(rec["trial_id"], rec["objectives"])

    def told_input(self, rec: dict):
        """What a trial record tells its island: the fitness, or the vector of objectives."""
        return rec.get("objectives") if self.multi_objective else rec["fitness"]

    def write_pareto(self, path: Path, objectives: list[str]) -> None:
        by_id = {r["trial_id"]: r for r in self.records}
        write_json_atomic(path, {
            "objectives": objectives,
            "members": [{"trial_id": t, "objectives": self.front.members[t], "fitness": by_id[t]["fitness"],
                         "recipe_hash": by_id[t]["recipe_hash"]} for t in self.front.trial_ids()],
        })

    def failure_reasons(self) -> list[list]:
        """The three commonest failure reasons with their counts."""
        return [[reason, n] for reason, n in Counter(
            failure_reason(t.get("error")) for t in self.records if t.get("state") != "complete").most_common(3)]


class _TrackerFeed:
    """Per-trial metrics on their way to the tracker: queued as trials finish, sent when the free
    workers have their next candidates (the ledger has them already)."""

    def __init__(self) -> None:
        self.tracker: Tracker = NullTracker()
        self._backlog: list[tuple[int, dict[str, float]]] = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self._backlog.append((step, metrics))

    def flush(self) -> None:
        if self._backlog:
            self.tracker.log_trials(self._backlog)
            self._backlog = []

    def catch_up(self, board: _Scoreboard) -> None:
        """Log the trials the tracker missed (it was down, or the process died between ledger and tracker)."""
        self._backlog.extend(trial_metric_rows(board.records, board.multi_objective, self.tracker.logged_trials()))
        self.flush()


class _ScoreCache:
    """The run's link to the fitness cache (none when ``suite.cache: off``): scores known before
    a worker is asked, and the scores this run adds."""

    def __init__(self, cache: Optional[FitnessCache], run_id: str) -> None:
        self.cache = cache
        self.run_id = run_id

    def lookup(self, work: _Work) -> Optional[EvalResult]:
        rec = self.cache.get(*_cache_key(work)) if self.cache is not None else None
        if rec is None:
            return None
        return EvalResult(trial_id=work.request.trial_id, state="complete", fitness=rec["fitness"],
                          scores=dict(rec["scores"]), worker="cache", split=work.request.split,
                          cached_from=rec.get("origin") or "cache", items=rec.get("items"))

    def add(self, work: _Work, res: EvalResult) -> None:
        if self.cache is not None and res.state == "complete":
            what = f"trial {work.request.trial_id}" if work.kind == "trial" else f"{work.kind} {work.label}"
            # a validation score keeps its per-item values (a selection pairs candidates on them),
            # as do a source's and a test score (their standard errors, the evidence of a gain)
            self.cache.put(*_cache_key(work), res.fitness, res.scores, origin=f"{self.run_id}: {what}",
                           items=res.items if work.kind != "trial" else None)

    def remember(self, key: str, split: str, rec: dict) -> None:
        """A score from this run's ledger (resume): in memory only, it is in the shared file already."""
        if self.cache is not None and rec.get("state") == "complete":
            self.cache.put(key, split, rec["fitness"], rec.get("scores") or {}, origin="ledger", persist=False)


class _Racing:
    """A racing run's trials between rungs: the race, the trials promoted to their next rung, the
    seconds each has spent so far and its last ``rung`` record (for resume)."""

    def __init__(self, race: Race) -> None:
        self.race = race
        self.promoted: deque[_Work] = deque()
        self.spent: dict[int, list[float]] = {}
        self.last_rungs: dict[int, dict] = {}

    def replay(self, rec: dict) -> None:
        """A ledger record on resume: a ``rung`` one, or a ``trial`` that ended its race."""
        if rec["kind"] == "rung":
            self.race.replay(rec)
            self.last_rungs[rec["trial_id"]] = rec
            self._spend(rec["trial_id"], rec.get("merge_seconds", 0.0), rec.get("eval_seconds", 0.0))
        else:
            self.race.finish(rec["trial_id"], rec.get("rung", self.race.last), rec["fitness"])
            self.race.fitness_by_rung.pop(rec["trial_id"], None)
            self.last_rungs.pop(rec["trial_id"], None)
            self.spent.pop(rec["trial_id"], None)

    def resumed(self, work: _Work) -> tuple[Optional[_Work], Optional[EvalResult]]:
        """A trial that was in flight at the crash: the work to queue, or the final result of a
        trial whose last rung was final but whose trial record was lost."""
        last = self.last_rungs.get(work.request.trial_id)
        if last is None:
            return work, None
        if last["promoted"]:  # it was on its way to the next rung: go on from there
            return replace(work, request=replace(work.request, rung=last["rung"] + 1)), None
        return None, EvalResult(trial_id=work.request.trial_id, state="complete", fitness=last["fitness"],
                                scores=dict(last["scores"]), worker=last.get("worker", ""), rung=last["rung"])

    def _spend(self, trial_id: int, merge: float, evaluation: float) -> None:
        spent = self.spent.setdefault(trial_id, [0.0, 0.0])
        spent[0] += merge
        spent[1] += evaluation

    def on_rung(self, work: _Work, res: EvalResult, ledger: Ledger) -> Optional[EvalResult]:
        """One rung's result: recorded, then the trial is promoted (None) or its final result returned."""
        rung = work.request.rung
        self._spend(res.trial_id, res.merge_seconds, res.eval_seconds)
        if res.state != "complete":
            return res
        tallies = tallies_of(res.items)
        try:
            fitness, scores, se = self.race.add(res.trial_id, rung, tallies)
        except ValueError as exc:  # a rung without items for a task: the suite cannot race
            return replace(res, state="failed", fitness=None, error=str(exc))
        promoted = self.race.promote(rung, fitness, se)
        rec = {"kind": "rung", "trial_id": res.trial_id, "rung": rung, "fitness": fitness, "scores": scores,
               "stderr": se, "tallies": tallies, "promoted": promoted, "merge_seconds": res.merge_seconds,
               "eval_seconds": res.eval_seconds, "worker": res.worker, "at": time.time()}
        ledger.append(rec)
        self.last_rungs[res.trial_id] = rec
        if promoted:
            self.promoted.append(replace(work, request=replace(work.request, rung=rung + 1)))
            return None
        return replace(res, fitness=fitness, scores=scores, rung=rung)

    def finish(self, res: EvalResult) -> tuple[EvalResult, dict]:
        """A trial's final result with the seconds of all its rungs, and its record's racing fields."""
        spent = self.spent.pop(res.trial_id, None)
        if spent is not None:
            res = replace(res, merge_seconds=spent[0], eval_seconds=spent[1])
        self.last_rungs.pop(res.trial_id, None)
        rung = res.rung if res.rung is not None else self.race.last
        self.race.finish(res.trial_id, rung, res.fitness if res.state == "complete" else None)
        fields = {"rung": rung, "last_rung": self.race.last,
                  "rung_fitness": self.race.fitness_by_rung.pop(res.trial_id, [])}
        return res, fields



class _SourceScores:
    """The scores beside the search: each source's baseline (search split), the validation
    split's scores of the top trials, and the test split's scores of the winner (and of the
    search split's best, when validation chose another; and of a Pareto front's members) and
    of every source."""

    def __init__(self, ledger: Ledger, items: ItemLog, progress: "Progress") -> None:
        self.ledger = ledger
        self.items = items
        self.progress = progress
        self.baselines: dict[str, float] = {}
        self.baselines_done: set[str] = set()
        self.tests_done: dict[tuple[str, Optional[str]], dict] = {}
        self.validations: dict[int, dict] = {}

    def replay(self, rec: dict) -> None:
        """A ``baseline``, ``validation`` or ``test`` ledger record on resume."""
        if rec["kind"] == "baseline":
            self.baselines_done.add(rec["model"])
            if rec["state"] == "complete":
                self.baselines[rec["model"]] = float(rec["fitness"])
        elif rec["kind"] == "validation":
            self.validations[rec["trial_id"]] = rec
        else:
            self.tests_done[(rec["model"], rec.get("recipe_hash"))] = rec

    def on_validation(self, work: _Work, res: EvalResult) -> None:
        rec = {"kind": "validation", "trial_id": work.request.trial_id, "recipe_hash": work.recipe_hash,
               "split": "validation", "state": res.state, "fitness": res.fitness, "scores": res.scores,
               "eval_seconds": res.eval_seconds, "error": res.error, "finished_at": time.time(),
               **({"cached_from": res.cached_from} if res.cached_from else {})}
        if res.state == "complete" and res.items:
            rec["item_values"] = {task: pack_values(v) for task, v in task_values(res.items).items()}
        self.ledger.append(rec)
        self.validations[work.request.trial_id] = rec
        if res.state != "complete":
            self.progress.message(f"validation of trial {work.request.trial_id} failed: {res.error.splitlines()[0]}")

    def validation_scores(self) -> dict[int, float]:
        return {t: float(r["fitness"]) for t, r in self.validations.items() if r["state"] == "complete"}

    def validation_items(self) -> dict[int, dict[str, list[float]]]:
        """Each validated trial's per-item values by task (those recorded with them)."""
        return {t: {task: unpack_values(v) for task, v in r["item_values"].items()}
                for t, r in self.validations.items() if r["state"] == "complete" and r.get("item_values")}

    def on_baseline(self, work: _Work, res: EvalResult) -> None:
        if res.state == "complete" and not res.cached_from:
            self.items.append(res.items, source=work.label)
        self.ledger.append({"kind": "baseline", "model": work.label, "split": res.split, "state": res.state,
                            "fitness": res.fitness, "scores": res.scores, "eval_seconds": res.eval_seconds,
                            "error": res.error, "finished_at": time.time(),
                            **({"cached_from": res.cached_from} if res.cached_from else {}),
                            **({"task_items": _task_items(res)} if res.items else {})})
        self.baselines_done.add(work.label)
        if res.state == "complete":
            self.baselines[work.label] = float(res.fitness)
        else:
            self.progress.message(f"baseline {work.label} failed: {res.error.splitlines()[0]}")

    def on_test(self, work: _Work, res: EvalResult, trial_id: Optional[int]) -> None:
        rec = {"kind": "test", "model": work.label, "trial_id": trial_id,
               "recipe_hash": work.recipe_hash, "split": "test", "state": res.state, "fitness": res.fitness,
               "scores": res.scores, "eval_seconds": res.eval_seconds, "error": res.error,
               "finished_at": time.time(), **({"cached_from": res.cached_from} if res.cached_from else {}),
               **({"task_items": _task_items(res)} if res.items else {})}
        self.ledger.append(rec)
        self.tests_done[(work.label, work.recipe_hash)] = rec

    @staticmethod
    def test_works(recipes: dict[str, Recipe], sources: list[str]) -> list[_Work]:
        """Test-split work for each labelled recipe (``best`` first) and every source."""
        wanted = [_Work("test", EvalRequest(trial_id=i, recipe=recipe.to_dict(), split="test"), label=label,
                        recipe_hash=recipe.content_hash()) for i, (label, recipe) in enumerate(recipes.items())]
        return wanted + [_Work("test", EvalRequest(trial_id=len(recipes) + i, source=name, split="test"), label=name)
                         for i, name in enumerate(sources)]

    def has_test(self, work: _Work) -> bool:
        return (work.label, work.recipe_hash) in self.tests_done

    def test_scores(self, wanted: list[_Work]) -> dict[str, float]:
        out = {}
        for w in wanted:
            rec = self.tests_done.get((w.label, w.recipe_hash))
            if rec is not None and rec["state"] == "complete":
                out[w.label] = float(rec["fitness"])
        return out


class _RunState:
    """What a run knows: rebuilt from the ledger on resume, advanced by the event loop."""

    def __init__(self, ctl: Controller, exp: Experiment, ledger: Ledger, scheduler: IslandScheduler) -> None:
        self.ctl = ctl
        self.exp = exp
        self.ledger = ledger
        self.scheduler = scheduler
        self.feed = _TrackerFeed()
        self.sources = [m.name for m in exp.models]
        self.board = _Scoreboard(exp.optimizer.objectives == "per_task")
        self.next_trial_id = 0
        self.redo: list[Candidate] = []
        self.missing_tells: list[Tell] = []
        self.cache = _ScoreCache(None, ctl.run_id)
        self.items = ItemLog(ctl.run_dir)
        self.scores = _SourceScores(ledger, self.items, ctl.progress)
        racing = exp.suite.racing
        self.racing = _Racing(Race(racing, exp.suite.tasks)) if racing is not None else None
        self._test_trials: dict[str, int] = {}  # test labels of recipes -> their trial ids
        self.item_values: dict[str, list[float]] = {}  # optimizers told per-item scores: by recipe hash

    @property
    def finished(self) -> int:
        return len(self.board.records)

    @property
    def best(self) -> Optional[tuple[int, float, Recipe]]:
        return self.board.best

    @property
    def baselines(self) -> dict[str, float]:
        return self.scores.baselines

    def load(self, resuming: bool) -> None:
        """Replay the ledger: re-ask and re-tell every island, collect what is done."""
        if not resuming:
            return
        dispatched: dict[tuple[int, int, int], dict] = {}
        finished: dict[int, dict] = {}
        tells: dict[tuple[int, int], dict] = {}
        for rec in self.ledger:
            kind = rec.get("kind")
            if kind == "dispatch":
                dispatched[(rec["island"], rec["generation"], rec["member"])] = rec
                self.next_trial_id = max(self.next_trial_id, rec["trial_id"] + 1)
            elif kind == "rung" and self.racing is not None:
                self.racing.replay(rec)
            elif kind == "trial":
                finished[rec["trial_id"]] = rec
                self.board.note(rec)
                if self.racing is not None:
                    self.racing.replay(rec)
                if counts_for_best(rec):
                    self.cache.remember(recipe_key(rec["recipe_hash"]), "search", rec)
            elif kind == "tell":
                tells[(rec["island"], rec["generation"])] = rec
            elif kind == "baseline":
                self.scores.replay(rec)
                self.cache.remember(source_key(rec["model"]), "search", rec)
            elif kind == "test":
                self.scores.replay(rec)
                key = recipe_key(rec["recipe_hash"]) if rec.get("recipe_hash") else source_key(rec["model"])
                self.cache.remember(key, "test", rec)
            elif kind == "validation":
                self.scores.replay(rec)
                self.cache.remember(recipe_key(rec["recipe_hash"]), "validation", rec)
        try:
            self.redo, self.missing_tells = replay(self.scheduler, dispatched, finished, tells, self.board.told_input,
                                                   self._recorded_items)
        except ReplayError as exc:
            raise EvomergeError(f"cannot resume {self.ctl.run_id}: {exc}") from None
        for tell in self.missing_tells:
            self._record_tell(tell)
        if self.best is not None:
            save_best_recipe(self.ctl.run_dir, self.best[2])
        if self.board.multi_objective:
            self._write_pareto()

    def _write_pareto(self) -> None:
        self.board.write_pareto(pareto_path(self.ctl.run_dir), [t.name for t in self.exp.suite.tasks])

    # ------------------------------------------------------------------ event loop
    def search(self, dispatcher: Dispatcher) -> RunSummary:
        exp = self.exp
        progress = self.ctl.progress
        queue: deque[_Work] = deque(
            _Work("baseline", EvalRequest(trial_id=-(i + 1), source=name, split="search"), label=name)
            for i, name in enumerate(self.sources) if name not in self.scores.baselines_done
        )
        self._phase_begin("sources (search split)", len(queue))
        redo = [_Work("trial", self._request(c), candidate=c) for c in self.redo]
        self.redo = []
        for work in redo:
            go_on, final = self.racing.resumed(work) if self.racing is not None else (work, None)
            queue.extend([go_on] if go_on is not None else [])
            if final is not None:
                self._finish_trial(work, final)
        progress.start(exp.budget.max_trials, done=self.finished)
        stats = self._loop(dispatcher, queue, self._next_candidate, exhausted=lambda: self.scheduler.exhausted)
        progress.close()
        self._phase = None

        selection = self._select(dispatcher) if exp.suite.validation_tasks and self.best is not None else None
        winner = self.best if selection is None else (
            selection["trial_id"], selection["search_fitness"],
            next(recipe_from_dict(r["recipe"]) for r in self.board.records if r["trial_id"] == selection["trial_id"]))
        test_scores: dict[str, float] = {}
        if exp.suite.test_tasks and winner is not None:
            progress.message("scoring the best recipe and the sources on the held-out test split")
            test_scores = self._test_split(dispatcher, winner)

        summary = _summarize(self, stats, test_scores, dispatcher.num_workers, winner, selection)
        self.feed.tracker.log_summary({f"baseline.{k}": v for k, v in self.baselines.items()}
                                      | {f"test.{k}": v for k, v in test_scores.items()}
                                      | (selection_metrics(selection) if selection else {})
                                      | ({"best_fitness_final": summary.best_fitness} if self.best else {})
                                      | uncertainty_metrics(summary.standard_errors, summary.evidence))
        return summary

    def _select(self, dispatcher: Dispatcher) -> Optional[dict]:
        """Score the top_k trials by search fitness on the validation split (those not scored
        yet), record the winner there as a ``selection`` and make it ``best_recipe.yaml``.
        Returns the selection record; None (the search split's best stays) if no trial could
        be scored on the validation split."""
        candidates = top_trials(self.board.records, self.exp.selection.top_k)
        todo = deque(_Work("validation", EvalRequest(trial_id=c["trial_id"], recipe=c["recipe"], split="validation"),
                           label=f"trial {c['trial_id']}", recipe_hash=c["recipe_hash"])
                     for c in candidates if c["trial_id"] not in self.scores.validations)
        self.ctl.progress.message(f"scoring the top {len(candidates)} trials (by search fitness) on the validation split")
        self._phase_begin("validation split", len(todo))
        self._loop(dispatcher, todo, lambda: None)
        self._phase = None
        scores = self.scores.validation_scores()
        weights = {t.name: t.weight for t in self.exp.suite.validation_tasks}
        choice = choose(candidates, scores, self.scores.validation_items(), weights, self.exp.selection.min_z,
                        seed=self.exp.optimizer.seed)
        if choice is None:
            self.ctl.progress.message("no trial could be scored on the validation split; the winner is the search "
                                      "split's best")
            return None
        rec = selection_record(choice, candidates, scores, self.exp.selection.min_z)
        self.ledger.append(rec)
        save_best_recipe(self.ctl.run_dir, recipe_from_dict(choice.winner["recipe"]))
        return rec

    def _next_candidate(self) -> Optional[_Work]:
        if self.racing is not None and self.racing.promoted:  # finish started trials first: islands wait on them
            return self.racing.promoted.popleft()
        cand = self.scheduler.next()
        if cand is None:
            return None
        cand.trial_id = self.next_trial_id
        self.next_trial_id += 1
        return _Work("trial", self._request(cand), candidate=cand)

    def _request(self, cand: Candidate) -> EvalRequest:
        return EvalRequest(trial_id=int(cand.trial_id), recipe=cand.recipe.to_dict(),
                           rung=0 if self.racing is not None else None)

    def _loop(self, dispatcher: Dispatcher, queue: deque[_Work], more: Callable[[], Optional[_Work]],
              exhausted: Callable[[], bool] = lambda: True) -> dict[str, float]:
        """Keep every worker busy until ``queue`` and ``more`` are exhausted and nothing is in flight.

        Returns worker busy seconds (as the workers report them), loop seconds, seconds
        spent waiting on the dispatcher, results handled; and the steady state: busy
        seconds of the results received before ``exhausted()`` (all work handed out)
        and the seconds until then — a conservative busy share that leaves out the
        unavoidable drain of the last trials.
        """
        inflight: dict[tuple[str, int], _Work] = {}
        busy = wait_s = 0.0
        handled = 0
        steady_busy, steady_s, steady_up = 0.0, None, 0.0
        up0 = dispatcher.worker_seconds()
        t0 = time.perf_counter()
        while True:
            # refill free workers first: the ledger already has the results; the tracker
            # (milliseconds per call over HTTP) catches up while the workers run
            while len(inflight) < dispatcher.num_workers:
                work = queue.popleft() if queue else more()
                if work is None:
                    break
                if work.kind == "trial" and not work.request.rung:
                    self._record_dispatch(work.candidate)
                hit = self.cache.lookup(work) if not work.request.rung else None
                if hit is not None:  # a score already known: no worker needed
                    handled += 1
                    getattr(self, f"_on_{work.kind}")(work, hit)
                    continue
                inflight[(work.request.split, work.request.trial_id)] = work
                dispatcher.submit(work.request)
            self.feed.flush()
            if steady_s is None and not queue and exhausted():
                steady_s = time.perf_counter() - t0
                steady_up = dispatcher.worker_seconds() - up0
            if not inflight:
                break
            tw = time.perf_counter()
            results = dispatcher.wait(timeout=1.0)
            wait_s += time.perf_counter() - tw
            for res in results:
                work = inflight.pop((res.split, res.trial_id))
                res = _normalized(res)
                if work.request.rung is None:  # racing rungs are cached once final (_finish_trial)
                    self.cache.add(work, res)
                busy += res.merge_seconds + res.eval_seconds
                if steady_s is None:
                    steady_busy += res.merge_seconds + res.eval_seconds
                handled += 1
                getattr(self, f"_on_{work.kind}")(work, res)
        return {"busy": busy, "loop_s": time.perf_counter() - t0, "wait_s": wait_s, "handled": handled,
                "steady_busy": steady_busy, "steady_s": steady_s or 0.0, "up_s": dispatcher.worker_seconds() - up0,
                "steady_up_s": steady_up}

    # ------------------------------------------------------------------ records
    def _record_dispatch(self, cand: Candidate) -> None:
        self.ledger.append({
            "kind": "dispatch", "trial_id": cand.trial_id, "island": cand.island, "generation": cand.generation,
            "member": cand.member, "genome": [float(x) for x in cand.genome],
            "recipe_hash": cand.recipe.content_hash(), "at": time.time(),
        })

    def _on_trial(self, work: _Work, res: EvalResult) -> None:
        """A trial's result; under racing, one rung's: promote it, or make its score so far final."""
        if res.state == "complete" and not res.cached_from:
            self.items.append(res.items, trial_id=res.trial_id, rung=work.request.rung)
        racing = self.racing
        if racing is not None and res.cached_from:
            res.rung = racing.race.last  # this run caches racing scores only from the last rung
        elif racing is not None and work.request.rung is not None:
            res = racing.on_rung(work, res, self.ledger)
            if res is None:
                return  # promoted: the next rung is queued
        self._finish_trial(work, res)

    def _finish_trial(self, work: _Work, res: EvalResult) -> None:
        """Ledger first (the source of truth), then best_recipe.yaml, tracker, optimizer, progress."""
        cand = work.candidate
        board = self.board
        racing_fields = {}
        if self.racing is not None:
            res, racing_fields = self.racing.finish(res)
        objectives = None
        if board.multi_objective and res.state == "complete":
            objectives = [float(res.scores[t.name]) for t in self.exp.suite.tasks]
        rec = {
            "kind": "trial", "trial_id": res.trial_id, "island": cand.island, "generation": cand.generation,
            "member": cand.member, "genome": [float(x) for x in cand.genome],
            "recipe_hash": cand.recipe.content_hash(), "recipe": cand.recipe.to_dict(), "state": res.state,
            "fitness": res.fitness, "scores": res.scores, "merge_seconds": res.merge_seconds,
            "eval_seconds": res.eval_seconds, "error": res.error, "worker": res.worker,
            "attempts": res.attempts, "finished_at": time.time(),
        }
        if res.cached_from:
            rec["cached_from"] = res.cached_from
        if res.items and work.request.rung is None:  # a score's standard error, paired comparisons
            rec["task_items"] = _task_items(res)
        if res.peak_bytes:
            rec["peak_bytes"] = res.peak_bytes
        if board.multi_objective:
            rec["objectives"] = objectives
        items = self._trial_items(res, rec["recipe_hash"]) if self.scheduler.wants_items else None
        if items is not None:
            rec["item_values"] = pack_values(items)
        if racing_fields:
            rec.update(racing_fields)
            if res.state == "complete" and counts_for_best(rec) and not res.cached_from:
                self.cache.add(work, res)
        self.ledger.append(rec)
        previous_best = board.best
        if board.note(rec):
            self._write_pareto()
        if board.best is not previous_best:
            save_best_recipe(self.ctl.run_dir, board.best[2])
        # tracking waits until the free workers have their next candidates (see _loop)
        self.feed.add(self.finished - 1, trial_metrics(
            rec, board.best[1] if board.best else None, len(board.front.members) if board.multi_objective else None))
        tell = self.scheduler.receive(cand, res.state, board.told_input(rec), items)
        if tell is not None:
            self._record_tell(tell)
        if res.state != "complete":
            self.ctl.progress.message(f"trial {res.trial_id} failed: {res.error.splitlines()[0]}")
        self.ctl.progress.advance(board.best[1] if board.best else None, board.failed)

    def _trial_items(self, res: EvalResult, recipe_hash: str) -> Optional[list[float]]:
        """A complete trial's per-item scores of the search split, for optimizers told them (M2N2):
        leaf tasks by name, documents by id. A cached score has none: it takes those of the same
        recipe earlier in this run, else (a score from another run's shared cache) its fitness
        on every item."""
        if res.state != "complete":
            return None
        if res.items:
            values = [v for leaf in sorted(res.items)
                      for _, v in sorted(zip(res.items[leaf]["docs"], res.items[leaf]["values"]))]
        elif recipe_hash in self.item_values:
            values = self.item_values[recipe_hash]
        elif self.item_values:
            values = [float(res.fitness)] * len(next(iter(self.item_values.values())))
        else:
            return None
        self.item_values[recipe_hash] = values
        return values

    def _recorded_items(self, rec: dict) -> Optional[list[float]]:
        """The per-item scores a trial record carries (resume), remembered by recipe."""
        if rec.get("item_values") is None:
            return None
        values = unpack_values(rec["item_values"])
        self.item_values[rec["recipe_hash"]] = values
        return values

    def _record_tell(self, tell: Tell) -> None:
        self.ledger.append({"kind": "tell", "island": tell.island, "generation": tell.generation,
                            "trial_ids": list(tell.trial_ids), "values": list(tell.values), "state": tell.state,
                            "at": time.time()})

    def _on_baseline(self, work: _Work, res: EvalResult) -> None:
        self.scores.on_baseline(work, res)
        self._phase_step(work, res)

    def _on_validation(self, work: _Work, res: EvalResult) -> None:
        self.scores.on_validation(work, res)
        self._phase_step(work, res)

    def _on_test(self, work: _Work, res: EvalResult) -> None:
        self.scores.on_test(work, res, self._test_trials.get(work.label))
        self._phase_step(work, res)

    def _phase_begin(self, name: str, total: int) -> None:
        """Scores outside the search's progress bar (sources, validation, test split) report each one."""
        self._phase = [name, 0, total]

    def _phase_step(self, work: _Work, res: EvalResult) -> None:
        phase = getattr(self, "_phase", None)
        if phase is None or not phase[2]:
            return
        phase[1] += 1
        score = f"{res.fitness:.4f}" if res.state == "complete" else "failed"
        self.ctl.progress.message(f"{phase[0]}: {phase[1]}/{phase[2]} scored ({work.label}: {score}"
                                  + (f", {res.eval_seconds:.1f} s" if res.eval_seconds else "") + ")")

    def _test_split(self, dispatcher: Dispatcher, winner: tuple[int, float, Recipe]) -> dict[str, float]:
        """Test-split scores of the winner (``best``), of the search split's best when validation
        chose another (``search_best``), of a Pareto front's members (``trial N``) and of every
        source."""
        recipes = {"best": winner[2]}
        self._test_trials = {"best": winner[0]}
        if self.best is not None and self.best[0] != winner[0]:
            recipes["search_best"] = self.best[2]
            self._test_trials["search_best"] = self.best[0]
        if self.board.multi_objective:
            by_id = {r["trial_id"]: r for r in self.board.records}
            for t in self.board.front.trial_ids():
                recipes[f"trial {t}"] = recipe_from_dict(by_id[t]["recipe"])
                self._test_trials[f"trial {t}"] = t
        wanted = self.scores.test_works(recipes, self.sources)
        todo = deque(w for w in wanted if not self.scores.has_test(w))
        self._phase_begin("test split", len(todo))
        self._loop(dispatcher, todo, lambda: None)
        self._phase = None
        return self.scores.test_scores(wanted)


def _summarize(state: _RunState, stats: dict[str, float], test_scores: dict[str, float],
               num_workers: int, winner: Optional[tuple[int, float, Recipe]],
               selection: Optional[dict]) -> RunSummary:
    """The summary of a finished search: the winner, baselines, validation and test scores,
    racing, worker use."""
    board = state.board
    summary = RunSummary(
        run_id=state.ctl.run_id, run_dir=state.ctl.run_dir, trials=state.finished, failed=board.failed,
        best_trial=winner[0] if winner else None, best_fitness=winner[1] if winner else None,
        best_recipe_hash=winner[2].content_hash() if winner else None,
        baselines=dict(state.baselines), test_scores=test_scores,
        pareto_trials=board.front.trial_ids() if board.multi_objective else [],
        cached_trials=board.cached, failure_reasons=board.failure_reasons(),
    )
    from evomerge.selection import winner as winner_of
    from evomerge.uncertainty import run_uncertainty

    records = state.ledger.records()
    won, chosen = winner_of(records)
    sure = run_uncertainty(records, state.exp.suite.model_dump(mode="json"), won, state.exp.base_model, chosen)
    summary.evidence = sure.pop("evidence")
    summary.standard_errors = sure
    if selection is not None:
        summary.validation = {str(c["trial_id"]): c["validation"] for c in selection["candidates"]
                              if c["validation"] is not None}
        summary.validation_fitness = selection["validation_fitness"]
        summary.validation_corrected = selection.get("validation_corrected")
        summary.search_best_trial = state.best[0]
        summary.search_best_fitness = state.best[1]
    if state.racing is not None:
        summary.racing_stopped = stopped_per_rung(board.records)
        summary.item_evaluations = state.racing.race.items_scored
    loop_s, handled = stats["loop_s"], stats["handled"]
    if loop_s > 0 and handled:
        summary.search_seconds = loop_s
        # of the time workers were up: a pool starts searching with its first worker, and one lost
        # and started again is not idle while it is away
        summary.worker_seconds = stats["up_s"] or num_workers * loop_s
        summary.worker_busy_fraction = stats["busy"] / summary.worker_seconds
        summary.controller_ms_per_trial = 1000.0 * (loop_s - stats["wait_s"]) / handled
        if stats["steady_s"]:
            summary.steady_busy_fraction = stats["steady_busy"] / (stats["steady_up_s"] or num_workers * stats["steady_s"])
    return summary
