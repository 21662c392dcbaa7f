"""`stepwise estimate`: tokens and cost of a generation run before it starts.

Prompt tokens are counted with the teacher's tokenizer when it is local, else approximated at
~4 characters per token (no tokenizer download offline). Output tokens are bounded by
`max_new_tokens`, or measured on `--sample N` real requests (which land in the cache and are
not paid again by the run).
"""

from __future__ import annotations

from typing import Any

from pipelines.cache import ResponseCache
from pipelines.generate import approx_tokens, cache_path, load_inputs, plan_requests, price_fn
from stepwise.recipe import Recipe


def estimate_run(recipe: Recipe, sample: int = 0) -> dict[str, Any]:
    rows = load_inputs(recipe)
    plan = plan_requests(recipe, rows)
    t = recipe.teacher
    counter = approx_tokens
    method = "approx (4 chars/token)"
    if t.provider == "transformers":
        from transformers import AutoTokenizer

        from stepwise.models import resolve_model_dir

        tok = AutoTokenizer.from_pretrained(resolve_model_dir(t.model))

        def counter(msgs):  # noqa: F811 - exact count with the local tokenizer
            return len(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))

        method = "teacher tokenizer"
    requests = len(rows) * t.num_rationales
    prompt_tokens = sum(counter(m) for m in plan.messages) * t.num_rationales
    cache = ResponseCache(cache_path(recipe))
    cached = cache.get_many([k for ks in plan.keys for k in ks])
    done = sum(1 for e in cached.values() if e.status == "ok")
    out_per_req = float(t.max_new_tokens)
    out_method = "max_new_tokens (upper bound)"
    if sample:
        from pipelines.generate import _execute, _pending_jobs

        sub = plan.__class__(plan.rows[:sample], plan.messages[:sample], [ks[:1] for ks in plan.keys[:sample]])
        jobs = _pending_jobs(recipe, sub, cached)
        if jobs:
            _execute(recipe, jobs, cache, None, progress=True)
        got = [e for e in cache.get_many([ks[0] for ks in sub.keys]).values() if e.status == "ok"]
        if got:
            out_per_req = sum(e.output_tokens for e in got) / len(got)
            out_method = f"mean of {len(got)} sampled responses"
    cache.close()
    price = price_fn(recipe)
    remaining = max(0, requests - done)
    frac = remaining / requests if requests else 0.0
    est_out = out_per_req * requests
    return {
        "input rows": len(rows),
        "requests (rows x num_rationales)": requests,
        "already cached": done,
        "prompt tokens": f"{prompt_tokens} ({method})",
        "output tokens": f"{est_out:.0f} ({out_method})",
        "cost, whole run": f"${price(prompt_tokens, int(est_out)):.4f}",
        "cost, still to pay": f"${price(int(prompt_tokens * frac), int(est_out * frac)):.4f}",
        "max_cost": t.max_cost if t.max_cost is not None else "none",
    }
