"""The Pareto front of a multi-objective search (all objectives maximised)."""

from __future__ import annotations

from typing import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and strictly better somewhere."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


class ParetoFront:
    """Non-dominated trials, kept incrementally (equal points are all kept)."""

    def __init__(self) -> None:
        self.members: dict[int, list[float]] = {}

    def add(self, trial_id: int, objectives: Sequence[float]) -> bool:
        """Offer a trial; True if the front changed."""
        point = [float(x) for x in objectives]
        if any(dominates(m, point) for m in self.members.values()):
            return False
        for tid in [t for t, m in self.members.items() if dominates(point, m)]:
            del self.members[tid]
        self.members[trial_id] = point
        return True

    def trial_ids(self) -> list[int]:
        return sorted(self.members)


def front_of(records: Sequence[dict]) -> list[dict]:
    """The complete trial records (with ``objectives``) that no other one dominates, by trial id."""
    front = ParetoFront()
    by_id = {}
    for r in records:
        if r.get("state") == "complete" and r.get("objectives") is not None:
            front.add(r["trial_id"], r["objectives"])
            by_id[r["trial_id"]] = r
    return [by_id[t] for t in front.trial_ids()]
