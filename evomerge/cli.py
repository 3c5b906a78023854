"""Command line: evomerge run | resume | submit | status | logs | stop | validate | zoo build | export | merge |
ui | sync.

Exit codes: 0 success; 1 a run or command failed; 2 invalid input (bad config,
missing file, unknown option); 130 interrupted. Errors are one line (or one
line per config problem); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from evomerge.errors import ConfigError, EvomergeError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _BarProgress:
    """tqdm progress bar on stderr with the best fitness so far."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._bar = None
        self._lines = not sys.stderr.isatty()  # logs (a Ray Job, a file): a line now and then, not a bar
        self._total = self._done = 0

    def start(self, total: int, done: int = 0) -> None:
        if self.quiet:
            return
        self._total, self._done = total, done
        if self._lines:
            print(f"search: {done}/{total} trials", file=sys.stderr, flush=True)
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, desc="search", unit="trial", file=sys.stderr,
                         dynamic_ncols=True, disable=False)

    def advance(self, best: Optional[float], failed: int) -> None:
        self._done += 1
        if self._lines and not self.quiet:
            step = max(1, self._total // 20)
            if self._done % step == 0 or self._done == self._total:
                shown = f"{best:.4f}" if best is not None else "-"
                print(f"search: {self._done}/{self._total} trials, best {shown}, {failed} failed",
                      file=sys.stderr, flush=True)
            return
        if self._bar is not None:
            self._bar.set_postfix(best=f"{best:.4f}" if best is not None else "-", failed=failed, refresh=False)
            self._bar.update(1)

    def message(self, text: str) -> None:
        if self.quiet and not text.startswith("tracking is off"):
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evomerge", description="Evolutionary optimization of model-merge recipes.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a search from an experiment YAML")
    r.add_argument("experiment", type=Path)
    r.add_argument("--run-dir", type=Path, help="run directory (default: runs/<run-id>)")
    r.add_argument("--max-trials", type=int, help="override budget.max_trials")
    r.add_argument("--seed", type=int, help="override optimizer.seed")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--resume", action="store_true",
                   help="if --run-dir already holds this run (a restarted job), resume it instead of failing")
    r.add_argument("--dry-run", action="store_true",
                   help="print the plan (dimensions, popsize, budget, memory, GPU-hours) and exit; "
                        "nothing is downloaded, merged or evaluated")
    r.add_argument("--calibrate", type=Path, metavar="RUN_DIR",
                   help="with --dry-run: per-trial cost measured in this (pilot) run on the target hardware")
    r.add_argument("--trial-seconds", type=float, metavar="S", help="with --dry-run: per-trial cost to assume")
    r.add_argument("--json", action="store_true", help="print the summary (with --dry-run: the plan) as JSON")

    rs = sub.add_parser("resume", help="continue a run that was interrupted or crashed")
    rs.add_argument("run_dir", type=Path)
    rs.add_argument("--max-trials", type=int, help="extend the budget (at least the run's max_trials)")
    rs.add_argument("--quiet", action="store_true", help="no progress bar")
    rs.add_argument("--json", action="store_true", help="print the summary as JSON")

    sb = sub.add_parser("submit", help="run an experiment on a Ray cluster as a Ray Job")
    sb.add_argument("experiment", type=Path)
    sb.add_argument("--address", help="the cluster's dashboard / Jobs API, e.g. http://HEAD:8265 "
                                      "(default: $RAY_ADDRESS)")
    sb.add_argument("--run-dir", help="run directory on the cluster (default: ~/evomerge-runs/<run-id>; "
                                      "use shared storage so a new head can resume it)")
    sb.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the job (repeatable), e.g. MLFLOW_TRACKING_URI=...")
    sb.add_argument("--python", default="python", help="the Python on the cluster that has evomerge installed")
    sb.add_argument("--max-trials", type=int, help="override budget.max_trials")
    sb.add_argument("--seed", type=int, help="override optimizer.seed")
    sb.add_argument("--json", action="store_true", help="print the job as JSON")

    st = sub.add_parser("status", help="the state of a run directory, or of a submitted job")
    st.add_argument("target", help="a run directory, or a job id (with --address)")
    st.add_argument("--address", help="Ray Jobs API address for a job id (default: $RAY_ADDRESS)")
    st.add_argument("--json", action="store_true", help="print JSON")

    lg = sub.add_parser("logs", help="the output of a submitted job")
    lg.add_argument("job_id")
    lg.add_argument("--address", help="Ray Jobs API address (default: $RAY_ADDRESS)")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")

    sp = sub.add_parser("stop", help="stop a submitted job (the run can be resumed later)")
    sp.add_argument("job_id")
    sp.add_argument("--address", help="Ray Jobs API address (default: $RAY_ADDRESS)")

    v = sub.add_parser("validate", help="check an experiment YAML and report every problem")
    v.add_argument("experiment", type=Path)
    v.add_argument("--json", action="store_true", help='print {"ok": ..., "problems": [...]} (exit code as usual)')

    z = sub.add_parser("zoo", help="the embedded tiny model zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="build (or find cached) the tiny model zoo")
    zb.add_argument("--kind", default="cross-skill", choices=["cross-skill", "cross-skill-full", "tiny"])
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--force", action="store_true", help="rebuild even if cached")
    zb.add_argument("--json", action="store_true", help="print the zoo's models and tasks as JSON")

    e = sub.add_parser("export", help="export a run's best recipe")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--format", default="recipe", choices=["recipe", "hf", "mergekit"],
                   help="recipe: evomerge YAML; hf: a Hugging Face model dir; mergekit: a mergekit YAML")
    e.add_argument("--out", type=Path, help="directory to write to (required unless --pareto)")
    e.add_argument("--trial", type=int, help="export this trial instead of the best (e.g. a Pareto member)")
    e.add_argument("--pareto", action="store_true",
                   help="list the Pareto front of a multi-objective run (export one with --trial)")
    e.add_argument("--json", action="store_true", help="print JSON (the written path, or the Pareto front)")
    e.add_argument("--register", metavar="NAME",
                   help="with --format hf: register the model in the run's MLflow model registry as NAME")

    mg = sub.add_parser("merge", help="materialise a recipe YAML (or a mergekit config) as a Hugging Face model dir")
    mg.add_argument("recipe", type=Path, help="an evomerge recipe, or a mergekit config (merge_method + models)")
    mg.add_argument("--out", type=Path, required=True, help="the model directory to write")
    mg.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="where the recipe's model NAME is (a directory or hf:org/name); repeatable")
    src = mg.add_mutually_exclusive_group()
    src.add_argument("--run", type=Path, metavar="RUN_DIR", help="take the sources of this run")
    src.add_argument("--experiment", type=Path, metavar="EXP.yaml", help="take the sources of this experiment")
    mg.add_argument("--stream", action="store_true",
                    help="PS recipes: read sources tensor by tensor and write shards as they fill "
                         "(for models larger than memory)")
    mg.add_argument("--shard-size", type=int, default=2048, metavar="MB", help="with --stream: shard size")
    mg.add_argument("--json", action="store_true", help="print JSON")

    u = sub.add_parser("ui", help="open a run's MLflow UI (starts `mlflow ui` on its store) and print the URL")
    u.add_argument("run_dir", type=Path)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)

    sy = sub.add_parser("sync", help="upload a run's ledger to MLflow (after the server was unreachable)")
    sy.add_argument("run_dir", type=Path)
    sy.add_argument("--tracking-uri", help="upload to this MLflow store instead of the run's own")
    sy.add_argument("--json", action="store_true", help="print JSON")
    return p


