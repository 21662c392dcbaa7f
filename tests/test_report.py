"""report.html says what the run measured: stage times as `stepwise run` printed them, a replayed
generate called a replay, verdicts over too little data called that, the gate's not-measured and
not-configured verdicts, every note, and a per-class table that folds beyond 20 classes."""

from __future__ import annotations

import json
import re

from stepwise.pipeline import RunOptions, run_pipeline
from stepwise.recipe import load_recipe
from stepwise.report import MAX_CLASS_ROWS, MIN_TRAIN_ROWS, render_report, write_report
from stepwise.rundir import create_run
from stepwise.testing.openai_stub import OpenAIStub
from tests.conftest import CLASSIFICATION_RECIPE
from tests.test_generate import asked, make_rows, setup_recipe


def _row(html: str, stage: str) -> list[str]:
    """The cells of the Stages table's row for `stage`, tags stripped."""
    m = re.search(rf"<tr><td>{stage}</td>(.*?)</tr>", html)
    assert m, stage
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", m.group(1))]


def test_stage_seconds_and_status_are_what_stepwise_run_printed(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(30))
        first = run_pipeline(recipe, run, RunOptions(until_stage="export", progress=False))
        # everything again: generate now replays every response from the teacher cache
        again = run_pipeline(recipe, run, RunOptions(until_stage="export", progress=False, force=True))
    assert again.exit_code == 0, again.outcomes
    html = render_report(recipe, run)
    printed = {o.stage: o for o in again.outcomes}
    for stage in ("generate", "curate", "review", "export"):
        status, seconds, detail = _row(html, stage)
        assert status == printed[stage].status == "done"
        assert seconds.split()[0] == f"{printed[stage].wall_s:.1f}", (stage, seconds)
        assert detail == printed[stage].detail[:300]
        recorded = run.read_manifest()["stages"][stage]["pipeline"]
        assert recorded["wall_s"] == round(printed[stage].wall_s, 3)
    assert f"replayed from cache: {asked(recipe)} responses" in _row(html, "generate")[1]  # 3 held out for test
    assert first.outcomes[0].status == "done"
    # the report stage is running while it writes the page: its row says so, not "running"
    written = write_report(recipe, run).read_text(encoding="utf-8")
    assert _row(written, "report")[0] == "this page"
    assert _row(written, "export")[1].split()[0] == f"{printed['export'].wall_s:.1f}"


def test_skipped_stage_says_so_and_keeps_when_it_ran(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(30))
        first = run_pipeline(recipe, run, RunOptions(until_stage="curate", progress=False))
        run_pipeline(recipe, run, RunOptions(until_stage="curate", progress=False))
    status, seconds, _ = _row(render_report(recipe, run), "curate")
    assert status == "skipped" and seconds.startswith("0.0")
    assert f"took {first.outcomes[1].wall_s:.1f} when it ran" in seconds


def _stub_stages(monkeypatch, package_fails: bool = False):
    """The real report stage, then a package stage that only records itself (nothing trained)."""
    from stepwise import pipeline

    def fake_package(recipe, rd, opts):
        with rd.stage("package"):
            if package_fails:
                raise RuntimeError("no merged model")
        return "packaged (stub)"

    real = {s.name: s for s in pipeline.PIPELINE}
    package = pipeline.Stage("package", real["package"].sections, real["package"].inputs, fake_package)
    monkeypatch.setattr(pipeline, "PIPELINE", [real["report"], package])


def test_report_written_by_a_run_shows_the_package_stage_that_ran_after_it(write_recipe, tmp_path, monkeypatch):
    """report runs before package: the page a `stepwise run` leaves shows package as it ended in
    that run (done, or failed), not `not run` / `pending`."""
    recipe = load_recipe(write_recipe(CLASSIFICATION_RECIPE))
    run = create_run(recipe, tmp_path / "run")
    _stub_stages(monkeypatch)
    summary = run_pipeline(recipe, run, RunOptions(progress=False))
    assert [(o.stage, o.status) for o in summary.outcomes] == [("report", "done"), ("package", "done")]
    status, _, detail = _row(run.layout.report_html.read_text(), "package")
    assert (status, detail) == ("done", "packaged (stub)")
    assert run.read_manifest()["stages"]["report"]["status"] == "done"

    _stub_stages(monkeypatch, package_fails=True)
    summary = run_pipeline(recipe, run, RunOptions(progress=False, force=True))
    assert summary.outcomes[-1].status == "failed" and summary.exit_code == 19
    status, _, detail = _row(run.layout.report_html.read_text(), "package")
    assert status == "failed" and "no merged model" in detail


# -- verdicts -------------------------------------------------------------------------------------


def _run_with(write_recipe, tmp_path, *, train_rows: int, gate: dict | None, forgetting: dict | None = None,
              task: dict | None = None, notes: list[str] | None = None):
    recipe = load_recipe(write_recipe(CLASSIFICATION_RECIPE))
    run = create_run(recipe, tmp_path / "run")

    def put(m):
        m["stages"]["curate"] = {"status": "done", "wall_s": 1.0, "counts": {"train": train_rows}}
        m["stages"]["eval"] = {"status": "done", "wall_s": 1.0, "gate": gate, "notes": notes or []}

    run.update_manifest(put)
    (run.path / "eval").mkdir()
    if forgetting is not None:
        (run.path / "eval" / "forgetting.json").write_text(json.dumps(forgetting))
    if task is not None:
        (run.path / "eval" / "task.json").write_text(json.dumps(task))
    return recipe, run


def _forgetting(n: int) -> dict:
    bench = {"metric": "acc", "n": n, "before": {"value": 0.5}, "after": {"value": 0.5}, "delta": 0.0,
             "abs_change": 0.0, "rel_change": 0.0, "failed": False, "in_domain": False}
    return {"benchmarks": {"mmlu": bench},
            "gate": {"verdict": "passed", "passed": True, "max_drop": 0.05, "failed": [], "mitigations": []}}


