"""`stepwise estimate`: tokens and cost of a generation run before it starts.

Prompt tokens are counted with the teacher's tokenizer where one is known (`stepwise.pipelines.tokens`: the
local teacher's tokenizer with its chat template, `teacher.tokenizer`, tiktoken for OpenAI model
names), else approximated at ~4 characters per token; the output names the method. Output tokens
are bounded by `max_new_tokens`, or measured on `--sample N` real requests, which land in the
cache (not paid again by the run) and count against `max_cost` like any other request.
"""

from __future__ import annotations

import os
from typing import Any

from stepwise.curation.holdout import held_out_info
from stepwise.pipelines.cache import ResponseCache
from stepwise.pipelines.generate import (
    cache_path,
    load_inputs,
    new_budget,
    plan_requests,
    price_fn,
    split_inputs,
)
from stepwise.pipelines.tokens import prompt_counter

from stepwise.recipe import Recipe


def count_prompt_tokens(recipe: Recipe, messages: list[list[dict[str, str]]]) -> tuple[int, str]:
    """Prompt tokens of one request per row, and how they were counted."""
    counter = prompt_counter(recipe)
    return sum(counter.count(m) for m in messages), counter.method


def estimate_run(recipe: Recipe, sample: int = 0, max_cost: float | None = None) -> dict[str, Any]:
    rows, held_out = split_inputs(recipe, load_inputs(recipe))  # the gold test split is never requested
    plan = plan_requests(recipe, rows)
    held_keys = plan_requests(recipe, held_out).base_keys() if held_out else []  # paid before a re-split
    t = recipe.teacher
    cap = max_cost if max_cost is not None else t.max_cost
    requests = len(rows) * t.num_rationales
    per_row, method = count_prompt_tokens(recipe, plan.messages)
    prompt_tokens = per_row * t.num_rationales
    cache = ResponseCache(cache_path(recipe))
    cached = cache.get_many(plan.base_keys())
    done = sum(1 for e in cached.values() if e.status == "ok")
    out_per_req = float(t.max_new_tokens)
    out_method = "max_new_tokens (upper bound)"
    sample_note = None
    if sample:
        from stepwise.pipelines.generate import _execute, _pending_jobs

        sub = plan.__class__(plan.rows[:sample], plan.messages[:sample], [ks[:1] for ks in plan.keys[:sample]],
                             [chs[:1] for chs in plan.chains[:sample]])
        jobs = [j for j in _pending_jobs(recipe, sub, cache.get_many(sub.chain_keys()), reask=False) if j.attempt == 0]
        if jobs:  # the same ledger and cap as `stepwise generate`
            stats = _execute(recipe, jobs, cache, new_budget(plan, cache, cap, also=held_keys), progress=True)
            sample_note = stats.stopped_reason
        got = [e for e in cache.get_many([ks[0] for ks in sub.keys]).values() if e.status == "ok"]
        if got:
            out_per_req = sum(e.output_tokens for e in got) / len(got)
            out_method = f"mean of {len(got)} sampled responses"
    spent = cache.spend(plan.base_keys() + held_keys)
    cache.close()
    price = price_fn(recipe)
    remaining = max(0, requests - done)
    frac = remaining / requests if requests else 0.0
    est_out = out_per_req * requests
    saved = held_out_info(recipe, len(held_out))
    out: dict[str, Any] = {
        "input rows": len(rows) + len(held_out),
        "held out for test (never sent)": f"{saved['rows']} rows, {saved['requests_saved']} requests saved",
        "requests (rows x num_rationales)": requests,
        "already cached": done,
        "prompt tokens": f"{prompt_tokens} ({method})",
        "output tokens": f"{est_out:.0f} ({out_method})",
        "cost, whole run": f"${price(prompt_tokens, int(est_out)):.4f}",
        "cost, still to pay": f"${price(int(prompt_tokens * frac), int(est_out * frac)):.4f}",
        "cost, still to pay (Batch API)": (
            f"${price_fn(recipe, batch=True)(int(prompt_tokens * frac), int(est_out * frac)):.4f} "
            f"(x{t.price.batch_discount:g}; teacher.batch / --batch, results within {t.batch_completion_window})"),
        **prompt_cache_estimate(recipe, plan.messages, prompt_tokens, requests),
        "spent so far (ledger)": f"${spent.total:.4f}",
        "max_cost": cap if cap is not None else "none",
    }
    if recipe.curation.on_gold_mismatch == "rationalize":
        out.update(rationalize_estimate(recipe, rows, price))
    if sample_note:
        out["sample stopped"] = sample_note
    # eval scores the teacher on the test prompts too: those not cached are asked then, under the cap
    from stepwise.evals.teacher_compare import teacher_eval_estimate

    out.update(teacher_eval_estimate(recipe, held_out or None))  # the held-out split, else data.test_file
    return out


def rationalize_estimate(recipe: Recipe, rows: list[Any], price: Any) -> dict[str, str | int]:
    """`on_gold_mismatch: rationalize` asks once more for each row whose teacher answer contradicts
    its gold label. Which rows those are is known only after generation, so this is an upper bound:
    every row with a gold label (sent to the teacher) is counted, at max_new_tokens each."""
    from stepwise.pipelines.prompts import rationalize_messages

    gold = [r for r in rows if r.gold is not None]
    tokens, _ = count_prompt_tokens(recipe, [rationalize_messages(recipe.task, r.input, r.gold) for r in gold])
    out_tokens = len(gold) * recipe.teacher.max_new_tokens
    return {"rationalize requests (upper bound: every row with gold)": len(gold),
            "rationalize cost (upper bound)": f"${price(tokens, out_tokens):.4f} ({tokens} prompt tokens)"}


# OpenAI caches identical prompt prefixes of 1,024+ tokens, in steps of 128 tokens
CACHE_MIN_TOKENS, CACHE_STEP_TOKENS = 1024, 128


def shared_prefix(messages: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """The part every request shares, from the start (system prompt, few-shot turns, and the user
    turn's instructions and label list up to where the row's input begins)."""
    if not messages:
        return []
    first = messages[0]
    n = 0
    while n < len(first) - 1 and all(len(m) > n + 1 and m[n] == first[n] for m in messages):
        n += 1
    last = [m[n]["content"] for m in messages if len(m) > n]
    common = os.path.commonprefix(last) if len(last) == len(messages) else ""
    return [*first[:n], {"role": first[n]["role"], "content": common}]


def prompt_cache_estimate(recipe: Recipe, messages: list[list[dict[str, str]]], prompt_tokens: int,
                          requests: int) -> dict[str, str]:
    """Expected saving from the provider's prompt cache: every request after the first reuses the
    shared prefix if it is long enough (priced at price.cached_input_per_1k)."""
    p = recipe.teacher.price
    prefix = shared_prefix(messages)
    shared = prompt_counter(recipe).count(prefix) if prefix else 0
    cacheable = 0 if shared < CACHE_MIN_TOKENS else shared - (shared - CACHE_MIN_TOKENS) % CACHE_STEP_TOKENS
    cached_total = cacheable * max(0, requests - 1)
    rate = p.input_per_1k if p.cached_input_per_1k is None else p.cached_input_per_1k
    saving = cached_total * (p.input_per_1k - rate) / 1000.0
    note = ("" if cacheable else f"; under the {CACHE_MIN_TOKENS}-token minimum, no discount expected")
    return {"shared prompt prefix": f"{shared} tokens per request{note}",
            "expected prompt-cache saving": f"${saving:.4f} ({cached_total} of {prompt_tokens} prompt tokens cached"
                                            f" at ${rate:g}/1K; price.cached_input_per_1k)"}
