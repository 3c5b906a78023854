"""Search quality on the cross-skill zoo: what a search buys over sources, defaults and a grid.

For each seed (the zoo is built with that seed and every search uses it too) it scores,
on the held-out test split (600 items):

- the source models; default-parameter merges (linear 0.5/0.5, task arithmetic 1/1, TIES
  and DARE-TIES at density 0.5, weights 1/1, normalize); a small TIES grid (18 points,
  chosen on the search split); the published layer-wise presets (``evomerge/presets.py``):
  Model Stock, LiNeS (alpha/beta grid) and Layer Swapping (k grid), grids chosen on search;
- searches at equal trial budgets (``--trials``, default 128; 2 Ray workers, one island):
  random search and CMA-ES over the TIES space (search_spaces/ps_ties.yaml, 4 dimensions) and
  over task arithmetic with a vocabulary and a body weight per expert (ps_ta_vocab_body.yaml, 4)
  and random search, CMA-ES, separable CMA-ES and M2N2 over the per-group TIES space
  (search_spaces/ps_ties_per_layer.yaml, 24), separable CMA-ES there started from the Layer
  Swapping presets (``optimizer.start_from``: its first generation evaluates every k of the preset
  row, within the same budget), random search and CMA-ES over the knots
  (ps_ties_knots.yaml, 12) and lines (ps_ties_lines.yaml, 8) spaces, DFS (experiments/zoo_dfs.yaml) and PS+DFS (experiments/zoo_ps_dfs.yaml with
  this seed's CMA-ES PS result as the donor, starting at its path, so PS+DFS spends the PS
  budget plus its own).

Every search runs with the zoo's validation split (``suite.validation_tasks``, 300 items on
operand pairs no search or test item uses) and ``selection.top_k: 8``: at its end the 8 best
trials on the search split are scored on validation and the best there is the winner. Each
search row reports the winner's search, validation and test scores, and the search split's
own best (what the run would export without re-ranking) with its test score; the optimism of
a pick is the score it was picked on minus its held-out test score (search − test without
re-ranking, validation − test with it). Fixed recipes are scored on all three splits.

Output: one table (mean ± std over seeds, trials used, per-seed values) printed and written to
``benchmarks/results/search_quality.md`` with a plot (``.png``) and the raw ``.json``.
Results are cached per (seed, method) in the JSON, so an interrupted run continues.

``--kind layered`` measures the same rows on the layered zoo (6 blocks: the per-group space is
32-d, Layer Swapping's k runs 0..3, DFS paths up to 12 layers) plus a uniform task-arithmetic grid
and DFS with the scaling matrix off (ablation), and checks issue 21's targets there; its results go
to ``search_quality_layered.{md,json,png}``.

Usage: python benchmarks/search_quality.py [--kind cross-skill|layered] [--seeds 0,1,2] [--trials 128] [--only KEY,...]   (~13 min per seed on 2 cores; layered ~22)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from evomerge.config import parse_experiment  # noqa: E402
from evomerge.search import Controller  # noqa: E402
from evomerge.wiring import resolve_worker_spec  # noqa: E402
from evomerge.recipe import ModelParams, Recipe  # noqa: E402

METHODS = [  # (key, label, kind)
    ("base", "source: base", "fixed"),
    ("expert_a", "source: expert_a", "fixed"),
    ("expert_b", "source: expert_b", "fixed"),
    ("linear", "linear 0.5/0.5 (default)", "fixed"),
    ("task_arithmetic", "task arithmetic 1/1 (default)", "fixed"),
    ("ties", "TIES d=.5 w=1/1 (default)", "fixed"),
    ("dare_ties", "DARE-TIES d=.5 w=1/1 (default)", "fixed"),
    ("ties_grid", "TIES grid, 18 points (best on search)", "grid"),
    ("ta_grid", "task arithmetic grid, 25 points (best on search)", "grid"),
    ("model_stock", "Model Stock (preset)", "fixed"),
    ("lines_preset", "LiNeS preset, 3 x 3 alpha/beta grid (best on search)", "grid"),
    ("layer_swap", "Layer Swapping preset, k = 0..L/2 (best on search)", "grid"),
    ("random_ps", "random search, TIES space (4-d)", "search"),
    ("cma_ps", "CMA-ES PS, TIES space (4-d)", "search"),
    ("random_ta_vb", "random search, task arithmetic vocab/body (4-d)", "search"),
    ("cma_ta_vb", "CMA-ES PS, task arithmetic vocab/body (4-d, the quickstart's space)", "search"),
    ("random_ps_layer", "random search, per-group TIES space (24-d)", "search"),
    ("cma_ps_layer", "CMA-ES PS, per-group TIES space (24-d)", "search"),
    ("m2n2_layer", "M2N2, per-group TIES space (24-d)", "search"),
    ("cma_sep_layer", "separable CMA-ES, per-group TIES space (24-d)", "search"),
    ("cma_sep_start", "separable CMA-ES from the Layer Swapping presets (k = 0..L/2), per-group TIES space (24-d)",
     "search"),
    ("random_knots", "random search, TIES knots space (3 knots, 12-d)", "search"),
    ("cma_knots", "CMA-ES PS, TIES knots space (3 knots, 12-d)", "search"),
    ("random_lines", "random search, TIES lines space (8-d)", "search"),
    ("cma_lines", "CMA-ES PS, TIES lines space (8-d)", "search"),
    ("dfs", "CMA-ES DFS", "search"),
    ("dfs_noscale", "CMA-ES DFS, scaling W off (ablation)", "search"),
    ("ps_dfs", "CMA-ES PS+DFS (starts at the CMA-ES PS result)", "search"),
]
# The PS searches' spaces: TIES (deterministic; DARE's drops add noise to the fitness) with one
# density and weight per expert (4 dimensions), and per tensor group (embeddings, each block,
# head: 24 dimensions). One island: the whole budget in one CMA-ES. PS+DFS's donor is the 4-d
# CMA-ES result.
PS_SPACE = str(ROOT / "search_spaces" / "ps_ties.yaml")
PS_LAYER_SPACE = str(ROOT / "search_spaces" / "ps_ties_per_layer.yaml")
TA_VB_SPACE = str(ROOT / "search_spaces" / "ps_ta_vocab_body.yaml")
KNOTS_SPACE = str(ROOT / "search_spaces" / "ps_ties_knots.yaml")
LINES_SPACE = str(ROOT / "search_spaces" / "ps_ties_lines.yaml")
TOP_K = 8
KIND = "cross-skill"  # --kind sets it: the zoo every row is measured on
SPLITS = ("search", "validation", "test")
FORMAT = 2  # 2: validation split, re-ranking, both picks' scores


def recipe(method: str, wa: float, wb: float, density: float | None = None, normalize: bool = True) -> Recipe:
    def params(w):
        return {"weight": w} if density is None else {"weight": w, "density": density}

    glob = {} if method in ("linear",) else {"normalize": normalize}
    return Recipe(method=method, base_model="base", seed=0, parameters=glob,
                  models=(ModelParams(model="expert_a", parameters=params(wa)),
                          ModelParams(model="expert_b", parameters=params(wb))))


def experiment(template: str, seed: int, trials: int, name: str, **changes):
    data = yaml.safe_load((ROOT / "experiments" / template).read_text())
    data["name"] = name
    data["zoo"] = {"kind": KIND, "seed": seed}
    data["optimizer"] = {**data["optimizer"], "seed": seed}
    data["budget"] = {"max_trials": trials}
    data["tracking"] = {"backend": "none"}
    data["suite"] = {**data["suite"], "validation_tasks": [{"name": "zoo_arith_l2_validation", "metric": "acc"}]}
    data["selection"] = {"top_k": TOP_K}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_experiment(data, ROOT / "experiments")


def scorer(seed: int, log):
    """A function scoring a source (``{"source": name}``) or a recipe (``{"recipe": dict}``)
    in-process on every split of the seed's zoo."""
    from evomerge.worker import EvalRequest, TrialWorker

    exp = experiment("quickstart.yaml", seed, 1, f"sq-fixed-{seed}")
    spec = resolve_worker_spec(exp, progress=log)
    worker = TrialWorker(dataclasses.replace(spec, threads=os.cpu_count() or 1))

    def score(req_kwargs) -> dict[str, float]:
        out = {}
        for split in SPLITS:
            res = worker.run(EvalRequest(trial_id=0, split=split, **req_kwargs))
            if res.state != "complete":
                raise RuntimeError(res.error)
            out[split] = res.fitness
        return out

    return score


