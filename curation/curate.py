"""The curate stage: `generate/responses.jsonl` -> `curate/{train,val,test,rejected}.jsonl` + `funnel.json`.

Steps, in order (each one a function from rows to kept rows + reasons, see `stepwise.curation.funnel`):
validate -> filter -> dedup_exact -> dedup_near -> dedup_semantic -> split -> decontaminate ->
balance -> general_mix. The test split is cut before decontamination (so training rows are
checked against it) and before balancing (so it keeps the real class distribution); a held-out
`data.test_file` takes its place when given, and so do the gold inputs generate held out before
asking the teacher (`stepwise.curation.holdout`, the funnel's first step `hold_out_test`). Every
response row ends in exactly one of train, val, test or rejected; `funnel.json` says how many went
where and why.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from stepwise.curation.balance import balance_step
from stepwise.curation.contamination import contamination_step
from stepwise.curation.dedup import exact_step, near_step, semantic_step
from stepwise.curation.filters import filter_step
from stepwise.curation.funnel import Funnel, StepOutcome
from stepwise.curation.holdout import HELD_OUT, check_held_out, held_out_info, read_held_out, row_fields
from stepwise.curation.holdout import applies as holdout_applies
from stepwise.curation.labels import curated_gold_labels
from stepwise.curation.mixing import mix_step
from stepwise.curation.rationalization import RationalizeStopped, attach_rationalizations, rationale_sources
from stepwise.curation.rationalization import report as rationalization_report
from stepwise.curation.splits import stratified_split
from stepwise.curation.validate import validate_step

from stepwise.io import (
    DataFileError,
    atomic_write_json,
    atomic_write_jsonl,
    iter_jsonl,
    iter_records,
)
from stepwise.io import row_id as content_row_id
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

REQUIRED = ("id", "input", "parse_status")
_PARSE_STATUSES = {"ok", "missing_rationale", "missing_answer", "invalid_label", "invalid_json", "error", "not_run"}


def read_responses(path: Path) -> list[dict[str, Any]]:
    """Responses rows, checked against the contract; errors name file:line and the field."""
    rows, seen = [], {}
    for line, row in iter_jsonl(path):
        for f in REQUIRED:
            if f not in row:
                raise DataFileError(f"{path}:{line}: field '{f}' is missing (see docs/contracts.md)")
        if row["parse_status"] not in _PARSE_STATUSES:
            raise DataFileError(f"{path}:{line}: field 'parse_status': unknown value {row['parse_status']!r}")
        if not isinstance(row["input"], dict | str):
            raise DataFileError(f"{path}:{line}: field 'input' must be an object or a string")
        rid = str(row["id"])
        if rid in seen:
            raise DataFileError(f"{path}:{line}: field 'id': duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = line
        rows.append(row)
    return rows


def row_id(recipe: Recipe, raw: dict[str, Any], inp: Any) -> str:
    field = recipe.data.id_field
    if field and raw.get(field) is not None:
        return str(raw[field])
    return content_row_id(inp)


def read_test_file(recipe: Recipe) -> list[dict[str, Any]]:
    path = recipe.resolve(recipe.data.test_file)
    if path is None:
        return []
    rows = []
    for line, raw in iter_records(path):
        missing = [f for f in recipe.task.input_fields if f not in raw]
        if missing:
            raise DataFileError(f"{path}:{line}: field '{missing[0]}' is missing (task.input_fields)")
        inp = {f: raw[f] for f in recipe.task.input_fields}
        gold = raw.get(recipe.data.label_field) if recipe.data.label_field else None
        rows.append({**row_fields(recipe, raw), "id": row_id(recipe, raw, inp), "input": inp, "gold": gold,
                     "source": {"file": str(path), "line": line}, "split": "test"})
    return rows


def namespace_test_ids(test_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids are unique across a run: when the test file reuses ids of the input file (ids numbered
    per file), every test row becomes `test:<id>` (its own id kept in `source_id`), with a warning."""
    taken = {str(r["id"]) for r in rows}
    clash = [r["id"] for r in test_rows if str(r["id"]) in taken]
    if not clash:
        return test_rows
    warnings.warn(f"data.test_file reuses {len(clash)} ids of the input rows (e.g. {clash[0]}); "
                  "test rows are named test:<id>", stacklevel=2)
    for r in test_rows:
        r["source_id"] = r["id"]
        r["id"] = f"test:{r['id']}"
    return test_rows


def _stratum(recipe: Recipe):
    if not (recipe.curation.split.stratify and recipe.task.is_classification):
        return None
    return lambda r: r.get("label")


