"""The MLflow side of a run (plots, per-trial recipe curves, model registry, `evomerge ui`,
`evomerge sync` to a real `mlflow server` after an outage) and the exported model card.

Real MLflow throughout: a sqlite store in the run dir, `mlflow ui` and `mlflow server`
processes on 127.0.0.1, checked through their REST API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from evomerge.run_dir import read_info
from evomerge.cli import main
from evomerge.ledger import Ledger
from netutil import free_port, get_json
from tiny import experiment_file

SUITE = {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search"}],
         "test_tasks": [{"name": "zoo_arith_l2_test"}], "batch_size": 64}
SVG = "{http://www.w3.org/2000/svg}"


def _wait_http(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, session_tiny_zoo):
    tmp = tmp_path_factory.mktemp("tracked")
    exp = experiment_file(tmp, "tracked", suite=SUITE, budget={"max_trials": 6},
                          tracking={"backend": "mlflow"})
    run_dir = tmp / "run"
    assert main(["run", str(exp), "--run-dir", str(run_dir), "--quiet"]) == 0
    return run_dir


def test_plots_and_recipe_curves_are_logged(tracked_run):
    from evomerge.tracking.mlflow_tracker import read_run

    info = read_info(tracked_run)
    run = read_run(info["tracking_uri"], info["mlflow_run_id"])
    assert {"fitness.svg", "coefficients.svg", "ledger.jsonl", "best_recipe.yaml", "experiment.yaml",
            "experiment.source.yaml"} <= set(run["artifacts"])
    tags = run["tags"]
    assert tags["evomerge.experiment"] == "tracked" and tags["evomerge.run_dir"] == str(tracked_run.resolve())
    trials = Ledger(tracked_run / "ledger.jsonl").records("trial")
    # every trial's recipe coefficients are curves (2 experts x density, weight)
    for name in ("param.expert_a.density", "param.expert_a.weight", "param.expert_b.density", "param.expert_b.weight"):
        assert [v for _, v in run["history"][name]] == pytest.approx(
            [t["recipe"]["models"][int(name.split(".")[1][-1] == "b")]["parameters"][name.split(".")[2]]
             for t in trials])
    fitness = ET.parse(tracked_run / "plots" / "fitness.svg").getroot()
    assert len(fitness.findall(f"{SVG}circle")) == sum(t["state"] == "complete" for t in trials)
    assert fitness.findall(f"{SVG}polyline")  # the best-so-far line
    heat = ET.parse(tracked_run / "plots" / "coefficients.svg").getroot()
    assert len(heat.findall(f"{SVG}rect")) == 1 + 4  # background + (2 models x 2 parameters) x 1 group
    assert info["mlflow_experiment_id"]
    # a sqlite store keeps its artifacts next to it, in the run dir (not ./mlruns of the caller)
    assert list((tracked_run / "mlartifacts").rglob("fitness.svg"))


def test_hf_export_has_a_model_card_and_registers_in_mlflow(tracked_run, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(tracked_run), "--format", "hf", "--out", str(out), "--register", "zoo-merge",
                 "--json"]) == 0
    card = (out / "README.md").read_text()
    best = min((t for t in Ledger(tracked_run / "ledger.jsonl").records("trial") if t["state"] == "complete"),
               key=lambda t: (-t["fitness"], t["finished_at"]))
    assert card.startswith("---\nlibrary_name: transformers")
    for text in ("| base |", "| expert_a |", "| expert_b |", f"{best['fitness']:.4f}", best["recipe_hash"],
                 "zoo_arith_l2_test", "MLflow:", "```yaml"):
        assert text in card, text
    test = {r["model"]: r for r in Ledger(tracked_run / "ledger.jsonl").records("test")}
    assert f"{test['best']['fitness']:.4f}" in card and f"{test['expert_a']['fitness']:.4f}" in card
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "evomerge_recipe.yaml"} <= {p.name for p in out.iterdir()}
    # the exported model is the search-time candidate: same logits as the worker's merged model
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.run_dir import load_run_experiment
    from evomerge.wiring import resolve_worker_spec
    from evomerge.recipe import recipe_from_dict
    from evomerge.worker import TrialWorker

    worker = TrialWorker(resolve_worker_spec(load_run_experiment(tracked_run)))
    worker.sources.merge_into(recipe_from_dict(best["recipe"]), worker.target)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, worker.model(ids).logits)

    from mlflow.tracking import MlflowClient

    info = read_info(tracked_run)
    versions = MlflowClient(info["tracking_uri"]).search_model_versions("name='zoo-merge'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == info["mlflow_run_id"]
    assert main(["export", str(tracked_run), "--format", "recipe", "--out", str(tmp_path / "r"),
                 "--register", "x"]) == 2


def test_evomerge_ui_serves_the_run(tracked_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "ui", str(tracked_run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        url = proc.stdout.readline().strip()
        info = json.loads((tracked_run / "run.json").read_text())
        # the run's page in the model-training view (MLflow 3 opens in its GenAI view otherwise)
        assert url == (f"http://127.0.0.1:{port}/#/experiments/{info['mlflow_experiment_id']}"
                       f"/runs/{info['mlflow_run_id']}?workflowType=machine_learning")
        experiment = get_json(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get?"
                          f"experiment_id={info['mlflow_experiment_id']}")["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
        run = get_json(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={info['mlflow_run_id']}")["run"]
        assert run["info"]["status"] == "FINISHED"
        assert any(m["key"] == "best_fitness" for m in run["data"]["metrics"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert b"<html" in resp.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_run_goes_on_while_mlflow_is_down_and_sync_uploads_it_later(tmp_path, session_tiny_zoo):
    dead = f"http://127.0.0.1:{free_port()}"
    exp = experiment_file(tmp_path, "outage", suite=SUITE, budget={"max_trials": 5},
                          tracking={"backend": "mlflow", "tracking_uri": dead})
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP")},  # evomerge's own timeouts
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(exp), "--run-dir", str(run_dir),
                           "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(Ledger(run_dir / "ledger.jsonl").records("trial")) == 5
    assert json.loads((run_dir / "run.json").read_text()).get("tracking_error")

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/health", server)
        out = subprocess.run([sys.executable, "-m", "evomerge.cli", "sync", str(run_dir), "--tracking-uri", base,
                              "--json"], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["trials_uploaded"] == 5 and res["status"] == "finished"
        history = get_json(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={res['mlflow_run_id']}&metric_key=fitness")
        trials = Ledger(run_dir / "ledger.jsonl").records("trial")
        assert [m["value"] for m in sorted(history["metrics"], key=lambda m: m["step"])] == pytest.approx(
            [t["fitness"] for t in trials])
        run = get_json(f"{base}/api/2.0/mlflow/runs/get?run_id={res['mlflow_run_id']}")["run"]
        assert run["info"]["status"] == "FINISHED"
        arts = get_json(f"{base}/api/2.0/mlflow/artifacts/list?run_id={res['mlflow_run_id']}")
        assert {"ledger.jsonl", "fitness.svg", "experiment.yaml"} <= {f["path"] for f in arts.get("files", [])}
        # a second sync uploads nothing twice
        again = subprocess.run([sys.executable, "-m", "evomerge.cli", "sync", str(run_dir), "--json"], env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["trials_uploaded"] == 0
        assert "tracking_error" not in json.loads((run_dir / "run.json").read_text())
        # and a run that logs to the live server directly, through MLFLOW_TRACKING_URI
        live = experiment_file(tmp_path, "live", suite=SUITE, budget={"max_trials": 3}, tracking={"backend": "mlflow"})
        direct = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(live), "--run-dir",
                                 str(tmp_path / "live_run"), "--quiet", "--json"],
                                env={**env, "MLFLOW_TRACKING_URI": base}, capture_output=True, text=True, timeout=600)
        assert direct.returncode == 0, direct.stderr
        summary = json.loads(direct.stdout)
        assert summary["tracking_uri"] == base
        history = get_json(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={summary['mlflow_run_id']}"
                       "&metric_key=best_fitness")
        assert len(history["metrics"]) == 3
        run = get_json(f"{base}/api/2.0/mlflow/runs/get?run_id={summary['mlflow_run_id']}")["run"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["evomerge.experiment"] == "live" and tags["evomerge.seed"] == "0"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_json_output_for_scripts(tmp_path, session_tiny_zoo, capsys):
    exp = experiment_file(tmp_path, "js", suite=SUITE, budget={"max_trials": 3})
    assert main(["validate", str(exp), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "experiment": str(exp), "problems": [], "notes": [],
                                                        "sources": {n: "llama: PS: yes · DFS: yes"
                                                                    for n in ("base", "expert_a", "expert_b")},
                                                        "name": "js"}
    bad = experiment_file(tmp_path, "bad", suite={**SUITE, "tasks": [{"name": "nope"}]})
    assert main(["validate", str(bad), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["problems"][0].startswith("suite.tasks.0.name")
    assert main(["run", str(exp), "--run-dir", str(tmp_path / "run"), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 3 and summary["best_fitness"] is not None
    assert main(["export", str(tmp_path / "run"), "--format", "mergekit", "--out", str(tmp_path / "mk"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(tmp_path / "mk" / "mergekit.yaml"),
                                                   "format": "mergekit"}


def test_a_recipe_export_merges_as_it_is(tracked_run, tmp_path, capsys):
    """`export --format recipe` then `merge out/recipe.yaml --out DIR`: the experiment written
    beside the recipe names the sources, no --experiment needed; the model equals the hf export."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["export", str(tracked_run), "--format", "recipe", "--out", str(out)]) == 0
    assert {"recipe.yaml", "experiment.yaml"} <= {p.name for p in out.iterdir()}
    assert main(["merge", str(out / "recipe.yaml"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", str(tracked_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
        assert torch.equal(merged, AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits)
    # without the experiment beside it, the error says where it looked and what to pass
    (out / "experiment.yaml").unlink()
    capsys.readouterr()
    assert main(["merge", str(out / "recipe.yaml"), "--out", str(tmp_path / "x")]) == 1
    assert "with no path; pass --model NAME=PATH" in capsys.readouterr().err
