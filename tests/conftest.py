"""Session fixtures: one private zoo cache, one tiny zoo, one local Ray instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory) -> Path:
    """A fresh EVOMERGE_CACHE for the session (the user's cache is never touched)."""
    path = tmp_path_factory.mktemp("evomerge-cache")
    os.environ["EVOMERGE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def session_tiny_zoo(zoo_cache):
    from evomerge.zoo import build_zoo

    return build_zoo(kind="tiny", seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (ray.init takes seconds and ~1.3 GB)."""
    import ray

    # address="local": this session's own instance, whatever cluster the machine runs (or ran)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "GIT_DIR": os.devnull}})
    yield ray
    ray.shutdown()