def curate_rows(
    rows: list[dict[str, Any]], recipe: Recipe, test_file_rows: list[dict[str, Any]] | None = None,
    progress: bool = False, test_source: str | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], Funnel]:
    """The whole stage on rows in memory; returns {train, val, test} and the funnel. `test_file_rows`
    are the test split when given: `data.test_file`'s rows, or (`test_source` HELD_OUT) the gold
    inputs generate held out before asking the teacher, shown as the funnel's first step."""
    funnel = Funnel()
    n = len(rows)
    if test_source is None:
        test_source = "data.test_file" if test_file_rows else "split"
    if test_source == HELD_OUT:  # never sent to the teacher: the requests they saved are in the funnel
        held = len(test_file_rows or [])
        funnel.record("hold_out_test", n + held, StepOutcome(rows, moved={"test": held} if held else {},
                                                              info={"before_generation": True,
                                                                    **held_out_info(recipe, held)}))
    steps = [("validate", validate_step), ("filter", filter_step), ("dedup_exact", exact_step)]
    for name, fn in steps:
        rows = funnel.record(name, len(rows), fn(rows, recipe))
    processes = recipe.curation.dedup.minhash.processes
    rows = funnel.record("dedup_near", len(rows), near_step(rows, recipe, processes=processes))
    rows = funnel.record("dedup_semantic", len(rows), semantic_step(rows, recipe))

    sp = recipe.curation.split
    if test_source != "split":
        parts = stratified_split(rows, {"train": sp.train, "val": sp.val}, recipe.curation.seed, _stratum(recipe))
        parts["test"] = []
        test_rows = list(test_file_rows or [])
    else:
        parts = stratified_split(rows, {"train": sp.train, "val": sp.val, "test": sp.test},
                                 recipe.curation.seed, _stratum(recipe))
        test_rows = parts["test"]
    kept = parts["train"] + parts["val"]
    rows = funnel.record("split", len(rows), StepOutcome(kept, moved={"test": len(parts["test"])} if parts["test"] else {}, info={
        "test_source": test_source, "train": len(parts["train"]), "val": len(parts["val"]), "test": len(test_rows)}))

    outcome = contamination_step(rows, recipe, test_rows)
    rows = funnel.record("decontaminate", len(rows), outcome)
    alive = {id(r) for r in rows}
    splits = {k: [r for r in parts[k] if id(r) in alive] for k in ("train", "val")}

    splits, outcome = balance_step(splits, recipe)
    funnel.record("balance", len(rows), outcome)

    mixed = mix_step(splits["train"], recipe)
    n_kept = len(splits["train"]) + len(splits["val"])
    funnel.record("general_mix", n_kept, StepOutcome(mixed.kept + splits["val"], added=mixed.added, info=mixed.info))
    splits["train"] = mixed.kept

    for name in ("train", "val"):
        for r in splits[name]:
            r["split"] = name
    for r in test_rows:
        r["split"] = "test"
    splits["test"] = test_rows
    from_pool = len(test_rows) if test_source == "split" else 0
    added = sum(s.get("added", 0) for s in funnel.steps)
    total_out = len(splits["train"]) + len(splits["val"]) + from_pool + len(funnel.rejected)
    if total_out != n + added:
        raise RuntimeError(f"curation lost rows: {n} in + {added} added != {total_out} accounted for")
    return splits, funnel


def funnel_report(funnel: Funnel, splits: dict[str, list[dict[str, Any]]], n_in: int, test_source: str) -> dict[str, Any]:
    validate = next((s for s in funnel.steps if s["step"] == "validate"), {})
    mix = next((s for s in funnel.steps if s["step"] == "general_mix"), {})
    held = next((s for s in funnel.steps if s["step"] == "hold_out_test"), None)
    return {
        "steps": funnel.steps,
        "responses": n_in,
        "kept": {k: len(v) for k, v in splits.items()},
        "rejected": len(funnel.rejected),
        "removed_by_reason": funnel.removed_by_reason(),
        "test_source": test_source,
        # the gold test rows held out of the inputs before generation: requests never sent
        "held_out_before_generation": None if held is None else {
            k: held[k] for k in ("rows", "requests_saved")},
        "teacher_accuracy": validate.get("teacher_accuracy"),
        "general_mix": None if mix.get("skipped") or not mix else {
            k: mix[k] for k in ("file", "fraction", "rows", "in_domain_benchmarks") if k in mix},
    }


class TooFewTrainRows(Exception):
    """Fewer than `curation.min_train_rows` training rows survived the funnel. The stage files are
    written (to inspect `funnel.json` / `rejected.jsonl`) but the stage is recorded `stopped`, so
    the next run curates again; `stepwise run` / `stepwise curate` exit 3."""


def too_few_rows_message(report: dict[str, Any], minimum: int) -> str:
    """Why curation ended with too little to train on: the step that removed most rows (and its
    reasons) and the teacher's agreement with gold, so a weak teacher is named as such."""
    mix = report.get("general_mix") or {}
    train = report["kept"]["train"] - int(mix.get("rows") or 0)
    worst = max(report["steps"], key=lambda s: sum(s["removed"].values()), default=None)
    parts = [f"only {train} training row{'s' if train != 1 else ''} survived curation of "
             f"{report['responses']} responses (curation.min_train_rows is {minimum})"]
    if worst is not None and sum(worst["removed"].values()):
        why = ", ".join(f"{k} {v}" for k, v in sorted(worst["removed"].items(), key=lambda kv: -kv[1]))
        parts.append(f"step '{worst['step']}' removed most: {sum(worst['removed'].values())} of {worst['in']} ({why})")
    acc = report.get("teacher_accuracy") or {}
    if acc.get("rows_with_gold"):
        parts.append(f"the teacher agreed with gold on {acc['agree']} of {acc['rows_with_gold']} parsed rows "
                     f"({acc['accuracy']:.0%}, {acc['metric']})")
    hint = ("see curate/funnel.json and curate/rejected.jsonl; a stronger teacher, a clearer prompt or more "
            "input rows fix this, or lower curation.min_train_rows to train on what is there")
    return "; ".join(parts) + f". {hint}"


