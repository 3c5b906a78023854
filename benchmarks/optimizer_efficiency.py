"""Optimizer efficiency on cheap synthetic objectives shaped like merge searches.

Each objective lives on [0, 1]^n (n = 20, 50, 200, the sizes of global and per-layer
PS spaces) and is measured with noise, as lm-eval accuracy on a few hundred items is:

- ``sphere``: -mean((x - t)^2) for a random optimum t in [0.2, 0.8]^n, plus N(0, 0.005) noise;
- ``rugged``: sphere + 0.01 * mean(cos(10 pi (x - t))) (many local optima), plus noise;
- ``accuracy``: 0.25 + 0.75 * exp(-8 * mean((x - t)^2)) observed as the accuracy on 300
  Bernoulli items (discrete, noisy, plateaus: what the zoo's fitness looks like).

For every optimizer (through the same ask/tell protocol the controller uses) it prints
the true, noise-free value of the best-*observed* trial after 100 / 300 / 600 trials
(mean ± std over seeds) and the optimizer's own time per trial. The claim checked:
CMA-ES beats random search at equal budget.

Usage: python benchmarks/optimizer_efficiency.py [--dims 20,50,200] [--budget 600] [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.config import OptimizerConfig  # noqa: E402
from evomerge.optimize import build_optimizer  # noqa: E402


def make_objective(kind: str, dim: int, seed: int):
    rng = np.random.default_rng(10_000 + seed)
    t = rng.uniform(0.2, 0.8, dim)
    noise = np.random.default_rng(20_000 + seed)

    def true(x):
        d = np.mean((x - t) ** 2)
        if kind == "sphere":
            return -d
        if kind == "rugged":
            return -d + 0.01 * np.mean(np.cos(10 * np.pi * (x - t)))
        return 0.25 + 0.75 * np.exp(-8 * d)

    def observed(x):
        if kind == "accuracy":
            return float(noise.binomial(300, true(x)) / 300)
        return float(true(x) + noise.normal(0, 0.005))

    return true, observed


def run(name: str, kind: str, dim: int, seed: int, budget: int, checkpoints: list[int]):
    cfg = OptimizerConfig(name=name, seed=seed)
    opt = build_optimizer(cfg, dim)
    true, observed = make_objective(kind, dim, seed)
    best_obs, best_true = -np.inf, None
    out, spent, n = {}, 0.0, 0
    while n < budget:
        t0 = time.perf_counter()
        genomes = opt.ask()
        spent += time.perf_counter() - t0
        values = []
        for g in genomes:
            v = observed(g)
            values.append(v)
            n += 1
            if v > best_obs:
                best_obs, best_true = v, true(g)
            for c in checkpoints:
                if n == c:
                    out[c] = best_true
        t0 = time.perf_counter()
        opt.tell(genomes, values)
        spent += time.perf_counter() - t0
    return out, 1000 * spent / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="20,50,200")
    ap.add_argument("--objectives", default="sphere,rugged,accuracy")
    ap.add_argument("--optimizers", default="cma_es,optuna_cmaes,tpe,random")
    ap.add_argument("--budget", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    checkpoints = [c for c in (100, 300, 600, 1000) if c <= args.budget]
    if args.budget not in checkpoints:
        checkpoints.append(args.budget)

    verdicts = []
    header = f"{'objective':>9} {'dim':>4} {'optimizer':>13} " + " ".join(f"{'@' + str(c):>17}" for c in checkpoints) \
        + f" {'opt ms/trial':>12}"
    print(header)
    for kind in args.objectives.split(","):
        for dim in [int(d) for d in args.dims.split(",")]:
            finals = {}
            for name in args.optimizers.split(","):
                per_seed = [run(name, kind, dim, s, args.budget, checkpoints) for s in range(args.seeds)]
                cells = []
                for c in checkpoints:
                    vals = np.array([r[0][c] for r in per_seed])
                    cells.append(f"{vals.mean():>9.4f} ± {vals.std():.4f}")
                finals[name] = np.array([r[0][checkpoints[-1]] for r in per_seed])
                ms = np.mean([r[1] for r in per_seed])
                print(f"{kind:>9} {dim:>4} {name:>13} " + " ".join(f"{c:>17}" for c in cells) + f" {ms:>12.2f}",
                      flush=True)
            if "cma_es" in finals and "random" in finals:
                wins = int(np.sum(finals["cma_es"] > finals["random"]))
                verdicts.append(f"{kind} n={dim}: cma_es beats random on {wins}/{args.seeds} seeds "
                                f"({finals['cma_es'].mean():.4f} vs {finals['random'].mean():.4f})")
    print("\nvalues: true (noise-free) objective of the best observed trial; higher is better")
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
