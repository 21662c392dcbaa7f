"""`stepwise estimate`, `stepwise runs`, and the run orchestrator's skip / exit-code logic."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from stepwise.pipelines.cache import ResponseCache
from stepwise.pipelines.estimate import estimate_run
from stepwise.pipelines.generate import cache_path, load_inputs, plan_requests, run_generate
from typer.testing import CliRunner

from stepwise.cli import app
from stepwise.io import read_jsonl
from stepwise.pipeline import STAGE_EXIT, RunOptions, run_pipeline
from stepwise.recipe import load_recipe
from stepwise.testing.openai_stub import OpenAIStub, StubConfig
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
        text = recipe.source_path.read_text() + "curation:\n  min_train_rows: 5\n  filters: {max_input_chars: 30}\n"
        recipe.source_path.write_text(text)
        third = run_pipeline(load_recipe(recipe.source_path), run, opts)
        assert [o.status for o in third.outcomes[:4]] == ["skipped", "done", "done", "done"]
        # ... but a changed split ratio re-runs generate, which holds the gold test split out of the
        # inputs: 3 of 30 rows at 10%, 6 at 20% (a superset here: same seed, same order), none sent
        held = read_jsonl(run.layout.held_out_test)
        recipe.source_path.write_text(text + "  split: {train: 0.6, val: 0.2, test: 0.2}\n")
        third = run_pipeline(load_recipe(recipe.source_path), run, opts)
        assert [o.status for o in third.outcomes[:4]] == ["done", "done", "done", "done"]
        held_now = read_jsonl(run.layout.held_out_test)
        assert (len(held), len(held_now)) == (3, 6) and {r["id"] for r in held} < {r["id"] for r in held_now}
        assert len(stub.log) == sent
        # a broken stage input: curate fails with its own exit code and later stages do not run
        (run.path / "generate" / "responses.jsonl").write_text("{not json\n")
        fourth = run_pipeline(load_recipe(recipe.source_path), run, RunOptions(from_stage="curate", until_stage="export",
                                                                            progress=False))
        statuses = {o.stage: o.status for o in fourth.outcomes}
        assert statuses["curate"] == "failed" and statuses["review"] == "not_run"
        assert fourth.exit_code == STAGE_EXIT["curate"] == 12
        assert (run.path / "curate.error.txt").exists()
        assert json.loads((run.path / "manifest.json").read_text())["stages"]["curate"]["status"] == "failed"


def test_stage_that_succeeds_after_a_failure_removes_its_stale_error_file(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(30))
        recipe.source_path.write_text(recipe.source_path.read_text() + "curation:\n  min_train_rows: 1\n")
        recipe = load_recipe(recipe.source_path)
        opts = RunOptions(until_stage="curate", progress=False)
        assert run_pipeline(recipe, run, opts).exit_code == 0
    responses = run.path / "generate" / "responses.jsonl"
    good = responses.read_bytes()
    responses.write_text("{not json\n")
    failed = run_pipeline(recipe, run, RunOptions(from_stage="curate", until_stage="curate", progress=False))
    assert failed.exit_code == STAGE_EXIT["curate"] and (run.path / "curate.error.txt").exists()
    responses.write_bytes(good)
    again = run_pipeline(recipe, run, RunOptions(until_stage="curate", progress=False))
    assert {o.stage: o.status for o in again.outcomes}["curate"] == "done"
    assert not (run.path / "curate.error.txt").exists()


def test_retrained_model_of_the_same_size_reruns_eval(tmp_path, monkeypatch):
    """Directory inputs are fingerprinted by content: same file names and sizes, other bytes -> eval
    runs again (the old fingerprint of names + sizes skipped it and reported the previous model)."""
    import os

    from stepwise import pipeline
    from stepwise.rundir import create_run

    (tmp_path / "inputs.jsonl").write_text(json.dumps({"id": "a", "text": "x", "label": "billing"}) + "\n")
    (tmp_path / "recipe.yaml").write_text(RECIPE_MIN)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    run = create_run(recipe, tmp_path / "run")
    (run.path / "curate").mkdir(exist_ok=True)
    (run.path / "curate" / "test.jsonl").write_text('{"id": "t1"}\n')
    weights = run.path / "train" / "lora" / "adapter_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"\x01" * 4096)
    old = time.time_ns() - 3600 * 10**9  # older than the racy window: its hash is cached by (size, mtime)
    os.utime(weights, ns=(old, old))

    calls = []

    def fake_eval(recipe, rd, opts):  # stands in for scoring the model: records a done stage
        with rd.stage("eval"):
            calls.append(1)
        return "scored"

    real = next(s for s in pipeline.PIPELINE if s.name == "eval")
    stage = pipeline.Stage("eval", real.sections, real.inputs, fake_eval)
    monkeypatch.setattr(pipeline, "PIPELINE", [stage])
    opts = RunOptions(progress=False)
    assert [o.status for o in run_pipeline(recipe, run, opts).outcomes] == ["done"]
    assert [o.status for o in run_pipeline(recipe, run, opts).outcomes] == ["skipped"]
    weights.write_bytes(b"\x02" * 4096)  # a retrain: same name, same size, other weights
    os.utime(weights, ns=(old + 10**9, old + 10**9))
    assert [o.status for o in run_pipeline(recipe, run, opts).outcomes] == ["done"]
    assert len(calls) == 2
    assert [o.status for o in run_pipeline(recipe, run, opts).outcomes] == ["skipped"]


RECIPE_MIN = """\
name: fp
task:
  name: tickets
  classes: [billing, technical]
  instructions: Classify the ticket.
