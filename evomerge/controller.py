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
import fcntl
import json
import math
import os
import secrets
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import yaml

from evomerge import __version__
from evomerge.config import ZOO_PREFIX, Experiment, parse_experiment
from evomerge.dispatch.base import Dispatcher
from evomerge.errors import ConfigError, EvomergeError
from evomerge.fitness_cache import FitnessCache, recipe_key, source_key
from evomerge.islands import Candidate, IslandScheduler, ReplayError, Tell, build_islands, replay
from evomerge.ledger import DAMAGED, Ledger
from evomerge.run_dir import RUN_INFO, read_info, write_info, write_json_atomic
from evomerge.optimize import build_optimizer
from evomerge.pareto import ParetoFront
from evomerge.recipe import Recipe, load_recipe, recipe_from_dict
from evomerge.architecture import for_config
from evomerge.sources import model_config
from evomerge.space import DFSCodec, PSCodec
from evomerge.tracking import GuardedTracker, build_tracker, default_tracking_uri
from evomerge.tracking.base import Tracker
from evomerge.tracking.null import NullTracker
from evomerge.worker import EvalRequest, EvalResult, TrialWorker, WorkerSpec

LEDGER = "ledger.jsonl"
SUMMARY = "summary.json"
BEST_RECIPE = "best_recipe.yaml"
PARETO = "pareto.json"
EXPERIMENT_COPY = "experiment.yaml"
EXPERIMENT_SOURCE = "experiment.source.yaml"  # the file as the user wrote it (paths unresolved)


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
    worker_busy_fraction: Optional[float] = None
    controller_ms_per_trial: Optional[float] = None
    search_seconds: Optional[float] = None  # the search loop alone (no start-up, no test split)
    steady_busy_fraction: Optional[float] = None  # busy share until the budget was all handed out
    pareto_trials: list[int] = field(default_factory=list)  # multi-objective runs: the Pareto front
    cached_trials: int = 0  # trials answered by the fitness cache (no worker)
    failure_reasons: list[list] = field(default_factory=list)  # [[reason, count], ...], commonest first

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


