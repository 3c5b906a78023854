"""Hugging Face Hub sources (hf:org/name), the worker dtype, and DFS workers' device residency.

The Hub is never reached: a Hub cache is laid out on disk exactly as huggingface_hub writes it
(models--org--name/{refs,snapshots}) and the run goes with HF_HUB_OFFLINE=1, in a subprocess
because huggingface_hub reads its cache location once, at import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.ledger import Ledger
from tests.tiny import ROOT, experiment_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub(cache: Path, repo: str, model_dir: Path) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / COMMIT
    shutil.copytree(model_dir, snap)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)


def _run_cli(args: list[str], hub: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_hub_models_run_from_the_cache_and_missing_ones_fail_clearly(tmp_path, session_tiny_zoo):
    hub = tmp_path / "hub"
    for name in ("base", "expert_a", "expert_b"):
        _fake_hub(hub, f"acme/tiny-{name}", session_tiny_zoo.models[name])
    models = [{"name": n, "path": f"hf:acme/tiny-{n}"} for n in ("base", "expert_a", "expert_b")]
    models[1]["path"] += "@main"
    exp = experiment_file(tmp_path, "hub", models=models, budget={"max_trials": 4})
    plan = _run_cli(["run", str(exp), "--dry-run", "--json"], hub, tmp_path)
    assert plan.returncode == 0, plan.stderr
    layers = json.loads((session_tiny_zoo.models["base"] / "config.json").read_text())["num_hidden_layers"]
    assert [m["layers"] for m in json.loads(plan.stdout)["models"]] == [layers] * 3  # config.json from the cache
    run = _run_cli(["run", str(exp), "--run-dir", str(tmp_path / "run"), "--quiet"], hub, tmp_path)
    assert run.returncode == 0, run.stderr
    trials = Ledger(tmp_path / "run" / "ledger.jsonl").records("trial")
    assert len(trials) == 4 and all(t["state"] == "complete" for t in trials)
    # the same search from local directories gives the same fitness, trial by trial
    local = experiment_file(tmp_path, "local", budget={"max_trials": 4})
    assert main(["run", str(local), "--run-dir", str(tmp_path / "local_run"), "--quiet"]) == 0
    again = Ledger(tmp_path / "local_run" / "ledger.jsonl").records("trial")
    assert [t["fitness"] for t in trials] == [t["fitness"] for t in again]

    missing = experiment_file(tmp_path, "missing", models=models[:2] + [{"name": "expert_b", "path": "hf:acme/nope"}])
    out = _run_cli(["run", str(missing), "--run-dir", str(tmp_path / "r2"), "--quiet"], hub, tmp_path)
    assert out.returncode == 2
    assert "hf:acme/nope" in out.stderr and "Traceback" not in out.stderr
    plan = _run_cli(["run", str(missing), "--dry-run"], hub, tmp_path)
    assert plan.returncode == 2 and "config:" in plan.stderr  # says how to plan it without the model


def test_malformed_hub_ids_and_missing_config_files_are_reported_by_field(tmp_path, capsys):
    exp = experiment_file(tmp_path, "bad", models=[
        {"name": "base", "path": "hf:no-slash"},
        {"name": "expert_a", "path": "hf:acme/a", "config": "missing.json"},
        {"name": "expert_b", "path": "hf:acme/b@"},
    ])
    assert main(["validate", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "models.0.path: 'hf:no-slash' is not a Hugging Face model id" in err
    assert "models.1.config: file not found" in err
    assert "models.2.path:" in err


def test_bfloat16_workers_merge_and_score(tmp_path, session_tiny_zoo):
    exp = experiment_file(tmp_path, "bf16", dispatch={"backend": "local", "num_workers": 1, "dtype": "bfloat16"},
                          budget={"max_trials": 4})
    assert main(["run", str(exp), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    trials = Ledger(tmp_path / "run" / "ledger.jsonl").records("trial")
    assert all(t["state"] == "complete" and 0 <= t["fitness"] <= 1 for t in trials), [t["error"] for t in trials]
    assert {t["recipe"]["dtype"] for t in trials} == {"bfloat16"}
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert next(model.parameters()).dtype.is_floating_point
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dfs_workers_keep_only_donors_on_the_device_and_score_other_sources_exactly(tmp_path, session_tiny_zoo):
    """A source that lends no layers waits on the host and visits for its baseline score, which
    equals a PS worker's score of the same source."""
    from evomerge.config import load_experiment
    from evomerge.wiring import resolve_worker_spec
    from evomerge.worker import EvalRequest, TrialWorker

    suite = {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}], "batch_size": 64}
    space = yaml.safe_load((ROOT / "search_spaces" / "dfs.yaml").read_text())
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    dfs = resolve_worker_spec(load_experiment(experiment_file(tmp_path, "dfs", search_space="space.yaml", suite=suite)))
    ps = resolve_worker_spec(load_experiment(experiment_file(tmp_path, "ps", suite=suite)))
    dfs_worker, ps_worker = TrialWorker(dfs), TrialWorker(ps)
    assert dfs_worker._parked == {"base"}  # dfs.yaml: donors expert_a, expert_b; embeddings from expert_b
    assert sum(p.numel() for p in dfs_worker.model.parameters()) < sum(
        p.numel() for p in ps_worker.model.parameters())  # the shell holds no layers
    for source in ("base", "expert_a"):
        a = dfs_worker.run(EvalRequest(trial_id=0, source=source))
        b = ps_worker.run(EvalRequest(trial_id=0, source=source))
        assert a.state == b.state == "complete", (a.error, b.error)
        assert a.scores == pytest.approx(b.scores, abs=1e-6)
    assert next(dfs_worker.dataflow.donors["base"].parameters()).device.type == "cpu"
