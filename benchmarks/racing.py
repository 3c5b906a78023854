"""Racing vs full fitness vs a fixed subsample, at the same trial count: items scored and the
held-out test score of the winner.

For each zoo seed it runs ``experiments/quickstart.yaml`` (its space, optimizer and trial
budget; zoo and optimizer seeded alike) through the search-quality benchmark's machinery (the
real Controller, Ray workers, real lm-eval, tracking off) with each fitness setting below, and
reads from the run dir: the item evaluations of the search's trials (racing: the rung records'
counts; otherwise items per trial times trials scored by a worker), the winner's search and
held-out test score (600 items), and the search's wall time.

Target (issue: fitness cost): racing at >= 2.5x fewer item evaluations than full fitness with a
mean test score within one standard error of full fitness's.

Usage: python benchmarks/racing.py [--seeds 0,1,2] [--trials N] [--only 1,6] [--out racing]
       python benchmarks/racing.py --merge racing,racing_elite --out racing_all   (one table, no runs)
       (~15 min on 2 cores with the zoos cached; --only picks settings by number, full fitness always runs)
Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import RESULTS, experiment, run_search  # noqa: E402

from evomerge.ledger import Ledger  # noqa: E402

TASK = "zoo_arith_l2_search"
SETTINGS = {  # label -> suite overrides
    "full fitness (300 items)": {},
    "racing top 30 %, rungs 50 / 300": {"racing": {"rungs": [50, 300], "rule": "top", "promote": 0.3}},
    "racing top 20 %, rungs 50 / 300": {"racing": {"rungs": [50, 300], "rule": "top", "promote": 0.2}},
    "racing bound z = 2, rungs 50 / 300": {"racing": {"rungs": [50, 300], "rule": "bound", "z": 2.0}},
    "racing top 30 %, rungs 30 / 100 / 300": {"racing": {"rungs": [30, 100, 300], "rule": "top", "promote": 0.3}},
    "racing top 20 %, rungs 30 / 100 / 300": {"racing": {"rungs": [30, 100, 300], "rule": "top", "promote": 0.2}},
    "fixed subsample, 50 items": {"subsample": 50},
    "racing elite 3, rungs 50 / 300": {"racing": {"rungs": [50, 300], "rule": "elite", "elite": 3}},
    "racing elite 3, rungs 30 / 100 / 300": {"racing": {"rungs": [30, 100, 300], "rule": "elite", "elite": 3}},
    "racing elite 1, rungs 50 / 300 (the default)": {"racing": {"rungs": [50, 300], "rule": "elite", "elite": 1}},
}


def item_evaluations(run_dir: Path, items_per_trial: int) -> int:
    recs = list(Ledger(run_dir / "ledger.jsonl"))
    rungs = [r for r in recs if r["kind"] == "rung"]
    if rungs:
        return int(sum(n for r in rungs for n, _, _ in r["tallies"].values()))
    scored = [r for r in recs if r["kind"] == "trial" and r["state"] == "complete" and not r.get("cached_from")]
    return len(scored) * items_per_trial


def mean_se(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=None, help="default: the quickstart's budget")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/evomerge-racing"))
    ap.add_argument("--only", default=None,
                    help="comma-separated numbers of the settings to run (0 = full fitness, always run)")
    ap.add_argument("--out", default="racing", help="results file stem under benchmarks/results/")
    ap.add_argument("--merge", default=None,
                    help="comma-separated result stems to merge into one table (no runs), written as --out")
    args = ap.parse_args()
    if args.merge:
        merged: dict[str, dict] = {}
        trials = None
        for stem in args.merge.split(","):
            data = json.loads((RESULTS / f"{stem}.json").read_text())
            trials = trials or data["trials"]
            if data["trials"] != trials:
                raise SystemExit(f"{stem} has {data['trials']} trials, not {trials}")
            for label, by_seed in data["rows"].items():
                merged.setdefault(label, by_seed)
        order = [label for label in SETTINGS if label in merged] + [label for label in merged if label not in SETTINGS]
        return write_report({label: merged[label] for label in order}, trials, args.out)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import yaml

    from search_quality import ROOT

    quickstart = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    trials = args.trials or quickstart["budget"]["max_trials"]
    chosen = list(SETTINGS) if args.only is None else \
        [label for i, label in enumerate(SETTINGS) if i == 0 or str(i) in args.only.split(",")]
    rows: dict[str, dict[str, dict]] = {label: {} for label in chosen}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label in chosen:
            suite = SETTINGS[label]
            base = quickstart["suite"]
            tasks = [{**t, **({"subsample": suite["subsample"]} if "subsample" in suite else {})} for t in base["tasks"]]
            overrides = {k: v for k, v in suite.items() if k != "subsample"}
            exp = experiment("quickstart.yaml", seed, trials, f"racing-{seed}",
                             suite={**base, "tasks": tasks, **overrides})
            run_dir = args.work_dir / f"{args.out}-seed{seed}-setting{list(SETTINGS).index(label)}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            res = run_search(exp, run_dir)
            wall = time.perf_counter() - t0
            per_trial = suite.get("subsample") or 300
            rows[label][str(seed)] = {"search": res["search"], "test": res["test"], "trials": res["trials"],
                                      "item_evaluations": item_evaluations(run_dir, per_trial),
                                      "seconds": round(wall, 1)}
            print(f"seed {seed}, {label}: test {res['test']:.3f}, items {rows[label][str(seed)]['item_evaluations']}, "
                  f"{wall:.0f} s", file=sys.stderr, flush=True)
    write_report(rows, trials, args.out)


def write_report(rows: dict[str, dict[str, dict]], trials: int, out: str = "racing") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    labels = list(rows)  # full fitness, the racing settings, then the rest
    rows = {label: rows[label] for label in labels[:1] + [x for x in labels[1:] if "racing" in x]
            + [x for x in labels[1:] if "racing" not in x]}
    (RESULTS / f"{out}.json").write_text(json.dumps({"trials": trials, "rows": rows}, indent=2, sort_keys=True))
    full_label = next(iter(rows))
    full_items = mean_se([r["item_evaluations"] for r in rows[full_label].values()])[0]
    full_test, full_se = mean_se([r["test"] for r in rows[full_label].values()])
    seeds = list(rows[full_label])
    lines = [f"`experiments/quickstart.yaml` ({trials} trials, 2 Ray workers), seeds {', '.join(seeds)}; "
             "the winner's held-out test score (600 items), mean ± standard error over seeds.", "",
             "| fitness | item evaluations per search | fewer than full | winner's test | per seed | "
             "winner's search score | search seconds |", "|---|---|---|---|---|---|---|"]
    for label, by_seed in rows.items():
        items = mean_se([r["item_evaluations"] for r in by_seed.values()])[0]
        test, se = mean_se([r["test"] for r in by_seed.values()])
        search = mean_se([r["search"] for r in by_seed.values()])[0]
        secs = mean_se([r["seconds"] for r in by_seed.values()])[0]
        per_seed = " / ".join(f"{by_seed[s]['test']:.3f}" for s in seeds)
        lines.append(f"| {label} | {items:,.0f} | {full_items / items:.2f}x | {test:.3f} ± {se:.3f} | {per_seed} | "
                     f"{search:.3f} | {secs:.0f} |")
    lines += ["", f"Target: >= 2.5x fewer item evaluations with a mean test score within one standard error "
                  f"of full fitness ({full_test:.3f} ± {full_se:.3f}):"]
    for label, by_seed in list(rows.items())[1:]:
        if "racing" not in label:
            continue
        items = mean_se([r["item_evaluations"] for r in by_seed.values()])[0]
        test = mean_se([r["test"] for r in by_seed.values()])[0]
        ok = full_items / items >= 2.5 and test >= full_test - full_se
        lines.append(f"- {label}: {full_items / items:.2f}x, test {test:.3f}: {'met' if ok else 'not met'}")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
