"""`stepwise generate --ray`: the same requests through a distilabel pipeline on Ray.

The pending jobs become rows of a `LoadDataFromDicts` step feeding `DSSTask`, and the pipeline runs
with `pipeline.ray()` (a local Ray instance, or the cluster named by `RAY_ADDRESS`). The cache and
resume guarantees are the same as the local path because `DSSTask` reads and commits our SQLite
cache row by row; distilabel's own pipeline cache is off (`use_cache=False`), since resuming through
it is what hangs. Needs the optional extra: `pip install 'stepwise[ray]'`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipelines.cache import ResponseCache
from pipelines.constraints import server_params
from pipelines.executor import Job, RunStats
from stepwise.recipe import Recipe


def run_with_ray(recipe: Recipe, jobs: list[Job], cache: ResponseCache) -> RunStats:
    try:
        import ray  # noqa: F401
    except ImportError:
        from pipelines.generate import GenerateError

        raise GenerateError("--ray needs the optional extra: pip install 'ray[default]==2.60.0' (stepwise[ray])") from None
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts

    from pipelines.distilabel_task import DSSTask
    from pipelines.generate import build_local_llm, build_openai_llm

    t = recipe.teacher
    before = cache.count_ok()
    by_key = {j.key: j for j in jobs}
    rows = [{"input": j.row_input, "cache_key": j.key} for j in jobs]
    if t.provider == "transformers":
        llm = build_local_llm(recipe, load=False)
        gen_kwargs = {"max_new_tokens": t.max_new_tokens, "temperature": t.temperature, "top_p": t.top_p}
    else:
        llm = build_openai_llm(recipe, load=False, client_retries=t.max_retries)
        gen_kwargs = {"max_new_tokens": t.max_new_tokens, "temperature": t.temperature, "top_p": t.top_p,
                      **server_params(recipe.task, t)}
    # distilabel writes its pipeline data under this dir; keep it out of the user's home
    os.environ.setdefault("DISTILABEL_CACHE_DIR", str(Path(tempfile.gettempdir()) / "stepwise-distilabel"))
    with Pipeline(name=f"stepwise-{recipe.name}") as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=max(1, t.concurrency))
        task = DSSTask(
            llm=llm, task_spec=recipe.task.model_dump(mode="json"), teacher_format=t.format,
            cache_path=str(cache.path), generation_kwargs=gen_kwargs, input_batch_size=max(1, t.concurrency),
            price_per_1k=(t.price.input_per_1k, t.price.output_per_1k),
        )
        load >> task
    pipeline.ray().run(use_cache=False)
    after = cache.get_many(list(by_key))
    return RunStats(
        sent=len(jobs),
        completed=cache.count_ok() - before,
        failed=sum(1 for e in after.values() if e.status == "error"),
        not_run=[k for k in by_key if k not in after],
    )
