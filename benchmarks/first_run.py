"""A newcomer's first run, timed: README command 1 from a fresh clone with empty caches, then again.

Clones this repository (its committed HEAD) into a temporary directory and runs the README's
command 1 exactly as written there (install with ``tools/install.py``, then the quickstart
search), with empty package and zoo caches (``UV_CACHE_DIR``, ``PIP_NO_CACHE_DIR`` and
``EVOMERGE_CACHE`` point at fresh directories), and then once more with everything cached.
Prints the wall time of each phase: install, zoo build (from the zoo's manifest), the rest of
the run; and the quickstart's own summary lines (winner, sources, test scores).

Targets (issue: first contact): under 4 minutes from a fresh clone, install included; under 1
minute cached. Measure on a quiet machine: anything else running on 2 cores shows up here.

Usage: python benchmarks/first_run.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command_1() -> str:
    """The line after ``# 1.`` in the README's first bash block."""
    lines = (ROOT / "README.md").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# 1."):
            return lines[i + 1].strip()
    raise SystemExit("README.md has no '# 1.' command")


def timed(command: str, cwd: Path, env: dict[str, str], log: Path) -> tuple[float, str]:
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"`{command}` failed ({proc.returncode}); log: {log}\n{text[-3000:]}")
    return seconds, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="evomerge-first-run-"))
    work.mkdir(parents=True, exist_ok=True)
    clone = work / "evomerge"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    caches = {name: work / name for name in ("uv-cache", "zoo-cache")}
    for path in caches.values():
        shutil.rmtree(path, ignore_errors=True)
    env = {**os.environ, "UV_CACHE_DIR": str(caches["uv-cache"]), "EVOMERGE_CACHE": str(caches["zoo-cache"]),
           "PIP_NO_CACHE_DIR": "1"}
    command = readme_command_1()
    install, run = command.split(" && ", 1)
    print(f"README command 1: {command}\nin {clone}", flush=True)

    rows = []
    for label in ("fresh clone, empty caches", "again, everything cached"):
        t_install, _ = timed(install, clone, env, work / "install.log")
        t_run, out = timed(run, clone, env, work / "run.log")
        manifest = next(caches["zoo-cache"].rglob("manifest.json"), None)
        build = json.loads(manifest.read_text())["build_seconds"] if manifest and label.startswith("fresh") else 0.0
        rows.append((label, t_install, build, t_run))
        summary = [line for line in out.splitlines()
                   if re.match(r"(best|source|base|expert_\w+|trials|time)\b", line)]
        print(f"\n{label}: total {t_install + t_run:.0f} s = install {t_install:.0f} s + run {t_run:.0f} s "
              f"(zoo build {build:.0f} s)", flush=True)
        print("\n".join("  " + line for line in summary), flush=True)
    print("\n| run | total | install | zoo build | rest of the run |\n|---|---|---|---|---|")
    for label, t_install, build, t_run in rows:
        print(f"| {label} | {t_install + t_run:.0f} s | {t_install:.0f} s | {build:.0f} s | {t_run - build:.0f} s |")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
