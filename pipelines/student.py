"""The student's chat format: one definition for training export and for evaluation.

`dss_output` decides what the student learns (DESIGN.md):
- `multitask` (the DSS paper): two examples per input, the user turn prefixed `[label]` (answer
  only) or `[rationale]` (rationale only); at inference the student is asked with `[label]`.
- `cot`: one example whose answer is `<rationale>...</rationale><answer>...</answer>`.
- `label_only`: the ablation: `<answer>...</answer>` only.
The system prompt is the task's own, with no format instructions: the student learns the format.
"""

from __future__ import annotations

from typing import Any

from stepwise.pipelines.prompts import answer_to_text, user_message

from stepwise.recipe import TaskSpec

LABEL_PREFIX = "[label] "
RATIONALE_PREFIX = "[rationale] "


def inference_messages(task: TaskSpec, row_input: dict[str, Any] | str, dss_output: str) -> list[dict[str, str]]:
    """What the trained student is sent at inference (no assistant turn)."""
    user = user_message(task, row_input)
    if dss_output == "multitask":
        user = LABEL_PREFIX + user
    return [{"role": "system", "content": task.system_prompt.strip()}, {"role": "user", "content": user}]


def inference_parse_format(dss_output: str) -> str:
    """The `fmt` to give `stepwise.pipelines.parsing.parse_answer` for the student's output."""
    return "dss" if dss_output == "cot" else "label_only"


def training_examples(
    task: TaskSpec, row_input: dict[str, Any] | str, rationale: str | None, answer: Any, dss_output: str
) -> list[tuple[str, list[dict[str, str]]]]:
    """(kind, messages) training examples for one curated row; kind is label|rationale|cot."""
    system = {"role": "system", "content": task.system_prompt.strip()}
    user = user_message(task, row_input)
    answer_block = f"<answer>{answer_to_text(answer)}</answer>"
    if dss_output == "multitask":
        out = [("label", [system, {"role": "user", "content": LABEL_PREFIX + user},
                          {"role": "assistant", "content": answer_block}])]
        if rationale:
            out.append(("rationale", [system, {"role": "user", "content": RATIONALE_PREFIX + user},
                                      {"role": "assistant", "content": f"<rationale>{rationale.strip()}</rationale>"}]))
        return out
    if dss_output == "cot":
        if not rationale:
            return [("label", [system, {"role": "user", "content": user}, {"role": "assistant", "content": answer_block}])]
        content = f"<rationale>{rationale.strip()}</rationale>{answer_block}"
        return [("cot", [system, {"role": "user", "content": user}, {"role": "assistant", "content": content}])]
    return [("label", [system, {"role": "user", "content": user}, {"role": "assistant", "content": answer_block}])]
