"""`stepwise generate --ray`: the same requests through a distilabel pipeline on Ray.

The pending jobs become rows of a `LoadDataFromDicts` step feeding `DSSTask`, and the pipeline runs
with `pipeline.ray()` (a local Ray instance, or the cluster named by `RAY_ADDRESS`). The cache and
resume guarantees are the same as the local path because `DSSTask` reads and commits our SQLite
cache row by row; distilabel's own pipeline cache is off (`use_cache=False`), since resuming through
it is what hangs. The cost cap is the same ledger too: each worker books a row's worst case in the
cache's ledger before sending it (one SQLite transaction checks and books, so workers in other
processes share the cap) and skips the row once the cap is reached. Needs the optional extra:
`pip install 'stepwise[ray]'`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stepwise.pipelines.cache import ResponseCache
from stepwise.pipelines.constraints import generation_kwargs
from stepwise.pipelines.executor import Budget, Job, RunStats

from stepwise.recipe import Recipe


class RayMissing(RuntimeError):
    """The optional `ray` extra is not installed (the generate stage reports it as its own error)."""


def run_with_ray(recipe: Recipe, jobs: list[Job], cache: ResponseCache, budget: Budget, *,
                 build_local_llm: Callable[..., Any], build_openai_llm: Callable[..., Any]) -> RunStats:
    """The jobs through distilabel on Ray. The teacher's LLM builders come from the generate stage
    (stepwise.pipelines.generate), which calls this module: passed in, so neither imports the other back."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RayMissing("--ray needs the optional extra: pip install 'ray[default]==2.60.0' (stepwise[ray])") from None
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from stepwise.pipelines.distilabel_task import DSSTask

    t = recipe.teacher
    by_key = {j.key: j for j in jobs}
    before = cache.get_many(list(by_key))
    rows = [{"input": j.row_input, "cache_key": j.key, "base_key": j.base_key or j.key, "attempt": j.attempt,
             "worst_case_cost": j.worst_case_cost, "seed": t.seed + j.attempt} for j in jobs]
    if t.provider == "transformers":
        llm = build_local_llm(recipe, load=False)
    else:
        llm = build_openai_llm(recipe, load=False, client_retries=t.max_retries)
    gen_kwargs = generation_kwargs(recipe.task, t)
    # distilabel writes its pipeline data under this dir; keep it out of the user's home
    os.environ.setdefault("DISTILABEL_CACHE_DIR", str(Path(tempfile.gettempdir()) / "stepwise-distilabel"))
    with Pipeline(name=f"stepwise-{recipe.name}") as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=max(1, t.concurrency))
        task = DSSTask(
            llm=llm, task_spec=recipe.task.model_dump(mode="json"), teacher_format=t.format,
            cache_path=str(cache.path), generation_kwargs=gen_kwargs, input_batch_size=max(1, t.concurrency),
            price_per_1k=(t.price.input_per_1k, t.price.output_per_1k),
            max_cost=budget.max_cost, budget_prior=budget.prior, budget_session=budget.session,
        )
        load >> task
    pipeline.ray().run(use_cache=False)
    after = cache.get_many(list(by_key))

    def attempted(key: str) -> bool:  # a request that was sent left a new or updated cache row
        old, new = before.get(key), after.get(key)
        return new is not None and (old is None or new.attempts != old.attempts or new.status != old.status)

    # rows never sent: with a cap, the cap refused them; without one they are simply still pending
    not_run = [k for k in by_key if not attempted(k)] if budget.max_cost is not None else []
    spent = cache.session_spend(budget.session)
    usage = [after[k] for k in by_key if attempted(k) and after[k].status == "ok"]
    return RunStats(
        sent=sum(1 for k in by_key if attempted(k)),
        completed=len(usage),
        failed=sum(1 for k in by_key if attempted(k) and after[k].status == "error"),
        input_tokens=sum(e.input_tokens for e in usage),
        output_tokens=sum(e.output_tokens for e in usage),
        cost=spent.paid,
        not_run=not_run,
        stopped_reason=budget.cap_message() if not_run and budget.max_cost is not None else None,
    )