def new_run_id(name: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def resolve_worker_spec(exp: Experiment, progress: Optional[Callable[[str], None]] = None) -> WorkerSpec:
    """Model dirs and task dirs on this machine (building the embedded zoo if the experiment uses it)."""
    zoo = None
    if exp.zoo is not None:
        from evomerge.zoo import build_zoo

        zoo = build_zoo(kind=exp.zoo.kind, seed=exp.zoo.seed, progress=progress)
    model_dirs: dict[str, str] = {}
    problems = []
    for m in exp.models:
        if m.path.startswith(ZOO_PREFIX):
            key = m.path[len(ZOO_PREFIX) :]
            if key not in zoo.models:
                problems.append(f"models: {m.name}: the {exp.zoo.kind} zoo has no model {key!r}; it has {sorted(zoo.models)}")
                continue
            model_dirs[m.name] = str(zoo.models[key])
        else:
            model_dirs[m.name] = m.path
    if problems:
        raise ConfigError(problems)
    task_paths = tuple(str(zoo.tasks_dir) if p == "zoo" else p for p in exp.suite.task_paths)
    threads = exp.dispatch.threads_per_worker or max(1, (os.cpu_count() or 1) // exp.dispatch.num_workers)
    space = exp.search_space
    dfs = {}
    if space.kind == "dfs":
        donor = None
        if space.ps_donor is not None:
            donor = (space.ps_donor.name, ps_donor_recipe(space.ps_donor.recipe).to_dict())
        dfs = {"mode": "dfs", "dfs_donors": space.models, "dfs_embed_from": space.embed_from, "ps_donor": donor}
    return WorkerSpec(
        model_dirs=model_dirs,
        base_model=exp.base_model,
        suite=exp.suite,
        task_paths=task_paths,
        device=exp.dispatch.device,
        dtype=exp.dispatch.dtype,
        threads=threads,
        trusted=tuple(m.name for m in exp.models if m.trust_remote_code),
        **dfs,
    )


def suite_problems(exp: Experiment, task_paths: Optional[tuple[str, ...]] = None) -> list[str]:
    """What is wrong with the experiment's fitness suite (see ``lm_eval_runner.check_suite``).

    ``task_paths``: the resolved task dirs; by default the zoo's (``zoo``) is used if it is
    built, and if not, zoo tasks are checked by name only (the zoo's tasks are fixed).
    """
    from evomerge.evaluate.lm_eval_runner import check_suite

    suite = exp.suite
    problems: list[str] = []
    if task_paths is None:
        paths = []
        for p in suite.task_paths:
            if p != "zoo":
                paths.append(p)
                continue
            from evomerge.zoo import zoo_dir
            from evomerge.zoo.tasks import LANGUAGES, task_name

            tasks_dir = zoo_dir(exp.zoo.kind, exp.zoo.seed) / "tasks"
            if any(tasks_dir.glob("*.yaml")):
                paths.append(str(tasks_dir))
                continue
            known = {task_name(lang, split) for lang in LANGUAGES for split in ("search", "test")}
            for part in ("tasks", "test_tasks"):
                for i, t in enumerate(getattr(suite, part)):
                    if t.name.startswith("zoo_") and t.name not in known:
                        problems.append(f"suite.{part}.{i}.name: the zoo has no task {t.name!r}; it has {sorted(known)}")
                    elif t.name in known and t.metric != "acc":
                        problems.append(f"suite.{part}.{i}.metric: {t.name} reports 'acc', not {t.metric!r}")
            suite = suite.model_copy(update={f: tuple(t for t in getattr(suite, f) if not t.name.startswith("zoo_"))
                                             for f in ("tasks", "test_tasks")})
        task_paths = tuple(paths)
        if not suite.tasks and not suite.test_tasks and not suite.model_args:
            return problems
    return problems + check_suite(suite, task_paths)


def source_problems(exp: Experiment, model_dirs: Optional[dict[str, str]] = None, download: bool = False) -> list[str]:
    """What keeps the experiment's sources from being merged as it asks (see
    :func:`evomerge.architecture.source_problems`), from their config.json files.

    ``model_dirs``: the resolved sources (by default: local dirs and the zoo if it is built).
    Without ``download``, a Hub source not in the local cache and with no declared ``config``
    is not checked here (the run checks it once it has its config).
    """
    from evomerge.architecture import source_problems as check

    if model_dirs is None:
        model_dirs = {}
        zoo_models: dict[str, Any] = {}
        if exp.zoo is not None:
            from evomerge.zoo import ZooError, load_zoo, zoo_dir

            try:
                zoo_models = load_zoo(zoo_dir(exp.zoo.kind, exp.zoo.seed)).models
            except ZooError:
                pass  # not built yet: its models are one architecture by construction
        for m in exp.models:
            if not m.path.startswith(ZOO_PREFIX):
                model_dirs[m.name] = m.path
            elif m.path[len(ZOO_PREFIX):] in zoo_models:
                model_dirs[m.name] = str(zoo_models[m.path[len(ZOO_PREFIX):]])
    declared = {m.name: m.config for m in exp.models}
    configs = {}
    problems = []
    for name, path in model_dirs.items():
        try:
            configs[name] = model_config(path, declared.get(name), download)
        except ConfigError as exc:
            if download:
                problems.extend(exc.problems)
        except (OSError, ValueError) as exc:
            problems.append(f"models: {name}: cannot read its config.json ({type(exc).__name__}: {exc})")
    space = exp.search_space
    if space.kind == "ps":
        return problems + check(configs, ps_models=tuple(m.name for m in exp.models), base_model=exp.base_model)
    donors = tuple(space.models or [m.name for m in exp.models])
    embed_from = space.embed_from or exp.base_model
    if space.ps_donor is not None:  # merged from the sources in parameter space, lends layers too
        donors = (*donors, exp.base_model)
    elif embed_from not in donors:
        donors = (embed_from, *donors)
    return problems + check(configs, ps_models=tuple(m.name for m in exp.models) if space.ps_donor else (),
                            base_model=exp.base_model, dfs_donors=donors, dfs_scaling=space.scaling)


def ps_donor_recipe(path: str) -> Recipe:
    """The PS recipe of a PS+DFS donor: a recipe YAML, or a run dir's best_recipe.yaml."""
    p = Path(path)
    if p.is_dir():
        p = p / BEST_RECIPE
    recipe = load_recipe(p)
    if not isinstance(recipe, Recipe):
        raise ConfigError([f"search_space.ps_donor.recipe: {p} is a {recipe.kind} recipe; a PS recipe is needed"])
    return recipe


def build_codec(exp: Experiment, spec: WorkerSpec, download: bool = True):
    """The genome <-> recipe codec of the experiment's search space.

    Layer counts come from each model's config.json (see :func:`evomerge.sources.model_config`;
    ``download=False`` for planning, which then needs local, cached or declared configs).
    """
    declared = {m.name: m.config for m in exp.models}

    def layers(name: str) -> int:
        return num_layers_of(spec.model_dirs[name], declared.get(name), download)

    space = exp.search_space
    if space.kind == "ps":
        return PSCodec(space=space, base_model=exp.base_model, models=exp.merged_models,
                       num_layers=layers(exp.base_model), seed=exp.optimizer.seed, dtype=exp.dispatch.dtype)
    donors = list(space.models or [m.name for m in exp.models])
    per_donor = [layers(d) for d in donors]
    recipes = {}
    if spec.ps_donor is not None:
        name, recipe = spec.ps_donor
        donors.append(name)
        per_donor.append(layers(exp.base_model))
        recipes[name] = Recipe.from_dict(recipe)
    return DFSCodec(space=space, donors=tuple(donors), layers_per_donor=tuple(per_donor),
                    embed_from=space.embed_from or exp.base_model, donor_recipes=recipes, dtype=exp.dispatch.dtype)


def num_layers_of(model_dir: str, declared: Optional[str] = None, download: bool = True) -> int:
    config = model_config(model_dir, declared, download)
    return for_config(config, str(model_dir)).num_layers(config)


def build_dispatcher(exp: Experiment, spec: WorkerSpec,
                     worker_factory: Callable[[WorkerSpec], Any] = TrialWorker) -> Dispatcher:
    if exp.dispatch.backend == "local":
        from evomerge.dispatch.local import LocalDispatcher

        return LocalDispatcher(spec, worker_factory)
    from evomerge.dispatch.ray_pool import RayDispatcher

    gpus = 1.0 if exp.dispatch.device.startswith("cuda") else 0.0
    return RayDispatcher(spec, exp.dispatch.num_workers, address=exp.dispatch.address, num_gpus_per_worker=gpus,
                         max_retries=exp.dispatch.max_retries, trial_timeout=exp.dispatch.trial_timeout,
                         worker_factory=worker_factory)


class RunLock:
    """An exclusive lock on a run directory, held while a controller works on it.

    An flock dies with its process (even on SIGKILL), so a crashed run is never
    left locked; two controllers can never write one ledger.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise EvomergeError(f"run {self.path.parent} is in use by {holder}; wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def is_held(run_dir: Path) -> bool:
        path = Path(run_dir) / ".lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def load_run_experiment(run_dir: Path) -> Experiment:
    """The resolved experiment a run was started with (its ``experiment.yaml``)."""
    path = Path(run_dir) / EXPERIMENT_COPY
    if not (Path(run_dir) / RUN_INFO).exists() or not path.exists():
        raise EvomergeError(f"{run_dir} is not an evomerge run directory (no {RUN_INFO} / {EXPERIMENT_COPY})")
    return parse_experiment(yaml.safe_load(path.read_text()), Path(run_dir))


def _normalized(res: EvalResult) -> EvalResult:
    """A "complete" result must carry a finite fitness; anything else is a failure with a reason."""
    if res.state == "complete" and (res.fitness is None or not math.isfinite(res.fitness)):
        res.state, res.error, res.fitness = "failed", f"fitness is not finite: {res.fitness}", None
    if res.state != "complete":
        res.fitness = None
        res.error = res.error or "failed without a reason"
    return res


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
    ) -> None:
        """``worker_factory`` builds a worker from its spec inside each worker process;
        ``dispatcher_factory`` replaces the experiment's dispatcher (simulations); ``source``:
        the experiment file as the user wrote it (kept and logged next to the resolved config)."""
        self.exp = exp
        self.source = Path(source) if source else None
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.progress = progress or _NoProgress()
        self.worker_factory = worker_factory
        self.dispatcher_factory = dispatcher_factory

    # ------------------------------------------------------------------ entry points
    def run(self) -> RunSummary:
        """Start a new run; the run directory must not hold one."""
        if (self.run_dir / LEDGER).exists() or (self.run_dir / RUN_INFO).exists():
            raise ConfigError([f"run directory {self.run_dir} already holds a run; choose another --run-dir "
                               f"or continue it with `evomerge resume {self.run_dir}`"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self._execute(resuming=False)

    @classmethod
    def for_resume(cls, run_dir: Path, *, max_trials: Optional[int] = None, progress: Optional[Progress] = None,
                   worker_factory: Callable[[WorkerSpec], Any] = TrialWorker,
                   dispatcher_factory: Optional[Callable[[Experiment, WorkerSpec], Dispatcher]] = None,
                   ) -> "Controller":
        """A controller that continues the run in ``run_dir`` (optionally with a larger budget)."""
        run_dir = Path(run_dir)
        exp = load_run_experiment(run_dir)
        if max_trials is not None:
            if max_trials < exp.budget.max_trials:
                raise ConfigError([f"--max-trials: can only extend a run; {run_dir.name} has max_trials "
                                   f"{exp.budget.max_trials}"])
            exp = exp.model_copy(update={"budget": exp.budget.model_copy(update={"max_trials": max_trials})})
        return cls(exp, run_dir, progress=progress, worker_factory=worker_factory,
                   dispatcher_factory=dispatcher_factory)

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
            (self.run_dir / EXPERIMENT_COPY).write_text(exp.to_yaml())
        elif exp.budget.max_trials != yaml.safe_load((self.run_dir / EXPERIMENT_COPY).read_text())["budget"]["max_trials"]:
            (self.run_dir / EXPERIMENT_COPY).write_text(exp.to_yaml())  # an extended budget is part of the run now
        ledger = Ledger(self.run_dir / LEDGER)
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
        scheduler = build_islands(
            n_islands, lambda seed: build_optimizer(exp.optimizer, codec.dim, seed=seed, num_objectives=n_objectives,
                                                    start=start),
            codec.decode,
            exp.budget.max_trials, exp.optimizer.failure_fitness, exp.optimizer.seed,
        )
        state = _RunState(self, exp, ledger, scheduler)
        from evomerge.zoo.build import default_cache_dir

        state.cache = FitnessCache.for_run(exp.suite.cache, default_cache_dir(), exp, spec.model_dirs, spec.task_paths)
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
        if resuming:
            info["resumed"] = int(info.get("resumed", 0)) + 1
        else:
            ledger.path.touch()  # with run.json: from now on a missing ledger is a lost one (_check_ledger)
        write_info(self.run_dir, info)
        state.tracker = tracker
        if not resuming:
            tracker.log_artifact(self.run_dir / EXPERIMENT_COPY)
            if self.source is not None and self.source.is_file():
                kept = self.run_dir / EXPERIMENT_SOURCE
                kept.write_text(self.source.read_text())
                tracker.log_artifact(kept)
        state.catch_up_tracker()
        if resuming:
            self.progress.message(f"resuming {self.run_id}: {state.finished} trials done, "
                                  f"{len(state.redo)} to run again, {len(state.missing_tells)} tells replayed")

        self.progress.message(f"starting {exp.dispatch.num_workers} {exp.dispatch.backend} worker(s), "
                              f"{n_islands} island(s) of popsize {popsize}")
        if self.dispatcher_factory is not None:
            dispatcher = self.dispatcher_factory(exp, spec)
        else:
            dispatcher = build_dispatcher(exp, spec, self.worker_factory)
        status = "FAILED"
        try:
            summary = state.search(dispatcher)
            summary.tracking_uri = tracking_uri
            summary.mlflow_run_id = mlflow_run_id
            summary.seconds = time.perf_counter() - t_start
            summary.islands = n_islands
            summary.resumed = resuming
            write_json_atomic(self.run_dir / SUMMARY, summary.to_json())
            for name in (SUMMARY, LEDGER, BEST_RECIPE, PARETO):
                if (self.run_dir / name).exists():
                    tracker.log_artifact(self.run_dir / name)
            best = (state.best[0], state.best[2].to_dict()) if state.best else None
            try:
                plots = write_plots(self.run_dir, self.run_id, state.trial_records, state.baselines, best)
            except Exception as exc:  # a plot must never fail a finished search
                plots = []
                self.progress.message(f"plots skipped: {type(exc).__name__}: {exc}")
            for plot in plots:
                tracker.log_artifact(plot)
            status = "FINISHED"
            return summary
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            dispatcher.close()
            tracker.finish(status)
            info["status"] = status.lower()
            info["updated_at"] = _dt.datetime.now().isoformat()
            if tracker.error:
                info["tracking_error"] = tracker.error
            try:
                write_info(self.run_dir, info)
            except OSError as exc:  # never hide the error that stopped the run behind this one
                self.progress.message(f"could not update {RUN_INFO} ({type(exc).__name__}: {exc})")
                if status == "FINISHED":
                    raise
            self.progress.close()

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


class _RunState:
    """What a run knows: rebuilt from the ledger on resume, advanced by the event loop."""

    def __init__(self, ctl: Controller, exp: Experiment, ledger: Ledger, scheduler: IslandScheduler) -> None:
        self.ctl = ctl
        self.exp = exp
        self.ledger = ledger
        self.scheduler = scheduler
        self.tracker: Tracker = NullTracker()
        self.sources = [m.name for m in exp.models]
        self.best: Optional[tuple[int, float, Recipe]] = None
        self.baselines: dict[str, float] = {}
        self.baselines_done: set[str] = set()
        self.tests_done: dict[tuple[str, Optional[str]], dict] = {}
        self.trial_records: list[dict] = []
        self.failed = 0
        self.next_trial_id = 0
        self.redo: list[Candidate] = []
        self.missing_tells: list[Tell] = []
        self.multi_objective = exp.optimizer.objectives == "per_task"
        self.front = ParetoFront()
        self._tracker_backlog: list[tuple[int, dict[str, float]]] = []
        self.cache: Optional[FitnessCache] = None
        self.cached_trials = 0

    @property
    def finished(self) -> int:
        return len(self.trial_records)

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
            elif kind == "trial":
                finished[rec["trial_id"]] = rec
                self._note_trial(rec)
                self.cached_trials += bool(rec.get("cached_from"))
                self._remember(recipe_key(rec["recipe_hash"]), "search", rec)
            elif kind == "tell":
                tells[(rec["island"], rec["generation"])] = rec
            elif kind == "baseline":
                self.baselines_done.add(rec["model"])
                self._remember(source_key(rec["model"]), "search", rec)
                if rec["state"] == "complete":
                    self.baselines[rec["model"]] = float(rec["fitness"])
            elif kind == "test":
                self.tests_done[(rec["model"], rec.get("recipe_hash"))] = rec
                key = recipe_key(rec["recipe_hash"]) if rec.get("recipe_hash") else source_key(rec["model"])
                self._remember(key, "test", rec)
        try:
            self.redo, self.missing_tells = replay(self.scheduler, dispatched, finished, tells, self._told_input)
        except ReplayError as exc:
            raise EvomergeError(f"cannot resume {self.ctl.run_id}: {exc}") from None
        for tell in self.missing_tells:
            self._record_tell(tell)
        if self.best is not None:
            self.best[2].save(self.ctl.run_dir / BEST_RECIPE)
        if self.multi_objective:
            self._write_pareto()

    def _told_input(self, rec: dict):
        """What a trial record tells its island: the fitness, or the vector of objectives."""
        return rec.get("objectives") if self.multi_objective else rec["fitness"]

    def _note_trial(self, rec: dict) -> bool:
        """Count a finished trial and update the best (ties: the earliest finished) and the
        Pareto front; True if the front changed."""
        self.trial_records.append(rec)
        if rec["state"] != "complete":
            self.failed += 1
            return False
        if self.best is None or rec["fitness"] > self.best[1]:
            self.best = (rec["trial_id"], float(rec["fitness"]), recipe_from_dict(rec["recipe"]))
        return self.multi_objective and self.front.add(rec["trial_id"], rec["objectives"])

    def _write_pareto(self) -> None:
        by_id = {r["trial_id"]: r for r in self.trial_records}
        write_json_atomic(self.ctl.run_dir / PARETO, {
            "objectives": [t.name for t in self.exp.suite.tasks],
            "members": [{"trial_id": t, "objectives": self.front.members[t], "fitness": by_id[t]["fitness"],
                         "recipe_hash": by_id[t]["recipe_hash"]} for t in self.front.trial_ids()],
        })

    def catch_up_tracker(self) -> None:
        """Log the trials the tracker missed (it was down, or the process died between ledger and tracker)."""
        logged = self.tracker.logged_trials()
        self._tracker_backlog.extend(trial_metric_rows(self.trial_records, self.multi_objective, logged))
        self._flush_tracker()

    # ------------------------------------------------------------------ event loop
    def search(self, dispatcher: Dispatcher) -> RunSummary:
        exp = self.exp
        progress = self.ctl.progress
        queue: deque[_Work] = deque(
            _Work("baseline", EvalRequest(trial_id=-(i + 1), source=name, split="search"), label=name)
            for i, name in enumerate(self.sources) if name not in self.baselines_done
        )
        queue.extend(_Work("trial", self._request(c), candidate=c) for c in self.redo)
        self.redo = []
        progress.start(exp.budget.max_trials, done=self.finished)
        stats = self._loop(dispatcher, queue, self._next_candidate, exhausted=lambda: self.scheduler.exhausted)
        busy, loop_s, wait_s, handled = stats["busy"], stats["loop_s"], stats["wait_s"], stats["handled"]
        progress.close()

        test_scores: dict[str, float] = {}
        if exp.suite.test_tasks and self.best is not None:
            progress.message("scoring the best recipe and the sources on the held-out test split")
            test_scores = self._test_split(dispatcher)

        best = self.best
        summary = RunSummary(
            run_id=self.ctl.run_id, run_dir=self.ctl.run_dir, trials=self.finished, failed=self.failed,
            best_trial=best[0] if best else None, best_fitness=best[1] if best else None,
            best_recipe_hash=best[2].content_hash() if best else None,
            baselines=dict(self.baselines), test_scores=test_scores,
            pareto_trials=self.front.trial_ids() if self.multi_objective else [],
            cached_trials=self.cached_trials,
            failure_reasons=[[reason, n] for reason, n in Counter(
                failure_reason(t.get("error")) for t in self.trial_records if t.get("state") != "complete"
            ).most_common(3)],
        )
        if loop_s > 0 and handled:
            summary.search_seconds = loop_s
            summary.worker_busy_fraction = busy / (dispatcher.num_workers * loop_s)
            summary.controller_ms_per_trial = 1000.0 * (loop_s - wait_s) / handled
            if stats["steady_s"]:
                summary.steady_busy_fraction = stats["steady_busy"] / (dispatcher.num_workers * stats["steady_s"])
        self.tracker.log_summary({f"baseline.{k}": v for k, v in self.baselines.items()}
                                 | {f"test.{k}": v for k, v in test_scores.items()}
                                 | ({"best_fitness_final": best[1]} if best else {}))
        return summary

    def _next_candidate(self) -> Optional[_Work]:
        cand = self.scheduler.next()
        if cand is None:
            return None
        cand.trial_id = self.next_trial_id
        self.next_trial_id += 1
        return _Work("trial", self._request(cand), candidate=cand)

    def _request(self, cand: Candidate) -> EvalRequest:
        return EvalRequest(trial_id=int(cand.trial_id), recipe=cand.recipe.to_dict())

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
        steady_busy, steady_s = 0.0, None
        t0 = time.perf_counter()
        while True:
            # refill free workers first: the ledger already has the results; the tracker
            # (milliseconds per call over HTTP) catches up while the workers run
            while len(inflight) < dispatcher.num_workers:
                work = queue.popleft() if queue else more()
                if work is None:
                    break
                if work.kind == "trial":
                    self._record_dispatch(work.candidate)
                hit = self._from_cache(work)
                if hit is not None:  # a score already known: no worker needed
                    handled += 1
                    getattr(self, f"_on_{work.kind}")(work, hit)
                    continue
                inflight[(work.request.split, work.request.trial_id)] = work
                dispatcher.submit(work.request)
            self._flush_tracker()
            if steady_s is None and not queue and exhausted():
                steady_s = time.perf_counter() - t0
            if not inflight:
                break
            tw = time.perf_counter()
            results = dispatcher.wait(timeout=1.0)
            wait_s += time.perf_counter() - tw
            for res in results:
                work = inflight.pop((res.split, res.trial_id))
                res = _normalized(res)
                if self.cache is not None and res.state == "complete":
                    self.cache.put(*_cache_key(work), res.fitness, res.scores, origin=self._origin(work))
                busy += res.merge_seconds + res.eval_seconds
                if steady_s is None:
                    steady_busy += res.merge_seconds + res.eval_seconds
                handled += 1
                getattr(self, f"_on_{work.kind}")(work, res)
        return {"busy": busy, "loop_s": time.perf_counter() - t0, "wait_s": wait_s, "handled": handled,
                "steady_busy": steady_busy, "steady_s": steady_s or 0.0}

    # ------------------------------------------------------------------ fitness cache
    def _from_cache(self, work: _Work) -> Optional[EvalResult]:
        if self.cache is None:
            return None
        rec = self.cache.get(*_cache_key(work))
        if rec is None:
            return None
        return EvalResult(trial_id=work.request.trial_id, state="complete", fitness=rec["fitness"],
                          scores=dict(rec["scores"]), worker="cache", split=work.request.split,
                          cached_from=rec.get("origin") or "cache")

    def _remember(self, key: str, split: str, rec: dict) -> None:
        """A score from this run's ledger (resume): in memory only, it is in the shared file already."""
        if self.cache is not None and rec.get("state") == "complete":
            self.cache.put(key, split, rec["fitness"], rec.get("scores") or {}, origin="ledger", persist=False)

    def _origin(self, work: _Work) -> str:
        what = f"trial {work.request.trial_id}" if work.kind == "trial" else f"{work.kind} {work.label}"
        return f"{self.ctl.run_id}: {what}"

    # ------------------------------------------------------------------ records
    def _record_dispatch(self, cand: Candidate) -> None:
        self.ledger.append({
            "kind": "dispatch", "trial_id": cand.trial_id, "island": cand.island, "generation": cand.generation,
            "member": cand.member, "genome": [float(x) for x in cand.genome],
            "recipe_hash": cand.recipe.content_hash(), "at": time.time(),
        })

    def _on_trial(self, work: _Work, res: EvalResult) -> None:
        """Ledger first (the source of truth), then best_recipe.yaml, tracker, optimizer, progress."""
        cand = work.candidate
        objectives = None
        if self.multi_objective and res.state == "complete":
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
            self.cached_trials += 1
        if self.multi_objective:
            rec["objectives"] = objectives
        self.ledger.append(rec)
        previous_best = self.best
        if self._note_trial(rec):
            self._write_pareto()
        if self.best is not previous_best:
            self.best[2].save(self.ctl.run_dir / BEST_RECIPE)
        # tracking waits until the free workers have their next candidates (see _loop)
        self._tracker_backlog.append((self.finished - 1, _trial_metrics(
            rec, self.best[1] if self.best else None, len(self.front.members) if self.multi_objective else None)))
        tell = self.scheduler.receive(cand, res.state, self._told_input(rec))
        if tell is not None:
            self._record_tell(tell)
        if res.state != "complete":
            self.ctl.progress.message(f"trial {res.trial_id} failed: {res.error.splitlines()[0]}")
        self.ctl.progress.advance(self.best[1] if self.best else None, self.failed)

    def _flush_tracker(self) -> None:
        if self._tracker_backlog:
            self.tracker.log_trials(self._tracker_backlog)
            self._tracker_backlog = []

    def _record_tell(self, tell: Tell) -> None:
        self.ledger.append({"kind": "tell", "island": tell.island, "generation": tell.generation,
                            "trial_ids": list(tell.trial_ids), "values": list(tell.values), "state": tell.state,
                            "at": time.time()})

    def _on_baseline(self, work: _Work, res: EvalResult) -> None:
        self.ledger.append({"kind": "baseline", "model": work.label, "split": res.split, "state": res.state,
                            "fitness": res.fitness, "scores": res.scores, "eval_seconds": res.eval_seconds,
                            "error": res.error, "finished_at": time.time(),
                            **({"cached_from": res.cached_from} if res.cached_from else {})})
        self.baselines_done.add(work.label)
        if res.state == "complete":
            self.baselines[work.label] = float(res.fitness)
        else:
            self.ctl.progress.message(f"baseline {work.label} failed: {res.error.splitlines()[0]}")

    def _on_test(self, work: _Work, res: EvalResult) -> None:
        rec = {"kind": "test", "model": work.label, "trial_id": self.best[0] if work.label == "best" else None,
               "recipe_hash": work.recipe_hash, "split": "test", "state": res.state, "fitness": res.fitness,
               "scores": res.scores, "eval_seconds": res.eval_seconds, "error": res.error,
               "finished_at": time.time(), **({"cached_from": res.cached_from} if res.cached_from else {})}
        self.ledger.append(rec)
        self.tests_done[(work.label, work.recipe_hash)] = rec

    def _test_split(self, dispatcher: Dispatcher) -> dict[str, float]:
        _, _, recipe = self.best
        wanted = [_Work("test", EvalRequest(trial_id=0, recipe=recipe.to_dict(), split="test"), label="best",
                        recipe_hash=recipe.content_hash())]
        wanted += [_Work("test", EvalRequest(trial_id=i + 1, source=name, split="test"), label=name)
                   for i, name in enumerate(self.sources)]
        queue = deque(w for w in wanted if (w.label, w.recipe_hash) not in self.tests_done)
        self._loop(dispatcher, queue, lambda: None)
        out = {}
        for w in wanted:
            rec = self.tests_done.get((w.label, w.recipe_hash))
            if rec is not None and rec["state"] == "complete":
                out[w.label] = float(rec["fitness"])
        return out


def write_plots(run_dir: Path, run_id: str, trials: list[dict], baselines: dict[str, float],
                best: Optional[tuple[int, dict]]) -> list[Path]:
    """The run's plots (``plots/*.svg``): fitness over trials, and the best recipe's
    coefficients (PS) or layer path (DFS). ``best``: (trial id, recipe dict)."""
    from evomerge import plots

    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    out = [folder / "fitness.svg"]
    out[0].write_text(plots.fitness_svg(trials, baselines, title=f"{run_id}: fitness over trials"))
    if best is not None:
        trial_id, recipe = best
        if recipe.get("kind", "ps") == "ps":
            out.append(folder / "coefficients.svg")
            out[-1].write_text(plots.coefficients_svg(recipe, title=f"best recipe (trial {trial_id}): coefficients"))
        else:
            out.append(folder / "layer_path.svg")
            out[-1].write_text(plots.path_svg(recipe, title=f"best recipe (trial {trial_id}): layer path"))
    return out


def trial_metric_rows(trials: list[dict], multi_objective: bool, start: int = 0) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) of each trial record from ``start`` on, with the best so far (and Pareto size)."""
    rows = []
    best: Optional[float] = None
    front = ParetoFront()
    for step, rec in enumerate(trials):
        if rec["state"] == "complete":
            best = rec["fitness"] if best is None else max(best, rec["fitness"])
            if multi_objective:
                front.add(rec["trial_id"], rec["objectives"])
        if step >= start:
            rows.append((step, _trial_metrics(rec, best, len(front.members) if multi_objective else None)))
    return rows


def _trial_metrics(rec: dict, best: Optional[float], pareto_size: Optional[int] = None) -> dict[str, float]:
    metrics = {"trial_id": float(rec["trial_id"]), "island": float(rec["island"]),
               "generation": float(rec["generation"]), "merge_seconds": rec["merge_seconds"],
               "eval_seconds": rec["eval_seconds"], "failed": float(rec["state"] != "complete"),
               "cached": float(bool(rec.get("cached_from")))}
    if best is not None:
        metrics["best_fitness"] = best
    if pareto_size is not None:
        metrics["pareto_size"] = float(pareto_size)
    if rec["fitness"] is not None:
        metrics["fitness"] = rec["fitness"]
        metrics.update({f"score.{k}": v for k, v in rec["scores"].items()})
    metrics.update(_recipe_metrics(rec.get("recipe") or {}))
    return metrics


MAX_PARAM_METRICS = 64  # more per-trial curves than this would slow the MLflow UI down for nothing


def _recipe_metrics(recipe: dict) -> dict[str, float]:
    """A trial's recipe as MLflow curves: PS coefficients (``param.<model>.<name>[.<group>]``,
    up to MAX_PARAM_METRICS values; all are in the ledger), DFS path length and mean scale."""
    if recipe.get("kind") == "dfs":
        scales = [s["scale"] for s in recipe.get("layers", [])]
        return {"path_length": float(len(scales)), "path_mean_scale": sum(scales) / len(scales) if scales else 0.0}
    out: dict[str, float] = {}
    for m in recipe.get("models", []):
        for name, v in m.get("parameters", {}).items():
            if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
                groups = ["embed", *(f"block{i}" for i in range(len(v) - 2)), "head"]
                out.update({f"param.{m['model']}.{name}.{g}": float(x) for g, x in zip(groups, v)})
            elif isinstance(v, (int, float)):
                out[f"param.{m['model']}.{name}"] = float(v)
            # gradients and filters (hand-written start recipes) have no single curve value
    return out if len(out) <= MAX_PARAM_METRICS else {}
