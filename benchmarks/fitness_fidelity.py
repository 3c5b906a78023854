"""Cheap fitness: how much a stratified subsample saves and what it costs in fidelity.

On the cross-skill zoo (seed 0), a fixed set of candidates — the three sources and random
DARE-TIES recipes from search_spaces/ps_ties_dare.yaml (uniform over its bounds, seeded) — is
scored by real lm-eval on the full search split (300 items) and on cheaper suites: stratified
subsamples (``TaskSpec.subsample``) of 50 items (three subsample seeds) and 30 items, and the
first 50 items (``limit``)
for comparison. For each cheap suite it prints the measured eval seconds per candidate
(and the saving against the full split), the rank correlation with the full fitness
(Spearman and Kendall), the overlap of the top 5, and the regret: how much worse, on the
full split, the cheap suite's best candidate is than the true best.

Writes ``benchmarks/results/fitness_fidelity.{md,json}``.

Usage: python benchmarks/fitness_fidelity.py [--candidates 40] [--seed 0]   (~3 min on 2 cores)
"""

from __future__ import annotations

import argparse
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

    full_label = SUITES[0][0]
    full = np.array(scores[full_label])
    best_full = float(full.max())
    top = set(np.argsort(-full, kind="mergesort")[:5])
    rows = []
    for label, _, _ in SUITES:
        cheap = np.array(scores[label])
        pick = int(np.argmax(cheap))
        rows.append({
            "suite": label, "eval_seconds": seconds[label], "saving": seconds[full_label] / seconds[label],
            "spearman": spearman(full, cheap), "kendall": kendall(full, cheap),
            "top5_overlap": len(top & set(np.argsort(-cheap, kind="mergesort")[:5])),
            "regret": best_full - float(full[pick]),
        })
    lines = [
        f"Candidates: {len(requests)} (3 sources + {args.candidates} random DARE-TIES recipes (search_spaces/ps_ties_dare.yaml), "
        f"seed {args.seed}); task {TASK}; real lm-eval, 1 thread, cross-skill zoo seed 0. "
        f"Full-split fitness spans {full.min():.3f}..{full.max():.3f}.",
        "",
        "| suite | eval s / candidate | cost saved | Spearman vs full | Kendall vs full | top-5 overlap | regret (full fitness) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['eval_seconds']:.3f} | {r['saving']:.1f}x | {r['spearman']:.3f} | "
                     f"{r['kendall']:.3f} | {r['top5_overlap']}/5 | {r['regret']:.3f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fitness_fidelity.md").write_text(table + "\n")
    (RESULTS / "fitness_fidelity.json").write_text(json.dumps(
        {"rows": rows, "scores": scores, "requests": [r.trial_id for r in requests],
         "at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))


if __name__ == "__main__":
    main()
