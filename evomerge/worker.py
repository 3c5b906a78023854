"""TrialWorker: merges candidates into one preallocated model and scores them.

A worker is built once per process (a Ray actor, or in-process for local
dispatch). It loads the source weights once and keeps them resident, builds one
model to merge into, and wraps that model in one reused evaluator. Per trial it
only receives a small :class:`EvalRequest` (a recipe as data, never weights).
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from evomerge.config import SuiteConfig
from evomerge.errors import EvaluationError, EvomergeError
from evomerge.evaluate.suite import weighted_fitness
from evomerge.recipe import DFSRecipe, Recipe, recipe_from_dict

Split = Literal["search", "validation", "test"]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start (small, picklable)."""

    model_dirs: dict[str, str]
    base_model: str
    suite: SuiteConfig
    task_paths: tuple[str, ...]
    device: str = "cpu"
    dtype: str = "float32"
    threads: Optional[int] = None
    trusted: tuple[str, ...] = ()  # sources whose own code may run (their `trust_remote_code: true`)
    mode: Literal["ps", "dfs"] = "ps"
    # DFS: sources that lend layers (default: all), and a PS-merged donor (name, recipe dict)
    dfs_donors: Optional[tuple[str, ...]] = None
    dfs_embed_from: Optional[str] = None
    ps_donor: Optional[tuple[str, dict]] = None


@dataclass(frozen=True)
class EvalRequest:
    """One thing to score: a candidate recipe, or a source model as it is."""

    trial_id: int
    recipe: Optional[dict] = None
    source: Optional[str] = None
    split: Split = "search"
    rung: Optional[int] = None  # racing: score this rung's new items only (None: the fitness that counts)

    def __post_init__(self) -> None:
        if (self.recipe is None) == (self.source is None):
            raise ValueError("an EvalRequest has exactly one of recipe or source")


@dataclass
class EvalResult:
    """The outcome of one EvalRequest. ``state`` is "complete" or "failed" (with ``error``)."""

    trial_id: int
    state: Literal["complete", "failed"]
    fitness: Optional[float] = None
    scores: dict[str, float] = field(default_factory=dict)
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: Optional[str] = None
    worker: str = ""
    split: Split = "search"
    attempts: int = 1  # > 1 when the request was retried after its worker died
    cached_from: Optional[str] = None  # answered by the fitness cache: where the score came from
    # per-item values of a search- or validation-split score: {leaf task: {"task", "docs", "values"}}
    items: Optional[dict[str, dict]] = None
    rung: Optional[int] = None
    # the worker's peak memory so far, in bytes: its process's resident set (CPU), or what torch
    # allocated on the device (CUDA)
    peak_bytes: Optional[int] = None