def _cmd_validate(args) -> int:
    from evomerge.config import load_experiment

    from evomerge.controller import suite_problems

    try:
        exp = load_experiment(args.experiment)
        problems = suite_problems(exp)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        if args.json:
            import json

            print(json.dumps({"ok": False, "experiment": str(args.experiment), "problems": exc.problems}, indent=2))
            return EXIT_USAGE
        raise
    if args.json:
        import json

        print(json.dumps({"ok": True, "experiment": str(args.experiment), "problems": [], "name": exp.name}, indent=2))
        return EXIT_OK
    space = exp.search_space
    what = f"method {space.method}" if space.kind == "ps" else f"data-flow space, r = {space.repetitions}"
    print(f"{args.experiment}: ok ({exp.name}: {len(exp.models)} models, {what}, "
          f"{exp.budget.max_trials} trials)")
    return EXIT_OK


def _experiment_with_overrides(args):
    from evomerge.config import load_experiment

    exp = load_experiment(args.experiment)
    updates = {}
    if args.max_trials is not None:
        if args.max_trials < 1:
            raise ConfigError(["--max-trials: must be at least 1"])
        updates["budget"] = exp.budget.model_copy(update={"max_trials": args.max_trials})
    if args.seed is not None:
        if args.seed < 0:
            raise ConfigError(["--seed: must be >= 0"])
        updates["optimizer"] = exp.optimizer.model_copy(update={"seed": args.seed})
    return exp.model_copy(update=updates)


