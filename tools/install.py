#!/usr/bin/env python3
"""Set up evomerge in a virtual environment: exactly the locked versions, in about a minute.

    python3 tools/install.py            # .venv with evomerge (then: .venv/bin/evomerge run experiments/quickstart.yaml)
    python3 tools/install.py --test     # ... and the `test` extra (then: .venv/bin/python -m pytest)
    python3 tools/install.py --pip      # the same install with pip alone (slower; no uv)
    python3 tools/install.py --dry-run  # print the commands, run nothing

What it runs (the venv is created with the Python running this script, and reused if it exists):

1. ``python -m venv .venv``
2. ``.venv/bin/pip install uv==UV_VERSION``: uv resolves and installs in parallel. On a 2-core
   machine pip spends ~75 s resolving alone (it checks every file of every release on the index
   pages, single-threaded) and ~70 s byte-compiling, one file at a time.
3. ``.venv/bin/uv pip install --compile-bytecode -c constraints-cpu.txt -e .[test]``: the same
   constraints as a pip install (``constraints-cpu.txt`` pins torch's CPU build and applies both
   lock files), so the versions are exactly the ones CI tested. Bytecode is compiled at install
   time, on every core, because where ``PYTHONDONTWRITEBYTECODE`` is set (as on CI machines) an
   uncompiled venv recompiles every module in every process (+7 s per worker start).

uv does not read pip's configuration, so the package sources pip is configured with
(``pip config list``: index-url, extra-index-url, find-links, no-index, trusted-host,
constraint, cert; including ``PIP_*`` variables) are passed to uv as the matching options. A
local wheel directory or mirror that pip would use is therefore used by uv too; indexes are
searched like pip does (the best version across all of them: ``--index-strategy
unsafe-best-match``). If uv cannot be installed, or its install fails, the script says so and
installs with pip.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = "constraints-cpu.txt"
UV_VERSION = "0.13.9"

# pip option -> uv option; options pip allows several values of (whitespace-separated) repeat.
_SOURCES = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "trusted-host": "--allow-insecure-host",
    "constraint": "-c",
}
_FLAGS = {"no-index": "--no-index"}
# pip reads [global], then the command's own section, then PIP_* variables (shown as ":env:").
_SECTIONS = ("global", "install", ":env:")


def pip_sources(config_list: str) -> tuple[list[str], dict[str, str]]:
    """uv options and environment for the package sources in ``pip config list`` output.

    Each line reads ``section.key='value'``; files are listed in the order pip loads them, so a
    later value of a key overrides an earlier one, as in pip ([install] over [global] within a
    file, ``PIP_*`` variables over every file).
    """
    values: dict[str, str] = {}
    for line in config_list.splitlines():
        name, sep, value = line.partition("=")
        section, dot, key = name.strip().rpartition(".")
        if not sep or not dot or section not in _SECTIONS:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    options: list[str] = []
    for key, option in _SOURCES.items():
        for item in values.get(key, "").split():
            options += [option, item]
    for key, option in _FLAGS.items():
        if values.get(key, "").lower() in ("1", "true", "yes", "on"):
            options.append(option)
    env = {"SSL_CERT_FILE": values["cert"]} if values.get("cert") else {}
    return options, env


def _has_uv(uv: Path) -> bool:
    """Whether the venv already has uv at UV_VERSION (a re-run skips installing it)."""
    try:
        out = subprocess.run([str(uv), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return out.split()[1:2] == [UV_VERSION]


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def _run(command: list[str], *, env: dict[str, str] | None = None, dry_run: bool, check: bool = True,
         capture: bool = False) -> subprocess.CompletedProcess | None:
    shown = " ".join(shlex.quote(str(part)) for part in command)
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    print(f"+ {prefix + ' ' if prefix else ''}{shown}", flush=True)
    if dry_run:
        return None
    return subprocess.run([str(part) for part in command], cwd=ROOT, check=check, text=True,
                          env={**os.environ, **(env or {})},
                          capture_output=capture)


def _run_uv(command: list[str], *, env: dict[str, str], dry_run: bool) -> None:
    """Run a uv install, passing its summary lines through but not its one line per package."""
    shown = " ".join(shlex.quote(str(part)) for part in command)
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    print(f"+ {prefix + ' ' if prefix else ''}{shown}", flush=True)
    if dry_run:
        return
    with subprocess.Popen([str(part) for part in command], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env={**os.environ, **env}) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith((" + ", " - ", " ~ ")):
                print(line, end="", flush=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", action="store_true", help="also install the `test` extra (pytest, mergekit, ...)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="where the venv goes (default: .venv)")
    parser.add_argument("--pip", action="store_true", help="install with pip only (no uv)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)
    if sys.version_info < (3, 10):
        parser.error(f"evomerge needs Python >= 3.10 (this is {sys.version.split()[0]}); run this script with it")

    started = time.monotonic()
    venv = args.venv if args.venv.is_absolute() else Path.cwd() / args.venv
    python, pip, uv = _bin(venv, "python"), _bin(venv, "pip"), _bin(venv, "uv")
    target = ".[test]" if args.test else "."
    if not python.exists():
        _run([sys.executable, "-m", "venv", venv], dry_run=args.dry_run)
    else:
        print(f"using the existing venv {venv}")

    use_uv = not args.pip
    if use_uv and not _has_uv(uv):
        got = _run([pip, "install", "-q", f"uv=={UV_VERSION}"], dry_run=args.dry_run, check=False)
        if got is not None and got.returncode != 0:
            print(f"could not install uv {UV_VERSION} (exit {got.returncode}); installing with pip instead "
                  "(a few minutes)", flush=True)
            use_uv = False
    if use_uv:
        # read-only, so run even for --dry-run (with this Python's pip while the venv does not exist yet)
        reader = [pip] if pip.exists() else [sys.executable, "-m", "pip"]
        listed = subprocess.run([*map(str, reader), "config", "list"], cwd=ROOT, text=True, capture_output=True)
        options, env = pip_sources(listed.stdout if listed.returncode == 0 else "")
        try:
            _run_uv([uv, "pip", "install", "--python", python, "--compile-bytecode", "--index-strategy",
                     "unsafe-best-match", *options, "-c", CONSTRAINTS, "-e", target], env=env, dry_run=args.dry_run)
        except subprocess.CalledProcessError as exc:  # e.g. a source uv cannot read that pip can
            print(f"the uv install failed (exit {exc.returncode}); installing with pip instead (a few minutes)",
                  flush=True)
            use_uv = False
    if not use_uv:
        _run([pip, "install", "-q", "-c", CONSTRAINTS, "-e", target], dry_run=args.dry_run)

    if not args.dry_run:
        rel = os.path.relpath(venv, Path.cwd())
        following = (f"{rel}/bin/python -m pytest" if args.test
                     else f"{rel}/bin/evomerge run experiments/quickstart.yaml")
        print(f"installed evomerge into {venv} in {time.monotonic() - started:.0f} s; next: {following}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(f"install failed: `{' '.join(map(str, exc.cmd))}` exited with {exc.returncode}", file=sys.stderr)
        sys.exit(exc.returncode or 1)