def peak_memory(device: str) -> Optional[int]:
    """The peak memory of this process so far, in bytes: torch's device allocations on CUDA, the
    process's own resident peak on the CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    from evomerge.memory import resident_peak

    return resident_peak()


class TrialWorker:
    """Holds sources + one model resident; evaluates requests one at a time."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.evaluate.lm_eval_runner import LmEvalEvaluator
        from evomerge.merge.backend import ResidentSources
        from evomerge.sources import resolve_model_dir

        if spec.threads:
            torch.set_num_threads(spec.threads)
        # Hub models are fetched here, on the worker's node (a cache lookup when already there)
        spec = replace(spec, model_dirs={k: str(resolve_model_dir(v)) for k, v in spec.model_dirs.items()})
        dtype = getattr(torch, spec.dtype)
        self.spec = spec
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        base_dir = spec.model_dirs[spec.base_model]
        self.sources = None
        self.dataflow = None
        self._parked: set[str] = set()
        if spec.mode == "ps":
            self.sources = ResidentSources.from_model_dirs(
                {k: Path(v) for k, v in spec.model_dirs.items()}, base_model=spec.base_model, device=spec.device,
                dtype=dtype)
            self.model = AutoModelForCausalLM.from_pretrained(
                base_dir, dtype=dtype, trust_remote_code=spec.base_model in spec.trusted, use_safetensors=True
            ).to(spec.device)
            self.model.eval()
            self.target = self.model.state_dict()
        else:
            self.model = self._shell(base_dir, dtype)
            self.dataflow = self._build_dataflow(dtype)
        tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=spec.base_model in spec.trusted)
        self.evaluator = LmEvalEvaluator(self.model, tokenizer, spec.suite, spec.task_paths, device=spec.device)

    def _shell(self, base_dir: str, dtype):
        """DFS: the model candidates are assembled into (see :func:`evomerge.merge.dataflow.build_shell`)."""
        from evomerge.merge.dataflow import build_shell

        return build_shell(base_dir, dtype, self.spec.device, self.spec.base_model in self.spec.trusted)

    def _build_dataflow(self, dtype):
        """DFS: the layer donors resident on the device (+ the PS-merged donor, merged once on the host).

        Sources that lend no layers and no embeddings are only scored as baselines; they wait on the
        host and visit the device one at a time (see :meth:`run`), so a worker's device holds the
        donors and one model more at most.
        """
        from transformers import AutoModelForCausalLM

        from evomerge.merge.backend import ResidentSources
        from evomerge.merge.dataflow import DataFlowModel, load_donors

        spec = self.spec
        onboard = set(spec.dfs_donors or spec.model_dirs) | {spec.dfs_embed_from or spec.base_model}
        donors = {}
        if spec.ps_donor is not None:
            # merged on the host: the sources as base + task vectors would not fit beside the donors
            name, recipe = spec.ps_donor
            sources = ResidentSources.from_model_dirs(
                {k: Path(v) for k, v in spec.model_dirs.items()}, base_model=spec.base_model, dtype=dtype)
            merged = AutoModelForCausalLM.from_pretrained(
                spec.model_dirs[spec.base_model], dtype=dtype, use_safetensors=True,
                trust_remote_code=spec.base_model in spec.trusted)
            sources.merge_into(Recipe.from_dict(recipe), merged)
            del sources
            donors[name] = merged.to(spec.device).eval()
        donors.update(load_donors({k: v for k, v in spec.model_dirs.items() if k in onboard}, spec.device,
                                  spec.trusted, dtype=dtype))
        parked = {k: v for k, v in spec.model_dirs.items() if k not in onboard}
        donors.update(load_donors(parked, "cpu", spec.trusted, dtype=dtype))
        self._parked = set(parked)
        return DataFlowModel(donors, self.model)

    def _load_source(self, name: str) -> None:
        self.sources.write_source(name, self.target)

    def run(self, request: EvalRequest) -> EvalResult:
        """Merge (or load) and score; any failure becomes a failed result with its reason."""
        result = EvalResult(trial_id=request.trial_id, state="failed", worker=self.name, split=request.split,
                            rung=request.rung)
        visiting = None
        try:
            t0 = time.perf_counter()
            if request.recipe is not None:
                recipe = recipe_from_dict(request.recipe)
                if isinstance(recipe, DFSRecipe):
                    if self.dataflow is None:
                        raise EvaluationError("this worker was started for a PS search; it cannot run a DFS recipe")
                    self.dataflow.assemble(recipe)
                else:
                    if self.sources is None:
                        raise EvaluationError("this worker was started for a DFS search; it cannot run a PS recipe")
                    self.sources.merge_into(recipe, self.target)
            elif self.dataflow is not None:
                from evomerge.merge.dataflow import identity_recipe

                if request.source in self._parked:
                    visiting = self.dataflow.donors[request.source].to(self.spec.device)
                self.dataflow.assemble(identity_recipe(request.source, self.dataflow.num_layers(request.source)))
            else:
                self._load_source(request.source)
            t1 = time.perf_counter()
            rung = request.rung
            scores, items = self.evaluator.score(request.split, rung=rung, new_only=bool(rung))
            t2 = time.perf_counter()
            tasks = self.spec.suite.split_tasks(request.split)
            if rung:  # a later rung's new items only: the controller combines them with the earlier rungs'
                tasks = [t for t in tasks if t.name in scores]
            fitness = weighted_fitness(tasks, scores) if tasks else 0.0
            if not math.isfinite(fitness):
                raise EvaluationError(f"fitness is not finite: {fitness}")
            result.state = "complete"
            result.fitness = fitness
            result.scores = scores
            # per-item values of every split: racing, M2N2 and items.jsonl (search), the paired
            # statistics of the winner's selection (validation), every score's standard error
            result.items = items
            result.merge_seconds = t1 - t0
            result.eval_seconds = t2 - t1
            result.peak_bytes = peak_memory(self.spec.device)
        except EvomergeError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a candidate must never crash the search (incl. CUDA OOM)
            tb = traceback.format_exc(limit=3)
            result.error = f"{type(exc).__name__}: {exc}\n{tb}"
            self._release_cached_memory()
        finally:
            if visiting is not None:
                visiting.to("cpu")  # back to the host; the device keeps room for the donors
                self._release_cached_memory()
        return result

    def _release_cached_memory(self) -> None:
        """After a failure (e.g. out of memory) give cached GPU blocks back before the next trial."""
        if self.spec.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
