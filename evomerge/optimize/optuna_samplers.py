"""Optuna samplers through Optuna's ask/tell API (the only module that imports ``optuna``).

``tpe`` (TPESampler, multivariate, constant liar for batches), ``optuna_cmaes``
(CmaEsSampler, which uses the ``cmaes`` package; popsize as configured, and x0/sigma0
when they differ from Optuna's defaults, which are the paper's)
and ``nsga2`` (NSGAIISampler, multi-objective; population = popsize). Each
genome coordinate is a FloatDistribution(0, 1) parameter ``x0000``, ``x0001``...
Optuna never owns the loop: a batch of ``popsize`` trials is asked, evaluated by
the controller, and told back in order. Seeded samplers with the same history
give the same genomes (Optuna documents this for its seeded samplers; the
contract test checks it).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import optuna
from optuna.distributions import FloatDistribution

from evomerge.optimize.base import BestTracker, Fitness, Genome, check_finite

optuna.logging.set_verbosity(optuna.logging.WARNING)

SAMPLERS = ("tpe", "optuna_cmaes", "nsga2")


def _sampler(kind: str, dim: int, popsize: int, seed: int, x0: float, sigma0: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if kind == "optuna_cmaes":
            # Optuna's defaults are the box centre and range / 6 — the paper's x0 = 0.5, sigma0 = 1/6;
            # its x0/sigma0 arguments are deprecated (4.9), so pass them only to change them
            extra = {}
            if abs(x0 - 0.5) > 1e-12 or abs(sigma0 - 1 / 6) > 1e-4:
                warnings.simplefilter("ignore", FutureWarning)
                extra = {"x0": {_name(i): x0 for i in range(dim)}, "sigma0": sigma0}
            return optuna.samplers.CmaEsSampler(seed=seed, popsize=popsize, **extra)
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=popsize)
    raise ValueError(f"unknown Optuna sampler {kind!r}; available: {', '.join(SAMPLERS)}")


def _name(i: int) -> str:
    return f"x{i:04d}"


class OptunaOptimizer:
    """One Optuna study (in memory) behind the Optimizer protocol."""

    def __init__(self, kind: str, dim: int, *, popsize: int, seed: int = 0, num_objectives: int = 1,
                 x0: float = 0.5, sigma0: float = 1 / 6) -> None:
        if dim < 1:
            raise ValueError("dim must be >= 1")
        if kind == "nsga2" and num_objectives < 2:
            raise ValueError("nsga2 is multi-objective: it needs at least 2 objectives")
        self.kind = kind
        self.dim = dim
        self.popsize = popsize
        self.num_objectives = num_objectives
        self._study = optuna.create_study(
            sampler=_sampler(kind, dim, popsize, seed, x0, sigma0),
            directions=["maximize"] * num_objectives,
        )
        self._dists = {_name(i): FloatDistribution(0.0, 1.0) for i in range(dim)}
        self._pending: dict[bytes, optuna.trial.Trial] = {}
        self._best = BestTracker()

    def ask(self) -> list[Genome]:
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for _ in range(self.popsize):
                trial = self._study.ask(self._dists)
                g = np.array([trial.params[_name(i)] for i in range(self.dim)], dtype=np.float64)
                self._pending[g.tobytes()] = trial
                out.append(g)
        return out

    def tell(self, genomes: Sequence[Genome], fitness: Sequence[Fitness]) -> None:
        values = check_finite(fitness, self.num_objectives)
        for g, v in zip(genomes, values):
            trial = self._pending.pop(np.asarray(g, dtype=np.float64).tobytes(), None)
            if trial is None:
                raise ValueError("told a genome this optimizer did not ask (or told it twice)")
            self._study.tell(trial, v)
        self._best.update(genomes, values)

    def best(self) -> tuple[Genome, Fitness] | None:
        return self._best.best

    def state(self) -> dict:
        trials = self._study.trials
        return {"trials": len(trials),
                "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)}
