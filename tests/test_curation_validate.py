"""Validators of the curation stage: labels, JSON/DSL, rationales, agreement."""

from __future__ import annotations

import json

import pytest
from stepwise.curation.dsl_schema import validate_search_body
from stepwise.curation.fixtures import response_row
from stepwise.curation.validate import Validator, argued_label, copies_input, validate_step

from stepwise.recipe import Recipe

BASE = {
    "name": "t",
    "data": {"inputs": "x.jsonl"},
    "teacher": {"model": "stub", "base_url": "http://127.0.0.1:1/v1"},
}


def cls_recipe(**curation) -> Recipe:
    return Recipe.model_validate({
        **BASE,
        "task": {"name": "tickets", "classes": ["card_arrival", "lost_or_stolen_card", "exchange_rate"],
                 "label_aliases": {"stolen card": "lost_or_stolen_card"}, "instructions": "Classify."},
        "curation": curation,
    })


def dsl_recipe(**curation) -> Recipe:
    return Recipe.model_validate({
        **BASE,
        "task": {"name": "nl2dsl", "input_fields": ["question", "mapping"], "structured": "json",
                 "validator": "opensearch_query_dsl", "instructions": "Write the body."},
        "curation": curation,
    })


RAT = "The customer is waiting for a card that was ordered, so this is about card arrival."


def check(recipe: Recipe, row: dict):
    return Validator(recipe).check(row)


def test_label_normalised_and_aliased():
    row = response_row("a", {"text": "my card was stolen"}, " Stolen Card. ",
                       "Someone took the card from the customer, which is a lost or stolen card case.")
    assert check(cls_recipe(), row) is None
    assert row["label"] == "lost_or_stolen_card"


def test_label_not_in_classes_rejected():
    rej = check(cls_recipe(), response_row("a", {"text": "hi"}, "billing", RAT))
    assert rej is not None and rej.reason == "invalid_label" and "billing" in rej.detail


@pytest.mark.parametrize("status", ["not_run", "error", "missing_answer", "invalid_json"])
def test_failed_parse_status_is_the_reason(status):
    rej = check(cls_recipe(), response_row("a", {"text": "hi"}, None, None, parse_status=status,
                                           parse_detail="why"))
    assert rej.reason == status


def test_teacher_accuracy_and_gold_mismatch():
    rows = [response_row("a", {"text": "where is my card"}, "card_arrival", RAT, gold="card_arrival"),
            response_row("b", {"text": "rate?"}, "card_arrival", RAT, gold="exchange_rate"),
            response_row("c", {"text": "rate!"}, "exchange_rate",
                         "The customer asks how currencies are converted, an exchange rate question.", gold=None)]
    out = validate_step(rows, cls_recipe())
    assert [r["id"] for r in out.kept] == ["a", "c"]
    assert out.rejected[0].reason == "disagrees_with_gold"
    assert out.info["teacher_accuracy"] == {"rows_with_gold": 2, "agree": 1, "accuracy": 0.5, "metric": "label accuracy"}
    kept = validate_step([dict(r) for r in rows], cls_recipe(on_gold_mismatch="keep")).kept
    assert len(kept) == 3


@pytest.mark.parametrize("rationale,reason", [
    (None, "missing_rationale"),
    ("   ", "missing_rationale"),
    ("card arrival", "rationale_too_short"),
    ("x" * 5000, "rationale_too_long"),
    ("I ordered my new card two weeks ago and it has still not arrived", "rationale_copies_input"),
    ("The message mentions a currency conversion fee, so the intent is exchange rate.", "rationale_inconsistent"),
])
def test_rationale_checks(rationale, reason):
    row = response_row("a", {"text": "I ordered my new card two weeks ago and it has still not arrived"},
                       "card_arrival", rationale)
    rej = check(cls_recipe(), row)
    assert rej is not None and rej.reason == reason


def test_rationale_negating_another_class_is_consistent():
    r = "This is not exchange rate: the customer waits for a delivery, so card arrival fits."
    assert check(cls_recipe(), response_row("a", {"text": "Where is my card?"}, "card_arrival", r)) is None
    assert argued_label("It is not a card arrival issue.", Validator(cls_recipe()).patterns) is None


