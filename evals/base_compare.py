"""Did the student learn the task? The base model's task metrics beside the student's, paired on
the same test items.

`evaluate_base_task` runs the base model on the test rows exactly as the student is run (same
prompt, parser and metrics) and caches the result in the run (`eval/base_task.json` +
`eval/base_task_predictions.jsonl`, keyed by the base model's weights, the test rows and the task
eval settings), so a re-run, or a second student of the same run, pays for the student only.
`compare_to_base` pairs the two by test-row id: for each headline metric the base value, the
student value and the difference student - base with a paired bootstrap 95% CI (plus McNemar's
exact p for 0/1 scores); macro-F1 is not a per-item score, so its difference is bootstrapped by
resampling items jointly for both models.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from stepwise.evals.classification import macro_f1
from stepwise.evals.modelref import ModelRef
from stepwise.evals.stats import _percentiles, bootstrap_indices, paired_diff, sign_flip_p
from stepwise.evals.task_eval import HEADLINE_TASK, evaluate_task

from stepwise.io import atomic_write_json, atomic_write_jsonl, canonical_json, read_jsonl, sha256_text
from stepwise.recipe import Recipe

BASE_REPORT = "base_task.json"
BASE_PREDICTIONS = "base_task_predictions.jsonl"
ITEM_METRICS = {"classification": ("accuracy", "invalid_rate"),
                "structured": ("exact_match", "partial_f1", "json_valid", "schema_valid")}


def base_cache_key(recipe: Recipe, base: ModelRef, rows: list[dict[str, Any]], device: str) -> str:
    spec = recipe.eval.task
    ident = {"base": base.identity(), "rows": [[r.get("id"), r.get("input"), r.get("gold")] for r in rows],
             "max_new_tokens": spec.max_new_tokens, "limit": spec.limit, "dss_output": recipe.training.dss_output,
             "task": recipe.task.model_dump(mode="json"), "device": device}
    return sha256_text(canonical_json(ident))[:20]


def evaluate_base_task(
    recipe: Recipe, base: ModelRef, rows: list[dict[str, Any]], eval_dir: Path, *, device: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """(base report, base predictions, served from the run's cache)."""
    key = base_cache_key(recipe, base, rows, device)
    report_path, preds_path = eval_dir / BASE_REPORT, eval_dir / BASE_PREDICTIONS
    if report_path.exists() and preds_path.exists():
        cached = json.loads(report_path.read_text(encoding="utf-8"))
        if cached.get("cache_key") == key:
            return cached, read_jsonl(preds_path), True
    report, preds = evaluate_task(recipe, base, rows, device=device, progress=progress)
    report["headline"] = {k: report["metrics"][k] for k in HEADLINE_TASK[report["task_type"]] if k in report["metrics"]}
    report["cache_key"] = key
    atomic_write_jsonl(preds_path, preds)
    atomic_write_json(report_path, report)
    return report, preds, False


def _item_score(pred: dict[str, Any], metric: str) -> float | None:
    if metric == "accuracy":
        return pred.get("correct")
    if metric == "invalid_rate":
        return None if pred.get("gold") is None else float(pred.get("pred") is None)
    value = pred.get(metric)
    return None if value is None else float(value)


def _paired_macro_f1(gold: list[str], base: list[str | None], student: list[str | None], labels: list[str],
                     n_boot: int) -> dict[str, Any]:
    a, b = macro_f1(gold, base, labels), macro_f1(gold, student, labels)
    out: dict[str, Any] = {"n": len(gold), "a": a, "b": b, "delta": b - a, "delta_ci": [None, None], "p_value": None}
    if not n_boot or not gold:
        return out
    g, x, y = np.asarray(gold, dtype=object), np.asarray(base, dtype=object), np.asarray(student, dtype=object)
    diffs = []
    for idx in bootstrap_indices(len(gold), n_boot):
        gi = list(g[idx])
        present = [c for c in labels if c in set(gi)]
        diffs.append(macro_f1(gi, list(y[idx]), present) - macro_f1(gi, list(x[idx]), present))
    d = np.asarray(diffs)
    out["delta_ci"] = list(_percentiles(d, 0.05))
    # two-sided bootstrap p for "no difference": how often the resampled difference crosses 0
    out["p_value"] = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
    return out


def verdict(delta: float | None, ci: list[float | None], *, lower_is_better: bool = False) -> str:
    """'better' / 'worse' when the 95% CI of student - base excludes 0, else 'no clear difference'."""
    lo, hi = ci
    if delta is None or lo is None or hi is None:
        return "no clear difference" if delta == 0 else "undetermined"
    if lower_is_better:
        lo, hi = -hi, -lo
    return "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"


def compare_to_base(
    student_report: dict[str, Any], student_preds: list[dict[str, Any]], base_report: dict[str, Any],
    base_preds: list[dict[str, Any]], *, n_boot: int = 1000, labels: list[str] | None = None,
) -> dict[str, Any]:
    """Paired comparison student vs base on the test items both answered (matched by id)."""
    task_type = student_report["task_type"]
    base_by_id = {p["id"]: p for p in base_preds}
    pairs = [(base_by_id[p["id"]], p) for p in student_preds if p.get("id") in base_by_id]
    metrics: dict[str, Any] = {}
    for metric in ITEM_METRICS[task_type]:
        scored = [(_item_score(b, metric), _item_score(s, metric)) for b, s in pairs]
        scored = [(a, b) for a, b in scored if a is not None and b is not None]
        if not scored:
            continue
        res = paired_diff([a for a, _ in scored], [b for _, b in scored], n_boot=n_boot)
        if res["p_value"] is None and res["n"]:
            res["p_value"] = sign_flip_p(np.asarray([b - a for a, b in scored]), n_perm=1000)
        metrics[metric] = res
    if task_type == "classification" and labels:
        labelled = [(b, s) for b, s in pairs if s.get("gold") is not None]
        if labelled:
            gold = [s["gold"] for _, s in labelled]
            present = [c for c in labels if c in set(gold)] or list(labels)
            metrics["macro_f1"] = _paired_macro_f1(gold, [b.get("pred") for b, _ in labelled],
                                                   [s.get("pred") for _, s in labelled], present, n_boot)
    for name, res in metrics.items():
        res["base"], res["student"] = res.pop("a"), res.pop("b")
        res["verdict"] = verdict(res["delta"], res["delta_ci"], lower_is_better=name == "invalid_rate")
    main = "accuracy" if task_type == "classification" else "exact_match"
    m = metrics.get(main) or {}
    learned = m.get("verdict")
    summary = (f"student vs base on {len(pairs)} test items: {main} {_pct(m.get('base'))} -> {_pct(m.get('student'))} "
               f"({_pts(m.get('delta'))} pts, 95% CI {_pts(m['delta_ci'][0])}..{_pts(m['delta_ci'][1])}): "
               f"{learned}" if m else f"student vs base: no paired {main} scores")
    return {"base": base_report.get("model"), "n_paired": len(pairs), "main_metric": main,
            "learned": learned == "better" if learned else None, "summary": summary,
            "base_headline": base_report.get("headline"), "base_parse_status": base_report.get("parse_status"),
            "metrics": metrics}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _pts(v: float | None) -> str:
    return "?" if v is None else f"{100 * v:+.1f}"
