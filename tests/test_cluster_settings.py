"""Where a run executes is a run-time setting; whether its controller lives is read from its
heartbeat and lock; worker resources validate in one line each. (The cluster itself failing:
tests/test_cluster_faults.py.)"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import yaml

from evomerge.cli import main
from evomerge.config import DispatchConfig, load_experiment
from evomerge.errors import ConfigError
from evomerge.heartbeat import Heartbeat, STALE_AFTER, liveness
from evomerge.run_dir import RunLock, heartbeat_path
from evomerge.wiring import cluster_address
from tiny import experiment_file


def test_the_cluster_address_comes_from_the_command_then_the_environment_then_the_experiment(tmp_path, monkeypatch):
    exp = load_experiment(experiment_file(tmp_path, "addr", dispatch={"backend": "ray", "address": "10.0.0.1:6379"}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(exp) == ("10.0.0.1:6379", "dispatch.address")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # a Ray Job's own cluster
    assert cluster_address(exp) == ("10.0.0.2:6379", "$RAY_ADDRESS")
    assert cluster_address(exp, "10.0.0.3:6379") == ("10.0.0.3:6379", "--address")
    assert cluster_address(exp, "local") == (None, "--address")
    monkeypatch.delenv("RAY_ADDRESS")
    plain = load_experiment(experiment_file(tmp_path, "plain", dispatch={"backend": "ray"}))
    assert cluster_address(plain) == (None, "no address given")


def test_run_time_settings_are_not_the_experiment_s_identity(tmp_path):
    a = load_experiment(experiment_file(tmp_path, "a", dispatch={"backend": "ray", "num_workers": 2}))
    b = load_experiment(experiment_file(tmp_path, "a", dispatch={
        "backend": "ray", "num_workers": 8, "address": "10.1.2.3:6379", "cpus_per_worker": 4, "max_retries": 5,
        "head_timeout": 90, "ship_sources": "never"}, budget={"max_trials": 99}))
    assert a.identity() == b.identity()
    c = load_experiment(experiment_file(tmp_path, "a", dispatch={"backend": "ray", "dtype": "bfloat16"}))
    assert a.identity() != c.identity()  # the dtype changes the numbers: another experiment
    assert a.with_runtime(b.dispatch).dispatch == b.dispatch.model_copy(update={"dtype": a.dispatch.dtype})


def test_worker_resources_validate_in_one_line_each():
    assert DispatchConfig(device="cuda").worker_gpus == 1.0
    assert DispatchConfig(device="cuda", gpus_per_worker=0.25).worker_gpus == 0.25
    assert DispatchConfig().worker_gpus == 0.0
    for bad, words in (({"gpus_per_worker": 0.5}, "set device: cuda"),
                       ({"device": "cuda", "gpus_per_worker": 0}, "needs a GPU share"),
                       ({"device": "cuda", "gpus_per_worker": 2}, "less than or equal to 1"),
                       ({"cpus_per_worker": 0}, "greater than 0")):
        with pytest.raises(ValueError, match=words):
            DispatchConfig(**bad)


def test_validate_notes_cuda_on_a_machine_without_a_gpu_and_a_local_run_refuses_it(tmp_path, session_tiny_zoo,
                                                                                    capsys):
    """An experiment for a GPU cluster validates on a laptop (it is submitted from there), with a
    note; run here, it stops at start-up in one line."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    exp = experiment_file(tmp_path, "cuda", dispatch={"backend": "ray", "device": "cuda", "num_workers": 1})
    assert main(["validate", str(exp)]) == 0
    assert ("note: dispatch.device is cuda, but this machine has no GPU that torch can use: run it on a GPU cluster"
            in capsys.readouterr().err)
    assert main(["run", str(exp), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    assert ("dispatch: each worker asks for 1 GPU (device cuda), but this machine's Ray instance has no GPU"
            in capsys.readouterr().err)


def test_status_tells_a_live_controller_from_a_gone_one(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    info = {"host": socket.gethostname(), "pid": 1}
    assert liveness(run, info) == (False, f"its controller (pid 1 on {socket.gethostname()}) is gone")
    lock = RunLock(run)
    lock.acquire()
    beat = Heartbeat(run, interval=0.05).start()
    beat.watch(lambda: {"target": 2, "live": 1, "starting": 1, "restarting": 0})
    time.sleep(0.2)
    assert liveness(run, info) == (True, "")
    assert json.loads(heartbeat_path(run).read_text())["workers"]["live"] == 1
    beat.stop()
    lock.release()
    assert liveness(run, info)[0] is False  # on its own host, the lock decides: the process is gone

    # on another host (locks there are not ours to see) the heartbeat decides
    for age, alive in ((1.0, True), (STALE_AFTER + 5, False)):
        heartbeat_path(run).write_text(json.dumps({"at": time.time() - age, "host": "gpu-node-7", "pid": 42}))
        ok, why = liveness(run, info)
        assert ok is alive
        if not alive:
            assert why.startswith("its controller (pid 42 on gpu-node-7) is gone: no heartbeat for 3")


def test_a_run_resumes_with_other_run_time_settings_but_not_as_another_experiment(tmp_path, session_tiny_zoo):
    exp = experiment_file(tmp_path, "rt", budget={"max_trials": 4})
    run_dir = tmp_path / "run"
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--quiet"]) == 0
    data = yaml.safe_load(exp.read_text())
    data["dispatch"] = {"backend": "local", "num_workers": 1, "address": "10.9.9.9:6379", "max_retries": 4}
    data["budget"] = {"max_trials": 6}
    exp.write_text(yaml.safe_dump(data))
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--resume", "--quiet"]) == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["resumed"] == 1
    stored = yaml.safe_load((run_dir / "experiment.yaml").read_text())
    assert stored["dispatch"]["max_retries"] == 4 and stored["budget"]["max_trials"] == 6
    data["optimizer"] = {**data["optimizer"], "seed": 7}
    exp.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="holds a run of a different experiment"):
        main(["--debug", "run", str(exp), "--run-dir", str(run_dir), "--resume", "--quiet"])
