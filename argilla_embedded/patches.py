"""Performance patches for argilla-server 2.8, applied in the embedded server's processes only.

1. `Question.parsed_settings` and `MetadataProperty.parsed_settings` build a new pydantic
   `TypeAdapter` (a whole core schema) on every call, and the record validators call them for
   every record and property: for a 500-record bulk upsert that was most of the server's CPU time.
   We build each adapter once; the validation itself is unchanged.
2. Every record/response/dataset change builds a webhook event (about seven queries: the dataset
   with its fields, questions, metadata properties...) before finding out that no webhook is
   enabled. We look up the enabled webhooks first (one query; once per bulk for bulk upserts)
   and build the event only when a webhook listens to it. Behaviour with webhooks is unchanged.
3. JSON through orjson (when installed; `scripts/setup_argilla.sh` installs it) instead of the
   stdlib `json` module, in three places a bulk log of records with vectors spends a third of the
   server's CPU (py-spy, 500-record upserts of 384-d vectors): the database's JSON columns
   (argilla-server stores every vector as a JSON list; SQLAlchemy's SQLite dialect uses
   `json.dumps`/`json.loads` unless the engine is given `json_serializer`/`json_deserializer`, and
   argilla-server passes none), the JSON replies (Starlette's `JSONResponse.render`, which the bulk
   endpoints use to echo every record with its vectors back) and request bodies
   (`Request.json`). Upstream uses the stdlib everywhere. The output is the same JSON values
   (compact separators, as Starlette already writes); anything orjson refuses (integers beyond 64
   bits, non-string keys, invalid surrogates) falls back to the original stdlib call, so no
   value that worked before fails now. One difference: orjson writes a NaN/Infinity float as
   `null`, where the stdlib wrote the non-standard `NaN` token (JSON columns) or raised (replies).
   Measured with `benchmarks/bench_review.py --log-only` (server CPU seconds per 1,000 records):
   1.67-1.71 with the stdlib, 1.15-1.41 with orjson. `STEPWISE_ARGILLA_STDLIB_JSON=1` turns this
   patch off (A/B measurements).
"""

from __future__ import annotations

import functools
import os
from functools import cache
from typing import Any

_APPLIED = False


@cache
def _adapter(tp: Any):
    from pydantic import TypeAdapter

    return TypeAdapter(tp)


async def _listened(db: Any, events: set[str]) -> bool:
    from argilla_server.contexts import webhooks

    return any(events & set(w.events or []) for w in await webhooks.list_enabled_webhooks(db))


def _only_with_webhooks(notify):
    @functools.wraps(notify)
    async def wrapper(db, event, *args, **kwargs):
        if not await _listened(db, {str(event)}):
            return []
        return await notify(db, event, *args, **kwargs)

    return wrapper


def _orjson_patches() -> None:
    if os.environ.get("STEPWISE_ARGILLA_STDLIB_JSON"):  # for A/B benchmarks
        return
    try:
        import orjson
    except ImportError:  # an older .venv-argilla: keep the stdlib
        return
    import json

    from argilla_server.database import async_engine, sync_engine
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    def dumps(value: Any) -> str:
        try:
            return orjson.dumps(value).decode()
        except TypeError:
            return json.dumps(value)

    def loads(value: str | bytes) -> Any:
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return json.loads(value)

    # SQLAlchemy reads these when it builds a JSON column's bind/result processor (first use), so
    # this must run before the first query: `apply()` is called where the app/worker is imported.
    for engine in (async_engine, sync_engine):
        engine.dialect._json_serializer = dumps
        engine.dialect._json_deserializer = loads

    original_render = JSONResponse.render

    def render(self: JSONResponse, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:
            return original_render(self, content)

    JSONResponse.render = render  # type: ignore[method-assign]

    async def request_json(self: Request) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json

    Request.json = request_json  # type: ignore[method-assign]


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _orjson_patches()
    from argilla_server.api.schemas.v1.questions import QuestionSettings
    from argilla_server.bulk import records_bulk
    from argilla_server.contexts import datasets, distribution, records
    from argilla_server.models import database
    from argilla_server.models.metadata_properties import MetadataPropertySettings
    from argilla_server.webhooks.v1.enums import RecordEvent

    def question_settings(self):
        return _adapter(QuestionSettings).validate_python(self.settings)

    def metadata_settings(self):
        return _adapter(MetadataPropertySettings).validate_python(self.settings)

    database.Question.parsed_settings = property(question_settings)
    database.MetadataProperty.parsed_settings = property(metadata_settings)

    for module, names in (
        (records, ["notify_record_event_v1"]),
        (distribution, ["notify_record_event_v1"]),
        (datasets, ["notify_record_event_v1", "notify_response_event_v1", "notify_dataset_event_v1"]),
        (records_bulk, ["notify_record_event_v1"]),
    ):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _only_with_webhooks(getattr(module, name)))

    original = records_bulk.UpsertRecordsBulk._notify_upsert_record_events

    async def notify_upsert(self, recs):
        if await _listened(self._db, {str(RecordEvent.created), str(RecordEvent.updated)}):
            await original(self, recs)

    records_bulk.UpsertRecordsBulk._notify_upsert_record_events = notify_upsert
    _APPLIED = True
