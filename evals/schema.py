"""The schema validator for structured answers, injected into `stepwise.evals.structured.score_item`.

For `task.validator: opensearch_query_dsl` we use curation's validator of OpenSearch query DSL
bodies (curation vendors the OpenSearch spec; evals does not duplicate it). It is found by name in
the `stepwise.curation` package; whatever it returns (a list of errors, a bool, `(ok, errors)`, an object
with `.errors`/`.ok`, or an exception) is adapted to "a list of error strings, empty when valid".
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from typing import Any

from stepwise.evals.structured import SchemaValidator

_CURATION = "stepwise.curation"
_CANDIDATE_MODULES = tuple(f"{_CURATION}.{name}" for name in (
    "schemas", "validators", "validate", "dsl", "opensearch", "validation", "checks"))
_NAME = re.compile(r"^(validate|check)_?\w*(dsl|opensearch|search_body|query)\w*$|^\w*(dsl|opensearch)\w*_(errors|validate|validator)$")


def adapt(fn: Callable[[Any], Any]) -> SchemaValidator:
    def validator(obj: Any) -> list[str]:
        try:
            out = fn(obj)
        except Exception as exc:  # noqa: BLE001 - a raising validator means "invalid"
            return [f"{type(exc).__name__}: {exc}"[:300]]
        if out is None or out is True:
            return []
        if out is False:
            return ["schema validation failed"]
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], bool):
            return [] if out[0] else [str(e) for e in (out[1] or ["schema validation failed"])]
        if hasattr(out, "errors"):
            errs = out.errors
            ok = getattr(out, "ok", getattr(out, "valid", not errs))
            return [] if ok else [str(e) for e in (errs or ["schema validation failed"])]
        if isinstance(out, list | tuple | set):
            return [str(e) for e in out]
        if isinstance(out, str):
            return [out] if out else []
        return [] if out else ["schema validation failed"]

    return validator


def find_curation_validator() -> tuple[SchemaValidator, str] | None:
    """(validator, 'module.function') from the curation package, or None when it has none yet."""
    try:
        pkg = importlib.import_module(_CURATION)
    except ImportError:
        return None
    names = list(_CANDIDATE_MODULES)
    for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        full = f"{_CURATION}.{mod.name}"
        if full not in names and any(k in mod.name for k in ("schema", "valid", "dsl", "opensearch")):
            names.append(full)
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - missing or broken optional module
            continue
        for attr in sorted(dir(module)):
            fn = getattr(module, attr)
            if callable(fn) and not isinstance(fn, type) and _NAME.match(attr) and getattr(fn, "__module__", "") == name:
                return adapt(fn), f"{name}.{attr}"
    return None


def opensearch_validator() -> tuple[SchemaValidator, str] | None:
    """stepwise.curation.dsl_schema.validate_search_body on the answer as curation accepts it: a bare query
    (no search-body key) is first wrapped as `{"query": ...}` by curation's own `wrap_bare_query`
    (task_eval counts that repair), then validated as a whole search body."""
    try:
        from stepwise.curation.dsl_schema import validate_search_body, wrap_bare_query
    except ImportError:
        return None

    def validator(obj: Any) -> list[str]:
        return adapt(lambda o: validate_search_body(wrap_bare_query(o)[0]))(obj)

    return validator, "stepwise.curation.dsl_schema.validate_search_body"


def validator_for(task_validator: str) -> tuple[SchemaValidator | None, str]:
    """The validator for a recipe's `task.validator`, and a note on where it came from."""
    if task_validator == "json":
        return None, "json (no schema)"
    found = opensearch_validator() or find_curation_validator()
    if found is None:
        return None, f"{task_validator}: no validator in curation/ yet; schema validity not reported"
    return found
