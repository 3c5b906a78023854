"""Fitness: suites of lm-eval tasks scored on in-memory models."""
