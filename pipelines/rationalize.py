"""Rationalization (the STaR idea): ask the teacher to explain an answer that is already known.

A row whose teacher label contradicts its gold label (`curation.on_gold_mismatch: rationalize`), or
whose label a reviewer corrected (`review.rationalize_corrections`), is asked once more: the DSS
prompt of generation with the known answer as a hint ("The correct answer is: X. Explain step by
step why ...", `stepwise.pipelines.prompts.rationalize_messages`). Hand-written glue over
generation's own machinery, so nothing here is a second copy of it:

- the same response cache (its key names the hint, the sampling settings and the constraint, so a
  killed run resumes without paying twice and `--offline` replays), the same executor and backends
  (`stepwise.pipelines.generate._execute`), the same re-asks of malformed answers (`walk_chain`,
  up to `teacher.max_attempts`) and the same parser;
- the same cost ledger and cap: each request is booked under its row's generation key (`base_key`),
  so the recipe's spend, which the cap reads, is one sum over generation and rationalization;
- the same constrained decoding, narrowed to the answer: for classification the teacher's label set
  in the constraint is just [X] (regex, JSON-schema enum, vLLM regex or GBNF grammar, whichever the
  backend uses), so one backend call per distinct answer. A structured (JSON) answer is constrained
  as in generation (to JSON / the task's schema) but not to the gold object itself; curation then
  rejects an answer that is not the gold one (`rationalize_wrong_answer`).

The caller decides what to do with the answer (curation checks the new rationale like any other).
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from stepwise.pipelines.cache import CacheEntry, ResponseCache, request_key
from stepwise.pipelines.executor import Budget, Job, RunStats
from stepwise.pipelines.generate import (
    GenerateError,
    InputRow,
    _execute,
    _parser,
    _safe_counter,
    cache_path,
    generation_params,
    plan_requests,
    price_fn,
    reasks_allowed,
    request_constraint,
    request_model,
    walk_chain,
)
from stepwise.pipelines.prompts import answer_to_text, rationalize_messages

from stepwise.io import canonical_json
from stepwise.recipe import Recipe, TaskSpec


class RationalizeError(RuntimeError):
    """Rationalization cannot proceed (offline cache miss, a backend that cannot start): says why."""


@dataclass
class Ask:
    """One row to rationalize: its input, the known answer (canonical label or JSON) and the row's
    generation request key, under which its spend is booked in the ledger (None: its own key)."""

    id: str
    input: dict[str, Any] | str
    answer: Any
    base_key: str | None = None
    why: str = "gold_mismatch"  # or "reviewer_correction"


@dataclass
class RationalizeResult:
    records: dict[str, dict[str, Any]]  # ask id -> what the teacher answered (see `_record`)
    requested: int = 0
    cache_hits: int = 0
    sent: int = 0
    cost_usd: float = 0.0
    stopped_reason: str | None = None
    statuses: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"requested": self.requested, "cache_hits": self.cache_hits, "sent": self.sent,
                "cost_usd": round(self.cost_usd, 6), "statuses": dict(sorted(self.statuses.items())),
                "stopped_reason": self.stopped_reason}


class _Pinned:
    """The recipe as the backends read it, with the task's label set narrowed to the one answer
    (every other section read through): the constraint each backend builds from `recipe.task`
    then allows exactly that answer."""

    def __init__(self, recipe: Recipe, task: TaskSpec):
        self._recipe, self.task = recipe, task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._recipe, name)


def pinned(recipe: Recipe, answer: Any) -> Any:
    if not recipe.task.is_classification:
        return recipe
    # model_copy skips validation (a one-class task is not a valid recipe task, on purpose)
    return _Pinned(recipe, recipe.task.model_copy(update={"classes": [str(answer)], "label_aliases": {}}))


@dataclass
class _Planned:
    ask: Ask
    target: Any  # the (pinned) recipe the backend runs with
    messages: list[dict[str, str]]
    chain: list[str]  # keys of answers 1..max_attempts


def plan(recipe: Recipe, asks: list[Ask]) -> list[_Planned]:
    t = recipe.teacher
    params = generation_params(recipe)
    model = request_model(recipe)  # a GGUF by its content, as generation keys it
    out = []
    for ask in asks:
        target = pinned(recipe, ask.answer)
        messages = rationalize_messages(recipe.task, ask.input, ask.answer)
        constraint = {"rationalize": answer_to_text(ask.answer),
                      "constraint": request_constraint(target.task, target.teacher, "dss")}
        chain = [request_key(t.provider, model, messages, params, constraint, 0, attempt=a)
                 for a in range(t.max_attempts)]
        out.append(_Planned(ask, target, messages, chain))
    return out


def generation_keys(recipe: Recipe, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Row id -> the first-attempt key of its first generation sample: the ledger key its
    rationalization is booked under (the same key generation books its answers under)."""
    inputs = [InputRow(str(r["id"]), r["input"], r.get("gold"), r.get("source") or {}) for r in rows]
    gen = plan_requests(recipe, inputs)
    return {row.id: keys[0] for row, keys in zip(gen.rows, gen.keys, strict=True) if keys}


def owed(recipe: Recipe, asks: list[Ask], *, offline: bool, retry_unparsed: bool = True) -> int:
    """Requests a run would send now (not answered yet, failed under max_attempts, malformed to re-ask)."""
    if offline or not asks:
        return 0
    planned = plan(recipe, asks)
    path = cache_path(recipe)
    if not path.exists():
        return len(planned)
    cache = ResponseCache(path)
    try:
        cached = cache.get_many([k for p in planned for k in p.chain])
    finally:
        cache.close()
    parse, reask = _parser(recipe), reasks_allowed(recipe, retry_unparsed, offline)
    return sum(1 for p in planned
               if walk_chain(p.chain, cached, parse, recipe.teacher.max_attempts, reask).next_key is not None)


