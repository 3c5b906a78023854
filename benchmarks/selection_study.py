"""How to pick a search's winner: every top-k candidate of the search-quality runs, scored on test.

The search-quality benchmark (``search_quality.py``) runs each search with a validation split and
``selection.top_k: 8``; each run's ledger holds the 8 best trials on the search split with their
search and validation scores (the ``selection`` record). A selection rule only decides which of
those 8 is exported, so the rules can be compared on the same searches: this script scores all 8
candidates of every run on the held-out test split and again on the validation split for their
per-item values (in-process, the run's own worker set-up; cached in the JSON), and reports, per
search method over the seeds, the test score of the pick each rule makes:

- ``search``: the best on the search split (no validation split);
- ``validation``: the best on the validation split (``selection.min_z: 0``, the issue's plain rule);
- ``z>=Z``: the best on validation among the candidates that beat the search split's pick there
  by at least Z paired standard errors, else that pick (``selection.min_z: Z``; the default is 2);
- ``mean``: the best on the mean of the search and validation scores, i.e. on 600 items;
- ``oracle``: the best on test (an upper bound no rule can reach);

and the optimism of the number each rule reports for its pick (the score it picked on minus its
test score), corrected for the splits' own difficulty: each seed's split offset (split minus test,
averaged over the sources and the four default merges, which no search chose) is subtracted;
for the validation rules also with the pick's bootstrap winner's curse subtracted ('corrected':
the number a run reports as ``validation_corrected``). Then, per rule, the issue-22 targets:
the methods whose mean test score it lowers (with the gain's standard error over seeds and the
number of picks it switched), and the per-group spaces' optimism against half the search's; and,
pooled over every method and seed, how many picks it switched and the mean test gain of a switch.

Usage: python benchmarks/selection_study.py [--kind cross-skill|layered] [--runs DIR ...] [--seeds 0,1,2]
       [--only KEY,...] [--tag NAME] [--quality FILE]
Reads benchmarks/results/search_quality{,_layered}.json; writes
benchmarks/results/selection_study{,_layered}.{json,md} and ..._summary.json.
(~3 min on 2 cores for the cross-skill zoo, whose test scores were cached; ~20 for the layered one.)
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



def score_candidates(run_dir: Path, known: list[dict], log) -> list[dict]:
    """The run's top-k candidates (search, validation) with their test scores and per-item
    validation values (``validation_items``: {task: "0110..."}), scored in-process with the
    run's own worker set-up; what ``known`` (an earlier pass) holds is kept."""
    from evomerge.ledger import Ledger
    from evomerge.run_dir import load_run_experiment, pack_values
    from evomerge.selection import task_values
    from evomerge.wiring import resolve_worker_spec
    from evomerge.worker import EvalRequest, TrialWorker

    records = list(Ledger(run_dir / "ledger.jsonl"))
    selections = [r for r in records if r.get("kind") == "selection"]
    if not selections:  # a run still going (or one without a validation split)
        return []
    selection = selections[-1]
    recipes = {r["trial_id"]: r["recipe"] for r in records if r.get("kind") == "trial"}
    tested = {r["recipe_hash"]: r["fitness"] for r in records if r.get("kind") == "test" and r.get("recipe_hash")}
    # runs since validation records keep their per-item values need no second validation pass
    recorded = {r["trial_id"]: r["item_values"] for r in records
                if r.get("kind") == "validation" and r.get("state") == "complete" and r.get("item_values")}
    before = {c["trial_id"]: c for c in known}
    worker = None

    def run(trial_id, split):
        nonlocal worker
        if worker is None:
            spec = resolve_worker_spec(load_run_experiment(run_dir), progress=log)
            worker = TrialWorker(dataclasses.replace(spec, threads=os.cpu_count() or 1))
        res = worker.run(EvalRequest(trial_id=trial_id, recipe=recipes[trial_id], split=split))
        if res.state != "complete":
            raise RuntimeError(res.error)
        return res

    out = []
    for c in selection["candidates"]:
        if c["validation"] is None:
            continue
        row = dict(before.get(c["trial_id"], {}))
        row.update({"trial_id": c["trial_id"], "search": c["search"], "validation": c["validation"]})
        if "test" not in row:
            rec = next(r for r in records if r.get("kind") == "trial" and r["trial_id"] == c["trial_id"])
            row["test"] = tested.get(rec["recipe_hash"])
            if row["test"] is None:
                row["test"] = run(c["trial_id"], "test").fitness
        if "validation_items" not in row and c["trial_id"] in recorded:
            row["validation_items"] = recorded[c["trial_id"]]
        if "validation_items" not in row:
            res = run(c["trial_id"], "validation")
            if abs(res.fitness - c["validation"]) > 1e-9:
                raise RuntimeError(f"trial {c['trial_id']} scores {res.fitness} on validation now, "
                                   f"{c['validation']} in its run")
            row["validation_items"] = {t: pack_values(v) for t, v in task_values(res.items).items()}
        out.append(row)
    return out


