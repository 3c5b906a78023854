"""Wiring: an experiment turned into the parts a run needs, and checked before any worker starts.

Model and task dirs on this machine (building the embedded zoo when used) as a
:class:`~evomerge.worker.WorkerSpec`; the genome codec; the dispatcher; and the checks that
``validate`` and ``run`` make of the suite and the sources. The controller gets these parts
and runs the loop; nothing here runs a search.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from evomerge.architecture import for_config
from evomerge.config import ZOO_PREFIX, Experiment
from evomerge.dispatch.base import Dispatcher
from evomerge.errors import ConfigError
from evomerge.recipe import Recipe, load_recipe
from evomerge.run_dir import recipe_file
from evomerge.sources import model_config
from evomerge.space import DFSCodec, PSCodec
from evomerge.worker import TrialWorker, WorkerSpec


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
    # None: a Ray worker runs as many threads as its CPU allotment, an in-process one torch's default
    threads = exp.dispatch.threads_per_worker
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
            from evomerge.zoo import ZooError, load_zoo, zoo_dir
            from evomerge.zoo.tasks import task_metrics

            try:  # opening a built zoo writes the task YAMLs this evomerge knows (cheap, no build)
                paths.append(str(load_zoo(zoo_dir(exp.zoo.kind, exp.zoo.seed)).tasks_dir))
                continue
            except ZooError:
                pass  # not built (or incomplete): check zoo task names and metrics only
            known = task_metrics()
            for part in ("tasks", "validation_tasks", "test_tasks"):
                for i, t in enumerate(getattr(suite, part)):
                    if t.name.startswith("zoo_") and t.name not in known:
                        problems.append(f"suite.{part}.{i}.name: the zoo has no task {t.name!r}; it has {sorted(known)}")
                    elif t.name in known and t.metric != known[t.name]:
                        problems.append(f"suite.{part}.{i}.metric: {t.name} reports {known[t.name]!r}, not {t.metric!r}")
            suite = suite.model_copy(update={f: tuple(t for t in getattr(suite, f) if not t.name.startswith("zoo_"))
                                             for f in ("tasks", "validation_tasks", "test_tasks")})
        task_paths = tuple(paths)
        if not suite.tasks and not suite.validation_tasks and not suite.test_tasks and not suite.model_args:
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

    configs, _, problems = _source_configs(exp, model_dirs, download)
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


def _source_configs(exp: Experiment, model_dirs: Optional[dict[str, str]] = None,
                    download: bool = False) -> tuple[dict[str, dict], set[str], list[str]]:
    """Each full source's config.json that can be had here (see :func:`source_problems`), the sources
    that are LoRA adapters, and problems."""
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
    adapters = adapter_sources(model_dirs, download)
    problems = adapter_problems(exp, model_dirs, adapters, download)
    for name, path in model_dirs.items():
        if name in adapters:
            continue  # its shape is its base's; its factors are checked against the base when loaded
        try:
            configs[name] = model_config(path, declared.get(name), download)
        except ConfigError as exc:
            if download:
                problems.extend(exc.problems)
        except (OSError, ValueError) as exc:
            problems.append(f"models: {name}: cannot read its config.json ({type(exc).__name__}: {exc})")
    return configs, adapters, problems


def adapter_sources(model_dirs: dict[str, str], download: bool = False) -> set[str]:
    """The sources that are LoRA adapters (without ``download``, a Hub repo not cached is not known)."""
    from evomerge.adapters import is_adapter_dir

    return {name for name, path in model_dirs.items() if is_adapter_dir(path, download)}


def adapter_problems(exp: Experiment, model_dirs: dict[str, str], adapters: set[str],
                     download: bool = False) -> list[str]:
    """Why the experiment's LoRA adapter sources (``adapters``, see :func:`adapter_sources`) cannot be
    merged as it asks: an adapter evomerge cannot merge exactly (DoRA, trained biases, ...), one trained
    on another base, an adapter as the base, or adapters in a data-flow search (whose layer donors are
    full models)."""
    from evomerge.adapters import adapter_location, base_problem, read_config

    if not adapters:
        return []
    problems: list[str] = []
    by_name = {m.name: m for m in exp.models}
    if exp.base_model in adapters:
        problems.append(f"base_model: {exp.base_model!r} is a LoRA adapter; the base must be the full model the "
                        "adapters were trained on")
        return problems
    if exp.search_space.kind == "dfs":
        problems.append(f"models: {sorted(adapters)} are LoRA adapters; a data-flow search stacks layers of full "
                        "models: merge each into its base first (or search their merge in parameter space)")
    base_path = by_name[exp.base_model].path  # as the experiment names it (zoo:base for the zoo's adapters)
    for name in sorted(adapters):
        try:
            config = read_config(adapter_location(model_dirs[name], download), f"models: {name}")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        problem = base_problem(name, config, exp.base_model, base_path, by_name[name].base)
        if problem:
            problems.append(problem)
    return problems


def source_capabilities(exp: Experiment) -> dict[str, str]:
    """What evomerge can do with each source, in one line (see :func:`evomerge.architecture.capabilities`);
    a source whose config.json is not here yet (a Hub model not cached, a zoo not built) says so."""
    from evomerge.architecture import capabilities

    configs, adapters, _ = _source_configs(exp)
    out = {}
    for m in exp.models:
        config = configs.get(m.name)
        if m.name in adapters:
            out[m.name] = "a LoRA adapter on the base: PS: yes (kept as its factors) · DFS: no"
        elif config is None:
            out[m.name] = ("the embedded zoo's Llama models: PS: yes · DFS: yes" if m.path.startswith(ZOO_PREFIX)
                           else "unknown until its config.json is here (declare `config:` to check it now)")
        else:
            out[m.name] = f"{config.get('model_type')}: {capabilities(config)}"
    return out


def ps_donor_recipe(path: str) -> Recipe:
    """The PS recipe of a PS+DFS donor: a recipe YAML, or a run dir's best_recipe.yaml."""
    p = recipe_file(path)
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


