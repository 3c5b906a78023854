"""The run directory: its layout, its lock, and every read and write of its small files.

A run dir holds ``ledger.jsonl`` (the source of truth, see :mod:`evomerge.ledger`),
``run.json`` (ids, tracking URI, status), ``experiment.yaml`` (the resolved config) and
``experiment.source.yaml`` (as written), ``summary.json``, ``best_recipe.yaml``,
``pareto.json``, ``items.jsonl`` (per-item scores, see :class:`ItemLog`), ``heartbeat.json``
(see :mod:`evomerge.heartbeat`), ``plots/``, the sqlite MLflow store and ``.lock``. Other modules name these
files through the constants of :mod:`evomerge.run_layout` (also here), never by spelling them.

Paths in ``run.json`` that point inside the run dir (the default sqlite MLflow store) are
stored relative to it, as ``{run_dir}/...``, and expanded on reading against wherever the run
dir is now: a copied or moved run dir resumes, syncs and opens in the UI against its *own*
store, never the original's.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any, Optional

import yaml

from evomerge.config import Experiment, parse_experiment
from evomerge.errors import EvomergeError
from evomerge.ledger import Ledger
from evomerge.run_layout import (BEST_RECIPE, EXPERIMENT_COPY, EXPERIMENT_SOURCE, HEARTBEAT, ITEMS, LEDGER,  # noqa: F401
                                 LOCK, PARETO, PLOTS, RUN_INFO, SUMMARY, best_recipe_path, experiment_path,
                                 heartbeat_path, pareto_path, plots_dir, recipe_file)

_HERE = "{run_dir}"
_PATH_KEYS = ("tracking_uri",)


def _relative(value: str, run_dir: Path) -> str:
    root = str(Path(run_dir).resolve())
    for prefix in ("sqlite:///", ""):
        if value.startswith(prefix + root + os.sep):
            return prefix + _HERE + value[len(prefix + root):]
    return value


def _absolute(value: str, run_dir: Path) -> str:
    return value.replace(_HERE, str(Path(run_dir).resolve()), 1) if _HERE in value else value


def read_info(run_dir: Path) -> dict[str, Any]:
    """``run.json`` with its run-dir-relative paths made absolute for where the dir is now."""
    info = json.loads((Path(run_dir) / RUN_INFO).read_text())
    for key in _PATH_KEYS:
        if isinstance(info.get(key), str):
            info[key] = _absolute(info[key], run_dir)
    return info


def write_info(run_dir: Path, info: dict[str, Any]) -> None:
    """Write ``run.json`` atomically, paths inside the run dir stored relative to it."""
    stored = dict(info)
    for key in _PATH_KEYS:
        if isinstance(stored.get(key), str):
            stored[key] = _relative(stored[key], run_dir)
    write_json_atomic(Path(run_dir) / RUN_INFO, stored)


def write_json_atomic(path: Path, data: Any) -> None:
    """Temp file + fsync + rename (+ fsync of the directory): readers see the old or the new file, whole."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_ledger(run_dir: Path) -> Ledger:
    """The run's ledger (see :mod:`evomerge.ledger`)."""
    return Ledger(Path(run_dir) / LEDGER)


def has_ledger(run_dir: Path) -> bool:
    return (Path(run_dir) / LEDGER).exists()


def has_info(run_dir: Path) -> bool:
    return (Path(run_dir) / RUN_INFO).exists()


def require_run_dir(run_dir: Path, *, ledger: bool = False) -> None:
    """EvomergeError unless ``run_dir`` holds a run (its ``run.json``, or its ledger)."""
    name, present = (LEDGER, has_ledger(run_dir)) if ledger else (RUN_INFO, has_info(run_dir))
    if not present:
        raise EvomergeError(f"{run_dir} is not an evomerge run directory (no {name})")


def write_experiment(run_dir: Path, exp: Experiment, source: Optional[Path] = None) -> list[Path]:
    """The resolved experiment (``experiment.yaml``) and, if given, the file as written
    (``experiment.source.yaml``); returns the paths written."""
    written = [Path(run_dir) / EXPERIMENT_COPY]
    written[0].write_text(exp.to_yaml())
    if source is not None and Path(source).is_file():
        written.append(Path(run_dir) / EXPERIMENT_SOURCE)
        written[1].write_text(Path(source).read_text())
    return written


def read_experiment_data(run_dir: Path) -> dict[str, Any]:
    """The run's resolved experiment as plain data (``experiment.yaml``, unvalidated)."""
    return yaml.safe_load((Path(run_dir) / EXPERIMENT_COPY).read_text())


