"""Task evaluation on the held-out test split (`<run>/curate/test.jsonl`), with the
contamination guard.

The student is prompted exactly as it was trained (`stepwise.pipelines.student.inference_messages`) and its
output is parsed by the teacher's parser (`stepwise.pipelines.parsing.parse_answer`), so both are judged by
the same rules. Per-item predictions go to `eval/task_predictions.jsonl` for paired comparisons.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stepwise.curation.dsl_schema import BARE_QUERY_REPAIR, wrap_bare_query
from stepwise.evals.classification import classification_report
from stepwise.evals.generate import GenerationResult, generate_local, generate_openai
from stepwise.evals.modelref import ModelRef
from stepwise.evals.schema import validator_for
from stepwise.evals.structured import score_item, structured_report
from stepwise.pipelines.parsing import LabelMatcher, parse_answer
from stepwise.pipelines.student import inference_messages, inference_parse_format

from stepwise.io import canonical_json, read_jsonl
from stepwise.layout import RunLayout
from stepwise.recipe import Recipe


class ContaminationError(RuntimeError):
    """Test inputs appear in the training data: task metrics would be meaningless."""

    def __init__(self, overlaps: list[dict[str, Any]], total: int):
        self.overlaps = overlaps
        self.total = total
        ids = ", ".join(str(o["test_id"]) for o in overlaps[:5])
        more = f" (+{len(overlaps) - 5} more)" if len(overlaps) > 5 else ""
        super().__init__(
            f"{len(overlaps)} of {total} test inputs appear in the training data (test ids: {ids}{more}); "
            "refusing to report task metrics. Re-run `stepwise curate` with `curation.contamination.test_set: true`."
        )


def _norm_input(value: Any) -> str:
    def norm(v: Any) -> Any:
        if isinstance(v, str):
            return re.sub(r"\s+", " ", v.strip().lower())
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return canonical_json(norm(value))


def training_files(run_path: Path) -> list[Path]:
    """Files whose rows the student was trained on: curated train (+ reviewed rows when present)."""
    return [p for p in (RunLayout(run_path).curated("train"), RunLayout(run_path).reviewed) if p.exists()]


def check_contamination(run_path: Path, test_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare test inputs with training inputs (whitespace/case-normalised); raise on overlap."""
    files = training_files(run_path)
    seen: dict[str, tuple[str, str]] = {}
    for f in files:
        for row in read_jsonl(f):
            if row.get("split", "train") not in ("train", None) and f.name == "reviewed.jsonl":
                continue
            if "input" in row:
                seen.setdefault(_norm_input(row["input"]), (str(row.get("id")), f.name))
    overlaps = []
    for row in test_rows:
        hit = seen.get(_norm_input(row.get("input")))
        if hit:
            overlaps.append({"test_id": row.get("id"), "train_id": hit[0], "file": hit[1]})
    report = {"checked_files": [str(f.relative_to(run_path)) for f in files], "test_rows": len(test_rows),
              "overlaps": len(overlaps)}
    manifest_note = _curation_contamination_note(run_path)
    if manifest_note:
        report["curation_manifest"] = manifest_note
    if overlaps:
        raise ContaminationError(overlaps, len(test_rows))
    return report


def _curation_contamination_note(run_path: Path) -> dict[str, Any] | None:
    manifest = RunLayout(run_path).manifest
    if not manifest.exists():
        return None
    info = json.loads(manifest.read_text(encoding="utf-8")).get("stages", {}).get("curate") or {}
    counts = info.get("counts") or {}
    keys = {k: v for k, v in counts.items() if "contam" in k or "test" in k}
    return keys or None


def _gold_label(gold: Any, matcher: LabelMatcher) -> str | None:
    if isinstance(gold, str):
        return matcher.match(gold) or gold
    return None


