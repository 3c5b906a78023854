"""Command line: evomerge run | resume | submit | status | logs | stop | validate | zoo build | export | merge |
ui | sync.

Exit codes: 0 success; 1 a run or command failed; 2 invalid input (bad config,
missing file, unknown option); 75 the run was interrupted by its infrastructure (the Ray
head lost, no worker could run: recorded as ``interrupted``, resumable); 130 stopped by
Ctrl-C or SIGTERM. Errors are one line (or one line per config problem); ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from evomerge.errors import ClusterLost, ConfigError, EvomergeError, RunInterrupted

# The zoo kinds `zoo build --kind` offers; spelled out so that building the parser does not import
# torch (tests/test_zoo.py checks they are evomerge.zoo.KINDS).
ZOO_KINDS = ["cross-skill", "cross-skill-full", "layered", "adapters", "tiny", "tiny-adapters"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_RUN_INTERRUPTED = 75  # sysexits' EX_TEMPFAIL: the run stopped for a cause outside it; resume it


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


NEWCOMER = """evomerge: evolutionary search for model-merge recipes.

Start here (offline, CPU, a few minutes: builds a tiny model zoo, searches, scores on held-out data):
  evomerge run experiments/quickstart.yaml
then watch that run in MLflow (its run dir is printed at the end):
  evomerge ui runs/<run-id>

All commands: evomerge --help"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that fits a 80x24 terminal: options aligned at column 24, the example kept as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=24, width=min(100, max(80, _columns())))


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


