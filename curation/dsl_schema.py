"""Validate an OpenSearch search body against the vendored OpenSearch API specification.

The spec (`curation/schemas/opensearch/`, Apache-2.0, see ATTRIBUTION.md there) is OpenAPI 3.1:
JSON Schema 2020-12 spread over YAML files that `$ref` each other by relative path. We load each
file as a `referencing` resource under its file URI, so jsonschema resolves the refs itself.

Two adjustments, both hand-written because the spec is written for documentation and code
generation rather than strict validation:
- `oneOf` becomes `anyOf`: the spec uses `oneOf` for overlapping alternatives (a sort item
  `{"rating": {"order": "desc"}}` matches two of them), which strict `oneOf` would reject.
- The search body and `QueryContainer` are closed (`additionalProperties: false`): the spec leaves
  them open, but OpenSearch rejects an unknown query type or body key (`unknown query [bogus]`).
The error names the failing JSON path of the answer (`$.query.term.status.boost: 'x' is not of
type 'number'`).

`wrap_bare_query` is the one place a bare query clause (`{"bool": ...}`, no search-body key) is
repaired into a search body (`{"query": {"bool": ...}}`): curation's validator and eval's scoring
both call it and count the repair, so the two never disagree about the same answer.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

SPEC_DIR = Path(__file__).parent / "schemas" / "opensearch" / "spec"
_BODY = "namespaces/_core.yaml#/components/requestBodies/search/content/application~1json/schema"
_QUERY = "schemas/_common.query_dsl.yaml#/components/schemas/QueryContainer"

# Top-level keys of an OpenSearch search request body: an object with none of them is a bare query.
SEARCH_BODY_KEYS = frozenset({
    "query", "size", "from", "sort", "aggs", "aggregations", "_source", "fields", "highlight", "post_filter",
    "track_total_hits", "min_score", "search_after", "collapse", "script_fields", "stored_fields", "timeout",
    "explain", "version", "seq_no_primary_term", "track_scores", "docvalue_fields", "suggest", "rescore",
    "indices_boost", "terminate_after", "profile", "pit", "runtime_mappings", "stats", "ext",
})
BARE_QUERY_REPAIR = "bare_query_wrapped"  # the name the curation funnel and eval's report count it under


def wrap_bare_query(obj: Any) -> tuple[Any, bool]:
    """(search body, whether it was repaired): a non-empty object with no search-body key is a bare
    query clause and comes back as `{"query": obj}`; anything else comes back unchanged."""
    if isinstance(obj, dict) and obj and not (set(obj) & SEARCH_BODY_KEYS):
        return {"query": obj}, True
    return obj, False


def _relax(node: Any) -> Any:
    if isinstance(node, dict):
        out = {("anyOf" if k == "oneOf" else k): _relax(v) for k, v in node.items() if not k.startswith("x-")}
        if out.get("title") == "SearchRequestBody" or (
            out.get("type") == "object" and out.get("minProperties") == 1 and out.get("maxProperties") == 1
            and "bool" in out.get("properties", {}) and "match_all" in out.get("properties", {})
        ):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(node, list):
        return [_relax(v) for v in node]
    return node


@lru_cache(maxsize=2)
def _validator(entry: str):
    import jsonschema
    import yaml
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    resources = []
    for path in sorted(SPEC_DIR.rglob("*.yaml")):
        doc = _relax(yaml.safe_load(path.read_text(encoding="utf-8")))
        resources.append((path.resolve().as_uri(), Resource.from_contents(doc, default_specification=DRAFT202012)))
    registry = Registry().with_resources(resources)
    target = (SPEC_DIR / entry.split("#")[0]).resolve().as_uri() + "#" + entry.split("#")[1]
    return jsonschema.Draft202012Validator({"$ref": target}, registry=registry)


def validate_search_body(body: Any, *, bare_query: bool = False) -> str | None:
    """None when `body` is a valid search request body (or QueryContainer), else 'path: message'."""
    import jsonschema

    validator = _validator(_QUERY if bare_query else _BODY)
    errors = list(validator.iter_errors(body))
    if not errors:
        return None
    err = jsonschema.exceptions.best_match(errors)
    message = err.message
    if len(message) > 200:
        message = message[:200] + "..."
    return f"{err.json_path}: {message}"
