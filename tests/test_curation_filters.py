"""Quality filters, class balance, decontamination and general-data mixing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stepwise.curation.balance import balance_rows, balance_step, caps
from stepwise.curation.contamination import Decontaminator, Reference, benchmark_reference, contamination_step
from stepwise.curation.filters import filter_step, is_repetitive
from stepwise.curation.fixtures import response_row
from stepwise.curation.mixing import mix_step

from stepwise.recipe import Recipe

RAT = "The customer explains the situation clearly, so the label fits."


def recipe(**curation) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "data": {"inputs": "x.jsonl"}, "teacher": {"model": "stub", "base_url": "http://127.0.0.1:1/v1"},
        "task": {"name": "t", "classes": ["a", "b", "c"], "instructions": "x"},
        "curation": curation,
    })


def row(i, text, label="a", **kw):
    return response_row(f"r{i}", {"text": text}, label, kw.pop("rationale", RAT), **kw)


@pytest.mark.parametrize("text,label,rationale,reason", [
    ("", "a", RAT, "empty_input"),
    ("hi", "a", RAT, "input_too_short"),
    ("x" * 200, "a", RAT, "input_too_long"),
    ("My card is late", None, RAT, "missing_answer"),
    ("card card card card card card card card card card card card card card", "a", RAT, "repeated_text"),
    ("My card is late", "a", "the card is late " * 10, "repeated_text"),
    ("Mi tarjeta no ha llegado todavía, la pedí hace dos semanas y sigo esperando", "a", RAT, "wrong_language"),
])
def test_filters(text, label, rationale, reason):
    r = row(0, text, label, rationale=rationale)
    r["label"] = label
    out = filter_step([r], recipe(filters={"min_input_chars": 3, "max_input_chars": 100, "language": "en"}))
    assert not out.kept and out.rejected[0].reason == reason


def test_filters_keep_good_rows():
    r = row(0, "My card has not arrived yet and I ordered it two weeks ago")
    assert filter_step([r], recipe(filters={"language": "en"})).kept == [r]


def test_is_repetitive():
    assert not is_repetitive("I ordered a card two weeks ago and it has not arrived yet, where is it now")
    assert is_repetitive("ok then ok then ok then ok then ok then ok then ok then")


def test_caps():
    from collections import Counter

    assert caps(Counter(a=100, b=10, c=20), None, 3.0) == {"a": 30, "b": 10, "c": 20}
    assert caps(Counter(a=100, b=10), 50, None) == {"a": 50, "b": 10}


def test_balance_keeps_best_rows_and_reports_histograms():
    rows = [row(i, f"text {i}", "a", agreement=0.5 + (i % 5) / 10) for i in range(30)] + \
           [row(100 + i, f"other {i}", "b") for i in range(5)]
    kept, rejected = balance_rows(rows, None, 2.0, seed=1)
    assert sum(r["label"] == "a" for r in kept) == 10 and len(rejected) == 20
    assert min(r["agreement"] for r in kept if r["label"] == "a") >= max(r.row["agreement"] for r in rejected)
    assert rejected[0].reason == "class_balance" and "max_ratio=2.0" in rejected[0].detail
    splits, outcome = balance_step({"train": rows, "val": []}, recipe(balance={"max_ratio": 2.0}))
    assert outcome.info["histogram_before"]["train"] == {"a": 30, "b": 5}
    assert outcome.info["histogram_after"]["train"] == {"a": 10, "b": 5}


def test_balance_is_deterministic():
    rows = [row(i, f"t {i}", "a") for i in range(20)] + [row(50, "u", "b")]
    a, _ = balance_rows(rows, 5, None, seed=3)
    b, _ = balance_rows(list(reversed(rows)), 5, None, seed=3)
    assert {r["id"] for r in a} == {r["id"] for r in b}


Q = ("Which of the following statements about the structure of the atom and its nucleus "
     "is most accurate according to modern physics")


def _refs():
    return [Reference("mmlu", ids=["mmlu:test:1", "mmlu:test:2"], texts=[Q, "What is 2 + 2?"])]


def test_decontaminator_ngram_exact_minhash():
    dec = Decontaminator(_refs(), recipe())
    texts = [
        "Please answer: " + Q + " today",  # shares a 13-gram
        "what is 2+2",  # short: exact normalised match
        Q.replace("most accurate", "most correct"),  # 13-grams broken, but near-duplicate
        "Where is my card? I ordered it two weeks ago.",
    ]
    got = dec.check(texts)
    assert got[0][0] == "contaminated_ngram" and got[0][2] == 0
    assert got[1][0] == "contaminated_exact" and got[1][2] == 1
    assert got[2] is not None and got[2][0] in {"contaminated_minhash", "contaminated_ngram"}
    assert got[3] is None


def test_contamination_step_reports_against_which_reference():
    rows = [row(0, "Q: " + Q), row(1, "My card is late, where is it?")]
    test_rows = [{"id": "t1", "input": {"text": "My card is late, where is it?"}, "gold": "a"}]
    out = contamination_step(rows, recipe(contamination={"benchmarks": []}), test_rows)
    assert [r["id"] for r in out.kept] == ["r0"]
    assert out.rejected[0].collided_with == "t1" and out.info["dropped_against"] == {"test": 1}


def test_benchmark_reference_prefers_bundled_and_falls_back(tmp_path, monkeypatch):
    import stepwise.curation.contamination as c

    bundled = tmp_path / "evals"
    (bundled / "mmlu").mkdir(parents=True)
    (bundled / "mmlu" / "test.jsonl").write_text(json.dumps({"question": "Q?", "choices": []}) + "\n")
    monkeypatch.setattr(c, "BUNDLED", bundled)
    ref = benchmark_reference("mmlu")
    assert ref.texts == ["Q?"] and ref.source.startswith("bundled")
    shared = tmp_path / "shared"
    (shared / "arc_easy").mkdir(parents=True)
    (shared / "arc_easy" / "test.jsonl").write_text(json.dumps({"question": "Why?"}) + "\n")
    monkeypatch.setattr(c, "SHARED", shared)
    with pytest.warns(UserWarning, match="not bundled"):
        ref = benchmark_reference("arc_easy")
    assert ref.ids == ["arc_easy:test:1"]


def test_general_mix_fraction_provenance_and_in_domain(tmp_path):
    pool = tmp_path / "gsm8k_train"
    pool.mkdir()
    (pool / "train.jsonl").write_text("".join(
        json.dumps({"question": f"q{i}", "answer": f"step {i}\n#### {i}", "final": str(i)}) + "\n" for i in range(50)))
    r = recipe(general_mix={"file": str(pool), "fraction": 0.1})
    train = [row(i, f"t{i}") for i in range(90)]
    out = mix_step(train, r)
    general = [x for x in out.kept if x.get("general")]
    assert len(general) == 10 and out.added == 10
    assert general[0]["general"]["file"].endswith("train.jsonl") and general[0]["general"]["line"] >= 1
    assert general[0]["messages"][0]["role"] == "user" and "####" in general[0]["messages"][1]["content"]
    assert out.info["in_domain_benchmarks"] == ["gsm8k"]
    assert [x["id"] for x in mix_step(train, r).kept] == [x["id"] for x in out.kept]  # seeded


def test_general_mix_rejects_unknown_format(tmp_path):
    from stepwise.io import DataFileError

    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"foo": "bar"}) + "\n")
    with pytest.raises(DataFileError, match="g.jsonl:1"):
        mix_step([row(0, "x")], recipe(general_mix={"file": str(f), "fraction": 0.5}))


def test_shared_gsm8k_pool_exists():
    assert (Path(__file__).resolve().parents[2] / "shared" / "data" / "general" / "gsm8k_train").exists()


def test_decontaminator_minhash_catches_what_ngrams_cannot():
    dec = Decontaminator(_refs(), recipe(contamination={"ngram": 50}))  # no 50-gram fits these texts
    got = dec.check(["Please answer: " + Q + " today", Q.replace("Which", "Tell me which")[:60]])
    assert got[0][0] == "contaminated_minhash" and got[0][2] == 0 and "jaccard" in got[0][1]
    assert got[1] is None
