"""The Dispatcher contract, checked on every implementation (in-process, Ray actors, virtual clock)."""

from __future__ import annotations

import functools

import pytest

from evomerge.config import SuiteConfig, TaskSpec
from evomerge.dispatch.base import Dispatcher
from evomerge.testing import SimulatedWorker, VirtualDispatcher
from evomerge.worker import EvalRequest, WorkerSpec

SPEC = WorkerSpec(model_dirs={"a": "/nonexistent"}, base_model="a",
                  suite=SuiteConfig(tasks=(TaskSpec(name="t"),)), task_paths=())
FACTORY = functools.partial(SimulatedWorker, low=0.01, spread=3.0)


def _local():
    from evomerge.dispatch.local import LocalDispatcher

    return LocalDispatcher(SPEC, FACTORY)


def _ray():
    from evomerge.dispatch.ray_pool import RayDispatcher

    return RayDispatcher(SPEC, 2, worker_factory=FACTORY)


@pytest.fixture(params=["local", "ray", "virtual"])
def dispatcher(request):
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    d = {"local": _local, "ray": _ray, "virtual": lambda: VirtualDispatcher(2)}[request.param]()
    yield d
    d.close()


def test_every_request_comes_back_once(dispatcher):
    assert isinstance(dispatcher, Dispatcher) and dispatcher.num_workers >= 1
    assert dispatcher.wait(timeout=0.1) == []  # nothing submitted: nothing to wait for
    recipe = {"models": [{"model": "b", "parameters": {"weight": 0.6}}]}
    requests = [EvalRequest(trial_id=i, recipe=recipe) for i in range(5)]
    requests += [EvalRequest(trial_id=-1, source="a"), EvalRequest(trial_id=0, source="a", split="test")]
    seen = []
    submitted = 0
    while len(seen) < len(requests):
        # the controller only submits while fewer than num_workers requests are in flight
        while submitted < len(requests) and dispatcher.pending() < dispatcher.num_workers:
            dispatcher.submit(requests[submitted])
            submitted += 1
        results = dispatcher.wait(timeout=5.0)
        assert results, "wait returned nothing although requests are pending"
        seen += [(r.split, r.trial_id, r.state, r.fitness) for r in results]
        assert dispatcher.pending() == submitted - len(seen)
    assert sorted((s, t) for s, t, _, _ in seen) == sorted((r.split, r.trial_id) for r in requests)
    assert all(state == "complete" for _, _, state, _ in seen)
    counts = dispatcher.worker_counts()  # what `status` shows of the pool
    assert counts["target"] == dispatcher.num_workers and 1 <= counts["live"] <= counts["target"]
    assert counts["live"] + counts["starting"] + counts["restarting"] == counts["target"]
    up = dispatcher.worker_seconds()  # what a busy share is measured against
    assert up > 0 and dispatcher.worker_seconds() >= up
    assert {f for s, t, _, f in seen if t >= 0 and s == "search"} == {1.0}  # the simulated optimum
