"""The review stage: curated train/val rows -> review/{reviewed,rejected}.jsonl + agreement.json.

Two modes (`review.mode`):
- `auto` (default): `review_auto` accepts every curated train/val row (`review.status =
  auto_accepted`). This is what `stepwise run` calls.
- `argilla`: `push` sends rows to Argilla (records keyed by the row id, so a re-push updates them
  in place and keeps annotators' responses) and records in `push.json` what it pushed where;
  annotators accept, correct or discard them in the web UI, and may rewrite the rationale (an
  editable question, the teacher's as suggestion); `pull` reads the dataset `push.json` names
  (whatever `review.mode` says now) and writes the outcome:
    * submitted rows (>= `min_submitted` submitted responses, more submits than discards) with
      the reviewers' majority answer applied (`review.corrected` when it differs from the
      teacher's) and their rationale settled (`settle_rationale`: a rewrite that passes
      curation's rationale checks, else label-only for a corrected row),
    * discarded rows to `rejected.jsonl` with reason `discarded_by_reviewer`,
    * pending rows (not reviewed enough yet): the pull stops (`ReviewPending`, exit 3) unless
      `accept_policy: submitted_or_pending` or `--accept-pending` lets them train as the teacher
      answered,
    * rows not in a sample (`send: sample`) stay `auto_accepted`.
  `agreement.json` has per-question agreement (percent, Cohen's and Fleiss' kappa) and the
  teacher's accuracy against the reviewers. Talks to Argilla through its SDK only
  (`stepwise.review.argilla`); the decisions and statistics here are our own code.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepwise.review.agreement import canonical, majority, question_agreement, teacher_accuracy

from stepwise.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

SPLITS = ("train", "val")


# -- inputs -------------------------------------------------------------------------------------


def curated_paths(run: RunDir) -> list[Path]:
    paths = [run.layout.curated(s) for s in SPLITS]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: not found; run `stepwise curate` first")
    return paths


def load_curated(run: RunDir) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for split, path in zip(SPLITS, curated_paths(run), strict=True):
        for row in read_jsonl(path):
            row.setdefault("split", split)
            rows.append(row)
    return rows


def _review_dir(run: RunDir) -> Path:
    return run.stage_dir("review")


# -- auto ---------------------------------------------------------------------------------------


def review_auto(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    """Accept every curated train/val row; the default review."""
    inputs = curated_paths(run)
    _review_dir(run)  # the folder the files below go to
    with run.stage("review", inputs=inputs, params={"mode": "auto"}) as st:
        rows = load_curated(run)
        reviewed = [{**r, "review": {"status": "auto_accepted", "responses": [], "corrected": False}} for r in rows]
        atomic_write_jsonl(run.layout.reviewed, reviewed)
        atomic_write_jsonl(run.layout.review_rejected, [])
        counts = {"rows": len(rows), "auto_accepted": len(rows), "submitted": 0, "discarded": 0, "pending": 0}
        summary = {"mode": "auto", "counts": counts, "questions": {}, "teacher_accuracy": None}
        atomic_write_json(run.layout.agreement, summary)
        st.outputs(run.layout.reviewed, run.layout.review_rejected, run.layout.agreement)
        st.counts(**counts)
    return summary


# -- sampling -----------------------------------------------------------------------------------


def select_rows(recipe: Recipe, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All rows, or a sample: stratified by teacher label, lowest confidence first in each stratum."""
    spec = recipe.review
    if spec.send == "all" or spec.sample_size >= len(rows):
        return rows
    rng = random.Random(recipe.curation.seed)
    strata: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        strata[str(canonical(r.get("label"))) if recipe.task.is_classification else "all"].append(r)
    for members in strata.values():
        rng.shuffle(members)
        if spec.low_confidence_first:
            members.sort(key=_confidence)
    # Largest-remainder allocation, at least one per stratum while the budget lasts.
    total, n = len(rows), spec.sample_size
    keys = sorted(strata, key=lambda k: (-len(strata[k]), k))
    quota = {k: min(len(strata[k]), int(n * len(strata[k]) / total)) for k in keys}
    for k in keys:
        if sum(quota.values()) >= n:
            break
        if quota[k] == 0:
            quota[k] = 1
    remainders = sorted(keys, key=lambda k: -((n * len(strata[k]) / total) - int(n * len(strata[k]) / total)))
    while sum(quota.values()) < n:
        grew = False
        for k in remainders:
            if sum(quota.values()) >= n:
                break
            if quota[k] < len(strata[k]):
                quota[k] += 1
                grew = True
        if not grew:
            break
    chosen = [r for k in keys for r in strata[k][: quota[k]]]
    if spec.low_confidence_first:
        chosen.sort(key=_confidence)
    return chosen


