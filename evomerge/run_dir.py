"""``run.json``, the run dir's small state file, read and written so that the run dir can move.

Paths that point inside the run dir (the default sqlite MLflow store) are stored relative to
it, as ``{run_dir}/...``, and expanded on reading against wherever the run dir is now: a
copied or moved run dir resumes, syncs and opens in the UI against its *own* store, never
the original's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUN_INFO = "run.json"
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
