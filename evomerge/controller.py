"""The controller owns the search loop: ask → dispatch → tell → record.

Libraries never own the loop: the optimizer only answers ask/tell, the
dispatcher only runs requests, the tracker only records. Every finished trial
is appended to the ledger (the run's source of truth) before anything else.
Failed trials (exception, non-finite fitness, worker death) are recorded with
their reason and told to the optimizer with a penalty — in ``penalized`` only.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np

from evomerge import __version__
from evomerge.config import ZOO_PREFIX, Experiment
from evomerge.dispatch.base import Dispatcher
from evomerge.errors import ConfigError
from evomerge.ledger import Ledger
from evomerge.optimize import build_optimizer
from evomerge.recipe import Recipe
from evomerge.space import PSCodec
from evomerge.tracking import build_tracker, default_tracking_uri
from evomerge.tracking.base import Tracker
from evomerge.worker import EvalRequest, EvalResult, WorkerSpec

LEDGER = "ledger.jsonl"
RUN_INFO = "run.json"
SUMMARY = "summary.json"
BEST_RECIPE = "best_recipe.yaml"
EXPERIMENT_COPY = "experiment.yaml"


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, best: Optional[float], failed: int) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class _NoProgress:
    def start(self, total: int) -> None:
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

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["run_dir"] = str(self.run_dir)
        return d


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
    return WorkerSpec(
        model_dirs=model_dirs,
        base_model=exp.base_model,
        suite=exp.suite,
        task_paths=task_paths,
        device=exp.dispatch.device,
        threads=threads,
        trust_remote_code=any(m.trust_remote_code for m in exp.models),
    )


def num_layers_of(model_dir: str) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg["num_hidden_layers"])


def build_dispatcher(exp: Experiment, spec: WorkerSpec) -> Dispatcher:
    if exp.dispatch.backend == "local":
        from evomerge.dispatch.local import LocalDispatcher

        return LocalDispatcher(spec)
    from evomerge.dispatch.ray_pool import RayDispatcher

    gpus = 1.0 if exp.dispatch.device.startswith("cuda") else 0.0
    return RayDispatcher(spec, exp.dispatch.num_workers, address=exp.dispatch.address, num_gpus_per_worker=gpus)


def penalized(result: EvalResult, history: list[float], failure_fitness: Optional[float]) -> float:
    """The one place a failed trial becomes a number for the optimizer.

    Complete trials pass their fitness through. Failed ones get ``failure_fitness``
    if the experiment sets it, else one below the worst fitness seen so far
    (or -1 before any success), so failures always rank last.
    """
    if result.state == "complete" and result.fitness is not None and math.isfinite(result.fitness):
        return float(result.fitness)
    if failure_fitness is not None:
        return failure_fitness
    return (min(history) if history else 0.0) - 1.0


def _next_results(dispatcher: Dispatcher) -> list[EvalResult]:
    """Results that are ready (waiting up to a second); the caller still expects some."""
    if dispatcher.pending() == 0:
        raise RuntimeError("internal error: waiting for results but the dispatcher holds no requests")
    return dispatcher.wait(timeout=1.0)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Controller:
    """Runs one experiment into one run directory."""

    def __init__(
        self,
        exp: Experiment,
        run_dir: Path,
        *,
        progress: Optional[Progress] = None,
    ) -> None:
        self.exp = exp
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.progress = progress or _NoProgress()

    def run(self) -> RunSummary:
        t_start = time.perf_counter()
        exp = self.exp
        if (self.run_dir / LEDGER).exists():
            raise ConfigError([f"run directory {self.run_dir} already holds a run; choose another --run-dir"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / EXPERIMENT_COPY).write_text(exp.to_yaml())
        ledger = Ledger(self.run_dir / LEDGER)

        spec = resolve_worker_spec(exp, progress=self.progress.message)
        codec = PSCodec(
            space=exp.search_space,
            base_model=exp.base_model,
            models=exp.merged_models,
            num_layers=num_layers_of(spec.model_dirs[exp.base_model]),
            seed=exp.optimizer.seed,
        )
        optimizer = build_optimizer(exp.optimizer, codec.dim)
        tracking_uri = default_tracking_uri(exp.tracking, self.run_dir)
        tracker = build_tracker(
            exp.tracking, tracking_uri=tracking_uri, experiment_name=exp.tracking.experiment_name or exp.name
        )
        mlflow_run_id = tracker.start(
            self.run_id,
            params=self._params(codec, optimizer.popsize),
            tags={"evomerge.version": __version__, "evomerge.experiment": exp.name,
                  "evomerge.run_dir": str(self.run_dir.resolve()), "evomerge.seed": str(exp.optimizer.seed)},
        )
        _write_json_atomic(self.run_dir / RUN_INFO, {
            "run_id": self.run_id, "experiment": exp.name, "created_at": _dt.datetime.now().isoformat(),
            "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id, "status": "running",
            "dimension_names": list(codec.names), "popsize": optimizer.popsize,
        })
        tracker.log_artifact(self.run_dir / EXPERIMENT_COPY)

        self.progress.message(f"starting {exp.dispatch.num_workers} {exp.dispatch.backend} worker(s)")
        dispatcher = build_dispatcher(exp, spec)
        status = "FAILED"
        try:
            summary = self._search(exp, codec, optimizer, dispatcher, ledger, tracker)
            summary.tracking_uri = tracking_uri
            summary.mlflow_run_id = mlflow_run_id
            summary.seconds = time.perf_counter() - t_start
            _write_json_atomic(self.run_dir / SUMMARY, summary.to_json())
            for name in (SUMMARY, LEDGER, BEST_RECIPE):
                if (self.run_dir / name).exists():
                    tracker.log_artifact(self.run_dir / name)
            status = "FINISHED"
            return summary
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            dispatcher.close()
            tracker.finish(status)
            info = json.loads((self.run_dir / RUN_INFO).read_text())
            info["status"] = status.lower()
            _write_json_atomic(self.run_dir / RUN_INFO, info)
            self.progress.close()

    def _params(self, codec: PSCodec, popsize: int) -> dict[str, Any]:
        exp = self.exp
        return {
            "experiment": exp.name,
            "method": exp.search_space.method,
            "granularity": exp.search_space.granularity,
            "dimensions": codec.dim,
            "popsize": popsize,
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

    def _search(self, exp, codec, optimizer, dispatcher, ledger, tracker) -> RunSummary:
        max_trials = exp.budget.max_trials
        sources = [m.name for m in exp.models]
        # Source models' search fitness, as baselines; they run alongside the first generation.
        baseline_ids = {-(i + 1): name for i, name in enumerate(sources)}
        baselines_left = len(baseline_ids)
        for tid, name in baseline_ids.items():
            dispatcher.submit(EvalRequest(trial_id=tid, source=name, split="search"))

        history: list[float] = []
        best: Optional[tuple[int, float, Recipe]] = None
        baselines: dict[str, float] = {}
        failed = 0
        trial_id = 0
        generation = 0
        self.progress.start(max_trials)
        while trial_id < max_trials:
            genomes = optimizer.ask()
            batch = genomes[: max_trials - trial_id]
            pending: dict[int, tuple[np.ndarray, Recipe]] = {}
            for g in batch:
                recipe = codec.decode(g)
                pending[trial_id] = (g, recipe)
                dispatcher.submit(EvalRequest(trial_id=trial_id, recipe=recipe.to_dict()))
                trial_id += 1
            told: dict[int, float] = {}
            while len(told) < len(pending):
                for res in _next_results(dispatcher):
                    if res.trial_id < 0:
                        baselines_left -= 1
                        baselines.update(self._record_baseline(res, baseline_ids[res.trial_id], ledger, tracker))
                        continue
                    genome, recipe = pending[res.trial_id]
                    value = penalized(res, history, exp.optimizer.failure_fitness)
                    told[res.trial_id] = value
                    improved = res.state == "complete" and (best is None or value > best[1])
                    if res.state == "complete":
                        history.append(value)
                    else:
                        failed += 1
                    if improved:
                        best = (res.trial_id, value, recipe)
                    # step = order of completion, so best_fitness is a monotone curve in the UI
                    self._record_trial(res, genome, recipe, generation, value, best, ledger, tracker,
                                       step=len(history) + failed - 1)
                    if improved:
                        recipe.save(self.run_dir / BEST_RECIPE)
                    self.progress.advance(best[1] if best else None, failed)
            if len(batch) == len(genomes):
                order = sorted(pending)
                optimizer.tell([pending[i][0] for i in order], [told[i] for i in order])
            generation += 1
        self.progress.close()

        while baselines_left:
            for res in _next_results(dispatcher):
                baselines_left -= 1
                baselines.update(self._record_baseline(res, baseline_ids[res.trial_id], ledger, tracker))

        test_scores: dict[str, float] = {}
        if exp.suite.test_tasks and best is not None:
            self.progress.message("scoring the best recipe and the sources on the held-out test split")
            test_scores = self._test_split(best, sources, dispatcher, ledger, tracker)

        summary = RunSummary(
            run_id=self.run_id, run_dir=self.run_dir, trials=trial_id, failed=failed,
            best_trial=best[0] if best else None, best_fitness=best[1] if best else None,
            best_recipe_hash=best[2].content_hash() if best else None,
            baselines=baselines, test_scores=test_scores,
        )
        tracker.log_summary({f"baseline.{k}": v for k, v in baselines.items()}
                            | {f"test.{k}": v for k, v in test_scores.items()}
                            | ({"best_fitness_final": best[1]} if best else {}))
        return summary

    def _record_trial(self, res: EvalResult, genome: np.ndarray, recipe: Recipe, generation: int, value: float,
                      best: Optional[tuple[int, float, Recipe]], ledger: Ledger, tracker: Tracker, step: int) -> None:
        """Ledger first (the source of truth), then the tracker."""
        ledger.append({
            "kind": "trial", "trial_id": res.trial_id, "generation": generation,
            "genome": [float(x) for x in genome], "recipe_hash": recipe.content_hash(),
            "recipe": recipe.to_dict(), "state": res.state, "fitness": res.fitness,
            "told_fitness": value, "scores": res.scores, "merge_seconds": res.merge_seconds,
            "eval_seconds": res.eval_seconds, "error": res.error, "worker": res.worker,
            "finished_at": time.time(),
        })
        metrics = {"trial_id": float(res.trial_id), "told_fitness": value, "merge_seconds": res.merge_seconds,
                   "eval_seconds": res.eval_seconds, "failed": float(res.state != "complete")}
        if best is not None:
            metrics["best_fitness"] = best[1]
        if res.fitness is not None:
            metrics["fitness"] = res.fitness
            metrics.update({f"score.{k}": v for k, v in res.scores.items()})
        tracker.log_trial(step, metrics)

    def _record_baseline(self, res: EvalResult, name: str, ledger: Ledger, tracker: Tracker) -> dict[str, float]:
        ledger.append({"kind": "baseline", "model": name, "split": res.split, "state": res.state,
                       "fitness": res.fitness, "scores": res.scores, "eval_seconds": res.eval_seconds,
                       "error": res.error, "finished_at": time.time()})
        if res.state != "complete":
            self.progress.message(f"baseline {name} failed: {res.error}")
            return {}
        return {name: float(res.fitness)}

    def _test_split(self, best, sources, dispatcher, ledger, tracker) -> dict[str, float]:
        best_id, _, recipe = best
        labels = {0: "best"} | {i + 1: name for i, name in enumerate(sources)}
        dispatcher.submit(EvalRequest(trial_id=0, recipe=recipe.to_dict(), split="test"))
        for i, name in enumerate(sources):
            dispatcher.submit(EvalRequest(trial_id=i + 1, source=name, split="test"))
        out: dict[str, float] = {}
        remaining = len(labels)
        while remaining:
            for res in _next_results(dispatcher):
                remaining -= 1
                label = labels[res.trial_id]
                ledger.append({"kind": "test", "model": label, "trial_id": best_id if label == "best" else None,
                               "recipe_hash": recipe.content_hash() if label == "best" else None,
                               "split": "test", "state": res.state, "fitness": res.fitness, "scores": res.scores,
                               "eval_seconds": res.eval_seconds, "error": res.error, "finished_at": time.time()})
                if res.state == "complete":
                    out[label] = float(res.fitness)
        return out
