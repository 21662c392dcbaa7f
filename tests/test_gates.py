"""No gate passes on nothing: the forgetting gate's `not_measured` / `not_configured` verdicts,
how `stepwise eval` and `stepwise run` report them, and benchmark names checked at validate time.

lm-eval itself is exercised in tests/test_evals_real.py; here `stepwise.evals.forgetting._run_lm_eval` (our
wrapper around it) stands in, returning scores for only some of the requested benchmarks, the way
lm-eval leaves out a task it could not load. Everything above it is the real code.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from stepwise.evals.forgetting import forgetting_report
from typer.testing import CliRunner

from stepwise.cli import app
from stepwise.recipe import RecipeError, load_recipe
from stepwise.rundir import create_run
from tests.conftest import CLASSIFICATION_RECIPE


def _res(items: list[float], name: str = "mmlu") -> dict:
    return {"benchmark": name, "metric": "acc", "value": sum(items) / len(items) if items else 0.0,
            "items": items, "n": len(items)}


def test_forgetting_report_that_measured_nothing_is_not_a_pass():
    rep = forgetting_report({}, {}, n_boot=0)
    assert rep["gate"]["verdict"] == "not_measured" and rep["gate"]["passed"] is False
    assert rep["gate"]["mitigations"] == []  # nothing dropped: no forgetting advice


def test_benchmark_missing_after_is_not_dropped_silently():
    before = {"mmlu": _res([1, 1, 0, 1]), "arc_easy": _res([1, 0, 1, 1], "arc_easy")}
    after = {"mmlu": _res([1, 1, 0, 1])}
    rep = forgetting_report(before, after, n_boot=0, requested=["mmlu", "arc_easy", "hellaswag"])
    gate = rep["gate"]
    assert gate["verdict"] == "not_measured" and not gate["passed"]
    assert set(gate["not_measured"]) == {"arc_easy", "hellaswag"}
    assert "after" in gate["not_measured"]["arc_easy"] and gate["measured"] == ["mmlu"]
    # a real drop still reads as failed, whatever else is missing
    dropped = forgetting_report(before, {"mmlu": _res([0, 0, 0, 0])}, n_boot=0, requested=["mmlu", "arc_easy"])
    assert dropped["gate"]["verdict"] == "failed" and dropped["gate"]["failed"] == ["mmlu"]
    assert forgetting_report(before, before, n_boot=0)["gate"]["verdict"] == "passed"


# -- through the commands ------------------------------------------------------------------------

EVAL_SECTION = """\
training:
  base_model: {base}
eval:
  task: {{enabled: false}}
  forgetting: {{enabled: {enabled}, benchmarks: [mmlu, arc_easy], subset_size: 3}}
