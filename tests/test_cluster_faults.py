"""A real multi-node Ray cluster failing under a search: what evomerge does, checked from the ledger.

Each test starts a cluster of its own (``tests/cluster_host.py``: ``ray.cluster_utils.Cluster``
in a separate process, a head with no CPUs and worker nodes of 1 CPU, token authentication on)
and runs ``evomerge`` as a user would, as a command in a process of its own, joining it with
``--address`` and the token found through ``RAY_AUTH_TOKEN_PATH`` (no ``RAY_AUTH_MODE``). The
sources are local directories (copies of the tiny zoo's), so that the tests can take them away
from the workers. Every test checks, from the ledger, that no trial was lost and none was
evaluated twice beyond those in flight at a failure, and the exit code and ``run.json`` state.

docs/cluster.md's table "Failures and what evomerge does" names these tests; the table is
checked against this file (``test_the_failure_table_names_these_tests``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from evomerge.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
HEAD_TIMEOUT = 10  # dispatch.head_timeout in these tests (default 30)


class ClusterHost:
    """A multi-node cluster in its own process (see cluster_host.py), stopped (only it) on close."""

    def __init__(self, nodes: int, token: Path) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="emc", dir="/tmp")  # short: Ray's socket paths have a length limit
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cluster_host.py"), self.temp_dir, str(nodes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env, start_new_session=True)
        line = self._line(120)
        assert line.startswith("address "), line
        self.address = line.split()[1]

    def _line(self, timeout: float) -> str:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not out or not out[0]:
            raise AssertionError(f"the cluster host did not answer (exit code {self.proc.poll()})")
        return out[0].strip()

    def command(self, text: str, timeout: float = 120) -> list[str]:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        line = self._line(timeout)
        assert line.startswith("ok"), line
        return line.split()[1:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("shutdown", timeout=60)
                self.proc.wait(timeout=30)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Run:
    """``evomerge ARGS`` in a process of its own, its stderr kept (and readable while it runs)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._file = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self._file, text=True)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._file.close()

    def wait_for(self, what, timeout: float = 300, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if self.proc.poll() is not None:
                raise AssertionError(f"evomerge exited early ({self.proc.returncode}):\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting\n{self.output[-3000:]}")
            time.sleep(poll)


@pytest.fixture
def cluster_env(tmp_path, session_tiny_zoo):
    """Sources (copies of the tiny zoo), a token, an env for `evomerge`, and clusters to start."""
    src = tmp_path / "src"
    for name, path in session_tiny_zoo.models.items():
        shutil.copytree(path, src / "models" / name)
    shutil.copytree(session_tiny_zoo.tasks_dir, src / "tasks")
    for y in (src / "tasks").glob("*.yaml"):  # the copies' YAMLs name the copies' data
        y.write_text(y.read_text().replace(str(session_tiny_zoo.tasks_dir), str(src / "tasks")))
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env.update(RAY_AUTH_TOKEN_PATH=str(token), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    clusters: list[ClusterHost] = []

    class Env:
        sources = src
        run_env = env

        @staticmethod
        def cluster(nodes: int) -> ClusterHost:
            clusters.append(ClusterHost(nodes, token))
            return clusters[-1]

        @staticmethod
        def experiment(name: str, max_trials: int, **dispatch) -> Path:
            data = {
                "name": name,
                "models": [{"name": n, "path": str(src / "models" / n)} for n in ("base", "expert_a", "expert_b")],
                "base_model": "base",
                "search_space": str(ROOT / "search_spaces" / "ps_ties_dare.yaml"),
                # batch size 1 and a generation task: ~0.5 s a trial, so that the faults land mid-search
                "suite": {"task_paths": [str(src / "tasks")], "batch_size": 1,
                          "tasks": [{"name": "zoo_arith_l2_search", "metric": "acc"},
                                    {"name": "zoo_arith_l2_gen_search", "metric": "exact_match"}]},
                "optimizer": {"name": "cma_es", "popsize": 4, "seed": 0, "islands": 1},
                "budget": {"max_trials": max_trials},
                "dispatch": {"backend": "ray", "head_timeout": HEAD_TIMEOUT, **dispatch},
                "tracking": {"backend": "none"},
            }
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(data))
            return path

        @staticmethod
        def run(*args: str, log: str = "run.log", **env_over: str) -> Run:
            return Run(list(args), {**env, **env_over}, tmp_path / log)

    yield Env
    for c in clusters:
        c.close()


def _trials(run_dir: Path) -> list[dict]:
    ledger = run_dir / "ledger.jsonl"
    return Ledger(ledger).records("trial") if ledger.exists() else []


def _count(run_dir: Path) -> int:
    ledger = run_dir / "ledger.jsonl"
    return ledger.read_text().count('"kind": "trial"') if ledger.exists() else 0


def _in_flight(run_dir: Path) -> set[int]:
    led = Ledger(run_dir / "ledger.jsonl")
    return {d["trial_id"] for d in led.records("dispatch")} - {t["trial_id"] for t in led.records("trial")}


def _none_lost_none_repeated(run_dir: Path, max_trials: int, may_repeat: set[int] = frozenset()) -> list[dict]:
    """Every trial once in the ledger; only trials in flight at a failure were dispatched twice."""
    trials = _trials(run_dir)
    ids = [t["trial_id"] for t in trials]
    assert sorted(ids) == list(range(max_trials)), "a trial was lost or recorded twice"
    dispatched = [d["trial_id"] for d in Ledger(run_dir / "ledger.jsonl").records("dispatch")]
    assert {i for i, n in Counter(dispatched).items() if n > 1} <= set(may_repeat)
    return trials


def _status(env, run_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "status", str(run_dir), "--json"], env=env.run_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _workers(run_dir: Path) -> dict:
    """The pool's counts in the run's heartbeat (what `status` shows), rewritten every 5 s."""
    try:
        return json.loads((run_dir / "heartbeat.json").read_text()).get("workers") or {}
    except (OSError, ValueError):
        return {}


def _a_worker_node(run: "Run", trials: list[dict]) -> str:
    """A node that runs a worker and not the controller (whose node the test does not remove: losing
    the controller's node is the controller's loss, tested as such)."""
    controller = re.search(r"the controller is on Ray node \S+ \((\w+)\)", run.output).group(1)
    return sorted(_nodes_used(trials) - {controller})[0]


def _nodes_used(trials: list[dict]) -> set[str]:
    return {t["worker"].rsplit("@", 1)[1] for t in trials if "@" in t["worker"]}


def test_node_lost_mid_search_is_retried_and_a_new_node_fetches_the_sources(cluster_env, tmp_path):
    """A node is lost mid-search while the sources are gone from their path (as on a node that never
    had them): the in-flight trial is retried, the pool starts a worker on a node that joins, and that
    worker fetches the sources from the controller. `status` shows the live workers."""
    cluster = cluster_env.cluster(3)
    run_dir = tmp_path / "churn"
    exp = cluster_env.experiment("churn", 90, num_workers=3)
    run = cluster_env.run("run", str(exp), "--run-dir", str(run_dir), "--address", cluster.address)
    run.wait_for(lambda: _count(run_dir) >= 6)
    # the pool searches with its first worker while the others start (on 2 shared cores a third can
    # still be starting after 6 trials): wait until all three are up, as the heartbeat says
    run.wait_for(lambda: _workers(run_dir).get("live") == 3)
    assert _status(cluster_env, run_dir)["workers"]["live"] == 3
    shutil.rmtree(cluster_env.sources)  # the controller still serves them: it opened them at the start
    in_flight = _in_flight(run_dir)
    cluster.command(f"remove_id {_a_worker_node(run, _trials(run_dir))}")
    _, new_node = cluster.command("add")
    run.wait_for(lambda: any(new_node[:8] in t["worker"] for t in _trials(run_dir)), timeout=240)
    run.wait_for(lambda: _workers(run_dir) == {"target": 3, "live": 3, "starting": 0, "restarting": 0})
    assert run.wait() == 0, run.output[-3000:]

    trials = _none_lost_none_repeated(run_dir, 90, may_repeat=in_flight | _in_flight(run_dir))
    assert all(t["state"] == "complete" for t in trials)
    assert new_node[:8] in _nodes_used(trials) and len(_nodes_used(trials)) == 4
    assert re.search(r"worker \d (was lost|stopped answering) during trial", run.output)
    assert re.search(rf"node [0-9.]+ \({new_node[:8]}\): fetched base .* from the controller into \S+/shipped/model/",
                     run.output)
    fetched = list(Path(os.environ["EVOMERGE_CACHE"]).glob("shipped/model/expert_a-*"))
    assert fetched and (fetched[0] / "model.safetensors").stat().st_size > 0
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_node_lost_while_workers_start_costs_a_worker_not_the_run(cluster_env, tmp_path):
    """A node is lost while the workers load their sources: the run starts with the others, and the
    lost worker's slot, its starts failing while the cluster still counts the dead node, gets a
    worker on a node that joins."""
    cluster = cluster_env.cluster(3)
    run_dir = tmp_path / "startup"
    exp = cluster_env.experiment("startup", 60, num_workers=3)
    run = cluster_env.run("run", str(exp), "--run-dir", str(run_dir), "--address", cluster.address)
    run.wait_for(lambda: "the controller is on Ray node" in run.output, poll=0.02)
    controller = re.search(r"the controller is on Ray node \S+ \((\w+)\)", run.output).group(1)
    lost = next(n for n in cluster.command("nodes") if not n.startswith(controller))
    cluster.command(f"remove_id {lost}")  # the workers are still importing torch and lm-eval: seconds
    _, new_node = cluster.command("add")
    run.wait_for(lambda: any(new_node[:8] in t["worker"] for t in _trials(run_dir)), timeout=240)
    assert run.wait() == 0, run.output[-3000:]
    trials = _none_lost_none_repeated(run_dir, 60)
    assert all(t["state"] == "complete" for t in trials)
    assert new_node[:8] in _nodes_used(trials) and len(_nodes_used(trials)) == 3
    assert "could not start (its node was lost before it started" in run.output


def test_head_lost_then_resume_on_a_new_cluster_then_driver_killed(cluster_env, tmp_path):
    """The head dies: the run stops within head_timeout, exit 75, recorded interrupted with the
    reason. `resume --address` continues it on a new cluster; kill -9 there, `status` says
    interrupted (never running), and `resume` with $RAY_ADDRESS finishes it in the same MLflow run."""
    first = cluster_env.cluster(2)
    run_dir = tmp_path / "headless"
    exp = cluster_env.experiment("headless", 40, num_workers=2)
    data = yaml.safe_load(exp.read_text())
    data["tracking"] = {"backend": "mlflow"}
    exp.write_text(yaml.safe_dump(data))
    run = cluster_env.run("run", str(exp), "--run-dir", str(run_dir), "--address", first.address, log="first.log")
    run.wait_for(lambda: _count(run_dir) >= 6)
    first.command("kill_head")
    lost_at = time.monotonic()
    assert run.wait(timeout=HEAD_TIMEOUT + 60) == 75, run.output[-3000:]
    assert time.monotonic() - lost_at < HEAD_TIMEOUT + 15
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("interrupted (head lost): the Ray head at") and \
        f"evomerge resume {run_dir} --address HOST:PORT" in last
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted" and info["reason"].startswith("head lost")
    assert _status(cluster_env, run_dir)["state"] == "interrupted"
    repeat = _in_flight(run_dir)
    done_first = _count(run_dir)
    first.close()

    second = cluster_env.cluster(2)
    run = cluster_env.run("resume", str(run_dir), "--address", second.address, log="second.log")
    run.wait_for(lambda: _count(run_dir) >= done_first + 6)
    assert _status(cluster_env, run_dir)["state"] == "running"
    run.proc.send_signal(signal.SIGKILL)
    run.wait()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # it never got to say otherwise
    status = _status(cluster_env, run_dir)
    assert status["state"] == "interrupted" and "is gone" in status["reason"]
    repeat |= _in_flight(run_dir)

    run = cluster_env.run("resume", str(run_dir), log="third.log", RAY_ADDRESS=second.address)
    assert run.wait() == 0, run.output[-3000:]
    assert f"on the Ray cluster at {second.address} ($RAY_ADDRESS)" in run.output
    _none_lost_none_repeated(run_dir, 40, may_repeat=repeat)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["resumed"] == 2 and "reason" not in info
    from evomerge.run_dir import read_info
    from evomerge.tracking.mlflow_tracker import read_run

    info = read_info(run_dir)
    mlrun = read_run(info["tracking_uri"], info["mlflow_run_id"])
    assert mlrun["status"] == "FINISHED"
    assert sorted(v for _, v in mlrun["history"]["trial_id"]) == list(range(40))


def test_no_usable_workers_and_a_gpu_request_without_gpus_stop_clearly(cluster_env, tmp_path):
    """Workers that cannot start stop the run as interrupted (exit 75, the reason in run.json):
    at once when each fails in its own code, after dispatch.worker_timeout when none gets a node.
    A GPU request on a cluster without GPUs is refused in one line. A local run starts its own
    Ray instance although the machine's Ray address file names a dead cluster."""
    bad = tmp_path / "bad"
    shutil.copytree(cluster_env.sources / "models", bad)
    weights = bad / "expert_b" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    exp = cluster_env.experiment("corrupt", 8, num_workers=2)
    data = yaml.safe_load(exp.read_text())
    data["models"] = [{"name": n, "path": str(bad / n)} for n in ("base", "expert_a", "expert_b")]
    exp.write_text(yaml.safe_dump(data))
    address_file = Path("/tmp/ray/ray_current_cluster")  # where ray.init() finds "the" local cluster
    kept = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("127.0.0.1:9")  # a cluster that died long ago
    try:
        run = cluster_env.run("run", str(exp), "--run-dir", str(tmp_path / "corrupt"), log="corrupt.log")
        assert run.wait() == 75, run.output[-3000:]
    finally:
        if kept is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(kept)
    info = json.loads((tmp_path / "corrupt" / "run.json").read_text())
    assert info["status"] == "interrupted" and info["ray_address"] == "local"
    assert re.fullmatch(r"no workers: no worker could start: node \S+ \(\w+\): MergeError: source 'expert_b': "
                        rf"cannot read {weights} .*", info["reason"])

    cluster = cluster_env.cluster(1)
    exp = cluster_env.experiment("toobig", 8, num_workers=1, cpus_per_worker=2, worker_timeout=8)
    run = cluster_env.run("run", str(exp), "--run-dir", str(tmp_path / "toobig"), "--address", cluster.address,
                          log="toobig.log")
    assert run.wait() == 75, run.output[-3000:]
    assert run.output.strip().splitlines()[-1].startswith(
        "interrupted (no workers): no worker has run for 8 s (dispatch.worker_timeout); none started: no node has "
        "2 CPU and 0 GPU free for one")
    assert json.loads((tmp_path / "toobig" / "run.json").read_text())["status"] == "interrupted"

    exp = cluster_env.experiment("gpu", 8, num_workers=1, device="cuda")
    run = cluster_env.run("run", str(exp), "--run-dir", str(tmp_path / "gpu"), "--address", cluster.address,
                          log="gpu.log")
    assert run.wait() == 2, run.output[-3000:]
    assert (f"dispatch: each worker asks for 1 GPU (device cuda), but the Ray cluster at {cluster.address} has no "
            "GPU") in run.output
    assert json.loads((tmp_path / "gpu" / "run.json").read_text())["status"] == "failed"


def test_the_failure_table_names_these_tests():
    """docs/cluster.md's failure table: each row names tests that exist (and keep it true)."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    table = text.split("## Failures and what evomerge does", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| failure")]
    tests = {name for path in (ROOT / "tests").glob("test_*.py")
             for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert len(rows) >= 12
    for row in rows:
        named = set(re.findall(r"`(test_\w+)`", row.rsplit("|", 2)[-2]))
        assert named and named <= tests, row
