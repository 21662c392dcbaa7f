"""GBNF grammars for the llama.cpp teacher: the DSS output format as llama.cpp constrains it.

Hand-written: the DSS grammar, the exact equivalent of `constraints.dss_regex` (same tags, same
rationale length bound, labels as string literals). Library: structured (`task.structured: json`)
answers get their JSON grammar from llama-cpp-python's port of llama.cpp's JSON-schema-to-grammar
converter, applied to `constraints.json_schema`'s answer schema, inside the same tags; hand-written
again: a bounded OpenSearch query subset for `validator: opensearch_query_dsl`.

Rule names are fixed here and never derived from labels: GBNF rule names allow only [a-zA-Z0-9-].
"""

from __future__ import annotations

import json
from typing import Any

from stepwise.pipelines.constraints import _TAG_TOKENS, json_schema

from stepwise.recipe import TaskSpec


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


def _answer_json_rules(task: TaskSpec, fmt: str, max_new_tokens: int) -> str:
    """The answer object's grammar from the JSON-schema converter, its root renamed `dss-answer-json`."""
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError as exc:
        raise GrammarError(f"JSON answers under the llamacpp teacher need llama-cpp-python "
                           f"(pip install 'stepwise[llamacpp]'): {exc}") from None

    schema = json_schema(task, fmt)["properties"]["answer"]
    try:
        text = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 - the converter raises ValueError/KeyError/AssertionError
        raise GrammarError(f"answer JSON schema {json.dumps(schema)[:200]}: llama.cpp's JSON-schema-to-grammar "
                           f"failed: {type(exc).__name__}: {exc}") from None
    # Hand-written bound: the converter's free-form strings are unbounded (`char*`), and a weak model
    # fills them until max_new_tokens cuts the JSON; each key/string gets the regex's per-answer room.
    bound = max(8, max_new_tokens // 2)
    lines = []
    for line in text.splitlines():
        if line.startswith("root ::="):
            line = "dss-answer-json ::=" + line[len("root ::="):]
        if line.startswith("string ::="):
            line = line.replace("char*", f"char{{0,{bound}}}")
        lines.append(line)
    return "\n".join(lines) + "\n"


# Hand-written: a bounded subset of the OpenSearch search request body for `validator:
# opensearch_query_dsl`. The vendored spec converts (after bundling and workarounds) but is far too
# permissive for a small model (a dozen optional flags, endless arrays), and the converter ignores
# minProperties/maxProperties, so "one query type per clause" would not hold. Here every clause holds
# exactly one query type on one field: match/term/range/match_all leaves, bool with must/filter/
# should/must_not lists of 1-4 leaves, optional size 0-100 and sort of 1-2 fields. Field names are
# identifiers, not checked against the row's mapping (one grammar serves every row).
OPENSEARCH_SUBSET_GBNF = r"""dss-answer-json ::= "{" ws "\"query\"" ws ":" ws os-query os-size? os-sort? ws "}"
os-size ::= ws "," ws "\"size\"" ws ":" ws ([0-9] | [1-9] [0-9] | "100")
os-sort ::= ws "," ws "\"sort\"" ws ":" ws "[" ws os-sort-item (ws "," ws os-sort-item)? ws "]"
os-sort-item ::= "{" ws os-field ws ":" ws "{" ws "\"order\"" ws ":" ws ("\"asc\"" | "\"desc\"") ws "}" ws "}"
os-query ::= os-leaf | os-bool
os-leaf ::= os-match | os-term | os-range | os-match-all
os-match ::= "{" ws "\"match\"" ws ":" ws "{" ws os-field ws ":" ws os-scalar ws "}" ws "}"
os-term ::= "{" ws "\"term\"" ws ":" ws "{" ws os-field ws ":" ws os-scalar ws "}" ws "}"
os-range ::= "{" ws "\"range\"" ws ":" ws "{" ws os-field ws ":" ws "{" ws os-bound (ws "," ws os-bound)? ws "}" ws "}" ws "}"
os-bound ::= ("\"gte\"" | "\"gt\"" | "\"lte\"" | "\"lt\"") ws ":" ws os-scalar
os-match-all ::= "{" ws "\"match_all\"" ws ":" ws "{" ws "}" ws "}"
os-bool ::= "{" ws "\"bool\"" ws ":" ws "{" ws os-clause (ws "," ws os-clause){0,3} ws "}" ws "}"
os-clause ::= ("\"must\"" | "\"filter\"" | "\"should\"" | "\"must_not\"") ws ":" ws "[" ws os-leaf (ws "," ws os-leaf){0,3} ws "]"
os-field ::= "\"" [a-zA-Z_] [a-zA-Z0-9_.]{0,39} "\""
os-scalar ::= os-string | os-number | "true" | "false"
os-string ::= "\"" [^"\\<\n]{0,48} "\""
os-number ::= "-"? [0-9]{1,12} ("." [0-9]{1,6})?
ws ::= " "?
"""


def dss_gbnf(task: TaskSpec, fmt: str, max_new_tokens: int) -> str:
    """The whole output: `<rationale>…</rationale><answer>label|json</answer>` (or the answer alone)."""
    if task.is_classification:
        answer = "dss-label"
        extra = "dss-label ::= " + " | ".join(gbnf_literal(c) for c in task.label_set) + "\n"
    elif task.validator == "opensearch_query_dsl":
        answer, extra = "dss-answer-json", OPENSEARCH_SUBSET_GBNF
    else:
        answer = "dss-answer-json"
        extra = _answer_json_rules(task, fmt, max_new_tokens)
    if fmt == "label_only":
        root = f'root ::= "<answer>" {answer} "</answer>"\n'
        return root + extra
    lo, hi = rationale_bounds(max_new_tokens, task.is_classification)
    root = f'root ::= "<rationale>" dss-rationale "</rationale><answer>" {answer} "</answer>"\n'
    return root + f"dss-rationale ::= [^<]{{{lo},{hi}}}\n" + extra


def grammar_fingerprint(task: TaskSpec, fmt: str, max_new_tokens: int) -> dict[str, Any]:
    """The cache key's constraint for this provider: the grammar text for classification; for JSON
    answers the schema the converter turns into one (so planning needs no llama.cpp import)."""
    if task.is_classification or task.validator == "opensearch_query_dsl":
        return {"gbnf": dss_gbnf(task, fmt, max_new_tokens)}
    lo, hi = rationale_bounds(max_new_tokens, False)
    return {"gbnf_dss": {"format": fmt, "rationale": [lo, hi], "string_max": max(8, max_new_tokens // 2)},
            "answer_json_schema": json_schema(task, fmt)["properties"]["answer"]}