def _command(sub, name: str, help: str, example: str, operands: str = "") -> argparse.ArgumentParser:
    """A sub-command whose help is a one-line usage, its options and one example."""
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          usage=f"%(prog)s [options] {operands}".rstrip(),
                          epilog=f"example:\n  {example}", formatter_class=_Formatter)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evomerge", formatter_class=_Formatter,
        usage="%(prog)s [--debug] COMMAND [options]   (evolutionary search for model-merge recipes)",
        epilog="example:\n  evomerge run experiments/quickstart.yaml   then   evomerge ui runs/<run-id>")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", prog="evomerge")

    r = _command(sub, "run", "run a search from an experiment YAML",
                 "evomerge run experiments/quickstart.yaml --run-dir runs/qs", "EXPERIMENT")
    r.add_argument("experiment", metavar="EXPERIMENT", type=Path)
    r.add_argument("--run-dir", type=Path, metavar="DIR", help="run directory (default: runs/<run-id>)")
    r.add_argument("--max-trials", type=int, metavar="N", help="override budget.max_trials")
    r.add_argument("--seed", type=int, metavar="N", help="override optimizer.seed")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--resume", action="store_true", help="resume the run already in --run-dir (a restarted job)")
    r.add_argument("--address", metavar="HOST:PORT",
                   help="the Ray cluster (default: $RAY_ADDRESS)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the plan (dimensions, budget, GPU-hours) and exit")
    r.add_argument("--calibrate", type=Path, metavar="DIR", help="with --dry-run: per-trial cost of this pilot run")
    r.add_argument("--trial-seconds", type=float, metavar="S", help="with --dry-run: per-trial cost to assume")
    r.add_argument("--json", action="store_true", help="print the summary (or the plan) as JSON")

    rs = _command(sub, "resume", "continue a run that was interrupted or crashed",
                  "evomerge resume runs/qs --max-trials 200", "RUN_DIR")
    rs.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    rs.add_argument("--max-trials", type=int, metavar="N", help="extend the budget (at least the run's max_trials)")
    rs.add_argument("--repair", action="store_true", help="move damaged ledger lines aside, then resume")
    rs.add_argument("--restart", action="store_true", help="the ledger is lost: search again from the start")
    rs.add_argument("--address", metavar="HOST:PORT",
                    help="the Ray cluster (default: $RAY_ADDRESS)")
    rs.add_argument("--quiet", action="store_true", help="no progress bar")
    rs.add_argument("--json", action="store_true", help="print the summary as JSON")

    sb = _command(sub, "submit", "run an experiment on a Ray cluster as a Ray Job",
                  "evomerge submit --address http://HEAD:8265 experiments/evollm_jp_ps.yaml --run-dir /shared/r1", "EXPERIMENT")
    sb.add_argument("experiment", metavar="EXPERIMENT", type=Path)
    sb.add_argument("--address", metavar="URL", help="the Jobs API, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    sb.add_argument("--run-dir", metavar="DIR", help="run dir on the cluster's shared storage")
    sb.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the job (repeatable)")
    sb.add_argument("--python", default="python", help="the cluster's Python that has evomerge installed")
    sb.add_argument("--max-trials", type=int, metavar="N", help="override budget.max_trials")
    sb.add_argument("--seed", type=int, metavar="N", help="override optimizer.seed")
    sb.add_argument("--json", action="store_true", help="print the job as JSON")

    st = _command(sub, "status", "the state of a run directory, or of a submitted job",
                  "evomerge status runs/qs", "TARGET")
    st.add_argument("target", metavar="TARGET", help="a run directory, or a job id (with --address)")
    st.add_argument("--address", help="Ray Jobs API address for a job id (default: $RAY_ADDRESS)")
    st.add_argument("--json", action="store_true", help="print JSON")

    lg = _command(sub, "logs", "the output of a submitted job",
                  "evomerge logs evomerge-quickstart-20261201 --address http://HEAD:8265 -f", "JOB_ID")
    lg.add_argument("job_id", metavar="JOB_ID")
    lg.add_argument("--address", help="Ray Jobs API address (default: $RAY_ADDRESS)")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")

    sp = _command(sub, "stop", "stop a submitted job (resume the run later)",
                  "evomerge stop evomerge-quickstart-20261201 --address http://HEAD:8265", "JOB_ID")
    sp.add_argument("job_id", metavar="JOB_ID")
    sp.add_argument("--address", help="Ray Jobs API address (default: $RAY_ADDRESS)")

    v = _command(sub, "validate", "check an experiment YAML and report every problem",
                 "evomerge validate experiments/quickstart.yaml", "EXPERIMENT")
    v.add_argument("experiment", metavar="EXPERIMENT", type=Path)
    v.add_argument("--json", action="store_true", help='print {"ok": ..., "problems": [...]}')

    z = _command(sub, "zoo", "the embedded tiny model zoo", "evomerge zoo build --seed 1", "build")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="build", prog="evomerge zoo")
    zb = _command(zsub, "build", "build (or find cached) the tiny model zoo", "evomerge zoo build --seed 1")
    zb.add_argument("--kind", default="cross-skill", choices=ZOO_KINDS)
    zb.add_argument("--seed", type=int, default=0, metavar="N")
    zb.add_argument("--force", action="store_true", help="rebuild even if cached")
    zb.add_argument("--json", action="store_true", help="print the zoo's models and tasks as JSON")

    e = _command(sub, "export", "export a run's best recipe",
                 "evomerge export runs/qs --format hf --out out/model", "RUN_DIR")
    e.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    e.add_argument("--format", default="recipe", choices=["recipe", "hf", "mergekit", "adapter"],
                   help="evomerge YAML, HF model dir, mergekit YAML, or one PEFT adapter (LoRA sources)")
    e.add_argument("--out", type=Path, metavar="DIR", help="directory to write to (required unless --pareto)")
    e.add_argument("--force", action="store_true", help="replace a non-empty --out whole")
    e.add_argument("--trial", type=int, metavar="N", help="export this trial instead of the best")
    e.add_argument("--pareto", action="store_true", help="list a multi-objective run's Pareto front")
    e.add_argument("--json", action="store_true", help="print JSON (the written path, or the front)")
    e.add_argument("--register", metavar="NAME", help="with --format hf: register it in MLflow as NAME")
    e.add_argument("--rank", type=int, metavar="R", help="--format adapter: SVD of rank R (default: exact if it can)")

    mg = _command(sub, "merge", "write a recipe, mergekit config or preset as a model dir",
                  "evomerge merge out/recipe.yaml --out out/model", "RECIPE")
    mg.add_argument("recipe", metavar="RECIPE", type=Path, nargs="?",
                    help="an evomerge recipe or a mergekit config (or --preset)")
    mg.add_argument("--preset", metavar="SPEC",
                    help="NAME[:k=v,..]: layer_swapping, lines, model_stock")
    mg.add_argument("--out", type=Path, required=True, metavar="DIR", help="the model directory to write")
    mg.add_argument("--force", action="store_true", help="replace a non-empty --out whole")
    mg.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="where model NAME is (a dir or hf:org/name); repeatable")
    src = mg.add_mutually_exclusive_group()
    src.add_argument("--run", type=Path, metavar="RUN_DIR", help="take the sources of this run")
    src.add_argument("--experiment", type=Path, metavar="EXP",
                     help="this experiment's sources (default: experiment.yaml beside it)")
    mg.add_argument("--stream", action="store_true", help="PS: tensor by tensor, for models larger than memory")
    mg.add_argument("--shard-size", type=int, default=2048, metavar="MB", help="with --stream: shard size")
    mg.add_argument("--json", action="store_true", help="print JSON")

    u = _command(sub, "ui", "open a run in the MLflow UI and print its URL", "evomerge ui runs/qs", "RUN_DIR")
    u.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--no-browser", action="store_true", help="only print the URL (default: also open it)")

    sy = _command(sub, "sync", "upload a run's ledger to MLflow (after an outage)", "evomerge sync runs/qs", "RUN_DIR")
    sy.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    sy.add_argument("--tracking-uri", help="upload to this MLflow store instead of the run's own")
    sy.add_argument("--json", action="store_true", help="print JSON")
    return p


