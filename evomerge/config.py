"""Experiment configuration: frozen pydantic models that round-trip YAML.

``load_experiment(path)`` reads an experiment YAML, resolves relative paths
against the file's directory, loads the referenced search space, and reports
*every* problem at once as a :class:`~evomerge.errors.ConfigError` whose lines
each name the offending field.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.sources import is_hub, parse_hub
from evomerge.space.schema import SearchSpace, load_space_data

ZOO_PREFIX = "zoo:"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


# sanity limits on sizes; `allow_huge: true` lifts them for the rare search that means it
LIMITS = {"optimizer.popsize": 10_000, "optimizer.islands": 1_000, "dispatch.num_workers": 10_000,
          "budget.max_trials": 1_000_000}


class ZooConfig(_Frozen):
    """The embedded tiny model zoo, built offline on first use."""

    kind: Literal["cross-skill", "cross-skill-full", "layered", "adapters", "tiny", "tiny-adapters"] = "cross-skill"
    """which embedded zoo: cross-skill (the quickstart's), cross-skill-full, layered (skills confined to blocks), adapters (six LoRA adapters on the quickstart's base), or tiny / tiny-adapters (tests)"""
    seed: int = 0
    """the zoo's training seed (each seed is its own cached zoo)"""


class SourceModel(_Frozen):
    """A source model: a name used in recipes and a Hugging Face model dir, or a LoRA adapter's.

    ``path`` is a directory, ``zoo:<name>`` for a model of the embedded zoo, or
    ``hf:<org>/<name>[@<revision>]`` for a Hugging Face Hub model (fetched by each worker
    into its Hub cache, see :mod:`evomerge.sources`). ``config``: a local copy of the
    model's ``config.json``, so that ``validate`` and ``run --dry-run`` know its shape
    before anything is downloaded. A path holding a PEFT ``adapter_config.json`` is a LoRA
    adapter on the experiment's base (:mod:`evomerge.adapters`).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """the name recipes, the base model and data-flow donors use for this source"""
    path: str
    """a model directory, zoo:<name> (the embedded zoo) or hf:<org>/<name>[@<revision>] (the Hugging Face Hub)"""
    config: Optional[str] = None
    """a local copy of the model's config.json, so validate and the dry run know its shape before any download"""
    trust_remote_code: bool = False
    """let this source run its own modelling code (transformers' trust_remote_code)"""
    base: Optional[str] = None
    """for a LoRA adapter: the base it was trained on as its adapter_config.json names it, when the experiment's base is a copy of that model under another path (a Hub id downloaded to a local directory)"""


class TaskSpec(_Frozen):
    """One lm-eval task (or group) of a suite: its metric, weight and items.

    ``limit``: the first N items. ``subsample``: N items drawn once per run, stratified by
    the items' targets (or by prompt length when targets are mostly distinct) with
    ``suite.subsample_seed``; every candidate is scored on the same items, so ranks stay
    comparable at a fraction of the cost (``benchmarks/fitness_fidelity.py`` measures the
    fidelity). ``num_fewshot`` overrides the suite's for this task.
    """

    name: str
    """an lm-eval task or group name, found in suite.task_paths"""
    metric: str = "acc"
    """the lm-eval metric the fitness takes (acc, acc_norm, exact_match, ...)"""
    weight: float = Field(default=1.0, gt=0)
    """this task's weight in the split's weighted mean"""
    limit: Optional[int] = Field(default=None, gt=0)
    """score the first N items only"""
    subsample: Optional[int] = Field(default=None, gt=0)
    """score N items drawn once per run (stratified, seeded by suite.subsample_seed)"""
    num_fewshot: Optional[int] = Field(default=None, ge=0)
    """few-shot examples for this task (overrides suite.num_fewshot)"""

    @model_validator(mode="after")
    def _one_item_rule(self) -> "TaskSpec":
        if self.limit is not None and self.subsample is not None:
            raise ValueError("subsample: give limit (the first N items) or subsample (N stratified items), not both")
        return self


