"""ASGI entry point for the embedded server: the plugin registers before the app is built.

Run inside `.venv-argilla`: `uvicorn argilla_embedded.asgi:app`, with
`ARGILLA_SEARCH_ENGINE=stepwise-sqlite` (set by `argilla_embedded.server`).
"""
# ruff: noqa: I001  (the plugin must be imported before the app is built)

import argilla_embedded.search_engine  # noqa: F401  (registers the engine)
from argilla_server import app
from argilla_embedded import patches

patches.apply()

__all__ = ["app"]