def test_consistency_check_can_be_disabled():
    r = "The message mentions a currency conversion fee, so the intent is exchange rate."
    recipe = cls_recipe(rationale={"check_consistency": False})
    assert check(recipe, response_row("a", {"text": "Where is my card?"}, "card_arrival", r)) is None


def test_copies_input():
    assert copies_input("Where is my card?", "where is my card")
    assert not copies_input("The customer is waiting for the card to be delivered", "Where is my card?")


def test_low_agreement():
    rej = check(cls_recipe(min_agreement=0.6), response_row("a", {"text": "x"}, "card_arrival", RAT, agreement=0.5))
    assert rej.reason == "low_agreement"


MAPPING = {"properties": {"status": {"type": "keyword"}}}
DSL_RAT = "Status is a keyword field, so an exact term query on it finds the rows."


def test_dsl_valid_is_canonicalised():
    row = response_row("a", {"question": "pending?", "mapping": MAPPING},
                       None, DSL_RAT, answer_text='{ "size": 5,\n "query": {"term": {"status": "pending"}} }',
                       gold={"query": {"term": {"status": "pending"}}, "size": 5})
    v = Validator(dsl_recipe())
    assert v.check(row) is None
    assert list(row["label"]) == ["query", "size"]
    assert v.teacher_accuracy()["accuracy"] == 1.0


@pytest.mark.parametrize("answer,reason,path", [
    ('{"query": {"term": {"status": {"value": "x", "boost": "high"}}}}', "invalid_dsl", "$.query.term.status.boost"),
    ('{"query": {"bogus": {}}}', "invalid_dsl", "$.query"),
    ('{"size": "ten", "query": {"match_all": {}}}', "invalid_dsl", "$.size"),
    ('{"term": {"status": {"value": "x", "boost": "high"}}}', "invalid_dsl", "bare query clause"),
    ('{"query": ', "invalid_json", "line 1"),
    ('"just a string"', "invalid_json", "str"),
])
def test_dsl_invalid(answer, reason, path):
    rej = check(dsl_recipe(), response_row("a", {"question": "q", "mapping": MAPPING}, None, DSL_RAT, answer_text=answer))
    assert rej is not None and rej.reason == reason and path in rej.detail


def test_dsl_bare_clause_is_wrapped_once_and_counted():
    """A bare `{"bool": ...}` is the same answer eval scores as valid: curation wraps it with the
    shared repair (stepwise.curation.dsl_schema.wrap_bare_query), keeps it and counts it in the funnel."""
    bare = {"bool": {"filter": [{"term": {"status": "pending"}}]}}
    rat = f"Status is a keyword, so filter on it: {json.dumps(bare)}."
    rows = [response_row("a", {"question": "pending?", "mapping": MAPPING}, None, rat, answer_text=json.dumps(bare),
                         gold={"query": bare}),
            response_row("b", {"question": "pending?", "mapping": MAPPING}, None, DSL_RAT,
                         answer_text=json.dumps({"query": bare}))]
    out = validate_step(rows, dsl_recipe())
    assert not out.rejected, [(r.reason, r.detail) for r in out.rejected]
    assert [r["label"] for r in out.kept] == [{"query": bare}, {"query": bare}]
    assert out.kept[0]["checks"]["repaired"] == ["bare_query_wrapped"] and "repaired" not in out.kept[1]["checks"]
    assert out.info["repaired"] == {"bare_query_wrapped": 1}
    assert out.info["teacher_accuracy"]["accuracy"] == 1.0  # gold in body form agrees with the wrapped answer


def test_dsl_rationale_quoting_other_body_is_inconsistent():
    r = 'Use {"query": {"match_all": {}}} to get everything.'
    rej = check(dsl_recipe(), response_row("a", {"question": "q", "mapping": MAPPING},
                                           {"query": {"term": {"status": "x"}}}, r))
    assert rej.reason == "rationale_inconsistent"


def test_schema_accepts_real_gold_bodies():
    assert validate_search_body({"query": {"bool": {"must": {"match": {"title": "x"}}}},
                                 "sort": [{"rating": {"order": "desc"}}], "size": 5}) is None
    assert validate_search_body({"aggs": {"n": {"terms": {"field": "f"}}}, "size": 0}) is None