def _section(html: str, anchor: str) -> str:
    return re.search(rf'<section id="{anchor}">(.*?)</section>', html, re.S).group(1)


def test_gate_over_a_student_trained_on_one_row_is_not_a_green_pass(write_recipe, tmp_path):
    rep = _forgetting(50)
    recipe, run = _run_with(write_recipe, tmp_path, train_rows=1, gate={**rep["gate"]}, forgetting=rep)
    html = _section(render_report(recipe, run), "forgetting")
    assert '<span class="ok">PASSED</span>' not in html
    assert "too little data to judge" in html and "trained on 1 row" in html and f"&lt; {MIN_TRAIN_ROWS}" in html
    # with enough data the same gate is a pass
    recipe, run = _run_with(write_recipe, tmp_path / "b", train_rows=500, gate={**rep["gate"]}, forgetting=rep)
    assert '<span class="ok">PASSED</span>' in _section(render_report(recipe, run), "forgetting")


def test_gate_over_a_handful_of_questions_is_too_little_data(write_recipe, tmp_path):
    rep = _forgetting(4)
    recipe, run = _run_with(write_recipe, tmp_path, train_rows=500, gate={**rep["gate"]}, forgetting=rep)
    html = _section(render_report(recipe, run), "forgetting")
    assert "too little data to judge" in html and "mmlu scored on 4 questions" in html


def test_not_measured_and_not_configured_verdicts_and_every_note(write_recipe, tmp_path):
    note = "forgetting eval NOT run: the endpoint cannot give prompt logprobs"
    gate = {"verdict": "not_measured", "passed": False, "reason": note}
    recipe, run = _run_with(write_recipe, tmp_path, train_rows=500, gate=gate, notes=[note, "student vs base skipped"])
    html = render_report(recipe, run)
    forg = _section(html, "forgetting")
    assert '<span class="bad">NOT MEASURED</span>' in forg and "cannot give prompt logprobs" in forg
    notes = _section(html, "notes")
    assert note in notes and "student vs base skipped" in notes
    off = {"verdict": "not_configured", "passed": False, "reason": "eval.forgetting.enabled is false"}
    recipe, run = _run_with(write_recipe, tmp_path / "b", train_rows=500, gate=off)
    forg = _section(render_report(recipe, run), "forgetting")
    assert "not configured" in forg and "eval.forgetting.enabled is false" in forg and "PASSED" not in forg


def test_per_class_table_folds_beyond_twenty_classes_worst_first(write_recipe, tmp_path):
    per_class = {f"class_{i:03d}": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3} for i in range(151)}
    per_class["class_077"].update(f1=0.0, precision=0.0, recall=0.0)
    per_class["class_140"].update(f1=0.5)
    task = {"model": "student", "n": 453, "task_type": "classification", "per_class": per_class,
            "headline": {"accuracy": {"value": 0.99, "ci_low": 0.98, "ci_high": 1.0}}}
    recipe, run = _run_with(write_recipe, tmp_path, train_rows=500, gate=None, task=task)
    html = _section(render_report(recipe, run), "task-metrics")
    shown, folded = html.split("<details>")
    assert shown.count("<td>class_") == MAX_CLASS_ROWS and folded.count("<td>class_") == 151 - MAX_CLASS_ROWS
    assert shown.index("class_077") < shown.index("class_140") < shown.index("class_000")  # worst first
    assert "too little data" not in html


def test_student_vs_base_over_few_test_items_says_so(write_recipe, tmp_path):
    comp = {"base": "base", "n_paired": 5, "learned": True, "summary": "the student beats the base",
            "metrics": {"accuracy": {"base": 0.2, "student": 0.8, "delta": 0.6, "delta_ci": [0.2, 1.0],
                                     "verdict": "better"}}}
    task = {"model": "student", "n": 5, "task_type": "classification", "base_comparison": comp,
            "headline": {"accuracy": {"value": 0.8, "ci_low": 0.4, "ci_high": 1.0}}}
    recipe, run = _run_with(write_recipe, tmp_path, train_rows=500, gate=None, task=task)
    html = _section(render_report(recipe, run), "task-metrics")
    assert "too little data to judge" in html and "5 test items" in html
    assert '<span class="ok">the student beats the base' not in html


def test_report_is_rendered_from_packaged_autoescaped_templates(write_recipe, tmp_path):
    """report.html comes from Jinja2 templates shipped as package data, with autoescape on: run data
    that looks like markup (a class name, a note, a model label) is shown as text, never run."""
    import fnmatch
    import tomllib
    from pathlib import Path

    from stepwise import report

    env = report._env()
    assert env.autoescape is True
    root = Path(report.__file__).parent
    globs = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["stepwise"]
    templates = sorted(p.relative_to(root).as_posix() for p in (root / "templates").rglob("*") if p.is_file())
    assert "templates/report/page.html.j2" in templates
    assert all(any(fnmatch.fnmatch(t, g) for g in globs) for t in templates), (templates, globs)
    for name in env.list_templates():  # every template parses
        env.get_template(name)

    evil = "<script>alert(1)</script>"
    per_class = {evil: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}}
    task = {"model": evil, "n": 30, "per_class": per_class, "headline": {"accuracy": {"value": 0.9}}}
    recipe, run = _run_with(write_recipe, tmp_path, train_rows=500, gate=None, task=task, notes=[evil])
    html = render_report(recipe, run)
    assert "<script>" not in html
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert escaped in _section(html, "task-metrics") and escaped in _section(html, "notes")
    assert html.startswith("<!doctype html>") and "<style>body{" in html