"""


def _fake_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def eval_run(write_recipe, tmp_path, monkeypatch):
    """A recipe + run with a 'trained' student dir; lm-eval answers for mmlu only."""
    import stepwise.evals.forgetting as forgetting

    def write(enabled: bool = True):
        base = _fake_model(tmp_path / "base")
        path = write_recipe(CLASSIFICATION_RECIPE + EVAL_SECTION.format(base=base, enabled=str(enabled).lower()))
        recipe = load_recipe(path)
        run = create_run(recipe, tmp_path / "run")
        _fake_model(run.path / "train" / "lora")
        return path, run

    def only_mmlu(model, tasks, task_dir, **kw):
        return {t.benchmark.name: {**_res([1.0] * t.n, t.benchmark.name), "task": t.benchmark.task, "filter": "none",
                                   "wall_s": 0.1, "model": model.label, "lm_eval": "test", "other_metrics": {}}
                for t in tasks if t.benchmark.name == "mmlu"}

    monkeypatch.setattr(forgetting, "_run_lm_eval", only_mmlu)
    return write


def test_stepwise_eval_exits_4_on_a_benchmark_it_could_not_measure(eval_run):
    path, run = eval_run()
    res = CliRunner().invoke(app, ["eval", str(path), "--run-dir", str(run.path)])
    assert res.exit_code == 4, res.output
    assert "arc_easy" in res.output and "NOT measured" in res.output and "gate NOT MEASURED" in res.output
    gate = json.loads((run.path / "eval" / "forgetting.json").read_text())["gate"]
    assert gate["verdict"] == "not_measured" and list(gate["not_measured"]) == ["arc_easy"]
    recorded = run.read_manifest()["stages"]["eval"]
    assert recorded["gate"]["verdict"] == "not_measured" and not recorded["gate"]["passed"]
    assert any("arc_easy NOT measured" in n for n in recorded["notes"])


def test_stepwise_run_shows_not_measured_and_every_note(eval_run):
    path, run = eval_run()
    args = ["run", str(path), "--run-dir", str(run.path), "--from", "eval", "--until", "eval", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 4, res.output
    assert "not_measured" in res.output and "forgetting gate NOT MEASURED" in res.output
    assert "note (eval): forgetting: arc_easy NOT measured" in res.output
    assert run.read_manifest()["stages"]["eval"]["pipeline"]["status"] == "not_measured"
    # when inputs are unchanged eval is skipped, and the verdict the manifest recorded decides
    from stepwise.pipeline import _gate_passed

    passed, text = _gate_passed(run, load_recipe(path))
    assert not passed and "NOT MEASURED" in text and "arc_easy" in text


def test_stepwise_run_with_forgetting_disabled_says_not_configured(eval_run):
    path, run = eval_run(enabled=False)
    res = CliRunner().invoke(app, ["run", str(path), "--run-dir", str(run.path), "--from", "eval", "--until", "eval",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "forgetting gate not configured" in res.output and "eval.forgetting.enabled is false" in res.output
    gate = run.read_manifest()["stages"]["eval"]["gate"]
    assert gate["verdict"] == "not_configured" and gate["passed"] is False


def test_endpoint_without_logprobs_is_not_measured(write_recipe, tmp_path):
    """A student served without prompt logprobs: the forgetting eval cannot run, so exit 4."""
    from stepwise.testing.openai_stub import OpenAIStub

    base = _fake_model(tmp_path / "base")
    path = write_recipe(CLASSIFICATION_RECIPE + EVAL_SECTION.format(base=base, enabled="true"))
    run = create_run(load_recipe(path), tmp_path / "run")
    with OpenAIStub() as chat_only:
        res = CliRunner().invoke(app, ["eval", str(path), "--run-dir", str(run.path),
                                       "--model", f"openai:m@{chat_only.base_url}"])
    assert res.exit_code == 4, res.output
    assert "forgetting eval NOT run" in res.output and "NOT MEASURED" in res.output
    assert "eval.forgetting.enabled: false" in res.output  # says how to opt out explicitly


# -- benchmark names at validate time --------------------------------------------------------------


@pytest.mark.parametrize("section,loc,typo,close", [
    ("curation:\n  contamination: {benchmarks: [mmlu, arc_esay]}\n", "curation.contamination.benchmarks[1]",
     "arc_esay", "arc_easy"),
    ("eval:\n  forgetting: {benchmarks: [mmlu, helaswag]}\n", "eval.forgetting.benchmarks[1]", "helaswag",
     "hellaswag"),
])
def test_benchmark_typo_exits_2_with_did_you_mean(write_recipe, section, loc, typo, close):
    path = write_recipe(CLASSIFICATION_RECIPE + section)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert loc in msg and typo in msg and f"did you mean '{close}'" in msg
    assert f"{path}:" in msg  # file and line
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and f"did you mean '{close}'" in res.output


def test_benchmark_names_and_aliases_accepted(write_recipe):
    text = CLASSIFICATION_RECIPE + textwrap.dedent("""\
        curation:
          contamination: {benchmarks: [mmlu, truthfulqa_mc, gsm8k]}
        eval:
          forgetting: {benchmarks: [arc_challenge, truthfulqa_mc1]}
        """)
    recipe = load_recipe(write_recipe(text))
    assert recipe.curation.contamination.benchmarks == ["mmlu", "truthfulqa_mc", "gsm8k"]
    assert recipe.eval.forgetting.benchmarks == ["arc_challenge", "truthfulqa_mc1"]


def test_contamination_reads_a_benchmark_named_as_the_forgetting_eval_names_it():
    """`truthfulqa_mc1` (the forgetting name) passes validate, so decontamination must find its
    texts (folder `truthfulqa_mc`) rather than warn and check nothing."""
    import warnings

    from stepwise.curation.contamination import benchmark_reference

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old code warned "not found ... not checked"
        ref = benchmark_reference("truthfulqa_mc1")
    assert ref is not None and len(ref.texts) > 100 and ref.source.endswith("truthfulqa_mc")
