"""A search index for Argilla records, stored in SQLite (stdlib + numpy only).

This is the storage and query core of the embedded search engine. It knows nothing about
argilla-server: `search_engine.py` maps the server's models and filter objects onto the plain
documents and filter tuples used here, so the core can be tested from any Python.

Everything lives in one SQLite file (WAL mode), so the web server and the background worker,
which are separate processes, see the same index. Per dataset:

- `records` rows (one per record: id, external id, status, timestamps, a per-record random key)
- an FTS5 table `fts_<dataset hex>` with one column per text field (full-text search, bm25 scores)
- `meta` rows for metadata values, `sugg` rows for suggestions, `resp`/`resp_val` rows for
  responses, `vec` rows (float32 blobs, unit-normalised) for vectors.

Semantics follow argilla-server 2.8's Elasticsearch engine: text queries are AND of terms over
all fields (or one field), terms/range filters on record, metadata, suggestion and response
scopes, response-status filters where `pending` means "no response (by this user)", sort with
missing values last, cosine similarity scored as (1 + cos) / 2.

Filters are nested tuples:
    ("and", [filter, ...])
    ("terms", scope, [values])
    ("range", scope, ge, le)
and scopes are dicts:
    {"kind": "record", "property": "status"|"id"|"external_id"|"inserted_at"|"updated_at"}
    {"kind": "metadata", "name": str}
    {"kind": "suggestion", "question": str, "property": "value"|"score"|"agent"|"type"}
    {"kind": "response", "question": str|None, "property": "status"|None, "user_id": str|None}
Orders are (scope, "asc"|"desc").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Scope = dict[str, Any]
Filter = tuple

MAX_TERMS_BUCKETS = 2**14
_MASK31 = 0x7FFFFFFF

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
  id TEXT PRIMARY KEY,
  fts TEXT NOT NULL,
  fields TEXT NOT NULL,          -- JSON list of text-searchable field names (FTS column order)
  draft INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta_props (
  dataset_id TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, PRIMARY KEY (dataset_id, name)
);
CREATE TABLE IF NOT EXISTS vec_settings (
  id TEXT PRIMARY KEY, dataset_id TEXT NOT NULL, dims INTEGER NOT NULL,
  gen INTEGER NOT NULL DEFAULT 0, del_gen INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS records (
  rid INTEGER PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  dataset_id TEXT NOT NULL,
  external_id TEXT,
  status TEXT,
  inserted_at REAL,
  updated_at REAL,
  rnd INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_ds_ins ON records (dataset_id, inserted_at, rid);
CREATE INDEX IF NOT EXISTS records_ds_status ON records (dataset_id, status);
CREATE INDEX IF NOT EXISTS records_ds_ext ON records (dataset_id, external_id);
CREATE INDEX IF NOT EXISTS records_ds_rnd ON records (dataset_id, rnd);
CREATE INDEX IF NOT EXISTS records_ds_status_rnd ON records (dataset_id, status, rnd);
CREATE TABLE IF NOT EXISTS meta (
  rid INTEGER NOT NULL, dataset_id TEXT NOT NULL, name TEXT NOT NULL, term TEXT, num REAL
);
CREATE INDEX IF NOT EXISTS meta_term ON meta (dataset_id, name, term, rid);
CREATE INDEX IF NOT EXISTS meta_num ON meta (dataset_id, name, num, rid);
CREATE INDEX IF NOT EXISTS meta_rid ON meta (rid, name);
CREATE TABLE IF NOT EXISTS sugg (
  rid INTEGER NOT NULL, dataset_id TEXT NOT NULL, question TEXT NOT NULL,
  term TEXT, num REAL, score REAL, agent TEXT, type TEXT
);
CREATE INDEX IF NOT EXISTS sugg_q ON sugg (dataset_id, question, term, rid);
CREATE INDEX IF NOT EXISTS sugg_rid ON sugg (rid, question);
CREATE INDEX IF NOT EXISTS sugg_score ON sugg (dataset_id, question, score, rid);
CREATE TABLE IF NOT EXISTS resp (
  id TEXT PRIMARY KEY, rid INTEGER NOT NULL, dataset_id TEXT NOT NULL, user_id TEXT, status TEXT
);
CREATE INDEX IF NOT EXISTS resp_rid ON resp (rid, user_id);
CREATE INDEX IF NOT EXISTS resp_ds_user ON resp (dataset_id, user_id, status);
CREATE TABLE IF NOT EXISTS resp_val (
  resp_id TEXT NOT NULL, rid INTEGER NOT NULL, user_id TEXT, question TEXT NOT NULL, term TEXT, num REAL
);
CREATE INDEX IF NOT EXISTS resp_val_resp ON resp_val (resp_id);
CREATE INDEX IF NOT EXISTS resp_val_rid ON resp_val (rid, question);
CREATE TABLE IF NOT EXISTS vec (
  vs_id TEXT NOT NULL, rid INTEGER NOT NULL, seq INTEGER NOT NULL, v BLOB NOT NULL, PRIMARY KEY (vs_id, rid)
);
CREATE INDEX IF NOT EXISTS vec_seq ON vec (vs_id, seq);
CREATE INDEX IF NOT EXISTS vec_rid ON vec (rid);
"""


class IndexError_(Exception):
    """A query the index cannot answer (unknown dataset, bad filter)."""


# -- small conversions --------------------------------------------------------------------------


