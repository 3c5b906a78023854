"""Faults and resume with real Ray, real merges, real lm-eval on the tiny zoo.

- workers that raise, return NaN, hang past the timeout, or die (once / every time);
- the controller killed with SIGKILL mid-run, then `evomerge resume`;
- the same seed gives the same trials as a fault-free in-process run where the design allows.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.run_dir import read_info
from evomerge.cli import main
from evomerge.config import load_experiment
from evomerge.search import Controller
from evomerge.run_dir import RunLock
from evomerge.errors import EvomergeError
from evomerge.ledger import Ledger
from evomerge.testing import FaultInjectingWorker
from evomerge.tracking.mlflow_tracker import read_run
from tiny import experiment_file



def _experiment(tmp_path: Path, name: str, **overrides) -> Path:
    defaults = {"optimizer": {"name": "cma_es", "popsize": 4, "seed": 3, "islands": 1},
                "dispatch": {"backend": "ray", "num_workers": 2}}
    return experiment_file(tmp_path, name, **{**defaults, **overrides})


def _by_key(run_dir: Path) -> dict:
    return {(t["island"], t["generation"], t["member"]): t for t in Ledger(run_dir / "ledger.jsonl").records("trial")}


def _reference(tmp_path: Path, max_trials: int, islands: int) -> dict:
    """A fault-free, in-process run of the same experiment and seed."""
    exp = _experiment(tmp_path, f"ref{max_trials}", dispatch={"backend": "local", "num_workers": 1},
                      budget={"max_trials": max_trials},
                      optimizer={"name": "cma_es", "popsize": 4, "seed": 3, "islands": islands})
    run_dir = tmp_path / f"ref{max_trials}"
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--quiet"]) == 0
    return _by_key(run_dir)


def test_worker_faults_are_retried_or_failed_and_the_search_goes_on(tmp_path, session_tiny_zoo, ray_session):
    # generation 0 (trials 0-3): faults the design recovers from exactly; generation 1 (4-7): failures
    faults = {0: "die_once", 1: "slow:2", 4: "raise", 5: "nan", 6: "die", 7: "hang"}
    exp = load_experiment(_experiment(tmp_path, "faults",
                                      dispatch={"backend": "ray", "num_workers": 2, "max_retries": 1,
                                                "trial_timeout": 20}))
    factory = functools.partial(FaultInjectingWorker, faults=faults, marker_dir=str(tmp_path))
    summary = Controller(exp, tmp_path / "faults", worker_factory=factory).run()
    assert summary.trials == 8 and summary.failed == 4

    trials = {t["trial_id"]: t for t in Ledger(tmp_path / "faults" / "ledger.jsonl").records("trial")}
    assert trials[0]["state"] == "complete" and trials[0]["attempts"] == 2  # died once, retried on a new worker
    assert trials[1]["state"] == "complete" and trials[1]["attempts"] == 1
    assert "RuntimeError: injected failure in trial 4" in trials[4]["error"]
    assert "fitness is not finite" in trials[5]["error"]
    assert "worker died 2 times" in trials[6]["error"] and trials[6]["attempts"] == 2
    assert "timed out after 20 s" in trials[7]["error"]
    assert all(trials[i]["state"] == "failed" for i in (4, 5, 6, 7))

    # failures are told with the one penalty (below the island's worst success)
    tells = Ledger(tmp_path / "faults" / "ledger.jsonl").records("tell")
    assert [t["generation"] for t in tells] == [0, 1]
    worst = min(trials[i]["fitness"] for i in range(4))
    assert tells[1]["values"] == pytest.approx([worst - 1.0] * 4)

    # the recovered generation equals a fault-free run's; so does the next one's genomes
    ref = _reference(tmp_path, 8, 1)
    got = _by_key(tmp_path / "faults")
    for key, t in got.items():
        assert t["genome"] == ref[key]["genome"]
        if key[1] == 0:
            assert t["fitness"] == pytest.approx(ref[key]["fitness"], abs=1e-9)


def test_a_slow_replacement_worker_start_does_not_count_against_the_trial_timeout(tmp_path, session_tiny_zoo,
                                                                                 ray_session):
    """A worker dies; its replacement takes longer to start than dispatch.trial_timeout allows a
    trial to run. The retried trial waits for the new worker and completes: the timeout measures
    the trial, not the start-up (imports, loading the sources)."""
    exp = load_experiment(_experiment(tmp_path, "slowstart", budget={"max_trials": 4},
                                      dispatch={"backend": "ray", "num_workers": 2, "max_retries": 1,
                                                "trial_timeout": 5}))
    factory = functools.partial(FaultInjectingWorker, faults={0: "die_once"}, marker_dir=str(tmp_path),
                                start_delay=8.0)
    summary = Controller(exp, tmp_path / "slowstart", worker_factory=factory).run()
    assert summary.trials == 4 and summary.failed == 0
    trial0 = next(t for t in Ledger(tmp_path / "slowstart" / "ledger.jsonl").records("trial") if t["trial_id"] == 0)
    assert trial0["state"] == "complete" and trial0["attempts"] == 2


def _wait_for_trials(ledger: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if ledger.exists() and sum('"kind": "trial"' in line for line in ledger.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not get going in time")


def test_sigkill_the_controller_then_resume(tmp_path, session_tiny_zoo, ray_session):
    """kill -9 mid-run → `evomerge resume`: same MLflow run, nothing evaluated twice, same trials as a clean run."""
    address = ray_session.get_runtime_context().gcs_address
    exp = _experiment(tmp_path, "killme", budget={"max_trials": 16},
                      optimizer={"name": "cma_es", "popsize": 4, "seed": 3, "islands": 2},
                      dispatch={"backend": "ray", "num_workers": 2, "address": address},
                      tracking={"backend": "mlflow"})
    run_dir = tmp_path / "killme"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", str(exp), "--run-dir", str(run_dir),
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ledger_path = run_dir / "ledger.jsonl"
    _wait_for_trials(ledger_path, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()

    before = Ledger(ledger_path)
    done_before = {t["trial_id"] for t in before.records("trial")}
    dispatched_before = {d["trial_id"] for d in before.records("dispatch")}
    assert 6 <= len(done_before) < 16
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "running"  # it never got to say otherwise
    assert not RunLock.is_held(run_dir)  # the lock died with the process
    with open(ledger_path, "a") as f:  # and it died in the middle of a write
        f.write('{"kind": "trial", "trial_id": 99, "sta')

    assert main(["resume", str(run_dir), "--quiet"]) == 0

    led = Ledger(ledger_path)
    trials = led.records("trial")
    ids = [t["trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == 16  # every trial exactly once: none evaluated twice, none lost
    assert set(ids) == set(range(16))  # in-flight trials kept their ids
    redispatched = [d["trial_id"] for d in led.records("dispatch")]
    assert sorted(set(redispatched)) == list(range(16))
    twice = {i for i in redispatched if redispatched.count(i) > 1}
    assert twice <= dispatched_before - done_before  # only what was in flight at the kill ran again
    assert len([b for b in led.records("baseline")]) == 3

    # same trials as a clean run with the same seed
    ref = _reference(tmp_path, 16, 2)
    got = _by_key(run_dir)
    assert got.keys() == ref.keys()
    for key in got:
        assert got[key]["genome"] == ref[key]["genome"]
        assert got[key]["fitness"] == pytest.approx(ref[key]["fitness"], abs=1e-9)

    # the same MLflow run, reopened, now holds every trial once
    info = read_info(run_dir)
    assert info["status"] == "finished" and info["resumed"] == 1 and info["mlflow_run_id"]
    mlrun = read_run(info["tracking_uri"], info["mlflow_run_id"])
    assert mlrun["status"] == "FINISHED"
    assert sorted(s for s, _ in mlrun["history"]["trial_id"]) == list(range(16))
    assert sorted(v for _, v in mlrun["history"]["trial_id"]) == list(range(16))

    # resume again with a larger budget: the islands continue where they stopped
    assert main(["resume", str(run_dir), "--quiet", "--max-trials", "20"]) == 0
    got = _by_key(run_dir)
    assert len(got) == 20
    ref20 = _reference(tmp_path, 20, 2)
    for key in got:
        assert got[key]["genome"] == ref20[key]["genome"]
    assert main(["resume", str(run_dir), "--quiet", "--max-trials", "10"]) == 2


def test_a_run_in_use_cannot_be_resumed(tmp_path, session_tiny_zoo, capsys):
    exp = _experiment(tmp_path, "locked", dispatch={"backend": "local", "num_workers": 1},
                      budget={"max_trials": 2})
    run_dir = tmp_path / "locked"
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--quiet"]) == 0
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        with pytest.raises(EvomergeError, match="in use by pid"):
            Controller.for_resume(run_dir).resume()
    finally:
        lock.release()
    assert main(["resume", str(tmp_path / "nope")]) == 1
    assert "not an evomerge run directory" in capsys.readouterr().err
    # resuming a finished run is harmless: nothing is evaluated again
    n = len(Ledger(run_dir / "ledger.jsonl").records())
    assert main(["resume", str(run_dir), "--quiet"]) == 0
    assert len(Ledger(run_dir / "ledger.jsonl").records()) == n


def test_a_broken_tracking_store_does_not_stop_the_search(tmp_path, session_tiny_zoo):
    """MLflow cannot open its store: the search runs on, the ledger has everything, run.json says why."""
    from evomerge.testing import VirtualDispatcher

    broken = tmp_path / "not-a-dir"
    broken.write_text("a file where the store's directory should be")
    exp = load_experiment(_experiment(tmp_path, "notrack", budget={"max_trials": 8},
                                      tracking={"backend": "mlflow", "tracking_uri": f"sqlite:///{broken}/m.db"}))
    messages = []

    class Progress:
        def start(self, total, done=0): pass
        def advance(self, best, failed): pass
        def message(self, text): messages.append(text)
        def close(self): pass

    summary = Controller(exp, tmp_path / "notrack", progress=Progress(),
                         dispatcher_factory=lambda e, spec: VirtualDispatcher(2)).run()
    assert summary.trials == 8 and summary.best_fitness is not None
    assert len(Ledger(tmp_path / "notrack" / "ledger.jsonl").records("trial")) == 8
    info = json.loads((tmp_path / "notrack" / "run.json").read_text())
    assert info["status"] == "finished" and info["tracking_error"].startswith("start:")
    assert sum("tracking is off" in m for m in messages) == 1  # reported once, not per trial


def test_a_run_whose_every_trial_failed_is_a_failed_command(tmp_path, session_tiny_zoo, capsys):
    """Every trial failing exits 1 with the commonest reasons and points at no recipe file; a run
    with some failures says how many failed and why, and exits 0."""
    from evomerge.cli import _finish

    exp = load_experiment(_experiment(tmp_path, "allfail", budget={"max_trials": 4},
                                      dispatch={"backend": "local", "num_workers": 1}))
    factory = functools.partial(FaultInjectingWorker, faults={i: "raise" for i in range(4)},
                                marker_dir=str(tmp_path))
    summary = Controller(exp, tmp_path / "allfail", worker_factory=factory).run()
    assert summary.all_failed and summary.best_fitness is None
    assert summary.failure_reasons and summary.failure_reasons[0][1] >= 1
    assert all("injected failure" in reason for reason, _ in summary.failure_reasons)
    capsys.readouterr()
    assert _finish(summary, as_json=False) == 1
    out, err = capsys.readouterr()
    assert "best recipe               none (no trial completed)" in out
    assert not (tmp_path / "allfail" / "best_recipe.yaml").exists()
    assert "error: every trial failed (4 of 4)" in err and "injected failure in trial" in err
    assert "take it home" not in out

    some = Controller(load_experiment(_experiment(tmp_path, "somefail", budget={"max_trials": 4},
                                                  dispatch={"backend": "local", "num_workers": 1})),
                      tmp_path / "somefail",
                      worker_factory=functools.partial(FaultInjectingWorker, faults={1: "nan", 2: "nan"},
                                                       marker_dir=str(tmp_path))).run()
    assert some.failed == 2 and not some.all_failed
    assert _finish(some, as_json=False) == 0
    out = capsys.readouterr().out
    assert "failed x2" in out and "fitness is not finite" in out
    assert str(tmp_path / "somefail" / "best_recipe.yaml") in out
