"""Optimizers behind one ask/tell protocol."""

from __future__ import annotations

from evomerge.config import OptimizerConfig
from evomerge.optimize.base import Genome, Optimizer


def build_optimizer(cfg: OptimizerConfig, dim: int, seed: int | None = None) -> Optimizer:
    """Instantiate the optimizer an experiment names (``seed`` overrides ``cfg.seed``, e.g. per island)."""
    seed = cfg.seed if seed is None else seed
    if cfg.name == "cma_es":
        from evomerge.optimize.cma_es import CMAESOptimizer

        return CMAESOptimizer(dim, x0=cfg.x0, sigma0=cfg.sigma0, popsize=cfg.resolved_popsize(dim), seed=seed)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


__all__ = ["Genome", "Optimizer", "build_optimizer"]
