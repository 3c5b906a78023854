"""Experiment config: round trip, defaults, and bad configs reported all at once with field names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.config import Experiment, load_experiment, parse_experiment
from evomerge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _good() -> dict:
    return yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())


def test_quickstart_loads_with_resolved_space():
    exp = load_experiment(ROOT / "experiments" / "quickstart.yaml")
    assert exp.search_space.method == "task_arithmetic" and exp.search_space.granularity == "vocab_body"
    assert set(exp.search_space.parameters) == {"weight"}
    assert exp.merged_models == ("expert_a", "expert_b")
    assert exp.optimizer.resolved_popsize(4) == 8


def test_default_popsize_is_the_papers():
    exp = load_experiment(ROOT / "experiments" / "quickstart.yaml")
    cfg = exp.optimizer.model_copy(update={"popsize": None})
    assert cfg.resolved_popsize(4) == 4 + 4  # 4 + floor(3 ln 4) = 4 + 4
    assert cfg.resolved_popsize(24) == 4 + 9


def test_round_trip_through_yaml():
    exp = load_experiment(ROOT / "experiments" / "quickstart.yaml")
    again = parse_experiment(yaml.safe_load(exp.to_yaml()), ROOT / "experiments")
    assert again == exp


def test_frozen():
    exp = load_experiment(ROOT / "experiments" / "quickstart.yaml")
    with pytest.raises(Exception):
        exp.name = "other"  # type: ignore[misc]


def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_experiment(data, ROOT / "experiments")
    return info.value.problems


def test_every_field_error_reported_at_once():
    data = _good()
    data["optimizer"]["sigma0"] = -1
    data["budget"]["max_trials"] = 0
    data["suite"]["tasks"][0]["weight"] = "heavy"
    data["surprise"] = 1
    data["dispatch"]["num_wokers"] = 3
    problems = _problems(data)
    text = "\n".join(problems)
    assert "optimizer.sigma0" in text
    assert "budget.max_trials" in text
    assert "suite.tasks.0.weight" in text
    assert "surprise: unknown key" in text
    assert "dispatch.num_wokers: unknown key" in text
    assert len(problems) == 5


def test_cross_field_problems_named():
    data = _good()
    data["base_model"] = "nope"
    data["suite"]["test_tasks"] = [{"name": "zoo_arith_l2_search"}]
    problems = _problems(data)
    assert any(p.startswith("base_model:") and "nope" in p for p in problems)
    assert any(p.startswith("suite.test_tasks:") for p in problems)


def test_bad_search_space_and_paths(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"kind": "ps", "method": "frobnicate", "parameters": {"density": {"low": 0, "high": 1}}}))
    data = _good()
    data["search_space"] = str(space)
    data["models"][1] = {"name": "expert_a", "path": str(tmp_path / "missing_model")}
    problems = _problems(data)
    text = "\n".join(problems)
    assert "search_space.method: unknown merge method 'frobnicate'" in text
    assert "models.1.path: model directory not found" in text


def test_bounds_and_unknown_parameter(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"kind": "ps", "method": "dare_ties",
                                     "parameters": {"density": {"low": 1, "high": 0}, "gamma": {"low": 0, "high": 1}}}))
    data = _good()
    data["search_space"] = str(space)
    text = "\n".join(_problems(data))
    assert "search_space.parameters.density" in text and "must be greater than low" in text


def test_missing_search_space_file():
    data = _good()
    data["search_space"] = "does/not/exist.yaml"
    assert any(p.startswith("search_space: file not found") for p in _problems(data))


def test_validate_cli_exit_code_and_lines(tmp_path):
    data = _good()
    data["search_space"] = str(ROOT / "search_spaces" / "ps_ties_dare.yaml")
    data["optimizer"]["popsize"] = 1
    data["tracking"]["backend"] = "wandb"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "optimizer.popsize" in proc.stderr and "tracking.backend" in proc.stderr
    assert "Traceback" not in proc.stderr
    good = subprocess.run([sys.executable, "-m", "evomerge.cli", "validate", str(ROOT / "experiments" / "quickstart.yaml")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout


def test_experiment_type():
    assert Experiment.model_config["frozen"] and Experiment.model_config["extra"] == "forbid"


ZOO_SPACES = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml")
                    if "shisa_gamma" not in p.read_text())  # the paper's: tests/test_deploy.py


@pytest.mark.parametrize("space", ZOO_SPACES)
def test_every_shipped_search_space_validates_in_the_quickstart(space):
    """Each file under search_spaces/ is a valid space with the zoo's sources (the paper's
    spaces name the paper's models and are validated with experiments/evollm_jp_*.yaml)."""
    data = _good()
    data["search_space"] = str(ROOT / "search_spaces" / space)
    exp = parse_experiment(data, ROOT / "experiments")
    assert exp.search_space.kind in ("ps", "dfs")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "experiments").glob("*.yaml")
                                        if p.name.startswith(("zoo_", "quickstart"))))
def test_every_shipped_zoo_experiment_loads(name):
    """The experiments that run on the embedded zoo load and pass the cross-field checks."""
    exp = load_experiment(ROOT / "experiments" / name)
    assert exp.zoo is not None and exp.models[0].path.startswith("zoo:")
