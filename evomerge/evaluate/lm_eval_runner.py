"""The only module that imports ``lm_eval``.

An :class:`LmEvalEvaluator` wraps one in-memory model (whose weights the worker
rewrites in place for every candidate) in a single reused lm-eval model: evomerge's
``HFLM`` subclass (shared contexts scored once, pluggable greedy decoders; see
:func:`evomerge_lm_class`), or ``HFLM`` itself with ``suite.backend: hf``; lm-eval
sees the new weights on each call. Every search-split score comes with its per-item
values, and racing suites score nested rungs of stratified items (:meth:`score`). Tasks are indexed only from the suite's task
directories (never lm-eval's whole catalogue) and built once per split with
``get_task_dict``; each evaluation is one ``lm_eval.evaluator.evaluate`` call.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Literal, Optional, Sequence

from evomerge.config import SuiteConfig, TaskSpec
from evomerge.errors import EvaluationError

Split = Literal["search", "validation", "test"]
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed

# lm-eval looks up its git revision and prints "fatal: not a git repository" outside a checkout.
os.environ.setdefault("GIT_DIR", os.devnull)


def _quiet_lm_eval() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)


class LmEvalEvaluator:
    """Scores an in-memory causal LM on a suite's search or test split."""

    def __init__(self, model, tokenizer, suite: SuiteConfig, task_paths: Sequence[str], device: str = "cpu") -> None:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import get_task_dict

        _quiet_lm_eval()
        self.suite = suite
        own = {} if suite.backend == "hf" else {"generation": suite.generation}
        self._lm = (HFLM if suite.backend == "hf" else evomerge_lm_class())(
            **own,
            pretrained=model,
            tokenizer=tokenizer,
            device=device,
            batch_size=suite.batch_size,
            add_bos_token=suite.add_bos_token,
            **suite.model_args,
        )
        every = [t.name for t in (*suite.tasks, *suite.validation_tasks, *suite.test_tasks)]
        self._manager = task_manager(task_paths, every)
        self._splits: dict[str, tuple[Sequence[TaskSpec], dict, Optional[dict[str, list[int]]]]] = {}
        for split in ("search", "validation", "test"):
            tasks = suite.split_tasks(split)
            if not tasks:
                continue
            names = [t.name for t in tasks]
            unknown = [n for n in names if n not in self._manager.all_tasks]
            if unknown:
                raise EvaluationError(f"unknown lm-eval task(s) {unknown} in {list(task_paths) or 'lm-eval catalogue'}")
            with contextlib.redirect_stdout(io.StringIO()):
                task_dict = get_task_dict(names, self._manager)
            for spec in tasks:
                for task in _leaves_of(task_dict, spec.name).values():
                    fewshot = spec.num_fewshot if spec.num_fewshot is not None else suite.num_fewshot
                    if fewshot is not None:
                        task.set_config(key="num_fewshot", value=fewshot)
                    if suite.gen_kwargs and task.OUTPUT_TYPE == "generate_until":
                        task.set_config(key="generation_kwargs", value=dict(suite.gen_kwargs), update=True)
            self._splits[split] = (tasks, task_dict, self._items(tasks, task_dict))
        self._rungs: dict[str, list[list[int]]] = {}
        if suite.racing is not None:
            self._rungs = self._rung_items(suite.racing.rungs)

    def _items(self, tasks: Sequence[TaskSpec], task_dict: dict) -> Optional[dict[str, list[int]]]:
        """Which documents each leaf task scores (None: all of them)."""
        if not any(t.limit or t.subsample for t in tasks):
            return None
        items: dict[str, list[int]] = {}
        for spec in tasks:
            for name, task in _leaves_of(task_dict, spec.name).items():
                n = len(task.eval_docs)
                if spec.subsample:
                    items[name] = stratified_subsample(task, spec.subsample, self.suite.subsample_seed, name)
                else:
                    items[name] = list(range(min(spec.limit or n, n)))
        return items

    def _rung_items(self, sizes: Sequence[int]) -> dict[str, list[list[int]]]:
        """Per search leaf task, the documents of each racing rung: nested prefixes of one
        stratified order over the task's scored items (every prefix is itself stratified)."""
        from lm_eval.api.metrics import mean

        tasks, task_dict, chosen = self._splits["search"]
        out: dict[str, list[list[int]]] = {}
        for spec in tasks:
            for name, task in _leaves_of(task_dict, spec.name).items():
                aggregate = task.aggregation().get(spec.metric)
                if aggregate is not mean:
                    raise EvaluationError(
                        f"suite.racing: task {name!r} aggregates {spec.metric!r} with "
                        f"{getattr(aggregate, '__name__', aggregate)!r}, not a mean of per-item values; "
                        "racing combines rungs item by item, so it needs a mean metric (acc, exact_match, ...)")
                pool = chosen[name] if chosen and name in chosen else list(range(len(task.eval_docs)))
                order = stratified_order(task, pool, self.suite.subsample_seed, name)
                out[name] = [sorted(order[: min(n, len(order))]) for n in sizes]
        return out

    @property
    def rungs(self) -> int:
        """Racing rungs of the search split (0 without racing)."""
        return len(next(iter(self._rungs.values()))) if self._rungs else 0

    def score(self, split: Split = "search", rung: Optional[int] = None, new_only: bool = False
              ) -> tuple[dict[str, float], dict[str, dict]]:
        """Per-task metric values of the model as its weights are *now*, and per-item values:
        ``{leaf task: {"task": suite task, "docs": [doc ids], "values": [the metric per doc]}}``.

        Racing (search split): ``rung=k`` scores the documents of rung k (``new_only``: only
        those not in rung k-1); ``rung=None`` scores the last rung's documents (the fitness
        that counts, e.g. for a source's baseline).
        """
        if split not in self._splits:
            raise EvaluationError(f"the suite has no {split} tasks")
        samples = self._splits[split][2]
        if split == "search" and self._rungs:
            last = self.rungs - 1
            k = last if rung is None else rung
            if not 0 <= k <= last:
                raise EvaluationError(f"racing has rungs 0..{last}; rung {k} asked")
            samples = {}
            for name, sets in self._rungs.items():
                docs = sets[k]
                if new_only and k > 0:
                    before = set(sets[k - 1])
                    docs = [d for d in docs if d not in before]
                samples[name] = docs
        elif rung is not None:
            raise EvaluationError("a rung was asked, but the suite does not race (suite.racing)")
        return self._run(split, samples)

    def has_split(self, split: Split) -> bool:
        return split in self._splits

    def items(self, split: Split = "search") -> dict[str, int]:
        """Documents scored per leaf task on ``split``."""
        tasks, task_dict, chosen = self._splits[split]
        return {name: len(chosen[name]) if chosen and name in chosen else len(task.eval_docs)
                for spec in tasks for name, task in _leaves_of(task_dict, spec.name).items()}

    def evaluate(self, split: Split = "search") -> dict[str, float]:
        """Per-task metric values of the model as its weights are *now* (racing: on the last rung)."""
        return self.score(split)[0]

    def _run(self, split: Split, samples: Optional[dict[str, list[int]]]) -> tuple[dict[str, float], dict[str, dict]]:
        from lm_eval.evaluator import evaluate

        tasks, task_dict, _ = self._splits[split]
        # lm-eval's few-shot sampler draws from one generator per task that goes on across calls
        # (simple_evaluate re-seeds it per run; evaluate does not): re-seed it, as simple_evaluate
        # does, so every candidate is scored on the same prompts
        for leaf in _leaf_tasks(task_dict).values():
            leaf.set_fewshot_seed(seed=FEWSHOT_SEED)
        if samples is not None and samples and not any(samples.values()):
            return {}, {}  # this rung adds no documents to any task
        if samples is not None and any(not docs for docs in samples.values()):
            # a rung that adds no documents to a task (it has fewer items than the rung before)
            empty = [n for n, docs in samples.items() if not docs]
            samples = {n: d for n, d in samples.items() if d}
            task_dict = _without(task_dict, empty)
        with contextlib.redirect_stdout(io.StringIO()):
            out = evaluate(
                lm=self._lm,
                task_dict=task_dict,
                samples=samples,
                bootstrap_iters=0,
                log_samples=True,
                verbosity="ERROR",
                system_instruction=self.suite.system_instruction,
                apply_chat_template=self.suite.apply_chat_template,
                fewshot_as_multiturn=self.suite.fewshot_as_multiturn,
            )
        if out is None:
            raise EvaluationError("lm-eval returned no results")
        results = out["results"]
        scores: dict[str, float] = {}
        items: dict[str, dict] = {}
        for t in tasks:
            task_results = results.get(t.name, {})
            key = next((k for k in task_results if k == t.metric or k.startswith(t.metric + ",")), None)
            if key is None:
                if samples is not None and all(n not in samples for n in _leaves_of(self._splits[split][1], t.name)):
                    continue  # nothing of this task on this rung
                have = sorted(k.split(",")[0] for k in task_results if not k.endswith("_stderr") and "," in k)
                raise EvaluationError(f"task {t.name!r} has no metric {t.metric!r}; it reports {have}")
            scores[t.name] = float(task_results[key])
            chosen_filter = key.split(",", 1)[1] if "," in key else "none"
            for leaf in _leaves_of(self._splits[split][1], t.name):
                rows = [r for r in out.get("samples", {}).get(leaf, []) if r.get("filter", "none") == chosen_filter
                        and t.metric in r]
                if rows:
                    rows.sort(key=lambda r: r["doc_id"])
                    items[leaf] = {"task": t.name, "docs": [int(r["doc_id"]) for r in rows],
                                   "values": [float(r[t.metric]) for r in rows]}
        return scores, items


