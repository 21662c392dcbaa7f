"""argilla-server 2.8 search-engine plugin backed by `sqlite_index.SqliteIndex`.

Imported inside `.venv-argilla` (the server's Python) before `argilla_server.app`, by
`stepwise.argilla_embedded.asgi` and `stepwise.argilla_embedded.worker`. It registers the engine under
`ENGINE_NAME`; the server picks it with `ARGILLA_SEARCH_ENGINE=stepwise-sqlite`.

The index file is `$STEPWISE_ARGILLA_INDEX`, else `search-index.sqlite` in `ARGILLA_HOME_PATH`
(next to the server's `argilla.db`). SQLite calls run in a worker thread so the event loop keeps
serving other requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from argilla_server.enums import MetadataPropertyType, SimilarityOrder
from argilla_server.models import (
    Dataset,
    MetadataProperty,
    Record,
    Response,
    Suggestion,
    User,
    VectorSettings,
)
from argilla_server.search_engine.base import (
    AndFilter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    MetadataMetrics,
    Order,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)
from stepwise.argilla_embedded.sqlite_index import Hits, SqliteIndex, open_index

ENGINE_NAME = "stepwise-sqlite"


def index_path() -> Path:
    explicit = os.environ.get("STEPWISE_ARGILLA_INDEX")
    if explicit:
        return Path(explicit)
    from argilla_server.settings import settings

    return Path(settings.home_path) / "search-index.sqlite"


# -- mapping server objects to plain documents and filters ---------------------------------------


def _scope(scope: Any) -> dict[str, Any]:
    if isinstance(scope, RecordFilterScope):
        return {"kind": "record", "property": str(scope.property)}
    if isinstance(scope, MetadataFilterScope):
        return {"kind": "metadata", "name": str(scope.metadata_property)}
    if isinstance(scope, SuggestionFilterScope):
        return {"kind": "suggestion", "question": scope.question, "property": str(scope.property or "value")}
    if isinstance(scope, ResponseFilterScope):
        return {
            "kind": "response",
            "question": scope.question,
            "property": scope.property,
            "user_id": str(scope.user.id) if scope.user is not None else None,
        }
    raise ValueError(f"Cannot process request for search scope {scope}")


def to_filter(f: Any) -> tuple:
    if isinstance(f, AndFilter):
        return ("and", [to_filter(sub) for sub in f.filters])
    if isinstance(f, TermsFilter):
        return ("terms", _scope(f.scope), [str(v) for v in f.values])
    if isinstance(f, RangeFilter):
        return ("range", _scope(f.scope), f.ge, f.le)
    raise ValueError(f"Cannot process request for filter {f}")


def to_sort(sort: list[Order] | None) -> list[tuple[dict[str, Any], str]] | None:
    if not sort:
        return None
    return [(_scope(o.scope), str(o.order)) for o in sort]


def _text(query: TextQuery | str | None) -> tuple[str | None, str | None]:
    if query is None:
        return None, None
    if isinstance(query, str):
        return query, None
    return query.q, query.field


def _searchable_fields(dataset: Dataset) -> list[str]:
    return [f.name for f in dataset.fields if not f.is_image]


def record_document(
    record: Record, dataset: Dataset, _schema: tuple[list[str], set[str]] | None = None,
) -> dict[str, Any]:
    """A record as the index stores it; only metadata with a configured property is indexed.
    `_schema` = (text field names, metadata property names), computed once per bulk by the caller
    (reading them from the dataset's ORM relationships per record was a few % of a bulk log)."""
    names, known = _schema or _dataset_schema(dataset)
    fields = record.fields or {}
    doc: dict[str, Any] = {
        "id": str(record.id),
        "external_id": record.external_id,
        "status": str(record.status) if record.status is not None else None,
        "inserted_at": record.inserted_at,
        "updated_at": record.updated_at,
        "fields": {name: fields.get(name) for name in names},
    }
    if record.metadata_:
        doc["metadata"] = {k: v for k, v in record.metadata_.items() if k in known and v is not None}
    if record.responses:
        doc["responses"] = [response_document(r) for r in record.responses]
    if record.suggestions:
        doc["suggestions"] = {s.question.name: suggestion_document(s) for s in record.suggestions}
    if record.vectors:
        doc["vectors"] = {str(v.vector_settings_id): v.value for v in record.vectors}
    return doc


def _dataset_schema(dataset: Dataset) -> tuple[list[str], set[str]]:
    return [f.name for f in dataset.fields if not f.is_image], {p.name for p in dataset.metadata_properties}


def response_document(response: Response) -> dict[str, Any]:
    return {
        "id": str(response.id),
        "user_id": str(response.user_id),
        "status": str(response.status),
        "values": {q: (v or {}).get("value") for q, v in (response.values or {}).items()},
    }


def suggestion_document(suggestion: Suggestion) -> dict[str, Any]:
    return {
        "value": suggestion.value,
        "score": suggestion.score,
        "agent": suggestion.agent,
        "type": str(suggestion.type) if suggestion.type is not None else None,
    }


def _responses(hits: Hits) -> SearchResponses:
    return SearchResponses(
        items=[SearchResponseItem(record_id=h.id, score=h.score) for h in hits.items], total=hits.total
    )


# -- the engine ---------------------------------------------------------------------------------


@SearchEngine.register(engine_name=ENGINE_NAME)
@dataclasses.dataclass
class StepwiseSqliteEngine(SearchEngine):
    index: SqliteIndex

    @classmethod
    async def new_instance(cls) -> StepwiseSqliteEngine:
        path = index_path()
        return cls(index=await asyncio.to_thread(open_index, path))

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def close(self) -> None:
        # The index stays open for the process: engines are created per request.
        return None

    async def ping(self) -> bool:
        return await self._run(self.index.ping)

    async def info(self) -> dict:
        return await self._run(self.index.info)

    # -- datasets -------------------------------------------------------------------------------
    async def create_index(self, dataset: Dataset) -> None:
        await self._run(self.index.create_dataset, str(dataset.id), _searchable_fields(dataset))
        for prop in dataset.metadata_properties:
            await self.configure_metadata_property(dataset, prop)
        for vs in dataset.vectors_settings:
            await self._run(self.index.configure_vectors, str(vs.id), str(dataset.id), vs.dimensions)

    async def delete_index(self, dataset: Dataset) -> None:
        await self._run(self.index.delete_dataset, str(dataset.id))

    async def configure_metadata_property(self, dataset: Dataset, metadata_property: MetadataProperty) -> None:
        await self._run(
            self.index.configure_metadata_property, str(dataset.id), metadata_property.name, str(metadata_property.type)
        )

    async def configure_index_vectors(self, vector_settings: VectorSettings) -> None:
        await self._run(
            self.index.configure_vectors, str(vector_settings.id), str(vector_settings.dataset_id), vector_settings.dimensions
        )

    # -- records --------------------------------------------------------------------------------
    async def index_records(self, dataset: Dataset, records: Iterable[Record]) -> None:
        schema = _dataset_schema(dataset)
        docs = [record_document(r, dataset, schema) for r in records]
        await self._run(self.index.index_records, str(dataset.id), docs)

    async def partial_record_update(self, record: Record, **update: Any) -> None:
        update = {k: (str(v) if k == "status" and v is not None else v) for k, v in update.items()}
        await self._run(self.index.update_record, str(record.id), **update)

    async def delete_records(self, dataset: Dataset, records: Iterable[Record]) -> None:
        await self._run(self.index.delete_records, str(dataset.id), [str(r.id) for r in records])

    async def update_record_response(self, response: Response) -> None:
        await self._run(self.index.upsert_response, str(response.record_id), response_document(response))

    async def delete_record_response(self, response: Response) -> None:
        await self._run(self.index.delete_response, str(response.id))

    async def update_record_suggestion(self, suggestion: Suggestion) -> None:
        await self._run(
            self.index.upsert_suggestion, str(suggestion.record_id), suggestion.question.name, suggestion_document(suggestion)
        )

    async def delete_record_suggestion(self, suggestion: Suggestion) -> None:
        await self._run(self.index.delete_suggestion, str(suggestion.record_id), suggestion.question.name)

    # -- progress -------------------------------------------------------------------------------
    async def get_dataset_progress(self, dataset: Dataset) -> dict:
        if dataset.is_draft:
            return {}
        return await self._run(self.index.dataset_progress, str(dataset.id))

    async def get_dataset_user_progress(self, dataset: Dataset, user: User) -> dict:
        if dataset.is_draft:
            return {}
        return await self._run(self.index.user_progress, str(dataset.id), str(user.id))

    # -- search ---------------------------------------------------------------------------------
    async def search(
        self,
        dataset: Dataset,
        query: TextQuery | str | None = None,
        filter: Any = None,
        sort: list[Order] | None = None,
        offset: int = 0,
        limit: int = 100,
        user_id: str | None = None,
    ) -> SearchResponses:
        text, field = _text(query)
        if field is not None and dataset.field_by_name(field) is None:
            raise Exception(f"Field {field} not found in dataset {dataset.id}")
        hits = await self._run(
            self.index.search,
            str(dataset.id),
            text=text,
            text_field=field,
            filter=to_filter(filter) if filter is not None else None,
            sort=to_sort(sort),
            offset=offset,
            limit=limit,
            user_id=str(user_id) if user_id is not None else None,
        )
        return _responses(hits)

    async def similarity_search(
        self,
        dataset: Dataset,
        vector_settings: VectorSettings,
        value: list[float] | None = None,
        record: Record | None = None,
        query: TextQuery | str | None = None,
        filter: Any = None,
        max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar,
        threshold: float | None = None,
    ) -> SearchResponses:
        if bool(value) == bool(record):
            raise ValueError("Must provide either vector value or record to compute the similarity search")
        exclude = None
        if not value:
            exclude = str(record.id)
            value = record.vector_value_by_vector_settings(vector_settings) if record.vectors else None
            if not value:
                value = await self._run(self.index.vector_of, str(vector_settings.id), exclude)
        if not value:
            raise ValueError("Cannot find a vector value to apply with provided info")
        text, field = _text(query)
        hits = await self._run(
            self.index.similarity_search,
            str(dataset.id),
            str(vector_settings.id),
            value,
            k=max_results,
            exclude_id=exclude,
            text=text,
            text_field=field,
            filter=to_filter(filter) if filter is not None else None,
            least_similar=order == SimilarityOrder.least_similar,
            threshold=threshold,
        )
        return _responses(hits)

    async def compute_metrics_for(self, metadata_property: MetadataProperty) -> MetadataMetrics:
        dataset_id = str(metadata_property.dataset_id)
        if metadata_property.type == MetadataPropertyType.terms:
            m = await self._run(self.index.terms_metrics, dataset_id, metadata_property.name)
            return TermsMetrics(total=m["total"], values=[TermsMetrics.TermCount(**v) for v in m["values"]])
        m = await self._run(self.index.numeric_metrics, dataset_id, metadata_property.name)
        if metadata_property.type == MetadataPropertyType.integer:
            return IntegerMetadataMetrics(
                min=int(m["min"]) if m["min"] is not None else None, max=int(m["max"]) if m["max"] is not None else None
            )
        return FloatMetadataMetrics(min=m["min"], max=m["max"])
