"""Hand-checked metric cases: classification, structured JSON/DSL canonicalisation, bootstrap."""

from __future__ import annotations

import pytest
from stepwise.evals.classification import (
    INVALID,
    accuracy,
    classification_report,
    confusion_matrix,
    macro_f1,
    per_class,
)
from stepwise.evals.stats import mcnemar_exact, mean_ci, paired_diff
from stepwise.evals.structured import (
    canonical_text,
    canonicalize,
    exact_match,
    key_f1,
    leaf_pairs,
    partial_f1,
    score_item,
    structured_report,
)

CLASSES = ["a", "b", "c"]
GOLD = ["a", "a", "b", "b", "c", "c"]
PRED = ["a", "b", "b", "b", None, "c"]


def test_accuracy_and_per_class_by_hand():
    assert accuracy(GOLD, PRED) == pytest.approx(4 / 6)
    pc = per_class(GOLD, PRED, CLASSES)
    # a: tp1 fp0 fn1 -> P1 R.5 F2/3 ; b: tp2 fp1 fn0 -> P2/3 R1 F.8 ; c: tp1 fp0 fn1 -> P1 R.5 F2/3
    assert pc["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2, "predicted": 1})
    assert pc["b"]["precision"] == pytest.approx(2 / 3) and pc["b"]["recall"] == 1.0 and pc["b"]["f1"] == pytest.approx(0.8)
    assert pc["c"]["f1"] == pytest.approx(2 / 3)
    assert macro_f1(GOLD, PRED, CLASSES) == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)


