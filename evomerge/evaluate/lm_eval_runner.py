"""The only module that imports ``lm_eval``.

An :class:`LmEvalEvaluator` wraps one in-memory model (whose weights the worker
rewrites in place for every candidate) in a single reused ``HFLM``; lm-eval
sees the new weights on each call. Tasks are indexed only from the suite's task
directories (never lm-eval's whole catalogue) and built once per split with
``get_task_dict``; each evaluation is one ``lm_eval.evaluator.evaluate`` call.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Literal, Sequence

from evomerge.config import SuiteConfig, TaskSpec
from evomerge.errors import EvaluationError

Split = Literal["search", "test"]

# lm-eval looks up its git revision and prints "fatal: not a git repository" outside a checkout.
os.environ.setdefault("GIT_DIR", os.devnull)


def _quiet_lm_eval() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)


class LmEvalEvaluator:
    """Scores an in-memory causal LM on a suite's search or test split."""

    def __init__(self, model, tokenizer, suite: SuiteConfig, task_paths: Sequence[str], device: str = "cpu") -> None:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict

        _quiet_lm_eval()
        self.suite = suite
        self._lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            device=device,
            batch_size=suite.batch_size,
            add_bos_token=suite.add_bos_token,
        )
        self._manager = TaskManager(include_path=[str(p) for p in task_paths] or None, include_defaults=not task_paths)
        self._splits: dict[str, tuple[Sequence[TaskSpec], dict]] = {}
        for split, tasks in (("search", suite.tasks), ("test", suite.test_tasks)):
            if not tasks:
                continue
            names = [t.name for t in tasks]
            unknown = [n for n in names if n not in self._manager.all_tasks]
            if unknown:
                raise EvaluationError(f"unknown lm-eval task(s) {unknown} in {list(task_paths) or 'lm-eval catalogue'}")
            with contextlib.redirect_stdout(io.StringIO()):
                task_dict = get_task_dict(names, self._manager)
            if suite.num_fewshot is not None:
                for task in _leaf_tasks(task_dict).values():
                    task.set_config(key="num_fewshot", value=suite.num_fewshot)
            self._splits[split] = (tasks, task_dict)

    def has_split(self, split: Split) -> bool:
        return split in self._splits

    def evaluate(self, split: Split = "search") -> dict[str, float]:
        """Per-task metric values of the model as its weights are *now*."""
        from lm_eval.evaluator import evaluate

        if split not in self._splits:
            raise EvaluationError(f"the suite has no {split} tasks")
        tasks, task_dict = self._splits[split]
        leaves = _leaf_tasks(task_dict)
        samples = None
        if any(t.limit for t in tasks):
            samples = {
                t.name: list(range(min(t.limit or len(leaves[t.name].eval_docs), len(leaves[t.name].eval_docs))))
                for t in tasks
            }
        with contextlib.redirect_stdout(io.StringIO()):
            out = evaluate(
                lm=self._lm,
                task_dict=task_dict,
                samples=samples,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
            )
        if out is None:
            raise EvaluationError("lm-eval returned no results")
        results = out["results"]
        scores: dict[str, float] = {}
        for t in tasks:
            task_results = results.get(t.name, {})
            key = next((k for k in task_results if k == t.metric or k.startswith(t.metric + ",")), None)
            if key is None:
                have = sorted(k.split(",")[0] for k in task_results if not k.endswith("_stderr") and "," in k)
                raise EvaluationError(f"task {t.name!r} has no metric {t.metric!r}; it reports {have}")
            scores[t.name] = float(task_results[key])
        return scores


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