def _cmd_run(args) -> int:
    from evomerge.controller import LEDGER, Controller, new_run_id

    if not args.dry_run and (args.calibrate or args.trial_seconds is not None):
        raise ConfigError(["--calibrate and --trial-seconds go with --dry-run"])
    if args.resume and args.run_dir is None:
        raise ConfigError(["--resume: needs --run-dir (the directory a restarted job finds its run in)"])
    exp = _experiment_with_overrides(args)
    if args.dry_run:
        return _dry_run(exp, args)
    if args.resume and (args.run_dir / LEDGER).exists():
        from evomerge.controller import load_run_experiment

        held = load_run_experiment(args.run_dir)
        if held.model_dump(exclude={"budget"}) != exp.model_dump(exclude={"budget"}):
            raise ConfigError([f"--resume: {args.run_dir} holds a run of a different experiment (or other "
                               f"settings); continue it with `evomerge resume {args.run_dir}`"])
        progress = _BarProgress(args.quiet)
        progress.message(f"{args.run_dir} holds a run already: resuming it")
        extend = exp.budget.max_trials if exp.budget.max_trials > held.budget.max_trials else None
        summary = Controller.for_resume(args.run_dir, max_trials=extend, progress=progress).resume()
        _print_summary(summary, args.json)
        return EXIT_OK
    run_dir = args.run_dir or Path("runs") / new_run_id(exp.name)
    progress = _BarProgress(args.quiet)
    progress.message(f"run {run_dir.name}: {run_dir}")
    summary = Controller(exp, run_dir, progress=progress, source=args.experiment).run()
    _print_summary(summary, args.json)
    return EXIT_OK


def _dry_run(exp, args) -> int:
    from evomerge.plan import make_plan, plan_json

    if args.trial_seconds is not None and args.trial_seconds <= 0:
        raise ConfigError(["--trial-seconds: must be positive"])
    if args.calibrate and args.trial_seconds is not None:
        raise ConfigError(["--calibrate and --trial-seconds: give one per-trial cost, not both"])
    plan = make_plan(exp, calibrate=args.calibrate, trial_seconds=args.trial_seconds)
    print(plan_json(plan) if args.json else plan.render())
    return EXIT_OK


def _cmd_resume(args) -> int:
    from evomerge.controller import Controller

    if args.max_trials is not None and args.max_trials < 1:
        raise ConfigError(["--max-trials: must be at least 1"])
    progress = _BarProgress(args.quiet)
    controller = Controller.for_resume(args.run_dir, max_trials=args.max_trials, progress=progress)
    summary = controller.resume()
    _print_summary(summary, args.json)
    return EXIT_OK


def _cmd_submit(args) -> int:
    import json

    import yaml

    from evomerge.config import portable_experiment
    from evomerge.controller import new_run_id
    from evomerge.dispatch import ray_jobs

    exp = _experiment_with_overrides(args)
    if exp.dispatch.backend != "ray":
        raise ConfigError(["dispatch.backend: a submitted job runs its workers on the cluster; use backend: ray"])
    # inside the job the controller joins the job's own cluster (RAY_ADDRESS), whatever the file said
    exp = exp.model_copy(update={"dispatch": exp.dispatch.model_copy(update={"address": None})})
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--env: expected KEY=VALUE, got {item!r}"])
        env[key] = value
    data, files = portable_experiment(exp)
    job = ray_jobs.submit(args.address, yaml.safe_dump(data, sort_keys=False), new_run_id(exp.name),
                          run_dir=args.run_dir, env=env, python=args.python, files=files)
    if args.json:
        print(json.dumps(job.__dict__))
    else:
        print(job.job_id)
        addr = f" --address {args.address}" if args.address else ""
        print(f"run dir on the cluster: {job.run_dir}\n"
              f"follow it with: evomerge logs {job.job_id}{addr} --follow  |  evomerge status {job.job_id}{addr}",
              file=sys.stderr)
    return EXIT_OK


