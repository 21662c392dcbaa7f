"""Classification metrics on parsed student answers.

`pred` is the canonical class name, or None when the answer was missing or not a class (an
invalid answer). Invalid answers count as wrong for accuracy and F1 and are reported separately
as the invalid-answer rate; in the confusion matrix they go to an `<invalid>` column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from stepwise.evals.stats import bootstrap_indices, mean_ci

INVALID = "<invalid>"


def accuracy(gold: Sequence[str], pred: Sequence[str | None]) -> float:
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold) if gold else 0.0


def per_class(gold: Sequence[str], pred: Sequence[str | None], classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support per class. A class never predicted has precision 0."""
    out: dict[str, dict[str, Any]] = {}
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, pred, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, pred, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[c] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn, "predicted": tp + fp}
    return out


def macro_f1(gold: Sequence[str], pred: Sequence[str | None], classes: Sequence[str] | None = None) -> float:
    """Unweighted mean F1 over the classes present in gold (or the given label set)."""
    labels = list(classes) if classes is not None else sorted(set(gold))
    labels = [c for c in labels if c in set(gold)] or labels
    if not labels:
        return 0.0
    pc = per_class(gold, pred, labels)
    return sum(v["f1"] for v in pc.values()) / len(labels)


def confusion_matrix(gold: Sequence[str], pred: Sequence[str | None], classes: Sequence[str]) -> dict[str, Any]:
    """Rows = gold class, columns = predicted class plus `<invalid>`."""
    cols = list(classes) + [INVALID]
    index = {c: i for i, c in enumerate(cols)}
    matrix = [[0] * len(cols) for _ in classes]
    row_of = {c: i for i, c in enumerate(classes)}
    for g, p in zip(gold, pred, strict=True):
        if g not in row_of:
            continue
        matrix[row_of[g]][index.get(p, index[INVALID]) if p is not None else index[INVALID]] += 1
    return {"labels": list(classes), "columns": cols, "matrix": matrix}


def classification_report(
    gold: Sequence[str], pred: Sequence[str | None], classes: Sequence[str], n_boot: int = 1000, seed: int | None = None,
) -> dict[str, Any]:
    """Headline metrics with bootstrap 95% CIs, per-class precision/recall, confusion matrix."""
    gold, pred = list(gold), list(pred)
    labels = [c for c in classes if c in set(gold)] or list(classes)
    correct = [float(g == p) for g, p in zip(gold, pred, strict=True)]
    invalid = [float(p is None or p not in classes) for p in pred]
    return {
        "n": len(gold),
        "metrics": {
            "accuracy": mean_ci(correct, n_boot, seed),
            "macro_f1": macro_f1_ci(gold, pred, labels, n_boot, seed),
            "invalid_rate": mean_ci(invalid, n_boot, seed),
        },
        "per_class": per_class(gold, pred, classes),
        "confusion": confusion_matrix(gold, pred, classes),
        "item_scores": {"accuracy": correct},
    }


def macro_f1_ci(
    gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str], n_boot: int = 1000, seed: int | None = None,
) -> dict[str, Any]:
    """Macro-F1 with a percentile bootstrap CI, vectorised (77 classes x thousands of rows is fine).
    Each resample averages over the labels present in its own gold, like `macro_f1`."""
    value = macro_f1(gold, pred, labels)
    out: dict[str, Any] = {"value": value, "ci_low": None, "ci_high": None, "n": len(gold)}
    if not gold or not n_boot:
        return out
    index = {c: i for i, c in enumerate(labels)}
    k = len(labels)
    g = np.array([index.get(x, k) for x in gold])
    p = np.array([index.get(x, k) if x is not None else k for x in pred])
    stats = np.empty(n_boot)
    for b, idx in enumerate(bootstrap_indices(len(gold), n_boot, seed)):
        gb, pb = g[idx], p[idx]
        tp = np.bincount(gb[(gb == pb) & (gb < k)], minlength=k + 1)[:k]
        support = np.bincount(gb, minlength=k + 1)[:k]
        predicted = np.bincount(pb, minlength=k + 1)[:k]
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
            rec = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
            f1 = np.where(prec + rec > 0, 2 * prec * rec / np.where(prec + rec > 0, prec + rec, 1), 0.0)
        present = support > 0
        stats[b] = f1[present].mean() if present.any() else 0.0
    lo, hi = np.percentile(stats, [2.5, 97.5])
    out["ci_low"], out["ci_high"] = float(lo), float(hi)
    return out
