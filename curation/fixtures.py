"""Build `generate/responses.jsonl` rows by the contract (docs/contracts.md), without a teacher.

For tests and demos of the curation stage alone: `response_row(...)` makes one row as the generate
stage would write it; `simulated_responses(recipe)` answers every input row with its gold label
(or a chosen wrong one) and a templated rationale, so `stepwise curate` can run on real data.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from stepwise.io import atomic_write_jsonl, iter_records
from stepwise.io import row_id as content_row_id
from stepwise.layout import RunLayout
from stepwise.recipe import Recipe


def response_row(
    row_id: str, input: dict[str, Any] | str, label: Any, rationale: str | None = None, *, gold: Any = None,
    parse_status: str = "ok", fmt: str = "dss", agreement: float | None = 1.0, line: int = 1,
    file: str = "inputs.jsonl", parse_detail: str | None = None, answer_text: str | None = None,
) -> dict[str, Any]:
    if answer_text is None and label is not None:
        answer_text = label if isinstance(label, str) else json.dumps(label)
    raw = None
    if parse_status != "not_run":
        raw = (f"<rationale>{rationale}</rationale>" if rationale else "") + f"<answer>{answer_text}</answer>"
    sample = {"rationale": rationale, "label": label, "answer_text": answer_text, "parse_status": parse_status,
              "raw": raw, "cache_key": hashlib.sha256(f"{row_id}".encode()).hexdigest()[:16], "error": None}
    return {
        "id": row_id, "input": input, "gold": gold, "source": {"file": file, "line": line}, "format": fmt,
        "rationale": rationale, "label": label if parse_status == "ok" else None, "answer_text": answer_text,
        "parse_status": parse_status, "parse_detail": parse_detail, "raw": raw, "samples": [sample],
        "agreement": agreement, "usage": {"input_tokens": 100, "output_tokens": 40}, "cost": 0.0,
        "error": "teacher failed" if parse_status == "error" else None, "attempts": 1,
    }


def simulated_responses(recipe: Recipe, wrong_share: float = 0.0, seed: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """One contract row per input row: gold answer (or a wrong class), templated rationale."""
    rng = random.Random(seed)
    rows = []
    for path in recipe.data.input_files:
        p = recipe.resolve(path)
        for line, raw in iter_records(p):
            inp = {f: raw[f] for f in recipe.task.input_fields if f in raw}
            gold = raw.get(recipe.data.label_field) if recipe.data.label_field else None
            rid = str(raw[recipe.data.id_field]) if recipe.data.id_field and recipe.data.id_field in raw \
                else content_row_id(inp)
            label = gold
            if recipe.task.is_classification and rng.random() < wrong_share:
                label = rng.choice([c for c in recipe.task.label_set if c != gold])
            if recipe.task.is_classification:
                rationale = (f"The customer describes their situation; the key point of the message matches "
                             f"the intent {str(label).replace('_', ' ')}.")
            else:
                rationale = "The question asks for matching documents; the relevant mapping fields decide the query type."
            rows.append(response_row(rid, inp, label, rationale, gold=gold, line=line, file=str(p)))
            if limit and len(rows) >= limit:
                return rows
    return rows


def write_responses(run_path: Path, rows: list[dict[str, Any]]) -> Path:
    path = RunLayout(Path(run_path)).responses
    atomic_write_jsonl(path, rows)
    return path
