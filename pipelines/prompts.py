"""Render the Distilling Step-by-Step prompt for one input.

The system message carries the task's system prompt and the output format of the DSS paper
(`<rationale>...</rationale><answer>...</answer>`; only `<answer>` for the label-only ablation).
Few-shot examples become earlier user/assistant turns, so chat models see the format used.
"""

from __future__ import annotations

import json
from typing import Any

from stepwise.recipe import FewShotExample, TaskSpec

DSS_FORMAT = (
    "For each input, first explain your step-by-step reasoning (rationale), then give the final answer.\n"
    "Format:\n<rationale>Step-by-step explanation here</rationale>\n<answer>{answer_hint}</answer>"
)
LABEL_ONLY_FORMAT = "Give only the final answer, no explanation.\nFormat:\n<answer>{answer_hint}</answer>"


def answer_hint(task: TaskSpec) -> str:
    if task.is_classification:
        return "exactly one label from the list"
    return "one JSON object, nothing else"


def answer_to_text(answer: Any) -> str:
    """How an answer is written inside <answer>: labels as-is, JSON compact."""
    if isinstance(answer, str):
        return answer
    return json.dumps(answer, ensure_ascii=False, separators=(", ", ": "))


def render_input(task: TaskSpec, row_input: dict[str, Any] | str) -> str:
    if isinstance(row_input, str):
        return row_input
    if task.input_template:
        values = {k: answer_to_text(v) if not isinstance(v, str) else v for k, v in row_input.items()}
        try:
            return task.input_template.format(**values)
        except KeyError as exc:
            raise ValueError(f"task.input_template names field {exc} that the input row lacks") from None
    if len(task.input_fields) == 1:
        value = row_input.get(task.input_fields[0], "")
        return value if isinstance(value, str) else answer_to_text(value)
    return "\n".join(f"{f}: {answer_to_text(row_input.get(f, ''))}" for f in task.input_fields)


def system_message(task: TaskSpec, fmt: str) -> str:
    template = DSS_FORMAT if fmt == "dss" else LABEL_ONLY_FORMAT
    return f"{task.system_prompt.strip()}\n\n{template.format(answer_hint=answer_hint(task))}"


def task_preamble(task: TaskSpec) -> str:
    text = task.instructions.strip()
    if task.is_classification:
        text += "\n\nLabels: " + ", ".join(task.label_set)
    return text


def user_message(task: TaskSpec, row_input: dict[str, Any] | str) -> str:
    return f"{task_preamble(task)}\n\nInput:\n{render_input(task, row_input)}"


def assistant_message(fmt: str, rationale: str | None, answer: Any) -> str:
    ans = f"<answer>{answer_to_text(answer)}</answer>"
    if fmt == "dss":
        return f"<rationale>{(rationale or '').strip()}</rationale>{ans}"
    return ans


def build_messages(task: TaskSpec, row_input: dict[str, Any] | str, fmt: str) -> list[dict[str, str]]:
    """The full chat for one input: system, few-shot turns, then the input."""
    messages = [{"role": "system", "content": system_message(task, fmt)}]
    for shot in task.few_shot:
        messages.extend(_shot_turns(task, shot, fmt))
    messages.append({"role": "user", "content": user_message(task, row_input)})
    return messages


RATIONALIZE_HINT = (
    "The correct answer is: {answer}\n"
    "Explain step by step why this is the correct answer for the input, then give exactly this answer."
)


def rationalize_messages(task: TaskSpec, row_input: dict[str, Any] | str, answer: Any) -> list[dict[str, str]]:
    """The chat that asks the teacher to explain a known answer (STaR's rationalization): the DSS
    prompt of `build_messages`, with the answer given as a hint after the input."""
    messages = build_messages(task, row_input, "dss")
    hint = RATIONALIZE_HINT.format(answer=answer_to_text(answer))
    messages[-1] = {"role": "user", "content": f"{messages[-1]['content']}\n\n{hint}"}
    return messages


def _shot_turns(task: TaskSpec, shot: FewShotExample, fmt: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": user_message(task, shot.input)},
        {"role": "assistant", "content": assistant_message(fmt, shot.rationale, shot.answer)},
    ]