def preset_scores(seed: int, log) -> dict[str, dict]:
    """The published layer-wise presets: Model Stock as is, LiNeS on a 3 x 3 (alpha, beta) grid
    and Layer Swapping (outer: expert_b, the language expert; inner: expert_a) for k = 0, 1, 2,
    each grid's point chosen on the search split."""
    from evomerge.presets import layer_swapping, lines, model_stock

    from evomerge.zoo.kinds import zoo_spec

    score = scorer(seed, log)
    experts, layers = ["expert_a", "expert_b"], zoo_spec(KIND).shape.layers
    results = {"model_stock": {**score({"recipe": model_stock(experts, "base", layers).to_dict()}), "trials": 0}}
    for key, grid in (
        ("lines_preset", {(a, b): lines(experts, "base", layers, alpha=a, beta=b)
                          for a in (0.0, 0.25, 0.5) for b in (0.5, 1.0, 1.5)}),
        ("layer_swap", {k: layer_swapping(experts, "base", layers, outer="expert_b", inner="expert_a", k=k)
                        for k in range(layers // 2 + 1)}),
    ):
        scored = [(score({"recipe": r.to_dict()}), choice) for choice, r in grid.items()]
        best = max(scored, key=lambda g: g[0]["search"])
        results[key] = {**best[0], "trials": len(scored), "choice": best[1]}
    return results


def fixed_scores(seed: int, log) -> dict[str, dict]:
    """Sources, default merges and the TIES grid, scored in-process on every split."""
    score = scorer(seed, log)
    results = {}
    for name in ("base", "expert_a", "expert_b"):
        results[name] = {**score({"source": name}), "trials": 0}
    defaults = {
        "linear": recipe("linear", 0.5, 0.5),
        "task_arithmetic": recipe("task_arithmetic", 1.0, 1.0, normalize=False),
        "ties": recipe("ties", 1.0, 1.0, density=0.5),
        "dare_ties": recipe("dare_ties", 1.0, 1.0, density=0.5),
    }
    for key, r in defaults.items():
        results[key] = {**score({"recipe": r.to_dict()}), "trials": 0}
    grid = []
    for d in (0.3, 0.6, 0.9):
        for wa in (0.5, 1.0):
            for wb in (0.25, 0.5, 1.0):
                r = recipe("ties", wa, wb, density=d, normalize=False)
                grid.append((score({"recipe": r.to_dict()}), (d, wa, wb)))
    best = max(grid, key=lambda g: g[0]["search"])
    results["ties_grid"] = {**best[0], "trials": len(grid), "choice": list(best[1])}
    return results


def ta_grid_scores(seed: int, log) -> dict[str, dict]:
    """Uniform task arithmetic (one weight per expert for every tensor) on a 5 x 5 grid, chosen on
    the search split: the plain uniform baseline the layer-wise rows are compared with."""
    score = scorer(seed, log)
    grid = [(score({"recipe": recipe("task_arithmetic", wa, wb, normalize=False).to_dict()}), (wa, wb))
            for wa in (0.5, 0.75, 1.0, 1.25, 1.5) for wb in (0.0, 0.25, 0.5, 0.75, 1.0)]
    best = max(grid, key=lambda g: g[0]["search"])
    return {"ta_grid": {**best[0], "trials": len(grid), "choice": list(best[1])}}


def dfs_space(template: str, **changes) -> dict:
    """A DFS search space for this zoo's depth: paths up to twice the donors' depth."""
    from evomerge.zoo.kinds import zoo_spec

    data = yaml.safe_load((ROOT / "search_spaces" / template).read_text())
    return {**data, "max_path_length": 2 * zoo_spec(KIND).shape.layers, **changes}


def per_group_dims() -> int:
    """Dimensions of the per-group TIES space on this zoo: 2 experts x 2 parameters x (blocks + 2)."""
    from evomerge.zoo.kinds import zoo_spec

    return 4 * (zoo_spec(KIND).shape.layers + 2)


def swap_starts() -> list[dict]:
    """Every Layer Swapping preset the preset row chooses among (k = 0..L/2), as start recipes."""
    from evomerge.zoo.kinds import zoo_spec

    return [{"preset": f"layer_swapping:outer=expert_b,inner=expert_a,k={k}"}
            for k in range(zoo_spec(KIND).shape.layers // 2 + 1)]


def results_stem() -> str:
    """``search_quality`` for the cross-skill zoo, ``search_quality_<kind>`` for another."""
    return "search_quality" if KIND == "cross-skill" else f"search_quality_{KIND}"


def run_search(exp, run_dir: Path) -> dict:
    """The winner's search / validation / test scores, and the search split's best with its own
    (what the run exports without re-ranking)."""
    summary = Controller(exp, run_dir).run()
    tests = summary.test_scores
    same = summary.search_best_trial in (None, summary.best_trial)
    return {"search": summary.best_fitness, "validation": summary.validation_fitness, "test": tests.get("best"),
            "validation_corrected": summary.validation_corrected, "trials": summary.trials, "run_dir": str(run_dir), "best_trial": summary.best_trial,
            "search_best": {"trial": summary.best_trial if same else summary.search_best_trial,
                            "search": summary.best_fitness if same else summary.search_best_fitness,
                            "validation": summary.validation.get(str(summary.best_trial if same
                                                                     else summary.search_best_trial)),
                            "test": tests.get("best") if same else tests.get("search_best")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=128)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/evomerge-search-quality"))
    ap.add_argument("--only", default="", help="comma-separated search keys to run (default: all)")
    ap.add_argument("--kind", default="cross-skill", help="zoo kind (cross-skill or layered)")
    args = ap.parse_args()
    global KIND
    KIND = args.kind
    os.environ.setdefault("TQDM_DISABLE", "1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw_path = RESULTS / f"{results_stem()}.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    if raw.get("trials") not in (None, args.trials) or raw.get("format") != FORMAT:
        raw = {}
    raw["trials"] = args.trials
    raw["format"] = FORMAT
    from evomerge.zoo.kinds import FORMAT_VERSION

    raw["zoo_format"] = FORMAT_VERSION
    raw.setdefault("seeds", {})

    def log(text):
        print(text, file=sys.stderr, flush=True)

    def save():
        tmp = raw_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, indent=2, sort_keys=True))
        os.replace(tmp, raw_path)

    for seed in [int(s) for s in args.seeds.split(",")]:
        res = raw["seeds"].setdefault(str(seed), {})
        t0 = time.perf_counter()
        if "ties_grid" not in res:
            log(f"seed {seed}: sources, defaults, grid")
            res.update(fixed_scores(seed, log))
            save()
        if "model_stock" not in res and (not args.only or "presets" in args.only.split(",")):
            log(f"seed {seed}: presets")
            res.update(preset_scores(seed, log))
            save()
        if "ta_grid" not in res and (not args.only or "ta_grid" in args.only.split(",")):
            log(f"seed {seed}: task arithmetic grid")
            res.update(ta_grid_scores(seed, log))
            save()
        work = args.work_dir / f"seed{seed}"
        plans = [
            ("random_ps", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-random-{seed}",
                                             search_space=PS_SPACE, optimizer={"name": "random", "islands": 1})),
            ("cma_ps", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-cma-{seed}",
                                          search_space=PS_SPACE, optimizer={"islands": 1, "popsize": None, "x0": 0.5})),
            ("random_ta_vb", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-randomtavb-{seed}",
                                                search_space=TA_VB_SPACE, optimizer={"name": "random", "islands": 1})),
            ("cma_ta_vb", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-cmatavb-{seed}",
                                             search_space=TA_VB_SPACE, optimizer={"islands": 1, "popsize": None})),
            ("random_ps_layer", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-random24-{seed}",
                                                   search_space=PS_LAYER_SPACE,
                                                   optimizer={"name": "random", "islands": 1})),
            ("cma_ps_layer", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-cma24-{seed}",
                                                search_space=PS_LAYER_SPACE, optimizer={"islands": 1, "popsize": None, "x0": 0.5})),
            ("m2n2_layer", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-m2n2-{seed}",
                                              search_space=PS_LAYER_SPACE,
                                              optimizer={"name": "m2n2", "islands": 1, "popsize": None})),
            ("cma_sep_layer", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-cmasep24-{seed}",
                                                 search_space=PS_LAYER_SPACE,
                                                 optimizer={"islands": 1, "popsize": None, "x0": 0.5,
                                                            "separable": True})),
            ("cma_sep_start", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-cmasepstart-{seed}",
                                                 search_space=PS_LAYER_SPACE,
                                                 optimizer={"islands": 1, "popsize": None, "x0": 0.5,
                                                            "separable": True, "start_from": swap_starts()})),
            ("random_knots", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-randomk-{seed}",
                                                search_space=KNOTS_SPACE, optimizer={"name": "random", "islands": 1})),
            ("cma_knots", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-cmak-{seed}",
                                             search_space=KNOTS_SPACE,
                                             optimizer={"islands": 1, "popsize": None, "x0": 0.5})),
            ("random_lines", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-randoml-{seed}",
                                                search_space=LINES_SPACE, optimizer={"name": "random", "islands": 1})),
            ("cma_lines", lambda: experiment("quickstart.yaml", seed, args.trials, f"sq-cmal-{seed}",
                                             search_space=LINES_SPACE,
                                             optimizer={"islands": 1, "popsize": None, "x0": 0.5})),
            ("dfs", lambda: experiment("zoo_dfs.yaml", seed, args.trials, f"sq-dfs-{seed}",
                                       optimizer={"islands": 1}, search_space=dfs_space("dfs.yaml"))),
            ("dfs_noscale", lambda: experiment("zoo_dfs.yaml", seed, args.trials, f"sq-dfs0-{seed}",
                                               optimizer={"islands": 1},
                                               search_space=dfs_space("dfs.yaml", scaling=False))),
            ("ps_dfs", lambda: experiment(
                "zoo_ps_dfs.yaml", seed, args.trials, f"sq-psdfs-{seed}", optimizer={"islands": 1},
                search_space=dfs_space("ps_dfs.yaml", ps_donor={"name": "ps_merged",
                                                                "recipe": res["cma_ps"]["run_dir"]}))),
        ]
        for key, make in plans:
            if key in res or (args.only and key not in args.only.split(",")):
                continue
            log(f"seed {seed}: {key}")
            run_dir = work / key
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            res[key] = run_search(make(), run_dir)
            if key == "ps_dfs":
                res[key]["trials_including_donor"] = res[key]["trials"] + res["cma_ps"]["trials"]
            save()
        log(f"seed {seed} done in {time.perf_counter() - t0:.0f} s")
    write_report(raw)


