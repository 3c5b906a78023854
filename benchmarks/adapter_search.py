"""LoRA adapters as sources (issue 39): is the adapter search cheaper per candidate, and as good?

Two parts:

1. **The search, twice** (per seed): ``experiments/zoo_adapters.yaml`` as shipped (six LoRA adapters
   on one base, task arithmetic vocab/body, 96 trials, 2 Ray workers, tracking off), and the same
   search over the full models PEFT's ``merge_and_unload`` would make of the adapters (written here:
   base + each adapter's delta). Per-candidate merge seconds and worker peak memory come from each
   run's ledger (what the workers measured). On the held-out test split (600 items), with paired
   standard errors over items: the searched recipe, the best single adapter (chosen on the search
   split) and uniform averaging (task arithmetic, weight 1/6 each).
2. **At a real model's size** (in-process): a random Llama of SmolLM2-135M's shape with six random
   LoRA adapters (ranks 8-16, every block's linear layers), resident bytes and the merge time of one
   candidate (task arithmetic and TIES) into a preallocated model, adapters vs full task vectors.

Goal: the adapter search at least 3x cheaper per candidate in memory and merge time, at the same
held-out score.

Usage: python benchmarks/adapter_search.py [--seeds 0] [--skip-search] [--skip-scale] [--keep OLD.json]
       (~5 min per seed on 2 cores with the zoo cached, + ~3 min for part 2; 4 GB in --work-dir)
Writes benchmarks/results/adapter_search.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import RESULTS, ROOT  # noqa: E402

from evomerge.config import parse_experiment  # noqa: E402
from evomerge.ledger import Ledger  # noqa: E402
from evomerge.merge.backend import ResidentSources  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.search import Controller  # noqa: E402
from evomerge.zoo import build_zoo  # noqa: E402

ADAPTERS = ("arith", "arith_r4", "l2", "l2_noisy", "mixed", "l1")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def experiment(seed: int, models: dict[str, str] | None, name: str):
    data = yaml.safe_load((ROOT / "experiments" / "zoo_adapters.yaml").read_text())
    data["name"] = name
    data["zoo"] = {"kind": "adapters", "seed": seed}
    data["optimizer"] = {**data["optimizer"], "seed": seed}
    data["tracking"] = {"backend": "none"}
    if models is not None:
        data["models"] = [{"name": k, "path": v} for k, v in models.items()]
    return parse_experiment(data, ROOT / "experiments")


def full_models(zoo, out: Path) -> dict[str, str]:
    """The adapters merged into full copies of the base (what PEFT's merge_and_unload writes)."""
    from transformers import AutoModelForCausalLM

    from evomerge.export import copy_tokenizer

    sources = ResidentSources.from_model_dirs({k: zoo.models[k] for k in ("base", *ADAPTERS)}, "base")
    dirs = {"base": str(zoo.models["base"])}
    for name in ADAPTERS:
        target = out / name
        if not (target / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_pretrained(zoo.models["base"])
            sources.write_source(name, model)
            model.save_pretrained(target)
            copy_tokenizer(zoo.models["base"], target)
        dirs[name] = str(target)
    return dirs


def ledger_costs(run_dir: Path) -> dict[str, float]:
    trials = [r for r in Ledger(run_dir / "ledger.jsonl").records("trial") if r.get("state") == "complete"]
    merges = [r["merge_seconds"] for r in trials if r.get("merge_seconds")]
    peaks = [r["peak_bytes"] for r in trials if r.get("peak_bytes")]
    return {"merge_seconds_median": statistics.median(merges), "peak_gib_max": max(peaks) / 2 ** 30,
            "trials": len(trials)}


_SOURCES: dict[Path, ResidentSources] = {}  # per zoo


def correct(zoo, recipe: Recipe | None, source: str | None) -> torch.Tensor:
    """Per test item, 1 where the merge (or the source) picks the right choice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.zoo.score import choice_loglikelihoods

    if zoo.root not in _SOURCES:
        _SOURCES[zoo.root] = ResidentSources.from_model_dirs({k: zoo.models[k] for k in ("base", *ADAPTERS)}, "base")
    sources = _SOURCES[zoo.root]
    model = AutoModelForCausalLM.from_pretrained(zoo.models["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo.models["base"])
    if recipe is not None:
        sources.merge_into(recipe, model)
    else:
        sources.write_source(source, model)
    items = [json.loads(line) for line in (zoo.tasks_dir / "zoo_arith_l2_test.jsonl").open()]
    with torch.no_grad():
        picks = choice_loglikelihoods(model, tokenizer, items).argmax(dim=1)
    return (picks == torch.tensor([i["label"] for i in items])).float()


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = a - b
    return float(diff.mean()), float(diff.std(unbiased=True) / math.sqrt(len(diff)))


def search_part(seed: int, work: Path) -> dict:
    zoo = build_zoo("adapters", seed, progress=log)
    runs = {}
    for kind, models in (("adapters", None), ("full", full_models(zoo, work / f"full-models-{seed}"))):
        run_dir = work / f"{kind}-{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        summary = Controller(experiment(seed, models, f"adapters-{kind}-{seed}"), run_dir).run()
        runs[kind] = {"test": summary.test_scores.get("best"), "search": summary.best_fitness,
                      "seconds": round(time.perf_counter() - t0, 1), **ledger_costs(run_dir),
                      "recipe": yaml.safe_load((run_dir / "best_recipe.yaml").read_text())}
        log(f"seed {seed} {kind}: test {runs[kind]['test']:.3f}, merge {runs[kind]['merge_seconds_median']:.4f} s, "
            f"peak {runs[kind]['peak_gib_max']:.2f} GiB")
    summary = json.loads((work / f"adapters-{seed}" / "summary.json").read_text())
    search_scores = {k: v for k, v in (summary.get("baselines") or {}).items() if k in ADAPTERS}
    best_single = max(search_scores, key=search_scores.get) if search_scores else "arith_r4"
    winner = correct(zoo, Recipe.from_dict(runs["adapters"]["recipe"]), None)
    single = correct(zoo, None, best_single)
    # the run's own test score, recomputed (in float64: a float32 mean differs from it at ~1e-8)
    if abs(float(winner.double().mean()) - runs["adapters"]["test"]) > 1e-9:
        raise RuntimeError(f"seed {seed}: the winner scores {float(winner.double().mean())} here, {runs['adapters']['test']} "
                           "in its run")
    uniform = correct(zoo, Recipe.from_dict({"method": "task_arithmetic", "base_model": "base", "models": [
        {"model": m, "parameters": {"weight": 1 / len(ADAPTERS)}} for m in ADAPTERS]}), None)
    return {"runs": runs, "best_single": best_single, "search_scores": search_scores,
            "test": {"winner": float(winner.mean()), "best_single": float(single.mean()),
                     "uniform": float(uniform.mean())},
            "gain_vs_single": paired(winner, single), "gain_vs_uniform": paired(winner, uniform)}


SCALE_RANKS = (8, 8, 16, 8, 16, 8)


def scale_dirs(work: Path) -> dict[str, dict[str, str]]:
    """On disk, as a worker finds them: a random Llama of SmolLM2-135M's shape, six random LoRA
    adapters on every block's linear layers (PEFT's format), and the full models they make."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.adapters import LowRank, write_adapter

    root = work / "scale"
    names = [f"ad{i}" for i in range(len(SCALE_RANKS))]
    dirs = {"adapters": {"base": str(root / "base")}, "full": {"base": str(root / "base")}}
    for name in names:
        dirs["adapters"][name] = str(root / name)
        dirs["full"][name] = str(root / f"{name}_full")
    if (root / "done").is_file():
        return dirs
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for name, r in zip(names, SCALE_RANKS):
        factors = {k: LowRank(B=torch.randn(t.shape[0], r, generator=g) * 0.01,
                              A=torch.randn(r, t.shape[1], generator=g) * 0.01, scaling=2.0, transpose=False)
                   for k, t in base.items() if k.endswith("proj.weight")}
        write_adapter(root / name, factors, lambda k: k, base_model_name_or_path=str(root / "base"))
        with torch.no_grad():
            for key, f in factors.items():
                model.state_dict()[key].copy_(base[key] + f.dense())
        model.save_pretrained(root / f"{name}_full")
        with torch.no_grad():
            for key in factors:
                model.state_dict()[key].copy_(base[key])
    (root / "done").write_text("")
    return dirs


def peak(kind: str, work: Path) -> dict:
    """In this (fresh) process, as a worker: load the sources and a model to merge into, merge
    candidates; the process's peak resident set and the merge times."""
    from transformers import AutoModelForCausalLM

    from evomerge.memory import resident_peak

    dirs = scale_dirs(work)[kind]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    sources = ResidentSources.from_model_dirs({k: Path(v) for k, v in dirs.items()}, "base")
    model = AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
    out = {"resident_gib": sources.resident_bytes / 2 ** 30, "merge_seconds": {}}
    names = [n for n in dirs if n != "base"]
    for method, extra, repeats in (("task_arithmetic", {}, 7), ("ties", {"density": 0.5}, 3)):
        recipe = Recipe.from_dict({"method": method, "base_model": "base", "models": [
            {"model": n, "parameters": {"weight": 0.3 + 0.1 * i, **extra}} for i, n in enumerate(names)]})
        sources.merge_into(recipe, model)  # warm
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sources.merge_into(recipe, model)
            times.append(time.perf_counter() - t0)
        out["merge_seconds"][method] = statistics.median(times)
    out["peak_gib"] = resident_peak() / 2 ** 30
    return out


def scale_part(work: Path) -> dict:
    """Resident bytes, worker peak and one candidate's merge time at SmolLM2-135M's shape, each
    kind in a fresh process loading from disk as a worker does."""
    import subprocess

    scale_dirs(work)
    out = {"ranks": SCALE_RANKS, "params_m": 134.5}
    for kind in ("adapters", "full"):
        done = subprocess.run([sys.executable, __file__, "--peak", kind, "--work-dir", str(work)],
                              capture_output=True, text=True, check=True)
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"scale {kind}: {out[kind]}")
    return out


