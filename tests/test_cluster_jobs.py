"""`evomerge submit / status / logs / stop` against a real `ray start --head` on 127.0.0.1.

The head runs with token authentication on (Ray 2.60's default for a head that has a token);
the token is a temp file named by RAY_AUTH_TOKEN_PATH, so neither the head nor evomerge uses the user's ~/.ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A private single-node Ray cluster, Jobs API and token authentication on; stopped (only it) at the end.

    RAY_AUTH_TOKEN_PATH names the token for the head and, while the module runs, for this process.
    """
    import requests

    temp_dir = tempfile.mkdtemp(prefix="emh", dir="/tmp")  # short: Ray's socket paths have a length limit
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    dash = _free_port()
    bin_dir = str(Path(sys.executable).parent)
    cmd = [os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={_free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=2", "--include-dashboard=true",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    # RAY_AUTH_MODE unset: Ray's default, which turns authentication on because the head has a token
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update({"RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")})
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    authorized = {"Authorization": f"Bearer {token_file.read_text()}"}
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{address}/api/jobs/", headers=authorized, timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the Ray head did not start")
        time.sleep(0.25)
    assert requests.get(f"{address}/api/jobs/", timeout=5).status_code == 401  # authentication is on
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_TOKEN", raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
        yield address
    proc.send_signal(signal.SIGTERM)  # the --block process stops its own cluster (and only it)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _experiment(tmp_path: Path, max_trials: int) -> Path:
    data = {
        "name": "cluster",
        "zoo": {"kind": "tiny", "seed": 0},
        "models": [{"name": n, "path": f"zoo:{n}"} for n in ("base", "expert_a", "expert_b")],
        "base_model": "base",
        "search_space": str(ROOT / "search_spaces" / "ps_ties_dare.yaml"),
        "suite": {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}],
                  "test_tasks": [{"name": "zoo_arith_l2_test"}], "batch_size": 64},
        "optimizer": {"popsize": 4, "seed": 0},
        "budget": {"max_trials": max_trials},
        "dispatch": {"backend": "ray", "num_workers": 2, "address": "http://stale.example:8265"},
        "tracking": {"backend": "mlflow"},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _wait_for(address: str, job_id: str, statuses: set[str], timeout: float = 300) -> dict:
    from evomerge.dispatch.ray_jobs import job_info

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(address, job_id)
        if info["status"] in statuses:
            return info
        if info["terminal"]:
            raise AssertionError(f"job ended {info['status']}: {info['message'][-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {statuses}")


def test_submit_status_logs_stop_on_a_real_cluster(tmp_path, session_tiny_zoo, ray_head, capsys):
    cache = os.environ["EVOMERGE_CACHE"]
    run_dir = tmp_path / "on-cluster"
    exp = _experiment(tmp_path, 6)
    assert main(["submit", "--address", ray_head, str(exp), "--run-dir", str(run_dir),
                 "--env", f"EVOMERGE_CACHE={cache}", "--python", sys.executable, "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["job_id"].startswith("evomerge-cluster-") and job["run_dir"] == str(run_dir)

    info = _wait_for(ray_head, job["job_id"], {"SUCCEEDED"})
    assert info["run_dir"] == str(run_dir)
    trials = Ledger(run_dir / "ledger.jsonl").records("trial")
    assert len(trials) == 6 and all(t["state"] == "complete" for t in trials)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"

    assert main(["status", job["job_id"], "--address", ray_head]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and str(run_dir) in out
    assert main(["logs", job["job_id"], "--address", ray_head]) == 0
    logs = capsys.readouterr().out
    assert "search: 6/6 trials" in logs and "best fitness (search)" in logs
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished" and status["trials_done"] == 6 and status["best_fitness"] is not None

    # a long job, stopped: the controller is told (SIGTERM), the run is marked and can be resumed
    long_dir = tmp_path / "stopped"
    assert main(["submit", "--address", ray_head, str(_experiment(tmp_path, 400)), "--run-dir", str(long_dir),
                 "--env", f"EVOMERGE_CACHE={cache}", "--python", sys.executable]) == 0
    long_id = capsys.readouterr().out.strip().splitlines()[0]
    deadline = time.monotonic() + 300
    while not ((long_dir / "ledger.jsonl").exists() and Ledger(long_dir / "ledger.jsonl").records("trial")):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert main(["stop", long_id, "--address", ray_head]) == 0
    _wait_for(ray_head, long_id, {"STOPPED"})
    deadline = time.monotonic() + 30
    while json.loads((long_dir / "run.json").read_text())["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert main(["status", str(long_dir)]) == 0
    assert "evomerge resume" in capsys.readouterr().out  # killed or interrupted: either way, resumable

    # clear errors
    assert main(["status", "no-such-job", "--address", ray_head]) == 1
    assert "no job 'no-such-job'" in capsys.readouterr().err
    assert main(["status", "x", "--address", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err


def test_a_missing_or_wrong_token_is_one_clear_line(tmp_path, session_tiny_zoo, ray_head, monkeypatch, capsys):
    home = tmp_path / "home"  # no ~/.ray/auth_token here
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert main(["submit", "--address", ray_head, str(_experiment(tmp_path, 2)), "--python", sys.executable]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Note: RAY_AUTH_MODE" not in err
    assert (f"error: the Ray cluster at {ray_head} requires an auth token and none was found in $RAY_AUTH_TOKEN, "
            f"$RAY_AUTH_TOKEN_PATH or {home / '.ray' / 'auth_token'}: copy the head's ~/.ray/auth_token") in err
    assert "or set RAY_AUTH_TOKEN" in err

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-this-clusters-token")
    assert main(["status", "some-job", "--address", ray_head]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"the Ray cluster at {ray_head} rejected the auth token from $RAY_AUTH_TOKEN" in err
    assert "ray get-auth-token` on the head prints it" in err

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    assert main(["logs", "some-job", "--address", ray_head]) == 1
    assert f"$RAY_AUTH_TOKEN_PATH names {tmp_path / 'absent'}, which is missing or empty" in capsys.readouterr().err


def test_the_token_is_found_where_ray_keeps_it(tmp_path, monkeypatch):
    from evomerge.dispatch.ray_jobs import auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert auth_token()[0] is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "named").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "named"))
    assert auth_token() == ("from-path", str(tmp_path / "named"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", " from-env ")
    assert auth_token() == ("from-env", "$RAY_AUTH_TOKEN")
