"""Racing (multi-fidelity fitness): which candidates earn more items, and their combined scores.

A racing run scores every candidate on rung 0's items first. After each rung, the candidate is
promoted to the next (its new items only) while it could still be among the best; otherwise its
score so far is final and is what the optimizer is told. The rung sets are nested, so a
candidate's score at rung k is the mean over every item it has been scored on: per suite task,
the running count, sum and sum of squares of per-item values (enough for the mean and its
standard error, and small enough for the ledger, from which a resumed run rebuilds the race).

Only trials scored on the last rung count as the run's best: a 50-item score is not compared
with 300-item ones (:func:`counts_for_best`).

Pure bookkeeping: no lm-eval, no Ray; the controller calls it.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from evomerge.config import RacingConfig, TaskSpec
from evomerge.ledger import counts_for_best

__all__ = ["Race", "counts_for_best", "stopped_per_rung", "tallies_of", "MIN_SEEN"]

# Rule `top`: the first candidates at a rung are promoted until it has seen this many scores
# (a share of three or four scores is not a ranking).
MIN_SEEN = 5

Tallies = dict[str, list[float]]  # suite task -> [count, sum, sum of squares]


def tallies_of(items: Optional[Mapping[str, Mapping]]) -> Tallies:
    """Per suite task, [count, sum, sum of squares] of the per-item values of a result."""
    out: Tallies = {}
    for entry in (items or {}).values():
        t = out.setdefault(entry["task"], [0.0, 0.0, 0.0])
        for v in entry["values"]:
            t[0] += 1
            t[1] += v
            t[2] += v * v
    return out


def stopped_per_rung(records: Sequence[Mapping]) -> list[int]:
    """How many finished racing trials (scored by a worker, not the cache) stopped at each rung."""
    racing = [r for r in records if r.get("last_rung") is not None]
    out = [0] * (racing[0]["last_rung"] + 1 if racing else 0)
    for r in racing:
        if r["state"] == "complete" and not r.get("cached_from"):
            out[r["rung"]] += 1
    return out


class Race:
    """The race of one run: per-rung score histories, each unfinished trial's tallies."""

    def __init__(self, config: RacingConfig, tasks: Sequence[TaskSpec]) -> None:
        self.config = config
        self.tasks = list(tasks)
        self.last = len(config.rungs) - 1
        self.seen: list[list[float]] = [[] for _ in config.rungs]
        self.tallies: dict[int, Tallies] = {}
        self.fitness_by_rung: dict[int, list[float]] = {}
        self.best_final: Optional[float] = None
        self.finalists: list[tuple[float, list[float]]] = []  # last-rung trials: (fitness, score per rung)
        self.items_scored = 0  # item evaluations of trials (baselines not counted)

    # ---------------------------------------------------------------- scores
    def add(self, trial_id: int, rung: int, new: Tallies) -> tuple[float, dict[str, float], float]:
        """Fold a rung's new items into the trial: (fitness, per-task scores, standard error)."""
        mine = self.tallies.setdefault(trial_id, {})
        for task, (n, s, q) in new.items():
            t = mine.setdefault(task, [0.0, 0.0, 0.0])
            t[0] += n
            t[1] += s
            t[2] += q
            self.items_scored += int(n)
        fitness, scores, se = self.combined(mine)
        self.fitness_by_rung.setdefault(trial_id, []).append(fitness)
        self.seen[rung].append(fitness)
        return fitness, scores, se

    def combined(self, tallies: Tallies) -> tuple[float, dict[str, float], float]:
        scores, weight, total, var = {}, 0.0, 0.0, 0.0
        for spec in self.tasks:
            n, s, q = tallies.get(spec.name, (0.0, 0.0, 0.0))
            if n <= 0:
                raise ValueError(f"racing: task {spec.name!r} has no scored items")
            mean = s / n
            scores[spec.name] = mean
            weight += spec.weight
            total += spec.weight * mean
            var += spec.weight ** 2 * max(q / n - mean * mean, 0.0) / n
        return total / weight, scores, math.sqrt(var) / weight

    # ---------------------------------------------------------------- decisions
    def promote(self, rung: int, fitness: float, se: float) -> bool:
        """Whether a candidate scored ``fitness`` (± ``se``) at ``rung`` goes on to the next."""
        if rung >= self.last:
            return False
        if self.config.rule == "bound":
            return self.best_final is None or fitness + self.config.z * se >= self.best_final
        if self.config.rule == "elite":
            # paired: the best `elite` trials so far were scored on these same items at this rung
            best = sorted((f for f in self.finalists if len(f[1]) > rung), key=lambda f: -f[0])[: self.config.elite]
            return len(best) < self.config.elite or fitness >= min(f[1][rung] for f in best)
        seen = sorted(self.seen[rung])
        if len(seen) < MIN_SEEN:
            return True
        # the score at the top `promote` share: promoted if at least as good
        cut = seen[max(0, math.ceil(len(seen) * (1.0 - self.config.promote)) - 1)]
        return fitness >= cut

    def finish(self, trial_id: int, rung: int, fitness: Optional[float]) -> None:
        """The trial is final (at ``rung``); a last-rung score may become the best to beat."""
        self.tallies.pop(trial_id, None)
        if fitness is not None and rung == self.last:
            self.best_final = fitness if self.best_final is None else max(self.best_final, fitness)
            scores = self.fitness_by_rung.get(trial_id, [])
            if len(scores) == self.last + 1:  # scored here rung by rung (not a cached score)
                self.finalists.append((fitness, list(scores)))

    def replay(self, rec: Mapping) -> None:
        """Rebuild from a ledger ``rung`` record (resume)."""
        self.add(int(rec["trial_id"]), int(rec["rung"]), {k: list(v) for k, v in rec["tallies"].items()})