def write_report(raw: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adapter_search.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    lines = [f"Measured {raw['date']} on {raw['machine']} (torch threads {raw['threads']}).", ""]
    if raw.get("search"):
        lines += ["## The search: adapters vs the same search over merged full models",
                  "", "`experiments/zoo_adapters.yaml` as shipped (96 trials, 2 Ray workers), held-out test "
                  "split (600 items); ± is the paired standard error over items.", "",
                  "| seed | searched (adapters) | searched (full models) | best single adapter | uniform average | "
                  "gain vs best single | gain vs uniform |", "|---|---|---|---|---|---|---|"]
        for seed, s in raw["search"].items():
            g1, g2 = s["gain_vs_single"], s["gain_vs_uniform"]
            lines.append(f"| {seed} | {s['runs']['adapters']['test']:.3f} | {s['runs']['full']['test']:.3f} | "
                         f"{s['test']['best_single']:.3f} ({s['best_single']}) | {s['test']['uniform']:.3f} | "
                         f"{g1[0] * 100:+.1f} ± {g1[1] * 100:.1f} | {g2[0] * 100:+.1f} ± {g2[1] * 100:.1f} |")
        lines += ["", "Per candidate, as the workers measured it (median merge seconds; peak worker memory, "
                  "the process's resident set with its runtime):", "",
                  "| seed | merge, adapters | merge, full | ratio | worker peak, adapters | worker peak, full | "
                  "search wall, adapters / full |", "|---|---|---|---|---|---|---|"]
        for seed, s in raw["search"].items():
            a, f = s["runs"]["adapters"], s["runs"]["full"]
            lines.append(f"| {seed} | {a['merge_seconds_median'] * 1e3:.1f} ms | {f['merge_seconds_median'] * 1e3:.1f} ms"
                         f" | {f['merge_seconds_median'] / a['merge_seconds_median']:.1f}x | "
                         f"{a['peak_gib_max']:.2f} GiB | {f['peak_gib_max']:.2f} GiB | "
                         f"{a['seconds']:.0f} s / {f['seconds']:.0f} s |")
    if raw.get("scale"):
        s = raw["scale"]
        a, f = s["adapters"], s["full"]
        lines += ["", f"## At SmolLM2-135M's shape ({s['params_m']:.0f} M parameters, six adapters of ranks "
                  f"{', '.join(map(str, s['ranks']))} on every block's linear layers)", "",
                  "Each kind in a fresh process that loads the sources from disk as a worker does and merges "
                  "into a preallocated model (2 torch threads; median of 7 merges, TIES of 3):", "",
                  "| | adapters | full models | ratio |", "|---|---|---|---|",
                  f"| resident sources | {a['resident_gib']:.2f} GiB | {f['resident_gib']:.2f} GiB | "
                  f"{f['resident_gib'] / a['resident_gib']:.1f}x |",
                  f"| process peak (sources, the model, torch) | {a['peak_gib']:.2f} GiB | {f['peak_gib']:.2f} GiB | "
                  f"{f['peak_gib'] / a['peak_gib']:.1f}x |"]
        for method in a["merge_seconds"]:
            x, y = a["merge_seconds"][method], f["merge_seconds"][method]
            lines.append(f"| merge one candidate, {method} | {x:.3f} s | {y:.3f} s | {y / x:.1f}x |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "adapter_search.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/evomerge-adapter-search"))
    ap.add_argument("--peak", choices=["adapters", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=Path, help="keep the seeds of this earlier JSON's search part (and its scale "
                                              "part with --skip-scale); re-measure the rest")
    args = ap.parse_args()
    if args.peak:
        print(json.dumps(peak(args.peak, args.work_dir)))
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    import platform

    raw = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "threads": torch.get_num_threads()}
    if not args.skip_scale:
        raw["scale"] = scale_part(args.work_dir)
    elif args.keep:
        raw["scale"] = json.loads(args.keep.read_text()).get("scale")
    if args.keep:
        raw["search"] = json.loads(args.keep.read_text()).get("search") or {}
    if not args.skip_search:
        raw.setdefault("search", {}).update({seed: search_part(int(seed), args.work_dir)
                                             for seed in args.seeds.split(",")})
    write_report(raw)


if __name__ == "__main__":
    main()
