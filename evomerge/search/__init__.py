"""The search: a run from start to end (:mod:`~evomerge.search.controller`), its loop
(:mod:`~evomerge.search.loop`: ask → dispatch → tell → record), the run's state and how results
are recorded (:mod:`~evomerge.search.run_state`), the scores beside the search
(:mod:`~evomerge.search.held_out`), racing between rungs (:mod:`~evomerge.search.racing_state`),
the finished trials (:mod:`~evomerge.search.scoreboard`), the score cache
(:mod:`~evomerge.search.score_cache`) and the run's summary (:mod:`~evomerge.search.summary`)."""

from evomerge.search.controller import Controller
from evomerge.search.progress import NoProgress, Progress
from evomerge.search.summary import RunSummary
from evomerge.search.work import failure_reason

__all__ = ["Controller", "NoProgress", "Progress", "RunSummary", "failure_reason"]