def cluster_address(exp: Experiment, override: Optional[str] = None) -> tuple[Optional[str], str]:
    """The Ray cluster a run joins, and where that came from: ``--address`` (``override``), else
    ``$RAY_ADDRESS`` (a Ray Job's own cluster), else ``dispatch.address``; ``None`` is a local
    instance of the run's own. The address is a run-time setting (see :meth:`Experiment.identity`)."""
    for value, origin in ((override, "--address"), (os.environ.get("RAY_ADDRESS"), "$RAY_ADDRESS"),
                          (exp.dispatch.address, "dispatch.address")):
        if value:
            return (None, origin) if value == "local" else (value, origin)
    return None, "no address given"


def dispatch_notes(exp: Experiment) -> list[str]:
    """What would keep the experiment's workers from running on this machine, as notes, not
    problems: an experiment for a GPU cluster is validated on a laptop before ``submit``. A run
    refuses when it starts (a GPU request where the cluster, or this machine, has none)."""
    d = exp.dispatch
    if d.backend == "ray" and (d.address or os.environ.get("RAY_ADDRESS")):
        return []
    if d.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return [f"dispatch.device is {d.device}, but this machine has no GPU that torch can use: run it on a "
                    "GPU cluster (evomerge submit, or run --address); here it would stop at start-up"]
    return []


def build_dispatcher(exp: Experiment, spec: WorkerSpec,
                     worker_factory: Callable[[WorkerSpec], Any] = TrialWorker, *,
                     address: Optional[str] = None, notify: Optional[Callable[[str], None]] = None) -> Dispatcher:
    """The experiment's dispatcher; ``address``: the Ray cluster to join (see :func:`cluster_address`;
    None: a local instance); ``notify``: where the pool reports workers lost, restarted or fetching."""
    if exp.dispatch.backend == "local":
        from evomerge.dispatch.local import LocalDispatcher

        return LocalDispatcher(spec, worker_factory)
    from evomerge.dispatch.ray_pool import RayDispatcher

    d = exp.dispatch
    return RayDispatcher(spec, d.num_workers, address=address, cpus_per_worker=d.cpus_per_worker,
                         gpus_per_worker=d.worker_gpus, max_retries=d.max_retries, trial_timeout=d.trial_timeout,
                         head_timeout=d.head_timeout, worker_timeout=d.worker_timeout, ship_sources=d.ship_sources,
                         worker_factory=worker_factory, notify=notify)
