"""Step 6: deterministic, seeded, stratified train/val/test split.

Hand-written (a dozen lines) because the properties we need are specific: the assignment depends
only on the row ids, the seed and the stratum, never on input order; each stratum is split with
largest-remainder rounding so every split holds its share of each class (within one row); a
stratum too small to share goes to train first.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

SPLITS = ("train", "val", "test")


def _order_key(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{row_id}".encode()).hexdigest()


def allocate(n: int, ratios: Sequence[float]) -> list[int]:
    """Split n items by ratios with largest-remainder rounding (sums to n)."""
    total = sum(ratios)
    if n == 0 or total <= 0:
        return [0] * len(ratios)
    exact = [n * r / total for r in ratios]
    counts = [int(x) for x in exact]
    rest = n - sum(counts)
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def stratified_split(
    rows: Sequence[dict[str, Any]], ratios: dict[str, float], seed: int,
    stratum: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Assign every row to one split name of `ratios`; which split does not depend on the order of `rows`."""
    names = list(ratios)
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = stratum(row) if stratum else None
        groups[str(key) if key is not None else ""].append(row)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda r: _order_key(seed, str(r["id"])))
        counts = allocate(len(members), [ratios[n] for n in names])
        start = 0
        for name, c in zip(names, counts, strict=True):
            out[name].extend(members[start : start + c])
            start += c
    position = {id(row): i for i, row in enumerate(rows)}
    for name in names:
        out[name].sort(key=lambda r: position[id(r)])  # files keep input order
    return out
