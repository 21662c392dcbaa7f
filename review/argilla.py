"""The Argilla side of review: connection, dataset settings, records from curated rows.

Imported only by `stepwise.review.stage` for `push`/`pull` (the `auto` mode needs no Argilla). Talks
to the server only through the `argilla` SDK.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from stepwise.recipe import Recipe

LABEL_Q = "label"
ANSWER_Q = "answer"
QUALITY_Q = "rationale_quality"
NOTE_Q = "note"
# The editable rationale (teacher's as suggestion). Its own name: Argilla wants field and question
# names unique, and the read-only `rationale` field stays for datasets created before this question.
RATIONALE_Q = "rationale_edit"
MAX_RECORD_BYTES = 512 * 1024
TEACHER_AGENT = "teacher"


class ReviewError(RuntimeError):
    """Review cannot proceed (no server, incompatible dataset); the message says what to do."""


@dataclass
class Connection:
    url: str
    api_key: str
    source: str


def resolve_connection(recipe: Recipe) -> Connection:
    """Server URL and key: recipe `review.url` / `$ARGILLA_API_URL`, key from `review.api_key_env`;
    else the embedded server started by `stepwise review serve`."""
    spec = recipe.review
    url = spec.url or os.environ.get("ARGILLA_API_URL")
    key = os.environ.get(spec.api_key_env)
    if url and key:
        return Connection(url.rstrip("/"), key, "recipe/env")
    from stepwise.argilla_embedded.server import EmbeddedServer

    srv = EmbeddedServer()
    info, creds = srv.read_info(), srv.credentials()
    if url is None and info is not None and srv.healthy(info):
        url = info.url
    if key is None and creds is not None:
        key = creds.api_key
    if not url or not key:
        raise ReviewError(
            "no Argilla server: run `stepwise review serve` (embedded), or set review.url / $ARGILLA_API_URL "
            f"and ${spec.api_key_env}"
        )
    return Connection(url.rstrip("/"), key, "embedded")


def client_for(conn: Connection):
    import argilla as rg

    client = rg.Argilla(api_url=conn.url, api_key=conn.api_key, timeout=120)
    if conn.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        # On loopback, compressing multi-MB bulk replies costs the server more than it saves.
        client.api.http_client.headers["Accept-Encoding"] = "identity"
    return client


def bulk_upsert(client: Any, dataset_id: Any, models: list[Any]) -> int:
    """Upsert up to 500 record models; returns how many already existed (were updated).

    The SDK's `RecordsAPI.bulk_upsert` with the same request, URL and errors (its own
    `api_error_handler`), minus two costs push does not need: it encodes the body with the stdlib
    `json` and validates every record the server echoes back (vectors included) into pydantic
    models that push never reads. With 384-d vectors those were ~0.3 of the client's ~0.5 CPU
    seconds per 1,000 records (`benchmarks/bench_review.py`). Here the body goes through orjson
    (same JSON values: UUIDs and datetimes as strings, floats in shortest round-trip form) and only
    the reply's `updated_item_ids` is read.
    """
    import orjson
    from argilla._exceptions._api import api_error_handler

    limit = client.api.records.MAX_RECORDS_PER_UPSERT_BULK
    if len(models) > limit:
        raise ValueError(f"Cannot upsert more than {limit} records at once")

    @api_error_handler
    def put() -> int:
        body = orjson.dumps({"items": [m.model_dump() for m in models]}, option=orjson.OPT_NON_STR_KEYS)
        response = client.api.http_client.put(
            url=f"/api/v1/datasets/{dataset_id}/records/bulk", content=body,
            headers={"Content-Type": "application/json"},
        )
        response.raise_for_status()
        return len(orjson.loads(response.content).get("updated_item_ids") or [])

    return put()


def dataset_name(recipe: Recipe) -> str:
    return recipe.review.dataset or recipe.name


def wants_rationale_question(recipe: Recipe) -> bool:
    """DSS rows carry a rationale a reviewer may have to rewrite when they change the answer."""
    return recipe.teacher.format == "dss"


def build_settings(recipe: Recipe):
    import argilla as rg

    task = recipe.task
    if task.is_classification:
        answer_q = rg.LabelQuestion(
            name=LABEL_Q, title="Label", labels=list(task.label_set),
            description="The teacher's label is pre-selected; keep it or pick the right one.",
        )
    else:
        answer_q = rg.TextQuestion(
            name=ANSWER_Q, title="Answer (JSON)", use_markdown=False,
            description="The teacher's answer is pre-filled; correct the JSON if it is wrong.",
        )
    return rg.Settings(
        guidelines=(
            f"Task: {task.instructions}\n\nCheck the teacher's answer and rationale. Submit to accept "
            "(after correcting the answer if needed), Discard to drop the example from training."
        ),
        fields=[
            rg.TextField(name="input", title="Input", use_markdown=True),
            rg.TextField(name="rationale", title="Teacher rationale", required=False, use_markdown=True),
            rg.TextField(name="teacher_answer", title="Teacher answer", use_markdown=True),
        ],
        questions=[
            answer_q,
            *([rg.TextQuestion(
                name=RATIONALE_Q, title="Rationale", required=False, use_markdown=False,
                description="The teacher's rationale is pre-filled. If you change the answer, rewrite it so it argues "
                "for your answer; otherwise the example trains without a rationale.",
            )] if wants_rationale_question(recipe) else []),
            rg.RatingQuestion(
                name=QUALITY_Q, title="Rationale quality", values=[1, 2, 3, 4, 5], required=False,
                description="1 = wrong or useless, 5 = correct and helpful.",
            ),
            rg.TextQuestion(name=NOTE_Q, title="Note", required=False, use_markdown=False),
        ],
        metadata=[
            rg.TermsMetadataProperty(name="validator_status", title="Validator status"),
            rg.IntegerMetadataProperty(name="dedup_cluster_size", title="Dedup cluster size"),
            rg.FloatMetadataProperty(name="self_consistency", title="Self-consistency"),
            rg.TermsMetadataProperty(name="split", title="Split"),
            *([rg.TermsMetadataProperty(name="teacher_label", title="Teacher label")] if task.is_classification else []),
        ],
        distribution=rg.TaskDistribution(min_submitted=recipe.review.min_submitted),
    )


def render_input(recipe: Recipe, value: Any) -> str:
    if isinstance(value, dict):
        fields = [f for f in recipe.task.input_fields if f in value] or list(value)
        if len(fields) == 1:
            return str(value[fields[0]])
        return "\n\n".join(f"**{f}**: {value[f]}" for f in fields)
    return str(value)


def answer_text(label: Any) -> str:
    if isinstance(label, dict | list):
        return json.dumps(label, indent=2, ensure_ascii=False)
    return str(label)


def validate_row(recipe: Recipe, row: dict[str, Any]) -> str | None:
    """Why a curated row cannot be sent for review, or None."""
    if not row.get("id"):
        return "missing field `id`"
    if row.get("input") in (None, "", {}):
        return "missing field `input`"
    if row.get("label") is None:
        return "missing field `label` (the teacher's answer)"
    dss = (row.get("format") or recipe.teacher.format) == "dss"
    if dss and not (row.get("rationale") or "").strip():
        return "missing field `rationale` (DSS rows need the teacher's rationale)"
    if recipe.task.is_classification:
        if not isinstance(row["label"], str) or row["label"] not in recipe.task.label_set:
            return f"label {row['label']!r} is not one of the task's classes {recipe.task.label_set}"
    elif not isinstance(row["label"], dict | list):
        return f"structured answer must be a JSON object, got {type(row['label']).__name__}"
    size = len(json.dumps({k: row.get(k) for k in ("input", "rationale", "label")}, ensure_ascii=False).encode())
    if size > MAX_RECORD_BYTES:
        return f"record too large: {size} bytes > {MAX_RECORD_BYTES} (input + rationale + answer)"
    return None


def build_record(recipe: Recipe, row: dict[str, Any], *, rationale_question: bool = True):
    """The Argilla record for a curated row; `rationale_question`: the dataset has `RATIONALE_Q`
    (datasets created before it existed do not), so the teacher's rationale is suggested there."""
    import argilla as rg

    task = recipe.task
    score = row.get("agreement")
    score = float(score) if isinstance(score, int | float) else None
    if task.is_classification:
        suggestion = rg.Suggestion(LABEL_Q, row["label"], score=score, agent=TEACHER_AGENT)
    else:
        suggestion = rg.Suggestion(ANSWER_Q, answer_text(row["label"]), score=score, agent=TEACHER_AGENT)
    suggestions = [suggestion]
    if rationale_question and (row.get("rationale") or "").strip():
        suggestions.append(rg.Suggestion(RATIONALE_Q, row["rationale"], agent=TEACHER_AGENT))
    checks = row.get("checks") or {}
    validator = checks.get("validator") if isinstance(checks.get("validator"), str) else None
    metadata: dict[str, Any] = {
        "validator_status": validator or str(row.get("parse_status") or "unknown"),
        "dedup_cluster_size": int(row.get("dedup_cluster_size") or 1),
        "split": str(row.get("split") or "train"),
    }
    if score is not None:
        metadata["self_consistency"] = score
    if task.is_classification:
        metadata["teacher_label"] = row["label"]
    return rg.Record(
        id=str(row["id"]),
        fields={
            "input": render_input(recipe, row["input"]),
            "rationale": row.get("rationale") or "",
            "teacher_answer": answer_text(row["label"]) if task.is_classification else
            "```json\n" + answer_text(row["label"]) + "\n```",
        },
        metadata=metadata,
        suggestions=suggestions,
    )