def items_of(cands: list[dict]):
    """The candidates' paired validation items (every zoo validation suite is one task)."""
    from evomerge.run_dir import unpack_values
    from evomerge.selection import ItemMatrix

    per = [{t: unpack_values(v) for t, v in c["validation_items"].items()} for c in cands]
    return ItemMatrix.of(per, {t: 1.0 for t in per[0]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="cross-skill", choices=("cross-skill", "layered"))
    ap.add_argument("--runs", type=Path, action="append",
                    help="a search_quality --runs folder (repeatable; the first holding a run is used)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates of the winner's curse")
    ap.add_argument("--only", default="", help="comma-separated search keys (default: every search row)")
    ap.add_argument("--tag", default="", help="report as selection_study[_layered]_TAG.md (e.g. for more seeds)")
    ap.add_argument("--quality", type=Path, default=None,
                    help="the search_quality JSON holding these seeds' fixed rows (split offsets); "
                         "default benchmarks/results/search_quality[_layered].json")
    args = ap.parse_args()
    runs_roots = args.runs or [Path("/tmp/evomerge-search-quality")]
    os.environ.setdefault("TQDM_DISABLE", "1")
    suffix = "" if args.kind == "cross-skill" else "_layered"
    quality = json.loads((args.quality or RESULTS / f"search_quality{suffix}.json").read_text())
    from search_quality import METHODS, split_offsets  # noqa: E402  (the benchmark's labels and offsets)

    raw_path = RESULTS / f"selection_study{suffix}.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}

    def log(text):
        print(text, file=sys.stderr, flush=True)

    keys = [k for k, _, kind in METHODS if kind == "search" and (not args.only or k in args.only.split(","))]
    seeds = args.seeds.split(",")
    for seed in seeds:
        for key in keys:
            run_dir = next((r / f"seed{seed}" / key for r in runs_roots
                            if (r / f"seed{seed}" / key / "ledger.jsonl").exists()), None)
            have = raw.get(f"{seed}/{key}", [])
            if run_dir is None or (have and all("validation_items" in c for c in have)):
                continue
            log(f"seed {seed}: {key}")
            found = score_candidates(run_dir, have, log)
            if found:
                raw[f"{seed}/{key}"] = found
                raw_path.write_text(json.dumps(raw, indent=1))
    import search_quality

    search_quality.KIND = args.kind  # the per-group space's dimensions in the labels
    dims = f"{search_quality.per_group_dims()}-d"
    labels = {k: label.replace("24-d", dims) for k, label, _ in METHODS}
    report(raw, quality, keys, labels, seeds, split_offsets, args, suffix)


GATES = (1.0, 1.64, 2.0)


def report(raw, quality, keys, labels, seeds, split_offsets, args, suffix) -> None:
    from evomerge.selection import gate, winners_curse

    def runs(key):
        """(candidates, split offsets) of each seed's run of ``key``."""
        return [(raw[f"{seed}/{key}"], split_offsets(quality, seed)) for seed in seeds if raw.get(f"{seed}/{key}")]

    rules = {"search": None, "validation": gate(0.0), **{f"z>={z:g}": gate(z) for z in GATES}}
    lines = [f"{args.kind} zoo: every top-8 candidate (by search fitness) of the search-quality runs scored on the "
             f"held-out test split (600 items), seeds {', '.join(seeds)}. Test score of each rule's pick (mean over "
             "seeds), and the optimism of the number it reports (picked-on score minus test, less the split's own "
             "offset against test on the sources and default merges).", "",
             "Rules: `search` the best on the search split; `validation` the best on validation "
             "(`selection.min_z: 0`); `z>=Z` the best on validation among those that beat the search split's pick "
             "there by at least Z paired standard errors, else that pick (`selection.min_z: Z`); `mean` the best on "
             "the mean of search and validation; `oracle` the best on test. 'corrected': the validation score less "
             f"its bootstrap winner's curse ({args.replicates} paired replicates of the validation items, the rule "
             "applied again on each).", "",
             "| method | " + " | ".join(f"test: {r}" for r in [*rules, "mean", "oracle"])
             + " | optimism: search | " + " | ".join(f"{r} | {r}, corrected" for r in rules if r != "search") + " |",
             "|---|" + "---|" * (len(rules) + 2 + 1 + 2 * (len(rules) - 1))]
    summary = {}
    for key in keys:
        test = {r: [] for r in [*rules, "mean", "oracle"]}
        opt = {"search": []}
        for r in rules:
            if r != "search":
                opt |= {r: [], f"{r}, corrected": []}
        switched = {r: [] for r in rules if r != "search"}  # test gain of each run whose pick the rule switched
        for si, (cands, off) in enumerate(runs(key)):
            have_items = all("validation_items" in c for c in cands)
            items = items_of(cands) if have_items else None
            for r, rule in rules.items():
                if rule is None:
                    p = cands[0]
                    opt[r].append(p["search"] - off["search"] - p["test"])
                elif items is None:
                    continue
                else:
                    index = rule(items.values, items.weights, items.strata)
                    p = cands[index]
                    if index != 0:
                        switched[r].append(p["test"] - cands[0]["test"])
                    raw_opt = p["validation"] - off["validation"] - p["test"]
                    opt[r].append(raw_opt)
                    opt[f"{r}, corrected"].append(
                        raw_opt - winners_curse(items, rule, seed=si, replicates=args.replicates))
                test[r].append(p["test"])
            test["mean"].append(max(cands, key=lambda c: (c["search"] + c["validation"], c["search"]))["test"])
            test["oracle"].append(max(cands, key=lambda c: c["test"])["test"])
        if not test["search"]:
            continue
        summary[key] = {"test": {r: float(np.mean(v)) for r, v in test.items() if v},
                        "gain": {r: float(np.mean(np.array(v) - np.array(test["search"]))) for r, v in test.items()
                                 if len(v) == len(test["search"])},
                        "optimism": {r: float(np.mean(v)) for r, v in opt.items() if v},
                        "gain_se": {r: float(np.std(np.array(v) - np.array(test["search"]), ddof=1) / np.sqrt(len(v)))
                                    for r, v in test.items() if len(v) == len(test["search"]) and len(v) > 1},
                        "switched": switched, "runs": len(test["search"])}
        cell = lambda d, r, f: f.format(d[r]) if r in d else "-"  # noqa: E731
        lines.append(f"| {labels[key]} | " + " | ".join(cell(summary[key]["test"], r, "{:.3f}") for r in test)
                     + " | " + " | ".join(cell(summary[key]["optimism"], r, "{:+.3f}") for r in opt) + " |")
    # the targets, per rule: re-ranking never lowers a method's mean test score; the optimism of
    # each high-dimensional (per-group) space's reported number at most half the search's
    lines += ["", "Per rule: methods whose mean test score it lowers (against the search split's pick), and the "
              "per-group spaces' optimism against half the search's.", ""]
    layer = [k for k in summary if k.endswith("_layer")]
    for r in rules:
        if r == "search":
            continue
        lowered = [f"{k} {summary[k]['gain'][r]:+.3f} (s.e. {summary[k]['gain_se'].get(r, float('nan')):.3f}; "
                   f"{len(summary[k]['switched'][r])} of {summary[k]['runs']} picks switched)"
                   for k in summary if summary[k]["gain"].get(r, 0.0) < 0]
        for variant in (r, f"{r}, corrected"):
            halves = [f"{k} {summary[k]['optimism']['search']:+.3f} -> {summary[k]['optimism'][variant]:+.3f}"
                      + ("" if summary[k]["optimism"][variant] <= summary[k]["optimism"]["search"] / 2 else " (not halved)")
                      for k in layer if variant in summary[k]["optimism"]]
            lines.append(f"- `{variant}`: lowers {', '.join(lowered) if lowered else 'none'}; "
                         f"per-group optimism {'; '.join(halves)}")
    # every switched pick, over all methods: how often the switch helped on test, and by how much
    lines += ["", "Per rule, pooled over every method and seed: the runs whose pick it switched away from the search "
              "split's, how many of those switches raised the test score, and the mean test gain of a switch "
              "(with its standard error).", ""]
    runs_all = sum(summary[k]["runs"] for k in summary)
    for r in rules:
        if r == "search":
            continue
        gains = np.array([g for k in summary for g in summary[k]["switched"][r]])
        if len(gains) > 1:
            lines.append(f"- `{r}`: {len(gains)} of {runs_all} runs switched; {int((gains > 0).sum())} raised test, "
                         f"{int((gains < 0).sum())} lowered it; mean gain per switch {gains.mean():+.3f} "
                         f"(s.e. {gains.std(ddof=1) / np.sqrt(len(gains)):.3f})")
        else:
            lines.append(f"- `{r}`: {len(gains)} of {runs_all} runs switched")
    # top_k: re-ranking the k best on search by validation (k = 1 keeps the search's pick and only
    # reports its validation score); test gain over the search's pick, and the optimism of the
    # validation score reported for the pick
    ks = (1, 2, 3, 4, 8)
    lines += ["", "Re-ranking the top k on validation (`selection.top_k`), per k: the test score gained over the "
              "search split's pick (mean over seeds), and the split-corrected optimism of the reported validation "
              "score.", "",
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
    lines += ["", *noise_lines(raw, quality, seeds, split_offsets, summary, layer, keys)]
    text = "\n".join(lines) + "\n"
    stem = f"selection_study{suffix}" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}_summary.json").write_text(json.dumps(summary, indent=1))
    print(text)


def noise_lines(raw, quality, seeds, split_offsets, summary, layer, keys) -> list[str]:
    """How far the optimism targets can be measured here: the search split's pick's validation
    score is unbiased by construction (validation chose nothing), so the spread of its error
    over the runs is the measurement's own noise; with it, the chance that a perfectly unbiased
    number meets "at most half the search's optimism" in each per-group row, and in all."""
    from math import erf, sqrt

    errors = []
    for key in keys:
        for seed in seeds:
            cands = raw.get(f"{seed}/{key}")
            if cands:
                off = split_offsets(quality, seed)
                errors.append(cands[0]["validation"] - off["validation"] - cands[0]["test"])
    errors = np.array(errors)
    se = float(errors.std(ddof=1)) / np.sqrt(len(seeds))
    chances = {k: 0.5 * (1 + erf(summary[k]["optimism"]["search"] / 2 / se / sqrt(2))) for k in layer}
    return ["Measurement noise. The search split's pick's validation score is unbiased by construction (the "
            f"validation split chose nothing): over these {len(errors)} runs its error (validation - offset - test) "
            f"has mean {errors.mean():+.3f} and standard deviation {errors.std(ddof=1):.3f} per run, so a "
            f"{len(seeds)}-seed mean carries a standard error of {se:.3f}. A perfectly unbiased number would meet "
            "'optimism at most half the search's' with probability "
            + ", ".join(f"{k} {chances[k]:.2f}" for k in layer)
            + f", in all {len(layer)} per-group rows {np.prod(list(chances.values())):.2f}."]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