def run_curate(recipe: Recipe, run: RunDir, *, offline: bool = False, max_cost: float | None = None,
               progress: bool = False, retry_unparsed: bool = True) -> dict[str, Any]:
    """Read responses, curate, write the stage files and the manifest entry; return the funnel.
    Raises TooFewTrainRows (after writing the files) when fewer than `curation.min_train_rows`
    training rows survive. With `on_gold_mismatch: rationalize` the teacher is asked first
    (`stepwise.curation.rationalization`; `offline`, `max_cost`: as for generate); RationalizeStopped
    (files written, stage `stopped`) when the cost cap stopped it."""
    responses = run.layout.responses
    if not responses.exists():
        raise DataFileError(f"{responses}: file not found (run `stepwise generate` first)")
    inputs = [responses]
    test_path = recipe.resolve(recipe.data.test_file)
    if test_path is not None:
        inputs.append(test_path)
    held_path = run.layout.held_out_test
    if held_path.exists():
        inputs.append(held_path)
    if recipe.curation.general_mix is not None:
        inputs.append(recipe.resolve(recipe.curation.general_mix.file))
    params = recipe.curation.model_dump(mode="json")
    with run.stage("curate", inputs=inputs, params=params) as st:
        rows = read_responses(responses)
        held = read_held_out(held_path) if test_path is None and held_path.exists() else []
        if held_path.exists() and holdout_applies(recipe, [*rows, *held]):
            stale = check_held_out(recipe, held_path, rows, held)
            if stale:
                raise DataFileError(stale)
            test_rows, test_source = held, HELD_OUT  # the gold test split, held out before generation
        else:  # data.test_file's rows, or none: the split cuts them from teacher-validated rows
            test_rows = namespace_test_ids(read_test_file(recipe), rows)
            test_source = "data.test_file" if test_rows else "split"
        bad_labels = curated_gold_labels(recipe, rows, test_rows)
        if bad_labels:  # a gold label the task does not spell that way: never normalised in silence
            raise DataFileError("\n".join(bad_labels))
        rationalized = None
        if recipe.curation.on_gold_mismatch == "rationalize":  # the teacher explains the gold answers first
            rationalized = attach_rationalizations(recipe, rows, offline=offline, max_cost=max_cost,
                                                   progress=progress, retry_unparsed=retry_unparsed)
        n_in = len(rows)
        splits, funnel = curate_rows(rows, recipe, test_rows, test_source=test_source)
        run.stage_dir("curate")
        paths = {}
        for name in ("train", "val", "test"):
            paths[name] = run.layout.curated(name)
            atomic_write_jsonl(paths[name], splits[name])
        paths["rejected"] = run.layout.curate_rejected
        atomic_write_jsonl(paths["rejected"], funnel.rejected)
        report = funnel_report(funnel, splits, n_in, test_source)
        validated = next((s for s in funnel.steps if s["step"] == "validate"), {})
        report["rationalize"] = rationalization_report(rationalized, validated.get("rationalized"), splits)
        report["rationale_sources"] = rationale_sources(splits)
        paths["funnel"] = run.layout.funnel
        atomic_write_json(paths["funnel"], report)
        st.outputs(*paths.values())
        st.counts(responses=n_in, train=len(splits["train"]), val=len(splits["val"]), test=len(splits["test"]),
                  rejected=len(funnel.rejected), **{f"removed_{k}": v for k, v in report["removed_by_reason"].items()})
        st.extra(funnel=[{k: s[k] for k in ("step", "in", "out", "removed")} for s in funnel.steps],
                 teacher_accuracy=report["teacher_accuracy"], general_mix=report["general_mix"],
                 held_out_before_generation=report["held_out_before_generation"],
                 rationalize=report["rationalize"], rationale_sources=report["rationale_sources"])
        minimum = recipe.curation.min_train_rows
        in_domain = report["kept"]["train"] - int((report["general_mix"] or {}).get("rows") or 0)
        stopped = too_few_rows_message(report, minimum) if in_domain < minimum else None
        if rationalized is not None and rationalized.stopped_reason:  # resumable: the rest is asked next run
            stopped = (f"rationalization stopped: {rationalized.stopped_reason}; "
                       f"{rationalized.statuses.get('not_run', 0)} rows not rationalized yet")
        if stopped:  # not `done`: the next run curates again instead of skipping
            st.mark("stopped")
            st.extra(stopped_reason=stopped)
    if stopped and rationalized is not None and rationalized.stopped_reason:
        raise RationalizeStopped(stopped)
    if stopped:
        raise TooFewTrainRows(stopped)
    return report