def to_epoch(value: Any) -> float | None:
    """Datetimes and ISO strings to epoch seconds (naive means UTC); numbers pass through."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    raise IndexError_(f"cannot read {value!r} as a date or number")


def rand_key(text: str) -> int:
    """A stable 31-bit key from a string (a record or user id)."""
    h = 2166136261
    for b in text.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h & _MASK31


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _atoms(value: Any) -> list[tuple[str | None, float | None]]:
    """(term, num) pairs for a metadata/suggestion/response value: scalars and lists of scalars."""
    if value is None:
        return []
    if isinstance(value, list):
        out: list[tuple[str | None, float | None]] = []
        for v in value:
            if isinstance(v, dict):  # ranking {"value", "rank"} / span {"label", ...}
                v = v.get("value", v.get("label"))
            out.extend(_atoms(v))
        return list(dict.fromkeys(out))
    if isinstance(value, bool):
        return [(str(value).lower(), None)]
    if isinstance(value, int | float):
        return [(None, float(value))]
    if isinstance(value, str):
        return [(value, None)]
    return []


def field_text(value: Any) -> str:
    """Searchable text of a record field: text, chat messages' content, or str() of custom values."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # chat
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else str(value)


_WORD = re.compile(r"\w+", re.UNICODE)
_TOKEN = re.compile(r'(-?)"([^"]*)"(\*?)|(\|)|(-?)([^\s|"()+]+)')


def fts_query(text: str) -> tuple[str | None, str | None]:
    """Translate an Elasticsearch simple_query_string (default AND) into FTS5 MATCH strings.

    Returns (positive, negative): rows must match `positive` (None: any row) and must not match
    `negative`. Supports words, "phrases", prefix*, -negation and | alternatives.
    """
    alternatives: list[list[str]] = [[]]
    negatives: list[str] = []
    for m in _TOKEN.finditer(text):
        neg_phrase, phrase, star, bar, neg_word, word = m.groups()
        if bar:
            alternatives.append([])
            continue
        if phrase is not None:
            words = _WORD.findall(phrase)
            negate, prefix = bool(neg_phrase), bool(star)
        else:
            words = _WORD.findall(word or "")
            negate, prefix = bool(neg_word), (word or "").endswith("*")
        if not words:
            continue
        term = '"' + " ".join(words) + '"' + (" *" if prefix else "")
        if negate:
            negatives.append(term)
        else:
            alternatives[-1].append(term)
    alts = ["(" + " AND ".join(a) + ")" for a in alternatives if a]
    positive = " OR ".join(alts) if alts else None
    negative = " OR ".join(negatives) if negatives else None
    return positive, negative


def _fts_cols(n: int) -> list[str]:
    return [f"f{i}" for i in range(n)]


# -- results ------------------------------------------------------------------------------------


@dataclass
class Hit:
    id: str
    score: float | None = None


@dataclass
class Hits:
    items: list[Hit] = field(default_factory=list)
    total: int = 0


# -- the index ----------------------------------------------------------------------------------