_LM_CLASS = None


def evomerge_lm_class():
    """lm-eval's ``HFLM`` with shared contexts scored once (registered with lm-eval as
    ``evomerge``).

    Tokenization, truncation, chat templates and generation are ``HFLM``'s own; only the
    log-likelihood kernel differs: requests that share a context run it once and score their
    continuations from its KV cache (:mod:`evomerge.evaluate.shared_context`). Models whose
    forward takes no KV cache, seq2seq models and ``batch_size: auto`` use ``HFLM``'s kernel.
    """
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    import torch
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    from evomerge.evaluate import decoding, shared_context

    class EvomergeLM(HFLM):
        def __init__(self, *args, generation: str = "auto", **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.decoders = decoding.DecoderChoice(generation, self.device.type)

        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            sampling = generation_kwargs.get("do_sample") or generation_kwargs.get("temperature", 0.0) not in (0, 0.0, None)
            if self.backend != "causal" or sampling:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            attention_mask = generation_kwargs.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(context)

            def generate(name: str):
                if name == "continuous":
                    return decoding.continuous_generate(self.model, context, attention_mask, max_length,
                                                        self.tokenizer.pad_token_id, self.eot_token_id)
                extra = {"cache_implementation": "static"} if name == "static" else {}
                return HFLM._model_generate(self, context, max_length, stop, **dict(generation_kwargs), **extra)

            def texts(out) -> list[str]:
                found = []
                for row in out[:, context.shape[1]:].tolist():
                    text = self.tok_decode(row)
                    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
                    found.append(text[:cut])
                return found

            sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
            return self.decoders.run(generate, texts, sync)

        # A search asks for the same (context, continuation) pairs every trial, and the tokenizer
        # never changes: tokenize each pair once (a tenth of a small model's trial otherwise).
        _ENCODED_MAX = 200_000

        def _encode_pair(self, context: str, continuation: str):
            memo = self.__dict__.setdefault("_encoded", {})
            key = (context, continuation)
            hit = memo.get(key)
            if hit is None:
                if len(memo) >= self._ENCODED_MAX:
                    memo.clear()
                hit = memo[key] = tuple(map(tuple, super()._encode_pair(context, continuation)))
            return list(hit[0]), list(hit[1])

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            batch_size = override_bs or self.batch_size
            if self.backend != "causal" or not isinstance(batch_size, int) or shared_context.cache_argument(self.model) is None:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

            def done(i, answer):
                if requests[i][0] is not None:  # loglikelihood_rolling caches per document itself
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)

            return shared_context.score(
                self.model,
                [(context, continuation) for _, context, continuation in requests],
                max_length=self.max_length,
                batch_size=batch_size,
                device=self.device,
                softmax_dtype=self.softmax_dtype,
                autocast_dtype=self.mixed_precision_dtype,
                on_done=done,
            )

    try:
        register_model("evomerge")(EvomergeLM)
    except (AssertionError, ValueError):
        pass  # already registered (a re-import)
    _LM_CLASS = EvomergeLM
    return EvomergeLM


