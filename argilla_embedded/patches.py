"""Performance patches for argilla-server 2.8, applied in the embedded server's processes only.

1. `Question.parsed_settings` and `MetadataProperty.parsed_settings` build a new pydantic
   `TypeAdapter` (a whole core schema) on every call, and the record validators call them for
   every record and property: for a 500-record bulk upsert that was most of the server's CPU time.
   We build each adapter once; the validation itself is unchanged.
2. Every record/response/dataset change builds a webhook event (about seven queries: the dataset
   with its fields, questions, metadata properties...) before finding out that no webhook is
   enabled. We look up the enabled webhooks first (one query; once per bulk for bulk upserts)
   and build the event only when a webhook listens to it. Behaviour with webhooks is unchanged.
"""

from __future__ import annotations

import functools
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


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
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