def run_rationalize(recipe: Recipe, asks: list[Ask], *, ledger_keys: list[str] | None = None, offline: bool = False,
                    max_cost: float | None = None, progress: bool = True, retry_unparsed: bool = True
                    ) -> RationalizeResult:
    """Ask what the cache does not hold yet, then read every ask's answer from the cache.
    `ledger_keys`: the recipe's generation keys, whose spend (generation and earlier
    rationalization) counts against the cap before this run spends anything."""
    if not asks:
        return RationalizeResult({})
    t = recipe.teacher
    planned = plan(recipe, asks)
    cache = ResponseCache(cache_path(recipe))
    try:
        all_keys = [k for p in planned for k in p.chain]
        cached = cache.get_many(all_keys)
        hits = sum(1 for p in planned if p.chain[0] in cached and cached[p.chain[0]].status == "ok")
        parse, reask = _parser(recipe), reasks_allowed(recipe, retry_unparsed, offline)
        groups: dict[str, list[Job]] = {}
        targets: dict[str, Any] = {}
        counter = None
        paid = t.price.input_per_1k > 0 or t.price.output_per_1k > 0
        price = price_fn(recipe)
        for p in planned:
            st = walk_chain(p.chain, cached, parse, t.max_attempts, reask)
            if st.next_key is None:
                continue
            if paid and counter is None:
                counter = _safe_counter(recipe)
            worst = price(counter.upper_bound(p.messages), t.max_new_tokens) if counter is not None else 0.0
            group = canonical_json(p.ask.answer) if recipe.task.is_classification else ""
            groups.setdefault(group, []).append(Job(key=st.next_key, messages=p.messages, worst_case_cost=worst,
                                                    row_input=p.ask.input, base_key=p.ask.base_key or p.chain[0],
                                                    attempt=st.next_attempt))
            targets.setdefault(group, p.target)
        todo = sum(len(g) for g in groups.values())
        if offline and todo:
            first = next(iter(groups.values()))[0]
            ask = next(p.ask for p in planned if first.key in p.chain)
            raise RationalizeError(f"--offline: {todo} of {len(planned)} rationalization requests are not in the "
                                   f"cache {cache.path} (first missing row id={ask.id}); run without --offline "
                                   "to request them")
        session = f"{os.getpid()}-{uuid.uuid4().hex[:10]}"
        keys = list(dict.fromkeys([*(ledger_keys or []), *(p.ask.base_key or p.chain[0] for p in planned)]))
        cap = max_cost if max_cost is not None else t.max_cost
        budget = Budget(cap, cache, session, cache.spend(keys, exclude_session=session).total)
        stats = RunStats()
        not_run: set[str] = set()
        for group, jobs in groups.items():
            if stats.stopped_reason:
                not_run.update(j.key for j in jobs)
                continue
            try:
                got = _execute(targets[group], jobs, cache, budget, progress)
            except GenerateError as exc:  # missing credentials, a backend that cannot start
                raise RationalizeError(str(exc)) from None
            stats.sent += got.sent
            stats.cost += got.cost
            stats.failed += got.failed
            not_run.update(got.not_run)
            stats.stopped_reason = stats.stopped_reason or got.stopped_reason
        cached = cache.get_many(all_keys)
        records = {p.ask.id: _record(p, cached, parse, t.max_attempts, reask, not_run) for p in planned}
        result = RationalizeResult(records, requested=len(planned), cache_hits=hits, sent=stats.sent,
                                   cost_usd=stats.cost, stopped_reason=stats.stopped_reason,
                                   statuses=dict(Counter(r["status"] for r in records.values())))
    finally:
        cache.close()
    return result


def _record(p: _Planned, cached: dict[str, CacheEntry], parse, max_attempts: int, reask: bool,
            not_run: set[str]) -> dict[str, Any]:
    """What a rationalization produced, as curation and lineage keep it: the parsed rationale and
    answer (`status` is the parse status, or `error` / `not_run`), the request key, usage and cost."""
    st = walk_chain(p.chain, cached, parse, max_attempts, reask)
    usage = {"input_tokens": sum(e.input_tokens for e in st.paid), "output_tokens": sum(e.output_tokens for e in st.paid)}
    base = {"why": p.ask.why, "asked_answer": p.ask.answer, "usage": usage,
            "cost": round(sum(e.cost for e in st.paid), 8), "answers": len(st.paid)}
    if st.answer is None:
        key = st.next_key or p.chain[0]
        if st.error is not None:
            return {**base, "status": "error", "cache_key": key, "error": st.error.error, "rationale": None,
                    "label": None, "answer_text": None, "raw": None}
        why = "cost cap reached" if key in not_run else "pending"
        return {**base, "status": "not_run", "cache_key": key, "error": f"not attempted: {why}", "rationale": None,
                "label": None, "answer_text": None, "raw": None}
    parsed = st.parsed
    assert parsed is not None
    return {**base, "status": parsed.parse_status, "detail": parsed.detail, "cache_key": st.answer_key,
            "rationale": parsed.rationale, "label": parsed.label, "answer_text": parsed.answer_text,
            "raw": st.answer.text if st.answer else None, "error": None}