def _cmd_validate(args) -> int:
    from evomerge.config import load_experiment

    from evomerge.wiring import dispatch_notes, source_capabilities, source_problems, suite_problems

    try:
        exp = load_experiment(args.experiment)
        problems = suite_problems(exp) + source_problems(exp)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        if args.json:
            import json

            print(json.dumps({"ok": False, "experiment": str(args.experiment), "problems": exc.problems}, indent=2))
            return EXIT_USAGE
        raise
    notes = dispatch_notes(exp)
    sources = source_capabilities(exp)
    if args.json:
        import json

        print(json.dumps({"ok": True, "experiment": str(args.experiment), "problems": [], "notes": notes,
                          "sources": sources, "name": exp.name}, indent=2))
        return EXIT_OK
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    space = exp.search_space
    what = f"method {space.method}" if space.kind == "ps" else f"data-flow space, r = {space.repetitions}"
    print(f"{args.experiment}: ok ({exp.name}: {len(exp.models)} models, {what}, "
          f"{exp.budget.max_trials} trials)")
    for name, line in sources.items():
        print(f"  {name}: {line}")
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
    from evomerge.search import Controller
    from evomerge.run_dir import has_ledger, new_run_id

    if not args.dry_run and (args.calibrate or args.trial_seconds is not None):
        raise ConfigError(["--calibrate and --trial-seconds go with --dry-run"])
    if args.resume and args.run_dir is None:
        raise ConfigError(["--resume: needs --run-dir (the directory a restarted job finds its run in)"])
    exp = _experiment_with_overrides(args)
    if args.dry_run:
        return _dry_run(exp, args)
    if args.resume and has_ledger(args.run_dir):
        from evomerge.run_dir import load_run_experiment

        held = load_run_experiment(args.run_dir)
        if held.identity() != exp.identity():
            raise ConfigError([f"--resume: {args.run_dir} holds a run of a different experiment (or other "
                               f"settings); continue it with `evomerge resume {args.run_dir}`"])
        progress = _BarProgress(args.quiet)
        progress.message(f"{args.run_dir} holds a run already: resuming it")
        extend = exp.budget.max_trials if exp.budget.max_trials > held.budget.max_trials else None
        summary = Controller.for_resume(args.run_dir, max_trials=extend, progress=progress, address=args.address,
                                        runtime=exp).resume()
        return _finish(summary, args.json)
    run_dir = args.run_dir or Path("runs") / new_run_id(exp.name)
    progress = _BarProgress(args.quiet)
    progress.message(f"run {run_dir.name}: {run_dir}")
    summary = Controller(exp, run_dir, progress=progress, source=args.experiment, address=args.address).run()
    return _finish(summary, args.json)


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
    from evomerge.search import Controller

    if args.max_trials is not None and args.max_trials < 1:
        raise ConfigError(["--max-trials: must be at least 1"])
    progress = _BarProgress(args.quiet)
    controller = Controller.for_resume(args.run_dir, max_trials=args.max_trials, progress=progress,
                                       address=args.address)
    summary = controller.resume(repair=args.repair, restart=args.restart)
    return _finish(summary, args.json)


