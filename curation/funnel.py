"""The funnel: every curation step's rows in, rows out, and why each removed row was removed.

A step returns the rows it keeps and a `Rejection` per row it removes; `Funnel.apply` checks that
nothing disappeared (in == out + removed, unless the step declares rows moved to the test split
or added, as the general-data mix does) and keeps the rejected rows for `rejected.jsonl`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Rejection:
    row: dict[str, Any]
    reason: str
    detail: str | None = None
    collided_with: str | None = None


@dataclass
class StepOutcome:
    kept: list[dict[str, Any]]
    rejected: list[Rejection] = field(default_factory=list)
    moved: dict[str, int] = field(default_factory=dict)  # e.g. {"test": 12}: rows leaving to another split
    added: int = 0  # rows that came from outside the responses (general mix)
    info: dict[str, Any] = field(default_factory=dict)


class FunnelError(RuntimeError):
    pass


class Funnel:
    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []

    def record(self, step: str, n_in: int, outcome: StepOutcome) -> list[dict[str, Any]]:
        n_out = len(outcome.kept)
        moved = sum(outcome.moved.values())
        if n_in + outcome.added != n_out + len(outcome.rejected) + moved:
            raise FunnelError(
                f"step {step}: {n_in} in + {outcome.added} added != {n_out} out + {len(outcome.rejected)} removed + {moved} moved"
            )
        removed = Counter(r.reason for r in outcome.rejected)
        entry: dict[str, Any] = {"step": step, "in": n_in, "out": n_out, "removed": dict(sorted(removed.items()))}
        if outcome.moved:
            entry["moved"] = dict(outcome.moved)
        if outcome.added:
            entry["added"] = outcome.added
        entry.update(outcome.info)
        self.steps.append(entry)
        for r in outcome.rejected:
            self.rejected.append(
                {**r.row, "reason": r.reason, "step": step, "detail": r.detail, "collided_with": r.collided_with}
            )
        return outcome.kept

    def removed_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r["reason"] for r in self.rejected).items()))

    def table(self) -> list[tuple[str, int, int, str]]:
        rows = []
        for s in self.steps:
            why = ", ".join(f"{k} {v}" for k, v in s["removed"].items())
            extra = [f"-> {k} {v}" for k, v in s.get("moved", {}).items()]
            if s.get("added"):
                extra.append(f"+ added {s['added']}")
            extra += [f"repaired {k} {v}" for k, v in (s.get("repaired") or {}).items()]  # kept, after a fix
            rows.append((s["step"], s["in"], s["out"], "; ".join(x for x in [why, *extra] if x)))
        return rows
