"""The quickstart as a newcomer runs it, on several zoo seeds: does the searched recipe clearly
beat its best source on held-out data, and how long does it take?

For each seed it runs ``experiments/quickstart.yaml`` exactly as shipped (its search space, budget,
optimizer, islands and workers), with the zoo and the optimizer both seeded by that seed, through
the search-quality benchmark's machinery (``search_quality.experiment`` / ``run_search``: the same
Controller a run uses, tracking off). It reports, on the held-out test split (600 items), the best
recipe's accuracy, every source's, and the gain over the best source; and the time of the zoo
build (from the zoo's manifest: built here unless cached) and of the search with its test split.

Targets (issue: a first run that convinces): gain over the best source >= 10 points for seed 0
and >= 8 points on average over the seeds.

Usage: python benchmarks/quickstart_gain.py [--seeds 0,1,2] [--rebuild]
       (~4 min per seed on 2 cores with --rebuild, ~1 min per seed with the zoos cached)
Writes benchmarks/results/quickstart_gain.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import RESULTS, ROOT, experiment, run_search  # noqa: E402

from evomerge.zoo import build_zoo, zoo_dir  # noqa: E402

SEED0_TARGET, MEAN_TARGET = 0.10, 0.08


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rebuild", action="store_true", help="build every zoo afresh (timings of a first run)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/evomerge-quickstart-gain"))
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    quickstart = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    trials = quickstart["budget"]["max_trials"]
    rows = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        exp = experiment("quickstart.yaml", seed, trials, f"qs-gain-{seed}")
        if args.rebuild:
            shutil.rmtree(zoo_dir(exp.zoo.kind, seed), ignore_errors=True)
        t0 = time.perf_counter()
        zoo = build_zoo(exp.zoo.kind, seed, progress=lambda line: print(line, file=sys.stderr, flush=True))
        build_wall = time.perf_counter() - t0
        manifest = json.loads((zoo.root / "manifest.json").read_text())
        run_dir = args.work_dir / f"seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        res = run_search(exp, run_dir)
        search_wall = time.perf_counter() - t0
        summary = json.loads((run_dir / "summary.json").read_text())
        tests = summary["test_scores"]
        sources = {k: v for k, v in tests.items() if k != "best"}
        best_source = max(sources, key=sources.get)
        rows[seed] = {
            "test_best": tests["best"], "search_best": res["search"], "trials": res["trials"],
            "test_sources": sources, "best_source": best_source, "gain": tests["best"] - sources[best_source],
            "zoo_build_seconds": manifest["build_seconds"], "zoo_wall_seconds": round(build_wall, 1),
            "search_and_test_seconds": round(search_wall, 1),
            "recipe": yaml.safe_load((run_dir / "best_recipe.yaml").read_text()),
        }
        print(f"seed {seed}: best {tests['best']:.3f} vs {best_source} {sources[best_source]:.3f} "
              f"(gain {rows[seed]['gain']:+.3f}); zoo {manifest['build_seconds']:.0f} s, "
              f"search + test {search_wall:.0f} s", file=sys.stderr, flush=True)
    write_report(rows, trials)


def write_report(rows: dict[int, dict], trials: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quickstart_gain.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
    gains = [r["gain"] for r in rows.values()]
    mean = sum(gains) / len(gains)
    lines = [f"`experiments/quickstart.yaml` as shipped ({trials} trials), held-out test split (600 items), "
             f"seeds {', '.join(map(str, rows))}; zoo and optimizer seeded alike.", "",
             "| seed | searched recipe | best source | its test | gain | other sources | zoo build | "
             "search + test |", "|---|---|---|---|---|---|---|---|"]
    for seed, r in rows.items():
        others = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["test_sources"].items()) if k != r["best_source"])
        lines.append(f"| {seed} | {r['test_best']:.3f} | {r['best_source']} | {r['test_sources'][r['best_source']]:.3f} "
                     f"| {r['gain'] * 100:+.1f} | {others} | {r['zoo_build_seconds']:.0f} s | "
                     f"{r['search_and_test_seconds']:.0f} s |")
    lines += ["", f"Mean gain over the best source: {mean * 100:+.1f} points "
                  f"(target >= {MEAN_TARGET * 100:.0f}: {'met' if mean >= MEAN_TARGET else 'NOT met'})."]
    if 0 in rows:
        g0 = rows[0]["gain"]
        lines.append(f"Seed 0 (the quickstart's own): {g0 * 100:+.1f} points "
                     f"(target >= {SEED0_TARGET * 100:.0f}: {'met' if g0 >= SEED0_TARGET else 'NOT met'}).")
    text = "\n".join(lines) + "\n"
    (RESULTS / "quickstart_gain.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
