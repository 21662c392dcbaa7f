"""The server's background worker (rq) with our search engine registered first.

`python -m stepwise.argilla_embedded.worker` inside `.venv-argilla`. argilla-server's own `worker`
command loads no plugin, and its jobs call `SearchEngine.get_by_name(...)`.
"""

from __future__ import annotations

import stepwise.argilla_embedded.search_engine  # noqa: F401  (registers the engine)


def main() -> None:
    from stepwise.argilla_embedded import patches

    patches.apply()
    from argilla_server.jobs.queues import DEFAULT_QUEUE, HIGH_QUEUE, REDIS_CONNECTION
    from rq import SimpleWorker

    # One in-process worker: no fork per job (the plugin is already imported here).
    worker = SimpleWorker([HIGH_QUEUE, DEFAULT_QUEUE], connection=REDIS_CONNECTION)
    worker.work(with_scheduler=False)


if __name__ == "__main__":
    main()
