"""Test inputs never go to the teacher (issue 16 item 2): with gold labels and no `data.test_file`,
the test split is cut from the input rows before generation (stepwise.curation.holdout), so the
teacher is not paid for it and a teacher failure cannot shrink it; with `data.test_file`, its rows
are the test split and none is sent. The stub teacher records every request it gets."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
from stepwise.curation.curate import run_curate
from stepwise.curation.holdout import HELD_OUT, hold_out_test
from stepwise.curation.splits import allocate
from stepwise.pipelines.estimate import estimate_run
from stepwise.pipelines.generate import load_inputs, run_generate, split_inputs

from stepwise.io import DataFileError, read_jsonl
from stepwise.pipeline import RunOptions, run_pipeline
from stepwise.recipe import load_recipe
from stepwise.report import render_report
from stepwise.rundir import create_run
from stepwise.testing.openai_stub import OpenAIStub, StubConfig
from tests.conftest import REPO
from tests.test_generate import RECIPE, setup_recipe

LABELS = ["billing", "technical", "general"]
WORDS = ["please", "look", "into", "this", "for", "me", "because", "the", "problem", "keeps", "coming", "back",
         "every", "single", "morning", "since", "last", "week", "and", "nobody", "on", "phone", "could", "tell"]


def ticket(i: int, label: str, prefix: str = "row") -> dict:
    """A row whose text is long enough for the 13-gram contamination check and unique per row."""
    rng = random.Random(i)
    words = rng.sample(WORDS, 18)
    return {"id": f"{prefix}{i:03d}", "text": f"{prefix}{i:03d} {' '.join(words)} about {label}", "label": label}


def uneven_rows() -> list[dict]:
    """20 billing, 12 technical, 8 general: strata of different sizes."""
    sizes = {"billing": 20, "technical": 12, "general": 8}
    return [ticket(i, lab) for i, lab in enumerate(lab for lab, n in sizes.items() for _ in range(n))]


def sent_texts(stub: OpenAIStub) -> list[str]:
    return [e["input"] for e in stub.log]


def reached_teacher(stub: OpenAIStub, text: str) -> bool:
    return any(text in sent for sent in sent_texts(stub))


def test_gold_test_inputs_are_never_sent_to_the_teacher(tmp_path):
    rows = uneven_rows()
    # the teacher fails on some training rows: the test split must not shrink
    script = {r["id"]: ["garbage"] for r in rows[::7]}
    with OpenAIStub(StubConfig(script=script)) as stub:
        recipe, run = setup_recipe(tmp_path, stub, rows)
        result = run_generate(recipe, run, progress=False, retry_unparsed=False)
        report = run_curate(recipe, run)
    test = read_jsonl(run.layout.curated("test"))
    assert test, "no test split"
    leaked = [r["id"] for r in test if reached_teacher(stub, r["input"]["text"])]
    assert not leaked, f"test inputs sent to the teacher: {leaked}"
    # stratified by gold class, the same share curation's split takes (10%)
    per_class = Counter(r["gold"] for r in test)
    sizes = Counter(r["label"] for r in rows)
    assert per_class == {c: allocate(n, [0.8, 0.1, 0.1])[2] for c, n in sizes.items() if allocate(n, [0.8, 0.1, 0.1])[2]}
    assert all(r["gold"] is not None and "rationale" not in r for r in test)
    # every other input was asked about once; the held-out file is the test split
    held = read_jsonl(run.layout.held_out_test)
    assert {r["id"] for r in held} == {r["id"] for r in test}
    assert result.rows == len(rows) - len(test) == len({e["input"] for e in stub.log})
    assert report["test_source"] == HELD_OUT and report["kept"]["test"] == len(test)
    assert report["held_out_before_generation"] == {"rows": len(test), "requests_saved": len(test)}
    first = report["steps"][0]
    assert (first["step"], first["in"], first["out"], first["moved"]) == (
        "hold_out_test", len(rows), len(rows) - len(test), {"test": len(test)})
    assert run.read_manifest()["stages"]["generate"]["counts"]["held_out"] == len(test)
    html = render_report(recipe, run)
    assert (f"held out of the gold inputs before generation: <b>{len(test)}</b> rows; <b>{len(test)}</b> teacher "
            "requests never sent") in html


def test_test_file_rows_are_never_sent_and_nothing_is_held_out(tmp_path):
    rows = uneven_rows()
    test_rows = [ticket(100 + i, LABELS[i % 3], prefix="test") for i in range(6)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, rows)
        recipe.source_path.write_text(recipe.source_path.read_text().replace(
            "  label_field: label\n", "  label_field: label\n  test_file: test.jsonl\n"))
        recipe = load_recipe(recipe.source_path)
        run_generate(recipe, run, progress=False)
        report = run_curate(recipe, run)
    assert not [r["id"] for r in test_rows if reached_teacher(stub, r["text"])]
    assert len({e["input"] for e in stub.log}) == len(rows)  # every input row, none held out
    assert read_jsonl(run.layout.held_out_test) == []
    test = read_jsonl(run.layout.curated("test"))
    assert [r["id"] for r in test] == [r["id"] for r in test_rows]
    assert report["test_source"] == "data.test_file" and report["held_out_before_generation"] is None


def _recipe(tmp_path: Path, extra: str = "", **replace: str):
    """The generation tests' recipe (nothing is sent here), plus `extra`, with lines replaced."""
    text = RECIPE.format(base_url="http://127.0.0.1:9/v1", concurrency=1, k=1) + extra
    for old, new in replace.values():
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "recipe.yaml").write_text(text)
    (tmp_path / "inputs.jsonl").write_text(json.dumps(ticket(0, "billing")) + "\n")  # hold_out_test gets its rows
    return load_recipe(tmp_path / "recipe.yaml")


