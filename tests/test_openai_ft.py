"""Hosted fine-tuning (`stepwise train --backend openai`) against the files + fine-tuning stub on
127.0.0.1: validation with file:line, cost estimate, upload/create/poll to a fine-tuned model in
the manifest, a failed job, Ctrl-C cancelling the job, a killed run resumed without a second job,
and `stepwise eval` of the fine-tuned model through the same endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stepwise.training.openai_ft import (
    FineTuneRun,
    TokenCounter,
    auto_epochs,
    estimate_cost,
    validate_chat_file,
)
from stepwise.training.testing import make_run
from typer.testing import CliRunner

from stepwise.cli import app
from stepwise.recipe import load_recipe
from stepwise.rundir import RunDir
from stepwise.testing.openai_ft_stub import OpenAIFineTuneStub, StubFTConfig

KEY_ENV = "STUB_FT_KEY"
SECRET = "sk-stub-" + "7f3a9c1e5b"
REPO = Path(__file__).resolve().parent.parent


def _extra(stub: OpenAIFineTuneStub, **kw: str) -> str:
    lines = ["backend: openai", "openai:", f"  base_url: {stub.base_url}", f"  api_key_env: {KEY_ENV}",
             "  poll_interval_s: 0.05", "  suffix: tickets", "  n_epochs: 2"]
    lines += [f"  {k}: {v}" for k, v in kw.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def stub_factory():
    stubs: list[OpenAIFineTuneStub] = []

    def make(**kw) -> OpenAIFineTuneStub:
        s = OpenAIFineTuneStub(StubFTConfig(api_key=SECRET, **kw)).start()
        stubs.append(s)
        return s

    yield make
    for s in stubs:
        s.stop()


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={KEY_ENV: SECRET}, catch_exceptions=False)


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def _no_secret(run_dir: Path) -> None:
    for p in run_dir.rglob("*"):
        if p.is_file():
            assert SECRET not in p.read_text(errors="replace"), p


# -- validation and cost (no network) -----------------------------------------------------------


def test_validation_names_file_line_and_field(tmp_path, stub_factory):
    stub = stub_factory()
    recipe, run_dir = make_run(tmp_path, _extra(stub, max_example_tokens="60"))
    train = run_dir / "export" / "train.chat.jsonl"
    good = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "<answer>billing</answer>"}]}
    rows = [
        json.dumps(good),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"},
                                 {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y"},
                                 {"role": "user", "content": "and?"}]}),
        '{"messages": [',
        json.dumps({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
    ]
    train.write_text("\n".join(rows) + "\n")
    check = validate_chat_file(train, TokenCounter(recipe.training.openai.model), 60)
    errors = "\n".join(check.errors)
    assert "train.chat.jsonl:2 messages[1].role: 'bot' is not one of system, user, assistant" in errors
    assert "train.chat.jsonl:3 messages[2].role: the last message must be the assistant's" in errors
    assert "train.chat.jsonl:4: invalid JSON" in errors
    assert "train.chat.jsonl:5 messages[0].content: must be a string, got int" in errors
    assert "train.chat.jsonl:6 messages:" in errors and "exceeds the 60-token limit" in errors
    assert "train.chat.jsonl:7 messages: no assistant message" in errors
    assert "train.chat.jsonl: 7 examples; the fine-tuning API needs at least 10" in errors
    assert not any(e.startswith("train.chat.jsonl:1 ") for e in check.errors)  # the good row passes

    result = _invoke("train", str(recipe.source_path), "--run-dir", str(run_dir))
    assert result.exit_code == 2, result.output
    assert "train.chat.jsonl:2 messages[1].role" in result.output and "nothing was uploaded" in result.output
    assert stub.counts["upload"] == 0 and stub.counts["create"] == 0


def test_cost_estimate_follows_the_auto_epoch_rule(tmp_path, stub_factory):
    stub = stub_factory()
    # the cookbook's default: 3 epochs, at least ~100 example-passes, at most ~25,000
    assert auto_epochs(12) == 100 // 12 and auto_epochs(50) == 3 and auto_epochs(10_000) == 2
    assert auto_epochs(1) == 25 and auto_epochs(100_000) == 1
    recipe, run_dir = make_run(tmp_path, _extra(stub, training_price_per_1m_tokens="8.0"))
    train = run_dir / "export" / "train.chat.jsonl"
    counter = TokenCounter(recipe.training.openai.model)
    lengths = [counter.messages(json.loads(line)["messages"]) for line in train.read_text().splitlines()]
    check = validate_chat_file(train, counter, 10_000)
    assert check.ok and check.tokens == lengths

    est = estimate_cost(check, recipe.training.openai, counter, 10_000)  # n_epochs: 2 in the recipe
    assert est.billed_tokens == sum(lengths) and est.n_epochs == 2 and est.n_epochs_source == "recipe"
    assert est.usd == pytest.approx(sum(lengths) * 2 * 8.0 / 1e6)
    capped = estimate_cost(check, recipe.training.openai, counter, min(lengths))  # each example billed at most the limit
    assert capped.billed_tokens == min(lengths) * len(lengths) < est.billed_tokens

    auto = recipe.training.openai.model_copy(update={"n_epochs": "auto"})
    est_auto = estimate_cost(check, auto, counter, 10_000)
    assert est_auto.n_epochs == auto_epochs(len(lengths)) and est_auto.n_epochs_source.startswith("auto")


# -- the job ------------------------------------------------------------------------------------


def _write_test_split(run_dir: Path) -> None:
    rows = [("I was charged twice on my card", "billing"), ("The app crashes when I log in", "technical"),
            ("What are your opening hours on Sunday?", "general"), ("Error 500 on the payment page", "technical")]
    (run_dir / "curate").mkdir(exist_ok=True)
    (run_dir / "curate" / "test.jsonl").write_text("".join(
        json.dumps({"id": f"t{i}", "input": {"text": t}, "gold": g}) + "\n" for i, (t, g) in enumerate(rows)))


@pytest.mark.slow  # about a minute on a 2-core box: left out of `make test-fast`
def test_job_succeeds_is_recorded_then_evaluated(tmp_path, stub_factory):
    stub = stub_factory()
    recipe, run_dir = make_run(tmp_path, _extra(stub))
    result = _invoke("train", str(recipe.source_path), "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "estimated training cost" in result.output and "x 2 epochs (recipe)" in result.output
    assert stub.counts == {**stub.counts, "upload": 2, "create": 1, "cancel": 0}  # train + val, one job
    job = next(iter(stub.jobs.values()))
    assert job["hyperparameters"]["n_epochs"] == 2 and job["suffix"] == "tickets"
    assert job["hyperparameters"]["batch_size"] == "auto"  # `auto` left to the API

    stage = _manifest(run_dir)["stages"]["train"]
    assert stage["status"] == "done" and stage["backend"] == "openai"
    assert stage["job_id"] == job["id"] and stage["fine_tuned_model"] == job["fine_tuned_model"]
    assert ":tickets:" in stage["fine_tuned_model"]
    assert stage["openai"]["status"] == "succeeded" and stage["counts"]["trained_tokens"] == job["trained_tokens"]
    assert stage["cost_estimate_usd"] > 0 and stage["cost_usd"] > 0
    messages = [e["message"] for e in stage["openai"]["events"]]
    assert messages[0].startswith("Created fine-tuning job") and messages[-1] == "The job has successfully completed"
    assert "Step 4/4: training loss=0.5" in messages and "Fine-tuning job started" in result.output
    state = json.loads((run_dir / "train" / "openai_job.json").read_text())
    assert state["job_id"] == job["id"] and state["status"] == "succeeded"
    _no_secret(run_dir)

    # a second `stepwise train` pays nothing: the succeeded job is recorded, no upload, no job
    again = _invoke("train", str(recipe.source_path), "--run-dir", str(run_dir))
    assert again.exit_code == 0 and "resuming job" in again.output
    assert stub.counts["upload"] == 2 and stub.counts["create"] == 1

    # `stepwise eval` finds the fine-tuned model in the run and asks the same endpoint
    _write_test_split(run_dir)
    ev = _invoke("eval", str(recipe.source_path), "--run-dir", str(run_dir), "--skip-forgetting")
    assert ev.exit_code == 0, ev.output
    task = json.loads((run_dir / "eval" / "task.json").read_text())
    assert task["model_kind"] == "openai" and task["model"].startswith(job["fine_tuned_model"] + "@")
    assert task["n"] == 4 and task["parse_status"].get("ok", 0) + task["parse_status"].get("missing_rationale", 0) == 4
    assert stub.chat_models.count(job["fine_tuned_model"]) == 4  # (the base model may be asked too)
    assert task["metrics"]["accuracy"]["value"] >= 0.5  # nearest training example: right label for most
    # the explicit form names the same model
    ev2 = _invoke("eval", str(recipe.source_path), "--run-dir", str(run_dir), "--skip-forgetting",
                  "--model", f"openai:{job['fine_tuned_model']}")
    assert ev2.exit_code == 0 and stub.chat_models.count(job["fine_tuned_model"]) == 8


def test_failed_job_exits_1_with_the_api_message(tmp_path, stub_factory):
    stub = stub_factory(fail_at="running")
    recipe, run_dir = make_run(tmp_path, _extra(stub))
    result = _invoke("train", str(recipe.source_path), "--run-dir", str(run_dir))
    assert result.exit_code == 1
    assert stub.config.fail_message in result.output and "failed" in result.output
    stage = _manifest(run_dir)["stages"]["train"]
    assert stage["status"] == "failed" and stub.config.fail_message in stage["error"]
    assert stage["openai"]["status"] == "failed"


def test_missing_key_is_bad_input(tmp_path, stub_factory):
    stub = stub_factory()
    recipe, run_dir = make_run(tmp_path, _extra(stub))
    result = CliRunner().invoke(app, ["train", str(recipe.source_path), "--run-dir", str(run_dir)],
                                env={KEY_ENV: ""})
    assert result.exit_code == 2 and f"${KEY_ENV} is not set" in result.output
    assert stub.counts["upload"] == 0


# -- interruptions (the CLI as a subprocess) ----------------------------------------------------


def _spawn(recipe_path: Path, run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, KEY_ENV: SECRET}
    return subprocess.Popen(
        [sys.executable, "-m", "stepwise.cli", "train", str(recipe_path), "--run-dir", str(run_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
        # a terminal's Ctrl-C: SIGINT at its default disposition, whatever the test runner inherited
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_running(stub: OpenAIFineTuneStub, run_dir: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    state = run_dir / "train" / "openai_job.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if stub.job_status() == ["running"] and state.exists() and json.loads(state.read_text()).get("status") == "running":
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    raise AssertionError("job never seen running")


def test_ctrl_c_while_polling_cancels_the_job(tmp_path, stub_factory):
    stub = stub_factory(hold_running=True)
    recipe, run_dir = make_run(tmp_path, _extra(stub))
    proc = _spawn(recipe.source_path, run_dir)
    _wait_running(stub, run_dir, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    assert "cancelling fine-tuning job" in out and "--detach" in out
    assert stub.counts["cancel"] == 1 and stub.job_status() == ["cancelled"]
    stage = _manifest(run_dir)["stages"]["train"]
    assert stage["status"] == "cancelled" and stage["openai"]["status"] == "cancelled"
    assert stage["openai"]["events"][-1]["message"] == "Fine-tuning job cancelled"
    _no_secret(run_dir)


def test_killed_run_resumes_the_same_job(tmp_path, stub_factory):
    stub = stub_factory(hold_running=True)
    recipe, run_dir = make_run(tmp_path, _extra(stub))
    proc = _spawn(recipe.source_path, run_dir)
    _wait_running(stub, run_dir, proc)
    proc.kill()
    proc.wait(timeout=10)
    job_id = json.loads((run_dir / "train" / "openai_job.json").read_text())["job_id"]
    assert _manifest(run_dir)["stages"]["train"]["openai"]["job_id"] == job_id  # in the manifest while running

    stub.release()
    result = _invoke("train", str(recipe.source_path), "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert f"resuming job {job_id}" in result.output
    assert stub.counts["create"] == 1 and stub.counts["upload"] == 2  # one job; train + val uploaded once
    stage = _manifest(run_dir)["stages"]["train"]
    assert stage["job_id"] == job_id and stage["fine_tuned_model"] == stub.jobs[job_id]["fine_tuned_model"]
    messages = [e["message"] for e in stage["openai"]["events"]]
    assert len(messages) == len(set(e["id"] for e in stage["openai"]["events"]))  # no event recorded twice
    assert messages.count("Fine-tuning job started") == 1


def test_killed_between_create_and_record_adopts_the_job(tmp_path, stub_factory):
    """The API created the job but the process died before writing its id: found by metadata."""
    stub = stub_factory()
    recipe, run_dir = make_run(tmp_path, _extra(stub))
    os.environ[KEY_ENV] = SECRET
    try:
        from stepwise.training.openai_ft import make_client

        ft = FineTuneRun(load_recipe(recipe.source_path), RunDir(run_dir), make_client(recipe.training.openai),
                         log=lambda m: None)
        train, val, _, _ = ft.prepare()
        ft.create(ft.upload(train, "train"), ft.upload(val, "validation"))  # ... and no record_job: "killed"
    finally:
        del os.environ[KEY_ENV]
    assert "job_id" not in json.loads((run_dir / "train" / "openai_job.json").read_text())
    result = _invoke("train", str(recipe.source_path), "--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "found job" in result.output and stub.counts["create"] == 1 and stub.counts["upload"] == 2


def test_detach_leaves_the_job_running(tmp_path, stub_factory):
    stub = stub_factory(hold_running=True)
    recipe, run_dir = make_run(tmp_path, _extra(stub))
    result = _invoke("train", str(recipe.source_path), "--run-dir", str(run_dir), "--detach")
    assert result.exit_code == 3 and "detached" in result.output
    assert stub.counts["cancel"] == 0 and stub.job_status()[0] in ("validating_files", "queued", "running")
    assert _manifest(run_dir)["stages"]["train"]["status"] == "detached"
    stub.release()
    done = _invoke("train", str(recipe.source_path), "--run-dir", str(run_dir))
    assert done.exit_code == 0 and stub.counts["create"] == 1


def test_stepwise_run_stages_use_the_hosted_job(tmp_path, stub_factory, monkeypatch):
    """`stepwise run`'s configs and train stages with training.backend: openai (no Axolotl configs)."""
    from stepwise.pipeline import RunOptions, _configs, _train

    stub = stub_factory()
    recipe, run_dir = make_run(tmp_path, _extra(stub))
    monkeypatch.setenv(KEY_ENV, SECRET)
    run = RunDir(run_dir)
    assert "no configs" in _configs(recipe, run, RunOptions())
    assert not (run_dir / "configs").exists() or not list((run_dir / "configs").iterdir())
    summary = _train(recipe, run, RunOptions())
    job = next(iter(stub.jobs.values()))
    assert summary.startswith(job["fine_tuned_model"]) and stub.counts["create"] == 1
    assert _manifest(run_dir)["stages"]["train"]["fine_tuned_model"] == job["fine_tuned_model"]
