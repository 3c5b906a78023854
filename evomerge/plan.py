"""Planning a search before it runs (``evomerge run --dry-run``).

A plan says what the search will do and what it will cost: the genome's dimensions
and what they are, population size, islands and generations, the trial budget,
each worker's memory (:mod:`evomerge.memory`), and GPU-hours (CPU worker-hours for CPU
workers) from a per-trial cost. That cost is, in order of preference:

1. *measured*: the median merge and eval seconds of the completed trials of a
   pilot run on the target hardware (``--calibrate RUN_DIR``; a pilot is
   ``evomerge run EXP --max-trials 8`` on one node);
2. *given*: ``--trial-seconds S``;
3. *roofline*: a lower bound from the model's size and the suite's items on a
   device with the given memory bandwidth and compute (an H100 by default; CPU workers: this
   machine's CPU, its copy bandwidth and matrix-product rate measured):
   merging reads every resident source once and writes one model; generation
   reads the weights once per decoding step per batch; prompts cost 2 FLOPs per
   parameter per token. Real runs are slower; the plan says it is a bound.

Nothing here downloads: model shapes come from local dirs, the Hub cache, or a
source's declared ``config`` file (:func:`evomerge.sources.model_config`).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from evomerge.config import Experiment, TaskSpec
from evomerge.errors import ConfigError, EvomergeError
from evomerge.architecture import for_config, param_count
from evomerge.sources import model_config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Device:
    """A GPU's figures for the roofline bound (default: H100 SXM, HBM3, dense bf16)."""

    name: str = "H100 SXM"
    bandwidth_gbs: float = 3350.0
    tflops: float = 989.0

    @classmethod
    def this_cpu(cls, threads: int) -> "Device":
        """This machine's CPU as ``threads`` torch threads see it, measured (~1 s): the bandwidth of
        a 64 MB copy (bytes read + written) and the rate of a float32 matrix product."""
        import time

        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(max(1, threads))
        try:
            a = torch.ones(16 * 2**20)  # 64 MB: beyond the caches, small beside a worker's runtime
            b = torch.empty_like(a)
            b.copy_(a)
            t = time.perf_counter()
            for _ in range(3):
                b.copy_(a)
            bandwidth = 3 * 2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9
            x = torch.ones(512, 512)
            x @ x
            t = time.perf_counter()
            for _ in range(10):
                x @ x
            tflops = 10 * 2 * 512 ** 3 / (time.perf_counter() - t) / 1e12
        finally:
            torch.set_num_threads(before)
        return cls(f"this machine's CPU, {threads} thread{'s' * (threads != 1)} per worker (measured)",
                   round(bandwidth, 1), round(tflops, 4))


@dataclass
class TrialCost:
    merge_seconds: float
    eval_seconds: float
    basis: str  # "measured" | "given" | "roofline"
    detail: str

    @property
    def seconds(self) -> float:
        return self.merge_seconds + self.eval_seconds


