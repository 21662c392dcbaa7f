"""`stepwise eval` end to end: pick the models, guard against contamination, run the task eval and
the forgetting eval, write `eval/task.json`, `eval/forgetting.json` (+ per-item files) and the
manifest entry, and decide the gate."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepwise.evals.base_compare import BASE_PREDICTIONS, BASE_REPORT, compare_to_base, evaluate_base_task
from stepwise.evals.benchmarks import prepare_tasks
from stepwise.evals.forgetting import (
    FAILED,
    NOT_MEASURED,
    PASSED,
    EndpointLogprobsError,
    default_device,
    evaluate_model,
    forgetting_report,
    probe_endpoint_logprobs,
)
from stepwise.evals.modelref import ModelRef, count_parameters, newest_trained_model, resolve_model
from stepwise.evals.task_eval import (
    HEADLINE_TASK,
    check_contamination,
    evaluate_task,
    load_test_rows,
)

from stepwise.io import atomic_write_json, atomic_write_jsonl, iter_jsonl
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

# Gate verdicts beyond forgetting_report's passed / failed / not_measured: the recipe turned the
# forgetting eval off (`not_configured`), or `stepwise eval --skip-forgetting` left it out this
# once (`skipped`). Neither is a pass, and neither blocks; `failed` and `not_measured` exit 4.
NOT_CONFIGURED, SKIPPED = "not_configured", "skipped"
BLOCKING = (FAILED, NOT_MEASURED)
_VERDICT_TEXT = {PASSED: "passed", FAILED: "FAILED", NOT_MEASURED: "NOT MEASURED", NOT_CONFIGURED: "not configured",
                 SKIPPED: "skipped"}


@dataclass
class EvalOutcome:
    task: dict[str, Any] | None = None
    forgetting: dict[str, Any] | None = None
    student_vs_teacher: dict[str, Any] | None = None
    outputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gate_verdict: str = NOT_CONFIGURED
    gate_reason: str = "eval.forgetting.enabled is false"

    @property
    def gate(self) -> dict[str, Any]:
        """What the manifest records as the eval stage's `gate` (the forgetting gate + verdict)."""
        gate = dict((self.forgetting or {}).get("gate") or {})
        gate.update(verdict=self.gate_verdict, reason=self.gate_reason, passed=self.gate_verdict == PASSED)
        return gate

    @property
    def gate_passed(self) -> bool:
        """True only when the gate measured every benchmark and none dropped too far."""
        return self.gate_verdict == PASSED

    @property
    def gate_blocks(self) -> bool:
        """Exit 4: the gate failed or could not measure what it was configured to."""
        return self.gate_verdict in BLOCKING


def gate_summary(gate: dict[str, Any]) -> str:
    """One line for a gate dict (EvalOutcome.gate or the manifest's copy): verdict and why."""
    verdict = gate.get("verdict", PASSED if gate.get("passed") else FAILED)
    text = f"forgetting gate {_VERDICT_TEXT.get(verdict, verdict)}"
    if verdict == FAILED and gate.get("failed"):
        text += f": {', '.join(gate['failed'])} dropped more than max_drop {gate.get('max_drop')}"
    elif gate.get("reason"):
        text += f": {gate['reason']}"
    return text


def recorded_gate(run: RunDir, recipe: Recipe | None = None) -> dict[str, Any]:
    """The gate of the run's last eval, from the manifest (the same record `stepwise run` reads).
    A manifest from before verdicts were recorded says `passed` only for a recorded pass."""
    info = run.stage_info("eval") or {}
    gate = info.get("gate")
    if isinstance(gate, dict) and "verdict" in gate:
        return gate
    if isinstance(gate, dict):  # older manifest: the forgetting gate alone
        return {**gate, "verdict": PASSED if gate.get("passed") else FAILED}
    if recipe is not None and not recipe.eval.forgetting.enabled:
        return {"verdict": NOT_CONFIGURED, "reason": "eval.forgetting.enabled is false", "passed": False}
    return {"verdict": NOT_MEASURED, "passed": False,
            "reason": "no forgetting result recorded for this run; run `stepwise eval` (or `stepwise run --from eval`)"}


