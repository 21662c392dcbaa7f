"""Integration: contract responses.jsonl -> curate -> export, files, manifest, CLI exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from stepwise.curation.curate import run_curate
from stepwise.curation.export import run_export
from stepwise.curation.fixtures import response_row, simulated_responses, write_responses
from typer.testing import CliRunner

from stepwise.cli import app
from stepwise.io import read_jsonl
from stepwise.recipe import load_recipe
from stepwise.rundir import create_run

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def _example(tmp_path: Path, name: str, extra: str = "") -> Path:
    dst = tmp_path / name
    shutil.copytree(REPO / "examples" / name, dst, ignore=shutil.ignore_patterns("runs"))
    recipe = dst / "recipe.yaml"
    # these tests curate simulated teacher answers (curation.fixtures), whose gold mismatches the
    # example's recorded rationalizations do not cover: they check the drop path (rationalize:
    # tests/test_rationalize.py)
    recipe.write_text(recipe.read_text().replace("on_gold_mismatch: rationalize", "on_gold_mismatch: drop"))
    if extra:
        recipe.write_text(recipe.read_text() + extra)
    test_file = dst / "data" / "test.jsonl"
    if test_file.exists():
        # number the test rows per file, as many datasets ship them (b77-t0000 in both files), so
        # curation's id namespacing (test:<id>, with its warning) is exercised on real data
        rows = [json.loads(line) for line in test_file.read_text().splitlines() if line.strip()]
        test_file.write_text("".join(json.dumps({**r, "id": f"b77-t{i:04d}"}) + "\n" for i, r in enumerate(rows)))
    return recipe


def _counter(msgs):
    return sum(len(m["content"]) for m in msgs) // 4 + 10


def test_support_tickets_curate_and_export(tmp_path):
    recipe = load_recipe(_example(tmp_path, "support-tickets"))
    run = create_run(recipe, tmp_path / "run")
    rows = simulated_responses(recipe, wrong_share=0.1, seed=1)
    rows[0] = response_row(rows[0]["id"], rows[0]["input"], None, None, parse_status="not_run", gold=rows[0]["gold"])
    rows[1]["input"] = dict(rows[2]["input"])  # an exact duplicate
    write_responses(run.path, rows)
    with pytest.warns(UserWarning, match="reuses"):
        report = run_curate(recipe, run)

    cur = run.path / "curate"
    train, val, test = (read_jsonl(cur / f"{s}.jsonl") for s in ("train", "val", "test"))
    rejected = read_jsonl(cur / "rejected.jsonl")
    funnel = json.loads((cur / "funnel.json").read_text())
    assert funnel == report
    assert len(train) + len(val) + len(rejected) == len(rows)  # test comes from data.test_file
    assert len(test) == 90 and all(set(r) >= {"id", "input", "gold"} and "rationale" not in r for r in test)
    # the example's test file numbers its ids like the inputs: they are namespaced, never shared
    assert test[0]["id"].startswith("test:") and not {r["id"] for r in test} & {r["id"] for r in rows}
    assert {r["reason"] for r in rejected} >= {"not_run", "disagrees_with_gold", "exact_duplicate"}
    assert all(set(r) >= {"reason", "step", "detail", "collided_with"} for r in rejected)
    dup = next(r for r in rejected if r["reason"] == "exact_duplicate")
    assert dup["collided_with"] in {rows[1]["id"], rows[2]["id"]}
    assert all(set(r) >= {"split", "dedup_cluster", "dedup_cluster_size", "checks"} for r in train + val)
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    test_texts = {r["input"]["text"] for r in test}
    assert not any(r["input"]["text"] in test_texts for r in train + val)  # never train on test
    assert report["teacher_accuracy"]["rows_with_gold"] > 0
    steps = [s["step"] for s in funnel["steps"]]
    assert steps[0] == "validate" and "decontaminate" in steps and "balance" in steps
    manifest = json.loads(run.manifest_path.read_text())
    st = manifest["stages"]["curate"]
    assert st["status"] == "done" and st["counts"]["train"] == len(train) and st["funnel"][0]["step"] == "validate"

    summary = run_export(recipe, run, counter=_counter)
    exp = run.path / "export"
    chat, lineage = read_jsonl(exp / "train.chat.jsonl"), read_jsonl(exp / "train.lineage.jsonl")
    assert len(chat) == len(lineage) == 2 * len(train)  # multitask: label + rationale per row
    assert all(set(c) == {"messages"} for c in chat)
    assert chat[0]["messages"][0] == {"role": "system", "content": recipe.task.system_prompt.strip()}
    assert {x["kind"] for x in lineage} == {"label", "rationale"}
    assert lineage[0]["id"] == train[0]["id"]
    assert summary["overlong"] == 0 and summary["max_tokens"] > 0


def test_overlong_rows_reported_not_truncated(tmp_path):
    recipe = load_recipe(_example(tmp_path, "support-tickets"))
    recipe.training.sequence_len = 64
    recipe.training.dss_output = "cot"
    run = create_run(recipe, tmp_path / "run")
    write_responses(run.path, simulated_responses(recipe, limit=40))
    run_curate(recipe, run)
    summary = run_export(recipe, run, counter=lambda m: 100 if "card" in m[1]["content"].split("Input:")[-1].lower() else 20)
    over = read_jsonl(run.path / "export" / "overlong.jsonl")
    assert summary["overlong"] == len(over) > 0 and over[0]["tokens"] == 100
    kept = read_jsonl(run.path / "export" / "train.lineage.jsonl") + read_jsonl(run.path / "export" / "val.lineage.jsonl")
    assert not {o["id"] for o in over} & {k["id"] for k in kept}
    assert {k["kind"] for k in kept} == {"cot"}


def test_export_reads_review_when_done_and_general_rows(tmp_path):
    recipe = load_recipe(_example(tmp_path, "support-tickets"))
    run = create_run(recipe, tmp_path / "run")
    write_responses(run.path, simulated_responses(recipe, limit=30))
    run_curate(recipe, run)
    train = read_jsonl(run.path / "curate" / "train.jsonl")[:3]
    general = {"id": "general:x:1", "general": {"file": "x", "line": 1}, "split": "train", "input": None,
               "label": None, "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    reviewed = run.path / "review" / "reviewed.jsonl"
    reviewed.parent.mkdir()
    reviewed.write_text("".join(json.dumps(r) + "\n" for r in [*train, general]))
    with run.stage("review", inputs=[]) as st:
        st.outputs(reviewed)
    run_export(recipe, run, counter=_counter)
    lineage = read_jsonl(run.path / "export" / "train.lineage.jsonl")
    assert [x["id"] for x in lineage][-1] == "general:x:1" and lineage[-1]["kind"] == "general"
    assert len(lineage) == 2 * 3 + 1


def test_nl2dsl_split_test_and_general_mix(tmp_path):
    mix = SHARED / "general" / "gsm8k_train"
    recipe = load_recipe(_example(tmp_path, "nl2dsl"))
    recipe.curation.general_mix = type(recipe.curation).model_fields["general_mix"].annotation.__args__[0](
        file=str(mix), fraction=0.1)
    run = create_run(recipe, tmp_path / "run")
    rows = simulated_responses(recipe)
    write_responses(run.path, rows)
    report = run_curate(recipe, run)
    cur = run.path / "curate"
    train, val, test, rejected = (read_jsonl(cur / f"{s}.jsonl") for s in ("train", "val", "test", "rejected"))
    general = [r for r in train if r.get("general")]
    assert len(train) - len(general) + len(val) + len(test) + len(rejected) == len(rows)
    assert report["test_source"] == "split" and len(test) > 0
    assert not {r["id"] for r in test} & {r["id"] for r in train + val}
    assert {r["reason"] for r in rejected} == {"invalid_dsl"}  # bare/nonstandard gold bodies
    assert all(r["detail"].startswith("$") for r in rejected)
    assert report["general_mix"]["in_domain_benchmarks"] == ["gsm8k"] and general
    assert abs(len(general) / len(train) - 0.1) < 0.03


def test_cli_curate_and_bad_data_exit_2(tmp_path):
    recipe_path = _example(tmp_path, "support-tickets")
    recipe = load_recipe(recipe_path)
    run = create_run(recipe, tmp_path / "run")
    write_responses(run.path, simulated_responses(recipe, limit=30))
    runner = CliRunner()
    res = runner.invoke(app, ["curate", str(recipe_path), "--run-dir", str(run.path)])
    assert res.exit_code == 0, res.output
    assert "curation funnel" in res.output and "dedup_near" in res.output
    (run.path / "generate" / "responses.jsonl").write_text('{"id": "a", "input": {"text": "x"}}\n')
    res = runner.invoke(app, ["curate", str(recipe_path), "--run-dir", str(run.path)])
    assert res.exit_code == 2
    assert "responses.jsonl:1" in res.output and "parse_status" in res.output
    res = runner.invoke(app, ["export", str(recipe_path), "--run-dir", str(tmp_path / "nope")])
    assert res.exit_code == 2


@pytest.mark.slow
def test_export_with_student_tokenizer(tmp_path):
    from stepwise.curation.export import student_token_counter

    recipe = load_recipe(_example(tmp_path, "support-tickets"))
    count, name = student_token_counter(recipe)
    if name == "estimate":
        pytest.skip("student tokenizer not available offline")
    n = count([{"role": "user", "content": "hello there"}])
    assert 3 < n < 40


def test_weak_teacher_stops_curate_naming_the_step_and_the_agreement(tmp_path):
    """A teacher that agrees with gold on a handful of rows stops curate (exit 3, resumable) with
    the reason, instead of `done, train 3` and a batch-size complaint two stages later."""
    from stepwise.curation.curate import TooFewTrainRows

    from stepwise.pipeline import RunOptions, run_pipeline

    recipe_path = _example(tmp_path, "support-tickets")
    recipe = load_recipe(recipe_path)
    assert recipe.curation.min_train_rows == 20  # the documented default
    run = create_run(recipe, tmp_path / "run")
    rows = simulated_responses(recipe, wrong_share=0.9, seed=3, limit=40)
    agree = sum(r["label"] == r["gold"] for r in rows)
    write_responses(run.path, rows)
    with pytest.warns(UserWarning, match="reuses"), pytest.raises(TooFewTrainRows) as exc:
        run_curate(recipe, run)
    msg = str(exc.value)
    assert "(curation.min_train_rows is 20)" in msg
    assert "step 'validate' removed most" in msg and "disagrees_with_gold" in msg
    assert f"the teacher agreed with gold on {agree} of 40 parsed rows" in msg
    st = json.loads((run.path / "manifest.json").read_text())["stages"]["curate"]
    assert st["status"] == "stopped" and st["stopped_reason"] == msg
    assert (run.path / "curate" / "funnel.json").exists() and (run.path / "curate" / "rejected.jsonl").exists()

    # the pipeline stops there with exit 3; a second run curates again instead of skipping
    for _ in range(2):
        summary = run_pipeline(recipe, run, RunOptions(from_stage="curate", until_stage="export", progress=False))
        statuses = {o.stage: o.status for o in summary.outcomes}
        assert summary.exit_code == 3 and statuses["curate"] == "stopped" and statuses["review"] == "not_run"
        assert "teacher agreed with gold" in next(o.detail for o in summary.outcomes if o.stage == "curate")
    res = CliRunner().invoke(app, ["curate", str(recipe_path), "--run-dir", str(run.path)])
    assert res.exit_code == 3 and "curation funnel" in res.output and "min_train_rows" in res.output

    # a better teacher's responses: the same run continues
    write_responses(run.path, simulated_responses(recipe, limit=40))
    with pytest.warns(UserWarning, match="reuses"):
        summary = run_pipeline(recipe, run, RunOptions(from_stage="curate", until_stage="curate", progress=False))
    assert {o.stage: o.status for o in summary.outcomes}["curate"] == "done" and summary.exit_code == 0
