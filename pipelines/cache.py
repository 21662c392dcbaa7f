"""Content-addressed SQLite cache of teacher responses: what was paid for is never lost or paid again.

Key = sha256 of (provider, model, messages, generation params, constraint, sample index, and the
attempt number for a re-ask of a malformed answer; attempt 0 leaves it out, so keys made before
re-asks existed still match). Each completed response is committed in its own transaction the
moment it arrives (WAL mode), so a SIGKILL loses at most requests still in flight. Failures are
stored too, with their error text and an attempt counter, so a later run retries them up to a cap
and the funnel can report them.

The `ledger` table is the spend record the cost cap reads: one `paid` row per response received
(with its cost, never removed, also when a later attempt replaces the answer), and one `reserved`
row per request in flight (its worst-case cost), removed when the request settles. A reservation
left behind by a killed process stays as spend "in doubt" (the server may have billed it), so a
cap holds across kills and resumes. `base_key` ties every attempt to its row's first-attempt key,
which is how a recipe's spend is summed over its inputs. Reservations are checked against the cap
inside one write transaction, so workers in other processes (Ray) share one budget.

Hand-written because distilabel's own cache resumes by batch (a killed batch is redone, and its
resume can hang) and turns every row of a failed batch into None.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwise.io import canonical_json, sha256_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    text TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    model TEXT,
    meta TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_sessions (
    session TEXT PRIMARY KEY,
    booked REAL NOT NULL DEFAULT 0
);
"""

LEDGER = """
CREATE TABLE ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    base_key TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('paid', 'reserved')),
    cost REAL NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    session TEXT,
    created REAL NOT NULL
);
CREATE INDEX ledger_base ON ledger (base_key);
CREATE INDEX ledger_session ON ledger (session, kind);
"""


def request_key(provider: str, model: str, messages: list[dict[str, Any]], params: dict[str, Any],
                constraint: Any, sample: int, attempt: int = 0) -> str:
    payload: dict[str, Any] = {
        "provider": provider, "model": model, "messages": messages, "params": params,
        "constraint": constraint, "sample": sample,
    }
    if attempt:  # re-asks only: first-attempt keys stay what they always were
        payload["attempt"] = attempt
    return sha256_text(canonical_json(payload))


@dataclass
class Spend:
    paid: float = 0.0
    in_doubt: float = 0.0  # reservations of processes that died with the request in flight

    @property
    def total(self) -> float:
        return self.paid + self.in_doubt