data:
  inputs: inputs.jsonl
  id_field: id
  label_field: label
teacher:
  provider: openai
  model: stub-teacher
  base_url: http://127.0.0.1:9/v1
"""


def test_estimate_counts_prompt_tokens_as_the_teacher_bills_them(tmp_path):
    """The stub reports usage like vLLM (SmolLM2's tokenizer over the chat-templated prompt); an
    estimate that names that tokenizer lands within 5% of what the teacher then reports."""
    with OpenAIStub(StubConfig(tokenizer="smollm2-135m-instruct")) as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(12))
        assert "unknown server" in estimate_run(recipe)["prompt tokens"]  # no tokenizer known: says it guessed
        recipe.source_path.write_text(recipe.source_path.read_text() + "  tokenizer: smollm2-135m-instruct\n")
        recipe = load_recipe(recipe.source_path)
        est = estimate_run(recipe)
        assert "smollm2-135m-instruct" in est["prompt tokens"]
        counted = int(est["prompt tokens"].split()[0])
        run_generate(recipe, run, progress=False)
        billed = sum(e["usage"]["prompt_tokens"] for e in stub.log if "usage" in e)
        assert len(stub.completed()) == 12 and abs(counted - billed) <= 0.05 * billed, (counted, billed)


def test_estimate_of_the_support_tickets_example_matches_its_recorded_usage(tmp_path):
    """The bundled cache holds what the local teacher counted for each prompt (issue 20 item 8: the
    estimate said 192 tokens for 96 rows)."""
    src = Path(__file__).resolve().parents[1] / "examples" / "support-tickets"
    shutil.copytree(src, tmp_path / "ex", ignore=shutil.ignore_patterns("runs", "*.sqlite-*"))
    recipe = load_recipe(tmp_path / "ex" / "recipe.yaml")
    est = estimate_run(recipe)
    counted = int(est["prompt tokens"].split()[0])
    assert "llama.cpp tokenizer" in est["prompt tokens"]  # the example's teacher counts as it bills
    plan = plan_requests(recipe, load_inputs(recipe))
    cache = ResponseCache(cache_path(recipe))
    recorded = cache.get_many([k for ks in plan.keys for k in ks])
    cache.close()
    assert len(recorded) == len(plan.rows) == 96
    billed = sum(e.input_tokens for e in recorded.values())
    assert billed > 100 * 96 and abs(counted - billed) <= 0.05 * billed, (counted, billed)


def test_estimate_sample_is_capped_by_the_same_ledger(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(10))
        recipe.source_path.write_text(recipe.source_path.read_text() + "  max_cost: 2.0\n")
        recipe = load_recipe(recipe.source_path)
        # a worst case of ~$1.2 per request (byte-bounded prompt, 384 tokens at $2/1K): $2 admits one at a time
        est = estimate_run(recipe, sample=8)
        assert "spent $" in est["sample stopped"] and "of $2.0000" in est["sample stopped"]
        sampled = len(stub.completed())
        assert 0 < sampled < 8
        cache = ResponseCache(cache_path(recipe))
        assert cache.spend(plan_requests(recipe, load_inputs(recipe)).base_keys()).total <= 2.0
        cache.close()
        assert est["max_cost"] == 2.0
        # generate sees what the sample spent: the same cap sends nothing more than fits
        result = run_generate(recipe, run, progress=False, max_cost=2.0)
        assert result.stopped_reason and "of $2.0000" in result.stopped_reason
        billed = sum((e["usage"]["prompt_tokens"] + 2 * e["usage"]["completion_tokens"]) / 1000
                     for e in stub.log if "usage" in e)
        assert billed <= 2.0


def test_estimate_names_its_counter_for_an_openai_model(tmp_path):
    """An OpenAI model name is counted with tiktoken when its encoding is at hand; otherwise the
    estimate says it guessed, and why (offline, tiktoken cannot fetch its encoding file)."""
    (tmp_path / "inputs.jsonl").write_text(json.dumps({"text": "my card was charged twice"}) + "\n")
    (tmp_path / "recipe.yaml").write_text(
        "name: oa\ntask:\n  name: t\n  classes: [billing, technical]\n  instructions: Classify.\n"
        "data:\n  inputs: inputs.jsonl\nteacher:\n  provider: openai\n  model: gpt-4o-mini\n")
    est = estimate_run(load_recipe(tmp_path / "recipe.yaml"))
    method = est["prompt tokens"].split(" ", 1)[1]
    try:
        import tiktoken

        tiktoken.encoding_for_model("gpt-4o-mini")
    except Exception:  # noqa: BLE001 - not installed, or its encoding file cannot be fetched offline
        assert method.startswith("(approx (4 chars/token; tiktoken"), method
    else:
        assert method == "(tiktoken for gpt-4o-mini)", method
