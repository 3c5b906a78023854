"""What a run knows, and how each result is recorded: ledger first, then everything else.

:class:`RunState` is rebuilt from the ledger on resume (:meth:`RunState.load` replays it: every
island re-asked and re-told, the finished trials, sources, validation and test scores), and
advanced by the loop (:mod:`evomerge.search.loop`) one result at a time: a trial's record goes
to the ledger (the source of truth) before ``best_recipe.yaml``, the tracker, the optimizer and
the progress line see it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from evomerge.config import Experiment
from evomerge.errors import EvomergeError
from evomerge.fitness_cache import recipe_key, source_key
from evomerge.islands import Candidate, IslandScheduler, ReplayError, Tell, replay
from evomerge.ledger import Ledger
from evomerge.racing import Race, counts_for_best
from evomerge.recipe import Recipe
from evomerge.run_dir import ItemLog, pack_values, pareto_path, save_best_recipe, unpack_values
from evomerge.search.held_out import HeldOutScores
from evomerge.search.progress import Progress
from evomerge.search.racing_state import RacingState
from evomerge.search.score_cache import ScoreCache
from evomerge.search.scoreboard import Scoreboard, TrackerFeed
from evomerge.search.work import Work, packed_task_items
from evomerge.tracking.metrics import trial_metrics
from evomerge.worker import EvalRequest, EvalResult


class RunState:
    """What a run knows: rebuilt from the ledger on resume, advanced by the event loop."""

    def __init__(self, run_id: str, run_dir: Path, progress: Progress, exp: Experiment, ledger: Ledger,
                 scheduler: IslandScheduler) -> None:
        self.run_id, self.run_dir, self.progress = run_id, run_dir, progress
        self.exp = exp
        self.ledger = ledger
        self.scheduler = scheduler
        self.feed = TrackerFeed()
        self.sources = [m.name for m in exp.models]
        self.board = Scoreboard(exp.optimizer.objectives == "per_task")
        self.next_trial_id = 0
        self.redo: list[Candidate] = []
        self.missing_tells: list[Tell] = []
        self.cache = ScoreCache(None, run_id)
        self.items = ItemLog(run_dir)
        self.scores = HeldOutScores(ledger, self.items, progress)
        racing = exp.suite.racing
        self.racing = RacingState(Race(racing, exp.suite.tasks)) if racing is not None else None
        self.test_trials: dict[str, int] = {}  # test labels of recipes -> their trial ids
        self._phase: Optional[list] = None  # [name, done, total] of a held-out phase (sources, validation, test)
        self.item_values: dict[str, list[float]] = {}  # optimizers told per-item scores: by recipe hash

    @property
    def finished(self) -> int:
        return len(self.board.records)

    @property
    def best(self) -> Optional[tuple[int, float, Recipe]]:
        return self.board.best

    @property
    def baselines(self) -> dict[str, float]:
        return self.scores.baselines

    def load(self, resuming: bool) -> None:
        """Replay the ledger: re-ask and re-tell every island, collect what is done."""
        if not resuming:
            return
        dispatched: dict[tuple[int, int, int], dict] = {}
        finished: dict[int, dict] = {}
        tells: dict[tuple[int, int], dict] = {}
        for rec in self.ledger:
            kind = rec.get("kind")
            if kind == "dispatch":
                dispatched[(rec["island"], rec["generation"], rec["member"])] = rec
                self.next_trial_id = max(self.next_trial_id, rec["trial_id"] + 1)
            elif kind == "rung" and self.racing is not None:
                self.racing.replay(rec)
            elif kind == "trial":
                finished[rec["trial_id"]] = rec
                self.board.note(rec)
                if self.racing is not None:
                    self.racing.replay(rec)
                if counts_for_best(rec):
                    self.cache.remember(recipe_key(rec["recipe_hash"]), "search", rec)
            elif kind == "tell":
                tells[(rec["island"], rec["generation"])] = rec
            elif kind == "baseline":
                self.scores.replay(rec)
                self.cache.remember(source_key(rec["model"]), "search", rec)
            elif kind == "test":
                self.scores.replay(rec)
                key = recipe_key(rec["recipe_hash"]) if rec.get("recipe_hash") else source_key(rec["model"])
                self.cache.remember(key, "test", rec)
            elif kind == "validation":
                self.scores.replay(rec)
                self.cache.remember(recipe_key(rec["recipe_hash"]), "validation", rec)
        try:
            self.redo, self.missing_tells = replay(self.scheduler, dispatched, finished, tells, self.board.told_input,
                                                   self._recorded_items)
        except ReplayError as exc:
            raise EvomergeError(f"cannot resume {self.run_id}: {exc}") from None
        for tell in self.missing_tells:
            self._record_tell(tell)
        if self.best is not None:
            save_best_recipe(self.run_dir, self.best[2])
        if self.board.multi_objective:
            self.write_pareto()

    def write_pareto(self) -> None:
        self.board.write_pareto(pareto_path(self.run_dir), [t.name for t in self.exp.suite.tasks])

    def next_candidate(self) -> Optional[Work]:
        if self.racing is not None and self.racing.promoted:  # finish started trials first: islands wait on them
            return self.racing.promoted.popleft()
        cand = self.scheduler.next()
        if cand is None:
            return None
        cand.trial_id = self.next_trial_id
        self.next_trial_id += 1
        return Work("trial", self.request(cand), candidate=cand)

    def request(self, cand: Candidate) -> EvalRequest:
        return EvalRequest(trial_id=int(cand.trial_id), recipe=cand.recipe.to_dict(),
                           rung=0 if self.racing is not None else None)

    def record_dispatch(self, cand: Candidate) -> None:
        self.ledger.append({
            "kind": "dispatch", "trial_id": cand.trial_id, "island": cand.island, "generation": cand.generation,
            "member": cand.member, "genome": [float(x) for x in cand.genome],
            "recipe_hash": cand.recipe.content_hash(), "at": time.time(),
        })

    def on_trial(self, work: Work, res: EvalResult) -> None:
        """A trial's result; under racing, one rung's: promote it, or make its score so far final."""
        if res.state == "complete" and not res.cached_from:
            self.items.append(res.items, trial_id=res.trial_id, rung=work.request.rung)
        racing = self.racing
        if racing is not None and res.cached_from:
            res.rung = racing.race.last  # this run caches racing scores only from the last rung
        elif racing is not None and work.request.rung is not None:
            res = racing.on_rung(work, res, self.ledger)
            if res is None:
                return  # promoted: the next rung is queued
        self.finish_trial(work, res)

    def finish_trial(self, work: Work, res: EvalResult) -> None:
        """Ledger first (the source of truth), then best_recipe.yaml, tracker, optimizer, progress."""
        cand = work.candidate
        board = self.board
        racing_fields = {}
        if self.racing is not None:
            res, racing_fields = self.racing.finish(res)
        objectives = None
        if board.multi_objective and res.state == "complete":
            objectives = [float(res.scores[t.name]) for t in self.exp.suite.tasks]
        rec = {
            "kind": "trial", "trial_id": res.trial_id, "island": cand.island, "generation": cand.generation,
            "member": cand.member, "genome": [float(x) for x in cand.genome],
            "recipe_hash": cand.recipe.content_hash(), "recipe": cand.recipe.to_dict(), "state": res.state,
            "fitness": res.fitness, "scores": res.scores, "merge_seconds": res.merge_seconds,
            "eval_seconds": res.eval_seconds, "error": res.error, "worker": res.worker,
            "attempts": res.attempts, "finished_at": time.time(),
        }
        if res.cached_from:
            rec["cached_from"] = res.cached_from
        if res.items and work.request.rung is None:  # a score's standard error, paired comparisons
            rec["task_items"] = packed_task_items(res)
        if res.peak_bytes:
            rec["peak_bytes"] = res.peak_bytes
        if board.multi_objective:
            rec["objectives"] = objectives
        items = self._trial_items(res, rec["recipe_hash"]) if self.scheduler.wants_items else None
        if items is not None:
            rec["item_values"] = pack_values(items)
        if racing_fields:
            rec.update(racing_fields)
            if res.state == "complete" and counts_for_best(rec) and not res.cached_from:
                self.cache.add(work, res)
        self.ledger.append(rec)
        previous_best = board.best
        if board.note(rec):
            self.write_pareto()
        if board.best is not previous_best:
            save_best_recipe(self.run_dir, board.best[2])
        # tracking waits until the free workers have their next candidates (see _loop)
        self.feed.add(self.finished - 1, trial_metrics(
            rec, board.best[1] if board.best else None, len(board.front.members) if board.multi_objective else None))
        tell = self.scheduler.receive(cand, res.state, board.told_input(rec), items)
        if tell is not None:
            self._record_tell(tell)
        if res.state != "complete":
            self.progress.message(f"trial {res.trial_id} failed: {res.error.splitlines()[0]}")
        self.progress.advance(board.best[1] if board.best else None, board.failed)

    def _trial_items(self, res: EvalResult, recipe_hash: str) -> Optional[list[float]]:
        """A complete trial's per-item scores of the search split, for optimizers told them (M2N2):
        leaf tasks by name, documents by id. A cached score has none: it takes those of the same
        recipe earlier in this run, else (a score from another run's shared cache) its fitness
        on every item."""
        if res.state != "complete":
            return None
        if res.items:
            values = [v for leaf in sorted(res.items)
                      for _, v in sorted(zip(res.items[leaf]["docs"], res.items[leaf]["values"]))]
        elif recipe_hash in self.item_values:
            values = self.item_values[recipe_hash]
        elif self.item_values:
            values = [float(res.fitness)] * len(next(iter(self.item_values.values())))
        else:
            return None
        self.item_values[recipe_hash] = values
        return values

    def _recorded_items(self, rec: dict) -> Optional[list[float]]:
        """The per-item scores a trial record carries (resume), remembered by recipe."""
        if rec.get("item_values") is None:
            return None
        values = unpack_values(rec["item_values"])
        self.item_values[rec["recipe_hash"]] = values
        return values

    def _record_tell(self, tell: Tell) -> None:
        self.ledger.append({"kind": "tell", "island": tell.island, "generation": tell.generation,
                            "trial_ids": list(tell.trial_ids), "values": list(tell.values), "state": tell.state,
                            "at": time.time()})

    def on_baseline(self, work: Work, res: EvalResult) -> None:
        self.scores.on_baseline(work, res)
        self._phase_step(work, res)

    def on_validation(self, work: Work, res: EvalResult) -> None:
        self.scores.on_validation(work, res)
        self._phase_step(work, res)

    def on_test(self, work: Work, res: EvalResult) -> None:
        self.scores.on_test(work, res, self.test_trials.get(work.label))
        self._phase_step(work, res)

    def phase_begin(self, name: str, total: int) -> None:
        """Scores outside the search's progress bar (sources, validation, test split) report each one."""
        self._phase = [name, 0, total]

    def phase_end(self) -> None:
        self._phase = None

    def _phase_step(self, work: Work, res: EvalResult) -> None:
        phase = self._phase
        if phase is None or not phase[2]:
            return
        phase[1] += 1
        score = f"{res.fitness:.4f}" if res.state == "complete" else "failed"
        self.progress.message(f"{phase[0]}: {phase[1]}/{phase[2]} scored ({work.label}: {score}"
                                  + (f", {res.eval_seconds:.1f} s" if res.eval_seconds else "") + ")")