class SqliteIndex:
    """One SQLite index file; safe to share between threads of a process and between processes."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        self._wlock = threading.RLock()
        self._rlock = threading.RLock()
        self._w = self._connect()
        with self._wlock:
            self._w.executescript(_SCHEMA)
        self._r = self._connect()
        self._vec_cache: dict[str, _VecCache] = {}
        self._vec_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA cache_size = -65536")
        return conn

    def close(self) -> None:
        with self._wlock, self._rlock:
            self._w.close()
            self._r.close()

    # -- transactions ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self):
        with self._wlock:
            conn = self._w
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self):
        with self._rlock:
            yield self._r

    def ping(self) -> bool:
        with self._read() as c:
            return c.execute("SELECT 1").fetchone()[0] == 1

    def info(self) -> dict[str, Any]:
        with self._read() as c:
            n = c.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        return {"distribution": "stepwise-sqlite", "version": sqlite3.sqlite_version, "path": self.path, "records": n}

    # -- datasets ----------------------------------------------------------------------------
    def create_dataset(self, dataset_id: str, text_fields: Sequence[str], draft: bool = False) -> None:
        fts = "fts_" + dataset_id.replace("-", "")
        cols = ", ".join(_fts_cols(len(text_fields)) or ["f0"])
        with self._tx() as c:
            row = c.execute("SELECT fts FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
            if row is not None:
                self._drop_dataset_rows(c, dataset_id, row[0])
            c.execute(f"CREATE VIRTUAL TABLE {fts} USING fts5({cols}, tokenize = 'unicode61 remove_diacritics 2')")
            c.execute(
                "INSERT INTO datasets (id, fts, fields, draft) VALUES (?, ?, ?, ?)",
                (dataset_id, fts, json.dumps(list(text_fields)), int(draft)),
            )

    def delete_dataset(self, dataset_id: str) -> None:
        with self._tx() as c:
            row = c.execute("SELECT fts FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
            if row is not None:
                self._drop_dataset_rows(c, dataset_id, row[0])

    def _drop_dataset_rows(self, c: sqlite3.Connection, dataset_id: str, fts: str) -> None:
        c.execute(f"DROP TABLE IF EXISTS {fts}")
        vs = [r[0] for r in c.execute("SELECT id FROM vec_settings WHERE dataset_id = ?", (dataset_id,))]
        for vs_id in vs:
            c.execute("DELETE FROM vec WHERE vs_id = ?", (vs_id,))
        c.execute("DELETE FROM vec_settings WHERE dataset_id = ?", (dataset_id,))
        rids = "SELECT rid FROM records WHERE dataset_id = ?"
        c.execute(f"DELETE FROM resp_val WHERE rid IN ({rids})", (dataset_id,))
        for table in ("meta", "sugg", "resp"):
            c.execute(f"DELETE FROM {table} WHERE dataset_id = ?", (dataset_id,))
        c.execute("DELETE FROM records WHERE dataset_id = ?", (dataset_id,))
        c.execute("DELETE FROM meta_props WHERE dataset_id = ?", (dataset_id,))
        c.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))

    def set_dataset_draft(self, dataset_id: str, draft: bool) -> None:
        with self._tx() as c:
            c.execute("UPDATE datasets SET draft = ? WHERE id = ?", (int(draft), dataset_id))

    def configure_metadata_property(self, dataset_id: str, name: str, type_: str) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO meta_props (dataset_id, name, type) VALUES (?, ?, ?) "
                "ON CONFLICT (dataset_id, name) DO UPDATE SET type = excluded.type",
                (dataset_id, name, type_),
            )

    def configure_vectors(self, vs_id: str, dataset_id: str, dims: int) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO vec_settings (id, dataset_id, dims) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET dims = excluded.dims",
                (vs_id, dataset_id, dims),
            )

    def _dataset(self, c: sqlite3.Connection, dataset_id: str) -> tuple[str, list[str]]:
        row = c.execute("SELECT fts, fields FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
        if row is None:
            raise IndexError_(f"no index for dataset {dataset_id}")
        return row[0], json.loads(row[1])

    # -- records -----------------------------------------------------------------------------
    def index_records(self, dataset_id: str, docs: Iterable[dict[str, Any]]) -> int:
        """Insert or fully replace records. A doc: id, external_id, status, inserted_at, updated_at,
        fields {name: value}, metadata {name: value}, suggestions {question: {value, score, agent,
        type}}, responses [{id, user_id, status, values {question: value}}], vectors {vs_id: [..]}."""
        docs = list(docs)
        if not docs:
            return 0
        with self._tx() as c:
            fts, fields = self._dataset(c, dataset_id)
            c.executemany(
                "INSERT INTO records (id, dataset_id, external_id, status, inserted_at, updated_at, rnd) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET external_id = excluded.external_id, "
                "status = excluded.status, inserted_at = excluded.inserted_at, updated_at = excluded.updated_at",
                [
                    (
                        d["id"], dataset_id, d.get("external_id"), d.get("status"),
                        to_epoch(d.get("inserted_at")), to_epoch(d.get("updated_at")), rand_key(d["id"]),
                    )
                    for d in docs
                ],
            )
            rid_of = self._rids(c, [d["id"] for d in docs])
            rids = [rid_of[d["id"]] for d in docs]
            self._clear_children(c, fts, rids, vectors=False)
            cols = _fts_cols(len(fields))
            if fields:
                marks = ", ".join("?" for _ in cols)
                c.executemany(
                    f"INSERT INTO {fts} (rowid, {', '.join(cols)}) VALUES (?, {marks})",
                    [(rid, *[field_text((d.get("fields") or {}).get(f)) for f in fields]) for rid, d in zip(rids, docs, strict=True)],
                )
            meta_rows, sugg_rows, resp_rows, val_rows = [], [], [], []
            vec_rows: dict[str, list[tuple[int, bytes]]] = {}
            for rid, d in zip(rids, docs, strict=True):
                for name, value in (d.get("metadata") or {}).items():
                    meta_rows.extend((rid, dataset_id, name, t, n) for t, n in _atoms(value))
                for question, s in (d.get("suggestions") or {}).items():
                    sugg_rows.extend(self._sugg_rows(rid, dataset_id, question, s))
                for r in d.get("responses") or []:
                    resp_rows.append((str(r["id"]), rid, dataset_id, _s(r.get("user_id")), _s(r.get("status"))))
                    val_rows.extend(self._resp_val_rows(r, rid))
                for vs_id, value in (d.get("vectors") or {}).items():
                    if value:
                        vec_rows.setdefault(str(vs_id), []).append((rid, _pack(value)))
            c.executemany("INSERT INTO meta (rid, dataset_id, name, term, num) VALUES (?, ?, ?, ?, ?)", meta_rows)
            self._insert_sugg(c, sugg_rows)
            c.executemany(
                "INSERT OR REPLACE INTO resp (id, rid, dataset_id, user_id, status) VALUES (?, ?, ?, ?, ?)", resp_rows
            )
            c.executemany("INSERT INTO resp_val (resp_id, rid, user_id, question, term, num) VALUES (?, ?, ?, ?, ?, ?)", val_rows)
            self._drop_stale_vectors(c, rids, {(rid, vs) for vs, rows in vec_rows.items() for rid, _ in rows})
            for vs_id, rows in vec_rows.items():
                seq = self._bump_vec_gen(c, vs_id)
                c.executemany(
                    "INSERT OR REPLACE INTO vec (vs_id, rid, seq, v) VALUES (?, ?, ?, ?)",
                    [(vs_id, rid, seq, blob) for rid, blob in rows],
                )
        return len(docs)

    @staticmethod
    def _rids(c: sqlite3.Connection, ids: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT id, rid FROM records WHERE id IN ({','.join('?' * len(chunk))})"
            out.update(dict(c.execute(q, chunk).fetchall()))
        return out

    def _clear_children(
        self, c: sqlite3.Connection, fts: str, rids: list[int], *, records_too: bool = False, vectors: bool = True
    ) -> None:
        touched_vs: set[str] = set()
        for i in range(0, len(rids), 500):
            chunk = rids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            c.execute(f"DELETE FROM {fts} WHERE rowid IN ({marks})", chunk)
            for table in ("meta", "sugg", "resp", "resp_val"):
                c.execute(f"DELETE FROM {table} WHERE rid IN ({marks})", chunk)
            if vectors:
                touched_vs.update(r[0] for r in c.execute(f"SELECT DISTINCT vs_id FROM vec WHERE rid IN ({marks})", chunk))
                c.execute(f"DELETE FROM vec WHERE rid IN ({marks})", chunk)
            if records_too:
                c.execute(f"DELETE FROM records WHERE rid IN ({marks})", chunk)
        for vs_id in touched_vs:
            c.execute("UPDATE vec_settings SET del_gen = del_gen + 1 WHERE id = ?", (vs_id,))

    @staticmethod
    def _drop_stale_vectors(c: sqlite3.Connection, rids: list[int], keep: set[tuple[int, str]]) -> None:
        """Delete vectors of re-indexed records that the new documents no longer carry."""
        touched_vs: set[str] = set()
        for i in range(0, len(rids), 500):
            chunk = rids[i : i + 500]
            rows = c.execute(f"SELECT rid, vs_id FROM vec WHERE rid IN ({','.join('?' * len(chunk))})", chunk).fetchall()
            for rid, vs_id in rows:
                if (rid, vs_id) not in keep:
                    c.execute("DELETE FROM vec WHERE vs_id = ? AND rid = ?", (vs_id, rid))
                    touched_vs.add(vs_id)
        for vs_id in touched_vs:
            c.execute("UPDATE vec_settings SET del_gen = del_gen + 1 WHERE id = ?", (vs_id,))

    @staticmethod
    def _bump_vec_gen(c: sqlite3.Connection, vs_id: str) -> int:
        c.execute("UPDATE vec_settings SET gen = gen + 1 WHERE id = ?", (vs_id,))
        row = c.execute("SELECT gen FROM vec_settings WHERE id = ?", (vs_id,)).fetchone()
        if row is None:  # vectors for settings we were never told about: track them anyway
            c.execute("INSERT INTO vec_settings (id, dataset_id, dims, gen) VALUES (?, '', 0, 1)", (vs_id,))
            return 1
        return int(row[0])

    @staticmethod
    def _sugg_rows(rid: int, dataset_id: str, question: str, s: dict[str, Any]) -> list[tuple]:
        value, score = s.get("value"), s.get("score")
        atoms = _atoms(value) or [(None, None)]
        rows = []
        for i, (t, n) in enumerate(atoms):
            sc = score[i] if isinstance(score, list) and i < len(score) else (score if not isinstance(score, list) else None)
            rows.append((rid, dataset_id, question, t, n, _num(sc), _s(s.get("agent")), _s(s.get("type"))))
        return rows

    @staticmethod
    def _insert_sugg(c: sqlite3.Connection, rows: list[tuple]) -> None:
        c.executemany(
            "INSERT INTO sugg (rid, dataset_id, question, term, num, score, agent, type) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    @staticmethod
    def _resp_val_rows(r: dict[str, Any], rid: int) -> list[tuple]:
        rows = []
        for question, value in (r.get("values") or {}).items():
            if isinstance(value, dict) and "value" in value:
                value = value["value"]
            for t, n in _atoms(value):
                rows.append((str(r["id"]), rid, _s(r.get("user_id")), question, t, n))
        return rows

    def update_record(self, record_id: str, **update: Any) -> None:
        """Partial update of record-level properties (status, external_id, timestamps, metadata)."""
        with self._tx() as c:
            row = c.execute("SELECT rid, dataset_id FROM records WHERE id = ?", (record_id,)).fetchone()
            if row is None:
                return
            rid, dataset_id = row
            for key in ("status", "external_id"):
                if key in update:
                    c.execute(f"UPDATE records SET {key} = ? WHERE rid = ?", (_s(update[key]), rid))
            for key in ("inserted_at", "updated_at"):
                if key in update:
                    c.execute(f"UPDATE records SET {key} = ? WHERE rid = ?", (to_epoch(update[key]), rid))
            if "metadata" in update:
                c.execute("DELETE FROM meta WHERE rid = ?", (rid,))
                c.executemany(
                    "INSERT INTO meta (rid, dataset_id, name, term, num) VALUES (?, ?, ?, ?, ?)",
                    [(rid, dataset_id, k, t, n) for k, v in (update["metadata"] or {}).items() for t, n in _atoms(v)],
                )

    def delete_records(self, dataset_id: str, record_ids: Iterable[str]) -> None:
        ids = [str(i) for i in record_ids]
        if not ids:
            return
        with self._tx() as c:
            fts, _ = self._dataset(c, dataset_id)
            rids = list(self._rids(c, ids).values())
            self._clear_children(c, fts, rids, records_too=True)

    def upsert_response(self, record_id: str, response: dict[str, Any]) -> None:
        with self._tx() as c:
            row = c.execute("SELECT rid, dataset_id FROM records WHERE id = ?", (record_id,)).fetchone()
            if row is None:
                return
            rid, dataset_id = row
            rid_ = str(response["id"])
            c.execute("DELETE FROM resp_val WHERE resp_id = ?", (rid_,))
            c.execute(
                "INSERT OR REPLACE INTO resp (id, rid, dataset_id, user_id, status) VALUES (?, ?, ?, ?, ?)",
                (rid_, rid, dataset_id, _s(response.get("user_id")), _s(response.get("status"))),
            )
            c.executemany(
                "INSERT INTO resp_val (resp_id, rid, user_id, question, term, num) VALUES (?, ?, ?, ?, ?, ?)",
                self._resp_val_rows(response, rid),
            )

    def delete_response(self, response_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM resp_val WHERE resp_id = ?", (str(response_id),))
            c.execute("DELETE FROM resp WHERE id = ?", (str(response_id),))

    def upsert_suggestion(self, record_id: str, question: str, suggestion: dict[str, Any]) -> None:
        with self._tx() as c:
            row = c.execute("SELECT rid, dataset_id FROM records WHERE id = ?", (record_id,)).fetchone()
            if row is None:
                return
            rid, dataset_id = row
            c.execute("DELETE FROM sugg WHERE rid = ? AND question = ?", (rid, question))
            self._insert_sugg(c, self._sugg_rows(rid, dataset_id, question, suggestion))

    def delete_suggestion(self, record_id: str, question: str) -> None:
        with self._tx() as c:
            c.execute(
                "DELETE FROM sugg WHERE question = ? AND rid = (SELECT rid FROM records WHERE id = ?)", (question, record_id)
            )

    # -- queries -----------------------------------------------------------------------------
    def search(
        self,
        dataset_id: str,
        text: str | None = None,
        text_field: str | None = None,
        filter: Filter | None = None,
        sort: Sequence[tuple[Scope, str]] | None = None,
        offset: int = 0,
        limit: int = 100,
        user_id: str | None = None,
    ) -> Hits:
        with self._read() as c:
            fts, fields = self._dataset(c, dataset_id)
            where, params, score_sql, joins = self._where(c, dataset_id, fts, fields, text, text_field, filter)
            source = f"{joins} records r ON r.rid = t.rid" if joins else "records r"
            total = self._count(c, dataset_id, fts, fields, text, text_field, filter, source, where, params)
            if user_id and not sort and not score_sql:
                # Each annotator walks the dataset's random order from their own starting point, so
                # several annotators rarely get the same next record (Elasticsearch seeds a random
                # score with the user id for the same reason). Two index range scans, no sort.
                pivot = rand_key(str(user_id))
                rows = c.execute(
                    f"SELECT r.id, NULL FROM {source} WHERE {where} AND r.rnd >= ? ORDER BY r.rnd, r.rid LIMIT ? OFFSET ?",
                    [*params, pivot, limit, offset],
                ).fetchall()
                if len(rows) < limit:
                    first = c.execute(f"SELECT COUNT(*) FROM {source} WHERE {where} AND r.rnd >= ?", [*params, pivot]).fetchone()[0]
                    rows += c.execute(
                        f"SELECT r.id, NULL FROM {source} WHERE {where} AND r.rnd < ? ORDER BY r.rnd, r.rid LIMIT ? OFFSET ?",
                        [*params, pivot, limit - len(rows), max(0, offset - first)],
                    ).fetchall()
            else:
                order_sql, order_params = self._order(sort, score_sql, user_id)
                rows = c.execute(
                    f"SELECT r.id, {score_sql or 'NULL'} FROM {source} WHERE {where} ORDER BY {order_sql} LIMIT ? OFFSET ?",
                    [*params, *order_params, limit, offset],
                ).fetchall()
        return Hits(items=[Hit(id=r[0], score=r[1] if r[1] is not None else 1.0) for r in rows], total=total)

    def _count(
        self, c: sqlite3.Connection, dataset_id: str, fts: str, fields: list[str], text: str | None,
        text_field: str | None, filter: Filter | None, source: str, where: str, params: list[Any],
    ) -> int:
        """COUNT(*) of a search. The annotation queue's "no response from me yet" filter is counted
        as (rows without it) - (rows I answered): both index-driven, instead of a probe per row."""
        mine = _pending_for_user(filter)
        if mine is not None and not (text and text.strip()):
            user, rest = mine
            w, p, _, _ = self._where(c, dataset_id, fts, fields, None, None, rest)
            everyone = c.execute(f"SELECT COUNT(*) FROM records r WHERE {w}", p).fetchone()[0]
            answered = c.execute(
                f"SELECT COUNT(DISTINCT x.rid) FROM resp x CROSS JOIN records r ON r.rid = x.rid "
                f"WHERE x.dataset_id = ? AND x.user_id = ? AND {w}",
                [dataset_id, user, *p],
            ).fetchone()[0]
            return everyone - answered
        return c.execute(f"SELECT COUNT(*) FROM {source} WHERE {where}", params).fetchone()[0]

    def _where(
        self, c: sqlite3.Connection, dataset_id: str, fts: str, fields: list[str],
        text: str | None, text_field: str | None, filter: Filter | None,
    ) -> tuple[str, list[Any], str | None, str]:
        clauses, params = ["r.dataset_id = ?"], [dataset_id]
        score_sql, joins = None, ""
        if text is not None and text.strip():
            positive, negative = fts_query(text)
            prefix = ""
            if text_field is not None:
                if text_field not in fields:
                    # Not a text-searchable field (an image): nothing can match.
                    clauses.append("0")
                else:
                    prefix = "{" + _fts_cols(len(fields))[fields.index(text_field)] + "} : "
            if positive is not None:
                # The full-text matches drive the query (CROSS JOIN keeps them the outer loop).
                joins = f"(SELECT rowid AS rid, -bm25({fts}) AS score FROM {fts} WHERE {fts} MATCH ?) t CROSS JOIN"
                params.insert(0, prefix + "(" + positive + ")")
                score_sql = "t.score"
            if negative is not None:
                clauses.append(f"r.rid NOT IN (SELECT rowid FROM {fts} WHERE {fts} MATCH ?)")
                params.append(prefix + "(" + negative + ")")
            if positive is None and negative is None:
                clauses.append("0")
        if filter is not None:
            sql, fparams = self._filter_sql(filter, dataset_id)
            clauses.append(sql)
            params.extend(fparams)
        return " AND ".join(clauses), params, score_sql, joins

    def _filter_sql(self, f: Filter, dataset_id: str, drive: bool = True) -> tuple[str, list[Any]]:
        """SQL for a filter. At most one metadata/suggestion filter becomes an `r.rid IN (...)`
        list that can drive the query (the first terms filter: usually the most selective); the
        others are probed per candidate row, so no large list is materialised."""
        kind = f[0]
        if kind == "and":
            children = list(f[1])
            driver = next((i for i, sub in enumerate(children) if drive and sub[0] == "terms"
                           and sub[1].get("kind") in ("metadata", "suggestion")), None)
            parts = [self._filter_sql(sub, dataset_id, drive=i == driver) for i, sub in enumerate(children)]
            if not parts:
                return "1", []
            return "(" + " AND ".join(p[0] for p in parts) + ")", [x for p in parts for x in p[1]]
        if kind not in ("terms", "range"):
            raise IndexError_(f"unknown filter {kind!r}")
        scope: Scope = f[1]
        drive = drive and kind == "terms"
        sk = scope.get("kind")
        if sk == "record":
            return self._record_filter(f, scope["property"])
        if sk == "metadata":
            cond, p = self._value_cond(f, "m.term", "m.num")
            if not drive:
                return f"EXISTS (SELECT 1 FROM meta m WHERE m.rid = r.rid AND m.name = ? AND {cond})", [scope["name"], *p]
            return (
                f"r.rid IN (SELECT m.rid FROM meta m WHERE m.dataset_id = ? AND m.name = ? AND {cond})",
                [dataset_id, scope["name"], *p],
            )
        if sk == "suggestion":
            prop = scope.get("property") or "value"
            if prop in ("None", "value"):
                cond, p = self._value_cond(f, "s.term", "s.num")
            elif prop == "score":
                cond, p = self._value_cond(f, "NULL", "s.score")
            elif prop in ("agent", "type"):
                cond, p = self._value_cond(f, f"s.{prop}", "NULL")
            else:
                raise IndexError_(f"cannot filter suggestions by {prop!r}")
            if not drive:
                return (f"EXISTS (SELECT 1 FROM sugg s WHERE s.rid = r.rid AND s.question = ? AND {cond})",
                        [scope["question"], *p])
            return (
                f"r.rid IN (SELECT s.rid FROM sugg s WHERE s.dataset_id = ? AND s.question = ? AND {cond})",
                [dataset_id, scope["question"], *p],
            )
        if sk == "response":
            return self._response_filter(f, scope)
        raise IndexError_(f"unknown filter scope {scope!r}")

    @staticmethod
    def _value_cond(f: Filter, term_col: str, num_col: str) -> tuple[str, list[Any]]:
        if f[0] == "terms":
            values = [str(v) for v in f[2]]
            nums = [n for n in (_num(v) for v in f[2]) if n is not None]
            conds, params = [], []
            if term_col != "NULL" and values:
                conds.append(f"{term_col} IN ({','.join('?' * len(values))})")
                params.extend(values)
            if num_col != "NULL" and nums:
                conds.append(f"{num_col} IN ({','.join('?' * len(nums))})")
                params.extend(nums)
            return ("(" + " OR ".join(conds) + ")" if conds else "0"), params
        ge, le = _num(f[2]) if f[2] is not None else None, _num(f[3]) if f[3] is not None else None
        if num_col == "NULL":  # range over keywords: lexicographic, like Elasticsearch
            conds, params = [], []
            if f[2] is not None:
                conds.append(f"{term_col} >= ?")
                params.append(str(f[2]))
            if f[3] is not None:
                conds.append(f"{term_col} <= ?")
                params.append(str(f[3]))
            return "(" + " AND ".join(conds or ["1"]) + ")", params
        conds, params = [f"{num_col} IS NOT NULL"], []
        if ge is not None:
            conds.append(f"{num_col} >= ?")
            params.append(ge)
        if le is not None:
            conds.append(f"{num_col} <= ?")
            params.append(le)
        return "(" + " AND ".join(conds) + ")", params

    @staticmethod
    def _record_filter(f: Filter, prop: str) -> tuple[str, list[Any]]:
        col = {"id": "r.id", "external_id": "r.external_id", "status": "r.status",
               "inserted_at": "r.inserted_at", "updated_at": "r.updated_at"}.get(prop)
        if col is None:
            raise IndexError_(f"cannot filter records by {prop!r}")
        if f[0] == "terms":
            values = [str(v) for v in f[2]]
            if prop in ("inserted_at", "updated_at"):
                return f"{col} IN ({','.join('?' * len(values))})", [to_epoch(v) for v in values]
            return f"{col} IN ({','.join('?' * len(values))})", values
        conds, params = [], []
        conv = to_epoch if prop in ("inserted_at", "updated_at") else str
        if f[2] is not None:
            conds.append(f"{col} >= ?")
            params.append(conv(f[2]))
        if f[3] is not None:
            conds.append(f"{col} <= ?")
            params.append(conv(f[3]))
        return "(" + " AND ".join(conds or ["1"]) + ")", params

    def _response_filter(self, f: Filter, scope: Scope) -> tuple[str, list[Any]]:
        user = scope.get("user_id")
        user_cond, user_params = ("AND x.user_id = ?", [str(user)]) if user else ("", [])
        if scope.get("question"):
            cond, p = self._value_cond(f, "x.term", "x.num")
            return (
                f"EXISTS (SELECT 1 FROM resp_val x WHERE x.rid = r.rid AND x.question = ? AND {cond} {user_cond})",
                [scope["question"], *p, *user_params],
            )
        if scope.get("property") == "status" and f[0] == "terms":
            values = [str(v) for v in f[2]]
            parts, params = [], []
            if "pending" in values:
                parts.append(f"NOT EXISTS (SELECT 1 FROM resp x WHERE x.rid = r.rid {user_cond})")
                params.extend(user_params)
            others = [v for v in values if v != "pending"]
            if others:
                parts.append(
                    f"EXISTS (SELECT 1 FROM resp x WHERE x.rid = r.rid AND x.status IN ({','.join('?' * len(others))}) {user_cond})"
                )
                params.extend([*others, *user_params])
            return "(" + " OR ".join(parts) + ")", params
        raise IndexError_(f"cannot process response filter scope {scope!r}")

    def _order(self, sort: Sequence[tuple[Scope, str]] | None, score_sql: str | None, user_id: str | None) -> tuple[str, list[Any]]:
        parts: list[str] = []
        params: list[Any] = []
        for scope, direction in sort or []:
            direction = "DESC" if str(direction).lower() == "desc" else "ASC"
            expr, p = self._sort_expr(scope, direction)
            parts.append(f"({expr}) IS NULL, ({expr}) {direction}")
            params.extend(p + p)
        if not sort:
            if score_sql:
                parts.append(f"{score_sql} DESC")
            elif user_id:
                u = rand_key(str(user_id))
                parts.append("((r.rnd | ?) - (r.rnd & ?))")
                params.extend([u, u])
            else:
                parts.append("r.inserted_at ASC")
        parts.append("r.rid ASC")
        return ", ".join(parts), params

    @staticmethod
    def _sort_expr(scope: Scope, direction: str) -> tuple[str, list[Any]]:
        agg = "MIN" if direction == "ASC" else "MAX"
        sk = scope.get("kind")
        if sk == "record":
            col = {"id": "r.id", "external_id": "r.external_id", "status": "r.status",
                   "inserted_at": "r.inserted_at", "updated_at": "r.updated_at"}.get(scope["property"])
            if col is None:
                raise IndexError_(f"cannot sort records by {scope['property']!r}")
            return col, []
        if sk == "metadata":
            return (f"SELECT {agg}(COALESCE(m.num, m.term)) FROM meta m WHERE m.rid = r.rid AND m.name = ?", [scope["name"]])
        if sk == "suggestion":
            prop = scope.get("property") or "value"
            col = {"value": "COALESCE(s.num, s.term)", "None": "COALESCE(s.num, s.term)", "score": "s.score",
                   "agent": "s.agent", "type": "s.type"}.get(prop)
            if col is None:
                raise IndexError_(f"cannot sort suggestions by {prop!r}")
            return f"SELECT {agg}({col}) FROM sugg s WHERE s.rid = r.rid AND s.question = ?", [scope["question"]]
        if sk == "response":
            user = scope.get("user_id")
            if scope.get("question"):
                uc, up = ("AND x.user_id = ?", [str(user)]) if user else ("", [])
                return (
                    f"SELECT COALESCE(AVG(x.num), {agg}(x.term)) FROM resp_val x WHERE x.rid = r.rid AND x.question = ? {uc}",
                    [scope["question"], *up],
                )
            uc, up = ("AND x.user_id = ?", [str(user)]) if user else ("", [])
            return f"SELECT {agg}(x.status) FROM resp x WHERE x.rid = r.rid {uc}", up
        raise IndexError_(f"cannot sort by scope {scope!r}")

    # -- metrics and progress ------------------------------------------------------------------
    def terms_metrics(self, dataset_id: str, name: str) -> dict[str, Any]:
        with self._read() as c:
            total = c.execute(
                "SELECT COUNT(*) FROM meta WHERE dataset_id = ? AND name = ? AND term IS NOT NULL", (dataset_id, name)
            ).fetchone()[0]
            rows = c.execute(
                "SELECT term, COUNT(DISTINCT rid) AS n FROM meta WHERE dataset_id = ? AND name = ? AND term IS NOT NULL "
                "GROUP BY term ORDER BY n DESC, term ASC LIMIT ?",
                (dataset_id, name, MAX_TERMS_BUCKETS),
            ).fetchall()
        return {"total": total, "values": [{"term": t, "count": n} for t, n in rows]}

    def numeric_metrics(self, dataset_id: str, name: str) -> dict[str, Any]:
        with self._read() as c:
            lo, hi = c.execute(
                "SELECT MIN(num), MAX(num) FROM meta WHERE dataset_id = ? AND name = ? AND num IS NOT NULL", (dataset_id, name)
            ).fetchone()
        return {"min": lo, "max": hi}

    def dataset_progress(self, dataset_id: str) -> dict[str, int]:
        with self._read() as c:
            rows = c.execute(
                "SELECT status, COUNT(*) FROM records WHERE dataset_id = ? AND status IS NOT NULL GROUP BY status",
                (dataset_id,),
            ).fetchall()
        out = {"total": sum(n for _, n in rows)}
        out.update({s: n for s, n in rows})
        return out

    def user_progress(self, dataset_id: str, user_id: str) -> dict[str, int]:
        with self._read() as c:
            rows = c.execute(
                "SELECT status, COUNT(*) FROM resp WHERE dataset_id = ? AND user_id = ? GROUP BY status",
                (dataset_id, str(user_id)),
            ).fetchall()
        out = {"total": sum(n for _, n in rows)}
        out.update({s: n for s, n in rows})
        return out

    def consistency_counts(self, dataset_id: str) -> dict[str, dict[str, int]]:
        """Records per status and responses per status, to compare with the server's database."""
        with self._read() as c:
            self._dataset(c, dataset_id)
            recs = c.execute(
                "SELECT COALESCE(status, 'None'), COUNT(*) FROM records WHERE dataset_id = ? GROUP BY status", (dataset_id,)
            ).fetchall()
            resps = c.execute(
                "SELECT COALESCE(status, 'None'), COUNT(*) FROM resp WHERE dataset_id = ? GROUP BY status", (dataset_id,)
            ).fetchall()
        return {"records": dict(recs), "responses": dict(resps)}

    def count(self, dataset_id: str) -> int:
        with self._read() as c:
            return c.execute("SELECT COUNT(*) FROM records WHERE dataset_id = ?", (dataset_id,)).fetchone()[0]

    # -- vectors -------------------------------------------------------------------------------
    def vector_of(self, vs_id: str, record_id: str) -> list[float] | None:
        with self._read() as c:
            row = c.execute(
                "SELECT v.v FROM vec v JOIN records r ON r.rid = v.rid WHERE v.vs_id = ? AND r.id = ?", (vs_id, record_id)
            ).fetchone()
        return _unpack(row[0]) if row else None

    def similarity_search(
        self,
        dataset_id: str,
        vs_id: str,
        value: Sequence[float],
        *,
        k: int = 100,
        exclude_id: str | None = None,
        text: str | None = None,
        text_field: str | None = None,
        filter: Filter | None = None,
        least_similar: bool = False,
        threshold: float | None = None,
    ) -> Hits:
        import numpy as np

        cache = self._vectors(vs_id)
        if cache.matrix is None or not len(cache.rids):
            return Hits()
        q = np.asarray(value, dtype=np.float32)
        norm = float(np.linalg.norm(q))
        if norm == 0:
            return Hits()
        q = q / norm
        if least_similar:
            q = -q
        if q.shape[0] != cache.matrix.shape[1]:
            raise IndexError_(f"vector has {q.shape[0]} dimensions, the index has {cache.matrix.shape[1]}")
        scores = (1.0 + cache.matrix @ q) / 2.0
        allowed = None
        if filter is not None or (text is not None and text.strip()) or exclude_id is not None:
            with self._read() as c:
                fts, fields = self._dataset(c, dataset_id)
                where, params, _, joins = self._where(c, dataset_id, fts, fields, text, text_field, filter)
                if exclude_id is not None:
                    where += " AND r.id != ?"
                    params.append(exclude_id)
                source = f"{joins} records r ON r.rid = t.rid" if joins else "records r"
                allowed = np.fromiter(
                    (row[0] for row in c.execute(f"SELECT r.rid FROM {source} WHERE {where}", params)),
                    dtype=np.int64,
                )
            mask = np.isin(cache.rids, allowed)
            scores = np.where(mask, scores, -np.inf)
        if threshold is not None:
            scores = np.where(scores >= threshold, scores, -np.inf)
        n_valid = int(np.isfinite(scores).sum())
        k = min(k, n_valid)
        if k <= 0:
            return Hits()
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        rids = [int(cache.rids[i]) for i in top]
        with self._read() as c:
            id_of = {}
            for i in range(0, len(rids), 500):
                chunk = rids[i : i + 500]
                id_of.update(dict(c.execute(f"SELECT rid, id FROM records WHERE rid IN ({','.join('?' * len(chunk))})", chunk)))
        items = [Hit(id=id_of[r], score=float(scores[i])) for r, i in zip(rids, top, strict=True) if r in id_of]
        return Hits(items=items, total=len(items))

    def _vectors(self, vs_id: str) -> _VecCache:
        """The unit vectors of one vector setting, cached per process and refreshed from the file."""
        import numpy as np

        with self._vec_lock:
            cache = self._vec_cache.setdefault(vs_id, _VecCache())
            with self._read() as c:
                row = c.execute("SELECT gen, del_gen FROM vec_settings WHERE id = ?", (vs_id,)).fetchone()
                gen, del_gen = row if row else (0, 0)
                if cache.matrix is not None and gen == cache.gen and del_gen == cache.del_gen:
                    return cache
                full = cache.matrix is None or del_gen != cache.del_gen
                since = -1 if full else cache.gen
                rows = c.execute("SELECT rid, v FROM vec WHERE vs_id = ? AND seq > ?", (vs_id, since)).fetchall()
            if full:
                if rows:
                    cache.rids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                    cache.matrix = np.vstack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
                else:
                    cache.rids = np.zeros(0, dtype=np.int64)
                    cache.matrix = np.zeros((0, 0), dtype=np.float32)
            elif rows:
                pos = {int(r): i for i, r in enumerate(cache.rids)}
                new_rids, new_vecs = [], []
                for rid, blob in rows:
                    v = np.frombuffer(blob, dtype=np.float32)
                    if rid in pos:
                        cache.matrix[pos[rid]] = v
                    else:
                        new_rids.append(rid)
                        new_vecs.append(v)
                if new_vecs:
                    base = cache.matrix if cache.matrix.size else np.zeros((0, len(new_vecs[0])), dtype=np.float32)
                    cache.matrix = np.vstack([base, *new_vecs])
                    cache.rids = np.concatenate([cache.rids, np.asarray(new_rids, dtype=np.int64)])
            cache.gen, cache.del_gen = gen, del_gen
            return cache