def evaluate_task(
    recipe: Recipe, model: ModelRef, test_rows: list[dict[str, Any]], *, device: str = "cpu",
    progress: Callable[[int], None] | None = None, dss_output: str | None = None,
    generated: GenerationResult | None = None, parse_format: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(task report, per-item prediction rows). `generated`: answers produced elsewhere (the teacher's,
    stepwise.evals.teacher_compare), scored here by the same rules, parsed as `parse_format`."""
    spec = recipe.eval.task
    task = recipe.task
    dss_output = dss_output or recipe.training.dss_output
    rows = test_rows[: spec.limit] if spec.limit else test_rows
    prompts = [inference_messages(task, r["input"], dss_output) for r in rows]
    gen: GenerationResult
    if generated is not None:
        gen = generated
    elif model.kind == "openai":
        gen = generate_openai(model, prompts, max_new_tokens=spec.max_new_tokens, concurrency=spec.concurrency,
                              api_key_env=model.info.get("api_key_env") or spec.api_key_env, progress=progress)
    elif model.kind == "gguf":  # llama.cpp in process, the same prompts and stop rule
        from stepwise.evals.gguf_generate import generate_gguf

        gen = generate_gguf(model, prompts, max_new_tokens=spec.max_new_tokens, n_threads=spec.n_threads,
                            progress=progress)
    else:
        gen = generate_local(model, prompts, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size,
                             device=device, progress=progress, n_threads=spec.n_threads)
    fmt = parse_format or inference_parse_format(dss_output)
    matcher = LabelMatcher(task.label_set, task.label_aliases) if task.is_classification else None
    parsed = [parse_answer(t, task, fmt, matcher) if t is not None else None for t in gen.texts]
    statuses = Counter(p.parse_status if p else "error" for p in parsed)
    preds: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "model": model.label, "model_kind": model.kind, "dss_output": dss_output, "parse_format": fmt,
        "n": len(rows), "parse_status": dict(statuses),
        "generation": {"wall_s": round(gen.wall_s, 3), "output_tokens": gen.output_tokens,
                       "tokens_per_s": gen.tokens_per_s, "peak_memory_mb": gen.peak_memory_mb, **gen.info},
    }
    if task.is_classification:
        gold = [_gold_label(r.get("gold"), matcher) for r in rows]
        labels = [p.label if p and p.label in task.label_set else None for p in parsed]
        keep = [i for i, g in enumerate(gold) if g is not None]
        rep = classification_report([gold[i] for i in keep], [labels[i] for i in keep], task.label_set,
                                    n_boot=spec.bootstrap)
        report.update(task_type="classification", **{k: v for k, v in rep.items() if k != "item_scores"})
        report["unlabelled"] = len(rows) - len(keep)
        for i, r in enumerate(rows):
            preds.append({"id": r.get("id"), "gold": gold[i], "pred": labels[i],
                          "correct": None if gold[i] is None else float(gold[i] == labels[i]),
                          "parse_status": parsed[i].parse_status if parsed[i] else "error",
                          "raw": gen.texts[i], "error": gen.errors[i]})
    else:
        validator, source = validator_for(task.validator)
        dsl = task.validator == "opensearch_query_dsl"
        items = []
        repaired = 0
        for i, r in enumerate(rows):
            pred = parsed[i].label if parsed[i] and parsed[i].parse_status in ("ok", "missing_rationale") else None
            fix = None
            if dsl:  # the repair curation applies to the teacher's answers, counted the same way
                pred, wrapped = wrap_bare_query(pred)
                fix = BARE_QUERY_REPAIR if wrapped else None
                repaired += wrapped
            alts = r.get("gold_alternatives") or r.get("dsl_alternatives") or []
            s = score_item(pred, r.get("gold"), alternatives=alts, validator=validator, dsl=dsl)
            items.append(s)
            preds.append({"id": r.get("id"), "gold": r.get("gold"), "pred": pred,
                          "parse_status": parsed[i].parse_status if parsed[i] else "error",
                          "raw": gen.texts[i], "error": gen.errors[i], "repaired": fix, **s})
        rep = structured_report(items, n_boot=spec.bootstrap)
        report.update(task_type="structured", schema_validator=source, canonicalisation="dsl" if dsl else "json",
                      **{k: v for k, v in rep.items() if k != "item_scores"})
        if dsl:
            report["repairs"] = {BARE_QUERY_REPAIR: repaired}
    return report, preds


def load_test_rows(run_path: Path) -> list[dict[str, Any]]:
    path = RunLayout(run_path).curated("test")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no test split; run `stepwise curate` first (or `--skip-task`)")
    return read_jsonl(path)


HEADLINE_TASK = {"classification": ("accuracy", "macro_f1", "invalid_rate"),
                 "structured": ("exact_match", "partial_f1", "json_valid", "schema_valid")}


def main_score_key(task_report: dict[str, Any]) -> str:
    return "accuracy" if task_report.get("task_type") == "classification" else "exact_match"


def predictions_path(eval_dir: Path) -> Path:
    return eval_dir / "task_predictions.jsonl"
