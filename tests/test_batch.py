"""Teacher at scale (issue 19): the Batch API, rate-limit headers, cached-token pricing, against the
loopback stub's Files + Batches endpoints (simulated completion: each test takes seconds)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from stepwise.pipelines.cache import ResponseCache
from stepwise.pipelines.generate import cache_path, load_inputs, plan_requests, run_generate
from stepwise.pipelines.prompts import build_messages
from stepwise.pipelines.ratelimit import RateLimiter, parse_reset

from stepwise.io import read_jsonl
from stepwise.recipe import load_recipe
from stepwise.rundir import RunDir, create_run
from stepwise.testing.openai_stub import OpenAIStub, StubConfig
from tests.conftest import REPO

RECIPE = """\
name: batchgen
task:
  name: tickets
  classes: [billing, technical, general]
  instructions: Classify the ticket.
data:
  inputs: inputs.jsonl
  id_field: id
teacher:
  provider: openai
  model: stub-teacher
  base_url: {base_url}
  concurrency: {concurrency}
  max_retries: 2
  max_attempts: {max_attempts}
  timeout_s: 5
  batch: {batch}
  batch_max_requests: {per_file}
  batch_poll_s: 0.03
  price: {{input_per_1k: 1.0, output_per_1k: 2.0, batch_discount: 0.5}}
