"""Experiment files on the tiny zoo for tests: one place for the defaults, overrides per test."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def experiment_file(tmp_path: Path, name: str, **overrides) -> Path:
    """Write ``<tmp_path>/<name>.yaml``: the tiny zoo's three models, the PS DARE-TIES space, the
    L2 search task, popsize 4, one island, 8 trials, in-process, no tracker — then ``overrides``
    (top-level keys replace the defaults)."""
    data = {
        "name": name,
        "zoo": {"kind": "tiny", "seed": 0},
        "models": [{"name": n, "path": f"zoo:{n}"} for n in ("base", "expert_a", "expert_b")],
        "base_model": "base",
        "search_space": str(ROOT / "search_spaces" / "ps_ties_dare.yaml"),
        "suite": {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search", "metric": "acc"}],
                  "batch_size": 64},
        "optimizer": {"name": "cma_es", "popsize": 4, "seed": 0, "islands": 1},
        "budget": {"max_trials": 8},
        "dispatch": {"backend": "local", "num_workers": 1},
        "tracking": {"backend": "none"},
    }
    data.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def crashed_copy(clean: Path, crashed: Path, records: list[dict]) -> Path:
    """A copy of the finished run ``clean`` at ``crashed`` as if its process had died after
    writing ``records`` (the start of its ledger): the experiment copies, run.json marked
    killed, and the ledger cut there. ``evomerge resume crashed`` continues it."""
    crashed.mkdir()
    for name in ("experiment.yaml", "experiment.source.yaml", "run.json"):
        (crashed / name).write_bytes((clean / name).read_bytes())
    (crashed / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = json.loads((crashed / "run.json").read_text())
    info.update(status="killed", run_dir=str(crashed))
    (crashed / "run.json").write_text(json.dumps(info))
    return crashed