def _without(task_dict: dict, names: Sequence[str]) -> dict:
    """``task_dict`` without the leaf tasks ``names`` (flat dicts; groups keep their members)."""
    return {k: v for k, v in task_dict.items() if (getattr(k, "group_name", None) or str(k)) not in names}


def stratified_order(task, pool: Sequence[int], seed: int, name: str) -> list[int]:
    """The documents of ``pool`` in an order whose every prefix is stratified like
    :func:`stratified_subsample` (strata: the targets when few, else prompt-length bins):
    each next document comes from the stratum furthest behind its share; within a stratum
    the order is random, seeded by (seed, task name)."""
    import zlib

    import numpy as np

    docs = task.eval_docs
    pool = list(pool)
    if not pool:
        return []
    targets = [str(task.doc_to_target(docs[i])) for i in pool]
    if len(set(targets)) <= max(2, len(pool) // 4):
        keys = targets
    else:
        lengths = np.array([len(str(task.doc_to_text(docs[i]))) for i in pool])
        edges = np.quantile(lengths, [0.2, 0.4, 0.6, 0.8])
        keys = [str(int(np.searchsorted(edges, x, side="right"))) for x in lengths]
    strata: dict[str, list[int]] = {}
    for i, k in zip(pool, keys):
        strata.setdefault(k, []).append(i)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 1])
    order_keys = sorted(strata)
    queues = {k: [strata[k][j] for j in rng.permutation(len(strata[k]))] for k in order_keys}
    share = {k: len(strata[k]) / len(pool) for k in order_keys}
    taken = dict.fromkeys(order_keys, 0)
    out: list[int] = []
    for step in range(1, len(pool) + 1):
        k = max((k for k in order_keys if taken[k] < len(queues[k])), key=lambda k: (step * share[k] - taken[k], -order_keys.index(k)))
        out.append(int(queues[k][taken[k]]))
        taken[k] += 1
    return out


