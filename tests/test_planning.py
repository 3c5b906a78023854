"""`evomerge run --dry-run` (plans, measured per-trial cost) and `run --resume` (restarted jobs)."""

from __future__ import annotations

import json
import statistics

import pytest

from evomerge.cli import main
from evomerge.ledger import Ledger
from tests.tiny import experiment_file


@pytest.fixture(scope="module")
def pilot(tmp_path_factory, session_tiny_zoo):
    """A short real run: the pilot whose measured trials calibrate a plan."""
    tmp = tmp_path_factory.mktemp("pilot")
    exp = experiment_file(tmp, "pilot", budget={"max_trials": 4})
    run_dir = tmp / "run"
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--quiet"]) == 0
    return exp, run_dir


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, session_tiny_zoo, capsys):
    exp = experiment_file(tmp_path, "plan", budget={"max_trials": 40},
                          optimizer={"name": "cma_es", "popsize": 4, "seed": 0, "islands": 2, "sigma0": 0.2})
    assert main(["run", str(exp), "--dry-run", "--run-dir", str(tmp_path / "never")]) == 0
    out = capsys.readouterr().out
    assert "4 dimensions = 2 merged models x 2 parameters (density, weight) x 1 group" in out
    assert "popsize 4, sigma0 0.2, 2 island(s), ~5 generations each" in out
    assert "40 trials" in out and "roofline: this machine's CPU" in out and "CPU worker-hours  >= " in out
    assert "GPU-hours" not in out and "resident set of each CPU worker" in out  # CPU estimates say CPU
    assert not (tmp_path / "never").exists()


def test_the_memory_estimate_is_within_a_fifth_of_a_workers_measured_peak(tmp_path, session_tiny_zoo):
    """The dry run (a process of its own, as a user runs it) estimates a CPU worker's resident set;
    a run on one Ray worker records its peak with every trial. The dry run is started by a process
    holding 1 GiB (a test session, a notebook): its own peak must not include its parent's."""
    import subprocess
    import sys

    exp = experiment_file(tmp_path, "mem", budget={"max_trials": 4}, dispatch={"backend": "ray", "num_workers": 1})
    ballast = bytearray(b"\x01") * 2**30  # resident in this process when the dry run is forked
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(exp), "--dry-run", "--json"],
                          capture_output=True, text=True, timeout=600)
    del ballast
    assert done.returncode == 0, done.stderr[-2000:]
    memory = json.loads(done.stdout)["memory"]
    assert memory["total"] == memory["weights"] + memory["scoring"] + memory["runtime"]
    run = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(exp), "--run-dir", str(tmp_path / "run"),
                          "--quiet"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = max(t["peak_bytes"] for t in Ledger(tmp_path / "run" / "ledger.jsonl").records("trial"))
    assert 0.8 * peak <= memory["total"] <= 1.2 * peak, (memory, peak)


def test_dry_run_calibrated_by_a_pilot_run(pilot, capsys):
    exp, run_dir = pilot
    trials = [t for t in Ledger(run_dir / "ledger.jsonl").records("trial") if t["state"] == "complete"]
    assert len(trials) == 4
    assert main(["run", str(exp), "--dry-run", "--json", "--calibrate", str(run_dir), "--max-trials", "1000"]) == 0
    plan = json.loads(capsys.readouterr().out)
    cost = plan["cost"]
    assert cost["basis"] == "measured"
    assert cost["merge_seconds"] == pytest.approx(statistics.median(t["merge_seconds"] for t in trials))
    assert cost["eval_seconds"] == pytest.approx(statistics.median(t["eval_seconds"] for t in trials))
    # 1000 trials + 3 source baselines (no test split in this suite)
    assert plan["gpu_hours"] == pytest.approx((1000 * cost["seconds"] + 3 * cost["eval_seconds"]) / 3600)
    assert plan["wall_hours"] == pytest.approx(plan["gpu_hours"] / 0.95)
    assert main(["run", str(exp), "--dry-run", "--trial-seconds", "36", "--json"]) == 0
    given = json.loads(capsys.readouterr().out)
    assert given["cost"]["basis"] == "given" and given["gpu_hours"] == pytest.approx((4 * 36 + 3 * 36) / 3600)


def test_dry_run_bad_options_are_one_clear_line(pilot, tmp_path, capsys):
    exp, run_dir = pilot
    assert main(["run", str(exp), "--dry-run", "--calibrate", str(tmp_path)]) == 2
    assert "--calibrate" in capsys.readouterr().err
    assert main(["run", str(exp), "--calibrate", str(run_dir)]) == 2
    assert "go with --dry-run" in capsys.readouterr().err
    assert main(["run", str(exp), "--dry-run", "--trial-seconds", "0"]) == 2
    assert "--trial-seconds" in capsys.readouterr().err


def test_run_resume_continues_a_restarted_job_in_the_same_run_dir(pilot, tmp_path, capsys):
    exp, first = pilot
    run_dir = tmp_path / "job"
    # first attempt of the job: a fresh run (nothing to resume yet)
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--resume", "--max-trials", "4", "--quiet"]) == 0
    # the job restarted (head failure): same command line, a bigger budget to show it continues
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--resume", "--max-trials", "6", "--quiet"]) == 0
    trials = Ledger(run_dir / "ledger.jsonl").records("trial")
    assert sorted(t["trial_id"] for t in trials) == list(range(6))
    first_trials = Ledger(first / "ledger.jsonl").records("trial")
    assert [t["recipe_hash"] for t in trials[:4]] == [t["recipe_hash"] for t in first_trials]
    # without --resume an existing run dir is refused; with another experiment, --resume refuses too
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--quiet"]) in (1, 2)
    other = experiment_file(tmp_path, "pilot", optimizer={"name": "random", "seed": 1})
    assert main(["run", str(other), "--run-dir", str(run_dir), "--resume", "--quiet"]) == 2
    assert "different experiment" in capsys.readouterr().err
