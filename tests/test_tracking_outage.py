"""Tracking never blocks the search (issue 19).

With MLflow unreachable from the start (a closed port), or a real `mlflow server` killed in the
middle of a run, a small search on the tiny zoo takes as long as the same search without
tracking: within 20 %, plus a few seconds of absolute slack. The slack is there because these
runs are short (10-20 s, mostly fixed start-up costs) and a tracked run also pays for importing
mlflow (2-3 s) and for talking to the live server until it dies; Python start-up on a shared
2-core machine varies by a second or two as well. Before, MLflow's HTTP retries (7, with
exponential backoff: ~4 minutes per call) stalled the controller, far past any such limit. The
ledger has every trial either way, and `evomerge sync` uploads what MLflow missed once a server
is back.

Real MLflow throughout (a `mlflow server` on 127.0.0.1 with a sqlite store), real CLI runs in
subprocesses (so a stall is cut off at the time limit instead of hanging the suite), MLflow's
own HTTP defaults (no MLFLOW_HTTP_REQUEST_* in the environment).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.ledger import Ledger
from netutil import free_port, get_json
from tiny import experiment_file

ROOT = Path(__file__).resolve().parents[1]
SUITE = {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}], "batch_size": 64}
TRIALS = 16
RATIO, SLACK_S = 1.2, 8.0  # allowed: RATIO x the untracked run's wall time + SLACK_S (see above)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # MLflow's defaults
    return {**env, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


class _Server:
    """A real `mlflow server` (one worker, no job runner) in its own process group, so that
    ``kill`` takes the uvicorn child down too."""

    def __init__(self, port: int, store: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{store / 'server.db'}", "--default-artifact-root",
             str(store / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"mlflow server exited with {self.proc.returncode}"
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2):
                    return
            except OSError:
                assert time.monotonic() < deadline, f"{self.base} did not answer"
                time.sleep(0.3)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def _run(exp: Path, run_dir: Path, limit_s: float, during=None) -> float:
    """`evomerge run` in a subprocess; its wall time. Stopped (and failed) at ``limit_s``.
    ``during(proc)``: called while it runs."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", str(exp), "--run-dir", str(run_dir),
                             "--quiet", "--json"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        if during is not None:
            during(proc)
        out, err = proc.communicate(timeout=max(1.0, limit_s - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{exp.stem}: still running after {limit_s:.1f} s (the limit: {RATIO} x the untracked "
                    f"run's wall time + {SLACK_S:g} s)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, err
    assert json.loads(out)["trials"] == TRIALS
    return wall


def _trial_history(base: str, run_id: str, key: str = "fitness") -> list[float]:
    hist = get_json(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}").get("metrics", [])
    return [m["value"] for m in sorted(hist, key=lambda m: m["step"])]


def test_an_unreachable_or_dying_mlflow_server_does_not_slow_the_search(tmp_path, session_tiny_zoo, capsys):
    def exp(name: str, **tracking) -> Path:
        return experiment_file(tmp_path, name, suite=SUITE, budget={"max_trials": TRIALS},
                               tracking=tracking or {"backend": "none"})

    port = free_port()
    server = _Server(port, tmp_path)  # up before the timed runs: it idles while they run
    walls: dict[str, float] = {}
    try:
        walls["none"] = _run(exp("untracked"), tmp_path / "untracked", limit_s=600)
        limit = RATIO * walls["none"] + SLACK_S

        # (a) nothing listens at the tracking URI: one quick failed try at start, then the search goes on
        closed = f"http://127.0.0.1:{free_port()}"
        walls["closed port"] = _run(exp("closed", backend="mlflow", tracking_uri=closed), tmp_path / "closed", limit)

        # (b) a live server, killed (with its uvicorn child) as soon as the ledger holds two trials
        killed_at: list[int] = []

        def kill_mid_run(proc: subprocess.Popen) -> None:
            ledger = tmp_path / "killed" / "ledger.jsonl"
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline and proc.poll() is None:
                if ledger.exists() and len(done := Ledger(ledger).records("trial")) >= 2:
                    server.kill()
                    killed_at.append(len(done))
                    return
                time.sleep(0.05)

        walls["killed server"] = _run(exp("killed", backend="mlflow", tracking_uri=server.base),
                                      tmp_path / "killed", limit, during=kill_mid_run)
        assert killed_at and killed_at[0] < TRIALS, "the server was not killed in the middle of the run"
    finally:
        server.kill()
        with capsys.disabled():
            print("\nwall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items())
                  + (f" (limit {limit:.1f} s)" if "none" in walls else ""))
    for name, wall in walls.items():
        assert wall <= limit, f"{name}: {wall:.1f} s, untracked {walls['none']:.1f} s (limit {limit:.1f} s)"

    # the ledger has every trial; run.json says why MLflow lacks some
    for name in ("closed", "killed"):
        assert len(Ledger(tmp_path / name / "ledger.jsonl").records("trial")) == TRIALS
        info = json.loads((tmp_path / name / "run.json").read_text())
        assert info["status"] == "finished" and info["tracking_error"], info
    assert json.loads((tmp_path / "closed" / "run.json").read_text())["tracking_error"].startswith("start:")
    killed_info = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert killed_info["mlflow_run_id"]  # the run was made before the server died

    # the server is back (same store, same port): sync uploads what it missed, and only that
    server = _Server(port, tmp_path)
    try:
        logged = len(_trial_history(server.base, killed_info["mlflow_run_id"], "trial_id"))
        assert logged < TRIALS  # what reached MLflow before the kill: a prefix of the trials
        capsys.readouterr()
        assert main(["sync", str(tmp_path / "killed"), "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["mlflow_run_id"] == killed_info["mlflow_run_id"]
        assert res["trials_uploaded"] == TRIALS - logged
        with capsys.disabled():
            print(f"killed server: {killed_at[0]} trials in the ledger at the kill, {logged} in MLflow; "
                  f"sync uploaded {res['trials_uploaded']}")
        # the run that never reached MLflow: sync creates its MLflow run with every trial
        assert main(["sync", str(tmp_path / "closed"), "--tracking-uri", server.base, "--json"]) == 0
        closed_res = json.loads(capsys.readouterr().out)
        assert closed_res["trials_uploaded"] == TRIALS
        for name, res in (("killed", res), ("closed", closed_res)):
            trials = Ledger(tmp_path / name / "ledger.jsonl").records("trial")
            assert _trial_history(server.base, res["mlflow_run_id"]) == pytest.approx([t["fitness"] for t in trials])
            run = get_json(f"{server.base}/api/2.0/mlflow/runs/get?run_id={res['mlflow_run_id']}")["run"]
            assert run["info"]["status"] == "FINISHED"
            assert "tracking_error" not in json.loads((tmp_path / name / "run.json").read_text())
    finally:
        server.kill()
