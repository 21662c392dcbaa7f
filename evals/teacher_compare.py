"""Student vs teacher (and base): accuracy, latency, cost per 1,000 requests and break-even volume.

The teacher is scored on the same test items as the student, prompted exactly as in generation
(`stepwise.pipelines.prompts.build_messages` with `teacher.format`, the same cache keys, sampling
settings, self-consistency and parser as `stepwise generate`), so its accuracy is the ceiling of
the data it wrote. Each answer comes from the teacher's response cache when that prompt was
already asked; the rest are asked now through the same executor, cache, cost ledger and cap
(`teacher.max_cost` / `--max-cost`; `stepwise estimate` counts them). Malformed answers are not
re-asked here: the teacher gets one answer per sample, as a production request would. With
`--offline` (or a cap reached) and answers missing, the teacher is not scored, with a note.

Hand-written: the orchestration and the arithmetic below. Library/reused: generation through
stepwise.pipelines (executor, cache, parser), scoring through stepwise.evals.task_eval, paired
bootstrap CIs through stepwise.evals.base_compare.compare_to_base (stepwise.evals.stats).

Latency and throughput are measured, never invented: the teacher's only for the requests asked
in this run ("cached, latency not measured" otherwise); the student's and base's on this machine
in the eval's own batched pass (per request: the wall time of the batch it was in) and in a
batch-1 pass over `eval.task.latency_rows` test prompts.

Cost per 1,000 requests: the teacher's = 1000 x its price x its mean tokens per answer; a teacher
priced at 0 that ran locally now is costed by its hardware time like the student, else it stays
0 and the break-even is "never". The student's (and base's) = 1000 x measured seconds per request
(batched pass) / 3600 x `eval.student_cost_per_hour` (default 1.00 USD/h, about an on-demand
single mid-range cloud GPU). Break-even volume = (teacher spend on data + training cost) /
(teacher cost - student cost per request), where the data spend is every stage's recorded teacher
cost in the manifest and the training cost is the train stage's wall time x the same hourly rate;
"never" when the student saves nothing per request.

The result is `eval/student_vs_teacher.json` (RunLayout.student_vs_teacher), read by the report,
`stepwise compare` and the model card. Its shape (version 1):

    {"version": 1, "main_metric": "accuracy" | "exact_match", "n": <test items>,
     "student_cost_per_hour": float, "notes": [str],
     "models": [  # teacher, base, student in this order; a model not scored is absent
        {"role": "teacher" | "base" | "student", "model": str, "n": int,
         "metrics": {name: {"value": float, "ci_low": float | None, "ci_high": float | None}},
         "vs_student": {metric: {"other": float, "student": float, "delta": student - other,
                                 "delta_ci": [lo, hi], "verdict": str, "p_value": float | None}} | None,
         "latency": {"measured": bool, "note": str | None,
                     "batched": {"batch_size": int, "n": int, "p50_s": float, "p95_s": float,
                                 "tokens_per_s": float | None, "s_per_request": float} | None,
                     "batch1": {... same keys ...} | None,
                     "batched_note": str},   # only when batched is None for a reason (llama.cpp: one at a time)
         "cost_per_1k": float | None, "cost_basis": str,
         "requests": {"cached": int, "asked": int} | None}],   # teacher only
     "break_even": {"requests": int | None, "text": str, "upfront_usd": float,
                    "data_spend_usd": float, "training_cost_usd": float,
                    "saving_per_request_usd": float | None}}
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from stepwise.evals.base_compare import compare_to_base
from stepwise.evals.generate import GenerationResult
from stepwise.evals.modelref import ModelRef
from stepwise.evals.stats import pct_ci as _pct_ci

from stepwise.io import atomic_write_json
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

VERSION = 1
LOCAL_TEACHERS = ("transformers", "llamacpp")
# the batched column of a model served one request at a time (llama.cpp has no batched completion call)
ONE_AT_A_TIME = "n/a (llama.cpp answers one request at a time)"


class TeacherNotScored(RuntimeError):
    """The teacher could not answer every test item now (offline, cap): a note, not a failure."""


# -- the teacher ----------------------------------------------------------------------------------


def teacher_generation(
    recipe: Recipe, rows: list[dict[str, Any]], *, offline: bool = False, max_cost: float | None = None,
    progress: bool = False,
) -> tuple[GenerationResult, dict[str, Any]]:
    """The teacher's answer text per test row (cache first, then asked), and what it took:
    {"cached", "asked", "timings" (per asked request, seconds), "elapsed_s", "output_tokens_asked",
    "tokens": (mean input, mean output) per answer}."""
    from stepwise.pipelines.cache import ResponseCache
    from stepwise.pipelines.generate import (
        InputRow,
        _assemble,
        _execute,
        _parser,
        _pending_jobs,
        cache_path,
        new_budget,
        plan_requests,
    )

    inputs = [InputRow(str(r.get("id")), r["input"], r.get("gold"), {"file": "test", "line": i + 1})
              for i, r in enumerate(rows)]
    plan = plan_requests(recipe, inputs)
    cache = ResponseCache(cache_path(recipe))
    try:
        cached = cache.get_many(plan.chain_keys())
        todo = _pending_jobs(recipe, plan, cached, reask=False)
        asked, timings, elapsed, out_tokens = 0, [], 0.0, 0
        if todo and offline:
            raise TeacherNotScored(f"{len(todo)} of {len(plan.base_keys())} teacher answers to the test prompts "
                                   f"are not in the cache {cache.path} and the run is --offline")
        if todo:
            cap = max_cost if max_cost is not None else recipe.teacher.max_cost
            started = time.perf_counter()
            stats = _execute(recipe, todo, cache, new_budget(plan, cache, cap), progress, timings=timings)
            elapsed = time.perf_counter() - started
            asked, out_tokens = stats.completed, stats.output_tokens
            if stats.stopped_reason or stats.failed:
                raise TeacherNotScored(stats.stopped_reason or f"{stats.failed} teacher requests failed "
                                       f"({', '.join(stats.errors)}); they are retried on the next eval")
        cached = cache.get_many(plan.chain_keys())
        parse = _parser(recipe)
        records = [_assemble(recipe, row, chains, cached, set(), parse, False)
                   for row, chains in zip(plan.rows, plan.chains, strict=True)]
    finally:
        cache.close()
    missing = [r["id"] for r in records if r["raw"] is None]
    if missing:
        raise TeacherNotScored(f"{len(missing)} test rows have no teacher answer (e.g. id={missing[0]}: "
                               f"{records[[r['id'] for r in records].index(missing[0])].get('error')})")
    answers = sum(sum(s.get("answers") or 0 for s in r["samples"]) for r in records) or 1
    itok = sum(r["usage"]["input_tokens"] for r in records) / answers
    otok = sum(r["usage"]["output_tokens"] for r in records) / answers
    gen = GenerationResult([r["raw"] for r in records], [None] * len(records), elapsed, out_tokens, None,
                           {"backend": recipe.teacher.provider, "model": recipe.teacher.model})
    info = {"cached": len(records) * recipe.teacher.num_rationales - asked, "asked": asked, "timings": timings,
            "elapsed_s": elapsed, "output_tokens_asked": out_tokens, "tokens": (itok, otok)}
    return gen, info


# -- latency and cost -----------------------------------------------------------------------------


def latency_stats(per_request_s: list[float], *, batch_size: int, output_tokens: int | None,
                  wall_s: float | None) -> dict[str, Any] | None:
    """p50/p95 of per-request latency, output tokens/s and seconds per request (wall / requests)."""
    if not per_request_s:
        return None
    x = np.asarray(per_request_s, dtype=float)
    wall = wall_s if wall_s else float(x.sum())
    return {"batch_size": batch_size, "n": int(x.size), "p50_s": float(np.percentile(x, 50)),
            "p95_s": float(np.percentile(x, 95)),
            "tokens_per_s": (output_tokens / wall) if output_tokens and wall else None,
            "s_per_request": wall / x.size}


def batch_latencies(generation: dict[str, Any]) -> list[float]:
    """Per-request latency from a generation record's `batch_walls` ([[seconds, requests], ...])
    or `latencies` (one per request)."""
    if generation.get("latencies"):
        return [float(v) for v in generation["latencies"] if v is not None]
    return [float(w) for w, n in generation.get("batch_walls") or [] for _ in range(int(n))]


def hardware_cost_per_1k(s_per_request: float | None, cost_per_hour: float) -> float | None:
    """Cost of 1,000 requests at `s_per_request` seconds of a machine rented at `cost_per_hour`."""
    if s_per_request is None:
        return None
    return 1000.0 * s_per_request / 3600.0 * cost_per_hour


def price_cost_per_1k(input_per_1k: float, output_per_1k: float, mean_in: float, mean_out: float) -> float:
    """Cost of 1,000 requests of `mean_in` prompt and `mean_out` output tokens at a per-1K-token price."""
    return 1000.0 * (mean_in * input_per_1k + mean_out * output_per_1k) / 1000.0


def break_even(upfront_usd: float, teacher_per_1k: float | None, student_per_1k: float | None) -> dict[str, Any]:
    """Requests after which the student has paid for its data and training:
    upfront / (teacher - student cost per request); "never" when the student saves nothing."""
    out: dict[str, Any] = {"requests": None, "upfront_usd": upfront_usd, "saving_per_request_usd": None}
    if teacher_per_1k is None or student_per_1k is None:
        out["text"] = "unknown: " + ("the teacher's" if teacher_per_1k is None else "the student's") + \
            " cost per request was not measured"
        return out
    saving = (teacher_per_1k - student_per_1k) / 1000.0
    out["saving_per_request_usd"] = saving
    if saving <= 0:
        why = ("the teacher is priced at 0 per request" if teacher_per_1k == 0
               else "the student costs as much as the teacher per request, or more")
        out["text"] = f"never: {why}"
        return out
    n = math.ceil(upfront_usd / saving) if upfront_usd > 0 else 0
    out["requests"] = n
    out["text"] = f"{n:,} requests"
    return out


def upfront_costs(run: RunDir, cost_per_hour: float) -> tuple[float, float]:
    """(teacher spend on data: every stage's recorded teacher cost except eval's, training cost:
    the train stage's wall time x cost_per_hour)."""
    stages = run.read_manifest().get("stages", {})
    spend = 0.0
    for name, info in stages.items():
        cost = (info or {}).get("cost") if name != "eval" else None
        if isinstance(cost, dict) and isinstance(cost.get("total_usd"), int | float):
            spend += float(cost["total_usd"])
    train = stages.get("train") or {}
    wall = train.get("wall_s") or ((train.get("pipeline") or {}).get("wall_s") if isinstance(train.get("pipeline"),
                                                                                            dict) else None)
    return spend, (float(wall) / 3600.0 * cost_per_hour) if wall else 0.0


# -- the table ------------------------------------------------------------------------------------


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    return {k: {"value": v.get("value"), "ci_low": v.get("ci_low"), "ci_high": v.get("ci_high")}
            for k, v in (report.get("headline") or {}).items() if isinstance(v, dict)}


def _vs_student(comparison: dict[str, Any] | None) -> dict[str, Any] | None:
    if not comparison:
        return None
    return {name: {"other": m.get("base"), "student": m.get("student"), "delta": m.get("delta"),
                   "delta_ci": m.get("delta_ci"), "verdict": m.get("verdict"),
                   "p_value": m.get("mcnemar_p") if m.get("mcnemar_p") is not None else m.get("p_value")}
            for name, m in comparison["metrics"].items()}


def local_model_entry(role: str, report: dict[str, Any], batch1: dict[str, Any] | None, cost_per_hour: float,
                      batch_size: int) -> dict[str, Any]:
    """A student or base row: latency from its batched eval pass and its batch-1 pass (this machine)."""
    gen = report.get("generation") or {}
    batch_size = int(gen.get("batch_size") or gen.get("concurrency") or batch_size)  # an endpoint: requests in flight
    batched = latency_stats(batch_latencies(gen), batch_size=batch_size, output_tokens=gen.get("output_tokens"),
                            wall_s=gen.get("wall_s"))
    if batched is None and gen.get("wall_s") and report.get("n"):  # an older record without per-batch times
        batched = {"batch_size": batch_size, "n": report["n"], "p50_s": None, "p95_s": None,
                   "tokens_per_s": gen.get("tokens_per_s"), "s_per_request": gen["wall_s"] / report["n"]}
    where = gen.get("device") or gen.get("backend") or "this machine"
    cost = hardware_cost_per_1k((batched or {}).get("s_per_request"), cost_per_hour)
    latency: dict[str, Any] = {"measured": batched is not None, "note": f"measured on {where}", "batched": batched,
                               "batch1": batch1}
    how = "batched"
    if batched is not None and batch_size == 1:  # the pass answered one request at a time: a batch-1 figure
        latency.update(batched=None, batch1=batch1 or batched,
                       batched_note=ONE_AT_A_TIME if gen.get("backend") == "llama.cpp"
                       else "n/a (the eval answered one request at a time)")
        how = "one request at a time"
    return {"role": role, "model": report.get("model"), "n": report.get("n"), "metrics": _metrics(report),
            "vs_student": None, "latency": latency, "cost_per_1k": cost,
            "cost_basis": f"measured s/request ({how}) x eval.student_cost_per_hour ${cost_per_hour:g}/h",
            "requests": None}


def teacher_entry(recipe: Recipe, report: dict[str, Any], info: dict[str, Any], cost_per_hour: float) -> dict[str, Any]:
    t = recipe.teacher
    timings = info.get("timings") or []
    measured = latency_stats(timings, batch_size=t.batch_size if t.provider == "transformers" else 1,
                             output_tokens=info.get("output_tokens_asked"),
                             wall_s=info.get("elapsed_s")) if timings else None
    if measured is not None and t.provider not in LOCAL_TEACHERS:
        measured["batch_size"] = t.concurrency  # requests in flight, not a batch
    itok, otok = info["tokens"]
    priced = t.price.input_per_1k > 0 or t.price.output_per_1k > 0
    if priced:
        cost, basis = (price_cost_per_1k(t.price.input_per_1k, t.price.output_per_1k, itok, otok),
                       f"teacher.price x mean tokens per answer ({itok:.0f} in, {otok:.0f} out)")
    elif t.provider in LOCAL_TEACHERS and measured is not None:
        cost = hardware_cost_per_1k(measured["s_per_request"], cost_per_hour)
        basis = (f"local teacher, teacher.price 0: measured s/request x eval.student_cost_per_hour "
                 f"${cost_per_hour:g}/h")
    else:
        cost, basis = 0.0, "teacher.price is 0" + (" (its hardware time was not measured: cached answers)"
                                                   if t.provider in LOCAL_TEACHERS else "")
    if measured is not None:
        note = (f"measured on {info['asked']} requests asked now"
                + (f"; {info['cached']} answers came from the cache" if info["cached"] else ""))
    else:
        note = "cached, latency not measured"
    latency: dict[str, Any] = {"measured": measured is not None, "note": note,
                               "batched": measured if measured and measured["batch_size"] > 1 else None,
                               "batch1": measured if measured and measured["batch_size"] == 1 else None}
    if measured is not None and t.provider == "llamacpp":
        latency["batched_note"] = ONE_AT_A_TIME
    return {"role": "teacher", "model": t.model, "n": report.get("n"), "metrics": _metrics(report),
            "vs_student": None, "latency": latency,
            "cost_per_1k": cost, "cost_basis": basis, "requests": {"cached": info["cached"], "asked": info["asked"]}}


def build_table(
    recipe: Recipe, run: RunDir, *, student: dict[str, Any], base: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None, comparisons: dict[str, dict[str, Any] | None] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The student-vs-teacher record (module docstring) from the model rows built above."""
    cph = recipe.eval.student_cost_per_hour
    models = [m for m in (teacher, base, student) if m is not None]
    for m in models:
        if m["role"] != "student":
            m["vs_student"] = _vs_student((comparisons or {}).get(m["role"]))
    spend, training = upfront_costs(run, cph)
    be = break_even(spend + training, (teacher or {}).get("cost_per_1k") if teacher else None,
                    student.get("cost_per_1k"))
    if teacher is None:
        be["text"] = "unknown: the teacher was not scored"
    be.update(data_spend_usd=spend, training_cost_usd=training)
    task_type = "classification" if recipe.task.is_classification else "structured"
    return {"version": VERSION, "main_metric": "accuracy" if task_type == "classification" else "exact_match",
            "n": student.get("n"), "student_cost_per_hour": cph, "notes": list(notes or []), "models": models,
            "break_even": be}


def write_table(run: RunDir, table: dict[str, Any]) -> None:
    atomic_write_json(run.layout.student_vs_teacher, table)


def score_teacher(
    recipe: Recipe, rows: list[dict[str, Any]], student_report: dict[str, Any], student_preds: list[dict[str, Any]],
    *, offline: bool = False, max_cost: float | None = None, progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(teacher task report, its predictions, the generation info, the paired comparison with the
    student). Raises TeacherNotScored when some answers are missing and cannot be asked now."""
    from stepwise.evals.task_eval import HEADLINE_TASK, evaluate_task

    limit = recipe.eval.task.limit
    rows = rows[:limit] if limit else rows
    gen, info = teacher_generation(recipe, rows, offline=offline, max_cost=max_cost, progress=progress)
    ref = ModelRef(kind="openai" if recipe.teacher.provider == "openai" else "hf", label=recipe.teacher.model,
                   spec=f"teacher:{recipe.teacher.provider}:{recipe.teacher.model}")
    report, preds = evaluate_task(recipe, ref, rows, generated=gen, parse_format=recipe.teacher.format)
    report["headline"] = {k: report["metrics"][k] for k in HEADLINE_TASK[report["task_type"]] if k in report["metrics"]}
    comparison = compare_to_base(student_report, student_preds, report, preds, n_boot=recipe.eval.task.bootstrap,
                                 labels=list(recipe.task.label_set) if recipe.task.is_classification else None)
    return report, preds, info, comparison


def measure_batch1(model: ModelRef, recipe: Recipe, rows: list[dict[str, Any]], device: str,
                   generate: Callable[..., GenerationResult] | None = None) -> dict[str, Any] | None:
    """Batch-1 latency of a local model on the first `eval.task.latency_rows` test prompts."""
    from stepwise.evals.generate import generate_local
    from stepwise.pipelines.student import inference_messages

    k = recipe.eval.task.latency_rows
    if not k or not model.is_local:
        return None
    prompts = [inference_messages(recipe.task, r["input"], recipe.training.dss_output) for r in rows[:k]]
    gen = (generate or generate_local)(model, prompts, max_new_tokens=recipe.eval.task.max_new_tokens, batch_size=1,
                                       device=device, n_threads=recipe.eval.task.n_threads)
    return latency_stats(batch_latencies(gen.info), batch_size=1, output_tokens=gen.output_tokens, wall_s=gen.wall_s)


# -- presentation (CLI, report, `stepwise compare`, model card) -----------------------------------

COLUMNS = ["model", "role", "{metric} % [95% CI]", "student - model (pts) [95% CI]", "latency p50 / p95 s (batch 1)",
           "latency p50 / p95 s (batched)", "output tokens/s (batched)", "cost per 1k requests"]


def _lat(d: dict[str, Any] | None) -> str:
    if not d or d.get("p50_s") is None:
        return "-"
    return f"{d['p50_s']:.3f} / {d['p95_s']:.3f}" + (f" (x{d['batch_size']})" if d.get("batch_size", 1) > 1 else "")


def _usd(v: float | None) -> str:
    if v is None:
        return "not measured"
    return f"${v:.4f}" if v < 1 else f"${v:,.2f}"


def table_rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(column names, rows of text) for the student-vs-teacher record, one row per model."""
    metric = table.get("main_metric", "accuracy")
    rows = []
    for m in table.get("models") or []:
        vs = (m.get("vs_student") or {}).get(metric)
        if m["role"] == "student":
            delta = "-"
        elif vs and vs.get("delta") is not None:
            lo, hi = vs.get("delta_ci") or [None, None]
            delta = f"{100 * vs['delta']:+.1f}" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None else "")
        else:
            delta = "-"
        lat = m.get("latency") or {}
        if lat.get("measured"):
            b1, bn = _lat(lat.get("batch1")), _lat(lat.get("batched"))
            if lat.get("batched") is None and lat.get("batched_note"):
                bn = lat["batched_note"]
            tps = (lat.get("batched") or lat.get("batch1") or {}).get("tokens_per_s")
            tps_text = f"{tps:.1f}" if tps else "-"
        else:
            b1 = bn = tps_text = lat.get("note") or "not measured"
        rows.append([str(m.get("model")), m["role"], _pct_ci((m.get("metrics") or {}).get(metric)), delta, b1, bn,
                     tps_text, _usd(m.get("cost_per_1k"))])
    return [c.format(metric=metric) for c in COLUMNS], rows


def markdown(table: dict[str, Any]) -> str:
    """The table as Markdown (README, model card), with the break-even line and the cost bases."""
    columns, rows = table_rows(table)
    out = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    out += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    be = table.get("break_even") or {}
    out += (f"\nBreak-even: {be.get('text')} (teacher spend on data ${be.get('data_spend_usd', 0):.4f} + training "
            f"${be.get('training_cost_usd', 0):.4f}). Cost bases: "
            + "; ".join(f"{m['role']}: {m.get('cost_basis')}" for m in table.get("models") or []) + ".\n")
    return out


# -- `stepwise estimate` ----------------------------------------------------------------------------


def test_file_inputs(recipe: Recipe) -> list[Any]:
    """`data.test_file`'s rows as generation InputRows (empty when the recipe names none)."""
    from stepwise.curation.curate import read_test_file
    from stepwise.pipelines.generate import InputRow

    return [InputRow(str(r["id"]), r["input"], r.get("gold"), r.get("source") or {}) for r in read_test_file(recipe)]


def teacher_eval_estimate(recipe: Recipe, test_inputs: list[Any] | None = None) -> dict[str, Any]:
    """What scoring the teacher will ask at eval time (stepwise.pipelines.generate.InputRow test rows,
    default `data.test_file`'s; `eval.task.limit` applied): requests, how many are cached, and the
    cost still to pay (prompt tokens counted as generation counts them, output at `max_new_tokens`)."""
    from stepwise.pipelines.cache import ResponseCache
    from stepwise.pipelines.generate import _pending_jobs, cache_path, plan_requests, price_fn

    if test_inputs is None:
        test_inputs = test_file_inputs(recipe)
    spec, t = recipe.eval.task, recipe.teacher
    if not (spec.enabled and spec.compare_teacher) or not test_inputs:
        return {"teacher eval requests (test rows)": "none" if test_inputs else "none (no test rows known yet)"}
    rows = test_inputs[: spec.limit] if spec.limit else test_inputs
    plan = plan_requests(recipe, rows)
    path = cache_path(recipe)
    cache = ResponseCache(path)
    try:
        todo = _pending_jobs(recipe, plan, cache.get_many(plan.chain_keys()), reask=False)
    finally:
        cache.close()
    cost = 0.0
    if todo and (t.price.input_per_1k > 0 or t.price.output_per_1k > 0):
        from stepwise.pipelines.tokens import prompt_counter

        counter = prompt_counter(recipe)
        price = price_fn(recipe)
        cost = sum(price(counter.count(j.messages), t.max_new_tokens) for j in todo)
    total = len(plan.base_keys())
    return {"teacher eval requests (test rows)": f"{total} ({total - len(todo)} cached; eval.task.compare_teacher)",
            "teacher eval cost, still to pay": f"${cost:.4f} (output at max_new_tokens)"}
