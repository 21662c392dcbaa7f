"""One-shot setup of the embedded server's database (runs inside `.venv-argilla`).

`python -m argilla_embedded.admin init` reads `{"username", "password", "api_key", "workspace"}`
as JSON on stdin (secrets never go on a command line), migrates the SQLite database under
`ARGILLA_HOME_PATH` to the latest revision and creates the owner user and workspace when
missing. One process does both, so argilla-server is imported once.
"""

from __future__ import annotations

import asyncio
import json
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


def main(argv: list[str]) -> int:
    if argv[:1] != ["init"]:
        print("usage: python -m argilla_embedded.admin init < credentials.json", file=sys.stderr)
        return 2
    creds = json.loads(sys.stdin.read())
    from argilla_server.cli.database.migrate import migrate_db

    migrate_db("head")
    state = asyncio.run(_ensure_owner(creds["username"], creds["password"], creds["api_key"], creds["workspace"]))
    print(json.dumps({"owner": state}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
