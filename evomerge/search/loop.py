"""The search loop: ask → dispatch → tell → record, then the held-out splits.

Libraries never own the loop: the optimizers only answer ask/tell (through the islands, see
:mod:`evomerge.islands`), the dispatcher only runs requests, the tracker only records. The loop
is asynchronous and steady-state: whenever a worker is free it gets the next candidate of some
island, so no worker waits for a generation barrier. Every result is recorded by the run's state
(:mod:`evomerge.search.run_state`: the ledger first) before anything else sees it. Failed
trials (exception, non-finite fitness, worker death, timeout) are recorded with their reason
and told to the optimizer with a penalty — in ``islands.penalized`` only. After the budget, the
top trials are scored on the validation split (the winner, see :mod:`evomerge.selection`) and
the winner and every source on the test split.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Optional

from evomerge.dispatch.base import Dispatcher
from evomerge.recipe import Recipe, recipe_from_dict
from evomerge.run_dir import save_best_recipe
from evomerge.search.run_state import RunState
from evomerge.search.summary import RunSummary, summarize
from evomerge.search.work import Work, normalized
from evomerge.selection import choose, selection_metrics, selection_record, top_trials
from evomerge.uncertainty import uncertainty_metrics
from evomerge.worker import EvalRequest


class Search:
    """Runs a run's state to the end of its budget on a dispatcher's workers."""

    def __init__(self, state: RunState) -> None:
        self.state = state

    def search(self, dispatcher: Dispatcher) -> RunSummary:
        state = self.state
        exp = state.exp
        progress = state.progress
        queue: deque[Work] = deque(
            Work("baseline", EvalRequest(trial_id=-(i + 1), source=name, split="search"), label=name)
            for i, name in enumerate(state.sources) if name not in state.scores.baselines_done
        )
        state.phase_begin("sources (search split)", len(queue))
        redo = [Work("trial", state.request(c), candidate=c) for c in state.redo]
        state.redo = []
        for work in redo:
            go_on, final = state.racing.resumed(work) if state.racing is not None else (work, None)
            queue.extend([go_on] if go_on is not None else [])
            if final is not None:
                state.finish_trial(work, final)
        progress.start(exp.budget.max_trials, done=state.finished)
        stats = self.loop(dispatcher, queue, state.next_candidate, exhausted=lambda: state.scheduler.exhausted)
        progress.close()
        state.phase_end()

        selection = self.select(dispatcher) if exp.suite.validation_tasks and state.best is not None else None
        winner = state.best if selection is None else (
            selection["trial_id"], selection["search_fitness"],
            next(recipe_from_dict(r["recipe"]) for r in state.board.records if r["trial_id"] == selection["trial_id"]))
        test_scores: dict[str, float] = {}
        if exp.suite.test_tasks and winner is not None:
            progress.message("scoring the best recipe and the sources on the held-out test split")
            test_scores = self.test_split(dispatcher, winner)

        summary = summarize(state, stats, test_scores, dispatcher.num_workers, winner, selection)
        state.feed.tracker.log_summary({f"baseline.{k}": v for k, v in state.baselines.items()}
                                      | {f"test.{k}": v for k, v in test_scores.items()}
                                      | (selection_metrics(selection) if selection else {})
                                      | ({"best_fitness_final": summary.best_fitness} if state.best else {})
                                      | uncertainty_metrics(summary.standard_errors, summary.evidence))
        return summary

    def select(self, dispatcher: Dispatcher) -> Optional[dict]:
        """Score the top_k trials by search fitness on the validation split (those not scored
        yet), record the winner there as a ``selection`` and make it ``best_recipe.yaml``.
        Returns the selection record; None (the search split's best stays) if no trial could
        be scored on the validation split."""
        state = self.state
        candidates = top_trials(state.board.records, state.exp.selection.top_k)
        todo = deque(Work("validation", EvalRequest(trial_id=c["trial_id"], recipe=c["recipe"], split="validation"),
                           label=f"trial {c['trial_id']}", recipe_hash=c["recipe_hash"])
                     for c in candidates if c["trial_id"] not in state.scores.validations)
        state.progress.message(f"scoring the top {len(candidates)} trials (by search fitness) on the validation split")
        state.phase_begin("validation split", len(todo))
        self.loop(dispatcher, todo, lambda: None)
        state.phase_end()
        scores = state.scores.validation_scores()
        weights = {t.name: t.weight for t in state.exp.suite.validation_tasks}
        choice = choose(candidates, scores, state.scores.validation_items(), weights, state.exp.selection.min_z,
                        seed=state.exp.optimizer.seed)
        if choice is None:
            state.progress.message("no trial could be scored on the validation split; the winner is the search "
                                      "split's best")
            return None
        rec = selection_record(choice, candidates, scores, state.exp.selection.min_z)
        state.ledger.append(rec)
        save_best_recipe(state.run_dir, recipe_from_dict(choice.winner["recipe"]))
        return rec

    def loop(self, dispatcher: Dispatcher, queue: deque[Work], more: Callable[[], Optional[Work]],
              exhausted: Callable[[], bool] = lambda: True) -> dict[str, float]:
        """Keep every worker busy until ``queue`` and ``more`` are exhausted and nothing is in flight.

        Returns worker busy seconds (as the workers report them), loop seconds, seconds
        spent waiting on the dispatcher, results handled; and the steady state: busy
        seconds of the results received before ``exhausted()`` (all work handed out)
        and the seconds until then — a conservative busy share that leaves out the
        unavoidable drain of the last trials.
        """
        state = self.state
        inflight: dict[tuple[str, int], Work] = {}
        busy = wait_s = 0.0
        handled = 0
        steady_busy, steady_s, steady_up = 0.0, None, 0.0
        up0 = dispatcher.worker_seconds()
        t0 = time.perf_counter()
        while True:
            # refill free workers first: the ledger already has the results; the tracker
            # (milliseconds per call over HTTP) catches up while the workers run
            while len(inflight) < dispatcher.num_workers:
                work = queue.popleft() if queue else more()
                if work is None:
                    break
                if work.kind == "trial" and not work.request.rung:
                    state.record_dispatch(work.candidate)
                hit = state.cache.lookup(work) if not work.request.rung else None
                if hit is not None:  # a score already known: no worker needed
                    handled += 1
                    getattr(state, f"on_{work.kind}")(work, hit)
                    continue
                inflight[(work.request.split, work.request.trial_id)] = work
                dispatcher.submit(work.request)
            state.feed.flush()
            if steady_s is None and not queue and exhausted():
                steady_s = time.perf_counter() - t0
                steady_up = dispatcher.worker_seconds() - up0
            if not inflight:
                break
            tw = time.perf_counter()
            results = dispatcher.wait(timeout=1.0)
            wait_s += time.perf_counter() - tw
            for res in results:
                work = inflight.pop((res.split, res.trial_id))
                res = normalized(res)
                if work.request.rung is None:  # racing rungs are cached once final (finish_trial)
                    state.cache.add(work, res)
                busy += res.merge_seconds + res.eval_seconds
                if steady_s is None:
                    steady_busy += res.merge_seconds + res.eval_seconds
                handled += 1
                getattr(state, f"on_{work.kind}")(work, res)
        return {"busy": busy, "loop_s": time.perf_counter() - t0, "wait_s": wait_s, "handled": handled,
                "steady_busy": steady_busy, "steady_s": steady_s or 0.0, "up_s": dispatcher.worker_seconds() - up0,
                "steady_up_s": steady_up}

    def test_split(self, dispatcher: Dispatcher, winner: tuple[int, float, Recipe]) -> dict[str, float]:
        """Test-split scores of the winner (``best``), of the search split's best when validation
        chose another (``search_best``), of a Pareto front's members (``trial N``) and of every
        source."""
        state = self.state
        recipes = {"best": winner[2]}
        state.test_trials = {"best": winner[0]}
        if state.best is not None and state.best[0] != winner[0]:
            recipes["search_best"] = state.best[2]
            state.test_trials["search_best"] = state.best[0]
        if state.board.multi_objective:
            by_id = {r["trial_id"]: r for r in state.board.records}
            for t in state.board.front.trial_ids():
                recipes[f"trial {t}"] = recipe_from_dict(by_id[t]["recipe"])
                state.test_trials[f"trial {t}"] = t
        wanted = state.scores.test_works(recipes, state.sources)
        todo = deque(w for w in wanted if not state.scores.has_test(w))
        state.phase_begin("test split", len(todo))
        self.loop(dispatcher, todo, lambda: None)
        state.phase_end()
        return state.scores.test_scores(wanted)
