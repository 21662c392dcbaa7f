"""GBNF grammars for the llama.cpp teacher: the DSS output format as llama.cpp constrains it.

Hand-written: the DSS grammar, the exact equivalent of `constraints.dss_regex` (same tags, same
rationale length bound, labels as string literals). Library: structured (`task.structured: json`)
answers get their JSON grammar from llama-cpp-python's port of llama.cpp's JSON-schema-to-grammar
converter, applied to `constraints.answer_schema` (for `validator: opensearch_query_dsl` the bounded
OpenSearch subset, field names from the row's mapping), inside the same tags.

Rule names are fixed here and never derived from labels: GBNF rule names allow only [a-zA-Z0-9-].
"""

from __future__ import annotations

import json
from typing import Any

from stepwise.pipelines.constraints import _TAG_TOKENS, answer_schema, per_row, too_large_message

from stepwise.recipe import TaskSpec

# A larger grammar (a mapping with thousands of fields) makes every llama.cpp sampling step slow.
MAX_GRAMMAR_CHARS = 5_000_000  # about 1,100 mapped fields at json_depth 1


class GrammarError(ValueError):
    """No grammar can be built for the task (the converter's message, or the missing extra)."""


def gbnf_literal(s: str) -> str:
    """A GBNF string literal (quotes and backslashes escaped; newlines too, so one rule stays one line)."""
    esc = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return '"' + esc + '"'


def rationale_bounds(max_new_tokens: int, is_classification: bool, answer_tokens: int = 16) -> tuple[int, int]:
    """The same bound as `dss_regex` (kept in step by tests/test_llamacpp.py)."""
    budget = max_new_tokens - _TAG_TOKENS - (answer_tokens if is_classification else max_new_tokens // 2)
    return 8, max(16, budget)


def _answer_json_rules(schema: dict[str, Any], max_new_tokens: int) -> str:
    """The answer object's grammar from the JSON-schema converter, its root renamed `dss-answer-json`."""
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError as exc:
        raise GrammarError(f"JSON answers under the llamacpp teacher need llama-cpp-python "
                           f"(pip install 'stepwise[llamacpp]'): {exc}") from None

    try:
        text = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 - the converter raises ValueError/KeyError/AssertionError
        raise GrammarError(f"answer JSON schema {json.dumps(schema)[:200]}: llama.cpp's JSON-schema-to-grammar "
                           f"failed: {type(exc).__name__}: {exc}") from None
    # Hand-written bound: the converter's free-form strings, arrays and objects are unbounded (`*`),
    # and a weak model fills them until max_new_tokens cuts the JSON: each key/string gets a quarter
    # of the answer's room, each free array/object at most 4 items.
    bound = max(8, max_new_tokens // 4)
    lines = []
    for line in text.splitlines():
        if line.startswith("root ::="):
            line = "dss-answer-json ::=" + line[len("root ::="):]
        if line.startswith("string ::="):
            line = line.replace("char*", f"char{{0,{bound}}}")
        if line.startswith(("array ::=", "object ::=")):
            line = line.replace(")*", "){0,3}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def dss_gbnf(task: TaskSpec, fmt: str, max_new_tokens: int, *, depth: int = 1, row_input: Any = None) -> str:
    """The whole output: `<rationale>…</rationale><answer>label|json</answer>` (or the answer alone).
    A structured answer follows `constraints.answer_schema` (for the row's mapping, when given)."""
    if task.is_classification:
        answer = "dss-label"
        extra = "dss-label ::= " + " | ".join(gbnf_literal(c) for c in task.label_set) + "\n"
    else:
        answer = "dss-answer-json"
        schema = answer_schema(task, depth, row_input)
        extra = _answer_json_rules(schema, max_new_tokens)
        if len(extra) > MAX_GRAMMAR_CHARS:
            raise GrammarError(too_large_message(task, depth, row_input, f"{len(extra):,} characters of GBNF "
                                                 f"(limit {MAX_GRAMMAR_CHARS:,})"))
    if fmt == "label_only":
        root = f'root ::= "<answer>" {answer} "</answer>"\n'
        return root + extra
    lo, hi = rationale_bounds(max_new_tokens, task.is_classification)
    root = f'root ::= "<rationale>" dss-rationale "</rationale><answer>" {answer} "</answer>"\n'
    return root + f"dss-rationale ::= [^<]{{{lo},{hi}}}\n" + extra


def grammar_fingerprint(task: TaskSpec, fmt: str, max_new_tokens: int, depth: int = 1) -> dict[str, Any]:
    """The cache key's constraint for this provider: the grammar text for classification; for JSON
    answers the schema the converter turns into one (so planning needs no llama.cpp import), and
    the input field a row's own field names come from (the row itself is in the request's messages)."""
    if task.is_classification:
        return {"gbnf": dss_gbnf(task, fmt, max_new_tokens)}
    lo, hi = rationale_bounds(max_new_tokens, False)
    fp: dict[str, Any] = {"gbnf_dss": {"format": fmt, "rationale": [lo, hi], "string_max": max(8, max_new_tokens // 4),
                                       "free_items_max": 4},
                          "answer_json_schema": answer_schema(task, depth)}
    if per_row(task):
        fp["field_names_from"] = task.mapping_field
    return fp