def save_best_recipe(run_dir: Path, recipe) -> Path:
    """Write the run's best recipe (``best_recipe.yaml``)."""
    path = best_recipe_path(run_dir)
    recipe.save(path)
    return path


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """The finished search's summary (``summary.json``), atomically."""
    write_json_atomic(Path(run_dir) / SUMMARY, summary)


def artifacts(run_dir: Path) -> list[Path]:
    """The run's small files worth keeping beside its tracker run, those that exist:
    experiment, summary, ledger, best recipe, Pareto front."""
    run_dir = Path(run_dir)
    return [run_dir / n for n in (EXPERIMENT_COPY, SUMMARY, LEDGER, BEST_RECIPE, PARETO) if (run_dir / n).exists()]


def new_run_id(name: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def load_run_experiment(run_dir: Path) -> Experiment:
    """The resolved experiment a run was started with (its ``experiment.yaml``)."""
    path = Path(run_dir) / EXPERIMENT_COPY
    if not (Path(run_dir) / RUN_INFO).exists() or not path.exists():
        raise EvomergeError(f"{run_dir} is not an evomerge run directory (no {RUN_INFO} / {EXPERIMENT_COPY})")
    return parse_experiment(yaml.safe_load(path.read_text()), Path(run_dir))


class RunLock:
    """An exclusive lock on a run directory, held while a controller works on it.

    An flock dies with its process (even on SIGKILL), so a crashed run is never
    left locked; two controllers can never write one ledger.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise EvomergeError(f"run {self.path.parent} is in use by {holder}; wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def is_held(run_dir: Path) -> bool:
        path = Path(run_dir) / LOCK
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


class ItemLog:
    """``items.jsonl``: the per-item scores of every search-split evaluation (trials, each racing
    rung, baselines), for racing, cheap-fitness studies and niche-based optimizers.

    Compact: a document list is written once (a ``docs`` line with a short key) and referred
    to by its key; values that are all 0 or 1 are a string of ``0``/``1`` characters, others a
    list of numbers. A score line: ``{"trial_id": 12 | "source": "base", "rung": 0 | null,
    "task": leaf task, "docs": key, "values": "0110..."}``. Appended and flushed per line; not
    the source of truth (the ledger is), so a torn last line is skipped on reading.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ITEMS
        self._keys: dict[tuple[str, tuple[int, ...]], str] = {}
        for rec in read_items_raw(self.path):
            if rec.get("kind") == "docs":
                self._keys[(rec["task"], tuple(rec["docs"]))] = rec["key"]

    def append(self, items: Optional[dict], *, trial_id: Optional[int] = None, source: Optional[str] = None,
               rung: Optional[int] = None) -> None:
        if not items:
            return
        import hashlib

        lines = []
        for leaf, entry in sorted(items.items()):
            docs = tuple(int(d) for d in entry["docs"])
            key = self._keys.get((leaf, docs))
            if key is None:
                key = hashlib.sha256(json.dumps([leaf, docs]).encode()).hexdigest()[:12]
                self._keys[(leaf, docs)] = key
                lines.append({"kind": "docs", "key": key, "task": leaf, "docs": list(docs)})
            packed = pack_values(entry["values"])
            owner = {"trial_id": trial_id} if source is None else {"source": source}
            lines.append({"kind": "score", **owner, "rung": rung, "task": leaf, "docs": key, "values": packed})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))
            f.flush()


def pack_values(values) -> Any:
    """Per-item values as stored: a string of ``0``/``1`` when all are 0 or 1, else a list of numbers."""
    return ("".join("1" if v == 1 else "0" for v in values) if all(v in (0, 1) for v in values)
            else [float(v) for v in values])


def unpack_values(packed: Any) -> list[float]:
    """The inverse of :func:`pack_values`."""
    return [float(c) for c in packed] if isinstance(packed, str) else [float(v) for v in packed]


def read_items_raw(path: Path) -> list[dict]:
    """The lines of an ``items.jsonl`` (a torn or damaged line is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out


def read_items(run_dir: Path) -> list[dict]:
    """Every per-item score of a run, expanded: ``{"trial_id" | "source", "rung", "task",
    "items": {doc id: value}}``, in the order they were written."""
    docs: dict[str, list[int]] = {}
    out = []
    for rec in read_items_raw(Path(run_dir) / ITEMS):
        if rec.get("kind") == "docs":
            docs[rec["key"]] = rec["docs"]
        elif rec.get("kind") == "score" and rec.get("docs") in docs:
            values = unpack_values(rec["values"])
            owner = {k: rec[k] for k in ("trial_id", "source") if k in rec}
            out.append({**owner, "rung": rec.get("rung"), "task": rec["task"],
                        "items": dict(zip(docs[rec["docs"]], values))})
    return out