def pick_models(
    recipe: Recipe, run: RunDir, model: str | None, base: str | None, *, need_base: bool = True,
) -> tuple[ModelRef, ModelRef | None]:
    """(student, base): `--model` or the newest model under `<run>/train/`; base = `--base` or
    the recipe's `training.base_model`. With `training.backend: openai` the student is the run's
    fine-tuned model (`train/openai_job.json`), asked through the recipe's `training.openai`
    endpoint and key; `--model openai:<name>` without `@<url>` gets that endpoint too."""
    if recipe.training.backend == "openai":
        return _pick_hosted(recipe, run, model, base, need_base=need_base)
    if model is None:
        found = newest_trained_model(run.path)
        if found is None:
            raise FileNotFoundError(
                f"{run.path}/train/: no trained model yet; run `stepwise train` or pass `--model <dir|name>`")
        model = str(found)
    student = resolve_model(model, base_override=base)
    base_ref = resolve_model(base or recipe.training.base_model) if need_base else None
    return student, base_ref


def _pick_hosted(
    recipe: Recipe, run: RunDir, model: str | None, base: str | None, *, need_base: bool,
) -> tuple[ModelRef, ModelRef | None]:
    from stepwise.training.openai_ft import fine_tuned_model_of, resolve_base_url

    spec = recipe.training.openai
    url = resolve_base_url(spec)
    if model is None:
        found = fine_tuned_model_of(run.path)
        if found is None:
            raise FileNotFoundError(
                f"{run.path}/train/openai_job.json: no succeeded fine-tuning job yet; run `stepwise train "
                "RECIPE --backend openai` or pass `--model openai:<model>`")
        model = f"openai:{found['fine_tuned_model']}"
        url = found.get("base_url") or url
    if model.startswith("openai:") and "@" not in model and url:
        model = f"{model}@{url}"
    student = resolve_model(model, base_override=base)
    if student.kind == "openai":
        student.info["api_key_env"] = spec.api_key_env
    # forgetting needs local weights; the hosted base model stands in so the report says why it is skipped
    base_ref = resolve_model(base or f"openai:{spec.model}" + (f"@{url}" if url else "")) if need_base else None
    return student, base_ref


def in_domain_benchmarks(recipe: Recipe, run: RunDir) -> set[str]:
    """Benchmarks whose training data was mixed in as general data (GSM8K via general_mix): from
    the curate stage's manifest entry, else from the provenance of `general` rows in curate/train."""
    found: set[str] = set()
    curate = run.stage_info("curate") or {}
    mix = curate.get("general_mix") or {}
    found.update(mix.get("in_domain_benchmarks") or [])
    files: set[str] = set()
    train = run.layout.curated("train")
    if train.exists():
        for _, row in iter_jsonl(train):
            general = row.get("general")
            if general:
                files.add(str(general.get("file", "")) if isinstance(general, dict) else str(general))
    if recipe.curation.general_mix is not None and (files or mix):
        files.add(str(recipe.curation.general_mix.file))
    for f in files:
        found.update(_pool_benchmarks(f))
    return found


def _pool_benchmarks(path: str) -> set[str]:
    try:
        from stepwise.curation.mixing import in_domain_benchmarks as curation_in_domain
    except ImportError:
        return {b for b in ("gsm8k", "mmlu", "hellaswag", "arc_easy", "arc_challenge") if b in path.lower()}
    return set(curation_in_domain(Path(path)))


