"""The schema validator for structured answers, injected into `stepwise.evals.structured.score_item`.

The validator for a recipe's `task.validator` is curation's (curation vendors the OpenSearch spec;
evals does not duplicate it), looked up in its table `stepwise.curation.validate.SCHEMA_VALIDATORS`.
`adapt` turns whatever a validator returns (a list of errors, an error string or None, a bool,
`(ok, errors)`, an object with `.errors`/`.ok`, or an exception) into "a list of error strings,
empty when valid".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stepwise.curation.validate import SCHEMA_VALIDATORS
from stepwise.evals.structured import SchemaValidator


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


def validator_for(task_validator: str) -> tuple[SchemaValidator | None, str]:
    """The validator for a recipe's `task.validator`, and a note on where it came from."""
    if task_validator == "json":
        return None, "json (no schema)"
    fn = SCHEMA_VALIDATORS.get(task_validator)
    if fn is None:
        return None, (f"{task_validator}: no validator in stepwise.curation.validate.SCHEMA_VALIDATORS; "
                      "schema validity not reported")
    return adapt(fn), f"stepwise.curation.validate.SCHEMA_VALIDATORS[{task_validator!r}]"
