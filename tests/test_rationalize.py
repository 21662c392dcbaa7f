"""Rationalization (issue 16 item 1): a row whose teacher label contradicts its gold label is asked
again with the gold answer as a hint, through the same cache, ledger and constraint, and its new
rationale is checked like any other. The teacher is the OpenAI-compatible stub on 127.0.0.1, which
honours a JSON-schema enum on the answer as a constrained server does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stepwise.curation.curate import run_curate
from stepwise.curation.rationalization import owed_rationalizations
from stepwise.curation.validate import validate_step
from stepwise.pipelines.cache import ResponseCache
from stepwise.pipelines.generate import cache_path, run_generate
from stepwise.pipelines.rationalize import RationalizeError

from stepwise.io import read_jsonl
from stepwise.recipe import RecipeError, load_recipe
from stepwise.rundir import create_run
from stepwise.testing.openai_stub import OpenAIStub

RECIPE = """\
name: rat
task:
  name: tickets
  classes: [billing, technical, general]
  instructions: Classify the ticket.
data:
  inputs: inputs.jsonl
  id_field: id
  label_field: {label_field}
teacher:
  provider: openai
  model: stub-teacher
  base_url: {base_url}
  concurrency: 2
  max_retries: 1
  max_attempts: 2
  timeout_s: 2
  price: {{input_per_1k: 1.0, output_per_1k: 2.0}}
curation:
  on_gold_mismatch: {mode}
  min_train_rows: 0
  split: {{train: 0.8, val: 0.2, test: 0.0}}
  contamination: {{benchmarks: []}}
