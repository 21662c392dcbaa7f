"""`stepwise generate --ray`: distilabel's Ray pipeline on a local Ray instance, same cache guarantees."""

from __future__ import annotations

from collections import Counter

import pytest
from stepwise.pipelines.generate import run_generate

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


@pytest.mark.slow
def test_ray_spends_from_the_same_ledger_and_holds_the_cap_across_resumes(tmp_path, monkeypatch):
    """SIGKILL a local run mid-way, then resume twice under --ray with the same cap: Ray workers book
    each request in the cache's ledger, so the teacher's bill over all three stays under the cap."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from stepwise.pipelines.cache import ResponseCache
    from stepwise.pipelines.generate import cache_path

    from stepwise.recipe import load_recipe
    from stepwise.rundir import RunDir
    from tests.conftest import REPO
    from tests.test_generate import stub_spend

    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    cap = 2.0
    with OpenAIStub(StubConfig(hold_after=4, latency_s=0.01)) as stub:
        recipe, _ = setup_recipe(tmp_path, stub, make_rows(30), concurrency=2)
        path = recipe.source_path
        path.write_text(path.read_text() + f"  max_new_tokens: 40\n  max_cost: {cap}\n")
        proc = subprocess.Popen([sys.executable, "-m", "stepwise", "generate", str(path), "--run-dir",
                                 str(tmp_path / "run"), "--no-progress"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cache = ResponseCache(cache_path(load_recipe(path)))
        deadline = time.time() + 120
        while not (stub.completed_count() >= 4 and stub.parked > 0 and cache.count_ok() == stub.completed_count()):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stub.release()
        killed_at = stub_spend(stub)
        recipe = load_recipe(path)
        results = []
        for _ in range(2):  # two resumes, each its own Ray session like two CLI invocations
            try:
                results.append(run_generate(recipe, RunDir(tmp_path / "run"), progress=False, ray=True))
            finally:
                if ray.is_initialized():
                    ray.shutdown()
        first, second = results
        billed = stub_spend(stub)
        assert billed > killed_at and billed <= cap
        assert first.stats.cost == pytest.approx(billed - killed_at)  # --ray reports what it spent (was $0)
        for res in (first, second):
            assert res.stopped_reason and "of $2.0000" in res.stopped_reason, res.stopped_reason
        assert second.stats.sent == 0
        cache.close()
