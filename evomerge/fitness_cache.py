"""Fitness cache: a score is computed once per (what was scored, suite, sources, split).

A *key* is ``recipe:<content hash>`` or ``source:<model name>`` plus the split. Within a run
(``suite.cache: run``, the default) a repeated candidate — common when CMA-ES converges and
candidates are clipped to the same bounds — is answered from the run's own finished trials
without a worker. ``suite.cache: shared`` also keeps scores across runs in
``$EVOMERGE_CACHE/fitness/<fingerprint>.jsonl``: the fingerprint hashes the suite (every
setting that changes a score), the contents of its task dirs (YAML and data files), the
sources (their paths or Hub ids and, for local dirs, the size and mtime of each weight file),
the dtype and the device type, so a changed task, dataset or model never hits stale scores.
Source baselines and test scores are cached the same way, which makes every run after the
first skip them. Failures are never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from evomerge.config import Experiment


def recipe_key(recipe_hash: str) -> str:
    return f"recipe:{recipe_hash}"


def source_key(model: str) -> str:
    return f"source:{model}"


def fingerprint(exp: Experiment, model_dirs: Mapping[str, str], task_paths: Iterable[str]) -> str:
    """What the scores of this experiment depend on, besides the recipe itself."""
    h = hashlib.sha256()
    h.update(exp.suite.content_hash().encode())
    h.update(f"|{exp.dispatch.dtype}|{exp.dispatch.device.split(':')[0]}|".encode())
    for name in sorted(model_dirs):
        path = model_dirs[name]
        h.update(f"model {name} {path}\n".encode())
        folder = Path(path)
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.suffix in (".safetensors", ".json", ".bin"):
                    st = f.stat()
                    h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    for root in sorted(str(p) for p in task_paths):
        for f in sorted(Path(root).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(f"task {f.relative_to(root)}\n".encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:24]


class FitnessCache:
    """Scores by key; in memory, plus an append-only JSONL file when shared."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = path
        self._scores: dict[tuple[str, str], dict[str, Any]] = {}
        self.hits = 0
        if path is not None and path.exists():
            for line in path.read_bytes().splitlines():
                try:
                    rec = json.loads(line.decode("utf-8"))
                    self._scores[(rec["key"], rec["split"])] = rec
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line of a crashed writer

    @classmethod
    def for_run(cls, policy: str, cache_root: Path, exp: Experiment, model_dirs: Mapping[str, str],
                task_paths: Iterable[str]) -> Optional["FitnessCache"]:
        if policy == "off":
            return None
        if policy == "run":
            return cls()
        folder = cache_root / "fitness"
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder / f"{fingerprint(exp, model_dirs, task_paths)}.jsonl")

    def get(self, key: str, split: str) -> Optional[dict[str, Any]]:
        rec = self._scores.get((key, split))
        if rec is not None:
            self.hits += 1
        return rec

    def put(self, key: str, split: str, fitness: float, scores: Mapping[str, float], origin: str,
            persist: bool = True, items: Optional[Mapping[str, Any]] = None) -> None:
        """Remember a score (``persist``: also in the shared file; False when replaying a ledger),
        with its per-item values (``items``) when given."""
        if (key, split) in self._scores:
            return
        rec = {"key": key, "split": split, "fitness": fitness, "scores": dict(scores), "origin": origin}
        if items:
            rec["items"] = dict(items)
        self._scores[(key, split)] = rec
        if persist and self.path is not None:
            line = json.dumps(rec, sort_keys=True) + "\n"
            # one write of one line with O_APPEND: concurrent runs interleave whole lines
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