"""

# The stub answers the label sharing most words with the input: these four are answered `billing`
# although their gold label is `technical`; the other rows agree with gold.
MISMATCH = [f"bad{i}" for i in range(4)]


def _rows() -> list[dict]:
    rows = [{"id": f"ok{i}", "text": f"ok{i} a question about billing", "label": "billing"} for i in range(6)]
    rows += [{"id": rid, "text": f"{rid} my billing page shows an error", "label": "technical"} for rid in MISMATCH]
    return rows


def _setup(tmp_path: Path, stub: OpenAIStub, mode: str = "rationalize", label_field: str = "label"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(base_url=stub.base_url, mode=mode, label_field=label_field))
    recipe = load_recipe(path)
    return recipe, create_run(recipe, tmp_path / "run")


def _curated(run) -> dict[str, dict]:
    return {r["id"]: r for s in ("train", "val") for r in read_jsonl(run.layout.curated(s))}


def test_gold_mismatch_row_is_rationalized_with_the_hint_and_the_answer_constrained(tmp_path: Path) -> None:
    with OpenAIStub() as stub:
        recipe, run = _setup(tmp_path, stub)
        run_generate(recipe, run, progress=False)
        generated = {r["id"]: r for r in read_jsonl(run.layout.responses)}
        assert all(generated[rid]["label"] == "billing" for rid in MISMATCH)  # the teacher's wrong answer
        before = len(stub.log)
        funnel = run_curate(recipe, run)
        asked = stub.log[before:]

    # one request per mismatch row, with the gold answer as a hint and the answer constrained to it
    assert len(asked) == len(MISMATCH)
    for entry in asked:
        assert "The correct answer is: technical" in entry["input"]
        schema = entry["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["answer"]["enum"] == ["technical"]
    assert {e["input"].split("Input:\n")[-1][:4] for e in asked} == set(MISMATCH)

    kept = _curated(run)
    for rid in MISMATCH:
        row = kept[rid]
        assert row["label"] == "technical" and row["rationale_source"] == "rationalized"
        assert "technical" in row["rationale"] and row["teacher_answer"]["label"] == "billing"
        assert row["rationalization"]["status"] == "ok" and row["rationalization"]["cost"] > 0
    assert {kept[f"ok{i}"]["rationale_source"] for i in range(6)} == {"teacher"}
    rat = funnel["rationalize"]
    assert rat["requested"] == 4 and rat["sent"] == 4 and rat["outcomes"] == {"kept": 4}
    assert sum(rat["in_splits"].values()) == 4
    assert funnel["teacher_accuracy"]["agree"] == 6  # the teacher's own answers, not the rationalized ones
    assert sum(n.get("rationalized", 0) for n in funnel["rationale_sources"].values()) == 4
    # the ledger: each rationalization is booked under its row's generation key (one spend, one cap)
    cache = ResponseCache(cache_path(recipe))
    try:
        spent = cache.spend([kept[rid]["samples"][0]["cache_key"] for rid in MISMATCH]).paid
    finally:
        cache.close()
    assert spent == pytest.approx(sum(generated[rid]["cost"] + kept[rid]["rationalization"]["cost"] for rid in MISMATCH))
    # the report says how many were rationalized and whose rationales the training rows carry
    from stepwise.report import _funnel

    html = str(_funnel(run))
    assert "Gold mismatches rationalized" in html and "<b>4</b> asked" in html
    train = funnel["rationale_sources"]["train"]
    assert f"<b>rationalized</b> {train['rationalized']}" in html and f"<b>teacher</b> {train['teacher']}" in html


def test_resume_replays_the_cache_and_offline_needs_it(tmp_path: Path) -> None:
    with OpenAIStub() as stub:
        recipe, run = _setup(tmp_path, stub)
        run_generate(recipe, run, progress=False)
        with pytest.raises(RationalizeError, match="--offline: 4 of 4 rationalization requests"):
            run_curate(recipe, run, offline=True)
        assert owed_rationalizations(recipe, run, offline=False) == 4
        run_curate(recipe, run)
        first = _curated(run)
        n = len(stub.log)
        assert owed_rationalizations(recipe, run, offline=False) == 0
        again = run_curate(recipe, run)
        assert len(stub.log) == n  # nothing asked, nothing paid twice
        assert again["rationalize"]["cache_hits"] == 4 and again["rationalize"]["sent"] == 0
        offline = run_curate(recipe, run, offline=True)
    assert offline["rationalize"]["sent"] == 0
    assert {k: v["rationale"] for k, v in _curated(run).items()} == {k: v["rationale"] for k, v in first.items()}


def test_cost_cap_stops_rationalization_resumably(tmp_path: Path) -> None:
    from stepwise.curation.rationalization import RationalizeStopped

    with OpenAIStub() as stub:
        recipe, run = _setup(tmp_path, stub)
        run_generate(recipe, run, progress=False)
        spent = sum(r["cost"] for r in read_jsonl(run.layout.responses))
        with pytest.raises(RationalizeStopped, match="cost cap"):
            run_curate(recipe, run, max_cost=spent + 1e-9)  # the generation spend counts against the cap
        assert run.stage_info("curate")["status"] == "stopped"
        rejected = read_jsonl(run.layout.curate_rejected)
        assert {r["reason"] for r in rejected if r["id"] in MISMATCH} == {"rationalize_not_run"}
        assert owed_rationalizations(recipe, run, offline=False) == 4
        run_curate(recipe, run)
    assert {rid for rid, r in _curated(run).items() if r["rationale_source"] == "rationalized"} == set(MISMATCH)


def _mismatch_row(rationale: str) -> dict:
    return {"id": "r1", "input": {"text": "my billing page shows an error"}, "gold": "technical",
            "parse_status": "ok", "label": "billing", "answer_text": "billing", "format": "dss",
            "rationale": "The customer mentions the billing page, so this is billing.",
            "rationalization": {"status": "ok", "label": "technical", "answer_text": "technical",
                                "rationale": rationale, "raw": "..."}}


def test_a_rationalization_that_still_argues_for_another_label_is_rejected(tmp_path: Path) -> None:
    with OpenAIStub() as stub:
        recipe, _ = _setup(tmp_path, stub)
    good = "An error page is a fault of the system, so this is a technical problem."
    still_wrong = "The page is about payments and charges, so this is really a billing question."
    out = validate_step([_mismatch_row(good), {**_mismatch_row(still_wrong), "id": "r2"}], recipe)
    assert [r["id"] for r in out.kept] == ["r1"] and out.kept[0]["rationale_source"] == "rationalized"
    (rej,) = out.rejected
    assert rej.reason == "rationalized_rationale_inconsistent" and "billing" in rej.detail
    assert out.info["rationalized"] == {"kept": 1, "rationalized_rationale_inconsistent": 1}
    # an answer other than the gold one (an unconstrained backend) is rejected with its own reason
    wrong = _mismatch_row(good)
    wrong["rationalization"].update(label="general", answer_text="general")
    out = validate_step([wrong], recipe)
    assert out.rejected[0].reason == "rationalize_wrong_answer"


def test_rationalize_without_a_gold_label_field_is_bad_input(tmp_path: Path) -> None:
    with OpenAIStub() as stub:
        (tmp_path / "inputs.jsonl").write_text(json.dumps(_rows()[0]) + "\n")
        text = RECIPE.format(base_url=stub.base_url, mode="rationalize", label_field="label")
        text = text.replace("  label_field: label\n", "")
        (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(RecipeError) as exc:
        load_recipe(tmp_path / "recipe.yaml")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "on_gold_mismatch" in t)
    assert f"recipe.yaml:{line} curation.on_gold_mismatch: 'rationalize' needs data.label_field" in str(exc.value)


def test_reviewer_corrected_row_is_rationalized_after_the_pull(tmp_path: Path, monkeypatch) -> None:
    """A reviewer changes `ok0` from billing to technical without rewriting the rationale: with
    `review.rationalize_corrections` the teacher explains `technical` and that rationale trains."""
    from types import SimpleNamespace

    from stepwise.review import stage as rv
    from stepwise.review.argilla import LABEL_Q

    with OpenAIStub() as stub:
        recipe, run = _setup(tmp_path, stub, mode="drop")
        recipe.review.mode = "argilla"
        recipe.review.rationalize_corrections = True
        run_generate(recipe, run, progress=False)
        run_curate(recipe, run)
        ids = [r["id"] for r in rv.load_curated(run)]
        assert "ok0" in ids
        resp = SimpleNamespace(user_id="u1", status="submitted", values={LABEL_Q: {"value": "technical"}})
        models = {rid: SimpleNamespace(responses=[resp] if rid == "ok0" else []) for rid in ids}
        for rid in ids:  # the others: accepted as the teacher answered
            if rid != "ok0":
                models[rid].responses = [SimpleNamespace(user_id="u1", status="submitted", values={})]
        push_info = {"mode": "argilla", "dataset": "rat", "workspace": "stepwise", "send": "all", "pushed_ids": ids}
        run.layout.review_push.parent.mkdir(parents=True, exist_ok=True)
        run.layout.review_push.write_text(json.dumps(push_info))
        monkeypatch.setattr(rv, "_fetch", lambda recipe, run: rv._Pulled("rat", "stepwise", "http://x", push_info,
                                                                           {}, models, set(ids)))
        before = len(stub.log)
        summary = rv.pull(recipe, run, log=lambda *a: None)
        asked = stub.log[before:]
    assert len(asked) == 1 and "The correct answer is: technical" in asked[0]["input"]
    assert asked[0]["response_format"]["json_schema"]["schema"]["properties"]["answer"]["enum"] == ["technical"]
    row = next(r for r in read_jsonl(run.layout.reviewed) if r["id"] == "ok0")
    assert row["label"] == "technical" and row["rationale_source"] == "rationalized"
    assert row["rationale"].endswith("technical.") and row["review"]["teacher_rationale"]
    assert summary["counts"]["rationalized_corrections"] == 1
    assert summary["rationalize_corrections"]["requested"] == 1
    # the export trains it with the rationalized rationale, and lineage says so
    from stepwise.curation.export import run_export

    run_export(recipe, run, counter=lambda msgs: sum(len(m["content"]) for m in msgs))
    lineage = read_jsonl(run.layout.lineage("train")) + read_jsonl(run.layout.lineage("val"))
    assert {lin["rationale_source"] for lin in lineage if lin["id"] == "ok0" and lin["kind"] != "label"} == {"rationalized"}


def test_estimate_counts_rationalization_requests_as_an_upper_bound(tmp_path: Path) -> None:
    from stepwise.pipelines.estimate import estimate_run

    with OpenAIStub() as stub:
        recipe, run = _setup(tmp_path, stub)
        est = estimate_run(recipe)
        bound = est["rationalize requests (upper bound: every row with gold)"]
        cost_bound = float(est["rationalize cost (upper bound)"].split()[0].lstrip("$"))
        run_generate(recipe, run, progress=False)
        funnel = run_curate(recipe, run)
    assert bound == len(_rows()) and funnel["rationalize"]["requested"] == len(MISMATCH) <= bound
    assert 0 < funnel["rationalize"]["cost_usd"] <= cost_bound
    with OpenAIStub() as stub:
        recipe, _ = _setup(tmp_path / "drop2", stub, mode="drop")
        assert not any(k.startswith("rationalize") for k in estimate_run(recipe))


def test_curate_command_offline_miss_exits_2_and_validate_names_the_field(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stepwise.cli import app

    runner = CliRunner()
    with OpenAIStub() as stub:
        recipe, run = _setup(tmp_path, stub)
        run_generate(recipe, run, progress=False)
        res = runner.invoke(app, ["curate", str(recipe.source_path), "--run-dir", str(run.path), "--offline"])
        assert res.exit_code == 2 and "rationalization requests are not in the cache" in res.output
        res = runner.invoke(app, ["curate", str(recipe.source_path), "--run-dir", str(run.path)])
        assert res.exit_code == 0, res.output
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "inputs.jsonl").write_text(json.dumps(_rows()[0]) + "\n")
        text = RECIPE.format(base_url=stub.base_url, mode="rationalize", label_field="label")
        (tmp_path / "bad" / "recipe.yaml").write_text(text.replace("  label_field: label\n", ""))
    res = runner.invoke(app, ["validate", str(tmp_path / "bad" / "recipe.yaml")])
    assert res.exit_code == 2 and "curation.on_gold_mismatch: 'rationalize' needs data.label_field" in res.output


def test_stepwise_run_curates_with_rationalization_and_skips_when_nothing_is_owed(tmp_path: Path) -> None:
    from stepwise.pipeline import RunOptions, run_pipeline

    with OpenAIStub() as stub:
        recipe, run = _setup(tmp_path, stub)
        opts = RunOptions(until_stage="curate", progress=False)
        first = {o.stage: o for o in run_pipeline(recipe, run, opts).outcomes}
        assert first["curate"].status == "done" and "rationalized 4 of 4 gold mismatches" in first["curate"].detail
        n = len(stub.log)
        second = {o.stage: o.status for o in run_pipeline(recipe, run, opts).outcomes}
        assert second["curate"] == "skipped" and len(stub.log) == n
        # an answer the cache lost (or a cap stop) is owed: curate runs again instead of being skipped
        import sqlite3

        victim = next(r for s in ("train", "val") for r in read_jsonl(run.layout.curated(s))
                      if r.get("rationale_source") == "rationalized")["rationalization"]["cache_key"]
        with sqlite3.connect(cache_path(recipe)) as db:
            db.execute("DELETE FROM responses WHERE key = ?", (victim,))
        assert owed_rationalizations(recipe, run, offline=False) == 1
        third = {o.stage: o for o in run_pipeline(recipe, run, opts).outcomes}
        assert third["curate"].status == "done" and len(stub.log) == n + 1


def test_support_tickets_cache_holds_its_rationalizations(tmp_path: Path) -> None:
    """The example's recorded cache replays the rationalization of every gold mismatch of the demo
    (`make demo` stays offline): generate and curate with --offline, nothing asked."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    src = REPO / "examples" / "support-tickets"
    dst = tmp_path / "support-tickets"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("runs", "*.sqlite-*"))
    import yaml

    raw = yaml.safe_load((dst / "recipe.yaml").read_text())
    raw.setdefault("curation", {})["on_gold_mismatch"] = "rationalize"  # (the demo's own setting)
    (dst / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    recipe = load_recipe(dst / "recipe.yaml")
    for cmd in ("generate", "curate"):
        args = [sys.executable, "-m", "stepwise", cmd, str(dst / "recipe.yaml"), "--offline"]
        args += ["--new-run", "--no-progress"] if cmd == "generate" else []
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    funnel = json.loads(next((dst / "runs" / recipe.name).glob("2*/curate/funnel.json")).read_text())
    rat = funnel["rationalize"]
    assert rat["requested"] > 0 and rat["sent"] == 0 and rat["cache_hits"] == rat["requested"]
    assert funnel["rationale_sources"]["train"].get("rationalized", 0) > 0


def test_a_rationalization_that_only_restates_the_hint_is_rejected(tmp_path: Path) -> None:
    """'The correct answer is: technical.' explains nothing: the hint echoed back never trains; a
    rationale that opens with the hint but then reasons is kept. The threshold is a setting."""
    with OpenAIStub() as stub:
        recipe, _ = _setup(tmp_path, stub)
    echo = "The correct answer is: technical. This is the correct answer."
    reasons = "The correct answer is technical because the customer sees an error page when logging in."
    out = validate_step([_mismatch_row(echo), {**_mismatch_row(reasons), "id": "r2"}], recipe)
    assert [r["id"] for r in out.kept] == ["r2"]
    (rej,) = out.rejected
    assert rej.reason == "rationalized_rationale_restates_hint" and "0 words" in rej.detail
    assert out.info["rationalized"] == {"kept": 1, "rationalized_rationale_restates_hint": 1}
    recipe.curation.rationale.min_words_beyond_hint = 0
    assert len(validate_step([_mismatch_row(echo)], recipe).kept) == 1
