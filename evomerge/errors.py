"""The exceptions evomerge raises on purpose; anything else is a bug."""

from __future__ import annotations


class EvomergeError(Exception):
    """Base of every error evomerge raises on purpose."""


class ConfigError(EvomergeError):
    """A configuration has problems; all of them are listed, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class MergeError(EvomergeError):
    """Sources or a recipe cannot be merged (mismatched tensors, bad parameters...)."""


class EvaluationError(EvomergeError):
    """Scoring a merged model failed (missing metric, non-finite fitness...)."""


class RunInterrupted(EvomergeError):
    """The run stopped before its budget for a cause outside the search (the cluster's head lost,
    no worker could run): it is recorded as ``interrupted`` and can be resumed once the cause is
    gone. ``what`` names the kind of cause in a word or two (``head lost``, ``no workers``)."""

    what = "interrupted"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ClusterLost(RunInterrupted):
    """The Ray cluster's head stopped answering (the head died, or the network to it did)."""

    what = "head lost"


class NoWorkers(RunInterrupted):
    """No worker could run for longer than ``dispatch.worker_timeout`` (none started, or all were lost)."""

    what = "no workers"
