"""Optimizers behind one ask/tell protocol (see ``base.Optimizer``)."""

from __future__ import annotations

import numpy as np

from evomerge.config import OptimizerConfig
from evomerge.optimize.base import Genome, Optimizer


def build_optimizer(cfg: OptimizerConfig, dim: int, seed: int | None = None, num_objectives: int = 1,
                    start: np.ndarray | None = None, gene_groups: tuple[int, ...] | None = None,
                    inject: tuple[np.ndarray, ...] = ()) -> Optimizer:
    """Instantiate the optimizer an experiment names (``seed`` overrides ``cfg.seed``, e.g. per island).

    ``start``: a search space's own start genome (e.g. a DFS path), instead of ``cfg.x0``
    everywhere; only CMA-ES takes one (it also evaluates it in its first generation).
    ``gene_groups``: each gene's layer group (-1: none), for M2N2's split point.
    ``inject``: genomes CMA-ES evaluates in its first generation (start recipes).
    """
    seed = cfg.seed if seed is None else seed
    popsize = cfg.resolved_popsize(dim)
    if (start is not None or len(inject)) and cfg.name != "cma_es":
        raise ValueError(f"a search-space start point or start recipes need optimizer cma_es, not {cfg.name}")
    if cfg.name == "cma_es":
        from evomerge.optimize.cma_es import CMAESOptimizer

        return CMAESOptimizer(dim, x0=cfg.x0 if start is None else start, sigma0=cfg.sigma0, popsize=popsize, seed=seed,
                              restarts=cfg.restarts, max_restarts=cfg.max_restarts,
                              stall_generations=cfg.stall_generations, separable=cfg.separable, inject=inject)
    if cfg.name == "m2n2":
        from evomerge.optimize.m2n2 import M2N2

        return M2N2(dim, popsize=popsize, seed=seed, archive_size=cfg.m2n2.archive_size, alpha=cfg.m2n2.alpha,
                    mutation=cfg.m2n2.mutation, gene_groups=gene_groups)
    if cfg.name == "random":
        from evomerge.optimize.random_search import RandomSearch

        return RandomSearch(dim, popsize=popsize, seed=seed, num_objectives=num_objectives)
    if cfg.name in ("tpe", "optuna_cmaes", "nsga2"):
        from evomerge.optimize.optuna_samplers import OptunaOptimizer

        return OptunaOptimizer(cfg.name, dim, popsize=popsize, seed=seed, num_objectives=num_objectives,
                               x0=cfg.x0, sigma0=cfg.sigma0)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


__all__ = ["Genome", "Optimizer", "build_optimizer"]
