"""Embedded Argilla for human review: argilla-server 2.8 with a SQLite search engine.

Only the server lives here; the review stage and its commands are `stepwise.review`.
- `sqlite_index`: the index core (stdlib + numpy), importable from any Python.
- `search_engine`, `asgi`, `worker`, `admin`, `patches`: run inside `.venv-argilla` (the server's
  own venv, where scripts/setup_argilla.sh installs this package without dependencies).
- `server` (the launcher) and `testing` (fixtures): run in the main venv; they talk to the server
  only over HTTP.
"""