def _pending_for_user(filter: Filter | None) -> tuple[str, Filter] | None:
    """(user, the other filters) when `filter` is an AND with a response-status filter that is
    exactly `pending` for one user (the annotation queue)."""
    if filter is None:
        return None
    children = list(filter[1]) if filter[0] == "and" else [filter]
    for i, f in enumerate(children):
        if f[0] != "terms":
            continue
        scope = f[1]
        if (scope.get("kind") == "response" and scope.get("property") == "status" and not scope.get("question")
                and scope.get("user_id") and [str(v) for v in f[2]] == ["pending"]):
            return str(scope["user_id"]), ("and", children[:i] + children[i + 1 :])
    return None


@dataclass
class _VecCache:
    gen: int = -1
    del_gen: int = -1
    rids: Any = None
    matrix: Any = None


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


def _pack(value: Sequence[float]) -> bytes:
    import numpy as np

    v = np.asarray(value, dtype=np.float32)
    n = float(np.linalg.norm(v))
    if n > 0:
        v = v / n
    return v.astype(np.float32).tobytes()


def _unpack(blob: bytes) -> list[float]:
    import numpy as np

    return np.frombuffer(blob, dtype=np.float32).tolist()


# -- one index per file per process ------------------------------------------------------------

_OPEN: dict[str, SqliteIndex] = {}
_OPEN_LOCK = threading.Lock()


def open_index(path: str | os.PathLike[str]) -> SqliteIndex:
    key = os.path.abspath(str(path))
    with _OPEN_LOCK:
        idx = _OPEN.get(key)
        if idx is None:
            idx = _OPEN[key] = SqliteIndex(key)
        return idx


def close_all() -> None:
    with _OPEN_LOCK:
        for idx in _OPEN.values():
            with contextlib.suppress(Exception):
                idx.close()
        _OPEN.clear()
