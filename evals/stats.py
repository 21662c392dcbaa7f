"""Bootstrap confidence intervals and paired comparisons.

All resampling is over items (rows of the test split or benchmark questions) with a fixed seed, so
a report is reproducible. Percentile intervals; `n_boot=0` gives point estimates only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

DEFAULT_SEED = 20240601


def _rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(DEFAULT_SEED if seed is None else seed)


def bootstrap_indices(n: int, n_boot: int, seed: int | None = None) -> np.ndarray:
    """(n_boot, n) matrix of resampled item indices."""
    return _rng(seed).integers(0, n, size=(n_boot, n)) if n and n_boot else np.zeros((0, n), dtype=int)


def mean_ci(values: Sequence[float], n_boot: int = 1000, seed: int | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """Mean of per-item scores with a percentile bootstrap interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    out: dict[str, Any] = {"value": float(x.mean()), "ci_low": None, "ci_high": None, "n": int(x.size)}
    if n_boot:
        means = x[bootstrap_indices(x.size, n_boot, seed)].mean(axis=1)
        out["ci_low"], out["ci_high"] = _percentiles(means, alpha)
    return out


def statistic_ci(
    items: Sequence[Any], statistic: Callable[[list[Any]], float], n_boot: int = 1000,
    seed: int | None = None, alpha: float = 0.05,
) -> dict[str, Any]:
    """Any statistic over a list of items (e.g. macro-F1 over (gold, pred) pairs) with a bootstrap CI."""
    items = list(items)
    if not items:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    out: dict[str, Any] = {"value": float(statistic(items)), "ci_low": None, "ci_high": None, "n": len(items)}
    if n_boot:
        stats = np.array([statistic([items[i] for i in idx]) for idx in bootstrap_indices(len(items), n_boot, seed)])
        out["ci_low"], out["ci_high"] = _percentiles(stats, alpha)
    return out


def _percentiles(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def paired_diff(
    a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int | None = None, alpha: float = 0.05,
) -> dict[str, Any]:
    """Compare per-item scores of two systems on the same items: b - a.

    Returns the mean difference with a paired bootstrap CI, the relative change (b-a)/a with its CI
    (from the same resamples), a two-sided sign-flip permutation p-value, and for 0/1 scores the
    discordant counts and the exact McNemar p-value.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired comparison needs the same items: {x.size} vs {y.size}")
    n = int(x.size)
    out: dict[str, Any] = {"n": n, "a": None, "b": None, "delta": None, "delta_ci": [None, None],
                           "relative": None, "relative_ci": [None, None], "p_value": None}
    if n == 0:
        return out
    d = y - x
    out.update(a=float(x.mean()), b=float(y.mean()), delta=float(d.mean()))
    out["relative"] = float(d.mean() / x.mean()) if x.mean() else None
    if n_boot:
        idx = bootstrap_indices(n, n_boot, seed)
        ma, md = x[idx].mean(axis=1), d[idx].mean(axis=1)
        out["delta_ci"] = list(_percentiles(md, alpha))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = md / ma
        rel = rel[np.isfinite(rel)]
        if rel.size:
            out["relative_ci"] = list(_percentiles(rel, alpha))
        out["p_value"] = sign_flip_p(d, n_perm=max(n_boot, 1000), seed=seed)
    if np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all():
        b01 = int(((x == 1) & (y == 0)).sum())
        b10 = int(((x == 0) & (y == 1)).sum())
        out.update(lost=b01, gained=b10, mcnemar_p=mcnemar_exact(b01, b10))
    return out


def sign_flip_p(d: np.ndarray, n_perm: int = 2000, seed: int | None = None) -> float:
    """Two-sided p-value of mean(d) == 0 by random sign flips of the paired differences."""
    d = np.asarray(d, dtype=float)
    observed = abs(d.mean())
    if observed == 0:
        return 1.0
    signs = _rng(seed).choice([-1.0, 1.0], size=(n_perm, d.size))
    null = np.abs((signs * d).mean(axis=1))
    return float((1 + (null >= observed - 1e-12).sum()) / (n_perm + 1))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar test on discordant pair counts (binomial, p=0.5)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def pct_ci(m: dict | None, unit: str = "") -> str:
    """A proportion with its CI as text: `75.0 [62.5, 87.5]` (`-` when absent). One format for the
    report, `stepwise compare`, the student-vs-teacher table and the experiment report."""
    if not m or m.get("value") is None:
        return "-"
    if m.get("ci_low") is None:
        return f"{100 * m['value']:.1f}{unit}"
    return f"{100 * m['value']:.1f}{unit} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]"
