"""The trial ledger: an append-only JSONL file, the source of truth of a run.

Each line is one record, written with a single ``write`` + ``fsync``; on read, a
torn last line (the process died mid-write) is ignored. Kinds:

- ``dispatch``: a candidate handed to a worker (trial id, island, generation, member, genome);
- ``trial``: its result (state, fitness, scores, timings, error, worker, attempts);
- ``tell``: a complete generation told to an island's optimizer (values, optimizer state);
- ``baseline`` / ``test``: a source model's search score, the test-split scores.

``evomerge resume`` rebuilds a run from these alone (see ``islands.replay``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def repair(self) -> None:
        """Cut a torn last line left by a process that died mid-write.

        Only the process that owns the run (holding its lock) may call this: a reader
        could otherwise cut a line another process is writing.
        """
        if self.path.exists() and not _ends_with_newline(self.path):
            _drop_torn_tail(self.path)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn last line: never acknowledged, ignore
                yield json.loads(line)

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self if kind is None or r.get("kind") == kind]


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The complete trial record with the highest fitness; ties go to the one finished first
    (ledger order) — the rule the controller uses for best_recipe.yaml."""
    best = None
    for r in trials:
        if r.get("state") == "complete" and (best is None or r["fitness"] > best["fitness"]):
            best = r
    return best


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _drop_torn_tail(path: Path) -> None:
    """Cut a torn last line (a write the process died in) before appending after it."""
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    with open(path, "r+b") as f:
        f.truncate(len(keep))
        f.flush()
        os.fsync(f.fileno())
