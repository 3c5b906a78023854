"""The trial ledger: an append-only JSONL file, the source of truth of a run.

Each line is one finished record (a trial, or a baseline / test-split score),
written with a single ``write`` + ``fsync``. On read, a torn last line (the
process died mid-write) is ignored.
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