def task_manager(task_paths: Sequence[str], names: Sequence[str] = ()):
    """A TaskManager over the suite's task dirs only (fast); with lm-eval's own catalogue (~14 s
    to index) only when a task is not found there, or when there are no task dirs."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in task_paths]
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if all(n in manager.all_tasks for n in names):
            return manager
    return TaskManager(include_path=paths or None, include_defaults=True)


def stratified_subsample(task, n: int, seed: int, name: str) -> list[int]:
    """``n`` document indices of ``task``, drawn in proportion to strata, the same for every call.

    Strata are the documents' targets when they are few (labels, answer letters), else five
    prompt-length bins; each stratum gets its share of ``n`` (largest remainders), drawn with a
    generator seeded by (seed, task name).
    """
    import zlib

    import numpy as np

    docs = task.eval_docs
    total = len(docs)
    if n >= total:
        return list(range(total))
    targets = [str(task.doc_to_target(d)) for d in docs]
    if len(set(targets)) <= max(2, n // 4):
        keys = targets
    else:
        lengths = np.array([len(str(task.doc_to_text(d))) for d in docs])
        edges = np.quantile(lengths, [0.2, 0.4, 0.6, 0.8])
        keys = [str(int(np.searchsorted(edges, x, side="right"))) for x in lengths]
    strata: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        strata.setdefault(k, []).append(i)
    order = sorted(strata)
    exact = [n * len(strata[k]) / total for k in order]
    take = [int(x) for x in exact]
    for j in sorted(range(len(order)), key=lambda j: (take[j] - exact[j], order[j]))[: n - sum(take)]:
        take[j] += 1
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    chosen: list[int] = []
    for k, m in zip(order, take):
        chosen.extend(int(i) for i in rng.choice(strata[k], size=m, replace=False))
    return sorted(chosen)


def task_configs(task_paths: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
    """The YAML config (includes merged, functions unresolved) of each named task that the
    index finds as a YAML task; no dataset is loaded. Groups, tags, Python tasks and YAML that
    does not load are left out (``check_suite`` reports those)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = task_manager(task_paths, names)
    out: dict[str, dict] = {}
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None or entry.kind != Kind.TASK or entry.yaml_path is None:
            continue
        try:
            out[name] = load_yaml(entry.yaml_path, resolve_func=False)
        except Exception:
            continue
    return out


# the metrics lm-eval computes for a task without a metric_list, by output type
_DEFAULT_METRICS = {
    "loglikelihood": ("perplexity", "acc"),
    "multiple_choice": ("acc", "acc_norm", "acc_mutual_info"),
    "generate_until": ("exact_match",),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}


