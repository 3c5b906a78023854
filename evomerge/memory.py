"""What a worker holds: the dry run's estimate of its peak memory, part by part.

A worker holds (PS) every source as the base plus stacked task vectors and one model to merge
into (DFS: its resident donors), in the search's dtype; while it scores a batch, the key/value
cache of the batch's contexts (copied per answer: every answer of a multiple-choice item
continues from its context), the logits over the whole vocabulary at every answer position and
their float32 log-softmax, and one layer's activations; and the runtime: Python, torch,
transformers, lm-eval and the suite's tasks.

On a CPU the peak is the worker process's resident set, runtime included; on a GPU it is what
torch allocates on the device, without the runtime (the CUDA context adds ~0.5 GiB the device
reports but torch does not count). The runtime is measured, not guessed: the resident set of
the process making the plan after it has loaded the same libraries and the suite's task index,
plus :data:`WORKER_RUNTIME` for what a worker adds (its Ray runtime, the tasks' datasets, the
tokenizer and the evaluator: measured on the embedded zoo, whose weights are a few MB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

WORKER_RUNTIME = 100 * 2**20  # bytes a worker holds beyond the plan's own process (measured on the zoo)


@dataclass(frozen=True)
class Shape:
    """What the activation terms need of a model (from its config)."""

    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value heads x head size
    vocab: int


def shape_of(config: Mapping[str, Any], arch) -> Shape:
    s = arch.shape(config)
    hidden = int(s["hidden_size"] or 0)
    return Shape(hidden=hidden, intermediate=int(s["intermediate_size"] or 4 * hidden), layers=arch.num_layers(config),
                 kv_dim=int(s["num_key_value_heads"] or 1) * int(s["head_dim"] or 0), vocab=int(s["vocab_size"] or 0))


@dataclass(frozen=True)
class Estimate:
    weights: int
    scoring: int
    runtime: Optional[int]  # None on a GPU (not on the device)
    device: str
    detail: str

    @property
    def total(self) -> int:
        return self.weights + self.scoring + (self.runtime or 0)

    def line(self) -> str:
        gib = 2**30
        where = "resident set of each CPU worker" if self.runtime is not None else "GPU memory torch allocates per worker"
        return (f"~{self.total / gib:.3g} GiB {where}: weights {self.weights / gib:.3g} GiB + scoring "
                f"{self.scoring / gib:.3g} GiB" + (f" + runtime {self.runtime / gib:.3g} GiB" if self.runtime else "")
                + f" ({self.detail})")


def scoring_bytes(shape: Shape, batch: int, context: int, answer: int, choices: int, weight_bytes: int) -> int:
    """Peak bytes of scoring one batch of ``batch`` requests (``choices`` answers per context, contexts of
    ``context`` tokens, answers of ``answer`` tokens)."""
    rows = batch
    groups = max(1, math.ceil(batch / max(1, choices)))
    kv = 2 * rows * context * shape.layers * shape.kv_dim * weight_bytes  # the contexts' cache, per answer row
    logits = rows * answer * shape.vocab * (weight_bytes + 4)  # logits + their float32 log-softmax
    activations = groups * (context + answer) * (4 * shape.hidden + 2 * shape.intermediate) * weight_bytes
    return kv + logits + activations


def estimate(copies: int, params: int, weight_bytes: int, shape: Shape, batch: int, context: int, answer: int,
             choices: int, device: str, runtime: Optional[int], detail: str, extra_weight_bytes: int = 0) -> Estimate:
    """``copies`` full-size sets of ``params`` weights, plus ``extra_weight_bytes`` (LoRA factors)."""
    weights = copies * params * weight_bytes + extra_weight_bytes
    scoring = scoring_bytes(shape, batch, context, answer, choices, weight_bytes)
    return Estimate(weights, scoring, runtime if not device.startswith("cuda") else None, device, detail)


def resident_peak() -> int:
    """This process's own resident peak, bytes.

    On Linux the high-water mark of its address space (``VmHWM``): ``getrusage``'s ``ru_maxrss``
    survives fork and exec, so a process started by a big one (a test session, a notebook)
    would report its parent's peak.
    """
    import resource
    import sys

    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def process_runtime() -> int:
    """This process's resident peak, bytes, plus what a worker adds (:data:`WORKER_RUNTIME`)."""
    return resident_peak() + WORKER_RUNTIME


def request_lengths(tokenizer: Any, docs: list[Mapping[str, Any]], text_field: str, choice_field: str,
                    delimiter: str = " ") -> tuple[int, int, int]:
    """(longest context, longest answer, most answers) in tokens over multiple-choice ``docs`` whose
    question and choices are plain fields (as lm-eval joins them: context + delimiter + choice)."""
    context = answer = choices = 0
    for doc in docs:
        ctx = tokenizer(str(doc[text_field]), add_special_tokens=True)["input_ids"]
        context = max(context, len(ctx))
        options = doc[choice_field]
        choices = max(choices, len(options))
        for option in options:
            whole = tokenizer(str(doc[text_field]) + delimiter + str(option), add_special_tokens=True)["input_ids"]
            answer = max(answer, len(whole) - len(ctx))
    return context, max(1, answer), max(1, choices)
