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