def _cmd_status(args) -> int:
    import json

    if Path(args.target).is_dir():
        from evomerge.status import format_status, run_status

        status = run_status(Path(args.target))
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_rows(format_status(status))
        return EXIT_OK
    if "/" in args.target or args.target.startswith("."):
        raise EvomergeError(f"{args.target}: no such run directory")
    from evomerge.dispatch import ray_jobs

    info = ray_jobs.job_info(args.address, args.target)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    rows = [("job", info["job_id"]), ("status", info["status"])]
    if info["message"]:
        rows.append(("message", info["message"].strip().splitlines()[0]))
    if info["run_dir"]:
        rows.append(("run dir", f"{info['run_dir']} (on the cluster)"))
    rows.append(("entrypoint", info["entrypoint"]))
    _print_rows(rows)
    return EXIT_OK


def _cmd_logs(args) -> int:
    from evomerge.dispatch import ray_jobs

    if args.follow:
        for chunk in ray_jobs.follow_logs(args.address, args.job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    else:
        sys.stdout.write(ray_jobs.job_logs(args.address, args.job_id))
    return EXIT_OK


def _cmd_stop(args) -> int:
    from evomerge.dispatch import ray_jobs

    if ray_jobs.stop(args.address, args.job_id):
        print(f"stopping {args.job_id}; continue it later with `evomerge resume <run dir>` on the cluster")
    else:
        print(f"{args.job_id} had already ended")
    return EXIT_OK


def _print_rows(rows) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _print_summary(s, as_json: bool = False) -> None:
    if as_json:
        import json

        print(json.dumps(s.to_json(), indent=2))
        return
    cached = f", {s.cached_trials} cached" if s.cached_trials else ""
    rows = [("trials", f"{s.trials} ({s.failed} failed{cached})")]
    if s.best_fitness is not None:
        rows.append(("best fitness (search)", f"{s.best_fitness:.4f}  trial {s.best_trial}, recipe {s.best_recipe_hash}"))
    for name, value in sorted(s.baselines.items()):
        rows.append((f"source {name} (search)", f"{value:.4f}"))
    for name, value in sorted(s.test_scores.items(), key=lambda kv: (kv[0] != "best", kv[0])):
        rows.append((f"{name} (test)", f"{value:.4f}"))
    rows.append(("best recipe", str(s.run_dir / "best_recipe.yaml")))
    rows.append(("mlflow", f"{s.tracking_uri}  run {s.mlflow_run_id}" if s.mlflow_run_id else "off"))
    rows.append(("time", f"{s.seconds:.1f} s" + (" (this session, resumed)" if s.resumed else "")))
    if s.worker_busy_fraction is not None:
        rows.append(("workers", f"{s.islands} island(s); workers busy {100 * s.worker_busy_fraction:.0f} % of the "
                                f"search; controller {s.controller_ms_per_trial:.1f} ms/trial"))
    print()
    _print_rows(rows)


def _cmd_zoo(args) -> int:
    from evomerge.zoo import build_zoo

    zoo = build_zoo(kind=args.kind, seed=args.seed, force=args.force,
                    progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        import json

        print(json.dumps({"root": str(zoo.root), "kind": zoo.kind, "models": {k: str(v) for k, v in zoo.models.items()},
                          "tasks_dir": str(zoo.tasks_dir), "search_tasks": list(zoo.search_tasks),
                          "test_tasks": list(zoo.test_tasks)}, indent=2))
        return EXIT_OK
    print(zoo.root)
    return EXIT_OK


def _cmd_export(args) -> int:
    from evomerge.export import export, pareto_members

    if args.pareto:
        import json

        names, members = pareto_members(args.run_dir)
        if args.json:
            print(json.dumps([{"trial_id": m["trial_id"], "objectives": dict(zip(names, m["objectives"])),
                               "fitness": m["fitness"], "recipe_hash": m["recipe_hash"]} for m in members], indent=2))
            return EXIT_OK
        width = max(8, *(len(n) for n in names))
        print(f"{'trial':>6}  " + "  ".join(f"{n:>{width}}" for n in names) + f"  {'fitness':>8}  recipe")
        for m in members:
            print(f"{m['trial_id']:>6}  " + "  ".join(f"{v:>{width}.4f}" for v in m["objectives"])
                  + f"  {m['fitness']:>8.4f}  {m['recipe_hash']}")
        print(f"{len(members)} Pareto-optimal trial(s); export one with: evomerge export {args.run_dir} "
              "--trial N --out DIR", file=sys.stderr)
        return EXIT_OK
    if args.out is None:
        raise ConfigError(["--out: required (the directory to write the recipe to)"])

    if args.register and args.format != "hf":
        raise ConfigError(["--register: registers a model directory; use it with --format hf"])
    path = export(args.run_dir, args.out, fmt=args.format, trial=args.trial)
    out = {"path": str(path), "format": args.format}
    if args.register:
        from evomerge.export import register

        name, version = register(args.run_dir, path, args.register)
        out["registered"] = {"name": name, "version": version}
    if args.json:
        import json

        print(json.dumps(out, indent=2))
        return EXIT_OK
    print(path)
    if args.register:
        print(f"registered in MLflow as {name} version {version}", file=sys.stderr)
    return EXIT_OK


def _cmd_merge(args) -> int:
    import json

    from evomerge.export import merge_recipe

    dirs: dict[str, str] = {}
    if args.run or args.experiment:
        from evomerge.config import load_experiment
        from evomerge.controller import load_run_experiment, resolve_worker_spec

        exp = load_run_experiment(args.run) if args.run else load_experiment(args.experiment)
        dirs.update(resolve_worker_spec(exp).model_dirs)
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError([f"--model: expected NAME=PATH, got {item!r}"])
        if not path.startswith("hf:") and not Path(path).expanduser().is_dir():
            raise ConfigError([f"--model {name}: no model directory {path}"])
        dirs[name] = path if path.startswith("hf:") else str(Path(path).expanduser().resolve())
    if args.shard_size < 1:
        raise ConfigError(["--shard-size: at least 1 (MB)"])
    out = merge_recipe(args.recipe, args.out, dirs, stream=args.stream, shard_mb=args.shard_size)
    if args.json:
        print(json.dumps({"path": str(out)}))
    else:
        print(out)
    return EXIT_OK


def _cmd_sync(args) -> int:
    import json

    from evomerge.tracking.sync import sync_run

    res = sync_run(args.run_dir, tracking_uri=args.tracking_uri)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['run_dir']}: {res['trials_uploaded']} of {res['trials']} trials uploaded to "
              f"{res['tracking_uri']} (run {res['mlflow_run_id']}, {res['status']})")
    return EXIT_OK