def has_rationale_question(dataset: Any) -> bool:
    return any(q.name == RATIONALE_Q for q in dataset.settings.questions)


def check_compatible(dataset: Any, recipe: Recipe) -> list[str]:
    """An existing dataset must have the questions this recipe needs; returns warnings for what an
    older dataset lacks but can do without (the editable rationale: a published Argilla dataset
    cannot gain a question, so corrected rows from it train label-only)."""
    names = {q.name for q in dataset.settings.questions}
    need = {LABEL_Q if recipe.task.is_classification else ANSWER_Q, QUALITY_Q, NOTE_Q}
    if not need <= names:
        raise ReviewError(
            f"dataset '{dataset.name}' exists with questions {sorted(names)}, expected {sorted(need)}: "
            "set review.dataset to a new name"
        )
    if recipe.task.is_classification:
        q = next(q for q in dataset.settings.questions if q.name == LABEL_Q)
        labels = list(q.labels) if hasattr(q, "labels") else []
        if labels and set(labels) != set(recipe.task.label_set):
            raise ReviewError(f"dataset '{dataset.name}' has labels {labels}, the recipe has {recipe.task.label_set}")
    if wants_rationale_question(recipe) and not has_rationale_question(dataset):
        return [f"dataset '{dataset.name}' was created without the editable rationale question "
                f"'{RATIONALE_Q}': reviewers cannot rewrite rationales there, so a row whose answer they correct "
                "trains without a rationale. Set review.dataset to a new name to get the question."]
    return []