def _cmd_submit(args) -> int:
    import json

    import yaml

    from evomerge.config import portable_experiment
    from evomerge.run_dir import new_run_id
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


def _finish(summary, as_json: bool) -> int:
    """Print a finished search's summary; a search whose every trial failed is a failed command."""
    _print_summary(summary, as_json)
    if not summary.all_failed:
        return EXIT_OK
    reasons = "; ".join(f"{reason} ({n}x)" for reason, n in summary.failure_reasons)
    print(f"error: every trial failed ({summary.failed} of {summary.trials}), so there is no recipe to "
          f"export; commonest reasons: {reasons}", file=sys.stderr)
    return EXIT_FAILED


def _print_summary(s, as_json: bool = False) -> None:
    if as_json:
        import json

        print(json.dumps(s.to_json(), indent=2))
        return
    from evomerge.uncertainty import evidence_row, with_se

    se = getattr(s, "standard_errors", None) or {}
    cached = f", {s.cached_trials} cached" if s.cached_trials else ""
    rows = [("trials", f"{s.trials} ({s.failed} failed{cached})")]
    starts = getattr(s, "start_trials", {})
    if starts:
        rows.append(("start recipes", "; ".join(f"trial {t}: {label}" for t, label in starts.items())))
    if s.best_fitness is not None:
        rows.append(("best fitness (search)", f"{with_se(s.best_fitness, se.get('search'))}  trial {s.best_trial}, "
                     f"recipe {s.best_recipe_hash}"
                     + (f" (start recipe {starts[str(s.best_trial)]})" if str(s.best_trial) in starts else "")))
    if s.validation_fitness is not None:
        rows.append(("chosen on validation", f"trial {s.best_trial} among the top {len(s.validation)} by search "
                     f"fitness: search {s.best_fitness:.4f} -> validation {with_se(s.validation_fitness, se.get('validation'))} "
                     f"(drop {s.best_fitness - s.validation_fitness:+.4f})"))
        if s.validation_corrected is not None:
            rows.append(("validation, corrected", f"{s.validation_corrected:.4f}: the validation score less its "
                         f"winner's curse among the {len(s.validation)} ({s.validation_fitness - s.validation_corrected:+.4f}, "
                         "bootstrap); the estimate to expect on unseen items"))
        if s.search_best_trial != s.best_trial:
            v = s.validation.get(str(s.search_best_trial))
            rows.append(("search split's best", f"trial {s.search_best_trial}: search {s.search_best_fitness:.4f} -> "
                         + (f"validation {v:.4f} (drop {s.search_best_fitness - v:+.4f})" if v is not None
                            else "validation failed")))
    for name, value in sorted(s.baselines.items()):
        rows.append((f"source {name} (search)", with_se(value, (se.get("baselines") or {}).get(name))))
    for name, value in sorted(s.test_scores.items(), key=lambda kv: (kv[0] != "best", kv[0] != "search_best", kv[0])):
        rows.append((f"{name} (test)", with_se(value, (se.get("tests") or {}).get(name))))
    row = evidence_row(getattr(s, "evidence", None))
    if row is not None:
        rows.append(row)
    if s.racing_stopped:
        rows.append(("racing", "trials final at rung " + ", ".join(f"{k}: {n}" for k, n in enumerate(s.racing_stopped))
                     + f"; {s.item_evaluations} item evaluations"))
    for reason, n in s.failure_reasons:
        rows.append((f"failed x{n}", reason))
    from evomerge.run_dir import best_recipe_path

    best_file = best_recipe_path(s.run_dir)
    rows.append(("best recipe", str(best_file) if best_file.exists() else "none (no trial completed)"))
    rows.append(("mlflow", f"{s.tracking_uri}  run {s.mlflow_run_id}" if s.mlflow_run_id else "off"))
    rows.append(("time", f"{s.seconds:.1f} s" + (" (this session, resumed)" if s.resumed else "")))
    if s.worker_busy_fraction is not None:
        rows.append(("workers", f"{s.islands} island(s); workers busy {100 * s.worker_busy_fraction:.0f} % of the "
                                f"search; controller {s.controller_ms_per_trial:.1f} ms/trial"))
    if s.mlflow_run_id:
        rows.append(("watch it", f"evomerge ui {s.run_dir}"))
    if s.best_fitness is not None:
        rows.append(("take it home", f"evomerge export {s.run_dir} --format hf --out {s.run_dir}/model"))
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
                               "fitness": m["fitness"], "test": m["test"], "recipe_hash": m["recipe_hash"]}
                              for m in members], indent=2))
            return EXIT_OK
        width = max(8, *(len(n) for n in names))
        print(f"{'trial':>6}  " + "  ".join(f"{n:>{width}}" for n in names) + f"  {'fitness':>8}  {'test':>8}  recipe")
        for m in members:
            test = f"{m['test']:>8.4f}" if m["test"] is not None else f"{'-':>8}"
            print(f"{m['trial_id']:>6}  " + "  ".join(f"{v:>{width}.4f}" for v in m["objectives"])
                  + f"  {m['fitness']:>8.4f}  {test}  {m['recipe_hash']}")
        print(f"{len(members)} Pareto-optimal trial(s); export one with: evomerge export {args.run_dir} "
              "--trial N --out DIR", file=sys.stderr)
        return EXIT_OK
    if args.out is None:
        raise ConfigError(["--out: required (the directory to write the recipe to)"])

    if args.register and args.format != "hf":
        raise ConfigError(["--register: registers a model directory; use it with --format hf"])
    if args.rank is not None and (args.format != "adapter" or args.rank < 1):
        raise ConfigError(["--rank: a positive rank, with --format adapter"])
    from evomerge.export import atomic_dir

    with atomic_dir(args.out, args.force) as tmp:
        path = args.out / export(args.run_dir, tmp, fmt=args.format, trial=args.trial, rank=args.rank).relative_to(tmp)
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
    if args.run:
        from evomerge.run_dir import load_run_experiment
        from evomerge.wiring import resolve_worker_spec

        dirs.update(resolve_worker_spec(load_run_experiment(args.run)).model_dirs)
    elif args.experiment:
        from evomerge.export import experiment_sources

        dirs.update(experiment_sources(args.experiment))
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError([f"--model: expected NAME=PATH, got {item!r}"])
        if not path.startswith("hf:") and not Path(path).expanduser().is_dir():
            raise ConfigError([f"--model {name}: no model directory {path}"])
        dirs[name] = path if path.startswith("hf:") else str(Path(path).expanduser().resolve())
    if args.shard_size < 1:
        raise ConfigError(["--shard-size: at least 1 (MB)"])
    if (args.recipe is None) == (args.preset is None):
        raise ConfigError(["RECIPE: give a recipe file or --preset NAME (one of them)"])
    preset = None
    if args.preset is not None:
        if not (args.run or args.experiment):
            raise ConfigError(["--preset: needs --experiment EXP.yaml or --run RUN_DIR (its sources and base model)"])
        from evomerge.presets import preset_recipe
        from evomerge.wiring import num_layers_of

        if args.run:
            from evomerge.run_dir import load_run_experiment

            exp = load_run_experiment(args.run)
        else:
            from evomerge.config import load_experiment

            exp = load_experiment(args.experiment)
        declared = {m.name: m.config for m in exp.models}
        layers = num_layers_of(dirs[exp.base_model], declared.get(exp.base_model))
        preset = (args.preset, preset_recipe(args.preset, exp.merged_models, exp.base_model, layers))
    from evomerge.export import atomic_dir

    with atomic_dir(args.out, args.force) as tmp:
        merge_recipe(args.recipe, tmp, dirs, stream=args.stream, shard_mb=args.shard_size, preset=preset)
    out = args.out
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