def check_suite(suite: SuiteConfig, task_paths: Sequence[str]) -> list[str]:
    """Problems of a suite found without loading any dataset: unknown tasks (with the closest
    names), local data files that do not exist, and metrics the task does not produce;
    unknown ``model_args``. One line each, naming the field."""
    import difflib
    import inspect

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    problems: list[str] = []
    params = inspect.signature(HFLM.__init__).parameters
    for key in suite.model_args:
        if key not in params:
            problems.append(f"suite.model_args.{key}: not an argument of lm-eval's HFLM")
    manager = task_manager(task_paths, [t.name for t in (*suite.tasks, *suite.validation_tasks, *suite.test_tasks)])
    where = ", ".join(str(p) for p in task_paths) + " or lm-eval's catalogue" if task_paths else "lm-eval's catalogue"
    for field, tasks in (("tasks", suite.tasks), ("validation_tasks", suite.validation_tasks),
                         ("test_tasks", suite.test_tasks)):
        for i, spec in enumerate(tasks):
            at = f"suite.{field}.{i}"
            entry = manager.task_index.get(spec.name)
            if entry is None:
                close = difflib.get_close_matches(spec.name, manager.all_tasks, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                problems.append(f"{at}.name: no lm-eval task {spec.name!r} in {where}{hint}")
                continue
            if entry.kind not in (Kind.TASK,) or entry.yaml_path is None:
                continue  # groups, tags and Python tasks: checked when they run
            try:
                cfg = load_yaml(entry.yaml_path, resolve_func=False)
            except Exception as exc:
                problems.append(f"{at}.name: {spec.name}'s YAML ({entry.yaml_path}) does not load: {exc}")
                continue
            for path in _local_data_files(cfg):
                problems.append(f"{at}.name: {spec.name}'s data file {path} does not exist"
                                + ("" if Path(path).is_absolute() else
                                   " (relative paths are read from the working directory; use an absolute path)"))
            metrics = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)]
            if not metrics:
                metrics = list(_DEFAULT_METRICS.get(cfg.get("output_type", "loglikelihood"), ()))
            if metrics and spec.metric not in metrics:
                problems.append(f"{at}.metric: {spec.name} does not produce {spec.metric!r}; it reports {metrics}")
            elif suite.racing is not None and field == "tasks":
                aggregation = next((m.get("aggregation") for m in cfg.get("metric_list") or []
                                    if isinstance(m, dict) and m.get("metric") == spec.metric), None) or "mean"
                if aggregation != "mean":
                    problems.append(f"{at}.metric: suite.racing combines rungs item by item, so it needs a mean "
                                    f"of per-item values; {spec.name} aggregates {spec.metric!r} with {aggregation!r}")
    return problems


def _local_data_files(cfg: dict) -> list[str]:
    """Data files a task names on the local disk that are missing (URLs and globs are not checked)."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    flat: list[str] = []
    if isinstance(files, str):
        flat = [files]
    elif isinstance(files, (list, tuple)):
        flat = [f for f in files if isinstance(f, str)]
    elif isinstance(files, dict):
        for v in files.values():
            flat.extend([v] if isinstance(v, str) else [f for f in v if isinstance(f, str)] if isinstance(v, list) else [])
    return [f for f in flat if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists()]


def _leaves_of(task_dict: dict, name: str) -> dict:
    """The leaf tasks a suite task name stands for (itself, or a group's members)."""
    leaves = _leaf_tasks(task_dict)
    if name in leaves:
        return {name: leaves[name]}
    for key, obj in (task_dict.get("tasks", task_dict) if isinstance(task_dict, dict) else {}).items():
        if (getattr(key, "group_name", None) or str(key)) == name and isinstance(obj, dict):
            return {n: t for n, t in _leaf_tasks(obj).items() if n == getattr(t, "task_name", n)}
    return {}


def _leaf_tasks(task_dict: dict) -> dict:
    """Name -> Task for the tasks inside a ``get_task_dict`` result (flat or nested)."""
    from lm_eval.api.task import Task

    out = {}
    items = task_dict.get("tasks", task_dict) if isinstance(task_dict, dict) else {}
    for name, obj in items.items():
        if isinstance(obj, Task):
            out[getattr(obj, "task_name", None) or str(name)] = obj
            out[str(name)] = obj
        elif isinstance(obj, dict):
            out.update(_leaf_tasks(obj))
    return out
