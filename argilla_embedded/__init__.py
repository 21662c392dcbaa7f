"""Embedded Argilla for human review: argilla-server 2.8 with a SQLite search engine.

- `sqlite_index`: the index core (stdlib + numpy), importable from any Python.
- `search_engine`, `asgi`, `worker`: run inside `.venv-argilla` (the server's own venv).
- `server`, `cli`: the launcher and `stepwise review ...` commands, run in the main venv; they
  talk to the server only over HTTP.
"""