def _held(recipe, rows):
    return {r["id"] for r in hold_out_test(recipe, rows, lambda r: r["id"], lambda r: r.get("label"))[1]}


def test_hold_out_is_stratified_seeded_and_independent_of_row_order(tmp_path):
    rows = uneven_rows() + [{"id": f"nogold{i}", "text": f"no gold {i}", "label": None} for i in range(10)]
    recipe = _recipe(tmp_path)
    held = _held(recipe, rows)
    by_id = {r["id"]: r for r in rows}
    sizes = Counter(r["label"] for r in rows if r["label"])
    assert Counter(by_id[i]["label"] for i in held) == {c: 2 if n == 20 else 1 for c, n in sizes.items()}
    assert all(by_id[i]["label"] for i in held), "a row without gold label was held out"
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert _held(recipe, shuffled) == held
    # an unchanged seed and ratio re-use the split; a changed one re-splits
    assert _held(_recipe(tmp_path), rows) == held
    reseeded = _held(_recipe(tmp_path, "curation:\n  seed: 7\n"), rows)
    assert reseeded != held and len(reseeded) == len(held)
    bigger = _held(_recipe(tmp_path, "curation:\n  split: {train: 0.6, val: 0.2, test: 0.2}\n"), rows)
    assert len(bigger) == sum(allocate(n, [0.6, 0.2, 0.2])[2] for n in sizes.values()) > len(held)
    # a structured answer is unique per row: one stratum, the test share of all gold rows
    structured = _recipe(tmp_path, task=("  classes: [billing, technical, general]\n", "  structured: json\n"))
    assert len(_held(structured, rows)) == allocate(40, [0.8, 0.1, 0.1])[2] == 4
    # no label field, or a test file: nothing is held out
    assert _held(_recipe(tmp_path, data=("  label_field: label\n", "")), rows) == set()
    (tmp_path / "test.jsonl").write_text(json.dumps(ticket(999, "billing")) + "\n")
    assert _held(_recipe(tmp_path, data=("  label_field: label\n", "  label_field: label\n  test_file: test.jsonl\n")),
                 rows) == set()


def test_estimate_shows_the_requests_holding_out_saved(tmp_path):
    with OpenAIStub() as stub:
        recipe, _ = setup_recipe(tmp_path, stub, uneven_rows(), k=2)
        est = estimate_run(recipe)
    held = len(split_inputs(recipe, load_inputs(recipe))[1])
    assert held == 4
    assert est["held out for test (never sent)"] == f"{held} rows, {2 * held} requests saved"
    assert est["requests (rows x num_rationales)"] == 2 * (40 - held)
    assert est["input rows"] == 40
    # eval scores the teacher on exactly those held-out rows: the estimate counts them (none cached)
    assert est["teacher eval requests (test rows)"].startswith(f"{2 * held} (0 cached")  # k=2 samples each


