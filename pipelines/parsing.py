"""Parse a teacher's (or student's) text into rationale, label and a parse status.

One parser serves the teacher at generation time and the student at evaluation time, so both are
judged by the same rules. Statuses: ok, missing_rationale, missing_answer, invalid_label,
invalid_json (and `error`, set by the caller when no text came back at all).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from stepwise.recipe import TaskSpec

PARSE_STATUSES = ("ok", "missing_rationale", "missing_answer", "invalid_label", "invalid_json", "error")

# How well-formed an answer is, best first: the one ranking generate (which sample or attempt to
# keep) and curation's dedup (which duplicate to keep) both use. `not_run`: never asked.
_STATUS_RANK = {"ok": 0, "missing_rationale": 1, "invalid_label": 2, "invalid_json": 2, "missing_answer": 3,
                "error": 4, "not_run": 5}


def status_rank(status: str | None) -> int:
    """Lower is better; an unknown status ranks last."""
    return _STATUS_RANK.get(status or "", 9)

_RATIONALE = re.compile(r"<rationale>(.*?)</rationale>", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass
class ParsedAnswer:
    rationale: str | None
    label: Any
    answer_text: str | None
    parse_status: str
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_label(text: str) -> str:
    text = text.strip().strip("`'\".").strip()
    return re.sub(r"[\s\-]+", "_", text.lower())


class LabelMatcher:
    """Maps free-form label text to a canonical class via normalisation and aliases."""

    def __init__(self, classes: list[str], aliases: dict[str, str] | None = None):
        self.classes = list(classes)
        self._lookup = {normalize_label(c): c for c in classes}
        for alias, target in (aliases or {}).items():
            self._lookup[normalize_label(alias)] = target

    def match(self, text: str) -> str | None:
        return self._lookup.get(normalize_label(text))


def _json_mode(text: str) -> tuple[str | None, Any, bool] | None:
    """Responses under a JSON-schema response_format: {"rationale": ..., "answer": ...}."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict) and "answer" in obj and set(obj) <= {"rationale", "answer"}:
        return obj.get("rationale"), obj["answer"], True
    return None


def parse_answer(text: str | None, task: TaskSpec, fmt: str = "dss", matcher: LabelMatcher | None = None) -> ParsedAnswer:
    if text is None:
        return ParsedAnswer(None, None, None, "error", "no text")
    rationale: str | None
    answer_raw: Any
    json_mode = _json_mode(text)
    if json_mode is not None:
        rationale, answer_raw, _ = json_mode
        answer_text = answer_raw if isinstance(answer_raw, str) else json.dumps(answer_raw)
    else:
        m_r = _RATIONALE.search(text)
        m_a = _ANSWER.search(text)
        rationale = m_r.group(1).strip() if m_r else None
        if m_a:
            answer_raw = answer_text = m_a.group(1).strip()
        elif fmt == "label_only" and "<answer>" not in text.lower() and text.strip():
            answer_raw = answer_text = text.strip()  # bare label is acceptable for the ablation
        else:
            return ParsedAnswer(rationale, None, None, "missing_answer", "no <answer>...</answer> block")
    if isinstance(rationale, str) and not rationale.strip():
        rationale = None

    label, status, detail = _interpret(answer_raw, task, matcher)
    if status == "ok" and fmt == "dss" and not rationale:
        status, detail = "missing_rationale", "no <rationale>...</rationale> block"
    return ParsedAnswer(rationale, label, answer_text, status, detail)


def _interpret(answer: Any, task: TaskSpec, matcher: LabelMatcher | None) -> tuple[Any, str, str | None]:
    if task.is_classification:
        if not isinstance(answer, str):
            return None, "invalid_label", "answer is not a label string"
        matcher = matcher or LabelMatcher(task.label_set, task.label_aliases)
        label = matcher.match(answer)
        if label is None:
            return None, "invalid_label", f"'{answer[:80]}' is not one of the task's classes"
        return label, "ok", None
    if not isinstance(answer, str):
        return answer, "ok", None
    body = answer.strip()
    fence = _FENCE.match(body)
    if fence:
        body = fence.group(1)
    try:
        return json.loads(body), "ok", None
    except json.JSONDecodeError as exc:
        return None, "invalid_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}"
