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

import json
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


# ---------------------------------------------------------------------------------------------
# Structured answers: the answer's JSON schema. Hand-written: a bounded subset of the OpenSearch
# search request body (the vendored spec in curation/schemas/opensearch converts, but is far too
# permissive for a small model and recursive); every instance of the subset validates against the
# spec (tests/test_json_constraint.py). Both converters (llama.cpp's JSON-schema-to-grammar and
# outlines_core's schema-to-regex) ignore min/maxProperties, so "one query type per clause" and "one
# field per leaf" are written as `anyOf` of single-key objects, which is also how field names are
# limited to the row's index mapping.

OPENSEARCH_SUBSET = "curation/schemas/opensearch/spec (the bounded subset in stepwise.pipelines.constraints)"
_NUMERIC = {"long", "integer", "short", "byte", "double", "float", "half_float", "scaled_float", "unsigned_long"}
_DATE = {"date", "date_nanos"}
_TEXT = {"text", "match_only_text", "search_as_you_type"}
_STRING_MAX = 48  # longest string value: room for a phrase or a date, not for a runaway repetition
_BOOL_CLAUSES = ("must", "filter", "should", "must_not")


class SchemaTooLarge(ValueError):
    """A constraint would not compile in reasonable time/size (exit 2 with the schema and the fallback)."""


