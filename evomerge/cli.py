"""Command line: evomerge run | validate | zoo build | export.

Exit codes: 0 success; 1 a run or command failed; 2 invalid input (bad config,
missing file, unknown option); 130 interrupted. Errors are one line (or one
line per config problem); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from evomerge.errors import ConfigError, EvomergeError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _BarProgress:
    """tqdm progress bar on stderr with the best fitness so far."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._bar = None

    def start(self, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc="search", unit="trial", file=sys.stderr, dynamic_ncols=True, disable=False)

    def advance(self, best: Optional[float], failed: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix(best=f"{best:.4f}" if best is not None else "-", failed=failed, refresh=False)
            self._bar.update(1)

    def message(self, text: str) -> None:
        if self.quiet:
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

    v = sub.add_parser("validate", help="check an experiment YAML and report every problem")
    v.add_argument("experiment", type=Path)

    z = sub.add_parser("zoo", help="the embedded tiny model zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="build (or find cached) the tiny model zoo")
    zb.add_argument("--kind", default="cross-skill", choices=["cross-skill", "cross-skill-full", "tiny"])
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--force", action="store_true", help="rebuild even if cached")

    e = sub.add_parser("export", help="export a run's best recipe")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--format", default="recipe", choices=["recipe"])
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--trial", type=int, help="export this trial instead of the best")
    return p


def _cmd_validate(args) -> int:
    from evomerge.config import load_experiment

    exp = load_experiment(args.experiment)
    print(f"{args.experiment}: ok ({exp.name}: {len(exp.models)} models, method {exp.search_space.method}, "
          f"{exp.budget.max_trials} trials)")
    return EXIT_OK


def _cmd_run(args) -> int:
    from evomerge.config import load_experiment
    from evomerge.controller import Controller, new_run_id

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
    exp = exp.model_copy(update=updates)
    run_dir = args.run_dir or Path("runs") / new_run_id(exp.name)
    progress = _BarProgress(args.quiet)
    progress.message(f"run {run_dir.name}: {run_dir}")
    summary = Controller(exp, run_dir, progress=progress).run()
    _print_summary(summary)
    return EXIT_OK


def _print_summary(s) -> None:
    rows = [("trials", f"{s.trials} ({s.failed} failed)")]
    if s.best_fitness is not None:
        rows.append(("best fitness (search)", f"{s.best_fitness:.4f}  trial {s.best_trial}, recipe {s.best_recipe_hash}"))
    for name, value in sorted(s.baselines.items()):
        rows.append((f"source {name} (search)", f"{value:.4f}"))
    for name, value in sorted(s.test_scores.items(), key=lambda kv: (kv[0] != "best", kv[0])):
        rows.append((f"{name} (test)", f"{value:.4f}"))
    rows.append(("best recipe", str(s.run_dir / "best_recipe.yaml")))
    rows.append(("mlflow", f"{s.tracking_uri}  run {s.mlflow_run_id}" if s.mlflow_run_id else "off"))
    rows.append(("time", f"{s.seconds:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _cmd_zoo(args) -> int:
    from evomerge.zoo import build_zoo

    zoo = build_zoo(kind=args.kind, seed=args.seed, force=args.force,
                    progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(zoo.root)
    return EXIT_OK


def _cmd_export(args) -> int:
    from evomerge.export import export

    path = export(args.run_dir, args.out, fmt=args.format, trial=args.trial)
    print(path)
    return EXIT_OK


COMMANDS = {"run": _cmd_run, "validate": _cmd_validate, "zoo": _cmd_zoo, "export": _cmd_export}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
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