def _cmd_ui(args) -> int:
    import json
    import subprocess
    import time
    import urllib.request

    info_path = args.run_dir / "run.json"
    if not info_path.exists():
        raise EvomergeError(f"{args.run_dir} is not an evomerge run directory (no run.json)")
    info = json.loads(info_path.read_text())
    uri = info.get("tracking_uri") or ""
    route = (f"#/experiments/{info['mlflow_experiment_id']}/runs/{info['mlflow_run_id']}"
             if info.get("mlflow_experiment_id") and info.get("mlflow_run_id") else "")
    if uri.startswith(("http://", "https://")):
        print(f"{uri.rstrip('/')}/{route}")  # a tracking server already serves the UI
        return EXIT_OK
    if not uri:
        raise EvomergeError(f"{args.run_dir} was not tracked (tracking.backend: none); `evomerge sync "
                            f"{args.run_dir} --tracking-uri ...` uploads it")
    base = f"http://{args.host}:{args.port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                             "--host", args.host, "--port", str(args.port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise EvomergeError(f"mlflow ui exited ({proc.returncode}): "
                                    f"{(proc.stderr.read() or '').strip().splitlines()[-1:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise EvomergeError(f"mlflow ui did not answer on {base} within 90 s")
            time.sleep(0.5)
        print(f"{base}/{route}", flush=True)
        print("MLflow UI running; Ctrl-C stops it", file=sys.stderr, flush=True)
        proc.wait()
        return EXIT_OK
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


COMMANDS = {"run": _cmd_run, "resume": _cmd_resume, "submit": _cmd_submit, "status": _cmd_status,
            "logs": _cmd_logs, "stop": _cmd_stop, "validate": _cmd_validate, "zoo": _cmd_zoo,
            "export": _cmd_export, "ui": _cmd_ui, "sync": _cmd_sync, "merge": _cmd_merge}


def _sigterm_as_interrupt(signum, frame):
    # `ray job stop`, `kill`, a cluster scheduler: stop like Ctrl-C (run marked killed, workers closed)
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # lm-eval draws a tqdm bar per request type per evaluation; tqdm reads TQDM_* at import.
    # Our own bar passes disable=False explicitly and stays visible.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"error: invalid configuration ({len(exc.problems)} problem{'s' * (len(exc.problems) != 1)}):",
              file=sys.stderr)
        for line in exc.problems:
            print(f"  - {line}", file=sys.stderr)
        return EXIT_USAGE
    except EvomergeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # unexpected: still one line unless --debug
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
