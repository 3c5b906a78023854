"""Optimizers behind one ask/tell protocol (see ``base.Optimizer``)."""

from __future__ import annotations

from evomerge.config import OptimizerConfig
from evomerge.optimize.base import Genome, Optimizer


def build_optimizer(cfg: OptimizerConfig, dim: int, seed: int | None = None, num_objectives: int = 1) -> Optimizer:
    """Instantiate the optimizer an experiment names (``seed`` overrides ``cfg.seed``, e.g. per island)."""
    seed = cfg.seed if seed is None else seed
    popsize = cfg.resolved_popsize(dim)
    if cfg.name == "cma_es":
        from evomerge.optimize.cma_es import CMAESOptimizer

        return CMAESOptimizer(dim, x0=cfg.x0, sigma0=cfg.sigma0, popsize=popsize, seed=seed,
                              restarts=cfg.restarts, max_restarts=cfg.max_restarts,
                              stall_generations=cfg.stall_generations)
    if cfg.name == "random":
        from evomerge.optimize.random_search import RandomSearch

        return RandomSearch(dim, popsize=popsize, seed=seed, num_objectives=num_objectives)
    if cfg.name in ("tpe", "optuna_cmaes", "nsga2"):
        from evomerge.optimize.optuna_samplers import OptunaOptimizer

        return OptunaOptimizer(cfg.name, dim, popsize=popsize, seed=seed, num_objectives=num_objectives,
                               x0=cfg.x0, sigma0=cfg.sigma0)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


__all__ = ["Genome", "Optimizer", "build_optimizer"]
