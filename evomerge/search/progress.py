"""How a run reports progress: the protocol the CLI's bar implements, and a silent default."""

from __future__ import annotations

from typing import Optional, Protocol


class Progress(Protocol):
    def start(self, total: int, done: int = 0) -> None: ...
    def advance(self, best: Optional[float], failed: int) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def start(self, total: int, done: int = 0) -> None:
        pass

    def advance(self, best: Optional[float], failed: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
