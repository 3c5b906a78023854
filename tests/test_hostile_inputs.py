"""Hostile and broken inputs, as a demanding operator or an attacker would try them: each case
is a defect or risk that was found once, kept here so that it stays fixed.

Damaged ledgers (garbage lines, binary torn tails, cut lines, a deleted ledger), configs that
would burn the budget (illegal bounds, non-finite numbers, absurd sizes, duplicate keys, huge
files), foreign code in a source (an ``auto_map`` in its config and tokenizer config), copied
run dirs, and ``merge`` / ``export`` over an existing ``--out``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from tiny import experiment_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, session_tiny_zoo) -> Path:
    """A small finished run (4 trials, in-process, no tracker) to damage copies of."""
    tmp = tmp_path_factory.mktemp("hostile")
    exp = experiment_file(tmp, "hostile", budget={"max_trials": 4})
    run = tmp / "run"
    assert main(["run", str(exp), "--run-dir", str(run), "--quiet"]) == 0
    return run


@pytest.fixture()
def run_copy(finished_run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(finished_run, dest)
    return dest


def _cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


# -- the ledger ------------------------------------------------------------------------------

def test_a_garbage_line_is_named_with_file_and_line_and_repair_moves_it_aside(run_copy, capsys):
    ledger = run_copy / "ledger.jsonl"
    lines = ledger.read_bytes().count(b"\n")
    with open(ledger, "ab") as f:
        f.write(b"garbage {not json\n")
        f.write(ledger.read_bytes().splitlines(keepends=True)[-1])  # a good record after it
    for command in (["status", run_copy], ["export", run_copy, "--out", run_copy / "x"], ["resume", run_copy]):
        code, text = _cli(capsys, *command)
        assert code == 1, command
        assert f"ledger.jsonl, line {lines + 1}: not a ledger record" in text, text
        assert f"evomerge resume {run_copy} --repair" in text
    code, text = _cli(capsys, "resume", run_copy, "--repair", "--quiet")
    assert code == 0, text
    assert (run_copy / "ledger.damaged.jsonl").read_text() == f"{lines + 1}\tgarbage {{not json\n"
    assert _cli(capsys, "status", run_copy)[0] == 0


def test_a_line_cut_in_the_middle_of_the_ledger_is_named(run_copy, capsys):
    ledger = run_copy / "ledger.jsonl"
    records = ledger.read_bytes().splitlines(keepends=True)
    records[2] = records[2][: len(records[2]) // 2] + b"\n"
    ledger.write_bytes(b"".join(records))
    code, text = _cli(capsys, "status", run_copy)
    assert code == 1 and "ledger.jsonl, line 3: not a ledger record (JSONDecodeError" in text, text


def test_a_binary_torn_last_line_is_ignored_by_every_reader(run_copy, capsys):
    with open(run_copy / "ledger.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00binary")
    assert _cli(capsys, "status", run_copy)[0] == 0
    assert _cli(capsys, "export", run_copy, "--out", run_copy / "x")[0] == 0
    code, text = _cli(capsys, "resume", run_copy, "--quiet")
    assert code == 0, text
    assert (run_copy / "ledger.jsonl").read_bytes().endswith(b"\n")


def test_resume_refuses_a_run_whose_ledger_is_gone_unless_told_to_restart(run_copy, capsys):
    (run_copy / "ledger.jsonl").unlink()
    code, text = _cli(capsys, "resume", run_copy, "--quiet")
    assert code == 2 and "ledger.jsonl is missing" in text and "--restart" in text, text
    code, text = _cli(capsys, "resume", run_copy, "--restart", "--quiet", "--json")
    assert code == 0, text
    trials = [json.loads(x) for x in (run_copy / "ledger.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "trial" for r in trials) == 4
    code, text = _cli(capsys, "resume", run_copy, "--restart")
    assert code == 2 and "still has its ledger" in text


# -- configs that would burn the budget ------------------------------------------------------

SPACE = {"kind": "ps", "method": "dare_ties", "parameters": {"density": {"low": 0.1, "high": 1.0},
                                                               "weight": {"low": 0.0, "high": 1.0}}}


def _space(**parameters) -> dict:
    return {**SPACE, "parameters": {**SPACE["parameters"], **parameters}}


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"search_space": _space(density={"low": -1, "high": -0.1})},
     "search_space.parameters.density: [-1.0, -0.1] leaves dare_ties's legal range [0.0, 1.0]"),
    ({"search_space": _space(density={"low": 0.1, "high": 5.0})}, "leaves dare_ties's legal range"),
    ({"search_space": _space(weight={"low": 0, "high": float("inf")})}, "search_space.parameters.weight.high"),
    ({"search_space": _space(weight={"low": float("-inf"), "high": 1})}, "search_space.parameters.weight.low"),
    ({"search_space": _space(weight={"low": 0, "high": 1e308})}, "bounds must lie within +-1e+06"),
    ({"search_space": {**SPACE, "fixed": {"lambda": float("nan")}}}, "search_space.fixed.lambda"),
    ({"search_space": {"kind": "ps", "method": "slerp", "parameters": {"t": {"low": 0, "high": 1}},
                       "fixed": {}}}, None),
    ({"suite": {"task_paths": ["zoo"], "tasks": [{"name": "zoo_arith_l2_search", "weight": float("inf")}]}},
     "suite.tasks.0.weight"),
    ({"optimizer": {"name": "cma_es", "popsize": 1_000_000_000}}, "optimizer.popsize: 1000000000 is over"),
    ({"optimizer": {"name": "cma_es", "islands": 1_000_000}}, "optimizer.islands: 1000000 is over"),
    ({"dispatch": {"backend": "ray", "num_workers": 1_000_000}}, "dispatch.num_workers: 1000000 is over"),
    ({"budget": {"max_trials": 10 ** 9}}, "budget.max_trials: 1000000000 is over the sanity limit 1000000"),
    ({"optimizer": {"name": "cma_es", "failure_fitness": float("nan")}}, "optimizer.failure_fitness"),
])
def test_configs_that_would_burn_the_budget_are_refused_at_validate(overrides, expected, tmp_path, capsys):
    exp = experiment_file(tmp_path, "bad", **overrides)
    code, text = _cli(capsys, "validate", exp, "--json")
    report = json.loads(text)
    if expected is None:
        assert code == 0, report
        return
    assert code == 2 and any(expected in p for p in report["problems"]), report["problems"]
    code, text = _cli(capsys, "run", exp, "--run-dir", tmp_path / "r", "--quiet")  # run checks it again
    assert code == 2 and expected in text and not (tmp_path / "r" / "ledger.jsonl").exists()


def test_sizes_over_the_limits_pass_with_allow_huge(tmp_path, capsys):
    exp = experiment_file(tmp_path, "huge", budget={"max_trials": 2_000_000}, allow_huge=True)
    assert _cli(capsys, "validate", exp)[0] == 0


def test_duplicate_keys_and_huge_files_are_refused(tmp_path, capsys):
    exp = experiment_file(tmp_path, "dupe")
    text = exp.read_text()
    exp.write_text(text + "budget: {max_trials: 3}\n")  # a second `budget:`: the last would silently win
    code, out = _cli(capsys, "validate", exp)
    assert code == 2 and "duplicate key 'budget'" in out, out
    big = tmp_path / "big.yaml"
    big.write_text(text + "description: '" + "x" * (2 * 1024 * 1024) + "'\n")
    code, out = _cli(capsys, "validate", big)
    assert code == 2 and "config files are at most 1 MiB" in out, out


# -- foreign code ----------------------------------------------------------------------------

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("the source's code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    pass
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture()
def hostile_zoo(session_tiny_zoo, tmp_path) -> tuple[dict[str, Path], Path]:
    """The tiny zoo's models, expert_b armed with code behind auto_map in its config and its
    tokenizer config (code that leaves a marker file when it runs)."""
    marker = tmp_path / "ran"
    dirs = {}
    for name, d in session_tiny_zoo.models.items():
        dirs[name] = tmp_path / name
        shutil.copytree(d, dirs[name])
    for name in ("base", "expert_b"):
        evil = dirs[name]
        (evil / "evil.py").write_text(EVIL.format(marker=str(marker)))
        for file, key, value in (("config.json", "auto_map", {"AutoConfig": "evil.EvilConfig",
                                                              "AutoModelForCausalLM": "evil.EvilModel"}),
                                 ("tokenizer_config.json", "auto_map", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
                                 ("tokenizer_config.json", "tokenizer_class", "EvilTokenizer")):
            data = json.loads((evil / file).read_text())
            data[key] = value
            (evil / file).write_text(json.dumps(data))
    return dirs, marker


def test_no_code_from_a_source_runs_and_nothing_prompts(hostile_zoo, session_tiny_zoo, tmp_path):
    dirs, marker = hostile_zoo
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "expert_a", "parameters": {"weight": 0.5}}, {"model": "expert_b", "parameters": {"weight": 0.5}}]}))
    models = [a for n, d in dirs.items() for a in ("--model", f"{n}={d}")]
    exp = experiment_file(tmp_path, "evil", budget={"max_trials": 2},
                          models=[{"name": n, "path": str(d)} for n, d in dirs.items()])
    clean_base = experiment_file(tmp_path, "evil_b", budget={"max_trials": 2},
                                 models=[{"name": n, "path": str(d)} for n, d in {
                                     **dirs, "base": session_tiny_zoo.models["base"]}.items()])
    run = tmp_path / "run"
    # (command, exit code): a base whose tokenizer needs its own code cannot be searched without
    # `trust_remote_code: true`, and says so; with a clean base the armed expert is merged as data
    commands = [
        (["merge", recipe, "--out", tmp_path / "merged", *models], 0),
        (["merge", recipe, "--out", tmp_path / "streamed", "--stream", *models], 0),
        (["run", exp, "--run-dir", tmp_path / "refused", "--quiet"], 1),
        (["run", clean_base, "--run-dir", run, "--quiet"], 0),
        (["export", run, "--format", "hf", "--out", tmp_path / "exported"], 0),
    ]
    cli = Path(sys.executable).parent / "evomerge"
    for command, code in commands:  # stdin closed: a trust prompt would fail the command, not wait on it
        done = subprocess.run([str(cli), *map(str, command)], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == code, (command, done.stderr[-2000:])
        assert code == 0 or "trust_remote_code" in done.stderr
        assert not marker.exists(), command
    for out in ("merged", "streamed"):
        assert json.loads((tmp_path / out / "tokenizer_config.json").read_text())["tokenizer_class"] == "EvilTokenizer"
        assert not list((tmp_path / out).glob("*.py")), out  # the files as they were, no code along
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


# -- run dirs move, outputs are whole ----------------------------------------------------------

def test_a_copied_run_dir_resumes_into_its_own_mlflow_store(session_tiny_zoo, tmp_path, capsys):
    from evomerge.run_dir import read_info
    from evomerge.tracking.mlflow_tracker import read_run

    exp = experiment_file(tmp_path, "moving", budget={"max_trials": 4}, tracking={"backend": "mlflow"})
    original = tmp_path / "original"
    assert _cli(capsys, "run", exp, "--run-dir", original, "--quiet")[0] == 0
    assert "{run_dir}" in json.loads((original / "run.json").read_text())["tracking_uri"]  # stored relative
    before = (original / "mlflow.db").read_bytes()
    def artifacts(root: Path) -> dict:
        return {p.relative_to(root): p.read_bytes() for p in (root / "mlartifacts").rglob("*") if p.is_file()}

    logged = artifacts(original)
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(original, moved)
    # in a new process, as a user would (MLflow caches artifact locations per run id in-process)
    done = subprocess.run([str(Path(sys.executable).parent / "evomerge"), "resume", str(moved), "--max-trials", "6",
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (original / "mlflow.db").read_bytes() == before  # the original store is untouched
    assert artifacts(original) == logged  # and so are its artifact files: the plots of 6 trials went to the copy
    changed = {k for k, v in artifacts(moved).items() if logged.get(k) != v}
    assert any(k.name == "fitness.svg" for k in changed), changed
    info = read_info(moved)
    assert info["tracking_uri"] == f"sqlite:///{(moved / 'mlflow.db').resolve()}"
    steps = [s for s, _ in read_run(info["tracking_uri"], info["mlflow_run_id"])["history"]["fitness"]]
    assert sorted(steps) == list(range(6))


def test_merge_and_export_refuse_a_non_empty_out_and_replace_it_whole_with_force(finished_run, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model-00001-of-00009.safetensors").write_text("stale shard of another model")
    code, text = _cli(capsys, "export", finished_run, "--format", "hf", "--out", out)
    assert code == 2 and "is not empty" in text and "--force" in text
    assert _cli(capsys, "export", finished_run, "--format", "hf", "--out", out, "--force")[0] == 0
    assert not (out / "model-00001-of-00009.safetensors").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]  # no temporaries left
    # a merge that fails leaves nothing at --out (never a dir that loads but lacks parts)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "linear", "base_model": "base", "models": [
        {"model": "base", "parameters": {"weight": 1.0}}, {"model": "nope", "parameters": {"weight": 1.0}}]}))
    code, _ = _cli(capsys, "merge", bad, "--out", tmp_path / "never", "--run", finished_run)
    assert code != 0 and not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never.")]


def test_a_ledger_that_cannot_be_written_stops_the_run_naming_it(session_tiny_zoo, tmp_path, capsys, monkeypatch):
    """A read-only or full disk (simulated: tests run as root, whom permissions do not stop):
    the error names the ledger, and run.json does not say "running" afterwards."""
    import os as _os

    from evomerge import ledger as ledger_module

    real_fsync, calls = _os.fsync, []

    def failing_fsync(fd):
        if _os.readlink(f"/proc/self/fd/{fd}").endswith("ledger.jsonl"):
            calls.append(fd)
            if len(calls) > 3:
                raise OSError(30, "Read-only file system")
        return real_fsync(fd)

    monkeypatch.setattr(ledger_module.os, "fsync", failing_fsync)
    exp = experiment_file(tmp_path, "readonly", budget={"max_trials": 4})
    code, text = _cli(capsys, "run", exp, "--run-dir", tmp_path / "run", "--quiet")
    assert code == 1 and "cannot append to" in text and "ledger.jsonl (OSError: Read-only file system)" in text, text
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
