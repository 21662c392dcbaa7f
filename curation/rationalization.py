"""`curation.on_gold_mismatch: rationalize`: curate asks the teacher to explain the gold answer of
each row whose teacher answer contradicts it, before validation (hand-written glue).

The requests go through `stepwise.pipelines.rationalize` (generation's cache, ledger, cap, executor,
re-asks and constraint, narrowed to the gold answer). Each such row gets a `rationalization`
record (the new rationale and answer, its status, cache key, usage and cost); validation
(`stepwise.curation.validate.Validator`) then swaps it in when its answer is the gold one and checks
the new rationale like any other: consistency with the gold answer, not a copy of the input,
length. A row that fails is rejected with a reason of its own (`rationalize_*`,
`rationalized_rationale_inconsistent`, ...), counted in the funnel. The teacher's own answer stays
in the row (`teacher_answer`), and `rationale_source` says whose rationale trains.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from stepwise.curation.validate import gold_mismatches
from stepwise.pipelines.rationalize import Ask, RationalizeResult, generation_keys, owed, run_rationalize

from stepwise.io import read_jsonl
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir


class RationalizeStopped(Exception):
    """The cost cap stopped rationalization: curate is recorded `stopped` (exit 3), resumable."""


def mismatch_asks(recipe: Recipe, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Ask]]:
    pairs = gold_mismatches(recipe, rows)
    keys = generation_keys(recipe, [row for row, _ in pairs])
    return [(row, Ask(str(row["id"]), row["input"], gold, keys.get(str(row["id"])))) for row, gold in pairs]


def attach_rationalizations(recipe: Recipe, rows: list[dict[str, Any]], *, offline: bool = False,
                            max_cost: float | None = None, progress: bool = False,
                            retry_unparsed: bool = True) -> RationalizeResult:
    """Ask (or replay from the cache) the rationalization of every gold-mismatch row and attach it
    to the row as `rationalization`. Raises RationalizeError (offline cache miss, backend down)."""
    asks = mismatch_asks(recipe, rows)
    ledger = list(generation_keys(recipe, rows).values())
    result = run_rationalize(recipe, [a for _, a in asks], ledger_keys=ledger, offline=offline, max_cost=max_cost,
                             progress=progress, retry_unparsed=retry_unparsed)
    for row, ask in asks:
        row["rationalization"] = result.records[ask.id]
    return result


def owed_rationalizations(recipe: Recipe, run: RunDir, *, offline: bool, retry_unparsed: bool = True) -> int:
    """Rationalization requests a curate run would send now (the pipeline's `owed` hook)."""
    if recipe.curation.on_gold_mismatch != "rationalize" or offline or not run.layout.responses.exists():
        return 0
    rows = read_jsonl(run.layout.responses)
    return owed(recipe, [a for _, a in mismatch_asks(recipe, rows)], offline=offline, retry_unparsed=retry_unparsed)


def rationale_sources(splits: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Per split: how many rows train with a rationale from `teacher`, `rationalized`, `reviewer`
    (`none`: no rationale, e.g. label-only). General-mix rows are not counted."""
    out = {}
    for name, rows in splits.items():
        c = Counter((r.get("rationale_source") or ("teacher" if r.get("rationale") else "none"))
                    for r in rows if not r.get("general"))
        out[name] = dict(sorted(c.items()))
    return out


def report(result: RationalizeResult | None, outcomes: dict[str, int] | None,
           splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """The funnel's `rationalize` entry: requests, cache hits, cost, and what became of the rows."""
    if result is None:
        return None
    kept = {name: sum(1 for r in rows if r.get("rationale_source") == "rationalized") for name, rows in splits.items()
            if name != "test"}
    return {**result.summary(), "outcomes": outcomes or {}, "in_splits": kept}


def rationalize_corrected(recipe: Recipe, rows: list[dict[str, Any]], *, offline: bool = False,
                          max_cost: float | None = None, progress: bool = False) -> dict[str, Any]:
    """`review.rationalize_corrections`: each reviewed row whose label a reviewer corrected and that
    kept no rationale (`stepwise.review.stage.settle_rationale` dropped the teacher's, and no rewrite
    passed) asks the teacher to explain the corrected answer. A rationalization that passes
    curation's rationale checks against that answer trains (`rationale_source: rationalized`); one
    that does not leaves the row label-only, the reason in `review.rationalize_rejected`. Rows are
    changed in place; returns the counts for the review summary."""
    from stepwise.curation.validate import Validator

    v = Validator(recipe)
    targets = [r for r in rows if (r.get("review") or {}).get("corrected") and not r.get("rationale")
               and not r.get("general")]
    keys = generation_keys(recipe, targets)
    asks = []
    for r in targets:
        answer = v.gold_answer(r["label"])
        if answer is not None:
            asks.append((r, Ask(str(r["id"]), r["input"], answer, keys.get(str(r["id"])), why="reviewer_correction")))
    result = run_rationalize(recipe, [a for _, a in asks], ledger_keys=list(keys.values()), offline=offline,
                             max_cost=max_cost, progress=progress)
    counts: Counter[str] = Counter()
    for row, ask in asks:
        rec = result.records[ask.id]
        review = row.setdefault("review", {})
        review["rationalization"] = rec
        reason = None
        if rec["status"] != "ok":
            reason = f"rationalize_{rec['status']}: {rec.get('detail') or rec.get('error') or ''}".rstrip(": ")
        else:
            label, rej = v._label({**row, "label": rec["label"], "answer_text": rec["answer_text"], "checks": {}})
            if rej is not None or not v._agrees_with_gold(label, row["label"]):
                reason = f"rationalize_wrong_answer: asked to explain '{ask.answer}', got '{rec['answer_text']}'"
            else:
                rej = v.rationalized_rationale({**row, "rationale": rec["rationale"]}, label)
                if rej is not None:
                    reason = f"rationalized_{rej.reason}: {rej.detail}"
        if reason:
            review["rationalize_rejected"] = reason
            counts["rationalize_rejected"] += 1
        else:
            row.update(rationale=rec["rationale"], rationale_source="rationalized")
            counts["rationalized_corrections"] += 1
    return {"requested": len(asks), **counts, **result.summary()}