@dataclass
class Plan:
    experiment: str
    space: str
    dim: int
    dim_detail: str
    optimizer: str
    popsize: int
    islands: int
    generations: int
    max_trials: int
    extra_evaluations: int
    num_workers: int
    device: str
    dtype: str
    models: list[dict[str, Any]]
    worker_memory_gib: float
    memory_detail: str
    search_tasks: list[dict[str, Any]]
    test_tasks: list[dict[str, Any]]
    cost: Optional[TrialCost]
    gpu_hours: Optional[float]
    wall_hours: Optional[float]
    notes: list[str] = field(default_factory=list)
    validation_tasks: list[dict[str, Any]] = field(default_factory=list)
    top_k: int = 0
    min_z: float = 0.0  # selection.min_z
    sigma0: Optional[float] = None  # CMA-ES's start step size (genome units)
    memory: dict[str, Any] = field(default_factory=dict)  # the worker's estimated peak, part by part (memory.py)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.cost is not None:
            d["cost"]["seconds"] = self.cost.seconds
        return d

    def render(self) -> str:
        rows = [
            ("experiment", f"{self.experiment} ({self.space})"),
            ("models", "; ".join(f"{m['name']} {_params(m['params_b'])}"
                                 + (" (LoRA factors)" if m.get("adapter") else f", {m['layers']} layers")
                                 for m in self.models)),
            ("genome", f"{self.dim} dimensions = {self.dim_detail}"),
            ("optimizer", f"{self.optimizer}, popsize {self.popsize}"
                          + (f", sigma0 {self.sigma0:.3g}" if self.sigma0 is not None else "")
                          + f", {self.islands} island(s), ~{self.generations} generations each"),
            ("budget", f"{self.max_trials} trials (+ {self.extra_evaluations} source/validation/test evaluations)"),
            ("workers", f"{self.num_workers} x {self.device}, {self.dtype}; "
                        f"~{self.worker_memory_gib:.3g} GiB of weights per worker ({self.memory_detail})"),
            ("memory", self.memory.get("line", "unknown")),
            ("search", ", ".join(_task_line(t) for t in self.search_tasks)),
            ("test", ", ".join(_task_line(t) for t in self.test_tasks) or "none (no held-out split)"),
        ]
        if self.validation_tasks:
            rows.insert(-1, ("validation", ", ".join(_task_line(t) for t in self.validation_tasks)
                             + f"; the top {self.top_k} trials by search fitness, the best there wins"
                             + (f" if it beats the search split's best there by {self.min_z:g} paired standard "
                                "errors" if self.min_z else "")))
        if self.cost is None:
            rows.append(("per trial", "unknown: pass --calibrate RUN_DIR (a pilot run on the target hardware) "
                                      "or --trial-seconds S"))
        else:
            bound = ">= " if self.cost.basis == "roofline" else ""
            rows.append(("per trial", f"{bound}{self.cost.seconds:.3g} s = merge {self.cost.merge_seconds:.3g} s "
                                      f"+ eval {self.cost.eval_seconds:.3g} s [{self.cost.basis}: {self.cost.detail}]"))
            unit = "GPU-hours" if self.device.startswith("cuda") else "CPU worker-hours"
            rows.append((unit, f"{bound}{self.gpu_hours:.3g}"))
            rows.append(("wall-clock", f"{bound}{self.wall_hours:.3g} h on {self.num_workers} worker(s) at 95 % busy"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _request_shape(exp: Experiment, spec, search: list[dict[str, Any]], task_cfgs: dict[str, dict]
                   ) -> tuple[int, int, int, list[str]]:
    """(longest context, longest answer, most answers) in the base model's tokens over the search
    tasks whose data are local files with plain-field questions and choices, and those tasks' names;
    (256, 8, 4, []) where none can be read here."""
    from evomerge.memory import request_lengths

    try:
        from transformers import AutoTokenizer

        from evomerge.sources import is_hub

        base_dir = spec.model_dirs[exp.base_model]
        tokenizer = None if is_hub(base_dir) else AutoTokenizer.from_pretrained(str(base_dir))
    except Exception:  # no tokenizer here: the defaults stand
        tokenizer = None
    lengths, measured = [], []
    for task in search:
        cfg = task_cfgs.get(task["name"]) or {}
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
        data = files.get(cfg.get("test_split") or cfg.get("validation_split")) if isinstance(files, dict) else None
        text, choice = cfg.get("doc_to_text"), cfg.get("doc_to_choice")
        if tokenizer is None or not isinstance(data, str) or not Path(data).is_file() or not isinstance(text, str) \
                or not isinstance(choice, str) or "{" in text or "{" in choice:
            continue
        docs = []
        with open(data) as f:
            for line in f:
                if line.strip():
                    docs.append(json.loads(line))
                if len(docs) >= 200:
                    break
        if docs and text in docs[0] and choice in docs[0]:
            lengths.append(request_lengths(tokenizer, docs, text, choice, cfg.get("target_delimiter", " ")))
            measured.append(task["name"])
    if not lengths:
        return 256, 8, 4, []
    return (*(max(x[i] for x in lengths) for i in range(3)), measured)  # type: ignore[return-value]


def _memory(exp: Experiment, base_cfg: dict, params: int, copies: int, request: tuple[int, int, int, list[str]],
            runtime: int, adapter_bytes: int = 0) -> dict[str, Any]:
    """A worker's estimated peak memory (see :mod:`evomerge.memory`), part by part; ``adapter_bytes``:
    the LoRA sources' factors, kept beside the ``copies`` full-size tensors."""
    from evomerge.memory import estimate, shape_of

    shape = shape_of(base_cfg, for_config(base_cfg))
    context, answer, choices, measured = request
    est = estimate(copies, params, DTYPE_BYTES[exp.dispatch.dtype], shape, exp.suite.batch_size, context, answer,
                   choices, exp.dispatch.device, runtime,
                   f"batch {exp.suite.batch_size}, contexts of {context} and answers of {answer} tokens"
                   + (f" measured on {', '.join(measured)}" if measured else " assumed")
                   + f", vocabulary {shape.vocab}", extra_weight_bytes=adapter_bytes)
    return {"weights": est.weights, "scoring": est.scoring, "runtime": est.runtime, "total": est.total,
            "line": est.line()}


def _params(billions: float) -> str:
    return f"{billions:.2f} B params" if billions >= 1 else f"{billions * 1e3:.2f} M params"


def _task_line(t: dict[str, Any]) -> str:
    items = f"{t['items']} items" if t.get("items") else "items unknown"
    kind = t.get("output_type") or "?"
    return f"{t['name']} ({t['metric']}, {kind}, {items})"


def _task_info(task: TaskSpec, cfg: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What a task's config says about its size (``cfg``: its YAML, includes merged)."""
    info: dict[str, Any] = {"name": task.name, "metric": task.metric, "items": task.limit}
    if cfg is None:
        return info
    info["output_type"] = cfg.get("output_type", "loglikelihood")
    gen = cfg.get("generation_kwargs") or {}
    info["max_gen_toks"] = int(gen.get("max_gen_toks", 256)) if info["output_type"] == "generate_until" else 0
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    split = cfg.get("test_split") or cfg.get("validation_split")
    local = files.get(split) if isinstance(files, dict) else None
    if info["items"] is None and isinstance(local, str) and Path(local).is_file():
        # a local data file (as lm-eval reads it: relative paths from the working directory)
        info["items"] = sum(1 for line in Path(local).open() if line.strip())
    return info


def calibrated_cost(run_dir: Path) -> TrialCost:
    """Median merge / eval seconds of the completed search trials of a (pilot) run."""
    from evomerge.run_dir import open_ledger, require_run_dir

    try:
        require_run_dir(run_dir, ledger=True)
    except EvomergeError as exc:
        raise ConfigError([f"--calibrate: {exc}"]) from None
    trials = [r for r in open_ledger(run_dir).records("trial") if r.get("state") == "complete"]
    if not trials:
        raise ConfigError([f"--calibrate: {run_dir} has no completed trials to measure"])
    merge = statistics.median(float(r["merge_seconds"]) for r in trials)
    evals = statistics.median(float(r["eval_seconds"]) for r in trials)
    workers = sorted({str(r.get("worker", "")).split(":")[0] for r in trials} - {""})
    return TrialCost(merge, evals, "measured",
                     f"median of {len(trials)} trials of {run_dir} on {', '.join(workers) or 'unknown host'}")


def roofline_cost(exp: Experiment, params: int, n_sources: int, tasks: list[dict[str, Any]],
                  path_fraction: float, device: Device, prompt_tokens: int) -> Optional[TrialCost]:
    """A lower bound on a trial's seconds on ``device``; None when a task's size is unknown."""
    wbytes = params * DTYPE_BYTES[exp.dispatch.dtype]
    bw = device.bandwidth_gbs * 1e9
    flops = device.tflops * 1e12
    merge = (n_sources + 1) * wbytes / bw if exp.search_space.kind == "ps" else 0.0
    evals = 0.0
    for t in tasks:
        if not t.get("items") or "output_type" not in t:
            return None
        items = int(t["items"])
        run_params = params * path_fraction
        evals += items * prompt_tokens * 2 * run_params / flops
        if t["output_type"] == "generate_until":
            steps = math.ceil(items / exp.suite.batch_size) * t["max_gen_toks"]
            evals += steps * wbytes * path_fraction / bw
    detail = (f"{device.name}, {device.bandwidth_gbs:g} GB/s, {device.tflops:g} TFLOP/s, "
              f"{prompt_tokens} tokens scored per item, every generation at max length")
    return TrialCost(merge, evals, "roofline", detail)


def make_plan(exp: Experiment, calibrate: Optional[Path] = None, trial_seconds: Optional[float] = None,
              device: Device = Device(), prompt_tokens: int = 256) -> Plan:
    """The plan of ``exp``; builds the embedded zoo if the experiment uses it, downloads nothing."""
    from evomerge.wiring import adapter_sources, build_codec, resolve_worker_spec

    spec = resolve_worker_spec(exp)
    codec = build_codec(exp, spec, download=False)
    declared = {m.name: m.config for m in exp.models}
    from evomerge.adapters import adapter_params

    found = adapter_sources(spec.model_dirs)
    adapters = {m.name: adapter_params(spec.model_dirs[m.name]) for m in exp.models if m.name in found}
    configs = {m.name: model_config(spec.model_dirs[m.name], declared[m.name], download=False)
               for m in exp.models if m.name not in adapters}
    configs.update({name: configs[exp.base_model] for name in adapters})  # an adapter has its base's shape
    space = exp.search_space
    dim = codec.dim
    base_cfg = configs[exp.base_model]
    params = param_count(base_cfg)
    wbytes = params * DTYPE_BYTES[exp.dispatch.dtype]
    gib = 1024 ** 3
    notes: list[str] = []
    if space.kind == "ps":
        groups = codec.groups
        dim_detail = (f"{len(codec.models)} merged models x {len(codec.model_params)} parameters "
                      f"({', '.join(codec.model_params)}) x {groups} group{'s' * (groups > 1)}"
                      + (" (embeddings, each block, head)" if space.granularity == "per_layer"
                         else f" ({', '.join(codec.group_labels)})" if groups > 1 else "")
                      + (f" + {len(codec.global_params)} global ({', '.join(codec.global_params)})"
                         if codec.global_params else ""))
        space_line = f"PS: {space.method}, {space.granularity}"
        full = len(exp.models) - len(adapters)
        resident = full + 1
        if not adapters:
            memory_detail = f"{full} sources as base + task vectors, 1 model to merge into"
        else:
            others = full - 1
            memory_detail = ("the base" + (f" + {others} full source{'s' * (others != 1)} as task vectors" if others else "")
                             + f", {len(adapters)} LoRA adapter{'s' * (len(adapters) != 1)} as their factors "
                             f"({sum(adapters.values()) * DTYPE_BYTES[exp.dispatch.dtype] / 2**20:.3g} MiB), "
                             "1 model to merge into")
        path_fraction = 1.0
    else:
        m = codec.total_layers
        dim_detail = (f"{codec.path_genes} path genes (M = {m} layers x r = {space.repetitions})"
                      + (f" + {m * m} scales (W, {m} x {m})" if space.scaling else ""))
        space_line = f"DFS over {', '.join(codec.donors)}"
        onboard = set(space.models or [m.name for m in exp.models]) | {space.embed_from or exp.base_model}
        onboard_sources = len(onboard & {m.name for m in exp.models})
        parked = len(exp.models) - onboard_sources
        on_device = onboard_sources + (1 if spec.ps_donor else 0)
        resident = on_device + (1 if parked else 0)
        memory_detail = (f"{on_device} resident donor{'s' * (on_device != 1)}"
                         + (" + 1 visiting source (baseline scores)" if parked else "")
                         + (f"; {parked} source{'s' * (parked != 1)} wait on the host" if parked else ""))
        if spec.ps_donor:
            host = (len(exp.models) + 1) * wbytes / gib
            memory_detail += f"; the PS donor is merged on the host once (~{host:.0f} GiB of host memory)"
        expected = codec.path_genes / 2
        if space.max_path_length:
            expected = min(expected, space.max_path_length)
        path_fraction = expected / for_config(base_cfg).num_layers(base_cfg)
    popsize = exp.optimizer.resolved_popsize(dim)
    islands = exp.optimizer.resolved_islands(exp.dispatch.num_workers, popsize)
    if exp.optimizer.start_from and space.kind == "ps":  # each must be a point of the space: checked here too
        from evomerge.start_recipes import describe, start_points

        notes.append(describe(start_points(exp, codec)))
    generations = math.ceil(exp.budget.max_trials / islands / popsize)
    from evomerge.evaluate.lm_eval_runner import task_configs

    every = (*exp.suite.tasks, *exp.suite.validation_tasks, *exp.suite.test_tasks)
    configs_of = task_configs(spec.task_paths, [t.name for t in every])
    search = [_task_info(t, configs_of.get(t.name)) for t in exp.suite.tasks]
    validation = [_task_info(t, configs_of.get(t.name)) for t in exp.suite.validation_tasks]
    test = [_task_info(t, configs_of.get(t.name)) for t in exp.suite.test_tasks]
    # the controller scores every source on the search split first; at the end the top_k trials
    # on the validation split (if any), then the winner (and the search split's best, when
    # validation picked another) and every source on the test split
    top_k = min(exp.selection.top_k, exp.budget.max_trials) if validation else 0
    extra = len(exp.models) + top_k + ((len(exp.models) + 1 + bool(top_k > 1)) if test else 0)

    from evomerge.memory import process_runtime

    runtime = process_runtime()  # before anything below allocates: the libraries and the task index
    request = _request_shape(exp, spec, search, configs_of)
    if request[3]:  # measured: a shared context, then each answer (as the evomerge scoring backend runs them)
        prompt_tokens = request[0] + request[2] * request[1]
    if calibrate is not None:
        cost: Optional[TrialCost] = calibrated_cost(calibrate)
    elif trial_seconds is not None:
        cost = TrialCost(0.0, float(trial_seconds), "given", "--trial-seconds")
    elif not exp.dispatch.device.startswith("cuda"):
        import os

        workers = exp.dispatch.num_workers
        threads = exp.dispatch.threads_per_worker or int(exp.dispatch.cpus_per_worker or 0) \
            or max(1, (os.cpu_count() or 1) // workers)
        cost = roofline_cost(exp, params, len(exp.models) - len(adapters), search, path_fraction,
                             Device.this_cpu(threads), prompt_tokens)
        notes.append("workers run on the CPU: the per-trial bound is this machine's CPU's; a pilot run "
                     "(--calibrate RUN_DIR) measures the real cost")
    else:
        cost = roofline_cost(exp, params, len(exp.models) - len(adapters), search, path_fraction, device,
                             prompt_tokens)
        if cost is None:
            notes.append("a task's size or type is unknown (not in the suite's task dirs and no `limit`), "
                         "so there is no roofline bound; calibrate with a pilot run")
    gpu_hours = wall_hours = None
    if cost is not None:
        test_ratio = 1.0
        s_items = sum(t.get("items") or 0 for t in search)
        t_items = sum(t.get("items") or 0 for t in test)
        if s_items and t_items:
            test_ratio = t_items / s_items
        extra_seconds = len(exp.models) * cost.eval_seconds
        if test:
            extra_seconds += (len(exp.models) + 1) * cost.eval_seconds * test_ratio
        gpu_hours = (exp.budget.max_trials * cost.seconds + extra_seconds) / 3600  # worker-hours
        wall_hours = gpu_hours / (exp.dispatch.num_workers * 0.95)
        if exp.dispatch.device.startswith("cuda"):
            gpu_hours *= exp.dispatch.worker_gpus  # a worker with a GPU share holds only that share
    share = exp.dispatch.worker_gpus
    if 0 < share < 1:
        notes.append(f"gpus_per_worker {share:g}: up to {int(1 / share)} workers share each GPU, each holding its "
                     "own weights (the memory above, per worker); the per-trial cost is a GPU's own, so shared "
                     "GPUs finish each trial later: calibrate with a pilot run packed the same way")
    if exp.dispatch.device == "cpu" and params > 1e9:
        notes.append("dispatch.device is cpu for a model of over 1 B parameters; set device: cuda")
    adapter_bytes = sum(adapters.values()) * DTYPE_BYTES[exp.dispatch.dtype] if space.kind == "ps" else 0
    memory = _memory(exp, base_cfg, params, resident, request, runtime, adapter_bytes)
    return Plan(
        experiment=exp.name, space=space_line, dim=dim, dim_detail=dim_detail, optimizer=exp.optimizer.name + (" (separable)" if exp.optimizer.separable else ""),
        popsize=popsize, islands=islands, generations=generations, max_trials=exp.budget.max_trials,
        extra_evaluations=extra, num_workers=exp.dispatch.num_workers, device=exp.dispatch.device,
        dtype=exp.dispatch.dtype,
        models=[{"name": m.name, "path": m.path,
                 "params_b": (adapters[m.name] if m.name in adapters else param_count(configs[m.name])) / 1e9,
                 "layers": for_config(configs[m.name]).num_layers(configs[m.name]),
                 **({"adapter": True} if m.name in adapters else {})} for m in exp.models],
        worker_memory_gib=(resident * wbytes + adapter_bytes) / gib, memory_detail=memory_detail, memory=memory,
        search_tasks=search, test_tasks=test, validation_tasks=validation, top_k=top_k,
        min_z=exp.selection.min_z if validation else 0.0,
        sigma0=exp.optimizer.sigma0 if exp.optimizer.name in ("cma_es", "optuna_cmaes") else None, cost=cost, gpu_hours=gpu_hours, wall_hours=wall_hours, notes=notes,
    )


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=2)
