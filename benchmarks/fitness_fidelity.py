"""Cheap fitness: how much a stratified subsample saves and what it costs in fidelity.

On the cross-skill zoo (seed 0), a fixed set of candidates — the three sources and random
DARE-TIES recipes from search_spaces/ps_ties_dare.yaml (uniform over its bounds, seeded) — is
scored by real lm-eval on the full search split (300 items) and on cheaper suites: stratified
subsamples (``TaskSpec.subsample``) of 50 items (three subsample seeds) and 30 items, and the
first 50 items (``limit``)
for comparison; and racing (``suite.racing``, rungs 50 / 300, rules elite 3, top 30 % and bound z = 2). For each cheap suite it prints the measured eval seconds per candidate
(and the saving against the full split), the rank correlation with the full fitness
(Spearman and Kendall), the overlap of the top 5, and the regret: how much worse, on the
full split, the cheap suite's best candidate is than the true best.

Writes ``benchmarks/results/fitness_fidelity.{md,json}``.

Usage: python benchmarks/fitness_fidelity.py [--candidates 40] [--seed 0]   (~3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from evomerge.config import parse_experiment  # noqa: E402
from evomerge.wiring import build_codec, resolve_worker_spec  # noqa: E402
from evomerge.worker import EvalRequest, TrialWorker  # noqa: E402

TASK = "zoo_arith_l2_search"
SUITES = [  # (label, task spec overrides, suite overrides)
    ("full search split (300 items)", {}, {}),
    *((f"stratified subsample, 50 items (6x), subsample_seed {k}", {"subsample": 50}, {"subsample_seed": k})
      for k in range(3)),
    ("stratified subsample, 30 items (10x)", {"subsample": 30}, {}),
    ("first 50 items (limit, 6x)", {"limit": 50}, {}),
]


RACES = [  # (label, suite.racing)
    ("racing elite 3, rungs 50 / 300", {"rungs": [50, 300], "rule": "elite", "elite": 3}),
    ("racing top 30 %, rungs 50 / 300", {"rungs": [50, 300], "rule": "top", "promote": 0.3}),
    ("racing bound z = 2, rungs 50 / 300", {"rungs": [50, 300], "rule": "bound", "z": 2.0}),
]
ITEMS = {label: (o.get("subsample") or o.get("limit") or 300) for label, o, _ in SUITES}


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        idx = np.where(x == v)[0]
        r[idx] = r[idx].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b."""
    n = len(a)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    denom = np.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return float((concordant - discordant) / denom) if denom else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=40, help="random recipes (plus the 3 sources)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    data = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    data["search_space"] = "../search_spaces/ps_ties_dare.yaml"  # the candidates the published figures used
    exp = parse_experiment(data, ROOT / "experiments")
    exp = exp.model_copy(update={"suite": exp.suite.model_copy(update={"test_tasks": ()})})
    spec = resolve_worker_spec(exp, progress=lambda line: print(line, file=sys.stderr))
    codec = build_codec(exp, spec)
    rng = np.random.default_rng(args.seed)
    requests = [EvalRequest(trial_id=i, source=name) for i, name in enumerate(m.name for m in exp.models)]
    requests += [EvalRequest(trial_id=100 + i, recipe=codec.decode(rng.random(codec.dim)).to_dict())
                 for i in range(args.candidates)]

    scores: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    last_rung: dict[str, list[bool]] = {}
    items: dict[str, float] = {}
    for label, overrides, suite_overrides in SUITES:
        task = exp.suite.tasks[0].model_copy(update=overrides)
        suite = exp.suite.model_copy(update={"tasks": (task,), **suite_overrides})
        worker = TrialWorker(type(spec)(**{**spec.__dict__, "suite": suite, "threads": 1}))
        worker.run(requests[0])  # warm-up (first-call overheads)
        values, evals = [], []
        for req in requests:
            res = worker.run(req)
            assert res.state == "complete", res.error
            values.append(res.fitness)
            evals.append(res.eval_seconds)
        scores[label] = values
        seconds[label] = float(np.mean(evals))
        print(f"{label}: {seconds[label]:.3f} s per candidate", file=sys.stderr)

    # racing: each candidate in turn on rung 0's items; promoted ones go on to the rest (new items only)
    from evomerge.config import RacingConfig
    from evomerge.racing import Race, tallies_of

    racing_labels = []
    for label, racing in RACES:
        suite = exp.suite.model_copy(update={"racing": RacingConfig(**racing)})
        worker = TrialWorker(type(spec)(**{**spec.__dict__, "suite": suite, "threads": 1}))
        worker.run(dataclasses.replace(requests[0], rung=0))  # warm-up
        race = Race(suite.racing, suite.tasks)
        values, evals, finals = [], [], []
        for req in requests:
            spent = 0.0
            for rung in range(race.last + 1):
                res = worker.run(dataclasses.replace(req, rung=rung))
                assert res.state == "complete", res.error
                spent += res.eval_seconds
                fitness, _, se = race.add(req.trial_id, rung, tallies_of(res.items))
                if not race.promote(rung, fitness, se):
                    break
            race.finish(req.trial_id, rung, fitness)
            values.append(fitness)
            evals.append(spent)
            finals.append(rung == race.last)
        scores[label] = values
        seconds[label] = float(np.mean(evals))
        last_rung[label] = finals
        items[label] = race.items_scored / len(requests)
        racing_labels.append(label)
        print(f"{label}: {seconds[label]:.3f} s per candidate, {items[label]:.0f} items", file=sys.stderr)

    full_label = SUITES[0][0]
    full = np.array(scores[full_label])
    best_full = float(full.max())
    top = set(np.argsort(-full, kind="mergesort")[:5])
    rows = []
    for label in [label for label, _, _ in SUITES] + racing_labels:
        cheap = np.array(scores[label])
        # racing: the winner is the best of the candidates scored on the last rung
        eligible = np.array(last_rung.get(label, [True] * len(cheap)))
        pick = int(np.argmax(np.where(eligible, cheap, -np.inf)))
        rows.append({
            "suite": label, "eval_seconds": seconds[label], "saving": seconds[full_label] / seconds[label],
            "spearman": spearman(full, cheap), "kendall": kendall(full, cheap),
            "top5_overlap": len(top & set(np.argsort(-cheap, kind="mergesort")[:5])),
            "regret": best_full - float(full[pick]),
            "items": items.get(label, ITEMS.get(label, 300)),
        })
    lines = [
        f"Candidates: {len(requests)} (3 sources + {args.candidates} random DARE-TIES recipes (search_spaces/ps_ties_dare.yaml), "
        f"seed {args.seed}); task {TASK}; real lm-eval, 1 thread, cross-skill zoo seed 0. "
        f"Full-split fitness spans {full.min():.3f}..{full.max():.3f}.",
        "",
        "| suite | items / candidate | eval s / candidate | cost saved | Spearman vs full | Kendall vs full | "
        "top-5 overlap | regret (full fitness) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['items']:.0f} | {r['eval_seconds']:.3f} | {r['saving']:.1f}x | "
                     f"{r['spearman']:.3f} | {r['kendall']:.3f} | {r['top5_overlap']}/5 | {r['regret']:.3f} |")
    lines += ["", "Racing rows: candidates in turn, each scored on rung 0 (50 stratified items), promoted ones "
                  "on the other 250; their scores are the mean over the items seen, and the winner is the "
                  "best of those scored on all 300 (Spearman/Kendall compare the scores as the optimizer "
                  "would see them)."]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fitness_fidelity.md").write_text(table + "\n")
    (RESULTS / "fitness_fidelity.json").write_text(json.dumps(
        {"rows": rows, "scores": scores, "requests": [r.trial_id for r in requests],
         "at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))


if __name__ == "__main__":
    main()
