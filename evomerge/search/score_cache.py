"""A run's link to the fitness cache: scores known before a worker is asked, and those it adds."""

from __future__ import annotations

from typing import Optional

from evomerge.fitness_cache import FitnessCache
from evomerge.search.work import Work, cache_key
from evomerge.worker import EvalResult


class ScoreCache:
    """The run's link to the fitness cache (none when ``suite.cache: off``): scores known before
    a worker is asked, and the scores this run adds."""

    def __init__(self, cache: Optional[FitnessCache], run_id: str) -> None:
        self.cache = cache
        self.run_id = run_id

    def lookup(self, work: Work) -> Optional[EvalResult]:
        rec = self.cache.get(*cache_key(work)) if self.cache is not None else None
        if rec is None:
            return None
        return EvalResult(trial_id=work.request.trial_id, state="complete", fitness=rec["fitness"],
                          scores=dict(rec["scores"]), worker="cache", split=work.request.split,
                          cached_from=rec.get("origin") or "cache", items=rec.get("items"))

    def add(self, work: Work, res: EvalResult) -> None:
        if self.cache is not None and res.state == "complete":
            what = f"trial {work.request.trial_id}" if work.kind == "trial" else f"{work.kind} {work.label}"
            # a validation score keeps its per-item values (a selection pairs candidates on them),
            # as do a source's and a test score (their standard errors, the evidence of a gain)
            self.cache.put(*cache_key(work), res.fitness, res.scores, origin=f"{self.run_id}: {what}",
                           items=res.items if work.kind != "trial" else None)

    def remember(self, key: str, split: str, rec: dict) -> None:
        """A score from this run's ledger (resume): in memory only, it is in the shared file already."""
        if self.cache is not None and rec.get("state") == "complete":
            self.cache.put(key, split, rec["fitness"], rec.get("scores") or {}, origin="ledger", persist=False)