def test_decontamination_catches_a_near_duplicate_of_a_held_out_test_input(tmp_path):
    rows = uneven_rows()
    recipe = _recipe(tmp_path)
    held = sorted(_held(recipe, rows))
    target = next(r for r in rows if r["id"] == held[0])
    # a training input that differs from a held-out test input in its last word only; its id is
    # chosen so that it is not itself held out (the split depends on the ids)
    for k in range(50):
        dup = {**target, "id": f"dup{k}", "text": target["text"].rsplit(" ", 1)[0] + " anyway"}
        if _held(recipe, [*rows, dup]) == set(held):
            break
    else:
        pytest.fail("no id keeps the held-out rows as they are")
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, [*rows, dup])
        run_generate(recipe, run, progress=False)
        report = run_curate(recipe, run)
    assert reached_teacher(stub, dup["text"]) and not reached_teacher(stub, target["text"])
    rejected = {r["id"]: r for r in read_jsonl(run.layout.curate_rejected)}
    assert dup["id"] in rejected, report["steps"]
    assert rejected[dup["id"]]["reason"].startswith("contaminated_")
    assert rejected[dup["id"]]["collided_with"] == target["id"]
    decon = next(s for s in report["steps"] if s["step"] == "decontaminate")
    assert decon["references"]["test"]["rows"] == len(held) and decon["dropped_against"] == {"test": 1}


def test_a_changed_seed_resplits_and_curate_alone_refuses_a_stale_split(tmp_path):
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, uneven_rows())
        opts = RunOptions(until_stage="curate", progress=False)
        assert run_pipeline(recipe, run, opts).exit_code == 0
        before = {r["id"] for r in read_jsonl(run.layout.held_out_test)}
        sent = len(stub.log)
        recipe.source_path.write_text(recipe.source_path.read_text() + "curation:\n  seed: 7\n")
        reseeded = load_recipe(recipe.source_path)
        with pytest.raises(DataFileError, match=r"held_out_test\.jsonl.*stepwise generate"):
            run_curate(reseeded, run)  # generate has not re-split: curate does not mix two splits
        again = run_pipeline(reseeded, run, opts)
    assert [o.status for o in again.outcomes[:2]] == ["done", "done"], again.outcomes
    after = {r["id"] for r in read_jsonl(run.layout.held_out_test)}
    assert after != before and len(after) == len(before)
    assert {r["id"] for r in read_jsonl(run.layout.curated("test"))} == after
    # the re-split asked only about the rows that left the test split (the rest is cached)
    texts = {r["id"]: r["text"] for r in uneven_rows()}
    new = [e["input"] for e in stub.log[sent:]]
    assert len(new) == len(before - after) and all(any(texts[i] in x for x in new) for i in before - after)


def test_nl2dsl_test_split_keeps_every_gold_row(tmp_path):
    """The example's 85 questions all have a gold body: 17 (20%) are held out before generation
    and all 17 reach curate's test split, whatever the 135M teacher answers; the recorded cache
    still answers the rest offline."""
    src = REPO / "examples" / "nl2dsl"
    dst = tmp_path / "nl2dsl"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("runs", "*.sqlite-*"))
    recipe = load_recipe(dst / "recipe.yaml")
    rows = load_inputs(recipe)
    asked, held = split_inputs(recipe, rows)
    assert len(rows) == 85 and len(held) == allocate(85, [0.7, 0.1, 0.2])[2] == 17
    assert all(r.gold for r in held) and not {r.id for r in held} & {r.id for r in asked}
    run = create_run(recipe, tmp_path / "run")
    result = run_generate(recipe, run, offline=True, progress=False)
    assert result.rows == 68 and result.stats.sent == 0
    report = run_curate(recipe, run)
    test = read_jsonl(run.layout.curated("test"))
    assert report["test_source"] == HELD_OUT and len(test) == 17 and all(r["gold"] for r in test)
    assert {r["id"] for r in test} == {r.id for r in held}
    assert all(isinstance(r["dsl_alternatives"], list) for r in test)  # the gold alternatives eval accepts