@dataclass
class CacheEntry:
    key: str
    status: str
    text: str | None
    input_tokens: int
    output_tokens: int
    cost: float
    error: str | None
    attempts: int


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL+NORMAL: durable against process death
        self._conn.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the ledger to a cache made before it existed, once: each stored response becomes a
        paid row (old caches have one attempt per key, so its key is its base key)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                exists = self._conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='ledger'").fetchone()
                if not exists:  # executescript would commit early: one statement at a time
                    for stmt in LEDGER.split(";"):
                        if stmt.strip():
                            self._conn.execute(stmt)
                    self._conn.execute(
                        """INSERT INTO ledger (key, base_key, kind, cost, input_tokens, output_tokens, session, created)
                           SELECT key, key, 'paid', cost, input_tokens, output_tokens, 'migrated', created
                           FROM responses WHERE status='ok'""")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT key, status, text, input_tokens, output_tokens, cost, error, attempts FROM responses WHERE key=?",
                (key,),
            ).fetchone()
        return CacheEntry(*row) if row else None

    def get_many(self, keys: list[str]) -> dict[str, CacheEntry]:
        out: dict[str, CacheEntry] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._conn.execute(
                    f"SELECT key, status, text, input_tokens, output_tokens, cost, error, attempts "
                    f"FROM responses WHERE key IN ({marks})",
                    chunk,
                ):
                    out[row[0]] = CacheEntry(*row)
        return out

    def put_ok(self, key: str, text: str, input_tokens: int, output_tokens: int, cost: float,
               model: str, meta: dict[str, Any] | None = None, *, base_key: str | None = None,
               session: str | None = None) -> None:
        """Store a completed response and its paid ledger row in one transaction (and drop this
        session's reservation for it). A key that already holds a response keeps it; the new
        answer's cost still lands in the ledger, because it was paid for."""
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    """INSERT INTO responses (key, status, text, input_tokens, output_tokens, cost, error, attempts,
                                              model, meta, created, updated)
                       VALUES (?, 'ok', ?, ?, ?, ?, NULL, 1, ?, ?, ?, ?)
                       ON CONFLICT(key) DO UPDATE SET status='ok', text=excluded.text,
                            input_tokens=excluded.input_tokens, output_tokens=excluded.output_tokens,
                            cost=excluded.cost, error=NULL, attempts=responses.attempts + 1,
                            meta=excluded.meta, updated=excluded.updated
                       WHERE responses.status != 'ok'""",
                    (key, text, input_tokens, output_tokens, cost, model, json.dumps(meta or {}), now, now),
                )
                self._conn.execute(
                    """INSERT INTO ledger (key, base_key, kind, cost, input_tokens, output_tokens, session, created)
                       VALUES (?, ?, 'paid', ?, ?, ?, ?, ?)""",
                    (key, base_key or key, cost, input_tokens, output_tokens, session, now),
                )
                if session is not None:
                    self._book(session, cost - self._drop_reservation(key, session))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def put_error(self, key: str, error: str, model: str) -> int:
        """Record a failed attempt; return the attempt count. Never overwrites a completed response."""
        now = time.time()
        with self._lock:
            self._conn.execute(
                """INSERT INTO responses (key, status, error, attempts, model, created, updated)
                   VALUES (?, 'error', ?, 1, ?, ?, ?)
                   ON CONFLICT(key) DO UPDATE SET error=excluded.error, attempts=responses.attempts + 1,
                        updated=excluded.updated
                   WHERE responses.status = 'error'""",
                (key, error[:2000], model, now, now),
            )
            row = self._conn.execute("SELECT attempts FROM responses WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 1

    # -- the spend ledger -------------------------------------------------------------------
    def _drop_reservation(self, key: str, session: str) -> float:
        """Remove one reservation of `session` for `key`; return its amount (0 if there was none)."""
        row = self._conn.execute(
            "SELECT id, cost FROM ledger WHERE kind='reserved' AND session=? AND key=? LIMIT 1", (session, key)
        ).fetchone()
        if row is None:
            return 0.0
        self._conn.execute("DELETE FROM ledger WHERE id=?", (row[0],))
        return float(row[1])

    def _book(self, session: str, delta: float) -> None:
        # a running total per session, so checking the cap does not re-sum the ledger per request
        self._conn.execute(
            """INSERT INTO ledger_sessions (session, booked) VALUES (?, ?)
               ON CONFLICT(session) DO UPDATE SET booked = booked + excluded.booked""", (session, delta))

    def reserve(self, key: str, base_key: str, amount: float, session: str, *, cap: float | None,
                prior: float = 0.0) -> bool:
        """Book `amount` (a request's worst-case cost) against the cap before sending it.

        Spent = `prior` (earlier invocations, for the recipe's inputs) + this session's paid and
        reserved rows, read and written in one transaction, so concurrent workers share the cap."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if cap is not None:
                    row = self._conn.execute("SELECT booked FROM ledger_sessions WHERE session=?", (session,)).fetchone()
                    if prior + (row[0] if row else 0.0) + amount > cap + 1e-12:
                        self._conn.execute("ROLLBACK")
                        return False
                self._conn.execute(
                    """INSERT INTO ledger (key, base_key, kind, cost, session, created)
                       VALUES (?, ?, 'reserved', ?, ?, ?)""",
                    (key, base_key, amount, session, time.time()),
                )
                self._book(session, amount)
                self._conn.execute("COMMIT")
                return True
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def reserve_many(self, items: list[tuple[str, str, float]], session: str, *, cap: float | None,
                     prior: float = 0.0) -> int:
        """`reserve` for many (key, base_key, amount) in one transaction (a Batch API file's requests):
        books them in order while they fit under the cap; returns how many were booked."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT booked FROM ledger_sessions WHERE session=?", (session,)).fetchone()
                booked, total, now, n = (row[0] if row else 0.0), 0.0, time.time(), 0
                for _, _, amount in items:
                    if cap is not None and prior + booked + total + amount > cap + 1e-12:
                        break
                    total += amount
                    n += 1
                self._conn.executemany(
                    """INSERT INTO ledger (key, base_key, kind, cost, session, created)
                       VALUES (?, ?, 'reserved', ?, ?, ?)""",
                    [(key, base_key, amount, session, now) for key, base_key, amount in items[:n]])
                self._book(session, total)
                self._conn.execute("COMMIT")
                return n
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def release(self, key: str, session: str) -> None:
        """A request that settled without a response (an error: nothing billed) frees its reservation."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._book(session, -self._drop_reservation(key, session))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def spend(self, base_keys: list[str], exclude_session: str | None = None) -> Spend:
        """What the ledger holds for these rows: paid, and reservations of runs that never settled."""
        out = Spend()
        with self._lock:
            for i in range(0, len(base_keys), 500):
                chunk = base_keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for kind, total in self._conn.execute(
                    f"SELECT kind, COALESCE(SUM(cost), 0) FROM ledger WHERE base_key IN ({marks}) "
                    f"AND (session IS NULL OR session != ?) GROUP BY kind",
                    [*chunk, exclude_session or ""],
                ):
                    if kind == "paid":
                        out.paid += total
                    else:
                        out.in_doubt += total
        return out

    def session_spend(self, session: str) -> Spend:
        with self._lock:
            rows = self._conn.execute(
                "SELECT kind, COALESCE(SUM(cost), 0) FROM ledger WHERE session=? GROUP BY kind", (session,)).fetchall()
        got = dict(rows)
        return Spend(paid=got.get("paid", 0.0), in_doubt=got.get("reserved", 0.0))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT status, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost) FROM responses GROUP BY status"
            ).fetchall()
        return {s: {"rows": n, "input_tokens": i or 0, "output_tokens": o or 0, "cost": c or 0.0} for s, n, i, o, c in rows}

    def count_ok(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses WHERE status='ok'").fetchone()[0])