def test_confusion_matrix_has_invalid_column():
    cm = confusion_matrix(GOLD, PRED, CLASSES)
    assert cm["columns"] == ["a", "b", "c", INVALID]
    assert cm["matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1]]


def test_macro_f1_ignores_classes_absent_from_gold():
    # class c never appears in gold: averaging over a and b only
    assert macro_f1(["a", "b"], ["a", "b"], CLASSES) == 1.0


def test_classification_report_headline_and_ci():
    rep = classification_report(GOLD, PRED, CLASSES, n_boot=200, seed=1)
    acc = rep["metrics"]["accuracy"]
    assert acc["value"] == pytest.approx(4 / 6) and acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    assert rep["metrics"]["invalid_rate"]["value"] == pytest.approx(1 / 6)
    assert rep["metrics"]["macro_f1"]["ci_low"] <= rep["metrics"]["macro_f1"]["value"] <= rep["metrics"]["macro_f1"]["ci_high"]
    assert rep["n"] == 6


def test_canonicalisation_key_order_numbers():
    a = {"query": {"range": {"age": {"gte": 10, "lte": 20.0}}}, "size": 5}
    b = {"size": 5.0, "query": {"range": {"age": {"lte": 2e1, "gte": "10"}}}}
    assert canonical_text(a) == canonical_text(b)
    assert canonicalize({"x": 1.5}) == {"x": 1.5}
    assert canonicalize({"x": "1.5"}) == {"x": 1.5}  # exactly the number's text: OpenSearch coerces it
    assert canonicalize({"x": "1.5"}, coerce_numeric_strings=False) == {"x": "1.5"}
    assert canonicalize({"x": True}) == {"x": True}  # booleans are not numbers
    assert canonicalize({"x": "abc 12"}) == {"x": "abc 12"}


@pytest.mark.parametrize("pred,gold", [
    ("04567", "4567"),  # a zip code keyword: the leading zero is the value
    ("04567", 4567),
    ("  Paris ", "Paris"),  # keyword terms match exactly, whitespace included
    ("New  York", "New York"),
    ("1.50", "1.5"),
    ("1e3", "1000"),
])
def test_exact_match_keeps_keyword_strings_that_differ_apart(pred, gold):
    p = {"query": {"term": {"city": pred}}}
    g = {"query": {"term": {"city": gold}}}
    assert not exact_match(p, g, dsl=True) and not exact_match(p, g)
    assert partial_f1(p, g, dsl=True) < 1.0
    assert exact_match(g, g, dsl=True)  # and every value still equals itself


def test_keys_compared_as_written():
    assert not exact_match({"query": {"term": {" city": "x"}}}, {"query": {"term": {"city": "x"}}})


def test_lists_unordered_except_sort():
    assert canonicalize({"terms": {"f": ["b", "a"]}}) == canonicalize({"terms": {"f": ["a", "b"]}})
    s1 = {"sort": [{"date": "desc"}, {"price": "asc"}]}
    s2 = {"sort": [{"price": "asc"}, {"date": "desc"}]}
    assert canonical_text(s1) != canonical_text(s2)


def test_dsl_shorthands():
    bare = {"term": {"status": "pending"}}
    body = {"query": {"term": {"status": {"value": "pending"}}}}
    assert exact_match(bare, body, dsl=True)
    assert not exact_match(bare, body, dsl=False)
    one = {"query": {"bool": {"must": {"match": {"t": "x"}}}}}
    many = {"query": {"bool": {"must": [{"match": {"t": {"query": "x"}}}]}}}
    assert exact_match(one, many, dsl=True)


def test_exact_match_alternatives_and_none():
    gold = {"query": {"match_all": {}}}
    assert exact_match({"query": {"term": {"a": 1}}}, gold, [{"query": {"term": {"a": "1"}}}])
    assert not exact_match(None, gold)


def test_partial_f1_by_hand():
    gold = {"query": {"bool": {"must": [{"term": {"a": 1}}, {"term": {"b": 2}}]}}, "size": 10}
    pred = {"query": {"bool": {"must": [{"term": {"a": 1}}, {"term": {"b": 3}}]}}, "size": 10}
    # gold pairs: a=1, b=2, size=10 ; pred: a=1, b=3, size=10 -> overlap 2, P=R=2/3
    assert partial_f1(pred, gold) == pytest.approx(2 / 3)
    assert key_f1(pred, gold) == 1.0
    assert partial_f1(gold, gold) == 1.0
    assert partial_f1({"x": 1}, {"y": 2}) == 0.0
    assert leaf_pairs({"a": [], "b": {}}) == [("$.a", "[]"), ("$.b", "{}")]


def test_score_item_and_report_with_injected_validator():
    def validator(obj):
        return [] if "query" in obj else ["missing query"]

    gold = {"query": {"term": {"a": "x"}}}
    items = [
        score_item({"query": {"term": {"a": "x"}}}, gold, validator=validator),
        score_item({"querry": {"term": {"a": "x"}}}, gold, validator=validator),
        score_item(None, gold, validator=validator),
    ]
    assert [i["json_valid"] for i in items] == [1.0, 1.0, 0.0]
    assert [i["schema_valid"] for i in items] == [1.0, 0.0, 0.0]
    assert [i["exact_match"] for i in items] == [1.0, 0.0, 0.0]
    assert items[1]["schema_errors"] == ["missing query"]
    rep = structured_report(items, n_boot=100)
    assert rep["metrics"]["exact_match"]["value"] == pytest.approx(1 / 3)
    assert "schema_valid" in rep["metrics"]
    no_schema = structured_report([score_item({"a": 1}, {"a": 1})], n_boot=0)
    assert "schema_valid" not in no_schema["metrics"]


def test_mean_ci_and_paired():
    ci = mean_ci([1, 0, 1, 1], n_boot=500, seed=3)
    assert ci["value"] == 0.75 and 0 <= ci["ci_low"] <= 0.75 <= ci["ci_high"] <= 1
    a = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    b = [1, 0, 0, 1, 0, 0, 0, 1, 1, 0]
    pd_ = paired_diff(a, b, n_boot=500, seed=3)
    assert pd_["delta"] == pytest.approx(-0.4)
    assert pd_["relative"] == pytest.approx(-0.5)
    assert pd_["lost"] == 4 and pd_["gained"] == 0
    assert pd_["mcnemar_p"] == pytest.approx(0.125)
    assert pd_["delta_ci"][0] < -0.1 and pd_["delta_ci"][1] <= 0
    with pytest.raises(ValueError):
        paired_diff([1], [1, 0])


def test_mcnemar_symmetry():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 5) == mcnemar_exact(5, 3)


def test_macro_f1_bootstrap_matches_slow_path():
    import random

    from stepwise.evals.classification import macro_f1_ci
    from stepwise.evals.stats import statistic_ci

    rnd = random.Random(0)
    classes = [f"c{i}" for i in range(7)]
    gold = [rnd.choice(classes) for _ in range(80)]
    pred = [g if rnd.random() < 0.6 else rnd.choice(classes + [None]) for g in gold]
    fast = macro_f1_ci(gold, pred, classes, n_boot=300, seed=5)
    slow = statistic_ci(list(zip(gold, pred, strict=True)),
                        lambda ps: macro_f1([g for g, _ in ps], [p for _, p in ps], classes), n_boot=300, seed=5)
    assert fast["value"] == pytest.approx(slow["value"])
    assert fast["ci_low"] == pytest.approx(slow["ci_low"]) and fast["ci_high"] == pytest.approx(slow["ci_high"])
