"""Real-model evals test: SmolLM2-135M-Instruct before and after a few LoRA steps (made here with
peft, no Axolotl), real lm-eval runs on two bundled benchmarks, `stepwise eval` end to end, the
gate's exit-code contract on a constructed drop, the contamination refusal, and `stepwise compare`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tests.conftest import REPO

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "support-tickets"
N_QUESTIONS = 12  # per forgetting benchmark (was 25): every assertion here holds at any n; the eval time scales with it
N_TEST = 6


def _app() -> typer.Typer:
    from stepwise.evals.cli import register

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer in multi-command mode
        pass

    return app


def _train_adapter(base_dir: Path, out: Path, task, rows: list[dict], steps: int = 2) -> None:
    """A few LoRA steps on chat examples (the student format), saved as an adapter dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from stepwise.pipelines.student import training_examples
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.truncation_side = "left"  # keep the answer at the end
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    texts = []
    for r in rows:
        for _, messages in training_examples(task, r["input"], None, r["gold"], "multitask"):
            texts.append(tok.apply_chat_template(messages, tokenize=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(steps):
        batch = tok(texts[step:step + 2], return_tensors="pt", padding=True, truncation=True, max_length=128)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id, resolved offline
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run of the support-tickets example with curated splits and a trained adapter."""
    import os

    import torch

    from stepwise.models import resolve_model_dir
    from stepwise.recipe import load_recipe
    from stepwise.rundir import create_run

    if os.getloadavg()[0] > (os.cpu_count() or 1):  # shared, oversubscribed cores: one thread wastes less
        torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evals_real")
    shutil.copytree(EXAMPLE / "data", root / "data")
    # the demo's recorded teacher cache (a copy: the test must not write to the example's file); it
    # holds the teacher's answers to the test prompts, so eval scores the teacher without asking it
    import sqlite3

    src, dst = sqlite3.connect(EXAMPLE / "teacher_cache.sqlite"), sqlite3.connect(root / "teacher_cache.sqlite")
    src.backup(dst)  # through SQLite: also rows still in the write-ahead log of a checkout's copy
    src.close()
    dst.close()
    raw = yaml.safe_load((EXAMPLE / "recipe.yaml").read_text())
    raw["eval"] = {
        "task": {"max_new_tokens": 10, "batch_size": 6, "bootstrap": 200, "limit": N_TEST, "device": "cpu"},
        "forgetting": {"benchmarks": ["mmlu", "arc_easy"], "subset_size": N_QUESTIONS, "max_drop": 1.0,
                       "batch_size": 8, "device": "cpu"},
    }
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    recipe = load_recipe(recipe_path)
    run = create_run(recipe, root / "runs" / "a")
    test = [json.loads(line) for line in (root / "data" / "test.jsonl").read_text().splitlines() if line.strip()]
    train = [json.loads(line) for line in (root / "data" / "tickets.jsonl").read_text().splitlines() if line.strip()]
    cur = run.path / "curate"
    cur.mkdir()
    (cur / "test.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "input": {"text": r["text"]}, "gold": r["label"]}) + "\n" for r in test))
    train_rows = [{"id": r["id"], "input": {"text": r["text"]}, "gold": r["label"], "label": r["label"],
                   "split": "train"} for r in train[:40]]
    (cur / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    _train_adapter(resolve_model_dir("smollm2-135m-instruct"), run.path / "train" / "lora-r8", recipe.task,
                   train_rows[:8])
    return {"root": root, "recipe": recipe_path, "run": run.path}


def test_stepwise_eval_real_lm_eval(setup):
    runner = CliRunner()
    started = time.time()
    res = runner.invoke(_app(), ["eval", str(setup["recipe"]), "--run-dir", str(setup["run"])])
    first_wall = time.time() - started
    assert res.exit_code == 0, res.output + str(res.exception)
    ev = setup["run"] / "eval"
    task = json.loads((ev / "task.json").read_text())
    assert task["task_type"] == "classification" and task["n"] == N_TEST
    for k in ("accuracy", "macro_f1", "invalid_rate"):
        m = task["metrics"][k]
        assert m["value"] is not None and m["ci_low"] <= m["value"] <= m["ci_high"]
    assert set(task["per_class"]) == set(json.loads((setup["root"] / "data" / "labels.json").read_text()))
    assert len(task["confusion"]["matrix"]) == 6 and task["contamination"]["overlaps"] == 0
    assert task["model_info"]["kind"] == "adapter" and task["model_info"]["parameters"]["trainable"] > 0
    assert len((ev / "task_predictions.jsonl").read_text().splitlines()) == N_TEST
    # student vs base on the same test items (eval.task.compare_base, on by default)
    comp = task["base_comparison"]
    base_task = json.loads((ev / "base_task.json").read_text())
    base_preds = [json.loads(line) for line in (ev / "base_task_predictions.jsonl").read_text().splitlines()]
    assert comp["base"] == "smollm2-135m-instruct" == base_task["model"] and comp["n_paired"] == N_TEST
    acc = comp["metrics"]["accuracy"]
    assert acc["base"] == pytest.approx(base_task["metrics"]["accuracy"]["value"])
    assert acc["student"] == pytest.approx(task["metrics"]["accuracy"]["value"])
    assert acc["delta"] == pytest.approx(acc["student"] - acc["base"])
    assert acc["delta_ci"][0] <= acc["delta"] <= acc["delta_ci"][1]
    assert acc["gained"] + acc["lost"] <= N_TEST and set(comp["metrics"]) >= {"accuracy", "macro_f1", "invalid_rate"}
    assert [p["id"] for p in base_preds] == [p["id"] for p in
                                             map(json.loads, (ev / "task_predictions.jsonl").read_text().splitlines())]
    assert "student vs base" in res.output and comp["cached"] is False
    # student vs teacher: the teacher from the demo's recorded cache, zero new requests
    svt = json.loads((ev / "student_vs_teacher.json").read_text())
    teacher, base, student = svt["models"]
    assert [m["role"] for m in svt["models"]] == ["teacher", "base", "student"]
    assert teacher["requests"] == {"cached": N_TEST, "asked": 0} and teacher["n"] == N_TEST
    assert teacher["latency"]["note"] == "cached, latency not measured"
    assert teacher["vs_student"]["accuracy"]["delta"] == pytest.approx(
        acc["student"] - teacher["metrics"]["accuracy"]["value"])
    assert base["vs_student"]["accuracy"]["delta"] == pytest.approx(acc["delta"])
    for m in (base, student):  # measured here: batched (the eval's own pass) and batch 1
        assert m["latency"]["batched"]["n"] == N_TEST and m["latency"]["batch1"]["n"] == N_TEST
        assert 0 < m["latency"]["batch1"]["p50_s"] <= m["latency"]["batch1"]["p95_s"]
        assert m["cost_per_1k"] == pytest.approx(1000 * m["latency"]["batched"]["s_per_request"] / 3600 * 1.0)
    # a free local teacher whose answers were cached: no measured cost, so no break-even
    assert teacher["cost_per_1k"] == 0.0 and svt["break_even"]["text"].startswith("never")
    assert "student vs teacher" in res.output and "break-even: never" in res.output

    forg = json.loads((ev / "forgetting.json").read_text())
    assert set(forg["benchmarks"]) == {"mmlu", "arc_easy"}
    for name, r in forg["benchmarks"].items():
        assert r["n"] == N_QUESTIONS, name
        assert 0 <= r["before"]["value"] <= 1 and 0 <= r["after"]["value"] <= 1
        # our per-item means are lm-eval's own aggregate
        assert r["before"]["value"] == pytest.approx(r["lm_eval_value"]["before"])
        assert r["after"]["value"] == pytest.approx(r["lm_eval_value"]["after"])
        assert r["delta"] == pytest.approx(r["after"]["value"] - r["before"]["value"])
        assert r["delta_ci"][0] <= r["delta"] <= r["delta_ci"][1]
    assert forg["gate"]["passed"] and forg["base"] == "smollm2-135m-instruct"
    manifest = json.loads((setup["run"] / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["status"] == "done"
    assert {o["path"] for o in manifest["stages"]["eval"]["outputs"]} >= {"eval/task.json", "eval/forgetting.json"}

    # a rerun of the forgetting eval is served from the run's cache
    started = time.time()
    res = runner.invoke(_app(), ["eval", str(setup["recipe"]), "--run-dir", str(setup["run"]), "--skip-task"])
    assert res.exit_code == 0, res.output
    again = json.loads((ev / "forgetting.json").read_text())
    assert all(r["before_cached"] and r["after_cached"] for r in again["lm_eval"]["runs"].values())
    assert time.time() - started < first_wall


def test_gate_exit_code_on_constructed_drop(setup):
    """Doctor the cached "after" scores into a drop: the gate fails, exit 4, mitigations printed."""
    test_stepwise_eval_real_lm_eval_ran = (setup["run"] / "eval" / "forgetting.json").exists()
    if not test_stepwise_eval_real_lm_eval_ran:
        pytest.skip("needs the real run first")
    cache = setup["run"] / "eval" / "forgetting" / "cache"
    from stepwise.evals.modelref import resolve_model

    base_label = resolve_model("smollm2-135m-instruct").label
    doctored = 0
    for p in cache.glob("*.json"):
        data = json.loads(p.read_text())
        if data["model"] != base_label and data["benchmark"] == "arc_easy":
            data["items"] = [0.0] * len(data["items"])
            p.write_text(json.dumps(data))
            doctored += 1
    assert doctored == 1
    strict = setup["root"] / "strict.yaml"
    raw = yaml.safe_load(setup["recipe"].read_text())
    raw["eval"]["forgetting"]["max_drop"] = 0.05
    strict.write_text(yaml.safe_dump(raw, sort_keys=False))
    res = CliRunner().invoke(_app(), ["eval", str(strict), "--run-dir", str(setup["run"]), "--skip-task"])
    assert res.exit_code == 4, res.output
    assert "gate FAILED" in res.output and "general-domain" in res.output and "LoRA" in res.output
    forg = json.loads((setup["run"] / "eval" / "forgetting.json").read_text())
    assert forg["gate"]["failed"] == ["arc_easy"] and forg["benchmarks"]["arc_easy"]["after"]["value"] == 0.0
    from stepwise.cli import EXIT_GATE_FAILED

    assert EXIT_GATE_FAILED == 4


def test_contamination_refusal_exit_2(setup, tmp_path):
    run2 = tmp_path / "contaminated"
    shutil.copytree(setup["run"], run2, ignore=shutil.ignore_patterns("eval"))
    test_row = json.loads((run2 / "curate" / "test.jsonl").read_text().splitlines()[0])
    with (run2 / "curate" / "train.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "leak", "input": test_row["input"], "split": "train"}) + "\n")
    res = CliRunner().invoke(_app(), ["eval", str(setup["recipe"]), "--run-dir", str(run2), "--skip-forgetting"])
    assert res.exit_code == 2, res.output
    assert "refusing to report task metrics" in res.output
    assert not (run2 / "eval" / "task.json").exists()


def test_compare_real_runs(setup, tmp_path):
    ev = setup["run"] / "eval"
    if not (ev / "task.json").exists():
        pytest.skip("needs the real run first")
    other = tmp_path / "b"
    shutil.copytree(setup["run"], other)
    res = CliRunner().invoke(_app(), ["compare", str(setup["run"]), str(other), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(data["table"]) == 2 and data["runs"][1]["vs_first"]["delta"] == 0.0
    assert (tmp_path / "cmp" / "compare.svg").read_text().startswith("<svg")
    assert "accuracy" in (tmp_path / "cmp" / "compare.md").read_text()


class _LogprobServer:
    """A /v1/completions endpoint on 127.0.0.1 that scores prompts with a real local model
    (`echo` + `logprobs`, as vLLM answers lm-eval's loglikelihood requests)."""

    def __init__(self, model_dir: Path):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.requests = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompts = body["prompt"]
                if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
                    prompts = [prompts]
                with lock:
                    outer.requests += 1
                    choices = [outer.score(p, i) for i, p in enumerate(prompts)]
                data = json.dumps({"object": "text_completion", "model": body["model"], "choices": choices}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def score(self, prompt, index: int) -> dict:
        import torch

        ids = self.tok(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        with torch.no_grad():
            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
        nxt = int(logp[-1].argmax())
        token_lp = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))] + [float(logp[-1, nxt])]
        all_ids = ids + [nxt]
        top = [None] + [{self.tok.decode([int(logp[i - 1].argmax())]): float(logp[i - 1].max())}
                        for i in range(1, len(all_ids))]
        return {"index": index, "text": self.tok.decode([nxt]), "finish_reason": "length",
                "logprobs": {"tokens": [self.tok.decode([t]) for t in all_ids], "token_logprobs": token_lp,
                             "top_logprobs": top}}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_forgetting_eval_through_endpoint_matches_local(setup, tmp_path):
    """lm-eval's `local-completions` against an OpenAI-compatible endpoint serving the same weights
    scores every question as the local `hf` run does; an endpoint without prompt logprobs is named
    in a clear note, the forgetting eval is not run, and the gate says not measured (exit 4)."""
    from stepwise.evals.benchmarks import prepare_tasks
    from stepwise.evals.forgetting import EndpointLogprobsError, evaluate_model, probe_endpoint_logprobs
    from stepwise.evals.modelref import resolve_model

    from stepwise.models import resolve_model_dir

    base_dir = resolve_model_dir("smollm2-135m-instruct")
    tasks = prepare_tasks(["arc_easy"], 4, 0, tmp_path / "f")
    srv = _LogprobServer(base_dir)
    try:
        endpoint = resolve_model(f"openai:smollm2@{srv.base_url}")
        probe_endpoint_logprobs(endpoint)
        remote = evaluate_model(endpoint, tasks, tmp_path / "f" / "tasks", batch_size=4, device="cpu",
                                tokenizer=base_dir, log=lambda m: None)
        local = evaluate_model(resolve_model("smollm2-135m-instruct"), tasks, tmp_path / "f" / "tasks",
                               batch_size=4, device="cpu", log=lambda m: None)
        assert srv.requests > 1
    finally:
        srv.stop()
    assert remote["arc_easy"]["n"] == local["arc_easy"]["n"] == 4
    assert remote["arc_easy"]["items"] == local["arc_easy"]["items"]
    assert remote["arc_easy"]["cached"] is False

    from stepwise.testing.openai_stub import OpenAIStub

    with OpenAIStub() as chat_only:  # chat completions only: no prompt logprobs
        with pytest.raises(EndpointLogprobsError, match="cannot give prompt logprobs"):
            probe_endpoint_logprobs(resolve_model(f"openai:m@{chat_only.base_url}"))
        run2 = tmp_path / "endpoint-run"
        shutil.copytree(setup["run"], run2, ignore=shutil.ignore_patterns("eval"))
        res = CliRunner().invoke(_app(), ["eval", str(setup["recipe"]), "--run-dir", str(run2), "--skip-task",
                                          "--model", f"openai:m@{chat_only.base_url}"])
    assert res.exit_code == 4, res.output  # configured but not measured: never a silent pass
    assert "forgetting eval NOT run" in res.output and "cannot give prompt logprobs" in res.output
    assert "forgetting gate NOT MEASURED" in res.output