def mapping_fields(mapping: Any) -> dict[str, str] | None:
    """Field path -> mapping type from an index mapping (`{"properties": ...}`, a dict or its JSON
    text; `{"mappings": {...}}` too); object/nested sub-fields as dotted paths. None when it holds none."""
    if isinstance(mapping, str):
        try:
            mapping = json.loads(mapping)
        except json.JSONDecodeError:
            return None
    if isinstance(mapping, dict) and isinstance(mapping.get("mappings"), dict):
        mapping = mapping["mappings"]
    if not isinstance(mapping, dict) or not isinstance(mapping.get("properties"), dict):
        return None
    out: dict[str, str] = {}

    def walk(props: dict[str, Any], prefix: str) -> None:
        for name, spec in props.items():
            if not isinstance(spec, dict):
                continue
            if isinstance(spec.get("properties"), dict):
                walk(spec["properties"], f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = str(spec.get("type", "keyword"))

    walk(mapping["properties"], "")
    return out or None


def _value(ftype: str | None) -> dict[str, Any]:
    """A field's value: by its mapping type; any scalar when the field (no mapping) is unknown."""
    string = {"type": "string", "maxLength": _STRING_MAX}
    if ftype is None:
        return {"anyOf": [string, {"type": "number"}, {"type": "boolean"}]}
    if ftype in _NUMERIC:
        return {"type": "number"}
    if ftype == "boolean":
        return {"type": "boolean"}
    return string


def _one_field(fields: dict[str, str] | None, names: list[str] | None, value: Any) -> dict[str, Any]:
    """An object with exactly one key, a field of the mapping (or any name when there is no mapping)."""
    if fields is None or not names:
        v = value(None) if callable(value) else value
        return {"type": "object", "additionalProperties": v}
    alts = [{"type": "object", "properties": {n: value(fields[n]) if callable(value) else value},
             "required": [n], "additionalProperties": False} for n in names]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def _single(key: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {key: body}, "required": [key], "additionalProperties": False}


def opensearch_subset_schema(fields: dict[str, str] | None, depth: int) -> dict[str, Any]:
    """The search body subset: `query` (match/term/range/exists/match_all leaves; bool with must/filter/
    should/must_not lists of 1-4 clauses, nested up to `depth` levels), optional `size`, optional `sort`
    of 1-2 fields. With `fields`, field names come from the mapping and values have the field's type;
    range and sort take numeric/date fields, term everything but full text, match text/keyword."""
    names = sorted(fields) if fields else None

    def pick(keep: set[str] | None, drop: set[str] = frozenset()) -> list[str] | None:  # type: ignore[assignment]
        if names is None or fields is None:
            return None
        chosen = [n for n in names if (keep is None or fields[n] in keep) and fields[n] not in drop]
        return chosen or names

    ordered = _NUMERIC | _DATE

    def range_body(ftype: str | None) -> dict[str, Any]:
        v = _value(ftype)
        return {"type": "object", "properties": {op: v for op in ("gte", "gt", "lte", "lt")},
                "additionalProperties": False}

    leaves = [
        _single("match", _one_field(fields, pick(None, {"boolean", *_NUMERIC, *_DATE}), _value)),
        _single("term", _one_field(fields, pick(None, _TEXT), _value)),
        _single("range", _one_field(fields, pick(ordered), range_body)),
        _single("exists", _single("field", {"type": "string", "enum": names} if names else
                                  {"type": "string", "maxLength": _STRING_MAX})),
        _single("match_all", {"type": "object", "properties": {}, "additionalProperties": False}),
    ]
    # Levels as $defs so llama.cpp's grammar names each once (outlines_core inlines them: its regex
    # grows about 4x per level, which is what bounds the depth).
    defs: dict[str, Any] = {"q0": {"anyOf": leaves}}
    for level in range(1, depth + 1):
        clause = {"type": "array", "items": {"$ref": f"#/$defs/q{level - 1}"}, "minItems": 1, "maxItems": 4}
        boolq = _single("bool", {"type": "object", "properties": {c: clause for c in _BOOL_CLAUSES},
                                 "additionalProperties": False})
        defs[f"q{level}"] = {"anyOf": [{"$ref": "#/$defs/q0"}, boolq]}
    order = _single("order", {"type": "string", "enum": ["asc", "desc"]})
    return {
        "$defs": defs,
        "type": "object",
        "properties": {
            "query": {"$ref": f"#/$defs/q{depth}"},
            "size": {"type": "integer", "minimum": 0, "maximum": 100},
            "sort": {"type": "array", "items": _one_field(fields, pick(ordered), order), "minItems": 1, "maxItems": 2},
        },
        "required": ["query"],
        "additionalProperties": False,
    }


def answer_schema(task: TaskSpec, depth: int, row_input: Any = None) -> dict[str, Any]:
    """The JSON schema of one structured answer. For `validator: opensearch_query_dsl` the bounded
    subset, its field names from the row's `task.mapping_field` when the task declares one (else any
    name); for plain JSON any object."""
    if task.validator != "opensearch_query_dsl":
        return {"type": "object"}
    fields = None
    if task.mapping_field and isinstance(row_input, dict):
        fields = mapping_fields(row_input.get(task.mapping_field))
    return opensearch_subset_schema(fields, depth)


def json_schema(task: TaskSpec, fmt: str, answer: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole output as one JSON object ({rationale, answer}); `answer` is the answer's schema
    (default: the label enum, or any object for structured answers)."""
    if answer is None:
        answer = {"type": "string", "enum": list(task.label_set)} if task.is_classification else {"type": "object"}
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
    # Structured answers: the answer's schema (the OpenSearch subset with any field name: one request
    # body serves every row) inside the {rationale, answer} object, as JSON for both server kinds.
    answer = None if task.is_classification else answer_schema(task, teacher.json_depth)
    if mode == "vllm":
        if answer is not None:
            return {"extra_body": {"guided_json": json_schema(task, teacher.format, answer)}}
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
                "schema": json_schema(task, teacher.format, answer),
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
        if task.is_classification:
            return {"regex": dss_regex(task, teacher.format, teacher.max_new_tokens)}
        return {"lark": dss_lark(task, teacher.format, teacher.max_new_tokens, teacher.json_depth),
                **({"field_names_from": task.mapping_field} if per_row(task) else {})}
    return server_params(task, teacher) or None


def per_row(task: TaskSpec) -> bool:
    """Whether a local constraint depends on the row (its own index mapping), not on the task alone;
    the row is in the request's messages, so the cache key names only where its field names come from."""
    return not task.is_classification and task.validator == "opensearch_query_dsl" and task.mapping_field is not None


def too_large_message(task: TaskSpec, depth: int, row_input: Any, size: str) -> str:
    """Which schema is too large, and the settings that make it smaller (or turn it off)."""
    where = OPENSEARCH_SUBSET if task.validator == "opensearch_query_dsl" else "the answer JSON schema"
    fields = None
    if task.mapping_field and isinstance(row_input, dict):
        fields = mapping_fields(row_input.get(task.mapping_field))
    of = f" for a row whose `{task.mapping_field}` maps {len(fields):,} fields" if fields else ""
    unset = "unset task.mapping_field (any field name), " if fields else ""
    return (f"{where}{of}, teacher.json_depth {depth}: {size}, too large to compile; fallback: {unset}"
            "lower teacher.json_depth, or set teacher.constrained_decoding: false")


def _lark_literal(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid Lark string literal


# Lark grammars over 2 MB (a very deep schema) take llguidance seconds to build per row.
MAX_LARK_CHARS = 2_000_000


def dss_lark(task: TaskSpec, fmt: str, max_new_tokens: int, depth: int, row_input: Any = None) -> str:
    """The DSS output with a structured answer as a Lark grammar for llguidance (through outlines):
    the same tags and rationale bound as `dss_regex`, the answer as `%json` of `answer_schema`
    (llguidance's JSON-schema support, compiled lazily: a per-row schema costs milliseconds)."""
    schema = json.dumps(answer_schema(task, depth, row_input), separators=(",", ":"))
    if len(schema) > MAX_LARK_CHARS:
        raise SchemaTooLarge(too_large_message(task, depth, row_input, f"{len(schema):,} characters of JSON schema "
                                               f"(limit {MAX_LARK_CHARS:,})"))
    answer = f'{_lark_literal("<answer>")} ans {_lark_literal("</answer>")}'
    rules = f"ans: %json {schema}\n"
    if fmt == "label_only":
        return f"start: {answer}\n{rules}"
    budget = max_new_tokens - _TAG_TOKENS - max_new_tokens // 2
    return (f'start: {_lark_literal("<rationale>")} RATIONALE {_lark_literal("</rationale>")} {answer}\n'
            f"RATIONALE: /[^<]{{8,{max(16, budget)}}}/\n{rules}")
