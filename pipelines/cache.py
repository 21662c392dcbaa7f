"""Content-addressed SQLite cache of teacher responses: what was paid for is never lost or paid again.

Key = sha256 of (provider, model, messages, generation params, constraint, sample index). Each
completed response is committed in its own transaction the moment it arrives (WAL mode), so a
SIGKILL loses at most requests still in flight. Failures are stored too, with their error text and
an attempt counter, so a later run retries them up to a cap and the funnel can report them.

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
"""


def request_key(provider: str, model: str, messages: list[dict[str, Any]], params: dict[str, Any],
                constraint: Any, sample: int) -> str:
    payload = {
        "provider": provider, "model": model, "messages": messages, "params": params,
        "constraint": constraint, "sample": sample,
    }
    return sha256_text(canonical_json(payload))


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
               model: str, meta: dict[str, Any] | None = None) -> None:
        now = time.time()
        with self._lock:
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

    def stats(self) -> dict[str, Any]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT status, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost) FROM responses GROUP BY status"
            ).fetchall()
        return {s: {"rows": n, "input_tokens": i or 0, "output_tokens": o or 0, "cost": c or 0.0} for s, n, i, o, c in rows}

    def count_ok(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses WHERE status='ok'").fetchone()[0])
