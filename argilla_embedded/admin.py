"""One-shot setup of the embedded server's database (runs inside `.venv-argilla`).

`python -m stepwise.argilla_embedded.admin init` reads `{"username", "password", "api_key", "workspace"}`
as JSON on stdin (secrets never go on a command line), migrates the SQLite database under
`ARGILLA_HOME_PATH` to the latest revision and creates the owner user and workspace when
missing. One process does both, so argilla-server is imported once.

With the embedded engine it then reconciles the search index with the database: the server
writes a response to its database first and to the index after, so a crash in between leaves
the index behind. Datasets whose record/response counts differ are reindexed from the database.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys


async def _ensure_owner(username: str, password: str, api_key: str, workspace: str) -> str:
    from argilla_server.contexts import accounts
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.models import User, UserRole, Workspace
    from sqlalchemy import select

    async with AsyncSessionLocal() as db:
        ws = (await db.execute(select(Workspace).filter_by(name=workspace))).scalar_one_or_none()
        if ws is None:
            ws = Workspace(name=workspace)
            db.add(ws)
            await db.commit()
        if await accounts.get_user_by_username(db, username) is not None:
            return "exists"
        user = User(
            first_name=username, username=username, role=UserRole.owner,
            password_hash=accounts.hash_password(password), api_key=api_key, workspaces=[ws],
        )
        db.add(user)
        await db.commit()
        return "created"


def _use_wal() -> None:
    """Put the server's SQLite database in WAL mode (persistent in the file): one fsync per commit
    instead of several, and readers no longer block the writer, which matters with many annotators."""
    from argilla_server.settings import settings

    if not settings.database_is_sqlite:
        return
    path = settings.database_url.split("///", 1)[-1].split("?", 1)[0]
    con = sqlite3.connect(path, timeout=60)
    try:
        con.execute("PRAGMA journal_mode = WAL")
    finally:
        con.close()


async def _reconcile() -> list[str]:
    """Reindex every published dataset whose index disagrees with the database; returns their names."""
    from argilla_server.cli.search_engine.reindex import Reindexer
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.models import Dataset, Record, Response
    from argilla_server.search_engine import SearchEngine
    from sqlalchemy import func, select
    from stepwise.argilla_embedded.search_engine import ENGINE_NAME, index_path
    from stepwise.argilla_embedded.sqlite_index import IndexError_, open_index

    index = open_index(index_path())
    fixed: list[str] = []
    async with AsyncSessionLocal() as db:
        datasets = (await db.execute(select(Dataset))).scalars().all()
        for ds in datasets:
            if ds.is_draft:
                continue
            recs = dict((await db.execute(
                select(Record.status, func.count(Record.id)).filter_by(dataset_id=ds.id).group_by(Record.status)
            )).all())
            resps = dict((await db.execute(
                select(Response.status, func.count(Response.id)).join(Record).where(Record.dataset_id == ds.id)
                .group_by(Response.status)
            )).all())
            want = {"records": {str(k): v for k, v in recs.items()}, "responses": {str(k): v for k, v in resps.items()}}
            try:
                have = index.consistency_counts(str(ds.id))
            except IndexError_:
                have = None
            if have == want:
                continue
            async with SearchEngine.get_by_name(ENGINE_NAME) as engine:
                dataset = await Reindexer.reindex_dataset(db, engine, ds.id)
                async for _ in Reindexer.reindex_dataset_records(db, engine, dataset):
                    pass
            fixed.append(ds.name)
    return fixed


def main(argv: list[str]) -> int:
    if argv[:1] != ["init"]:
        print("usage: python -m stepwise.argilla_embedded.admin init < credentials.json", file=sys.stderr)
        return 2
    creds = json.loads(sys.stdin.read())
    from argilla_server.cli.database.migrate import migrate_db

    migrate_db("head")
    _use_wal()
    state = asyncio.run(_ensure_owner(creds["username"], creds["password"], creds["api_key"], creds["workspace"]))
    report: dict = {"owner": state}
    if os.environ.get("ARGILLA_SEARCH_ENGINE") == "stepwise-sqlite":
        report["reindexed"] = asyncio.run(_reconcile())
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
