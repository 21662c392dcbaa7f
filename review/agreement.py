"""Inter-annotator agreement and teacher accuracy for the review stage (pure Python).

`ratings` is a list of items, each a dict annotator -> categorical value (only submitted
answers). Agreement is reported per question:
- `percent`: mean share of agreeing annotator pairs over items with >= 2 answers,
- `cohen_kappa`: per pair of annotators (over the items both answered) and their mean,
- `fleiss_kappa`: over items with >= 2 answers (variable number of raters per item).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable
from typing import Any


def canonical(value: Any) -> Hashable:
    """A hashable, order-insensitive form of an answer (dicts/lists as sorted JSON)."""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return value


def percent_agreement(ratings: list[dict[str, Hashable]]) -> float | None:
    scores = []
    for item in ratings:
        values = list(item.values())
        if len(values) < 2:
            continue
        pairs = list(itertools.combinations(values, 2))
        scores.append(sum(a == b for a, b in pairs) / len(pairs))
    return sum(scores) / len(scores) if scores else None


def cohen_kappa(a: list[Hashable], b: list[Hashable]) -> float | None:
    """Cohen's kappa of two annotators' answers on the same items."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb.get(k, 0) for k in ca) / (n * n)
    if pe >= 1.0:
        return 1.0 if po >= 1.0 else 0.0
    return (po - pe) / (1 - pe)


def pairwise_cohen(ratings: list[dict[str, Hashable]], min_shared: int = 2) -> dict[str, Any]:
    annotators = sorted({u for item in ratings for u in item})
    pairs: dict[str, dict[str, Any]] = {}
    for u, v in itertools.combinations(annotators, 2):
        shared = [(item[u], item[v]) for item in ratings if u in item and v in item]
        if len(shared) < min_shared:
            continue
        k = cohen_kappa([x for x, _ in shared], [y for _, y in shared])
        pairs[f"{u}|{v}"] = {"n": len(shared), "kappa": _r(k)}
    kappas = [p["kappa"] for p in pairs.values() if p["kappa"] is not None]
    return {"pairs": pairs, "mean": _r(sum(kappas) / len(kappas)) if kappas else None}


def fleiss_kappa(ratings: list[dict[str, Hashable]]) -> float | None:
    items = [list(item.values()) for item in ratings if len(item) >= 2]
    if not items:
        return None
    total = sum(len(vs) for vs in items)
    category_totals: Counter = Counter(v for vs in items for v in vs)
    p_items = []
    for vs in items:
        n = len(vs)
        counts = Counter(vs)
        p_items.append((sum(c * c for c in counts.values()) - n) / (n * (n - 1)))
    p_bar = sum(p_items) / len(p_items)
    p_e = sum((c / total) ** 2 for c in category_totals.values())
    if p_e >= 1.0:
        return 1.0 if p_bar >= 1.0 else 0.0
    return (p_bar - p_e) / (1 - p_e)


def question_agreement(ratings: list[dict[str, Hashable]]) -> dict[str, Any]:
    multi = [r for r in ratings if len(r) >= 2]
    annotators = {u for item in ratings for u in item}
    out: dict[str, Any] = {
        "items": len(ratings),
        "items_with_2plus": len(multi),
        "annotators": len(annotators),
        "percent": _r(percent_agreement(ratings)),
    }
    if multi:
        out["cohen_kappa"] = pairwise_cohen(ratings)
        out["fleiss_kappa"] = _r(fleiss_kappa(ratings))
    return out


def majority(values: Iterable[Hashable], prefer: Hashable | None = None) -> Hashable | None:
    """Most common value; ties go to `prefer` when it is among the tied, else the smallest."""
    counts = Counter(values)
    if not counts:
        return None
    top = max(counts.values())
    tied = [v for v, c in counts.items() if c == top]
    if prefer is not None and prefer in tied:
        return prefer
    return sorted(tied, key=lambda v: str(v))[0]


def teacher_accuracy(pairs: list[tuple[Hashable, Hashable]]) -> dict[str, Any]:
    """(teacher answer, reviewers' final answer) pairs -> accuracy, per label, confusion."""
    n = len(pairs)
    per_label: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    confusion: dict[str, Counter] = defaultdict(Counter)
    for teacher, final in pairs:
        key = str(final)
        per_label[key][0] += 1
        per_label[key][1] += int(teacher == final)
        if isinstance(teacher, str) and isinstance(final, str):
            confusion[teacher][final] += 1
    out: dict[str, Any] = {
        "n": n,
        "accuracy": _r(sum(t == f for t, f in pairs) / n) if n else None,
    }
    if confusion:
        out["per_label"] = {k: {"n": v[0], "accuracy": _r(v[1] / v[0])} for k, v in sorted(per_label.items())}
        out["confusion"] = {t: dict(sorted(c.items())) for t, c in sorted(confusion.items())}
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