def test_spend_on_rows_a_resplit_held_out_still_counts_against_the_cap(tmp_path):
    """A changed split can move rows the teacher already answered into the test split: what they
    cost stays in the ledger `max_cost` caps (the cap is over the recipe's whole spend)."""
    rows = uneven_rows()
    resplit = "curation:\n  split: {train: 0.4, val: 0.1, test: 0.5}\n"
    (tmp_path / "r").mkdir()
    later_held = _held(_recipe(tmp_path / "r", resplit), rows)
    failing = next(r["id"] for r in rows if r["id"] not in later_held)  # still owed a request later
    with OpenAIStub(StubConfig(script={failing: ["500"] * 20})) as stub:
        recipe, run = setup_recipe(tmp_path, stub, rows)
        text = recipe.source_path.read_text() + "  max_new_tokens: 16\n"
        recipe.source_path.write_text(text + "curation:\n  split: {train: 0.9, val: 0.1, test: 0.0}\n")
        first = run_generate(load_recipe(recipe.source_path), run, progress=False)
        assert first.extra["held_out"] == 0 and first.status_counts["error"] == 1
        spent = run.read_manifest()["stages"]["generate"]["cost"]["total_usd"]
        recipe.source_path.write_text(text + resplit)
        recipe = load_recipe(recipe.source_path)
        sent = len(stub.log)
        # the cap leaves a cent: the failed row's request (worst case ~$0.5) does not fit, although
        # the rows now held out (~$1 of the spend) are no longer asked about
        again = run_generate(recipe, run, progress=False, max_cost=spent + 0.01)
        est = estimate_run(recipe)
    assert {r["id"] for r in read_jsonl(run.layout.held_out_test)} == later_held
    assert est["spent so far (ledger)"] == f"${spent:.4f}"  # estimate reads the same whole-recipe ledger
    assert again.stopped_reason and "cost cap" in again.stopped_reason
    assert len(stub.log) == sent


def test_held_out_and_test_file_rows_keep_the_input_rows_other_fields(tmp_path):
    """Eval reads more than id/input/gold from a test row (`dsl_alternatives` and `gold_alternatives`:
    accepted alternative gold answers, evals.task_eval): a held-out or `data.test_file` row keeps
    every field of its input row, so an eval on that split scores them as it would on the source."""
    rows = [{**r, "dsl_alternatives": [f"alt-{r['id']}"], "gold_alternatives": [r["label"].upper()],
             "note": {"by": "annotator", "n": i}} for i, r in enumerate(uneven_rows())]
    extra = ("dsl_alternatives", "gold_alternatives", "note")
    test_rows = [{**ticket(100 + i, LABELS[i % 3], prefix="test"), "dsl_alternatives": [f"t{i}"]} for i in range(3)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, rows)
        run_generate(recipe, run, progress=False)
        run_curate(recipe, run)
        by_id = {r["id"]: r for r in rows}
        held = read_jsonl(run.layout.held_out_test)
        test = read_jsonl(run.layout.curated("test"))
        assert held and {r["id"] for r in test} == {r["id"] for r in held}
        for r in [*held, *test]:
            assert {f: r.get(f) for f in extra} == {f: by_id[r["id"]][f] for f in extra}, r["id"]
            assert r["input"] == {"text": by_id[r["id"]]["text"]} and r["gold"] == by_id[r["id"]]["label"]
            assert r["split"] == "test"
        # data.test_file rows: the same
        recipe.source_path.write_text(recipe.source_path.read_text().replace(
            "  label_field: label\n", "  label_field: label\n  test_file: test.jsonl\n"))
        recipe = load_recipe(recipe.source_path)
        run = create_run(recipe, tmp_path / "run2")
        run_generate(recipe, run, progress=False)
        run_curate(recipe, run)
    test = read_jsonl(run.layout.curated("test"))
    assert [r["dsl_alternatives"] for r in test] == [r["dsl_alternatives"] for r in test_rows]
