"""Property tests: splits are disjoint, deterministic, stratified; curation never loses a row."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stepwise.curation.curate import curate_rows
from stepwise.curation.fixtures import response_row
from stepwise.curation.splits import allocate, stratified_split

from stepwise.recipe import Recipe

rows_strategy = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 10_000)), min_size=0, max_size=120,
    unique_by=lambda t: t[1],
)
RATIOS = {"train": 0.7, "val": 0.1, "test": 0.2}


def _rows(items):
    return [{"id": f"id{n}", "label": lab} for lab, n in items]


@settings(max_examples=60, deadline=None)
@given(rows_strategy, st.integers(0, 5))
def test_split_disjoint_complete_and_order_independent(items, seed):
    rows = _rows(items)
    out = stratified_split(rows, RATIOS, seed, lambda r: r["label"])
    ids = [r["id"] for part in out.values() for r in part]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every row exactly once
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    again = stratified_split(shuffled, RATIOS, seed, lambda r: r["label"])
    assert {k: {r["id"] for r in v} for k, v in out.items()} == {k: {r["id"] for r in v} for k, v in again.items()}


@settings(max_examples=60, deadline=None)
@given(rows_strategy)
def test_split_is_stratified(items):
    rows = _rows(items)
    out = stratified_split(rows, RATIOS, 1, lambda r: r["label"])
    total = Counter(r["label"] for r in rows)
    for name, ratio in RATIOS.items():
        got = Counter(r["label"] for r in out[name])
        for label, n in total.items():
            assert abs(got[label] - n * ratio) < 1.0 + 1e-9, (name, label, got[label], n)


def test_seed_changes_assignment():
    rows = _rows([("a", i) for i in range(100)])
    a = {r["id"] for r in stratified_split(rows, RATIOS, 1)["test"]}
    b = {r["id"] for r in stratified_split(rows, RATIOS, 2)["test"]}
    assert a != b and len(a) == len(b) == 20


@given(st.integers(0, 500), st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4))
def test_allocate_sums(n, ratios):
    counts = allocate(n, ratios)
    assert sum(counts) == n and all(c >= 0 for c in counts)


RECIPE = Recipe.model_validate({
    "name": "t", "data": {"inputs": "x.jsonl"}, "teacher": {"model": "stub", "base_url": "http://127.0.0.1:1/v1"},
    "task": {"name": "t", "classes": ["a", "b", "c"], "instructions": "x"},
    "curation": {"balance": {"max_ratio": 2.0}, "rationale": {"min_chars": 10},
                 "dedup": {"minhash": {"ngram": 2}}},
})
WORDS = ["card", "lost", "rate", "euro", "pin", "blocked", "arrive", "late", "top", "up", "fee", "fx"]
row_spec = st.tuples(
    st.lists(st.sampled_from(WORDS), min_size=0, max_size=8),
    st.sampled_from(["a", "b", "c", "zzz"]),
    st.sampled_from(["ok", "ok", "ok", "not_run", "invalid_label", "error"]),
    st.sampled_from([None, "The customer asks about it, so the label fits well.", "short", "It is b."]),
    st.sampled_from([None, "a", "b"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(row_spec, max_size=40))
def test_rows_in_equal_rows_kept_plus_rejected(specs):
    rows = [response_row(f"r{i}", {"text": " ".join(w)}, lab, rat, gold=gold, parse_status=status)
            for i, (w, lab, status, rat, gold) in enumerate(specs)]
    splits, funnel = curate_rows(rows, RECIPE)
    out_ids = [r["id"] for k in ("train", "val", "test") for r in splits[k]] + [r["id"] for r in funnel.rejected]
    assert sorted(out_ids) == sorted(r["id"] for r in rows)
    for step in funnel.steps:
        assert step["in"] + step.get("added", 0) == step["out"] + sum(step["removed"].values()) + sum(
            step.get("moved", {}).values())
