"""Constrained decoding: make even a weak teacher emit the DSS format.

From the task we build one constraint and express it the way each backend understands:
- local transformers teachers: a regex applied with `outlines` 1.x directly (distilabel 1.5.3's
  outlines integration fails to load with outlines 1.3.3, so we do not go through it);
- OpenAI-compatible servers: a JSON-schema `response_format` ({"rationale", "answer"} with the
  label set as an enum), or vLLM's `guided_regex` extra parameter.
The rationale's length bound is derived from `max_new_tokens`, so a constrained output always
has room to close its tags.
"""

from __future__ import annotations

import re
from typing import Any

from stepwise.recipe import TaskSpec, TeacherSpec

# Tokens reserved for the tags and the answer when bounding the rationale (worst case 1 char/token
# for the rationale itself).
_TAG_TOKENS = 24


def _label_alternation(task: TaskSpec) -> str:
    return "(" + "|".join(re.escape(c) for c in task.label_set) + ")"


def dss_regex(task: TaskSpec, fmt: str, max_new_tokens: int, answer_tokens: int = 16) -> str:
    """Regex for the whole output; classification answers are limited to the label set."""
    answer = _label_alternation(task) if task.is_classification else r"\{[^<]{1," + str(max(8, max_new_tokens * 2)) + r"}\}"
    answer_block = f"<answer>{answer}</answer>"
    if fmt == "label_only":
        return answer_block
    budget = max_new_tokens - _TAG_TOKENS - (answer_tokens if task.is_classification else max_new_tokens // 2)
    rationale_max = max(16, budget)
    return f"<rationale>[^<]{{8,{rationale_max}}}</rationale>{answer_block}"


def json_schema(task: TaskSpec, fmt: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"type": "string", "enum": list(task.label_set)} if task.is_classification else {"type": "object"}
    props: dict[str, Any] = {"answer": answer}
    required = ["answer"]
    if fmt == "dss":
        props = {"rationale": {"type": "string"}, **props}
        required = ["rationale", "answer"]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def server_params(task: TaskSpec, teacher: TeacherSpec) -> dict[str, Any]:
    """Keyword arguments for distilabel's OpenAILLM.agenerate that constrain the server."""
    if not teacher.constrained_decoding or teacher.guided_decoding == "none":
        return {}
    mode = "response_format" if teacher.guided_decoding == "auto" else teacher.guided_decoding
    if mode == "vllm":
        return {"extra_body": {"guided_regex": dss_regex(task, teacher.format, teacher.max_new_tokens)}}
    # Sent through `extra_body`: distilabel 1.5.3 types `response_format` as Dict[str, str], which
    # rejects a nested JSON schema; the openai client merges extra_body into the request body.
    return {"extra_body": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "dss_answer",
                # strict mode forbids free-form objects, which structured answers need
                "strict": task.is_classification,
                "schema": json_schema(task, teacher.format),
            },
        }
    }}


def sampling_params(teacher: TeacherSpec) -> dict[str, Any]:
    """The teacher's sampling settings: part of every request's cache key and of its kwargs."""
    return {"max_new_tokens": teacher.max_new_tokens, "temperature": teacher.temperature, "top_p": teacher.top_p}


def generation_kwargs(task: TaskSpec, teacher: TeacherSpec) -> dict[str, Any]:
    """The keyword arguments the teacher LLM's generate call gets (distilabel's `generation_kwargs`),
    the one place both the in-process run and the Ray run take them from: the sampling settings,
    plus the server's constraint for an OpenAI-compatible teacher (a local transformers teacher is
    constrained by its own logits processor, built with the LLM)."""
    kwargs = sampling_params(teacher)
    if teacher.provider == "openai":
        kwargs.update(server_params(task, teacher))
    return kwargs


def constraint_fingerprint(task: TaskSpec, teacher: TeacherSpec) -> Any:
    """What the constraint is, for the cache key (a different constraint is a different request)."""
    if not teacher.constrained_decoding:
        return None
    if teacher.provider == "transformers":
        return {"regex": dss_regex(task, teacher.format, teacher.max_new_tokens)}
    return server_params(task, teacher) or None
