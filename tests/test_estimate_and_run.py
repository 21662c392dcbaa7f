"""`stepwise estimate`, `stepwise runs`, and the run orchestrator's skip / exit-code logic."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pipelines.estimate import estimate_run
from pipelines.generate import run_generate
from stepwise.cli import app
from stepwise.pipeline import STAGE_EXIT, RunOptions, run_pipeline
from stepwise.recipe import load_recipe
from stepwise.testing.openai_stub import OpenAIStub
from tests.test_generate import make_rows, setup_recipe


def test_estimate_prices_before_and_counts_cached(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(10))
        est = estimate_run(recipe)
        assert est["requests (rows x num_rationales)"] == 10 and est["already cached"] == 0
        whole = float(est["cost, whole run"].lstrip("$"))
        assert whole > 10 * 384 * 2.0 / 1000  # output bounded by max_new_tokens at $2/1K
        sampled = estimate_run(recipe, sample=3)  # real requests, cached, measured output length
        assert sampled["already cached"] == 0 and "mean of 3 sampled responses" in sampled["output tokens"]
        assert float(sampled["cost, whole run"].lstrip("$")) < whole
        sent = len(stub.log)
        run_generate(recipe, run, progress=False)
        assert len(stub.log) == sent + 7  # the 3 sampled responses were not paid again
        assert estimate_run(recipe)["cost, still to pay"] == "$0.0000"


def test_runs_lists_stage_status(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(3))
        run_generate(recipe, run, progress=False)
    out = CliRunner().invoke(app, ["runs", "--root", str(tmp_path)])
    assert out.exit_code == 0, out.output


def test_run_pipeline_skips_unchanged_and_names_failed_stage(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(30))
        opts = RunOptions(until_stage="export", progress=False)
        first = run_pipeline(recipe, run, opts)
        assert [o.status for o in first.outcomes[:4]] == ["done"] * 4, first.outcomes
        assert first.exit_code == 0
        sent = len(stub.log)
        second = run_pipeline(recipe, run, opts)
        assert [o.status for o in second.outcomes[:4]] == ["skipped"] * 4
        assert len(stub.log) == sent
        # a changed curation setting re-runs curate and what follows, not generate
        text = recipe.source_path.read_text() + "curation:\n  split: {train: 0.6, val: 0.2, test: 0.2}\n"
        recipe.source_path.write_text(text)
        third = run_pipeline(load_recipe(recipe.source_path), run, opts)
        assert [o.status for o in third.outcomes[:4]] == ["skipped", "done", "done", "done"]
        # a broken stage input: curate fails with its own exit code and later stages do not run
        (run.path / "generate" / "responses.jsonl").write_text("{not json\n")
        fourth = run_pipeline(load_recipe(recipe.source_path), run, RunOptions(from_stage="curate", until_stage="export",
                                                                            progress=False))
        statuses = {o.stage: o.status for o in fourth.outcomes}
        assert statuses["curate"] == "failed" and statuses["review"] == "not_run"
        assert fourth.exit_code == STAGE_EXIT["curate"] == 12
        assert (run.path / "curate.error.txt").exists()
        assert json.loads((run.path / "manifest.json").read_text())["stages"]["curate"]["status"] == "failed"
