"""Step 8: class balance (the seeds: a 10:1 imbalance teaches the model the majority class).

Per split, each class is capped at `max_per_class` and at `max_ratio` x the smallest class; the
rows kept within a capped class are the best by the dedup rule (parse status, agreement), ties
broken by a seeded hash of the id, so the choice is deterministic. The histogram before and after
goes into the funnel. The test split is never balanced (it measures the real distribution).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import Any

from stepwise.curation.funnel import Rejection, StepOutcome

from stepwise.recipe import Recipe


def _tiebreak(seed: int, rid: str) -> str:
    return hashlib.sha256(f"balance\x1f{seed}\x1f{rid}".encode()).hexdigest()


def caps(counts: Counter, max_per_class: int | None, max_ratio: float | None) -> dict[str, int]:
    if not counts:
        return {}
    cap = max_per_class if max_per_class is not None else max(counts.values())
    smallest = min(counts.values())
    if max_ratio is not None:
        cap = min(cap, int(max_ratio * smallest))
    return {c: min(n, max(cap, 1)) for c, n in counts.items()}


def balance_rows(
    rows: list[dict[str, Any]], max_per_class: int | None, max_ratio: float | None, seed: int
) -> tuple[list[dict[str, Any]], list[Rejection]]:
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_class[str(row.get("label"))].append(row)
    counts = Counter({c: len(v) for c, v in by_class.items()})
    limit = caps(counts, max_per_class, max_ratio)
    smallest = min(counts, key=lambda c: (counts[c], c)) if counts else None
    drop: set[int] = set()
    rejected = []
    for cls, members in by_class.items():
        if len(members) <= limit[cls]:
            continue
        ranked = sorted(members, key=lambda r: (
            0 if r.get("parse_status") == "ok" else 1, -(r.get("agreement") or 0.0), _tiebreak(seed, str(r["id"]))))
        why = (f"class '{cls}' capped at {limit[cls]} of {len(members)} "
               f"(max_per_class={max_per_class}, max_ratio={max_ratio}, smallest class '{smallest}' has {counts[smallest]})")
        for r in ranked[limit[cls]:]:
            drop.add(id(r))
            rejected.append(Rejection(r, "class_balance", why))
    return [r for r in rows if id(r) not in drop], rejected


def balance_step(splits: dict[str, list[dict[str, Any]]], recipe: Recipe) -> tuple[dict[str, list[dict[str, Any]]], StepOutcome]:
    spec = recipe.curation.balance
    n_in = sum(len(v) for v in splits.values())
    hist_before = {k: dict(sorted(Counter(str(r.get("label")) for r in v).items())) for k, v in splits.items()}
    if not recipe.task.is_classification or (spec.max_per_class is None and spec.max_ratio is None):
        outcome = StepOutcome([r for v in splits.values() for r in v], info={"histogram_before": hist_before,
                                                                         "histogram_after": hist_before})
        return splits, outcome
    out: dict[str, list[dict[str, Any]]] = {}
    rejected: list[Rejection] = []
    n_train = max(len(splits.get("train", [])), 1)
    for name, rows in splits.items():
        per_class = spec.max_per_class
        if per_class is not None and name != "train":
            per_class = max(1, round(per_class * len(rows) / n_train))
        out[name], rej = balance_rows(rows, per_class, spec.max_ratio, recipe.curation.seed)
        rejected.extend(rej)
    hist_after = {k: dict(sorted(Counter(str(r.get("label")) for r in v).items())) for k, v in out.items()}
    kept = [r for v in out.values() for r in v]
    assert len(kept) + len(rejected) == n_in
    return out, StepOutcome(kept, rejected, info={"histogram_before": hist_before, "histogram_after": hist_after})
