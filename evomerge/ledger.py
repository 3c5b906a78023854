"""The trial ledger: an append-only JSONL file, the source of truth of a run.

Each line is one record, written with a single ``write`` + ``fsync``; on read, a
torn last line (the process died mid-write: no newline yet, whatever its bytes) is ignored.
Any other line that is not a JSON record stops every reader with :class:`LedgerError`,
naming the file and line and the way out (``evomerge resume RUN --repair`` moves such lines
to ``ledger.damaged.jsonl``). Lines are read as bytes and decoded one at a time, so a torn
tail of binary garbage never breaks a reader. Kinds:

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

from evomerge.errors import EvomergeError

DAMAGED = "ledger.damaged.jsonl"


class LedgerError(EvomergeError):
    """A ledger line that is neither a record nor the torn last line."""


def _record(raw: bytes) -> dict[str, Any]:
    """One complete ledger line as a record; ValueError saying why it is not one."""
    data = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"a JSON {type(data).__name__} without a 'kind', not a record")
    return data


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
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # read-only or full disk: the run cannot record, so it stops here
            raise LedgerError(f"cannot append to {self.path} ({type(exc).__name__}: {exc.strerror or exc}); the run "
                              "stops (every record written so far is kept): make the run dir writable, then "
                              f"`evomerge resume {self.path.parent}`") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    break  # torn last line: never acknowledged, ignore
                try:
                    yield _record(line)
                except ValueError as exc:
                    reason = str(exc).splitlines()[0][:200]
                    raise LedgerError(
                        f"{self.path}, line {number}: not a ledger record ({type(exc).__name__}: {reason}). "
                        f"`evomerge resume {self.path.parent} --repair` moves every damaged line to "
                        f"{DAMAGED} and goes on (trials whose records are lost are evaluated again); or "
                        "restore the file from a backup") from None

    def salvage(self) -> list[int]:
        """Move every complete line that is not a record to ``ledger.damaged.jsonl`` (appended,
        each prefixed by its line number) and rewrite the ledger without them, atomically; the
        numbers of the lines moved. Only the run's owner (holding its lock) may call this."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        keep, bad, moved = [], [], []
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            if not line.endswith(b"\n"):
                continue  # the torn tail: dropped, as repair() would
            try:
                _record(line)
                keep.append(line)
            except ValueError:
                bad.append(f"{number}\t".encode() + line)
                moved.append(number)
        if moved:
            with open(self.path.parent / DAMAGED, "ab") as f:
                f.writelines(bad)
                f.flush()
                os.fsync(f.fileno())
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "wb") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return moved

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self if kind is None or r.get("kind") == kind]


def counts_for_best(rec: dict[str, Any]) -> bool:
    """Whether a trial record may be the run's best: a racing trial only when scored on the last
    rung (a score on a few items is not compared with full ones; see :mod:`evomerge.racing`)."""
    return rec.get("rung") is None or rec.get("rung") == rec.get("last_rung")


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The complete trial record with the highest fitness; ties go to the one finished first
    (ledger order) — the rule the controller uses for best_recipe.yaml. Racing: among the trials
    scored on the last rung."""
    best = None
    for r in trials:
        if r.get("state") == "complete" and counts_for_best(r) and (best is None or r["fitness"] > best["fitness"]):
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
