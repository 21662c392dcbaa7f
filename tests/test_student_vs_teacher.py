"""Student vs teacher (stepwise.evals.teacher_compare): the teacher is scored on the test items from
its response cache with zero new requests, asked through the executor (and its latency measured)
only for prompts not cached, skipped by `--no-teacher`; the break-even arithmetic on fixed numbers;
the report opens with the table. Teacher and student are OpenAI-compatible stubs on loopback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from stepwise.evals.runner import run_eval
from stepwise.evals.teacher_compare import (
    TeacherNotScored,
    break_even,
    hardware_cost_per_1k,
    latency_stats,
    price_cost_per_1k,
    score_teacher,
)
from stepwise.pipelines.generate import run_generate

from stepwise.io import read_jsonl
from stepwise.report import render_report
from stepwise.testing.openai_stub import OpenAIStub
from tests.test_generate import make_rows, setup_recipe


def test_break_even_arithmetic_on_a_fixed_example():
    # $6 of teacher data + $4 of training, teacher $2.00 / 1k, student $0.50 / 1k: $0.0015 saved per request
    be = break_even(10.0, 2.0, 0.5)
    assert be["saving_per_request_usd"] == pytest.approx(0.0015)
    assert be["requests"] == 6667 and be["text"] == "6,667 requests"  # ceil(10 / 0.0015)
    assert break_even(0.0, 2.0, 0.5)["requests"] == 0  # nothing spent up front: pays off at once
    never = break_even(10.0, 0.5, 0.5)  # no saving
    assert never["requests"] is None and never["text"].startswith("never")
    free = break_even(10.0, 0.0, 0.1)  # a teacher priced at 0
    assert free["requests"] is None and "priced at 0" in free["text"]
    assert break_even(10.0, None, 0.1)["text"].startswith("unknown")
    # 0.36 s per request at $1/h = $0.10 per 1k; 500 in + 100 out tokens at $1 / $2 per 1K = $0.70 per request
    assert hardware_cost_per_1k(0.36, 1.0) == pytest.approx(0.1)
    assert price_cost_per_1k(1.0, 2.0, 500, 100) == pytest.approx(700.0)
    lat = latency_stats([1.0, 1.0, 2.0, 4.0], batch_size=1, output_tokens=80, wall_s=8.0)
    assert lat["p50_s"] == 1.5 and lat["s_per_request"] == 2.0 and lat["tokens_per_s"] == 10.0


def _test_rows(rows: list[dict]) -> list[dict]:
    return [{"id": f"test:{r['id']}", "input": {"text": r["text"]}, "gold": r["label"]} for r in rows]


def _write_test_split(run, rows: list[dict]) -> None:
    path = run.layout.curated("test")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in _test_rows(rows)), encoding="utf-8")


def _eval_recipe(tmp_path: Path, recipe_path: Path, student_url: str) -> None:
    """Task eval only (no forgetting, no base), bootstrap small; the student is an endpoint."""
    text = recipe_path.read_text()
    text += ("eval:\n  task: {bootstrap: 100, concurrency: 2, compare_base: false}\n"
             "  forgetting: {enabled: false}\n  student_cost_per_hour: 2.0\n")
    recipe_path.write_text(text)


def test_teacher_scored_from_the_cache_with_zero_new_requests(tmp_path):
    from stepwise.recipe import load_recipe

    rows = make_rows(8)
    with OpenAIStub() as teacher, OpenAIStub() as student_stub:
        recipe, run = setup_recipe(tmp_path, teacher, rows)
        run_generate(recipe, run, progress=False)  # every test prompt below was asked here
        asked = len(teacher.log)
        assert asked == 8
        _eval_recipe(tmp_path, recipe.source_path, student_stub.base_url)
        recipe = load_recipe(recipe.source_path)
        _write_test_split(run, rows[:6])
        outcome = run_eval(recipe, run, model=f"openai:stub-student@{student_stub.base_url}", skip_forgetting=True,
                           log=lambda *a, **k: None)
        assert len(teacher.log) == asked  # zero new teacher requests
        assert len(student_stub.log) == 6
    table = json.loads(run.layout.student_vs_teacher.read_text())
    assert table == outcome.student_vs_teacher
    roles = [m["role"] for m in table["models"]]
    assert roles == ["teacher", "student"]
    t = table["models"][0]
    assert t["requests"] == {"cached": 6, "asked": 0}
    assert t["latency"] == {"measured": False, "note": "cached, latency not measured", "batched": None,
                            "batch1": None}
    # the stub teacher answers every row right; scored from its generation answers, paired with the student
    assert t["metrics"]["accuracy"]["value"] == 1.0 and t["n"] == 6
    assert t["vs_student"]["accuracy"]["delta"] == pytest.approx(
        table["models"][1]["metrics"]["accuracy"]["value"] - 1.0)
    preds = read_jsonl(run.layout.teacher_predictions)
    assert [p["id"] for p in preds] == [r["id"] for r in _test_rows(rows[:6])]
    # priced teacher ($1 / $2 per 1K tokens): cost per 1k requests = tokens the cache recorded x price
    entries = [e for e in read_jsonl(run.layout.responses) if e["id"] in {r["id"] for r in rows[:6]}]
    itok = sum(e["usage"]["input_tokens"] for e in entries) / 6
    otok = sum(e["usage"]["output_tokens"] for e in entries) / 6
    assert t["cost_per_1k"] == pytest.approx(1000 * (itok * 1.0 + otok * 2.0) / 1000)
    # the student: an endpoint timed per request; cost = measured s/request x $2/h
    s = table["models"][1]
    assert s["latency"]["measured"] and s["latency"]["batched"]["n"] == 6
    assert s["cost_per_1k"] == pytest.approx(1000 * s["latency"]["batched"]["s_per_request"] / 3600 * 2.0)
    assert table["break_even"]["requests"] is not None  # a priced teacher, a near-free stub student


def test_teacher_asked_for_uncached_prompts_offline_refused_and_no_teacher_skips(tmp_path):
    from stepwise.recipe import load_recipe

    rows = make_rows(4)
    with OpenAIStub() as teacher, OpenAIStub() as student_stub:
        recipe, run = setup_recipe(tmp_path, teacher, rows)
        _eval_recipe(tmp_path, recipe.source_path, student_stub.base_url)
        recipe = load_recipe(recipe.source_path)
        test = _test_rows(make_rows(3, prefix="new"))
        report = {"task_type": "classification", "model": "s"}
        preds = [{"id": r["id"], "gold": r["gold"], "pred": r["gold"], "correct": 1.0} for r in test]
        with pytest.raises(TeacherNotScored, match="3 of 3 teacher answers .* --offline"):
            score_teacher(recipe, test, report, preds, offline=True)
        assert teacher.log == []
        t_report, _, info, comparison = score_teacher(recipe, test, report, preds)
        assert len(teacher.log) == 3 and info["asked"] == 3 and info["cached"] == 0
        assert len(info["timings"]) == 3 and all(x > 0 for x in info["timings"])
        assert comparison["metrics"]["accuracy"]["delta"] == pytest.approx(1.0 - t_report["metrics"]["accuracy"]["value"])
        # asked again: all cached now
        _, _, info, _ = score_teacher(recipe, test, report, preds)
        assert len(teacher.log) == 3 and info == {**info, "asked": 0, "cached": 3}
        # --no-teacher: no teacher request, no teacher row, and a note says why
        _write_test_split(run, make_rows(3, prefix="other"))
        outcome = run_eval(recipe, run, model=f"openai:stub-student@{student_stub.base_url}", skip_forgetting=True,
                           compare_teacher=False, log=lambda *a, **k: None)
        assert len(teacher.log) == 3
    assert [m["role"] for m in outcome.student_vs_teacher["models"]] == ["student"]
    assert any("teacher not scored: --no-teacher" in n for n in outcome.notes)
    assert outcome.student_vs_teacher["break_even"]["text"] == "unknown: the teacher was not scored"


def test_report_opens_with_the_student_vs_teacher_table_and_plot(tmp_path):
    from stepwise.recipe import load_recipe

    rows = make_rows(6)
    with OpenAIStub() as teacher, OpenAIStub() as student_stub:
        recipe, run = setup_recipe(tmp_path, teacher, rows)
        run_generate(recipe, run, progress=False)
        _eval_recipe(tmp_path, recipe.source_path, student_stub.base_url)
        recipe = load_recipe(recipe.source_path)
        _write_test_split(run, rows)
        run_eval(recipe, run, model=f"openai:stub-student@{student_stub.base_url}", skip_forgetting=True,
                 log=lambda *a, **k: None)
    html = render_report(recipe, run)
    sections = re.findall(r"<section id=\"([^\"]+)\"><h2>", html)
    assert sections[0] == "student-vs-teacher"
    first = html[html.index('<section id="student-vs-teacher">'):html.index("</section>")]
    assert "<td>stub-teacher</td><td>teacher</td>" in first and "<td>student</td>" in first
    assert "cached, latency not measured" in first and "Break-even: <strong>" in first
    assert "<svg" in first and "cost per 1,000 requests" in first
    # `stepwise compare` carries each run's student vs teacher
    from stepwise.evals.compare import compare_runs

    table = json.loads(run.layout.student_vs_teacher.read_text())
    result = compare_runs([run.path, run.path])
    cells = dict(zip(result["columns"], result["table"][1], strict=True))
    teacher = table["models"][0]
    assert cells["teacher accuracy"].startswith(f"{100 * teacher['metrics']['accuracy']['value']:.1f}")
    assert cells["teacher $/1k req"] == f"${teacher['cost_per_1k']:.4f}"
    assert cells["break-even"] == table["break_even"]["text"]


def test_estimate_counts_the_teacher_eval_requests(tmp_path):
    from stepwise.pipelines.estimate import estimate_run

    from stepwise.recipe import load_recipe

    rows = make_rows(4)
    test = [{"id": f"t{i}", "text": r["text"], "label": r["label"]} for i, r in enumerate(rows[:2])]
    test += [{"id": "t9", "text": "a brand new question about billing", "label": "billing"}]
    with OpenAIStub() as teacher:
        recipe, run = setup_recipe(tmp_path, teacher, rows)
        run_generate(recipe, run, progress=False)  # caches the answers to the first two test prompts
        (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
        text = recipe.source_path.read_text().replace("  label_field: label\n",
                                                        "  label_field: label\n  test_file: test.jsonl\n")
        recipe.source_path.write_text(text)
        recipe = load_recipe(recipe.source_path)
        est = estimate_run(recipe)
        assert est["teacher eval requests (test rows)"].startswith("3 (2 cached")
        assert float(est["teacher eval cost, still to pay"].split()[0][1:]) > 0  # one priced request to go
        recipe.source_path.write_text(text + "eval:\n  task: {compare_teacher: false}\n")
        assert estimate_run(load_recipe(recipe.source_path))["teacher eval requests (test rows)"] == "none"
        assert len(teacher.log) == 4  # estimating asks nothing


def test_a_free_local_teacher_is_costed_by_its_measured_hardware_time_or_not_at_all():
    from stepwise.evals.teacher_compare import teacher_entry

    from stepwise.recipe import load_recipe
    from tests.conftest import REPO

    example = load_recipe(REPO / "examples" / "support-tickets" / "recipe.yaml")  # a local teacher, price 0
    assert example.teacher.price.input_per_1k == example.teacher.price.output_per_1k == 0
    # transformers answers in batches of teacher.batch_size; llama.cpp one request at a time (below)
    recipe = example.model_copy(update={"teacher": example.teacher.model_copy(
        update={"provider": "transformers", "batch_size": 8})})
    report = {"n": 4, "headline": {"accuracy": {"value": 0.5, "ci_low": 0.0, "ci_high": 1.0}}}
    asked = {"cached": 0, "asked": 4, "timings": [3.6] * 4, "elapsed_s": 7.2, "output_tokens_asked": 360,
             "tokens": (300.0, 90.0)}  # two batches of 2 (batch_size 8 in the recipe; times as measured)
    t = teacher_entry(recipe, report, asked, cost_per_hour=2.0)
    assert t["latency"]["measured"] and t["latency"]["batched"]["s_per_request"] == pytest.approx(1.8)
    assert t["latency"]["batched"]["tokens_per_s"] == pytest.approx(50.0)
    assert t["cost_per_1k"] == pytest.approx(1000 * 1.8 / 3600 * 2.0) and "local teacher" in t["cost_basis"]
    llama = example.model_copy(update={"teacher": example.teacher.model_copy(update={"provider": "llamacpp"})})
    one = teacher_entry(llama, report, {**asked, "timings": [1.8] * 4}, cost_per_hour=2.0)
    assert one["latency"]["batched"] is None and one["latency"]["batch1"]["s_per_request"] == pytest.approx(1.8)
    assert one["cost_per_1k"] == pytest.approx(1000 * 1.8 / 3600 * 2.0)
    cached = teacher_entry(recipe, report, {**asked, "cached": 4, "asked": 0, "timings": []}, cost_per_hour=2.0)
    assert cached["cost_per_1k"] == 0.0 and "not measured" in cached["cost_basis"]
    assert cached["latency"] == {"measured": False, "note": "cached, latency not measured", "batched": None,
                                 "batch1": None}


def test_a_gguf_students_latency_is_labelled_as_measured_one_request_at_a_time(monkeypatch, tmp_path):
    """llama.cpp answers one request at a time (stepwise.evals.gguf_generate): the eval pass of a
    GGUF student is not a batch of eval.task.batch_size, so the table never labels it `(x8)`; the
    batched column says why it is empty, and the pass's sequential times are the ones costed."""
    from stepwise.evals import gguf_generate
    from stepwise.evals.modelref import ModelRef
    from stepwise.evals.teacher_compare import local_model_entry, markdown, table_rows

    class FakeLlm:  # one completion per call, as llama.cpp answers
        def create_completion(self, tokens, **kw):
            return {"choices": [{"text": "<answer>billing</answer>"}], "usage": {"completion_tokens": 4}}

    class FakeBackend:
        def __init__(self, path, n_ctx=4096, n_threads=None):
            self.n_threads, self._llm = 2, FakeLlm()

        def load(self):
            pass

        def prompt_tokens(self, messages):
            return list(range(len(str(messages)) % 50 + 5))

        def close(self):
            pass

    monkeypatch.setattr("stepwise.pipelines.llamacpp_llm.LlamaCppTeacher", FakeBackend)
    gguf = tmp_path / "student.gguf"
    gguf.write_bytes(b"GGUF")
    model = ModelRef("gguf", "student.gguf", path=gguf)
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    gen = gguf_generate.generate_gguf(model, prompts, max_new_tokens=8)
    report = {"model": "student.gguf", "n": 5, "headline": {"accuracy": {"value": 0.6, "ci_low": 0.2, "ci_high": 0.9}},
              "generation": {"wall_s": gen.wall_s, "output_tokens": gen.output_tokens, **gen.info}}
    entry = local_model_entry("student", report, None, 1.0, batch_size=8)  # eval.task.batch_size 8
    lat = entry["latency"]
    assert lat["batched"] is None and "one request at a time" in lat["batched_note"]
    assert lat["batch1"]["batch_size"] == 1 and lat["batch1"]["n"] == 5  # the eval pass, measured sequentially
    assert entry["cost_per_1k"] == pytest.approx(1000 * lat["batch1"]["s_per_request"] / 3600)
    table = {"main_metric": "accuracy", "models": [entry], "break_even": {"text": "never"}}
    columns, rows = table_rows(table)
    cells = dict(zip(columns, rows[0], strict=True))
    assert cells["latency p50 / p95 s (batched)"] == "n/a (llama.cpp answers one request at a time)"
    assert "(x" not in markdown(table) and cells["latency p50 / p95 s (batch 1)"] != "-"