class RacingConfig(_Frozen):
    """Multi-fidelity fitness: every candidate is scored on ``rungs[0]`` items per search task
    (fixed, stratified); only those that could still be among the best go on to the next rung's
    items, and so on. The rung sets are nested: a promoted candidate is scored on the new items
    only, and its score is the mean over all items it has seen (so metrics must be means of
    per-item values, like acc and exact_match). A rung at or over a task's item count is all of
    its items; the last rung is the fitness that counts (baselines are scored on it).

    ``rule: elite`` (default): promote a candidate whose score at its rung is at least that of
    one of the ``elite`` (default 1) best trials so far on the same items (they were scored on
    every rung): it could still be the best. ``rule: top``: promote a score in the top ``promote``
    share of the scores seen at that rung so far. ``rule: bound``: promote while the score plus
    ``z`` standard errors reaches the best last-rung fitness so far.
    """

    rungs: tuple[int, ...] = Field(min_length=1)
    """items per search task at each rung, increasing; the last rung is the fitness that counts"""
    rule: Literal["elite", "top", "bound"] = "elite"
    """which candidates go on to the next rung: elite, top or bound"""
    elite: int = Field(default=1, ge=1, le=1000)
    """rule elite: promote when at least as good as one of this many best finished trials on the same items"""
    promote: float = Field(default=0.3, gt=0, le=1)
    """rule top: the share of the scores seen at a rung that is promoted"""
    z: float = Field(default=2.0, gt=0, le=10)
    """rule bound: promote while the score plus z standard errors reaches the best fitness so far"""

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(n <= 0 for n in value):
            raise ValueError("every rung is a positive number of items")
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"rungs must increase: {list(value)}")
        return value


# HFLM arguments the suite sets itself (model_args may not repeat them)
_OWN_MODEL_ARGS = ("pretrained", "tokenizer", "device", "batch_size", "add_bos_token", "dtype")


