"""How to pick a search's winner: every top-k candidate of the search-quality runs, scored on test.

The search-quality benchmark (``search_quality.py``) runs each search with a validation split and
``selection.top_k: 8``; each run's ledger holds the 8 best trials on the search split with their
search and validation scores (the ``selection`` record). A selection rule only decides which of
those 8 is exported, so the rules can be compared on the same searches: this script scores all 8
candidates of every run on the held-out test split (in-process, the run's own worker set-up) and
reports, per search method over the seeds, the test score of the pick each rule makes:

- ``search``: the best on the search split (no validation split);
- ``validation``: the best on the validation split (``selection.by: validation``);
- ``mean``: the best on the mean of the search and validation scores, i.e. on 600 items
  (``selection.by: mean``);
- ``oracle``: the best on test (an upper bound no rule can reach).

and, for k = 1, 2, 3, 4, 8, what re-ranking only the k best on search by validation gains on
test over the search split's pick (k = 1 keeps that pick and reports its validation score).

and the optimism of the number each rule reports for its pick (the score it picked on minus its
test score), corrected for the splits' own difficulty: each seed's split offset (split minus test,
averaged over the sources and the four default merges, which no search chose) is subtracted.

Usage: python benchmarks/selection_study.py [--runs /tmp/evomerge-search-quality] [--seeds 0,1,2]
Reads benchmarks/results/search_quality.json; writes benchmarks/results/selection_study.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

RULES = ("search", "validation", "mean", "oracle")


def candidates_with_test(run_dir: Path, log) -> list[dict]:
    """The run's top-k candidates (search, validation) with their test scores, scored in-process."""
    from evomerge.ledger import Ledger
    from evomerge.run_dir import load_run_experiment
    from evomerge.wiring import resolve_worker_spec
    from evomerge.worker import EvalRequest, TrialWorker

    records = list(Ledger(run_dir / "ledger.jsonl"))
    selections = [r for r in records if r.get("kind") == "selection"]
    if not selections:  # a run still going (or one without a validation split)
        return []
    selection = selections[-1]
    recipes = {r["trial_id"]: r["recipe"] for r in records if r.get("kind") == "trial"}
    tested = {r["recipe_hash"]: r["fitness"] for r in records if r.get("kind") == "test" and r.get("recipe_hash")}
    exp = load_run_experiment(run_dir)
    spec = resolve_worker_spec(exp, progress=log)
    worker = None
    out = []
    for c in selection["candidates"]:
        if c["validation"] is None:
            continue
        rec = next(r for r in records if r.get("kind") == "trial" and r["trial_id"] == c["trial_id"])
        test = tested.get(rec["recipe_hash"])
        if test is None:
            if worker is None:
                worker = TrialWorker(dataclasses.replace(spec, threads=os.cpu_count() or 1))
            res = worker.run(EvalRequest(trial_id=c["trial_id"], recipe=recipes[c["trial_id"]], split="test"))
            if res.state != "complete":
                raise RuntimeError(res.error)
            test = res.fitness
        out.append({"trial_id": c["trial_id"], "search": c["search"], "validation": c["validation"], "test": test})
    return out


def pick(cands: list[dict], rule: str) -> dict:
    key = {"search": lambda c: c["search"], "validation": lambda c: (c["validation"], c["search"]),
           "mean": lambda c: (c["search"] + c["validation"], c["search"]), "oracle": lambda c: c["test"]}[rule]
    return max(cands, key=key)  # ties: the first (the better on search)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("/tmp/evomerge-search-quality"))
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    quality = json.loads((RESULTS / "search_quality.json").read_text())
    from search_quality import METHODS, split_offsets  # noqa: E402  (the benchmark's labels and offsets)

    raw_path = RESULTS / "selection_study.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}

    def log(text):
        print(text, file=sys.stderr, flush=True)

    keys = [k for k, _, kind in METHODS if kind == "search"]
    for seed in args.seeds.split(","):
        for key in keys:
            run_dir = args.runs / f"seed{seed}" / key
            if f"{seed}/{key}" in raw or not (run_dir / "ledger.jsonl").exists():
                continue
            log(f"seed {seed}: {key}")
            found = candidates_with_test(run_dir, log)
            if found:
                raw[f"{seed}/{key}"] = found
                raw_path.write_text(json.dumps(raw, indent=1))
    labels = {k: label for k, label, _ in METHODS}
    seeds = args.seeds.split(",")
    lines = ["Every top-8 candidate (by search fitness) of the search-quality runs scored on the held-out test "
             f"split (600 items), seeds {', '.join(seeds)}. Test score of each rule's pick (mean over seeds), and "
             "the optimism of the number it reports (picked-on score minus test, less the split's own offset "
             "against test on the sources and default merges).", "",
             "| method | search | validation | mean of both | oracle | optimism: search | validation | mean |",
             "|---|---|---|---|---|---|---|---|"]
    def runs(key):
        """(candidates, split offsets) of each seed's run of ``key``."""
        return [(raw[f"{seed}/{key}"], split_offsets(quality, seed)) for seed in seeds if raw.get(f"{seed}/{key}")]

    totals = {rule: [] for rule in RULES}
    for key in keys:
        per = {rule: [] for rule in RULES}
        opt = {rule: [] for rule in ("search", "validation", "mean")}
        for cands, off in runs(key):
            for rule in RULES:
                p = pick(cands, rule)
                per[rule].append(p["test"])
                if rule == "search":
                    opt[rule].append(p["search"] - off["search"] - p["test"])
                elif rule == "validation":
                    opt[rule].append(p["validation"] - off["validation"] - p["test"])
                elif rule == "mean":
                    opt[rule].append((p["search"] - off["search"] + p["validation"] - off["validation"]) / 2
                                     - p["test"])
        if not per["search"]:
            continue
        for rule in RULES:
            totals[rule].append(np.mean(per[rule]))
        lines.append(f"| {labels[key]} | " + " | ".join(f"{np.mean(per[r]):.3f}" for r in RULES) + " | "
                     + " | ".join(f"{np.mean(opt[r]):+.3f}" for r in ("search", "validation", "mean")) + " |")
    lines.append("| mean over the methods | " + " | ".join(f"{np.mean(totals[r]):.3f}" for r in RULES)
                 + " | | | |")
    # top_k: re-ranking the k best on search by validation (k = 1 keeps the search's pick and only
    # reports its validation score); test gain over the search's pick, and the optimism of the
    # validation score reported for the pick
    ks = (1, 2, 3, 4, 8)
    lines += ["", "Re-ranking the top k on validation, per k: the test score gained over the search split's pick "
              "(mean over seeds), and the split-corrected optimism of the reported validation score.", "",
              "| method | " + " | ".join(f"gain k={k}" for k in ks) + " | " + " | ".join(f"optimism k={k}" for k in ks)
              + " |", "|---|" + "---|" * (2 * len(ks))]
    for key in keys:
        gains, optimism = {k: [] for k in ks}, {k: [] for k in ks}
        for cands, off in runs(key):
            for k in ks:
                p = max(cands[:k], key=lambda c: (c["validation"], c["search"]))
                gains[k].append(p["test"] - cands[0]["test"])
                optimism[k].append(p["validation"] - off["validation"] - p["test"])
        if gains[1]:
            lines.append(f"| {labels[key]} | " + " | ".join(f"{np.mean(gains[k]):+.3f}" for k in ks) + " | "
                         + " | ".join(f"{np.mean(optimism[k]):+.3f}" for k in ks) + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "selection_study.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
