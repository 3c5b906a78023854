"""Does layer structure pay on the layered zoo? Best hand-made per-layer recipe vs best uniform one.

For each seed it builds (or reuses) `evomerge zoo build --kind layered --seed S`, then scores, through
the product's worker (merge + lm-eval), on the search, validation and held-out test splits:

- the sources;
- uniform recipes (one weight per expert for every tensor): task arithmetic on a 5 x 5 grid of
  (weight A, weight B) and TIES on the search-quality benchmark's 18-point grid;
- hand-made per-layer recipes: task arithmetic with expert A at one weight and expert B split into
  its vocabulary (embeddings and head), its outer blocks and its middle blocks (the blocks
  expert A was trained in), 24 points; and the Layer Swapping preset for k = 0..3.

Each family's recipe is chosen on the search split and reported on test. Target (issue 21): the
best per-layer recipe beats the best uniform one by >= 5 test points in every seed, with a build of
<= 4 minutes on 2 cores.

Output: a table printed and written to ``benchmarks/results/layered_zoo.md`` (raw:
``layered_zoo.json``). Usage: python benchmarks/layered_zoo.py [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

import search_quality as sq  # noqa: E402
from evomerge.presets import layer_swapping  # noqa: E402
from evomerge.recipe import ModelParams, Recipe  # noqa: E402
from evomerge.zoo import build_zoo  # noqa: E402
from evomerge.zoo.kinds import zoo_spec  # noqa: E402

KIND = "layered"


def per_layer_recipe(layers: int, middle: set[int], wa: float, vocab: float, outer: float, mid: float) -> Recipe:
    """Task arithmetic: expert A at `wa` everywhere; expert B at `vocab` on the embeddings and head,
    `outer` on the blocks outside `middle`, `mid` on the blocks in it."""
    groups = ["embed", *range(layers), "head"]
    wb = tuple(vocab if g in ("embed", "head") else (mid if g in middle else outer) for g in groups)
    return Recipe(method="task_arithmetic", base_model="base", parameters={"normalize": False},
                  models=(ModelParams(model="expert_a", parameters={"weight": wa}),
                          ModelParams(model="expert_b", parameters={"weight": wb})))


def measure(seed: int, log) -> dict:
    started = time.perf_counter()
    zoo = build_zoo(KIND, seed=seed, progress=log)
    manifest = json.loads((zoo.root / "manifest.json").read_text())
    score = sq.scorer(seed, log)
    spec = zoo_spec(KIND)
    layers = spec.shape.layers
    middle = set(spec.expert_a_phases[0].blocks)

    def best(grid):
        scored = [(score({"recipe": r.to_dict()}), choice) for choice, r in grid]
        top = max(scored, key=lambda g: g[0]["search"])
        return {**top[0], "choice": top[1], "points": len(scored)}

    out = {"build_seconds": manifest["build_seconds"],
           "sources": {m: score({"source": m}) for m in ("base", "expert_a", "expert_b")}}
    out["ta_uniform"] = best([((wa, wb), sq.recipe("task_arithmetic", wa, wb, normalize=False))
                              for wa in (0.5, 0.75, 1.0, 1.25, 1.5) for wb in (0.0, 0.25, 0.5, 0.75, 1.0)])
    out["ties_uniform"] = best([((d, wa, wb), sq.recipe("ties", wa, wb, density=d, normalize=False))
                                for d in (0.3, 0.6, 0.9) for wa in (0.5, 1.0) for wb in (0.25, 0.5, 1.0)])
    out["ta_per_layer"] = best([((wa, v, o, m), per_layer_recipe(layers, middle, wa, v, o, m))
                                for wa in (1.0, 1.25) for v in (0.5, 1.0) for o in (0.0, 0.5, 1.0)
                                for m in (0.0, 0.25)])
    out["layer_swap"] = best([(k, layer_swapping(["expert_a", "expert_b"], "base", layers, outer="expert_b",
                                                 inner="expert_a", k=k)) for k in range(layers // 2 + 1)])
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def report(raw: dict) -> str:
    seeds = sorted(raw["seeds"], key=int)
    rows = [("source: expert_a", lambda r: r["sources"]["expert_a"]),
            ("source: expert_b", lambda r: r["sources"]["expert_b"]),
            ("uniform task arithmetic, 25-point grid", lambda r: r["ta_uniform"]),
            ("uniform TIES, 18-point grid", lambda r: r["ties_uniform"]),
            ("per-layer task arithmetic (B: vocabulary / outer / middle), 24-point grid", lambda r: r["ta_per_layer"]),
            ("Layer Swapping preset, k = 0..3", lambda r: r["layer_swap"])]
    lines = [f"Layered zoo, seeds {', '.join(seeds)}: held-out test (600 items; search 300). Each grid's point "
             "is chosen on the search split.", "",
             "| recipe | " + " | ".join(f"seed {s} test (search)" for s in seeds) + " | choice per seed |",
             "|---|" + "---|" * len(seeds) + "---|"]
    for label, get in rows:
        cells = [get(raw["seeds"][s]) for s in seeds]
        lines.append(f"| {label} | " + " | ".join(f"{c['test']:.3f} ({c['search']:.3f})" for c in cells) + " | "
                     + "; ".join(json.dumps(c["choice"]) if "choice" in c else "-" for c in cells) + " |")
    lines.append("")
    gaps = []
    for s in seeds:
        r = raw["seeds"][s]
        uniform = max((r["ta_uniform"], r["ties_uniform"]), key=lambda c: c["search"])
        layered = max((r["ta_per_layer"], r["layer_swap"]), key=lambda c: c["search"])
        gaps.append(layered["test"] - uniform["test"])
        lines.append(f"- seed {s}: best per-layer (on search) {layered['test']:.3f} vs best uniform {uniform['test']:.3f} "
                     f"on test: {gaps[-1]:+.3f}; build {r['build_seconds']:.0f} s")
    met = min(gaps) >= 0.05
    lines.append(f"- Target (>= +0.05 in every seed): {'met' if met else 'NOT met'} "
                 f"(min {min(gaps):+.3f}, mean {sum(gaps) / len(gaps):+.3f})")
    builds = [raw["seeds"][s]["build_seconds"] for s in seeds]
    lines.append(f"- Build time (2 threads, from the manifest): {min(builds):.0f}-{max(builds):.0f} s "
                 f"(target <= 240 s) -> {'met' if max(builds) <= 240 else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    sq.KIND = KIND

    def log(text):
        print(text, file=sys.stderr, flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "layered_zoo.json"
    raw = json.loads(path.read_text()) if path.exists() else {"seeds": {}}  # seeds measured earlier stay
    for seed in [int(s) for s in args.seeds.split(",")]:
        log(f"seed {seed}")
        raw["seeds"][str(seed)] = measure(seed, log)
        path.write_text(json.dumps(raw, indent=2, sort_keys=True))
    text = report(raw)
    (RESULTS / "layered_zoo.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
