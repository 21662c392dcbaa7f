"""Structured-answer metrics (JSON, NL-to-DSL), as the task is judged in the NL-to-DSL setting.

Per item:
- `json_valid`: the answer parsed as a JSON object.
- `schema_valid`: the object passes the task's schema validator (injected: a callable returning a
  list of error strings; for `opensearch_query_dsl` it is curation's OpenSearch validator).
- `exact_match`: equal to the gold (or one of its alternatives) after canonicalisation.
- `partial_f1`: F1 over the multiset of (key path, leaf value) pairs, lists unordered; `key_f1` is
  the same over key paths only.

Canonicalisation (`canonicalize`): key order never matters (dicts compare as dicts); numbers
compare by value (`1`, `1.0`, `1e0` are equal; with `coerce_numeric_strings`, a string that is
exactly a number's JSON text, `"1"` or `"1.5"`, equals that number, as OpenSearch coerces them);
strings and keys are otherwise compared exactly (`"04567"` != `"4567"`, `"  Paris "` != `"Paris"`:
keyword values that differ match different documents); lists are unordered except under
order-carrying keys (`sort`). With `dsl=True` the OpenSearch shorthands are expanded first: a bare
query gets wrapped as `{"query": ...}` (`stepwise.curation.dsl_schema.wrap_bare_query`, the same repair
curation applies), a single bool clause becomes a one-element list, and `term`/`match`-style field
shorthands (`{"term": {"f": "x"}}`) become their long form (`{"term": {"f": {"value": "x"}}}`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from stepwise.curation.dsl_schema import wrap_bare_query
from stepwise.evals.stats import mean_ci

SchemaValidator = Callable[[Any], list[str]]

ORDERED_KEYS = frozenset({"sort"})
BOOL_CLAUSES = ("must", "should", "filter", "must_not")
_SHORTHAND = {
    "term": "value", "prefix": "value", "wildcard": "value", "regexp": "value", "fuzzy": "value",
    "match": "query", "match_phrase": "query", "match_phrase_prefix": "query", "match_bool_prefix": "query",
}
_NUMERIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


# -- canonicalisation --------------------------------------------------------------------------


def _num(x: float | int) -> int | float:
    if isinstance(x, bool):
        return x
    f = float(x)
    if math.isfinite(f) and f == int(f) and abs(f) < 2**53:
        return int(f)
    return f


def canonicalize(obj: Any, *, coerce_numeric_strings: bool = True, dsl: bool = False, _key: str | None = None) -> Any:
    """A normal form in which equal-meaning JSON values are equal (see the module doc)."""
    if dsl and _key is None:
        obj = expand_dsl(obj)
    if isinstance(obj, dict):  # keys as written: " status" and "status" are different fields
        return {str(k): canonicalize(v, coerce_numeric_strings=coerce_numeric_strings, _key=str(k))
                for k, v in obj.items()}
    if isinstance(obj, list):
        items = [canonicalize(v, coerce_numeric_strings=coerce_numeric_strings, _key=_key) for v in obj]
        if _key in ORDERED_KEYS:
            return items
        return sorted(items, key=_sort_key)
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, int | float):
        return _num(obj)
    if isinstance(obj, str):
        # Strings are compared exactly: a keyword "04567" is not "4567", nor "  Paris " "Paris".
        # Only a string that is exactly a number's JSON text ("4567", "1.5") equals that number,
        # as OpenSearch coerces either way; two different strings never become equal.
        if coerce_numeric_strings and _NUMERIC.match(obj):
            num = _num(float(obj))
            if json.dumps(num) == obj:
                return num
        return obj
    return obj


def _sort_key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def expand_dsl(obj: Any) -> Any:
    """OpenSearch query DSL shorthands in their long form (for comparison only)."""
    if not isinstance(obj, dict):
        return obj
    body, _ = wrap_bare_query(obj)  # the same repair curation applies (stepwise.curation.dsl_schema)
    return {k: (_expand_query(v) if k in ("query", "post_filter") else v) for k, v in body.items()}


def _expand_query(q: Any) -> Any:
    if isinstance(q, list):
        return [_expand_query(x) for x in q]
    if not isinstance(q, dict):
        return q
    out: dict[str, Any] = {}
    for kind, spec in q.items():
        if kind == "bool" and isinstance(spec, dict):
            new = dict(spec)
            for clause in BOOL_CLAUSES:
                if clause in new:
                    val = new[clause] if isinstance(new[clause], list) else [new[clause]]
                    new[clause] = [_expand_query(x) for x in val]
            out[kind] = new
        elif kind in _SHORTHAND and isinstance(spec, dict):
            out[kind] = {f: (v if isinstance(v, dict) else {_SHORTHAND[kind]: v}) for f, v in spec.items()}
        elif kind in ("constant_score", "nested", "has_child", "has_parent") and isinstance(spec, dict):
            out[kind] = {k: (_expand_query(v) if k in ("filter", "query") else v) for k, v in spec.items()}
        elif kind in ("dis_max",) and isinstance(spec, dict):
            out[kind] = {k: (_expand_query(v) if k == "queries" else v) for k, v in spec.items()}
        else:
            out[kind] = spec
    return out


def canonical_text(obj: Any, **kw: Any) -> str:
    return json.dumps(canonicalize(obj, **kw), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# -- per-item scores --------------------------------------------------------------------------


def leaf_pairs(obj: Any, path: str = "$") -> list[tuple[str, str]]:
    """(key path, leaf value) pairs; list positions are written `[]` (unordered)."""
    if isinstance(obj, dict):
        if not obj:
            return [(path, "{}")]
        out: list[tuple[str, str]] = []
        for k, v in obj.items():
            out.extend(leaf_pairs(v, f"{path}.{k}"))
        return out
    if isinstance(obj, list):
        if not obj:
            return [(path, "[]")]
        return [p for v in obj for p in leaf_pairs(v, f"{path}[]")]
    return [(path, json.dumps(obj, ensure_ascii=False))]


def _f1(pred: Counter, gold: Counter) -> float:
    if not pred and not gold:
        return 1.0
    overlap = sum((pred & gold).values())
    if not overlap:
        return 0.0
    p, r = overlap / sum(pred.values()), overlap / sum(gold.values())
    return 2 * p * r / (p + r)


def partial_f1(pred: Any, gold: Any, *, dsl: bool = False) -> float:
    """F1 over (key path, leaf value) pairs of the canonical forms."""
    return _f1(Counter(leaf_pairs(canonicalize(pred, dsl=dsl))), Counter(leaf_pairs(canonicalize(gold, dsl=dsl))))


def key_f1(pred: Any, gold: Any, *, dsl: bool = False) -> float:
    """F1 over key paths only (structure right, values aside)."""
    return _f1(Counter(p for p, _ in leaf_pairs(canonicalize(pred, dsl=dsl))),
               Counter(p for p, _ in leaf_pairs(canonicalize(gold, dsl=dsl))))


def exact_match(pred: Any, gold: Any, alternatives: Sequence[Any] = (), *, dsl: bool = False) -> bool:
    if pred is None:
        return False
    c = canonical_text(pred, dsl=dsl)
    return any(c == canonical_text(g, dsl=dsl) for g in [gold, *alternatives])


def score_item(
    pred: Any, gold: Any, *, alternatives: Sequence[Any] = (), validator: SchemaValidator | None = None,
    dsl: bool = False,
) -> dict[str, Any]:
    """All per-item structured scores; `pred` is the parsed answer (None when it did not parse)."""
    valid = isinstance(pred, dict)
    errors: list[str] | None = None
    if validator is not None:
        errors = list(validator(pred)) if valid else ["not a JSON object"]
    golds = [gold, *alternatives]
    return {
        "json_valid": float(valid),
        "schema_valid": None if validator is None else float(valid and not errors),
        "schema_errors": (errors or [])[:5] if validator is not None else None,
        "exact_match": float(valid and exact_match(pred, gold, alternatives, dsl=dsl)),
        "partial_f1": max(partial_f1(pred, g, dsl=dsl) for g in golds) if valid else 0.0,
        "key_f1": max(key_f1(pred, g, dsl=dsl) for g in golds) if valid else 0.0,
    }


HEADLINE = ("json_valid", "schema_valid", "exact_match", "partial_f1", "key_f1")


def structured_report(items: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int | None = None) -> dict[str, Any]:
    """Aggregate `score_item` results: mean and bootstrap 95% CI of each headline metric."""
    metrics: dict[str, Any] = {}
    scores: dict[str, list[float]] = {}
    for name in HEADLINE:
        vals = [it[name] for it in items if it.get(name) is not None]
        if name == "schema_valid" and not vals:
            continue
        metrics[name] = mean_ci(vals, n_boot, seed)
        scores[name] = vals
    return {"n": len(items), "metrics": metrics, "item_scores": scores}
