"""CMA-ES's initial step size sigma0 against the space's dimension, on both zoos.

Each row is a search of ``benchmarks/search_quality.py`` (same zoo seeds, splits, 128 trials,
2 Ray workers, one island, validation re-ranking of the top 8) with one change: the optimizer's
``sigma0`` (in genome units: a fraction of every gene's range). The sigma0 = 1/6 rows (the
paper's value, our default) are read from ``search_quality{,_layered}.json``, measured there with
the same settings. Rows:

- cross-skill zoo: CMA-ES in the TIES space (4-d) and separable CMA-ES in the per-group TIES
  space (24-d);
- layered zoo: the same two (4-d and 32-d), and full CMA-ES in the per-group space (32-d).

Per row: held-out test score of the exported (re-ranked) winner, mean ± std over the seeds and
per seed, the search split's best score, and the best search score reached by trial 32 / 64 /
96 / 128 (mean over seeds: how fast the search climbs). Output:
``benchmarks/results/sigma0_study.{md,json}``; results are cached per (row, seed) in the JSON,
so an interrupted run continues.

Usage: python benchmarks/sigma0_study.py [--seeds 0,1,2] [--only ROW,...]   (~1.5 min per row and seed on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import search_quality as sq  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TRIALS = 128
SIGMAS = (0.1, 0.25, 1 / 3)
# (row key, zoo kind, search_quality key its sigma0 = 1/6 row comes from, space, optimizer changes)
ROWS = [
    (f"{kind}/{key}", kind, key, space, opt)
    for kind in ("layered", "cross-skill")
    for key, space, opt in (
        ("cma_sep_layer", sq.PS_LAYER_SPACE, {"separable": True}),
        ("cma_ps", sq.PS_SPACE, {}),
        ("cma_ps_layer", sq.PS_LAYER_SPACE, {}),
    )
    if not (kind == "cross-skill" and key == "cma_ps_layer")
]
CHECKPOINTS = (32, 64, 96, 128)
LABELS = {"cma_sep_layer": "separable CMA-ES, per-group", "cma_ps": "CMA-ES, TIES 4-d",
          "cma_ps_layer": "CMA-ES, per-group"}


def climb(run_dir: Path, checkpoints: tuple[int, ...] = CHECKPOINTS) -> list[float]:
    """Best search fitness reached by each checkpoint trial count, from the run's ledger."""
    trials = {}
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "trial" and rec.get("fitness") is not None:
            trials[rec["trial_id"]] = float(rec["fitness"])
    fits = [trials[t] for t in sorted(trials)]
    best = np.maximum.accumulate(np.asarray(fits)) if fits else np.asarray([np.nan])
    return [float(best[min(c, len(best)) - 1]) for c in checkpoints]