class SuiteConfig(_Frozen):
    """The fitness definition: lm-eval tasks for the search and a held-out test split.

    ``task_paths`` are directories of task YAMLs to index (``zoo`` means the
    embedded zoo's task dir); only these are indexed, never lm-eval's full
    catalogue, which takes ~14 s to build.

    ``validation_tasks`` (optional): a third split, held out from the search like the test
    split. At the end of a search the top ``selection.top_k`` trials by search fitness are
    scored on it and the best there is the run's winner (``best_recipe.yaml``, export): the
    search split's best is the most optimistic estimate of all (it was picked for its luck on
    those items too), and a second, unseen split corrects the pick.
    """

    tasks: tuple[TaskSpec, ...]
    """the search split: the tasks whose weighted score is the fitness"""
    test_tasks: tuple[TaskSpec, ...] = ()
    """the held-out test split, scored for the winner and every source at the end"""
    # scored only for the top `selection.top_k` trials at the end; the best there is the winner
    validation_tasks: tuple[TaskSpec, ...] = ()
    """a held-out validation split: the top selection.top_k trials are scored on it and the best there wins"""
    task_paths: tuple[str, ...] = ()
    """directories of task YAMLs to index (zoo: the embedded zoo's); only these are indexed"""
    batch_size: int = Field(default=64, gt=0)
    """items per forward pass when scoring"""
    num_fewshot: Optional[int] = Field(default=None, ge=0)
    """few-shot examples for every task (a task's own num_fewshot wins)"""
    add_bos_token: Optional[bool] = None
    """prepend the tokenizer's BOS token (lm-eval's add_bos_token; default: the tokenizer's own rule)"""
    # passed through to lm-eval
    gen_kwargs: dict[str, Any] = {}
    """generation settings passed to lm-eval for generate_until tasks"""
    apply_chat_template: Union[bool, str] = False
    """wrap prompts in the tokenizer's chat template (true, or the name of a template)"""
    fewshot_as_multiturn: bool = False
    """few-shot examples as chat turns (needs apply_chat_template)"""
    system_instruction: Optional[str] = None
    """a system prompt for every request"""
    model_args: dict[str, Any] = {}
    """extra arguments for lm-eval's model (not those evomerge sets itself)"""
    subsample_seed: int = Field(default=0, ge=0)
    """the seed of the tasks' subsample draws"""
    cache: Literal["run", "shared", "off"] = "run"
    """score cache: run (within the run), shared (across runs on this machine) or off"""
    # evomerge: lm-eval driven through our backend (shared contexts scored once); hf: lm-eval's
    # HFLM as is. Both give the same scores, so neither is part of the suite's hash.
    backend: Literal["evomerge", "hf"] = "evomerge"
    """evomerge (shared contexts scored once) or hf (lm-eval's HFLM as is); both give the same scores"""
    # generate_until decoder of the evomerge backend: auto measures hf (transformers' generate),
    # continuous (its continuous batching) and static (a static cache) on the first batch and
    # keeps the fastest whose texts equal generate's. Not part of the hash either.
    generation: Literal["auto", "hf", "continuous", "static"] = "auto"
    """generate_until decoder: auto, hf (generate), continuous (continuous batching) or static (a static cache)"""
    racing: Optional[RacingConfig] = None
    """multi-fidelity fitness: candidates scored on more items only while they could still be the best"""

    @model_validator(mode="after")
    def _has_tasks(self) -> "SuiteConfig":
        # checked here, not with min_length, so one bad task is not also reported as "no tasks"
        if not self.tasks:
            raise ValueError("tasks: at least one search task is needed")
        return self

    # field validators, so that these are reported even when a task has problems too
    @field_validator("fewshot_as_multiturn")
    @classmethod
    def _multiturn_needs_chat(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("apply_chat_template"):
            raise ValueError("needs apply_chat_template")
        return value

    @field_validator("model_args")
    @classmethod
    def _not_our_model_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        own = [k for k in value if k in _OWN_MODEL_ARGS]
        if own:
            raise ValueError("\n".join(f"{k}: set by evomerge (use suite.{k} or dispatch.{k} where it exists)"
                                       for k in own))
        return value

    def split_tasks(self, split: str) -> tuple[TaskSpec, ...]:
        """The tasks of a split: ``search``, ``validation`` or ``test``."""
        return {"search": self.tasks, "validation": self.validation_tasks, "test": self.test_tasks}[split]

    def content_hash(self) -> str:
        """Hash of everything in the suite that changes a score (not the cache policy)."""
        import hashlib
        import json

        # racing changes which items a score is over, so it is hashed; absent, the hash is as before
        data = self.model_dump(mode="json", exclude={"cache", "backend", "generation"}
                               | (set() if self.racing else {"racing"})
                               | (set() if self.validation_tasks else {"validation_tasks"}))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class SelectionConfig(_Frozen):
    """How the winner is chosen when ``suite.validation_tasks`` is set: the ``top_k`` trials
    with the best search fitness (one per recipe) are scored on the validation split, and the
    best of them there wins (ties: the better search fitness, then the earlier trial), if it
    beats the search split's best there by at least ``min_z`` paired standard errors (the
    per-item differences of the two on the validation items); else the search split's best
    stays the winner. ``min_z: 0`` is the plain best on validation. The default 2 is measured
    (benchmarks/selection_study.py): over 10 seeds of every cross-skill search its switched picks
    gained +1.9 points on test each (the plain rule's +0.4), and it halved the optimism of every
    24-d space (the plain rule: one); single unlucky switches still leave a few methods' means
    slightly lower (0.03-0.17 points)."""

    top_k: int = Field(default=8, ge=1, le=1000)
    """how many of the best trials by search fitness are scored on the validation split"""
    min_z: float = Field(default=2.0, ge=0, le=10)
    """paired standard errors by which the validation pick must beat the search split's best to replace it"""


class M2N2Config(_Frozen):
    """M2N2's own settings (``optimizer.name: m2n2``; see ``evomerge/optimize/m2n2.py``):
    ``archive_size`` recipes kept, the fitness-sharing exponent ``alpha`` (1: items shared
    equally among the members that solve them; 0: plain mean score), and an optional Gaussian
    ``mutation`` (standard deviation in genome units; 0 as in the paper: crossover only)."""

    archive_size: int = Field(default=16, ge=2, le=10_000)
    """recipes M2N2 keeps"""
    alpha: float = Field(default=1.0, ge=0, le=10)
    """fitness-sharing exponent: 1 shares each item among the members that solve it, 0 is the plain mean score"""
    mutation: float = Field(default=0.0, ge=0, le=1)
    """standard deviation of a Gaussian mutation, in genome units (0: crossover only)"""


class StartRecipe(_Frozen):
    """A recipe a parameter-space search evaluates first (``optimizer.start_from``; see
    ``evomerge/start_recipes.py``): a ``preset`` spec as ``evomerge merge --preset`` takes it
    (``layer_swapping:k=1``), or a ``recipe`` file (or a run directory: its best recipe)."""

    preset: Optional[str] = None
    """a preset spec as evomerge merge --preset takes it (layer_swapping:k=1)"""
    recipe: Optional[str] = None
    """a recipe file, or a run directory (its best recipe)"""

    @model_validator(mode="after")
    def _one(self) -> "StartRecipe":
        if (self.preset is None) == (self.recipe is None):
            raise ValueError("give one of preset: NAME[:key=value,...] or recipe: FILE")
        if self.preset is not None:
            from evomerge.presets import parse_preset

            try:
                parse_preset(self.preset)
            except ConfigError as exc:
                raise ValueError("\n".join(f"preset: {line.removeprefix('--preset: ').removeprefix('--preset ')}" for line in exc.problems)) from None
        return self


DEFAULT_SIGMA0 = 1 / 6  # the paper's (and Optuna's) step size: a sixth of every gene's range


OPTIMIZERS = ("cma_es", "optuna_cmaes", "tpe", "nsga2", "random", "m2n2")
MULTI_OBJECTIVE = ("nsga2", "random")


class OptimizerConfig(_Frozen):
    """The optimizer. Defaults follow the paper: x0 = 0.5, sigma0 = 1/6, popsize 4 + floor(3 ln n).

    ``name``: ``cma_es`` (pycma, with IPOP restarts when a population stalls),
    ``optuna_cmaes`` / ``tpe`` / ``nsga2`` (Optuna's samplers through its ask/tell API),
    ``random`` (uniform random search, the baseline), ``m2n2`` (an archive of recipes evolved
    by crossover with fitness sharing over the search split's items and attraction-based mate
    choice; settings under ``m2n2``). ``objectives``: ``weighted`` (one
    fitness, the suite's weighted mean) or ``per_task`` (one objective per search task;
    a multi-objective optimizer — nsga2 or random — and the run keeps the Pareto front).
    ``restarts`` (cma_es): ``ipop`` restarts a stalled population from a random point with
    twice the population size, up to ``max_restarts`` times; a population has stalled when
    pycma's termination criteria fire or its best has not improved for ``stall_generations``.
    ``separable`` (cma_es): pycma's separable CMA-ES (a diagonal covariance), for spaces of many
    dimensions and few trials.
    ``start_from`` (cma_es, parameter spaces): recipes the first generation evaluates, each a
    ``preset`` spec or a ``recipe`` file (see ``evomerge/start_recipes.py``).
    ``sigma0`` (cma_es, optuna_cmaes): the start step size as a fraction of every gene's range
    (genes are normalised to their bounds, so it scales with each parameter's range); the same
    1/6 in every space, as measured best in 4 to 32 dimensions (benchmarks/sigma0_study.py:
    0.1 and 0.25 lose up to 3 points, a 1/sqrt(n) rule loses in both low and high dimensions).
    """

    name: Literal["cma_es", "optuna_cmaes", "tpe", "nsga2", "random", "m2n2"] = "cma_es"
    """cma_es, optuna_cmaes, tpe, nsga2, random or m2n2"""
    x0: float = Field(default=0.5, ge=0, le=1)
    """the start point, the same for every gene, in genome units (0..1)"""
    sigma0: float = DEFAULT_SIGMA0
    """the start step size as a fraction of every gene's range (cma_es, optuna_cmaes)"""
    popsize: Optional[int] = Field(default=None, ge=2)
    """candidates per generation (default 4 + floor(3 ln n) for n dimensions)"""
    seed: int = Field(default=0, ge=0)
    """the optimizer's seed: the same seed gives the same trials"""
    failure_fitness: Optional[float] = None
    """the fitness told for a failed trial (default: below the island's worst)"""
    islands: int | Literal["auto"] = "auto"
    """independent populations sharing the workers (auto: enough to keep every worker busy)"""
    objectives: Literal["weighted", "per_task"] = "weighted"
    """weighted (one fitness) or per_task (one objective per search task; nsga2 or random)"""
    restarts: Literal["none", "ipop"] = "ipop"
    """cma_es: ipop restarts a stalled population with twice the population size, or none"""
    max_restarts: int = Field(default=9, ge=0)
    """cma_es: at most this many restarts"""
    stall_generations: int = Field(default=20, ge=2)
    """cma_es: a population whose best has not improved for this many generations has stalled"""
    separable: bool = False
    """cma_es: separable CMA-ES (a diagonal covariance), for many dimensions and few trials"""
    start_from: tuple[StartRecipe, ...] = ()
    """recipes the first generation evaluates (cma_es, parameter spaces): presets or recipe files"""
    m2n2: M2N2Config = M2N2Config()
    """M2N2's own settings"""

    @field_validator("sigma0", mode="before")
    @classmethod
    def _sigma0(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"a step size in (0, 1] (a fraction of each gene's range), got {v!r}")
        return float(v)

    @model_validator(mode="after")
    def _consistent(self) -> "OptimizerConfig":
        problems = []
        if self.islands != "auto" and self.islands < 1:
            problems.append("islands: must be 'auto' or at least 1")
        if self.objectives == "per_task" and self.name not in MULTI_OBJECTIVE:
            problems.append(f"objectives: per_task needs a multi-objective optimizer ({' or '.join(MULTI_OBJECTIVE)}); "
                            f"{self.name} optimizes one weighted fitness")
        if self.separable and self.name != "cma_es":
            problems.append(f"separable: pycma's separable CMA-ES is an option of cma_es, not {self.name}")
        if self.start_from and self.name != "cma_es":
            problems.append(f"start_from: start recipes are injected into CMA-ES's first generation; "
                            f"they need name cma_es, not {self.name}")
        if self.name == "nsga2" and self.objectives != "per_task":
            problems.append("objectives: nsga2 is multi-objective; set objectives: per_task")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def resolved_popsize(self, dim: int) -> int:
        return self.popsize or 4 + int(math.floor(3 * math.log(dim)))

    def resolved_islands(self, num_workers: int, popsize: int) -> int:
        """Independent populations that share the workers (see islands.py).

        ``auto``: 1 for a single worker (nothing can idle), else ``ceil(4 N / popsize) + 1``
        for N workers: enough open generations that whenever some islands wait for the
        slowest members of theirs, the others still have candidates for every free worker
        (trial times varying 5x; figures from 1 to 64 workers in docs/measured.md, from
        benchmarks/controller_scaling.py). Each island gets an equal share of the budget.
        """
        if self.islands != "auto":
            return self.islands
        if num_workers <= 1:
            return 1
        return -(-4 * num_workers // popsize) + 1


class BudgetConfig(_Frozen):
    max_trials: int = Field(default=100, gt=0)
    """candidates evaluated in all (sources and held-out splits not counted)"""


class DispatchConfig(_Frozen):
    """Where trials run: Ray actors (a local Ray instance of this run's own unless an address names a
    cluster), or in-process.

    ``address``: the Ray cluster to join (``HOST:PORT`` of its head, ``auto``, or ``local`` for a
    private local instance). It is a run-time setting, not part of the experiment's identity:
    ``--address`` and ``$RAY_ADDRESS`` take precedence, and a run resumes on any cluster.
    ``max_retries``: how often a trial whose worker died (killed process, lost node) is
    retried on a fresh worker before it is recorded as failed. ``trial_timeout``: seconds
    after which a running trial is stopped (its worker replaced) and recorded as failed.
    ``dtype``: the dtype the resident sources, the merged model and its evaluation use
    (``bfloat16`` halves a 7B worker's memory; merges then round like mergekit's
    ``dtype: bfloat16``).
    ``cpus_per_worker`` / ``gpus_per_worker``: each worker's Ray resources; a worker runs as many
    torch threads as its CPU allotment (``threads_per_worker`` overrides). ``gpus_per_worker``
    may be a fraction (0.25 packs four workers onto a GPU); default 1 with ``device: cuda``.
    ``head_timeout``: seconds the controller waits for an unreachable Ray head before it stops
    the run as interrupted. ``worker_timeout``: seconds a run waits with no live worker (none
    could start, or all were lost) before it stops as interrupted. ``ship_sources``: how local
    source and task directories reach workers on other nodes (see docs/cluster.md).
    """

    # settings of where and how a run executes, not of what it computes: they may change when a
    # run resumes (another cluster, more workers) without making it another experiment
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("backend", "num_workers", "address", "threads_per_worker", "cpus_per_worker",
                      "gpus_per_worker", "max_retries", "trial_timeout", "head_timeout", "worker_timeout",
                      "ship_sources")

    backend: Literal["ray", "local"] = Field(default="ray", description="ray: Ray actors; local: in this process")
    num_workers: int = Field(default=2, gt=0, description="workers (Ray actors) the pool keeps running")
    address: Optional[str] = Field(default=None, description="Ray cluster to join; none: a local instance")
    device: str = Field(default="cpu", description="where workers merge and evaluate: cpu or cuda")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the dtype of the resident sources, the merged model and its evaluation"""
    threads_per_worker: Optional[int] = Field(default=None, gt=0,
                                              description="torch threads per worker (default: its CPU allotment)")
    cpus_per_worker: Optional[float] = Field(
        default=None, gt=0, description="Ray CPUs per worker (default: 1 on a cluster; this machine's cores "
                                        "shared out on a local instance)")
    gpus_per_worker: Optional[float] = Field(default=None, ge=0, le=1,
                                             description="Ray GPUs per worker, a fraction allowed (default: "
                                                         "1 with device cuda, else 0)")
    max_retries: int = Field(default=2, ge=0)
    """how often a trial whose worker died is retried on a fresh worker before it is recorded as failed"""
    trial_timeout: Optional[float] = Field(default=None, gt=0)
    """seconds after which a running trial is stopped (its worker replaced) and recorded as failed"""
    head_timeout: float = Field(default=30.0, gt=0, le=3600,
                                description="seconds an unreachable Ray head is waited for")
    worker_timeout: float = Field(default=300.0, gt=0,
                                  description="seconds a run waits with no live worker")
    ship_sources: Literal["auto", "always", "never"] = Field(
        default="auto", description="auto: a worker uses a local dir at the same path if its content "
                                    "matches, else fetches it from the controller; always: fetch; never: "
                                    "the same path must exist on every node")

    @model_validator(mode="after")
    def _timeout_needs_ray(self) -> "DispatchConfig":
        if self.trial_timeout is not None and self.backend != "ray":
            raise ValueError("trial_timeout: only the ray backend can stop a running trial; "
                             "remove it or use backend: ray")
        return self

    @model_validator(mode="after")
    def _gpus_need_cuda(self) -> "DispatchConfig":
        cuda = self.device.startswith("cuda")
        if self.gpus_per_worker is not None:
            if cuda and self.gpus_per_worker == 0:
                raise ValueError("gpus_per_worker: a worker with device cuda needs a GPU share (> 0, at most 1)")
            if not cuda and self.gpus_per_worker > 0:
                raise ValueError(f"gpus_per_worker: {self.gpus_per_worker:g} GPUs for a worker with device "
                                 f"{self.device!r}; set device: cuda, or leave gpus_per_worker out")
        return self

    @property
    def worker_gpus(self) -> float:
        """The GPUs each worker asks Ray for."""
        if self.gpus_per_worker is not None:
            return float(self.gpus_per_worker)
        return 1.0 if self.device.startswith("cuda") else 0.0


class TrackingConfig(_Frozen):
    """Experiment tracking. ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI`` if set,
    else a sqlite store inside the run directory."""

    backend: Literal["mlflow", "none"] = "mlflow"
    """mlflow, or none"""
    tracking_uri: Optional[str] = None
    """the MLflow store (default: MLFLOW_TRACKING_URI, else a sqlite store in the run directory)"""
    experiment_name: Optional[str] = None
    """the MLflow experiment (default: the experiment's name)"""


class Experiment(_Frozen):
    """A whole search: models + space + suite + optimizer + budget + dispatch + tracking."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """the experiment's name (runs, MLflow, exports)"""
    description: str = ""
    """free text, kept with the run"""
    zoo: Optional[ZooConfig] = None
    """the embedded zoo, when models or tasks use it"""
    models: tuple[SourceModel, ...] = Field(min_length=2)
    """the source models, at least two"""
    base_model: str
    """the source the task vectors are taken against (and data-flow's default embed_from)"""
    search_space: SearchSpace
    """a search-space file (or the space inline): what the genome encodes"""
    suite: SuiteConfig
    """the fitness: lm-eval tasks for the search, validation and test splits"""
    optimizer: OptimizerConfig = OptimizerConfig()
    """the optimizer and its settings"""
    budget: BudgetConfig = BudgetConfig()
    """how many candidates to evaluate"""
    dispatch: DispatchConfig = DispatchConfig()
    """where and how trials run"""
    tracking: TrackingConfig = TrackingConfig()
    """where trials are logged"""
    selection: SelectionConfig = SelectionConfig()
    """how the winner is picked when a validation split is given"""
    allow_huge: bool = False
    """lift the sanity limits on popsize, islands, workers and trials"""

    @model_validator(mode="after")
    def _cross_checks(self) -> "Experiment":
        problems: list[str] = []
        if not self.allow_huge:
            values = {"optimizer.popsize": self.optimizer.popsize, "optimizer.islands": self.optimizer.islands,
                      "dispatch.num_workers": self.dispatch.num_workers, "budget.max_trials": self.budget.max_trials}
            for field, limit in LIMITS.items():
                value = values[field]
                if isinstance(value, int) and value > limit:
                    problems.append(f"{field}: {value} is over the sanity limit {limit}; if you mean it, set "
                                    "allow_huge: true")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"models: duplicate model names {dupes}")
        if self.base_model not in names:
            problems.append(f"base_model: {self.base_model!r} is not one of models {names}")
        uses_zoo = any(m.path.startswith(ZOO_PREFIX) for m in self.models) or "zoo" in self.suite.task_paths
        if uses_zoo and self.zoo is None:
            problems.append("zoo: models or suite.task_paths refer to the zoo, but no `zoo:` section is given")
        if self.suite.racing is not None and self.optimizer.name == "m2n2":
            problems.append("suite.racing: m2n2 shares each search item among its archive, so every candidate needs "
                            "the same items; it cannot be combined with racing")
        if self.suite.racing is not None and self.optimizer.objectives == "per_task":
            problems.append("suite.racing: racing ranks one fitness; it cannot be combined with objectives: per_task")
        if self.optimizer.objectives == "per_task" and len(self.suite.tasks) < 2:
            problems.append("suite.tasks: objectives per_task needs at least 2 search tasks (one objective each)")
        search = {t.name for t in self.suite.tasks}
        test = {t.name for t in self.suite.test_tasks}
        overlap = sorted(search & test)
        if overlap:
            problems.append(f"suite.test_tasks: {overlap} are also search tasks; the test split must be held out")
        validation = {t.name for t in self.suite.validation_tasks}
        for other, what in ((search, "search"), (test, "test")):
            overlap = sorted(validation & other)
            if overlap:
                problems.append(f"suite.validation_tasks: {overlap} are also {what} tasks; the validation split "
                                "must be held out from both")
        space = self.search_space
        if self.optimizer.start_from and getattr(space, "kind", "ps") != "ps":
            problems.append("optimizer.start_from: start recipes are parameter-space recipes; a data-flow search "
                            "starts from search_space.start")
        for i, entry in enumerate(self.optimizer.start_from):
            if entry.recipe is not None:
                from evomerge.run_layout import recipe_file

                recipe = recipe_file(entry.recipe)
                if not recipe.is_file():
                    problems.append(f"optimizer.start_from.{i}.recipe: no recipe at {recipe}")
        if getattr(space, "kind", "ps") == "dfs":
            for i, name in enumerate(space.models or ()):
                if name not in names:
                    problems.append(f"search_space.models.{i}: {name!r} is not one of models {names}")
            if space.embed_from is not None and space.embed_from not in names + (
                    [space.ps_donor.name] if space.ps_donor else []):
                problems.append(f"search_space.embed_from: {space.embed_from!r} is not one of models {names}")
            if space.start == "embed_from":
                donors = list(space.models or names) + ([space.ps_donor.name] if space.ps_donor else [])
                head = space.embed_from or self.base_model
                if head not in donors:
                    problems.append(f"search_space.start: embed_from starts at {head!r}'s own path, but it is not a "
                                    f"layer donor ({donors}); add it to search_space.models")
                if self.optimizer.name != "cma_es":
                    problems.append(f"search_space.start: embed_from needs optimizer.name cma_es (not "
                                    f"{self.optimizer.name}); other optimizers start from the whole box")
            if space.ps_donor is not None:
                if space.ps_donor.name in names:
                    problems.append(f"search_space.ps_donor.name: {space.ps_donor.name!r} is already a source name")
                from evomerge.run_layout import recipe_file

                recipe = recipe_file(space.ps_donor.recipe)
                if not recipe.is_file():
                    problems.append(f"search_space.ps_donor.recipe: no recipe at {recipe}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def merged_models(self) -> tuple[str, ...]:
        """Names of the source models merged into the base (all but the base)."""
        return tuple(m.name for m in self.models if m.name != self.base_model)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def identity(self) -> dict[str, Any]:
        """What makes a run this experiment: everything but the budget (a run may be extended) and
        the run-time dispatch settings (a run may resume on another cluster, with other workers)."""
        data = self.model_dump(mode="json", exclude={"budget"})
        for key in DispatchConfig.RUNTIME_FIELDS:
            data["dispatch"].pop(key, None)
        return data

    def with_runtime(self, dispatch: "DispatchConfig") -> "Experiment":
        """This experiment with another's run-time dispatch settings (see :meth:`identity`)."""
        update = {k: getattr(dispatch, k) for k in DispatchConfig.RUNTIME_FIELDS}
        return self.model_copy(update={"dispatch": self.dispatch.model_copy(update=update)})


def _format_validation_error(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        parts = list(e["loc"])
        if len(parts) > 1 and parts[0] == "search_space" and parts[1] in ("ps", "dfs"):
            del parts[1]  # the tagged union's tag is not a field the user wrote
        loc = ".".join(str(p) for p in parts)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if e["type"] == "value_error":
            # our validators write "field: message" relative to the model they check
            for line in str(e.get("ctx", {}).get("error", msg)).splitlines():
                if not loc:
                    lines.append(line)
                elif re.match(r"^[\w.\[\]-]+: ", line):
                    lines.append(f"{loc}.{line}")
                else:
                    lines.append(f"{loc}: {line}")
            continue
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def parse_experiment(data: Any, base_dir: Path) -> Experiment:
    """Validate an experiment mapping; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(["experiment file must be a mapping of keys to values"])
    data = dict(data)
    problems: list[str] = []
    space_ref = data.get("search_space")
    if isinstance(space_ref, str):
        space_path = (base_dir / space_ref).resolve()
        try:
            data["search_space"] = load_space_data(space_path)
        except FileNotFoundError:
            problems.append(f"search_space: file not found: {space_path}")
            data.pop("search_space")
        except yaml.YAMLError as exc:
            problems.append(f"search_space: {space_path} is not valid YAML: {exc}")
            data.pop("search_space")
    space = data.get("search_space")
    if isinstance(space, dict) and isinstance(space.get("ps_donor"), dict):
        recipe = space["ps_donor"].get("recipe")
        if isinstance(recipe, str) and not Path(recipe).is_absolute():  # an inline space (e.g. a staged job)
            data["search_space"] = {**space, "ps_donor": {**space["ps_donor"], "recipe": str((base_dir / recipe).resolve())}}
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("start_from"), list):
        data["optimizer"] = {**optimizer, "start_from": [
            {**e, "recipe": str((base_dir / Path(e["recipe"]).expanduser()).resolve())}
            if isinstance(e, dict) and isinstance(e.get("recipe"), str) else e
            for e in optimizer["start_from"]]}
    models = data.get("models")
    if isinstance(models, list):
        resolved = []
        for i, m in enumerate(models):
            if isinstance(m, dict) and isinstance(m.get("path"), str) and is_hub(m["path"]):
                try:
                    parse_hub(m["path"])
                except ConfigError as exc:
                    problems.extend(f"models.{i}.path: {line}" for line in exc.problems)
            elif isinstance(m, dict) and isinstance(m.get("path"), str) and not m["path"].startswith(ZOO_PREFIX):
                p = (base_dir / Path(m["path"]).expanduser()).resolve()
                if not p.is_dir():
                    problems.append(f"models.{i}.path: model directory not found: {p}")
                m = {**m, "path": str(p)}
            if isinstance(m, dict) and isinstance(m.get("config"), str):
                c = (base_dir / Path(m["config"]).expanduser()).resolve()
                if not c.is_file():
                    problems.append(f"models.{i}.config: file not found: {c}")
                m = {**m, "config": str(c)}
            resolved.append(m)
        data["models"] = resolved
    suite = data.get("suite")
    if isinstance(suite, dict) and isinstance(suite.get("task_paths"), list):
        paths = []
        for i, p in enumerate(suite["task_paths"]):
            if isinstance(p, str) and p != "zoo":
                full = (base_dir / Path(p).expanduser()).resolve()
                if not full.is_dir():
                    problems.append(f"suite.task_paths.{i}: task directory not found: {full}")
                p = str(full)
            paths.append(p)
        data["suite"] = {**suite, "task_paths": paths}
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as err:
        raise ConfigError(problems + _format_validation_error(err)) from None
    if problems:
        raise ConfigError(problems)
    return exp


def portable_experiment(exp: Experiment) -> tuple[dict[str, Any], dict[str, Path]]:
    """The experiment as data that loads on another machine, and the local files it needs there.

    Task dirs, declared model configs, a PS donor's recipe and start recipes are local files: they are listed
    as ``{relative path: local path}`` and the data refers to them relatively (a job ships them
    in its working dir). Hub and zoo sources travel as they are; a source given as a local
    directory does not (weights are not shipped): it must exist at the same path on the cluster.
    """
    data = exp.model_dump(mode="json")
    files: dict[str, Path] = {}
    paths = []
    for i, p in enumerate(data["suite"]["task_paths"]):
        if p == "zoo":
            paths.append(p)
            continue
        rel = f"files/tasks/{i}-{Path(p).name}"
        files[rel] = Path(p)
        paths.append(rel)
    data["suite"]["task_paths"] = paths
    for m in data["models"]:
        if m.get("config"):
            rel = f"files/configs/{m['name']}.json"
            files[rel] = Path(m["config"])
            m["config"] = rel
    from evomerge.run_layout import recipe_file

    donor = data["search_space"].get("ps_donor")
    if donor:
        files["files/ps_donor.yaml"] = recipe_file(donor["recipe"])
        donor["recipe"] = "files/ps_donor.yaml"
    for i, entry in enumerate(data["optimizer"].get("start_from") or []):
        if entry.get("recipe"):
            files[f"files/start_{i}.yaml"] = recipe_file(entry["recipe"])
            entry["recipe"] = f"files/start_{i}.yaml"
    return data, files


def load_experiment(path: str | Path) -> Experiment:
    """Load and validate an experiment YAML; raises ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"experiment file not found: {path}"])
    from evomerge.yaml_strict import load_file

    try:
        data = load_file(path)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    return parse_experiment(data, path.resolve().parent)