def _confidence(row: dict[str, Any]) -> tuple[int, float]:
    parsed_ok = 0 if row.get("parse_status", "ok") != "ok" else 1
    agreement = row.get("agreement")
    return parsed_ok, float(agreement) if isinstance(agreement, int | float) else 1.0


# -- push ---------------------------------------------------------------------------------------


@dataclass
class PushReport:
    dataset: str
    workspace: str
    url: str
    selected: int = 0
    sent: int = 0
    created: int = 0
    updated: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    dataset_created: bool = False
    wall_s: float = 0.0


def push(recipe: Recipe, run: RunDir, *, batch_size: int = 500, log=print) -> PushReport:
    """Create (or update) the review dataset and send the selected rows; bad rows are reported
    in `review/push_errors.jsonl` and do not stop the others."""
    import argilla as rg
    from stepwise.review.argilla import (
        build_record,
        build_settings,
        check_compatible,
        client_for,
        dataset_name,
        has_rationale_question,
        resolve_connection,
        validate_row,
    )

    started = time.time()
    conn = resolve_connection(recipe)
    client = client_for(conn)
    name, ws_name = dataset_name(recipe), recipe.review.workspace
    report = PushReport(dataset=name, workspace=ws_name, url=conn.url)

    workspace = client.workspaces(ws_name)
    if workspace is None:
        workspace = rg.Workspace(name=ws_name, client=client).create()
        log(f"created workspace '{ws_name}'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SDK warns when the dataset does not exist yet
        dataset = client.datasets(name, workspace=ws_name)
    if dataset is None:
        dataset = rg.Dataset(name=name, workspace=ws_name, settings=build_settings(recipe), client=client).create()
        report.dataset_created = True
        log(f"created dataset '{name}' in workspace '{ws_name}'")
    else:
        for note in check_compatible(dataset, recipe):
            log(f"warning: {note}")
        if dataset.settings.distribution.min_submitted != recipe.review.min_submitted:
            dataset.settings.distribution = rg.TaskDistribution(min_submitted=recipe.review.min_submitted)
            dataset.update()

    rows = load_curated(run)
    selected = select_rows(recipe, rows)
    report.selected = len(selected)
    existing = _existing_ids(client, dataset)  # the server's bulk reply does not say which were updated
    rationale_q = has_rationale_question(dataset)
    good: list[tuple[dict[str, Any], Any]] = []
    for row in selected:
        problem = validate_row(recipe, row)
        if problem:
            report.errors.append({"id": row.get("id"), "error": problem})
            continue
        good.append((row, build_record(recipe, row, rationale_question=rationale_q)))

    for i in range(0, len(good), batch_size):
        _send(client, dataset, good[i : i + batch_size], report)
    sent_ids = {str(r["id"]) for r, _ in good} - {str(e["id"]) for e in report.errors}
    report.updated = len(sent_ids & existing)
    report.created = report.sent - report.updated
    report.wall_s = round(time.time() - started, 3)

    _review_dir(run)  # the folder the files below go to
    atomic_write_jsonl(run.layout.review_push_errors, report.errors)
    previous = _read_json(run.layout.review_push) or {}
    same = previous.get("dataset") == name
    pushed = sorted(set(previous.get("pushed_ids", []) if same else []) | sent_ids)
    failed = {str(e["id"]): e["error"] for e in report.errors}
    if same:
        failed = {k: v for k, v in (previous.get("failed") or {}).items() if k not in sent_ids} | failed
    # What was pushed decides how it is pulled (`pull` reads mode, dataset, workspace and ids from
    # here, not from a recipe that may have changed since, e.g. back to `review.mode: auto`).
    atomic_write_json(run.layout.review_push, {
        "mode": "argilla", "dataset": name, "workspace": ws_name, "url": conn.url, "dataset_id": str(dataset.id),
        "rationale_question": rationale_q,
        "send": recipe.review.send, "selected": report.selected, "sent": report.sent, "created": report.created,
        "updated": report.updated, "errors": len(report.errors), "pushed_ids": pushed, "failed": failed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    for err in report.errors[:20]:
        log(f"error: row {err['id']}: {err['error']}")
    if len(report.errors) > 20:
        log(f"... {len(report.errors) - 20} more in {run.layout.review_push_errors}")
    return report


def _send(client: Any, dataset: Any, batch: list[tuple[dict[str, Any], Any]], report: PushReport) -> None:
    """Upsert a batch (by external id = row id); when the server refuses it, split it to find and
    report the bad records. Uses the SDK's record models and error handling (`bulk_upsert`):
    `records.log` re-parses the returned records and the 2.8 SDK fails on a discarded response
    without values."""
    from stepwise.review.argilla import bulk_upsert

    try:
        models = []
        for _, rec in batch:
            rec.dataset = dataset
            models.append(rec.api_model())
        bulk_upsert(client, dataset.id, models)
        report.sent += len(batch)
    except Exception as exc:  # noqa: BLE001 - the server's message goes into the report
        if len(batch) == 1:
            row = batch[0][0]
            report.errors.append({"id": row.get("id"), "error": f"server refused the record: {_short(exc)}"})
            return
        mid = len(batch) // 2
        _send(client, dataset, batch[:mid], report)
        _send(client, dataset, batch[mid:], report)


def _short(exc: Exception) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text[:500]


def _existing_ids(client: Any, dataset: Any) -> set[str]:
    return {str(m.external_id) for m in _all_record_models(client, dataset, with_responses=False)}


def _all_record_models(client: Any, dataset: Any, *, with_responses: bool = True, page: int = 1000) -> list[Any]:
    out: list[Any] = []
    offset = 0
    while True:
        models = client.api.records.list(
            dataset_id=dataset.id, offset=offset, limit=page, with_suggestions=with_responses,
            with_responses=with_responses,
        )
        out.extend(models)
        if len(models) < page:
            return out
        offset += page


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


# -- pull ---------------------------------------------------------------------------------------


class ReviewPending(Exception):
    """Pushed rows are still waiting for reviewers: the review stage stops (exit 3), resumable."""

    def __init__(self, message: str, progress: dict[str, Any]):
        super().__init__(message)
        self.progress = progress


@dataclass
class _Pulled:
    """What a pull reads from Argilla: the dataset `push.json` names, its records and users."""

    name: str
    workspace: str
    url: str
    push_info: dict[str, Any]
    users: dict[str, str]
    models: dict[str, Any]
    pushed: set[str]


def _pushed_target(recipe: Recipe, run: RunDir) -> tuple[dict[str, Any], str, str]:
    """(push.json, dataset, workspace): what this run pushed; the recipe's names only for a run
    pushed before push.json recorded them (or never pushed, for the error message)."""
    from stepwise.review.argilla import dataset_name

    info = _read_json(run.layout.review_push) or {}
    return info, info.get("dataset") or dataset_name(recipe), info.get("workspace") or recipe.review.workspace


def _unpushed_ids(push_info: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Curated rows that a `send: all` push should have sent but did not: curation ran again after
    the push and made rows Argilla has never seen. Pulling past them would train them unreviewed."""
    if not push_info or push_info.get("send", "all") != "all":
        return []  # a sample leaves rows out on purpose
    known = set(push_info.get("pushed_ids") or []) | set((push_info.get("failed") or {}).keys())
    return [str(r.get("id")) for r in rows if str(r.get("id")) not in known]


def _fetch(recipe: Recipe, run: RunDir) -> _Pulled:
    import httpx
    from stepwise.review.argilla import ReviewError, client_for, resolve_connection

    push_info, name, ws = _pushed_target(recipe, run)
    conn = resolve_connection(recipe)
    try:
        client = client_for(conn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the SDK warns when the dataset does not exist
            dataset = client.datasets(name, workspace=ws)
    except httpx.TransportError as exc:
        raise ReviewError(f"cannot reach Argilla at {conn.url} ({exc}) to pull '{name}': start it with "
                          "`stepwise review serve`, or set review.url / $ARGILLA_API_URL") from None
    if dataset is None:
        raise ReviewError(f"no dataset '{name}' in workspace '{ws}' at {conn.url}: run `stepwise review push` first")
    if push_info.get("dataset_id") and str(dataset.id) != push_info["dataset_id"]:
        raise ReviewError(
            f"dataset '{name}' in workspace '{ws}' at {conn.url} is not the one this run pushed to "
            f"({run.layout.review_push}: id {push_info['dataset_id']}, found {dataset.id}); it was deleted "
            "and created again, so the reviews made there are not in it. Point review.url at the server that has "
            "them, or push again with `stepwise review push`"
        )
    users = {str(u.id): u.username for u in client.users}
    models = {str(m.external_id): m for m in _all_record_models(client, dataset)}
    pushed = set(push_info.get("pushed_ids") or models)
    return _Pulled(name, ws, conn.url, push_info, users, models, pushed)


def pull(recipe: Recipe, run: RunDir, *, accept_pending: bool = False, log=print, offline: bool = False,
         max_cost: float | None = None) -> dict[str, Any]:
    """Read the reviewers' responses and write the review stage's outputs.

    What was pushed decides how it is pulled: with a `review/push.json` the dataset, workspace and
    ids recorded there are read from Argilla whatever `review.mode` says now; without one, `auto`
    accepts every row. When pushed rows are still pending the stage records `waiting` and raises
    ReviewPending (nothing goes to training on a partial review) unless `accept_pending` or
    `review.accept_policy: submitted_or_pending` lets those rows through with the teacher's answer."""
    if recipe.review.mode == "auto" and not run.layout.review_push.exists():
        return review_auto(recipe, run)
    inputs = curated_paths(run)
    _review_dir(run)  # the folder the files below go to
    pulled = _fetch(recipe, run)
    if recipe.review.mode == "auto":
        log(f"review: {run.layout.review_push} records {len(pulled.pushed)} rows pushed to '{pulled.name}': pulling "
            "their reviews (review.mode is auto)")
    allow_pending = accept_pending or recipe.review.accept_policy == "submitted_or_pending"
    rows = load_curated(run)
    never_pushed = _unpushed_ids(pulled.push_info, rows)
    if never_pushed and not allow_pending:
        raise ReviewPending(
            f"{len(never_pushed)} curated rows (e.g. {never_pushed[0]}) were never sent to Argilla: curation ran again "
            f"after the push; run `stepwise review push` to send them (reviews already given are kept), or "
            f"`--accept-pending` to train them unreviewed", {"never_pushed": len(never_pushed)})
    params = {"mode": "argilla", "dataset": pulled.name, "workspace": pulled.workspace,
              "min_submitted": recipe.review.min_submitted, "accept_policy": recipe.review.accept_policy,
              "accept_pending": accept_pending}
    waiting: ReviewPending | None = None
    with run.stage("review", inputs=inputs, params=params) as st:
        result = decide(recipe, rows, pulled.models, pulled.pushed, pulled.users,
                        failed=pulled.push_info.get("failed") or {}, accept_pending=accept_pending)
        summary = result["summary"]
        summary.update(dataset=pulled.name, workspace=pulled.workspace, url=pulled.url)
        c = summary["counts"]
        if c["pending"] and not allow_pending:
            # Nothing is written for training: the previous reviewed.jsonl (if any) stays, and the
            # stage is `waiting`, which export refuses to read past.
            progress = _progress(recipe, rows, pulled)
            atomic_write_json(run.layout.review_progress, progress)
            st.outputs(run.layout.review_progress)
            st.counts(**c)
            st.mark("waiting")
            waiting = ReviewPending(_pending_message(progress), progress)
        else:
            if recipe.review.rationalize_corrections:  # the teacher explains the reviewers' corrected answers
                from stepwise.curation.rationalization import rationalize_corrected

                rat = rationalize_corrected(recipe, result["reviewed"], offline=offline, max_cost=max_cost)
                summary["rationalize_corrections"] = rat
                c["rationalized_corrections"] = rat.get("rationalized_corrections", 0)
                c["rationalize_rejected"] = rat.get("rationalize_rejected", 0)
            atomic_write_jsonl(run.layout.reviewed, result["reviewed"])
            atomic_write_jsonl(run.layout.review_rejected, result["rejected"])
            atomic_write_json(run.layout.agreement, summary)
            st.outputs(run.layout.reviewed, run.layout.review_rejected, run.layout.agreement)
            st.counts(**c)
    if waiting is not None:
        raise waiting
    log(f"review: {c['submitted']} submitted ({c['corrected']} corrected, {c['rationale_dropped_after_correction']} "
        f"of them without a rationale), {c['discarded']} discarded, {c['pending']} pending"
        f"{' (accepted with the teacher answer)' if c['pending'] else ''}, "
        f"{c['auto_accepted']} not sampled; {c['reviewed_rows']} rows -> reviewed.jsonl")
    return summary


def review_progress(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    """How far the reviewers are with what this run pushed, overall and per annotator."""
    if not run.layout.review_push.exists():
        from stepwise.review.argilla import ReviewError

        raise ReviewError(f"{run.layout.review_push}: nothing was pushed from this run "
                          "(`stepwise review push`, or `stepwise run --review argilla`)")
    pulled = _fetch(recipe, run)
    return _progress(recipe, load_curated(run), pulled)


def _progress(recipe: Recipe, rows: list[dict[str, Any]], pulled: _Pulled) -> dict[str, Any]:
    counts = decide(recipe, rows, pulled.models, pulled.pushed, pulled.users,
                    failed=pulled.push_info.get("failed") or {})["summary"]["counts"]
    ids = {str(r.get("id")) for r in rows} & pulled.pushed
    per_user: dict[str, dict[str, int]] = defaultdict(lambda: {"submitted": 0, "discarded": 0, "draft": 0})
    for rid in ids:
        model = pulled.models.get(rid)
        for resp in (model.responses or []) if model is not None else []:
            r = _response_dict(resp, pulled.users)
            if r["status"] in ("submitted", "discarded", "draft"):
                per_user[r["user"]][r["status"]] += 1
    total = counts["pushed"]
    return {
        "dataset": pulled.name, "workspace": pulled.workspace, "url": pulled.url,
        "pushed": total, "reviewed": total - counts["pending"], "pending": counts["pending"],
        "submitted": counts["submitted"], "discarded": counts["discarded"], "corrected": counts["corrected"],
        "missing_in_argilla": counts["missing_in_argilla"], "min_submitted": recipe.review.min_submitted,
        "annotators": {u: per_user[u] for u in sorted(per_user)},
    }


def _pending_message(progress: dict[str, Any]) -> str:
    msg = (f"{progress['reviewed']} of {progress['pushed']} reviewed; re-run when done, or `--accept-pending` "
           f"(the {progress['pending']} pending rows then train with the teacher's answer)")
    if progress["missing_in_argilla"]:
        msg += (f"; {progress['missing_in_argilla']} pushed rows are missing from '{progress['dataset']}' "
                "(push again to restore them)")
    return msg + ". Progress per annotator: `stepwise review status RECIPE`"


def _answers(model: Any, question: str, users: dict[str, str]) -> dict[str, Any]:
    out = {}
    for resp in model.responses or []:
        if str(resp.status.value if hasattr(resp.status, "value") else resp.status) != "submitted":
            continue
        value = (resp.values or {}).get(question, {}).get("value")
        if value is not None:
            out[users.get(str(resp.user_id), str(resp.user_id))] = value
    return out


def decide(
    recipe: Recipe, rows: list[dict[str, Any]], models: dict[str, Any], pushed: set[str], users: dict[str, str],
    failed: dict[str, str] | None = None, *, accept_pending: bool = False,
) -> dict[str, Any]:
    """Apply the review outcome to each curated row (pure: no I/O, testable without a server).

    `pushed`: ids sent to Argilla; `failed`: ids that could not be sent (id -> error), rejected
    with reason `invalid_for_review`; other rows were not in the sample and stay auto-accepted.
    Pending rows go to `reviewed` only under `accept_policy: submitted_or_pending` or `accept_pending`.
    The rationale of each submitted row is settled by `settle_rationale`."""
    failed = failed or {}
    from stepwise.curation.validate import Validator
    from stepwise.review.argilla import ANSWER_Q, LABEL_Q, NOTE_Q, QUALITY_Q, RATIONALE_Q

    spec = recipe.review
    take_pending = accept_pending or spec.accept_policy == "submitted_or_pending"
    validator = Validator(recipe)
    answer_q = LABEL_Q if recipe.task.is_classification else ANSWER_Q
    reviewed, rejected = [], []
    counts = dict.fromkeys(
        ("rows", "pushed", "submitted", "discarded", "pending", "auto_accepted", "corrected", "invalid_correction",
         "invalid_for_review", "reviewed_rows", "missing_in_argilla", "rationale_edited",
         "rationale_dropped_after_correction", "rationale_edit_rejected"), 0,
    )
    ratings: dict[str, list[dict[str, Any]]] = {answer_q: [], QUALITY_Q: []}
    teacher_pairs: list[tuple[Any, Any]] = []
    for row in rows:
        counts["rows"] += 1
        rid = str(row.get("id"))
        if rid in failed and rid not in pushed:
            counts["invalid_for_review"] += 1
            rejected.append({**row, "reason": "invalid_for_review", "step": "review", "detail": failed[rid],
                             "collided_with": None})
            continue
        if rid not in pushed:
            reviewed.append({**row, "review": {"status": "auto_accepted", "responses": [], "corrected": False,
                                               "sampled": False}})
            counts["auto_accepted"] += 1
            continue
        counts["pushed"] += 1
        model = models.get(rid)
        if model is None:
            counts["missing_in_argilla"] += 1
        responses = [_response_dict(r, users) for r in (model.responses if model is not None else [])]
        submitted = [r for r in responses if r["status"] == "submitted"]
        discarded = [r for r in responses if r["status"] == "discarded"]
        answers = _answers(model, answer_q, users) if model is not None else {}
        quality = _answers(model, QUALITY_Q, users) if model is not None else {}
        if answers:
            ratings[answer_q].append({u: canonical(_parse_answer(recipe, v)) for u, v in answers.items()})
        if quality:
            ratings[QUALITY_Q].append(quality)
        notes = [r["values"].get(NOTE_Q) for r in responses if r["values"].get(NOTE_Q)]
        base_review = {"responses": responses, "teacher_label": row.get("label")}
        if quality:
            base_review["rationale_quality"] = round(sum(quality.values()) / len(quality), 3)
        if notes:
            base_review["notes"] = notes

        if discarded and len(discarded) > len(submitted):
            counts["discarded"] += 1
            rejected.append({**row, "reason": "discarded_by_reviewer", "step": "review",
                             "detail": "; ".join(notes) or f"discarded by {', '.join(r['user'] for r in discarded)}",
                             "collided_with": None, "review": {**base_review, "status": "discarded", "corrected": False}})
            continue
        if len(submitted) >= spec.min_submitted and submitted:
            parsed = {u: _parse_answer(recipe, v) for u, v in answers.items()}
            invalid = [u for u, v in parsed.items() if v is _INVALID]
            valid = {u: v for u, v in parsed.items() if v is not _INVALID}
            if not valid:
                if invalid:
                    counts["invalid_correction"] += 1
                    rejected.append({**row, "reason": "invalid_correction", "step": "review",
                                     "detail": f"answer from {', '.join(invalid)} is not valid JSON", "collided_with": None,
                                     "review": {**base_review, "status": "submitted", "corrected": False}})
                    continue
                final = row.get("label")  # submitted without an answer: accept the teacher's
            else:
                winner = majority([canonical(v) for v in valid.values()], prefer=canonical(row.get("label")))
                final = next(v for v in valid.values() if canonical(v) == winner)
            corrected = canonical(final) != canonical(row.get("label"))
            teacher_pairs.append((canonical(row.get("label")), canonical(final)))
            counts["submitted"] += 1
            counts["corrected"] += int(corrected)
            new_row = {**row, "label": final}
            if corrected and not recipe.task.is_classification:
                new_row["answer_text"] = json.dumps(final, ensure_ascii=False)
            # Rationales written by the reviewers who gave the final answer (their edit of the teacher's).
            edits = {u: t for u, t in (_answers(model, RATIONALE_Q, users) if model is not None else {}).items()
                     if u in valid and canonical(valid[u]) == canonical(final)}
            review = {**base_review, "status": "submitted", "corrected": corrected}
            for key in settle_rationale(new_row, review, edits, corrected=corrected, validator=validator):
                counts[key] += 1
            reviewed.append({**new_row, "review": review})
            continue
        counts["pending"] += 1
        if take_pending:
            review = {**base_review, "status": "pending", "corrected": False}
            if accept_pending and spec.accept_policy != "submitted_or_pending":
                review["accepted_pending"] = True  # `--accept-pending`: the teacher's answer, unreviewed
            reviewed.append({**row, "review": review})
    counts["reviewed_rows"] = len(reviewed)
    summary = {
        "mode": "argilla",
        "counts": counts,
        "questions": {q: question_agreement(items) for q, items in ratings.items()},
        "teacher_accuracy": teacher_accuracy(teacher_pairs),
        "accept_policy": spec.accept_policy,
        "accept_pending": accept_pending,
        "min_submitted": spec.min_submitted,
    }
    return {"reviewed": reviewed, "rejected": rejected, "summary": summary}


def _same_text(a: str | None, b: str | None) -> bool:
    return " ".join((a or "").split()) == " ".join((b or "").split())


def settle_rationale(
    row: dict[str, Any], review: dict[str, Any], edits: dict[str, str], *, corrected: bool, validator: Any,
) -> list[str]:
    """Decide, in place, which rationale a submitted row trains with; returns the counters to bump.

    A rationale the reviewers rewrote (`edits`: user -> text, from those who gave the final answer)
    is kept when it passes curation's own rationale checks (`Validator._rationale`: length, copy of
    the input, and the consistency check against the final answer), as `rationale_source:
    reviewer`. A corrected row otherwise trains label-only: the teacher's rationale was written for
    the teacher's answer, so it is dropped even when it names no label the check would catch
    (`rationale_dropped_after_correction`; the text stays in `review.teacher_rationale`). An
    uncorrected row keeps the rationale it had."""
    teacher = row.get("rationale")
    source = row.get("rationale_source") or ("teacher" if teacher else None)
    bumps: list[str] = []
    problems = []
    for user in sorted(edits):
        text = edits[user]
        if not isinstance(text, str) or not text.strip() or _same_text(text, teacher):
            continue
        rejection = validator._rationale({**row, "rationale": text}, row["label"])
        if rejection is None:
            row.update(rationale=text.strip(), rationale_source="reviewer")
            review.update(teacher_rationale=teacher, rationale_by=user)
            return ["rationale_edited"]
        problems.append(f"{user}: {rejection.reason} ({rejection.detail})" if rejection.detail
                        else f"{user}: {rejection.reason}")
    if problems:
        review["rationale_edit_rejected"] = problems
        bumps.append("rationale_edit_rejected")
    if corrected and teacher:
        row.update(rationale=None, rationale_source=None)
        review.update(teacher_rationale=teacher, rationale_dropped="the teacher's rationale argues for the "
                      "teacher's answer" + ("; the reviewer's rewrite failed the checks" if problems else ""))
        bumps.append("rationale_dropped_after_correction")
    elif teacher:
        row["rationale_source"] = source
    return bumps


def training_rationale(row: dict[str, Any]) -> str | None:
    """The rationale a reviewed row may train with. A corrected row trains with a rationale only
    when it is not the one written for the teacher's answer: rows pulled before rationales were
    settled (no `rationale_source`, or `teacher`) train label-only."""
    review = row.get("review") or {}
    if review.get("corrected") and row.get("rationale_source") in (None, "teacher"):
        return None
    return row.get("rationale")


def rationale_source(row: dict[str, Any]) -> str | None:
    """Where the rationale a row trains with came from (`teacher`, `reviewer`, ...); None when it
    trains without one. Recorded per example in the export and preference lineage."""
    if row.get("general") or not training_rationale(row):
        return None
    return row.get("rationale_source") or "teacher"


_INVALID = object()


def _parse_answer(recipe: Recipe, value: Any) -> Any:
    if recipe.task.is_classification or not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _INVALID


def _response_dict(resp: Any, users: dict[str, str]) -> dict[str, Any]:
    status = resp.status.value if hasattr(resp.status, "value") else str(resp.status)
    return {
        "user": users.get(str(resp.user_id), str(resp.user_id)),
        "status": status,
        "values": {q: v.get("value") for q, v in (resp.values or {}).items()},
    }