def run_eval(
    recipe: Recipe, run: RunDir, *, model: str | None = None, base: str | None = None, skip_task: bool = False,
    skip_forgetting: bool = False, compare_base: bool | None = None, log=print, progress_factory=None,
    compare_teacher: bool | None = None, offline: bool = False, max_cost: float | None = None,
) -> EvalOutcome:
    eval_dir = run.stage_dir("eval")
    fspec = recipe.eval.forgetting
    need_forgetting = fspec.enabled and not skip_forgetting
    if compare_base is None:
        compare_base = recipe.eval.task.compare_base
    compare_base = compare_base and recipe.eval.task.enabled and not skip_task
    if compare_teacher is None:
        compare_teacher = recipe.eval.task.compare_teacher
    compare_teacher = compare_teacher and recipe.eval.task.enabled and not skip_task
    student, base_ref = pick_models(recipe, run, model, base, need_base=need_forgetting)
    outcome = EvalOutcome()
    if compare_base and base_ref is None:  # only the comparison needs it: a missing base is a note, not an error
        try:
            base_ref = resolve_model(base or recipe.training.base_model)
        except (FileNotFoundError, ValueError) as exc:
            outcome.notes.append(f"student vs base skipped: {exc}")
    test_path = run.layout.curated("test")
    inputs = [p for p in (test_path,) if p.exists()]
    params = {"model": student.identity(), "base": base_ref.identity() if base_ref else None, "eval": recipe.eval.model_dump(),
              "skip_task": skip_task, "skip_forgetting": skip_forgetting, "compare_base": compare_base,
              "compare_teacher": compare_teacher}
    with run.stage("eval", inputs=inputs, params=params) as st:
        model_info = {"label": student.label, "kind": student.kind, "spec": student.spec,
                      "path": str(student.path) if student.path else None,
                      "base": str(student.base) if student.base else None, **student.info,
                      "parameters": count_parameters(student)}
        st.extra(model=model_info)
        # -- task ------------------------------------------------------------------------------
        if recipe.eval.task.enabled and not skip_task:
            if not test_path.exists():
                outcome.notes.append(f"task eval skipped: {test_path} not found (run `stepwise curate`)")
            else:
                rows = load_test_rows(run.path)
                contamination = check_contamination(run.path, rows)  # raises ContaminationError
                device = _device(recipe.eval.task.device)
                log(f"task eval: {student.label} on {len(rows)} test rows [{device}]")
                bar = progress_factory(len(rows[: recipe.eval.task.limit] if recipe.eval.task.limit else rows),
                                       "generating") if progress_factory else None
                report, preds = evaluate_task(recipe, student, rows, device=device,
                                              progress=bar.advance if bar else None)
                if bar:
                    bar.close()
                report["headline"] = {k: report["metrics"][k] for k in HEADLINE_TASK[report["task_type"]]
                                      if k in report["metrics"]}
                report.update(model_info=model_info, contamination=contamination, recipe=recipe.name,
                              run=str(run.path), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
                if compare_base and base_ref is not None:
                    report["base_comparison"] = _base_comparison(
                        recipe, student, base_ref, rows, report, preds, eval_dir, device, outcome, log,
                        progress_factory)
                    if report["base_comparison"] is not None:
                        outcome.outputs += [eval_dir / BASE_REPORT, eval_dir / BASE_PREDICTIONS]
                outcome.outputs += _student_vs_teacher(
                    recipe, run, student, base_ref if compare_base else None, rows, report, preds, device, outcome,
                    log, compare_teacher=compare_teacher, offline=offline, max_cost=max_cost)
                atomic_write_jsonl(run.layout.task_predictions, preds)
                atomic_write_json(run.layout.task_report, report)
                outcome.task = report
                outcome.outputs += [run.layout.task_report, run.layout.task_predictions]
        # -- forgetting --------------------------------------------------------------------------
        if not fspec.enabled:
            outcome.gate_verdict, outcome.gate_reason = NOT_CONFIGURED, "eval.forgetting.enabled is false"
        elif skip_forgetting:
            outcome.gate_verdict, outcome.gate_reason = SKIPPED, "--skip-forgetting"
        elif not fspec.benchmarks:
            outcome.gate_verdict, outcome.gate_reason = NOT_MEASURED, "eval.forgetting.benchmarks is empty"
        else:
            # until a report says otherwise, the gate measured nothing
            outcome.gate_verdict, outcome.gate_reason = NOT_MEASURED, "the forgetting eval did not run"
        if need_forgetting and base_ref is not None and fspec.benchmarks:
            endpoint_error, api_key = None, None
            if student.kind == "gguf":  # lm-eval's hf model reads HF weights; the gate is not measured
                endpoint_error = (f"{student.path} is a GGUF file; evaluate forgetting on the same student's HF "
                                  "weights (e.g. --model <run>/package/model)")
                outcome.notes.append(f"forgetting eval NOT run: {endpoint_error}")
                outcome.gate_reason = f"forgetting eval NOT run: {endpoint_error}"
            elif not student.is_local:
                try:
                    if not base_ref.is_local:
                        raise EndpointLogprobsError("the base model must be local (its tokenizer splits prompts)")
                    api_key = os.environ.get(student.info.get("api_key_env") or recipe.eval.task.api_key_env)
                    probe_endpoint_logprobs(student, api_key)
                except EndpointLogprobsError as exc:
                    endpoint_error = str(exc)
                    outcome.notes.append(f"forgetting eval NOT run: {exc}")
                    outcome.gate_reason = (f"forgetting eval NOT run: {exc} (set eval.forgetting.enabled: false "
                                           "to train without the gate)")
                    st.extra(forgetting_error=endpoint_error)
            if endpoint_error is None:
                device = _device(fspec.device)
                fdir = eval_dir / "forgetting"
                data_dir = recipe.resolve(fspec.data_dir) if fspec.data_dir else None
                tasks = prepare_tasks(list(fspec.benchmarks), fspec.subset_size, fspec.num_fewshot, fdir, data_dir)
                for t in tasks:
                    if fspec.subset_size and t.n < fspec.subset_size:
                        outcome.notes.append(f"{t.benchmark.name}: only {t.n} questions available "
                                             f"(subset_size {fspec.subset_size}); set eval.forgetting.data_dir for more")
                started = time.time()
                lm_log = fdir / "lm_eval.log"  # lm-eval's own progress bars: the run's log, not the console
                before = evaluate_model(base_ref, tasks, fdir / "tasks", batch_size=fspec.batch_size, device=device,
                                        cache_dir=fdir / "cache", log=log, lm_eval_log=lm_log)
                after = evaluate_model(student, tasks, fdir / "tasks", batch_size=fspec.batch_size, device=device,
                                       cache_dir=fdir / "cache", log=log, lm_eval_log=lm_log,
                                       tokenizer=(base_ref.path or base_ref.base) if not student.is_local else None,
                                       concurrency=recipe.eval.task.concurrency, api_key=api_key)
                rep = forgetting_report(before, after, max_drop=fspec.max_drop, relative=fspec.drop_kind == "relative",
                                        in_domain=in_domain_benchmarks(recipe, run) & set(before),
                                        n_boot=recipe.eval.task.bootstrap,
                                        requested=[t.benchmark.name for t in tasks])
                both = [n for n in before if n in after]
                rep.update(
                    base=base_ref.label, model=student.label, subset_size=fspec.subset_size,
                    num_fewshot=fspec.num_fewshot, device=device, wall_s=round(time.time() - started, 3),
                    lm_eval={"version": before[next(iter(before))]["lm_eval"] if before else None,
                             "task_dir": str(fdir / "tasks"),
                             "runs": {n: {"before_cached": before[n]["cached"], "after_cached": after[n]["cached"],
                                          "before_wall_s": before[n]["wall_s"], "after_wall_s": after[n]["wall_s"]}
                                      for n in both}},
                    model_info=model_info, recipe=recipe.name, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                )
                missing = rep["gate"]["not_measured"]
                for name, why in missing.items():
                    outcome.notes.append(f"forgetting: {name} NOT measured ({why})")
                outcome.gate_verdict = rep["gate"]["verdict"]
                outcome.gate_reason = ("; ".join(f"{n} not measured ({why})" for n, why in missing.items())
                                       if missing else "" if rep["benchmarks"] else "no benchmark was measured")
                items = [{"benchmark": n, "doc_index": i, "before": b, "after": a}
                         for n in both for i, (b, a) in enumerate(zip(before[n]["items"], after[n]["items"], strict=True))]
                atomic_write_jsonl(run.layout.forgetting_items, items)
                atomic_write_json(run.layout.forgetting_report, rep)
                outcome.forgetting = rep
                outcome.outputs += [run.layout.forgetting_report, run.layout.forgetting_items]
        st.outputs(*outcome.outputs)
        st.extra(gate=outcome.gate, notes=outcome.notes)
        if outcome.task:
            st.counts(test_rows=outcome.task["n"])
    return outcome


def _base_comparison(
    recipe: Recipe, student: ModelRef, base_ref: ModelRef, rows: list[dict[str, Any]], report: dict[str, Any],
    preds: list[dict[str, Any]], eval_dir: Path, device: str, outcome: EvalOutcome, log, progress_factory,
) -> dict[str, Any] | None:
    """The base model on the same test items, paired with the student (None, with a note, when skipped)."""
    if student.identity() == base_ref.identity():
        outcome.notes.append("student vs base skipped: the evaluated model is the base model")
        return None
    limit = recipe.eval.task.limit
    n = len(rows[:limit] if limit else rows)
    log(f"task eval: base {base_ref.label} on the same {n} test rows [{device}] (eval.task.compare_base)")
    bar = progress_factory(n, "generating (base)") if progress_factory else None
    try:
        base_report, base_preds, cached = evaluate_base_task(recipe, base_ref, rows, eval_dir, device=device,
                                                             progress=bar.advance if bar else None)
    except (OSError, ValueError, RuntimeError) as exc:
        outcome.notes.append(f"student vs base skipped: the base model {base_ref.label} could not be run ({exc})")
        return None
    finally:
        if bar:
            bar.close()
    comparison = compare_to_base(report, preds, base_report, base_preds, n_boot=recipe.eval.task.bootstrap,
                                 labels=list(recipe.task.label_set) if recipe.task.is_classification else None)
    comparison["cached"] = cached
    return comparison


def _student_vs_teacher(
    recipe: Recipe, run: RunDir, student: ModelRef, base_ref: ModelRef | None, rows: list[dict[str, Any]],
    report: dict[str, Any], preds: list[dict[str, Any]], device: str, outcome: EvalOutcome, log, *,
    compare_teacher: bool, offline: bool, max_cost: float | None,
) -> list[Path]:
    """eval/student_vs_teacher.json: teacher (unless skipped), base (when compared) and student with
    accuracy, latency, cost per 1k requests and the break-even volume (stepwise.evals.teacher_compare)."""
    from stepwise.evals import teacher_compare as tc

    cph, bs = recipe.eval.student_cost_per_hour, recipe.eval.task.batch_size
    limit = recipe.eval.task.limit
    scored = rows[:limit] if limit else rows
    written: list[Path] = []
    notes: list[str] = []
    teacher, comparisons = None, {}
    if compare_teacher:
        log(f"task eval: teacher {recipe.teacher.model} on the same {len(scored)} test rows (eval.task.compare_teacher)")
        try:
            t_report, t_preds, info, comparisons["teacher"] = tc.score_teacher(
                recipe, rows, report, preds, offline=offline, max_cost=max_cost)
        except tc.TeacherNotScored as exc:
            notes.append(f"teacher not scored: {exc}")
        except Exception as exc:  # noqa: BLE001 - the student's results stand; say why the teacher is missing
            notes.append(f"teacher not scored: {type(exc).__name__}: {exc}")
        else:
            teacher = tc.teacher_entry(recipe, t_report, info, cph)
            atomic_write_jsonl(run.layout.teacher_predictions, t_preds)
            written.append(run.layout.teacher_predictions)
    else:
        notes.append("teacher not scored: --no-teacher / eval.task.compare_teacher is false")
    base_entry = None
    base_cmp = report.get("base_comparison")
    base_path = run.layout.eval_dir / BASE_REPORT
    if base_ref is not None and base_cmp and base_path.exists():
        base_report = json.loads(base_path.read_text(encoding="utf-8"))
        base_entry = tc.local_model_entry("base", base_report, _batch1(tc, base_ref, recipe, scored, device, notes),
                                          cph, bs)
        comparisons["base"] = base_cmp
    student_entry = tc.local_model_entry("student", report, _batch1(tc, student, recipe, scored, device, notes), cph,
                                         bs)
    table = tc.build_table(recipe, run, student=student_entry, base=base_entry, teacher=teacher,
                           comparisons=comparisons, notes=notes)
    tc.write_table(run, table)
    outcome.student_vs_teacher = table
    report["student_vs_teacher"] = {"path": str(run.layout.student_vs_teacher.relative_to(run.path)),
                                    "break_even": table["break_even"]["text"]}
    outcome.notes += notes
    return [*written, run.layout.student_vs_teacher]


def _batch1(tc, model: ModelRef, recipe: Recipe, rows: list[dict[str, Any]], device: str,
            notes: list[str]) -> dict[str, Any] | None:
    generate = None
    if model.kind == "gguf":  # a GGUF student is timed on the backend that serves it (llama.cpp)
        from stepwise.evals.gguf_generate import generate_gguf

        def generate(m, prompts, *, max_new_tokens, batch_size, device):
            return generate_gguf(m, prompts, max_new_tokens=max_new_tokens)
    try:
        return tc.measure_batch1(model, recipe, rows, device, generate=generate)
    except (OSError, ValueError, RuntimeError) as exc:
        notes.append(f"batch-1 latency of {model.label} not measured: {exc}")
        return None


def _device(setting: str) -> str:
    return default_device() if setting == "auto" else setting