def label(sigma: float) -> str:
    """A sigma0 as the results name it: the number to 4 decimals."""
    return f"{float(sigma):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default="", help="comma-separated row keys, e.g. layered/cma_sep_layer")
    ap.add_argument("--sigmas", default=",".join(f"{s:.6g}" for s in SIGMAS))
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/evomerge-sigma0"))
    ap.add_argument("--trials", type=int, default=TRIALS, help="budget per search (other than 128: its own rows)")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    raw_path = RESULTS / "sigma0_study.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {"trials": TRIALS, "runs": {}}

    def save():
        tmp = raw_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, indent=2, sort_keys=True))
        os.replace(tmp, raw_path)

    sigmas = [float(s) for s in args.sigmas.split(",")]
    for row, kind, key, space, opt in ROWS:
        if args.only and row not in args.only.split(","):
            continue
        sq.KIND = kind
        for sigma in sigmas:
            for seed in [int(s) for s in args.seeds.split(",")]:
                name = f"{row}@{label(sigma)}/seed{seed}" + (f"/t{args.trials}" if args.trials != TRIALS else "")
                if name in raw["runs"]:
                    continue
                run_dir = args.work_dir / kind / key / f"sigma{label(sigma)}-t{args.trials}" / f"seed{seed}"
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                print(f"{name}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                exp = sq.experiment("quickstart.yaml", seed, args.trials, f"s0-{kind}-{key}-{seed}", search_space=space,
                                    optimizer={"islands": 1, "popsize": None, "x0": 0.5, "sigma0": sigma, **opt})
                res = sq.run_search(exp, run_dir)
                res["climb"] = climb(run_dir, tuple(args.trials * i // 4 for i in (1, 2, 3, 4)))
                res["seconds"] = round(time.perf_counter() - t0, 1)
                raw["runs"][name] = res
                save()
    write_report(raw, [int(s) for s in args.seeds.split(",")])


def quality_table(kind: str) -> dict:
    """search_quality's results for a zoo kind, per seed ({} before it ran)."""
    path = RESULTS / ("search_quality.json" if kind == "cross-skill" else f"search_quality_{kind}.json")
    return json.loads(path.read_text())["seeds"] if path.exists() else {}


def baseline(kind: str, key: str, seed: int) -> dict | None:
    """The sigma0 = 1/6 search of search_quality's table (same settings), with its climb when
    its run directory is still there."""
    res = quality_table(kind).get(str(seed), {}).get(key)
    if res is None:
        return None
    run_dir = Path(res["run_dir"])
    return {**res, "climb": climb(run_dir) if (run_dir / "ledger.jsonl").exists() else None}


def per_seed(results: list, field: str) -> str:
    return ", ".join("-" if r is None else f"{r[field]:.3f}" for r in results)


def write_report(raw: dict, seeds: list[int]) -> None:
    lines = [f"CMA-ES sigma0 study: {TRIALS} trials per search, seeds {', '.join(map(str, seeds))}, "
             "settings as in search_quality.py (validation re-ranking, top 8). sigma0 is in genome units "
             "(a fraction of each gene's range). The sigma0 = 1/6 rows are search_quality's own.",
             "",
             "| zoo | search | dim | sigma0 | test (mean ± std) | test per seed | search's best | "
             "best search score by trial " + " / ".join(map(str, CHECKPOINTS)) + " |",
             "|---|---|---|---|---|---|---|---|"]
    for row, kind, key, space, opt in ROWS:
        dim = {"cma_ps": 4}.get(key, 24 if kind == "cross-skill" else 32)
        name = LABELS[key]
        sigmas = sorted({label(1 / 6), *(n.split("@")[1].split("/")[0] for n in raw["runs"] if n.startswith(row + "@"))},
                        key=float)
        for sigma in sigmas:
            runs = [baseline(kind, key, s) if sigma == label(1 / 6) else raw["runs"].get(f"{row}@{sigma}/seed{s}")
                    for s in seeds]
            if any(r is None for r in runs):
                continue
            tests = np.array([r["test"] for r in runs])
            climbs = [r["climb"] for r in runs if r.get("climb")]
            climb_text = (" / ".join(f"{v:.3f}" for v in np.mean(climbs, axis=0)) if len(climbs) == len(runs)
                          else "(run dirs gone)")
            shown = f"{float(sigma):.3g}"
            lines.append(f"| {kind} | {name} | {dim} | {shown} | {tests.mean():.3f} ± {tests.std(ddof=1):.3f} | "
                         f"{', '.join(f'{t:.3f}' for t in tests)} | {np.mean([r['search'] for r in runs]):.3f} | "
                         f"{climb_text} |")
    repeats = [(n, r) for n, r in sorted(raw["runs"].items()) if f"@{label(1 / 6)}/" in n and "/t" not in n]
    if repeats:
        lines += ["", "Repeats of sigma0 = 1/6 searches, run with sigma0 = 0.166667 (a relative change of 2e-6): the "
                  "trajectory noise of one search, against the search_quality run of the same seed."]
        for n, r in repeats:
            row, seed = n.split("@")[0], int(n.split("seed")[1])
            kind, key = row.split("/")
            base = baseline(kind, key, seed)
            lines.append(f"- {n}: test {r['test']:.3f} (search_quality: {base['test']:.3f}), "
                         f"search {r['search']:.3f} ({base['search']:.3f})" if base else f"- {n}: test {r['test']:.3f}")
    longer = sorted({n.split("/t")[1] for n in raw["runs"] if "/t" in n}, key=int)
    for trials in longer:
        lines += ["", f"Budget: {trials} trials (same settings otherwise), against the layered zoo's Layer Swapping "
                  "preset (search_quality_layered.json).", "",
                  "| zoo | search | sigma0 | test (mean ± std) | test per seed | Layer Swapping preset per seed | "
                  f"best search score by trial {int(trials) // 4} / {int(trials) // 2} / {3 * int(trials) // 4} / {trials} "
                  "| preset's search score per seed |", "|---|---|---|---|---|---|---|---|"]
        for row, kind, key, space, opt in ROWS:
            for sigma in sorted({n.split("@")[1].split("/")[0] for n in raw["runs"]
                                 if n.startswith(row + "@") and n.endswith(f"/t{trials}")}):
                runs = [raw["runs"].get(f"{row}@{sigma}/seed{s}/t{trials}") for s in seeds]
                if any(r is None for r in runs):
                    continue
                tests = np.array([r["test"] for r in runs])
                table = quality_table(kind)
                preset = [table.get(str(s), {}).get("layer_swap") for s in seeds]
                lines.append(f"| {kind} | {LABELS[key]} | {sigma} | {tests.mean():.3f} ± {tests.std(ddof=1):.3f} | "
                             f"{', '.join(f'{t:.3f}' for t in tests)} | "
                             f"{per_seed(preset, 'test')} | "
                             f"{' / '.join(f'{v:.3f}' for v in np.mean([r['climb'] for r in runs], axis=0))} | "
                             f"{per_seed(preset, 'search')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / "sigma0_study.md").write_text(text)


if __name__ == "__main__":
    main()