FIXED = ("base", "expert_a", "expert_b", "linear", "task_arithmetic", "ties", "dare_ties")


def split_offsets(raw: dict, seed: str) -> dict[str, float]:
    """Per split, the seed's mean of (split score - test score) over the recipes no search chose
    (sources and default merges): how much easier or harder than test the split reads. It is
    subtracted from an optimism, which is then the pick's own (winner's curse), not the split's."""
    rows = [raw["seeds"][seed][k] for k in FIXED if k in raw["seeds"][seed]]
    return {split: float(np.mean([r[split] - r["test"] for r in rows])) for split in ("search", "validation")}


def write_report(raw: dict) -> None:
    # the rows are compared seed by seed, so only the seeds that have every row are reported
    # (a seed run for some rows only, e.g. more seeds of a few methods, is left out and named)
    every = set().union(*(set(raw["seeds"][s]) for s in raw["seeds"]))
    seeds = sorted((s for s in raw["seeds"] if set(raw["seeds"][s]) == every), key=int)
    partial = sorted((s for s in raw["seeds"] if s not in seeds), key=int)
    offs = [split_offsets(raw, s) for s in seeds]
    rows = []
    for key, label, kind in METHODS:
        vals = [raw["seeds"][s][key] for s in seeds if key in raw["seeds"][s]]
        if not vals:
            continue

        def col(get):
            return np.array([get(v) for v in vals], dtype=float)

        here = [o for s, o in zip(seeds, offs) if key in raw["seeds"][s]]
        label = label.replace("24-d", f"{per_group_dims()}-d")
        row = {"key": key, "label": label, "kind": kind, "test": col(lambda v: v["test"]),
               "search": col(lambda v: v["search"]), "validation": col(lambda v: v["validation"]),
               "trials": vals[0].get("trials_including_donor", vals[0]["trials"]),
               "off_search": np.array([o["search"] for o in here]), "off_val": np.array([o["validation"] for o in here])}
        if kind == "search":
            row["plain_test"] = col(lambda v: v["search_best"]["test"])
            row["plain_search"] = col(lambda v: v["search_best"]["search"])
            row["optimism"] = (row["validation"] - row["off_val"] - row["test"]).mean()
            if all(v.get("validation_corrected") is not None for v in vals):  # runs since the correction
                row["optimism_corrected"] = (col(lambda v: v["validation_corrected"]) - row["off_val"]
                                             - row["test"]).mean()
            row["plain_optimism"] = (row["plain_search"] - row["off_search"] - row["plain_test"]).mean()
        elif kind == "grid":
            row["plain_optimism"] = (row["search"] - row["off_search"] - row["test"]).mean()
        rows.append(row)
    lines = [f"{KIND.capitalize()} zoo (format {raw.get('zoo_format', 3)}), {len(seeds)} seed(s) ({', '.join(seeds)}); splits: search 300 items, "
             f"validation 300, held-out test 600. Searches: {raw['trials']} trials each, 2 Ray workers, one island; "
             f"the winner is the best on validation among the top {TOP_K} on search ('re-ranked'); 'search's best' "
             "is what the run would export without re-ranking. Optimism = the score a pick was made on minus its "
             "test score (re-ranked: validation − test; search's best: search − test), less that split's own offset "
             "against test on the sources and default merges (search "
             f"{np.mean([o['search'] for o in offs]):+.3f}, validation {np.mean([o['validation'] for o in offs]):+.3f} "
             "on average): the pick's winner's curse, not the split's difficulty."
             + (f" Seeds {', '.join(partial)} are left out: they lack some rows." if partial else ""), "",
             "| method | test, re-ranked (mean ± std) | search | validation | optimism | test, search's best | "
             "optimism | trials | test per seed (re-ranked) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "search":
            extra = f"{r['optimism']:+.3f} | {r['plain_test'].mean():.3f} | {r['plain_optimism']:+.3f}"
        elif r["kind"] == "grid":
            extra = f"- | {r['test'].mean():.3f} | {r['plain_optimism']:+.3f}"
        else:
            extra = "- | - | -"
        lines.append(f"| {r['label']} | {r['test'].mean():.3f} ± {r['test'].std():.3f} | {r['search'].mean():.3f} | "
                     f"{r['validation'].mean():.3f} | {extra} | {r['trials']} | "
                     + ", ".join(f"{x:.3f}" for x in r["test"]) + " |")
    by = {r["key"]: r["test"] for r in rows}
    lines += ["", "Targets (paired over seeds; 'clear' = the smallest per-seed gain is > 0 and the mean gain "
              "exceeds the std of the gains):"]

    def verdict(name, a, b):
        if a not in by or b not in by:
            return
        gains = by[a] - by[b]
        clear = gains.min() > 0 and gains.mean() > gains.std()
        lines.append(f"- {name}: mean gain {gains.mean():+.3f} (per seed {', '.join(f'{g:+.3f}' for g in gains)}) "
                     f"-> {'met' if clear else 'NOT met'}")

    best_source = "expert_a"
    dims = per_group_dims()
    defaults = [k for k in ("linear", "task_arithmetic", "ties", "dare_ties") if k in by]
    best_default = max(defaults, key=lambda k: by[k].mean()) if defaults else None
    verdict(f"CMA-ES PS beats the best source ({best_source})", "cma_ps", best_source)
    if best_default:
        verdict(f"CMA-ES PS beats the best default merge ({best_default})", "cma_ps", best_default)
    verdict("CMA-ES PS beats random search at equal budget (4-d)", "cma_ps", "random_ps")
    verdict(f"CMA-ES PS beats random search at equal budget ({dims}-d, for information)", "cma_ps_layer", "random_ps_layer")
    verdict(f"M2N2 beats random search at equal budget ({dims}-d)", "m2n2_layer", "random_ps_layer")
    verdict(f"M2N2 beats CMA-ES at equal budget ({dims}-d, for information)", "m2n2_layer", "cma_ps_layer")
    verdict("CMA-ES beats random search at equal budget (knots, 12-d)", "cma_knots", "random_knots")
    verdict("CMA-ES beats random search at equal budget (lines, 8-d)", "cma_lines", "random_lines")
    verdict(f"separable CMA-ES beats CMA-ES ({dims}-d, for information)", "cma_sep_layer", "cma_ps_layer")
    if "ps_dfs" in by and "cma_ps" in by:
        gains = by["ps_dfs"] - by["cma_ps"]
        lines.append(f"- PS+DFS >= PS: mean {gains.mean():+.3f} (per seed {', '.join(f'{g:+.3f}' for g in gains)}) "
                     f"-> {'met' if gains.mean() >= 0 else 'NOT met'}")
        on_search = np.array([raw["seeds"][s]["ps_dfs"]["search"] - raw["seeds"][s]["cma_ps"]["search"]
                              for s in seeds if "ps_dfs" in raw["seeds"][s]])
        lines.append(f"  (on the search split, where PS+DFS starts from the PS result: "
                     f"{', '.join(f'{g:+.3f}' for g in on_search)})")
    if "dfs" in by and "dfs_noscale" in by:
        verdict("DFS with the scaling matrix W beats DFS without it (for information)", "dfs", "dfs_noscale")
    uniform = [k for k in ("ties_grid", "ta_grid", "random_ps", "cma_ps") if k in by]
    layerwise = [k for k in ("random_ta_vb", "cma_ta_vb", "random_ps_layer", "cma_ps_layer", "m2n2_layer",
                             "cma_sep_layer", "cma_sep_start", "random_knots", "cma_knots", "random_lines", "cma_lines")
                 if k in by]
    if KIND != "cross-skill" and uniform and layerwise:
        best_uniform = np.max([by[k] for k in uniform], axis=0)  # per seed, the best uniform row on test
        lines.append(f"- Layered-zoo targets (best uniform per seed, over {', '.join(uniform)}: "
                     + ", ".join(f"{x:.3f}" for x in best_uniform) + "):")
        for k in layerwise:
            gains = by[k] - best_uniform
            lines.append(f"  - {k} beats the best uniform recipe by >= 5 points in every seed: per seed "
                         f"{', '.join(f'{g:+.3f}' for g in gains)} -> {'met' if gains.min() >= 0.05 else 'NOT met'}")
        top = max(layerwise, key=lambda k: by[k].mean())
        if "layer_swap" in by:
            gains = by[top] - by["layer_swap"]
            lines.append(f"  - the best searched layer-wise row ({top}) >= the Layer Swapping preset: per seed "
                         f"{', '.join(f'{g:+.3f}' for g in gains)} (mean {gains.mean():+.3f}) -> "
                         f"{'met' if gains.mean() >= 0 else 'NOT met'}")
        if "layer_swap" in by and "cma_sep_start" in by:
            gains = by["cma_sep_start"] - by["layer_swap"]
            lines.append(f"  - separable CMA-ES started from the Layer Swapping presets >= the preset: per seed "
                         f"{', '.join(f'{g:+.3f}' for g in gains)} (mean {gains.mean():+.3f}) -> "
                         f"{'met' if gains.mean() >= 0 else 'NOT met'}")
            gains = by["cma_sep_start"] - best_uniform
            lines.append(f"  - it beats the best uniform recipe by >= 5 points in every seed: per seed "
                         f"{', '.join(f'{g:+.3f}' for g in gains)} -> {'met' if gains.min() >= 0.05 else 'NOT met'}")
        for cma, rnd in (("cma_ta_vb", "random_ta_vb"), ("cma_ps_layer", "random_ps_layer"),
                         ("cma_sep_layer", "random_ps_layer"),
                         ("cma_knots", "random_knots"), ("cma_lines", "random_lines")):
            if cma in by and rnd in by:
                gains = by[cma] - by[rnd]
                lines.append(f"  - {cma} beats {rnd} in every seed: per seed {', '.join(f'{g:+.3f}' for g in gains)} "
                             f"-> {'met' if gains.min() > 0 else 'NOT met'}")
    searches = [r for r in rows if r["kind"] == "search"]
    if searches:
        lower = [r for r in searches if r["test"].mean() < r["plain_test"].mean()]
        lines.append("- Re-ranking never lowers the mean held-out score: "
                     + ", ".join(f"{r['key']} {r['test'].mean() - r['plain_test'].mean():+.3f}" for r in searches)
                     + f" -> {'met' if not lower else 'NOT met (' + ', '.join(r['key'] for r in lower) + ')'}")
        for r in (r for r in searches if r["key"] in ("random_ps_layer", "cma_ps_layer", "m2n2_layer",
                                                       "cma_sep_layer")):
            before, after = r["plain_optimism"], r["optimism"]
            verdict_text = ("met" if after <= 0.5 * before else "NOT met") if before > 0 else \
                "no optimism to cut (the search's best was not optimistic on average)"
            lines.append(f"- Re-ranking halves the optimism of {r['label']}: {before:+.3f} -> {after:+.3f} "
                         f"-> {verdict_text}")
        opt_before = np.mean([r["plain_optimism"] for r in searches])
        opt_after = np.mean([r["optimism"] for r in searches])
        lines.append(f"- Mean optimism over the searches: search's best {opt_before:+.3f}, re-ranked {opt_after:+.3f}")
        corrected = [r for r in searches if "optimism_corrected" in r]
        if corrected:  # runs that report validation_corrected (the winner's validation less its winner's curse)
            lines.append("- Optimism of the re-ranked winner's validation_corrected: "
                         + ", ".join(f"{r['key']} {r['optimism_corrected']:+.3f}" for r in corrected)
                         + f"; mean {np.mean([r['optimism_corrected'] for r in corrected]):+.3f}")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{results_stem()}.md").write_text(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1))
    labels = [r["label"] for r in rows][::-1]
    means = [r["test"].mean() for r in rows][::-1]
    stds = [r["test"].std() for r in rows][::-1]
    ax.barh(labels, means, xerr=stds, color="#4c72b0")
    ax.axvline(0.25, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("held-out test accuracy (mean ± std over seeds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{results_stem()}.png", dpi=110)


if __name__ == "__main__":
    main()