"""


def make_rows(n: int) -> list[dict]:
    labels = ["billing", "technical", "general"]
    return [{"id": f"row{i:03d}", "text": f"row{i:03d} question about {labels[i % 3]}", "label": labels[i % 3]}
            for i in range(n)]


def setup(tmp_path: Path, stub: OpenAIStub, n: int, *, batch: bool = True, per_file: int = 50000,
          max_attempts: int = 3, concurrency: int = 4, name: str = "recipe.yaml"):
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(n)))
    path = tmp_path / name
    path.write_text(RECIPE.format(base_url=stub.base_url, batch=str(batch).lower(), per_file=per_file,
                                  max_attempts=max_attempts, concurrency=concurrency))
    recipe = load_recipe(path)
    return recipe, create_run(recipe, tmp_path / "run")


def rows_by_id(run: RunDir) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(run.layout.responses)}


def test_batch_in_parts_same_requests_as_online_at_the_discount(tmp_path):
    cfg = StubConfig(batch_complete_s=0.3)
    with OpenAIStub(cfg) as stub:
        recipe, run = setup(tmp_path, stub, 10, per_file=4)
        result = run_generate(recipe, run, progress=False)
        assert result.status_counts == {"ok": 10}
        # 3 input files (4 + 4 + 2 requests), each request submitted exactly once
        creates = [e for e in stub.batch_log if e["event"] == "batch_create"]
        assert [len(e["custom_ids"]) for e in creates] == [4, 4, 2]
        plan = plan_requests(recipe, load_inputs(recipe))
        assert sorted(stub.submitted_ids()) == sorted(plan.base_keys())  # custom_id = the online cache key
        manifest = run.read_manifest()
        entries = manifest["teacher_batches"]
        assert len(entries) == 3 and all(e["batch_id"] and e["file_id"] and e["processed"] for e in entries)
        stage = manifest["stages"]["generate"]
        assert stage["batch"]["batch_saving_usd"] == pytest.approx(stage["batch"]["online_cost_usd"] / 2, rel=1e-6)
        rows = rows_by_id(run)
        for r in rows.values():  # half the online price of the tokens the server reported
            online = (r["usage"]["input_tokens"] * 1.0 + r["usage"]["output_tokens"] * 2.0) / 1000
            assert r["cost"] == pytest.approx(online * 0.5, rel=1e-6)
            assert r["label"] == r["input"]["text"].rsplit(" ", 1)[-1]
        # the batch lines are the online request bodies (same messages, constraint, sampling)
        online_stub_log = []
        (tmp_path / "online").mkdir()
        with OpenAIStub() as online:
            recipe2, run2 = setup(tmp_path / "online", online, 10, batch=False)
            run_generate(recipe2, run2, progress=False)
            online_stub_log = online.log
        sent = json.loads((run.path / entries[0]["path"]).read_text().splitlines()[0])["body"]
        assert sent["messages"] == build_messages(recipe.task, {"text": "row000 question about billing"}, "dss")
        assert {e["input"] for e in online_stub_log} == {e["input"] for e in stub.log}


def test_expired_batch_resubmits_only_the_unanswered_up_to_max_attempts(tmp_path):
    # every batch expires a quarter of the way: 8 -> 2 answered, 6 re-submitted -> 1 answered, 5 stay failed
    cfg = StubConfig(batch_complete_s=0.4, batch_expire_s=0.1)
    with OpenAIStub(cfg) as stub:
        recipe, run = setup(tmp_path, stub, 8, max_attempts=2)
        result = run_generate(recipe, run, progress=False)
        assert result.status_counts == {"ok": 3, "error": 5}
        creates = [e["custom_ids"] for e in stub.batch_log if e["event"] == "batch_create"]
        assert [len(c) for c in creates] == [8, 6]
        answered_first = set(creates[0]) - set(creates[1])
        assert len(answered_first) == 2  # only the unanswered were submitted again
        done = Counter(e["key"] for e in stub.completed())
        assert all(n == 1 for n in done.values()) and len(done) == 3  # nothing answered twice
        rows = rows_by_id(run)
        failed = [r for r in rows.values() if r["parse_status"] == "error"]
        assert all("batch_expired" in r["error"] for r in failed) and all(r["attempts"] == 2 for r in failed)
        # a re-run: attempts spent, nothing is submitted
        run_generate(recipe, run, progress=False)
        assert len([e for e in stub.batch_log if e["event"] == "batch_create"]) == 2


def test_input_file_rejected_for_a_bad_line(tmp_path):
    cfg = StubConfig(batch_complete_s=0.1, batch_reject=("row003",))
    with OpenAIStub(cfg) as stub:
        recipe, run = setup(tmp_path, stub, 6)
        result = run_generate(recipe, run, progress=False)
        rows = rows_by_id(run)
        assert rows["row003"]["parse_status"] == "error"
        assert "line 4 rejected" in rows["row003"]["error"], rows["row003"]["error"]
        assert result.status_counts == {"ok": 5, "error": 1}
        creates = [e["custom_ids"] for e in stub.batch_log if e["event"] == "batch_create"]
        # the rejected file never ran; its other five lines went again, without the bad one
        assert [len(c) for c in creates] == [6, 5] and rows["row003"]["samples"][0]["cache_key"] not in creates[1]
        assert len(stub.completed()) == 5


def test_unknown_custom_id_is_ignored_never_attached(tmp_path):
    cfg = StubConfig(batch_complete_s=0.1, batch_unknown_ids=2)
    with OpenAIStub(cfg) as stub:
        recipe, run = setup(tmp_path, stub, 4)
        result = run_generate(recipe, run, progress=True)  # (the progress bar's path, too)
        assert result.status_counts == {"ok": 4}
        assert run.read_manifest()["stages"]["generate"]["batch"]["unknown_custom_ids_ignored"] == 2
        cache = ResponseCache(cache_path(recipe))
        try:
            assert cache.stats()["ok"]["rows"] == 4  # the unknown ids are not in the cache
        finally:
            cache.close()
        for r in rows_by_id(run).values():
            assert r["id"] in r["raw"]  # each row's own answer


def test_server_without_batch_api_exits_2(tmp_path):
    from typer.testing import CliRunner

    from stepwise.cli import app

    with OpenAIStub(StubConfig(batch_api=False)) as stub:
        recipe, _ = setup(tmp_path, stub, 2)
        out = CliRunner().invoke(app, ["generate", str(recipe.source_path), "--run-dir", str(tmp_path / "run"),
                                       "--no-progress"])
        assert out.exit_code == 2, out.output
        assert "this server has no Batch API; set teacher.batch: false" in " ".join(out.output.split())
        assert not stub.completed()


def test_ctrl_c_leaves_batches_running_and_resume_submits_nothing_twice(tmp_path, monkeypatch):
    import stepwise.pipelines.batch as batch_mod

    cfg = StubConfig(batch_complete_s=1.0)
    with OpenAIStub(cfg) as stub:
        recipe, run = setup(tmp_path, stub, 6, per_file=3)
        real_sleep = time.sleep

        def interrupt(_s: float) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(batch_mod.time, "sleep", interrupt)
        with pytest.raises(batch_mod.BatchesRunning, match=r"2 batch\(es\) still running.*--cancel-batches"):
            run_generate(recipe, run, progress=False)
        entries = run.read_manifest()["teacher_batches"]
        assert len(entries) == 2 and all(e["batch_id"] and not e["processed"] for e in entries)
        monkeypatch.setattr(batch_mod.time, "sleep", real_sleep)
        result = run_generate(recipe, run, progress=False)
        assert result.status_counts == {"ok": 6}
        assert Counter(stub.submitted_ids()).most_common(1)[0][1] == 1 and len(stub.submitted_ids()) == 6
        assert len([e for e in stub.batch_log if e["event"] == "file_upload"]) == 2


def test_cancel_batches_cancels_and_keeps_answers(tmp_path, monkeypatch):
    import stepwise.pipelines.batch as batch_mod

    with OpenAIStub(StubConfig(batch_complete_s=30.0)) as stub:
        recipe, run = setup(tmp_path, stub, 4)
        monkeypatch.setattr(batch_mod.time, "sleep", lambda _s: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(batch_mod.BatchesRunning):
            run_generate(recipe, run, progress=False)
        monkeypatch.undo()
        run_generate(recipe, run, progress=False, cancel_batches=True)
        entries = run.read_manifest()["teacher_batches"]
        assert [e["status"] for e in entries] == ["cancelled"] and entries[0]["processed"]
        assert len(stub.submitted_ids()) == 4


@pytest.mark.slow  # 3-16 s each (CLI subprocesses, imports): keeps make test-fast under 2 min
def test_sigkill_during_polling_then_resume_submits_nothing_twice(tmp_path):
    with OpenAIStub(StubConfig(batch_complete_s=3.0)) as stub:
        recipe, run = setup(tmp_path, stub, 6, per_file=2)
        proc = subprocess.Popen([sys.executable, "-m", "stepwise", "generate", str(recipe.source_path), "--run-dir",
                                 str(tmp_path / "run"), "--no-progress"], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:  # polling has started once all three batches are in the manifest
            entries = RunDir(tmp_path / "run").read_manifest().get("teacher_batches", [])
            if len(entries) == 3 and all(e.get("batch_id") for e in entries):
                break
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        result = run_generate(recipe, run, progress=False)
        assert result.status_counts == {"ok": 6}
        assert len(stub.submitted_ids()) == 6 and len(set(stub.submitted_ids())) == 6
        assert len(stub.completed()) == 6


def test_cost_cap_counts_submitted_batches_at_worst_case(tmp_path):
    with OpenAIStub(StubConfig(batch_complete_s=0.1)) as stub:
        recipe, run = setup(tmp_path, stub, 10)
        # worst case per request (byte-bounded prompt + 384 output tokens at $2/1K, halved) ~ $0.6
        result = run_generate(recipe, run, max_cost=2.0, progress=False)
        assert result.stopped_reason and "cost cap" in result.stopped_reason
        submitted = len(stub.submitted_ids())
        assert 0 < submitted < 10
        rows = rows_by_id(run)
        assert Counter(r["parse_status"] for r in rows.values()) == {"ok": submitted, "not_run": 10 - submitted}


# -- online: rate-limit headers and cached prompt tokens -----------------------------------------


def test_rate_limit_headers_hold_requests_back_no_429(tmp_path):
    cfg = StubConfig(ratelimit_requests=5, ratelimit_window_s=0.4)
    with OpenAIStub(cfg) as stub:
        recipe, run = setup(tmp_path, stub, 24, batch=False, concurrency=4)
        result = run_generate(recipe, run, progress=False)
        assert result.status_counts == {"ok": 24}
        assert stub.outcomes().get("429", 0) == 0, stub.outcomes()
        assert result.stats.retried == 0


def test_static_requests_per_minute_without_headers():
    now = [1000.0]
    limiter = RateLimiter(max_requests_per_minute=2, clock=lambda: now[0])
    asyncio.run(limiter.acquire(10))
    asyncio.run(limiter.acquire(10))
    assert limiter._delay(10, now[0]) == pytest.approx(60.0)
    now[0] += 30
    assert limiter._delay(10, now[0]) == pytest.approx(30.0)
    now[0] += 31
    assert limiter._delay(10, now[0]) == 0.0
    # headers that say "spent" without a reset time: held back a second, never forever
    spent = RateLimiter(clock=lambda: now[0])
    spent.observe({"x-ratelimit-remaining-requests": "0"})
    assert spent._delay(1, now[0]) == pytest.approx(1.0)
    now[0] += 1.0
    assert spent._delay(1, now[0]) == 0.0
    tokens = RateLimiter(max_tokens_per_minute=100, clock=lambda: now[0])
    asyncio.run(tokens.acquire(60))
    assert tokens._delay(50, now[0]) == pytest.approx(60.0) and tokens._delay(40, now[0]) == 0.0
    assert parse_reset("6m0s") == 360 and parse_reset("20ms") == pytest.approx(0.02)
    assert parse_reset("1h2m3.5s") == pytest.approx(3723.5) and parse_reset("soon") is None


def test_cached_prompt_tokens_are_priced_at_the_cached_rate(tmp_path):
    with OpenAIStub(StubConfig(cached_prompt_tokens=10)) as stub:
        recipe, run = setup(tmp_path, stub, 3, batch=False)
        recipe.teacher.price.cached_input_per_1k = 0.25
        result = run_generate(recipe, run, progress=False)
        for r in rows_by_id(run).values():
            itok, otok = r["usage"]["input_tokens"], r["usage"]["output_tokens"]
            assert r["cost"] == pytest.approx(((itok - 10) * 1.0 + 10 * 0.25 + otok * 2.0) / 1000)
        cost = run.read_manifest()["stages"]["generate"]["cost"]
        assert cost["cached_input_tokens"] == 30 and result.stats.cached_tokens == 30
        assert cost["cached_input_saving_usd"] == pytest.approx(30 * 0.75 / 1000)


def test_shared_prompt_part_is_byte_identical_and_first(tmp_path):
    recipe = load_recipe_text(tmp_path)
    a = build_messages(recipe.task, {"text": "first input"}, "dss")
    b = build_messages(recipe.task, {"text": "a different, longer second input"}, "dss")
    assert a[:-1] == b[:-1]  # system prompt and few-shot turns
    prefix = os.path.commonprefix([a[-1]["content"], b[-1]["content"]])
    assert prefix.startswith("Classify the ticket.") and "Labels: billing, technical, general" in prefix
    assert a[-1]["content"].endswith("Input:\nfirst input")  # the row's input comes last


def load_recipe_text(tmp_path: Path):
    (tmp_path / "inputs.jsonl").write_text(json.dumps(make_rows(1)[0]) + "\n")
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(base_url="http://127.0.0.1:9/v1", batch="false", per_file=10, max_attempts=2,
                               concurrency=1))
    return load_recipe(p)


def test_estimate_shows_batch_cost_and_expected_prompt_cache_saving(tmp_path):
    from stepwise.pipelines.estimate import estimate_run, shared_prefix

    recipe = load_recipe_text(tmp_path)
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(5)))
    recipe.teacher.price.cached_input_per_1k = 0.25
    short = estimate_run(recipe)
    online = float(short["cost, still to pay"].lstrip("$"))
    batch = float(short["cost, still to pay (Batch API)"].split()[0].lstrip("$"))
    assert batch == pytest.approx(online * 0.5, abs=1e-4) and online > 0
    assert "no discount expected" in short["shared prompt prefix"]  # a short prompt is not cached
    assert short["expected prompt-cache saving"].startswith("$0.0000")
    # a long shared instruction (> 1,024 tokens) is cached for every request after the first
    recipe.task.instructions = "Classify the ticket. " + "Read the whole message carefully. " * 200
    plan = plan_requests(recipe, load_inputs(recipe))
    prefix = shared_prefix(plan.messages)
    assert prefix[-1]["content"].endswith("Input:\nrow00")  # everything up to the row's own text
    est = estimate_run(recipe)
    shared = int(est["shared prompt prefix"].split()[0])
    assert shared > 1024
    cached = int(est["expected prompt-cache saving"].split("(")[1].split()[0])
    step = shared - (shared - 1024) % 128
    assert cached == step * 4
    assert float(est["expected prompt-cache saving"].split()[0].lstrip("$")) == pytest.approx(cached * 0.75 / 1000, abs=1e-4)


def test_killed_between_submission_and_recording_the_batch_id_is_found_not_resubmitted(tmp_path, monkeypatch):
    import openai.resources.batches as batches_api
    from stepwise.pipelines.generate import GenerateInterrupted

    real_create = batches_api.Batches.create

    def create_then_die(self, **kw):
        real_create(self, **kw)  # the server has the batch; the client dies before writing its id
        raise KeyboardInterrupt

    with OpenAIStub(StubConfig(batch_complete_s=0.1)) as stub:
        recipe, run = setup(tmp_path, stub, 3)
        monkeypatch.setattr(batches_api.Batches, "create", create_then_die)
        with pytest.raises(GenerateInterrupted):
            run_generate(recipe, run, progress=False)
        entry = run.read_manifest()["teacher_batches"][0]
        assert entry["file_id"] and entry["batch_id"] is None
        monkeypatch.undo()
        result = run_generate(recipe, run, progress=False)
        assert result.status_counts == {"ok": 3}
        events = Counter(e["event"] for e in stub.batch_log)
        assert events == {"file_upload": 1, "batch_create": 1}  # found by its input file, not created again


def test_batch_with_a_local_teacher_is_a_recipe_error(tmp_path):
    from pydantic import ValidationError

    recipe = load_recipe_text(tmp_path)
    data = recipe.teacher.model_dump() | {"provider": "llamacpp", "batch": True}
    with pytest.raises(ValidationError, match="Batch API needs an OpenAI-compatible server"):
        type(recipe.teacher).model_validate(data)


def test_an_answer_from_before_the_window_reset_does_not_restart_the_new_window():
    """A slow answer to a request sent in the old window arrives after the client saw the reset: its
    headers describe the old window, and obeying them would let a second full window out (a 429)."""
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    old = [asyncio.run(limiter.acquire()) for _ in range(5)]
    limiter.observe({"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0",
                     "x-ratelimit-reset-requests": "400ms"}, old[-1])
    for t in old[1:]:
        limiter.done(t)
    assert limiter._delay(0, now[0]) == pytest.approx(0.4)
    now[0] = 0.5  # the window reset: 5 new requests go out (the first old one is still in flight)
    new = [asyncio.run(limiter.acquire()) for _ in range(4)]
    assert limiter._delay(0, now[0]) > 0  # 4 new + 1 in flight = the limit
    for t in new:
        limiter.done(t)
    # the stale answer (sent at 0.0) arrives now, saying "0 left, resets in 100 ms"
    limiter.observe({"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0",
                     "x-ratelimit-reset-requests": "100ms"}, old[0])
    limiter.done(old[0])
    now[0] = 0.65
    assert limiter._delay(0, now[0]) > 0, "the old window's headers restarted the new window"


def test_an_earlier_request_the_server_has_not_counted_yet_is_not_spent_twice():
    """Two requests in flight reach the server out of order (a loaded box): the later one's answer
    says how many remain without counting the earlier one, which is still on its way; trusting it
    let one request too many out (a 429 in test_rate_limit_headers_hold_requests_back_no_429)."""
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    first, second = asyncio.run(limiter.acquire()), asyncio.run(limiter.acquire())
    # the server saw `second` only: 3 per window, 1 used, 2 left
    limiter.observe({"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
                     "x-ratelimit-reset-requests": "400ms"}, second)
    limiter.done(second)
    asyncio.run(limiter.acquire())  # one more fits: `first` and this one make the window's 3
    assert limiter._delay(0, now[0]) > 0, "the request still in flight was not counted"
    limiter.done(first)


def test_answers_settled_out_of_order_never_raise_what_remains_in_a_window():
    """Within one window the server's count only goes down; an answer that arrives late carries an older,
    higher count (here ticket 3 reached the server before ticket 2 but its answer was read after), and
    taking it as the latest let one request too many out (the 429 seen in a fast run of the suite)."""
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    hdr = lambda left: {"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": str(left),  # noqa: E731
                        "x-ratelimit-reset-requests": "360ms"}
    tickets = [asyncio.run(limiter.acquire()) for _ in range(4)]
    limiter.done(tickets[0])
    limiter.observe(hdr(4), tickets[0])
    asyncio.run(limiter.acquire())  # the fifth of the window
    for t, left in ((tickets[1], 3), (tickets[2], 1), (tickets[3], 2)):  # server order: 0, 1, 3, 2
        limiter.done(t)
        limiter.observe(hdr(left), t)
    assert limiter._delay(0, now[0]) > 0, "a late answer's older count raised what remains"
    now[0] = 0.4  # the window reset: requests go out again
    assert limiter._delay(0, now[0]) == 0
