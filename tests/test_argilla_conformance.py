"""Conformance suite for the embedded search engine, in-process against the real plugin class.

The plugin imports argilla-server, which lives in `.venv-argilla`. Under the main venv this file
has a single test that runs the same file with `.venv-argilla/bin/python -m pytest`; under the
server's venv it is the suite itself: one parametrised table of search behaviours (text, filters,
sort, pagination) checked against a plain-Python reference over the same rows, plus metrics,
progress, similarity and update behaviours, all through `StepwiseSqliteEngine`'s async API with
argilla-server's own model objects.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARGILLA_PY = REPO / ".venv-argilla" / "bin" / "python"
IN_SERVER_VENV = importlib.util.find_spec("argilla_server") is not None


if not IN_SERVER_VENV:

    def test_conformance_suite_in_server_venv(tmp_path: Path) -> None:
        if not ARGILLA_PY.exists():
            pytest.fail(".venv-argilla is missing: run `make setup` (scripts/setup_argilla.sh)")
        # Importing argilla_server copies its static folder into TMPDIR: keep that inside tmp_path.
        env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
        proc = subprocess.run(
            [str(ARGILLA_PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-x"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        tail = (proc.stdout + proc.stderr)[-6000:]
        print(tail)
        assert proc.returncode == 0, tail
        assert " passed" in proc.stdout

else:
    import stepwise.argilla_embedded.search_engine as plugin
    from argilla_server.enums import DatasetStatus, RecordStatus, ResponseStatus, SimilarityOrder, SortOrder
    from argilla_server.models import (
        Dataset,
        Field,
        MetadataProperty,
        Question,
        Record,
        Response,
        Suggestion,
        User,
        Vector,
        VectorSettings,
    )
    from argilla_server.search_engine import (
        AndFilter,
        MetadataFilterScope,
        Order,
        RangeFilter,
        RecordFilterScope,
        ResponseFilterScope,
        SearchEngine,
        SuggestionFilterScope,
        TermsFilter,
        TextQuery,
    )
    from stepwise.argilla_embedded.sqlite_index import SqliteIndex

    N = 30
    TOPICS = ["billing refund", "login crash", "shipping delay"]
    LABELS = ["billing", "technical", "shipping"]
    BASE = dt.datetime(2025, 1, 1, 12, 0, 0)
    DIM = 8

    def run(coro):
        return asyncio.run(coro)

    def _vec(i: int) -> list[float]:
        v = [0.0] * DIM
        v[i % 3] = 1.0
        v[3 + (i % 5)] = 0.3 + 0.05 * (i % 7)
        return v

    class World:
        """A dataset with N records, two users and their responses, built from plain rows."""

        def __init__(self, tmp: Path):
            os.environ["STEPWISE_ARGILLA_INDEX"] = str(tmp / "index.sqlite")
            self.engine = run(SearchEngine.registered_classes[plugin.ENGINE_NAME].new_instance())
            self.ds = Dataset(id=uuid.uuid4(), name="conf", status=DatasetStatus.ready,
                              distribution={"strategy": "overlap", "min_submitted": 1})
            self.ds.fields = [Field(name="text", settings={"type": "text"}), Field(name="note", settings={"type": "text"}),
                              Field(name="img", settings={"type": "image"})]
            self.q_label = Question(id=uuid.uuid4(), name="label", settings={"type": "label_selection"})
            self.q_rating = Question(id=uuid.uuid4(), name="quality", settings={"type": "rating"})
            self.ds.questions = [self.q_label, self.q_rating]
            self.ds.metadata_properties = [
                MetadataProperty(name="split", settings={"type": "terms"}, dataset_id=self.ds.id),
                MetadataProperty(name="cluster_size", settings={"type": "integer"}, dataset_id=self.ds.id),
                MetadataProperty(name="agreement", settings={"type": "float"}, dataset_id=self.ds.id),
                MetadataProperty(name="tags", settings={"type": "terms"}, dataset_id=self.ds.id),
            ]
            self.vs = VectorSettings(id=uuid.uuid4(), name="emb", dimensions=DIM, dataset_id=self.ds.id)
            self.ds.vectors_settings = [self.vs]
            self.alice, self.bob = User(id=uuid.uuid4()), User(id=uuid.uuid4())
            self.rows: list[dict] = []
            self.records: list[Record] = []
            for i in range(N):
                row = {
                    "i": i, "id": uuid.UUID(int=i + 1), "text": f"record {i} about {TOPICS[i % 3]}",
                    "note": "urgent" if i % 5 == 0 else "normal", "split": "val" if i % 4 == 0 else "train",
                    "cluster_size": i % 3 + 1, "agreement": round(i / N, 4) if i % 6 else None,
                    "tags": ["a", "b"] if i % 2 else ["a"], "label": LABELS[i % 3], "score": 0.5 + (i % 5) / 10,
                    "inserted_at": BASE + dt.timedelta(seconds=i), "responses": [],
                }
                if i % 3 == 0:
                    row["responses"].append({"user": self.alice, "status": "submitted", "label": LABELS[(i + 1) % 3], "quality": 1 + i % 5})
                if i % 4 == 1:
                    row["responses"].append({"user": self.bob, "status": "discarded", "label": None, "quality": None})
                if i % 7 == 2:
                    row["responses"].append({"user": self.alice, "status": "draft", "label": LABELS[i % 3], "quality": 3})
                self.rows.append(row)
                self.records.append(self._record(row))
            run(self.engine.create_index(self.ds))
            run(self.engine.index_records(self.ds, self.records))

        def _record(self, row: dict) -> Record:
            submitted = any(r["status"] == "submitted" for r in row["responses"])
            rec = Record(
                id=row["id"], external_id=f"ext-{row['i']}", fields={"text": row["text"], "note": row["note"], "img": "http://x/y.png"},
                metadata_={k: row[k] for k in ("split", "cluster_size", "agreement", "tags") if row[k] is not None} | {"unmapped": "zzz"},
                status=RecordStatus.completed if submitted else RecordStatus.pending,
                inserted_at=row["inserted_at"], updated_at=row["inserted_at"], dataset_id=self.ds.id,
            )
            rec.dataset = self.ds
            rec.responses = [
                Response(id=uuid.uuid4(), record_id=rec.id, user_id=r["user"].id, status=ResponseStatus(r["status"]),
                         values={k: {"value": r[k]} for k in ("label", "quality") if r[k] is not None})
                for r in row["responses"]
            ]
            rec.suggestions = [Suggestion(record_id=rec.id, question=self.q_label, value=row["label"], score=row["score"],
                                          agent="teacher", type="model")]
            rec.vectors = [Vector(record_id=rec.id, vector_settings_id=self.vs.id, value=_vec(row["i"]))]
            return rec

        def ids(self, pred) -> list[uuid.UUID]:
            return [r["id"] for r in self.rows if pred(r)]

        def search(self, **kw):
            return run(self.engine.search(self.ds, **kw))

    @pytest.fixture(scope="module")
    def world(tmp_path_factory) -> World:
        return World(tmp_path_factory.mktemp("conformance"))

    def _has_resp(r, status=None, user=None):
        return any((status is None or x["status"] == status) and (user is None or x["user"] is user) for x in r["responses"])

    def _ts(i: int) -> str:
        return (BASE + dt.timedelta(seconds=i)).isoformat()

    # name -> (search kwargs builder, reference predicate, ordered?)
    CASES = {
        "list_all": (lambda w: {}, lambda w, r: True),
        "text_single_term": (lambda w: {"query": "refund"}, lambda w, r: "refund" in r["text"]),
        "text_and_of_terms_across_fields": (lambda w: {"query": "crash urgent"}, lambda w, r: "crash" in r["text"] and r["note"] == "urgent"),
        "text_field_scoped": (lambda w: {"query": TextQuery(q="urgent", field="note")}, lambda w, r: r["note"] == "urgent"),
        "text_field_scoped_no_cross_match": (lambda w: {"query": TextQuery(q="urgent", field="text")}, lambda w, r: False),
        "text_phrase": (lambda w: {"query": '"shipping delay"'}, lambda w, r: "shipping delay" in r["text"]),
        "text_prefix": (lambda w: {"query": "cras*"}, lambda w, r: "crash" in r["text"]),
        "text_negation": (lambda w: {"query": "about -refund"}, lambda w, r: "refund" not in r["text"]),
        "text_or": (lambda w: {"query": "refund | crash"}, lambda w, r: "refund" in r["text"] or "crash" in r["text"]),
        "text_case_insensitive": (lambda w: {"query": "REFUND"}, lambda w, r: "refund" in r["text"]),
        "record_status_terms": (
            lambda w: {"filter": TermsFilter(RecordFilterScope("status"), ["completed"])}, lambda w, r: _has_resp(r, "submitted")),
        "record_id_terms": (
            lambda w: {"filter": TermsFilter(RecordFilterScope("id"), [str(uuid.UUID(int=3)), str(uuid.UUID(int=9))])},
            lambda w, r: r["i"] in (2, 8)),
        "record_external_id_terms": (
            lambda w: {"filter": TermsFilter(RecordFilterScope("external_id"), ["ext-4"])}, lambda w, r: r["i"] == 4),
        "record_inserted_at_range_iso": (
            lambda w: {"filter": RangeFilter(RecordFilterScope("inserted_at"), ge=_ts(10), le=_ts(14))},
            lambda w, r: 10 <= r["i"] <= 14),
        "metadata_terms": (
            lambda w: {"filter": TermsFilter(MetadataFilterScope("split"), ["val"])}, lambda w, r: r["split"] == "val"),
        "metadata_terms_list_value": (
            lambda w: {"filter": TermsFilter(MetadataFilterScope("tags"), ["b"])}, lambda w, r: "b" in r["tags"]),
        "metadata_integer_range": (
            lambda w: {"filter": RangeFilter(MetadataFilterScope("cluster_size"), ge=2, le=3)}, lambda w, r: 2 <= r["cluster_size"] <= 3),
        "metadata_integer_terms": (
            lambda w: {"filter": TermsFilter(MetadataFilterScope("cluster_size"), ["1"])}, lambda w, r: r["cluster_size"] == 1),
        "metadata_float_range_open": (
            lambda w: {"filter": RangeFilter(MetadataFilterScope("agreement"), le=0.25)},
            lambda w, r: r["agreement"] is not None and r["agreement"] <= 0.25),
        "suggestion_value_terms": (
            lambda w: {"filter": TermsFilter(SuggestionFilterScope("label", "value"), ["billing", "shipping"])},
            lambda w, r: r["label"] in ("billing", "shipping")),
        "suggestion_score_range": (
            lambda w: {"filter": RangeFilter(SuggestionFilterScope("label", "score"), ge=0.75)}, lambda w, r: r["score"] >= 0.75),
        "suggestion_agent_terms": (
            lambda w: {"filter": TermsFilter(SuggestionFilterScope("label", "agent"), ["teacher"])}, lambda w, r: True),
        "response_status_submitted": (
            lambda w: {"filter": TermsFilter(ResponseFilterScope(property="status"), ["submitted"])},
            lambda w, r: _has_resp(r, "submitted")),
        "response_status_pending_any_user": (
            lambda w: {"filter": TermsFilter(ResponseFilterScope(property="status"), ["pending"])},
            lambda w, r: not r["responses"]),
        "response_status_pending_for_user": (
            lambda w: {"filter": TermsFilter(ResponseFilterScope(property="status", user=w.alice), ["pending"])},
            lambda w, r: not _has_resp(r, user=w.alice)),
        "response_status_pending_or_draft_for_user": (
            lambda w: {"filter": TermsFilter(ResponseFilterScope(property="status", user=w.alice), ["pending", "draft"])},
            lambda w, r: not _has_resp(r, user=w.alice) or _has_resp(r, "draft", w.alice)),
        "response_status_discarded_for_user": (
            lambda w: {"filter": TermsFilter(ResponseFilterScope(property="status", user=w.bob), ["discarded"])},
            lambda w, r: _has_resp(r, "discarded", w.bob)),
        "response_question_terms": (
            lambda w: {"filter": TermsFilter(ResponseFilterScope(question="label"), ["technical"])},
            lambda w, r: any(x["label"] == "technical" for x in r["responses"])),
        "response_question_range_for_user": (
            lambda w: {"filter": RangeFilter(ResponseFilterScope(question="quality", user=w.alice), ge=4)},
            lambda w, r: any(x["user"] is w.alice and (x["quality"] or 0) >= 4 for x in r["responses"])),
        "ui_queue_pending_for_me_and_record_pending": (
            lambda w: {"filter": AndFilter([TermsFilter(ResponseFilterScope(property="status", user=w.alice), ["pending"]),
                                            TermsFilter(RecordFilterScope("status"), ["pending"]),
                                            TermsFilter(MetadataFilterScope("split"), ["train"]),
                                            RangeFilter(MetadataFilterScope("agreement"), ge=0.1)])},
            lambda w, r: not _has_resp(r, user=w.alice) and not _has_resp(r, "submitted") and r["split"] == "train"
            and r["agreement"] is not None and r["agreement"] >= 0.1),
        "and_filter": (
            lambda w: {"filter": AndFilter([TermsFilter(MetadataFilterScope("split"), ["train"]),
                                            TermsFilter(SuggestionFilterScope("label", "value"), ["technical"])])},
            lambda w, r: r["split"] == "train" and r["label"] == "technical"),
        "text_and_filter": (
            lambda w: {"query": "about", "filter": RangeFilter(MetadataFilterScope("cluster_size"), le=1)},
            lambda w, r: r["cluster_size"] == 1),
    }

    @pytest.mark.parametrize("name", list(CASES))
    def test_search_matches_reference(world: World, name: str) -> None:
        build, pred = CASES[name]
        expected = world.ids(lambda r: pred(world, r))
        result = world.search(limit=1000, **build(world))
        got = [item.record_id for item in result.items]
        assert result.total == len(expected)
        assert sorted(got) == sorted(expected)
        if "query" not in build(world):  # default order: insertion
            assert got == expected

    SORTS = {
        "inserted_at_desc": ([("record", "inserted_at", "desc")], lambda r: -r["i"]),
        "id_asc": ([("record", "id", "asc")], lambda r: str(r["id"])),
        "metadata_float_desc_missing_last": ([("metadata", "agreement", "desc")],
                                             lambda r: (r["agreement"] is None, -(r["agreement"] or 0), r["i"])),
        "metadata_float_asc_missing_last": ([("metadata", "agreement", "asc")],
                                            lambda r: (r["agreement"] is None, r["agreement"] or 0, r["i"])),
        "metadata_then_record": ([("metadata", "cluster_size", "asc"), ("record", "inserted_at", "desc")],
                                 lambda r: (r["cluster_size"], -r["i"])),
        "metadata_terms_asc": ([("metadata", "split", "asc")], lambda r: (r["split"], r["i"])),
        "suggestion_score_desc": ([("suggestion", "score", "desc")], lambda r: (-r["score"], r["i"])),
        "response_question_avg": ([("response_q", "quality", "asc")],
                                  lambda r: (not any(x["quality"] for x in r["responses"]),
                                             _avg([x["quality"] for x in r["responses"] if x["quality"]]), r["i"])),
    }

    def _avg(xs):
        return sum(xs) / len(xs) if xs else 0

    def _order(spec):
        kind, name, direction = spec
        order = SortOrder(direction)
        if kind == "record":
            return Order(RecordFilterScope(name), order)
        if kind == "metadata":
            return Order(MetadataFilterScope(name), order)
        if kind == "suggestion":
            return Order(SuggestionFilterScope("label", name), order)
        return Order(ResponseFilterScope(question=name), order)

    @pytest.mark.parametrize("name", list(SORTS))
    def test_sort_matches_reference(world: World, name: str) -> None:
        specs, key = SORTS[name]
        expected = [r["id"] for r in sorted(world.rows, key=key)]
        got = [i.record_id for i in world.search(sort=[_order(s) for s in specs], limit=1000).items]
        assert got == expected

    @pytest.mark.parametrize("offset,limit", [(0, 5), (10, 5), (28, 5), (30, 5), (0, 1000)])
    def test_pagination(world: World, offset: int, limit: int) -> None:
        expected = [r["id"] for r in world.rows][offset : offset + limit]
        res = world.search(offset=offset, limit=limit)
        assert [i.record_id for i in res.items] == expected
        assert res.total == N

    def test_text_scores_rank_best_match_first(world: World) -> None:
        res = world.search(query="refund billing")
        assert res.items and all(i.score and i.score > 0 for i in res.items)
        assert [i.score for i in res.items] == sorted((i.score for i in res.items), reverse=True)

    def test_per_user_order_is_a_stable_permutation(world: World) -> None:
        a1 = [i.record_id for i in world.search(user_id=world.alice.id, limit=100).items]
        a2 = [i.record_id for i in world.search(user_id=world.alice.id, limit=100).items]
        b = [i.record_id for i in world.search(user_id=world.bob.id, limit=100).items]
        assert a1 == a2 and sorted(a1) == sorted(b) == sorted(r["id"] for r in world.rows)
        # Every annotator walks the same random order from their own starting point.
        k = a1.index(b[0])
        assert b == a1[k:] + a1[:k]
        starts = {world.search(user_id=uuid.uuid4(), limit=1).items[0].record_id for _ in range(12)}
        assert len(starts) >= 3
        page = [i.record_id for i in world.search(user_id=world.alice.id, offset=5, limit=5).items]
        assert page == a1[5:10]

    def test_unknown_text_field_errors(world: World) -> None:
        with pytest.raises(Exception, match="not found"):
            world.search(query=TextQuery(q="x", field="nope"))

    def test_unmapped_metadata_is_not_indexed(world: World) -> None:
        assert world.search(filter=TermsFilter(MetadataFilterScope("unmapped"), ["zzz"])).total == 0

    # -- metrics and progress -----------------------------------------------------------------
    def test_terms_metrics(world: World) -> None:
        m = run(world.engine.compute_metrics_for(world.ds.metadata_properties[0]))
        n_val = sum(r["split"] == "val" for r in world.rows)
        assert m.type == "terms" and m.total == N
        assert [(v.term, v.count) for v in m.values] == [("train", N - n_val), ("val", n_val)]

    def test_terms_metrics_multi_valued(world: World) -> None:
        m = run(world.engine.compute_metrics_for(world.ds.metadata_properties[3]))
        n_b = sum("b" in r["tags"] for r in world.rows)
        assert m.total == N + n_b
        assert {v.term: v.count for v in m.values} == {"a": N, "b": n_b}

    def test_integer_and_float_metrics(world: World) -> None:
        mi = run(world.engine.compute_metrics_for(world.ds.metadata_properties[1]))
        assert (mi.type, mi.min, mi.max) == ("integer", 1, 3) and isinstance(mi.min, int)
        mf = run(world.engine.compute_metrics_for(world.ds.metadata_properties[2]))
        values = [r["agreement"] for r in world.rows if r["agreement"] is not None]
        assert mf.type == "float" and mf.min == pytest.approx(min(values)) and mf.max == pytest.approx(max(values))

    def test_dataset_progress(world: World) -> None:
        p = run(world.engine.get_dataset_progress(world.ds))
        done = sum(_has_resp(r, "submitted") for r in world.rows)
        assert p == {"total": N, "completed": done, "pending": N - done}

    def test_user_progress(world: World) -> None:
        p = run(world.engine.get_dataset_user_progress(world.ds, world.alice))
        sub = sum(_has_resp(r, "submitted", world.alice) for r in world.rows)
        draft = sum(_has_resp(r, "draft", world.alice) for r in world.rows)
        assert p == {"total": sub + draft, "submitted": sub, "draft": draft}
        p = run(world.engine.get_dataset_user_progress(world.ds, world.bob))
        assert p["discarded"] == sum(_has_resp(r, "discarded", world.bob) for r in world.rows)

    def test_draft_dataset_has_no_progress(world: World) -> None:
        draft = Dataset(id=uuid.uuid4(), status=DatasetStatus.draft)
        assert run(world.engine.get_dataset_progress(draft)) == {}

    # -- similarity ---------------------------------------------------------------------------
    def _cos_score(a, b, inverse=False):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        cos = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
        return (1 - cos) / 2 if inverse else (1 + cos) / 2

    @pytest.mark.parametrize("order", ["most_similar", "least_similar"])
    def test_similarity_by_value(world: World, order: str) -> None:
        q = _vec(4)
        res = run(world.engine.similarity_search(world.ds, world.vs, value=q, max_results=7, order=SimilarityOrder(order)))
        ref = sorted(((_cos_score(q, _vec(r["i"]), order == "least_similar"), r["i"]) for r in world.rows), key=lambda t: (-t[0], t[1]))
        assert [i.score for i in res.items] == pytest.approx([s for s, _ in ref[:7]], abs=1e-5)
        assert res.total == 7

    def test_similarity_by_record_excludes_it_and_applies_filter_and_threshold(world: World) -> None:
        rec = world.records[4]
        res = run(world.engine.similarity_search(world.ds, world.vs, record=rec, max_results=50))
        assert rec.id not in [i.record_id for i in res.items] and res.total == N - 1
        res = run(world.engine.similarity_search(world.ds, world.vs, record=rec, max_results=50,
                                                 filter=TermsFilter(MetadataFilterScope("split"), ["val"])))
        assert {i.record_id for i in res.items} == set(world.ids(lambda r: r["split"] == "val" and r["i"] != 4))
        res = run(world.engine.similarity_search(world.ds, world.vs, record=rec, max_results=50, threshold=0.95))
        assert res.items and all(i.score >= 0.95 for i in res.items)
        res = run(world.engine.similarity_search(world.ds, world.vs, record=rec, query="refund", max_results=50))
        assert {i.record_id for i in res.items} == set(world.ids(lambda r: "refund" in r["text"] and r["i"] != 4))

    def test_similarity_needs_exactly_one_source(world: World) -> None:
        with pytest.raises(ValueError):
            run(world.engine.similarity_search(world.ds, world.vs))

    # -- updates (each on its own dataset so the shared world stays intact) --------------------
    @pytest.fixture
    def fresh(tmp_path) -> World:
        return World(tmp_path)

    def test_response_updates_are_searchable(fresh: World) -> None:
        w = fresh
        rec = w.records[1]  # no alice response
        resp = Response(id=uuid.uuid4(), record_id=rec.id, user_id=w.alice.id, status=ResponseStatus.submitted,
                        values={"label": {"value": "shipping"}})
        resp.record = rec
        run(w.engine.update_record_response(resp))
        f = TermsFilter(ResponseFilterScope(property="status", user=w.alice), ["submitted"])
        assert rec.id in [i.record_id for i in w.search(filter=f, limit=100).items]
        resp.status, resp.values = ResponseStatus.discarded, {}
        run(w.engine.update_record_response(resp))
        assert rec.id not in [i.record_id for i in w.search(filter=f, limit=100).items]
        assert run(w.engine.get_dataset_user_progress(w.ds, w.alice))["discarded"] == 1
        run(w.engine.delete_record_response(resp))
        pend = TermsFilter(ResponseFilterScope(property="status", user=w.alice), ["pending"])
        assert rec.id in [i.record_id for i in w.search(filter=pend, limit=100).items]

    def test_suggestion_updates_and_deletes(fresh: World) -> None:
        w = fresh
        rec = w.records[0]
        s = Suggestion(record_id=rec.id, question=w.q_label, value="shipping", score=0.99, agent="human", type="human")
        run(w.engine.update_record_suggestion(s))
        hits = w.search(filter=TermsFilter(SuggestionFilterScope("label", "agent"), ["human"])).items
        assert [i.record_id for i in hits] == [rec.id]
        run(w.engine.delete_record_suggestion(s))
        assert w.search(filter=TermsFilter(SuggestionFilterScope("label", "value"), ["billing"])).total == \
            sum(r["label"] == "billing" for r in w.rows) - 1

    def test_partial_update_status_and_progress(fresh: World) -> None:
        w = fresh
        rec = w.records[1]
        run(w.engine.partial_record_update(rec, status=RecordStatus.completed))
        assert rec.id in [i.record_id for i in w.search(filter=TermsFilter(RecordFilterScope("status"), ["completed"])).items]
        before = sum(_has_resp(r, "submitted") for r in w.rows)
        assert run(w.engine.get_dataset_progress(w.ds))["completed"] == before + 1

    def test_reindex_replaces_and_delete_removes(fresh: World) -> None:
        w = fresh
        rec = w.records[2]
        rec.fields = {"text": "totally new words", "note": "calm"}
        rec.metadata_ = {"split": "test"}
        rec.vectors = []
        run(w.engine.index_records(w.ds, [rec]))
        assert w.search(query="refund").total == sum("refund" in r["text"] for r in w.rows if r["i"] != 2)
        assert [i.record_id for i in w.search(query="totally").items] == [rec.id]
        assert w.search(filter=TermsFilter(MetadataFilterScope("split"), ["test"])).total == 1
        assert w.search().total == N
        sim = run(w.engine.similarity_search(w.ds, w.vs, value=_vec(2), max_results=100))
        assert rec.id not in [i.record_id for i in sim.items] and sim.total == N - 1
        run(w.engine.delete_records(w.ds, w.records[:5]))
        assert w.search(limit=100).total == N - 5
        sim = run(w.engine.similarity_search(w.ds, w.vs, value=_vec(2), max_results=100))
        assert sim.total == N - 5
        run(w.engine.delete_index(w.ds))
        with pytest.raises(Exception, match="no index"):
            w.search()

    def test_other_process_sees_writes_and_vector_cache_refreshes(fresh: World, tmp_path: Path) -> None:
        w = fresh
        other = SqliteIndex(os.environ["STEPWISE_ARGILLA_INDEX"])  # a second connection, like the worker's
        try:
            assert other.count(str(w.ds.id)) == N
            run(w.engine.similarity_search(w.ds, w.vs, value=_vec(1), max_results=3))  # warm the cache
            rec = w.records[7]
            rec.vectors = [Vector(record_id=rec.id, vector_settings_id=w.vs.id, value=[0, 0, 0, 0, 0, 0, 0, 1.0])]
            doc = plugin.record_document(rec, w.ds)
            other.index_records(str(w.ds.id), [doc])
            other.update_record(str(w.records[8].id), status="completed")
            res = run(w.engine.similarity_search(w.ds, w.vs, value=[0, 0, 0, 0, 0, 0, 0, 1.0], max_results=1))
            assert res.items[0].record_id == rec.id and res.items[0].score == pytest.approx(1.0)
            assert w.records[8].id in [i.record_id for i in w.search(filter=TermsFilter(RecordFilterScope("status"), ["completed"]), limit=100).items]
        finally:
            other.close()

    def test_ping_and_info(world: World) -> None:
        assert run(world.engine.ping()) is True
        assert run(world.engine.info())["distribution"] == "stepwise-sqlite"

    def test_every_abstract_method_is_implemented() -> None:
        cls = SearchEngine.registered_classes[plugin.ENGINE_NAME]
        assert not getattr(cls, "__abstractmethods__", set())
        assert sys.modules["stepwise.argilla_embedded.search_engine"] is plugin
