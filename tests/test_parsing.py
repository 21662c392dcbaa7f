from __future__ import annotations

import pytest
from stepwise.pipelines.parsing import parse_answer
from stepwise.pipelines.prompts import build_messages

from stepwise.recipe import TaskSpec

CLS = TaskSpec(name="t", classes=["billing", "technical"], label_aliases={"payments": "billing"}, instructions="x")
JS = TaskSpec(name="t", structured="json", instructions="x")


@pytest.mark.parametrize("text,status,label", [
    ("<rationale>charged twice</rationale><answer>billing</answer>", "ok", "billing"),
    ("<rationale>r</rationale><answer> Billing. </answer>", "ok", "billing"),
    ("<rationale>r</rationale><answer>payments</answer>", "ok", "billing"),
    ("<answer>billing</answer>", "missing_rationale", "billing"),
    ("<rationale>r</rationale><answer>refund</answer>", "invalid_label", None),
    ("<rationale>r</rationale>", "missing_answer", None),
    ("<rationale>r</rationale><answer>billi", "missing_answer", None),
    ('{"rationale": "r", "answer": "technical"}', "ok", "technical"),
    (None, "error", None),
])
def test_parse_classification(text, status, label):
    parsed = parse_answer(text, CLS, "dss")
    assert parsed.parse_status == status
    assert parsed.label == label


def test_parse_label_only_accepts_bare_label():
    assert parse_answer("technical", CLS, "label_only").label == "technical"
    assert parse_answer("<answer>technical</answer>", CLS, "label_only").parse_status == "ok"


@pytest.mark.parametrize("text,status", [
    ('<rationale>r</rationale><answer>{"query": {"match_all": {}}}</answer>', "ok"),
    ('<rationale>r</rationale><answer>```json\n{"a": 1}\n```</answer>', "ok"),
    ("<rationale>r</rationale><answer>{query: </answer>", "invalid_json"),
])
def test_parse_structured(text, status):
    assert parse_answer(text, JS, "dss").parse_status == status


def test_messages_have_format_and_few_shot():
    task = TaskSpec(name="t", classes=["billing", "technical"], instructions="Classify.",
                    few_shot=[{"input": {"text": "card charged"}, "rationale": "money", "answer": "billing"}])
    msgs = build_messages(task, {"text": "app crashes"}, "dss")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "<rationale>" in msgs[0]["content"] and "Labels: billing, technical" in msgs[1]["content"]
    assert msgs[2]["content"] == "<rationale>money</rationale><answer>billing</answer>"
    assert msgs[-1]["content"].endswith("app crashes")
    assert "<rationale>" not in build_messages(task, {"text": "x"}, "label_only")[0]["content"]
