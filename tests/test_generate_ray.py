"""`stepwise generate --ray`: distilabel's Ray pipeline on a local Ray instance, same cache guarantees."""

from __future__ import annotations

from collections import Counter

import pytest

from pipelines.generate import run_generate
from stepwise.testing.openai_stub import OpenAIStub, StubConfig
from tests.test_generate import by_id, make_rows, setup_recipe

ray = pytest.importorskip("ray", reason="the optional extra stepwise[ray] is installed by make setup")


@pytest.mark.slow
def test_ray_pipeline_commits_per_row_and_resume_never_repays(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    cfg = StubConfig(script={"row002": ["500", "500", "500"]})
    with OpenAIStub(cfg) as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(8))
        try:
            result = run_generate(recipe, run, progress=False, ray=True)
        finally:
            if ray.is_initialized():
                ray.shutdown()
        rows = by_id(run)
        # the failing row is that row's error only; no batch of Nones
        assert Counter(r["parse_status"] for r in rows.values()) == {"ok": 7, "error": 1}
        assert "500" in rows["row002"]["error"]
        assert result.stats.completed == 7
        paid = Counter(e["input"] for e in stub.completed())
        assert len(paid) == 7 and set(paid.values()) == {1}
        # resume (local executor): only the failed row is asked again, nothing paid twice
        run_generate(recipe, run, progress=False)
        assert Counter(r["parse_status"] for r in by_id(run).values()) == {"ok": 8}
        paid = Counter(e["input"] for e in stub.completed())
        assert len(paid) == 8 and set(paid.values()) == {1}