def _open_browser(url: str, refused: bool) -> None:
    """Open ``url`` in the desktop's browser when a person is at a terminal with a display (never
    in scripts, jobs or tests, where stdout is not a terminal; a text browser would take it over)."""
    graphical = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if refused or not sys.stdout.isatty() or not graphical:
        return
    import webbrowser

    try:
        webbrowser.open(url)
    except Exception:  # no browser: the printed URL is enough
        pass


def _cmd_ui(args) -> int:
    import subprocess
    import time
    import urllib.request

    from evomerge.run_dir import read_info, require_run_dir
    from evomerge.tracking import run_url

    require_run_dir(args.run_dir)
    info = read_info(args.run_dir)
    uri = info.get("tracking_uri") or ""

    def page(server: str) -> str:
        if info.get("mlflow_experiment_id") and info.get("mlflow_run_id"):
            return run_url(server, info["mlflow_experiment_id"], info["mlflow_run_id"])
        return server

    if uri.startswith(("http://", "https://")):
        print(page(uri))  # a tracking server already serves the UI
        _open_browser(page(uri), args.no_browser)
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
        print(page(base), flush=True)
        print("MLflow UI running; Ctrl-C stops it", file=sys.stderr, flush=True)
        _open_browser(page(base), args.no_browser)
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
    if args.command is None:  # a newcomer typing `evomerge`: the two commands that matter first
        print(NEWCOMER)
        return EXIT_OK
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
    except RunInterrupted as exc:
        if args.debug:
            raise
        global _abandoned_ray
        _abandoned_ray = isinstance(exc, ClusterLost)
        print(interrupted_line(exc), file=sys.stderr, flush=True)
        return EXIT_RUN_INTERRUPTED
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


_abandoned_ray = False  # the Ray head was lost: this process's Ray connection must not be cleaned up


def interrupted_line(exc: RunInterrupted) -> str:
    """The one line a run stopped by its infrastructure ends with: what happened, how to go on."""
    run_dir = getattr(exc, "run_dir", None)
    where = " --address HOST:PORT" if isinstance(exc, ClusterLost) else ""
    go_on = (f"; it is recorded as interrupted: continue it with `evomerge resume {run_dir}{where}`"
             if run_dir is not None else "")
    return f"interrupted ({exc.what}): {exc.reason}{go_on}"


def entry() -> None:
    """The console command: ``main``, then the exit; after a lost Ray head without Ray's exit-time
    clean-up, which would wait on the dead head (the run's state is already recorded)."""
    code = main()
    if _abandoned_ray:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
