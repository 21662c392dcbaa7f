"""ASGI entry point for the embedded server: the plugin registers before the app is built.

Run inside `.venv-argilla`: `uvicorn stepwise.argilla_embedded.asgi:app`, with
`ARGILLA_SEARCH_ENGINE=stepwise-sqlite` (set by `stepwise.argilla_embedded.server`).

The app is wrapped in `CloseAfterBulk`: a bulk records request (up to 500 records, ~0.6 CPU
seconds with 384-d vectors) ends its connection. Uvicorn's web workers each accept connections
from the shared socket and keep a keep-alive connection for its whole life, so two clients that
happen to connect to the same worker both queue on it while the other worker idles: on the 2-core
box 3 runs in 9 of `bench_review.py --log-only` put ~85% of the bulk work on one worker and logged
~770 records/s instead of ~1,170. After `Connection: close` the client's next bulk opens a new
connection, which the worker waiting in `accept` (the idle one) takes. One TCP handshake per 500
records on loopback costs nothing measurable; other requests keep their connections.
"""
# ruff: noqa: I001  (the plugin must be imported before the app is built)

import stepwise.argilla_embedded.search_engine  # noqa: F401  (registers the engine)
from argilla_server import app as argilla_app
from stepwise.argilla_embedded import patches

patches.apply()


def is_bulk_records(scope) -> bool:
    return (scope["type"] == "http" and scope["method"] in ("PUT", "POST")
            and scope["path"].startswith("/api/v1/datasets/") and scope["path"].endswith("/records/bulk"))


class CloseAfterBulk:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if not is_bulk_records(scope):
            return await self.inner(scope, receive, send)

        async def send_closing(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return await self.inner(scope, receive, send_closing)


app = CloseAfterBulk(argilla_app)

__all__ = ["app"]
