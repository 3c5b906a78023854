"""Controller scaling: the real controller + real Ray actors with a simulated evaluator.

Each worker sleeps for a per-trial duration drawn in [low, low * spread] (5x
variation by default) instead of merging and scoring, so the figures measure the
controller and the dispatch path alone: ledger fsyncs, MLflow logging (sqlite),
Ray round trips, the island scheduler. For 1, 4, 16 and 64 workers it prints

- throughput (trials/s, from the first worker up to the last result) and, per second of a live
  worker, its ratio to one worker's (goal >= 0.9: the controller keeps up with N workers),
- worker busy time: simulated trial seconds / seconds workers were up (goal >= 95 %); the pool
  starts the search with its first worker, so the wall-clock figures include the start-up ramp,
- controller overhead per trial: loop time not spent waiting on workers (goal < 50 ms).

Usage: python benchmarks/controller_scaling.py [--workers 1,4,16,64] [--trials-per-worker 20]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.config import parse_experiment  # noqa: E402
from evomerge.search import Controller  # noqa: E402
from evomerge.testing import SimulatedWorker  # noqa: E402


def experiment(workers: int, trials: int, popsize: int, tracking: str):
    data = {
        "name": f"scaling-{workers}",
        "zoo": {"kind": "tiny", "seed": 0},  # only for the genome layout; workers never load it
        "models": [{"name": n, "path": f"zoo:{n}"} for n in ("base", "expert_a", "expert_b")],
        "base_model": "base",
        "search_space": str(ROOT / "search_spaces" / "ps_ties_dare_per_layer.yaml"),
        "suite": {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}]},
        "optimizer": {"popsize": popsize, "seed": 0},
        "budget": {"max_trials": trials},
        "dispatch": {"backend": "ray", "num_workers": workers},
        "tracking": {"backend": tracking},
    }
    return parse_experiment(data, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,4,16,64")
    ap.add_argument("--trials-per-worker", type=int, default=20)
    ap.add_argument("--low", type=float, default=0.4, help="shortest simulated trial, seconds")
    ap.add_argument("--spread", type=float, default=5.0, help="longest / shortest trial")
    ap.add_argument("--popsize", type=int, default=16)
    ap.add_argument("--tracking", default="mlflow", choices=["mlflow", "none"])
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    rows = []
    one_worker = None
    for n in [int(x) for x in args.workers.split(",")]:
        trials = n * args.trials_per_worker
        exp = experiment(n, trials, args.popsize, args.tracking)
        factory = functools.partial(SimulatedWorker, low=args.low, spread=args.spread)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            summary = Controller(exp, Path(tmp) / "run", worker_factory=factory).run()
            total = time.perf_counter() - t0
        handled = summary.trials + len(summary.baselines)
        throughput = handled / summary.search_seconds
        per_worker = handled / summary.worker_seconds  # per second of a live worker
        if one_worker is None and n == 1:
            one_worker = per_worker
        scale = per_worker / one_worker if one_worker else float("nan")
        rows.append((n, summary.islands, trials, throughput, scale, summary.worker_busy_fraction,
                     summary.steady_busy_fraction, summary.controller_ms_per_trial, total))
        print(f"  {n} workers done in {total:.0f} s (incl. starting Ray and the actors)", file=sys.stderr, flush=True)

    print(f"\ncontroller scaling: simulated trials {args.low:g}-{args.low * args.spread:g} s, popsize {args.popsize}, "
          f"{args.trials_per_worker} trials per worker, tracking {args.tracking}, {os.cpu_count()} CPU cores")
    print(f"{'workers':>7} {'islands':>7} {'trials':>6} {'trials/s':>9} {'per-wkr':>8} {'busy':>6} "
          f"{'steady':>6} {'ctl ms/trial':>12} {'wall s':>7}")
    for n, isl, trials, thr, scale, busy, steady, ms, total in rows:
        print(f"{n:>7} {isl:>7} {trials:>6} {thr:>9.2f} {scale:>8.2f} {100 * busy:>5.1f}% {100 * steady:>5.1f}% "
              f"{ms:>12.1f} {total:>7.0f}")
    print("per-wkr: trials per second of a live worker, as a fraction of one worker's;\n"
          "busy: simulated trial seconds / seconds workers were up, whole search incl. draining the last trials;\n"
          "steady: the same until the whole budget was handed out (results received by then only).\n"
          "goals: busy >= 95 %, controller < 50 ms/trial, per-wkr >= 0.9")


if __name__ == "__main__":
    main()
