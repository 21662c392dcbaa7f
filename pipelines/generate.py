"""The generate stage: inputs -> teacher requests (through the cache) -> generate/responses.jsonl.

Every input row ends in a known state: a parsed response (`ok` or a named parse failure), `error`
with the last error text (retried by the next run up to `teacher.max_attempts`), or `not_run` when
a cost cap stopped the run first. With `num_rationales` > 1 each sample is its own cached request;
the majority label wins and its agreement rate is kept (self-consistency).

An answer that does not parse (missing answer, label outside the set, broken JSON...) is asked
again by the next run under a new cache key (the attempt number is part of it) with a fresh sample
seed, up to `teacher.max_attempts` answers per sample; every earlier answer stays in the cache and
its cost in the ledger. `--no-retry-unparsed` keeps the first answer. The cost cap is the ledger's:
what every earlier run spent on these inputs counts against `max_cost`.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepwise.curation.holdout import held_out_info, hold_out_test, row_fields
from stepwise.pipelines.cache import CacheEntry, ResponseCache, request_key
from stepwise.pipelines.constraints import (
    OPENSEARCH_SUBSET,
    SchemaTooLarge,
    constraint_fingerprint,
    dss_lark,
    dss_regex,
    generation_kwargs,
    per_row,
    sampling_params,
)
from stepwise.pipelines.executor import (
    Budget,
    FatalTeacherError,
    Job,
    RunStats,
    run_async_jobs,
    run_sync_batches,
)
from stepwise.pipelines.parsing import LabelMatcher, ParsedAnswer, parse_answer, status_rank
from stepwise.pipelines.prompts import build_messages
from stepwise.pipelines.tokens import approx_tokens, prompt_counter

from stepwise.io import DataFileError, atomic_write_jsonl, canonical_json, iter_records, row_id
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir, runs_root_for


class GenerateError(RuntimeError):
    """The stage cannot proceed (offline cache miss, missing credentials); message says why."""


class GenerateInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation; says what is safely cached (the CLI adds the resume command)."""

    def __init__(self, answered: int, total: int, cache: Path):
        self.answered, self.total, self.cache = answered, total, cache
        super().__init__(f"interrupted: {answered} of {total} teacher requests are answered and safely cached in "
                         f"{cache}; nothing paid for is lost")


@dataclass
class InputRow:
    id: str
    input: dict[str, Any]
    gold: Any
    source: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # the input row's other fields (holdout.row_fields)


@dataclass
class GenerateResult:
    path: Path
    rows: int
    status_counts: dict[str, int]
    stats: RunStats
    cache_hits: int
    stopped_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Inputs


def load_inputs(recipe: Recipe) -> list[InputRow]:
    """Read the recipe's input files; a row missing an input field is an error naming file:line."""
    rows: list[InputRow] = []
    seen: Counter[str] = Counter()
    fields = recipe.task.input_fields
    for file in recipe.data.input_files:
        path = recipe.resolve(file)
        assert path is not None
        for line, raw in iter_records(path):
            missing = [f for f in fields if f not in raw]
            if missing:
                raise DataFileError(f"{path}:{line}: missing input field(s) {', '.join(missing)} (task.input_fields)")
            inp = {f: raw[f] for f in fields}
            if recipe.data.id_field:
                if recipe.data.id_field not in raw:
                    raise DataFileError(f"{path}:{line}: missing id field '{recipe.data.id_field}' (data.id_field)")
                rid = str(raw[recipe.data.id_field])
                if seen[rid]:
                    raise DataFileError(f"{path}:{line}: duplicate id '{rid}' (data.id_field must be unique)")
            else:
                base = row_id(inp)
                rid = base if not seen[base] else f"{base}-{seen[base]}"
            seen[rid] += 1
            gold = raw.get(recipe.data.label_field) if recipe.data.label_field else None
            rows.append(InputRow(rid, inp, gold, {"file": str(file), "line": line}, row_fields(recipe, raw)))
    if recipe.data.limit and len(rows) > recipe.data.limit:
        rows = _subset(rows, recipe.data.limit, recipe.data.seed, recipe.data.stratify_limit)
    return rows


def split_inputs(recipe: Recipe, rows: list[InputRow]) -> tuple[list[InputRow], list[InputRow]]:
    """(rows to ask the teacher about, gold test rows held out before generation): the test split
    of gold-labelled inputs is never sent (stepwise.curation.holdout)."""
    return hold_out_test(recipe, rows, lambda r: r.id, lambda r: r.gold)


def held_out_record(row: InputRow) -> dict[str, Any]:
    """A held-out input as a test row, the shape of a `data.test_file` row in curate (with the input
    row's other fields, which eval may read: `dsl_alternatives`)."""
    return {**row.extra, "id": row.id, "input": row.input, "gold": row.gold, "source": row.source, "split": "test"}


def _subset(rows: list[InputRow], n: int, seed: int, stratify: bool) -> list[InputRow]:
    rng = random.Random(seed)
    if not stratify or all(r.gold is None for r in rows):
        keep = set(rng.sample(range(len(rows)), n))
        return [r for i, r in enumerate(rows) if i in keep]
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_class.setdefault(canonical_json(r.gold), []).append(i)
    for idx in by_class.values():
        rng.shuffle(idx)
    keep: set[int] = set()
    while len(keep) < n:  # round-robin over classes: balanced subset
        for idx in by_class.values():
            if idx and len(keep) < n:
                keep.add(idx.pop())
    return [r for i, r in enumerate(rows) if i in keep]


# --------------------------------------------------------------------------------------------
# Request planning


def generation_params(recipe: Recipe) -> dict[str, Any]:
    t = recipe.teacher
    params = sampling_params(t)
    if t.provider in ("transformers", "llamacpp"):
        params["seed"] = t.seed
    return params


def cache_path(recipe: Recipe) -> Path:
    if recipe.teacher.cache:
        p = recipe.resolve(recipe.teacher.cache)
        assert p is not None
        return p
    return runs_root_for(recipe) / "teacher_cache.sqlite"


@dataclass
class Plan:
    rows: list[InputRow]
    messages: list[list[dict[str, str]]]
    keys: list[list[str]]  # per row, one first-attempt key per sample
    # per row, per sample: the keys of answers 1..max_attempts (chains[i][s][0] == keys[i][s])
    chains: list[list[list[str]]] = field(default_factory=list)

    def base_keys(self) -> list[str]:
        return [k for ks in self.keys for k in ks]

    def chain_keys(self) -> list[str]:
        return [k for chs in self.chains for ch in chs for k in ch]


def request_model(recipe: Recipe) -> str:
    """The model as the cache key names it: a llamacpp teacher by its GGUF's content (the same file
    at another path hits, a changed file misses); any other by its name."""
    t = recipe.teacher
    if t.provider != "llamacpp":
        return t.model
    from stepwise.pipelines.llamacpp_llm import LlamaCppError, gguf_identity

    try:
        return gguf_identity(t.model)
    except LlamaCppError as exc:
        raise GenerateError(str(exc)) from None


def request_constraint(task: Any, t: Any, fmt: str) -> Any:
    """What constrains the answer, as the cache key names it (generation and rationalization alike)."""
    if t.provider == "llamacpp" and t.constrained_decoding:
        from stepwise.pipelines.grammar import grammar_fingerprint

        return grammar_fingerprint(task, fmt, t.max_new_tokens, t.json_depth)
    return constraint_fingerprint(task, t)


def plan_requests(recipe: Recipe, rows: list[InputRow]) -> Plan:
    t = recipe.teacher
    params = generation_params(recipe)
    constraint = request_constraint(recipe.task, t, t.format)
    messages = [build_messages(recipe.task, r.input, t.format) for r in rows]
    model = request_model(recipe)
    chains = [
        [[request_key(t.provider, model, m, params, constraint, s, attempt=a) for a in range(t.max_attempts)]
         for s in range(t.num_rationales)]
        for m in messages
    ]
    return Plan(rows, messages, [[ch[0] for ch in chs] for chs in chains], chains)


def price_fn(recipe: Recipe, batch: bool = False):
    """USD of one response: `cached` prompt tokens (served from the provider's prompt cache) at
    `cached_input_per_1k`; a Batch API response at `batch_discount` of the online price."""
    p = recipe.teacher.price
    factor = p.batch_discount if batch else 1.0
    cached_rate = p.input_per_1k if p.cached_input_per_1k is None else p.cached_input_per_1k

    def price(itok: int, otok: int, cached: int = 0) -> float:
        cached = min(max(0, cached), itok)
        return factor * ((itok - cached) * p.input_per_1k + cached * cached_rate + otok * p.output_per_1k) / 1000.0

    return price


def reasks_allowed(recipe: Recipe, retry_unparsed: bool, offline: bool) -> bool:
    """Whether malformed answers may be asked again now (a greedy local teacher would repeat itself)."""
    t = recipe.teacher
    return retry_unparsed and not offline and not (t.provider in ("transformers", "llamacpp") and t.temperature == 0)


def sample_seed(recipe: Recipe, attempt: int) -> int:
    return recipe.teacher.seed + attempt


@dataclass
class SampleState:
    """One (row, sample)'s answers across attempts, read from the cache."""

    answer_key: str | None = None  # the answer used (None: no answer yet)
    answer: CacheEntry | None = None
    parsed: ParsedAnswer | None = None
    paid: list[CacheEntry] = field(default_factory=list)  # every answer in the chain (each was paid)
    next_key: str | None = None  # the request to send now, if any
    next_attempt: int = 0
    error: CacheEntry | None = None  # the failed request at the head of the chain, if any


def walk_chain(chain: list[str], cached: dict[str, CacheEntry], parse, max_attempts: int, reask: bool) -> SampleState:
    st = SampleState()
    best: tuple[int, int] | None = None
    for a, key in enumerate(chain):
        entry = cached.get(key)
        if entry is not None and entry.status == "ok":
            parsed = parse(entry.text)
            st.paid.append(entry)
            rank = (status_rank(parsed.parse_status), -a)  # best-formed answer, latest on ties
            if best is None or rank < best:
                best = rank
                st.answer_key, st.answer, st.parsed = key, entry, parsed
            if parsed.parse_status == "ok":
                break
            continue  # malformed: a later attempt may hold (or be asked for) a better answer
        if a > 0 and not reask:
            break  # no new re-asks now; keep the answers there are
        st.error = entry
        if entry is None or entry.attempts < max_attempts:
            st.next_key, st.next_attempt = key, a
        break
    return st


def owed_requests(recipe: Recipe, *, offline: bool, retry_unparsed: bool) -> int:
    """How many requests a generate run would send now (failed rows under `max_attempts`,
    malformed answers to re-ask), read from the cache without loading a tokenizer. `stepwise run`
    re-runs generate when this is > 0 even though its inputs did not change."""
    if offline:
        return 0
    plan = plan_requests(recipe, split_inputs(recipe, load_inputs(recipe))[0])
    path = cache_path(recipe)
    if not path.exists():
        return sum(len(chains) for chains in plan.chains)
    cache = ResponseCache(path)
    try:
        cached = cache.get_many(plan.chain_keys())
    finally:
        cache.close()
    parse, reask = _parser(recipe), reasks_allowed(recipe, retry_unparsed, offline)
    t = recipe.teacher
    return sum(1 for chains in plan.chains for chain in chains
               if walk_chain(chain, cached, parse, t.max_attempts, reask).next_key is not None)


def _parser(recipe: Recipe):
    task, fmt = recipe.task, recipe.teacher.format
    matcher = LabelMatcher(task.label_set, task.label_aliases) if task.is_classification else None
    return lambda text: parse_answer(text, task, fmt, matcher)


def new_budget(plan: Plan, cache: ResponseCache, cap: float | None, also: list[str] | None = None) -> Budget:
    """This invocation's budget: the ledger's spend on these inputs so far counts against the cap,
    and on the `also` keys (the held-out test rows': paid before a re-split moved them to test)."""
    session = f"{os.getpid()}-{uuid.uuid4().hex[:10]}"
    prior = cache.spend(plan.base_keys() + list(also or []), exclude_session=session)
    return Budget(cap, cache, session, prior.total)


# --------------------------------------------------------------------------------------------
# Backends


def _api_key(recipe: Recipe) -> str:
    t = recipe.teacher
    key = os.environ.get(t.api_key_env)
    if key:
        return key
    if t.base_url:  # self-hosted servers (vLLM, Ollama, llama.cpp) usually need no key
        return "not-needed"
    raise GenerateError(f"teacher.api_key_env: environment variable {t.api_key_env} is not set (needed for {t.model})")


def build_openai_llm(recipe: Recipe, load: bool = True, client_retries: int = 0):
    """distilabel's OpenAILLM; retries are ours (executor) unless `client_retries` hands them to the SDK."""
    from distilabel.models.llms import OpenAILLM

    t = recipe.teacher
    llm = OpenAILLM(model=t.model, base_url=t.base_url or "https://api.openai.com/v1", api_key=_api_key(recipe),
                    max_retries=client_retries, timeout=int(max(1, t.timeout_s)))
    if load:  # pipelines (Ray) copy the LLM to workers and load it there
        llm.load()
    return llm


def build_local_llm(recipe: Recipe, load: bool = True):
    from stepwise.pipelines.local_llm import LocalTransformersLLM

    t = recipe.teacher
    regex = lark = None
    if t.constrained_decoding and recipe.task.is_classification:
        regex = dss_regex(recipe.task, t.format, t.max_new_tokens)
    elif t.constrained_decoding:  # structured: the answer's JSON schema through llguidance
        try:
            lark = dss_lark(recipe.task, t.format, t.max_new_tokens, t.json_depth)
        except SchemaTooLarge as exc:
            raise GenerateError(str(exc)) from None
        check_lark(recipe, lark)
    llm = LocalTransformersLLM(model=t.model, device=t.device, seed=t.seed, regex=regex, lark=lark,
                               n_threads=t.n_threads)
    if load:
        llm.load()
    return llm


# --------------------------------------------------------------------------------------------
# The stage


def run_generate(recipe: Recipe, run: RunDir, *, offline: bool = False, max_cost: float | None = None,
                 progress: bool = True, ray: bool = False, retry_unparsed: bool = True,
                 batch: bool | None = None, cancel_batches: bool = False) -> GenerateResult:
    """`batch` overrides `teacher.batch` (`--batch`); `cancel_batches` cancels the run's unfinished batches."""
    rows = load_inputs(recipe)
    if not rows:
        raise DataFileError(f"{recipe.data.input_files[0]}: no input rows")
    rows, held_out = split_inputs(recipe, rows)  # the gold test split is never sent to the teacher
    plan = plan_requests(recipe, rows)
    cache = ResponseCache(cache_path(recipe))
    run.stage_dir("generate")
    out_path = run.layout.responses
    held_path = run.layout.held_out_test
    inputs = [p for p in (recipe.resolve(f) for f in recipe.data.input_files) if p is not None]
    if recipe.source_path:
        inputs.append(recipe.source_path)
    cap = max_cost if max_cost is not None else recipe.teacher.max_cost
    reask = reasks_allowed(recipe, retry_unparsed, offline)
    with run.stage("generate", inputs=inputs) as st:
        atomic_write_jsonl(held_path, [held_out_record(r) for r in held_out])
        all_keys = plan.base_keys()
        cached = cache.get_many(plan.chain_keys())
        hits = sum(1 for k in all_keys if k in cached and cached[k].status == "ok")
        todo = _pending_jobs(recipe, plan, cached, reask)
        if offline and todo:
            missing_row = next(r for r, ks in zip(plan.rows, plan.keys, strict=True) if any(k in {j.key for j in todo} for k in ks))
            raise GenerateError(
                f"--offline: {len(todo)} of {len(all_keys)} teacher responses are not in the cache "
                f"{cache.path} (first missing row id={missing_row.id}); run without --offline to request them"
            )
        stats = RunStats()
        # what earlier runs paid for rows now held out for test still counts against the cap
        budget = new_budget(plan, cache, cap, also=plan_requests(recipe, held_out).base_keys() if held_out else None)
        use_batch = recipe.teacher.batch if batch is None else batch
        if use_batch and ray:
            raise GenerateError("--ray sends requests online; with teacher.batch (or --batch) run without --ray")
        batch_info: dict[str, Any] | None = None
        if todo or cancel_batches:
            try:
                if ray and recipe.teacher.provider == "llamacpp":
                    raise GenerateError("--ray: the llamacpp teacher runs in this process (one model, one KV "
                                        "cache); run without --ray")
                if ray and recipe.teacher.provider == "transformers" and row_grammars(recipe, todo[:1]):
                    raise GenerateError("--ray: a grammar per row (task.mapping_field) is applied in this process "
                                        "only; run without --ray")
                if ray:
                    from stepwise.pipelines.ray_runner import RayMissing, run_with_ray

                    try:
                        stats = run_with_ray(recipe, todo, cache, budget, build_local_llm=build_local_llm,
                                             build_openai_llm=build_openai_llm)
                    except RayMissing as exc:
                        raise GenerateError(str(exc)) from None
                elif use_batch or cancel_batches:
                    stats, batch_info = _run_batches(recipe, run, todo, cache, plan, cap, progress, cancel_batches)
                else:
                    stats = _execute(recipe, todo, cache, budget, progress)
            except KeyboardInterrupt as exc:
                if getattr(exc, "batches_running", False):
                    raise  # says which batches keep running and how to resume or cancel them
                now = cache.get_many(plan.chain_keys())
                answered = sum(1 for chs in plan.chains for ch in chs if any(k in now and now[k].status == "ok" for k in ch))
                raise GenerateInterrupted(answered, len(all_keys), cache.path) from None
        cached = cache.get_many(plan.chain_keys())
        not_run = set(stats.not_run)
        parse = _parser(recipe)
        records = [_assemble(recipe, row, chains, cached, not_run, parse, reask)
                   for row, chains in zip(plan.rows, plan.chains, strict=True)]
        atomic_write_jsonl(out_path, records)
        counts = Counter(r["parse_status"] for r in records)
        st.outputs(out_path, held_path)
        st.counts(rows=len(records), held_out=len(held_out),
                  **{f"status_{k}": v for k, v in sorted(counts.items())})
        ledger = cache.spend(all_keys)
        reasked = sum(r.get("reasks", 0) for r in records)
        st.extra(
            teacher={"provider": recipe.teacher.provider, "model": recipe.teacher.model,
                     "base_url": recipe.teacher.base_url, "format": recipe.teacher.format,
                     "num_rationales": recipe.teacher.num_rationales},
            cache={"path": str(cache.path), "hits": hits, "requests_sent": stats.sent, "retried": stats.retried,
                   "failed": stats.failed, "errors": stats.errors},
            tokens={"input": sum(r["usage"]["input_tokens"] for r in records),
                    "output": sum(r["usage"]["output_tokens"] for r in records)},
            cost={"total_usd": round(ledger.paid, 6), "this_run_usd": round(stats.cost, 6), "max_cost": cap,
                  "in_doubt_usd": round(ledger.in_doubt, 6), "cached_input_tokens": stats.cached_tokens,
                  "cached_input_saving_usd": round(stats.cached_saving, 6)},
            reasks={"answers_reasked": reasked, "enabled": reask},
            held_out=held_out_info(recipe, len(held_out)),
        )
        if batch_info is not None:
            st.extra(batch=batch_info)
        if stats.stopped_reason:
            st.mark("incomplete")
            st.extra(stopped_reason=stats.stopped_reason)
    cache.close()
    return GenerateResult(out_path, len(records), dict(counts), stats, hits, stats.stopped_reason,
                          extra={"held_out": len(held_out), **({"batch": batch_info} if batch_info else {})})


def _run_batches(recipe: Recipe, run: RunDir, todo: list[Job], cache: ResponseCache, plan: Plan,
                 cap: float | None, progress: bool, cancel: bool) -> tuple[RunStats, dict[str, Any]]:
    from stepwise.pipelines.batch import BatchAPIError, BatchRunner

    if recipe.teacher.provider != "openai":
        raise GenerateError(f"teacher.batch: the Batch API needs an OpenAI-compatible server (provider openai), "
                            f"not {recipe.teacher.provider}; set teacher.batch: false")
    try:
        kwargs = generation_kwargs(recipe.task, recipe.teacher)
        runner = BatchRunner(recipe, run, cache, base_keys=plan.base_keys(), cap=cap, progress=progress,
                             kwargs_for=lambda job: request_kwargs(recipe, kwargs, job.attempt),
                             price=price_fn(recipe, batch=True), online_price=price_fn(recipe),
                             api_key=_api_key(recipe))
        out = runner.cancel() if cancel else runner.execute(todo)
    except BatchAPIError as exc:
        raise GenerateError(str(exc)) from None
    return out.stats, out.summary


def _pending_jobs(recipe: Recipe, plan: Plan, cached: dict[str, CacheEntry], reask: bool = True) -> list[Job]:
    t = recipe.teacher
    price = price_fn(recipe)
    paid = t.price.input_per_1k > 0 or t.price.output_per_1k > 0
    counter = None
    parse = _parser(recipe)
    jobs: list[Job] = []
    seen: set[str] = set()
    for row, msgs, chains in zip(plan.rows, plan.messages, plan.chains, strict=True):
        for chain in chains:
            state = walk_chain(chain, cached, parse, t.max_attempts, reask)
            key = state.next_key
            if key is None or key in seen:
                continue
            seen.add(key)
            if paid and counter is None:  # only a run that sends paid requests loads a tokenizer
                counter = _safe_counter(recipe)
            worst = price(counter.upper_bound(msgs), t.max_new_tokens) if counter is not None else 0.0
            jobs.append(Job(key=key, messages=msgs, worst_case_cost=worst, row_input=row.input, base_key=chain[0],
                            attempt=state.next_attempt))
    return jobs


def _safe_counter(recipe: Recipe):
    """The teacher's prompt counter; a tokenizer that fails to load falls back to the byte bound."""
    from stepwise.pipelines.tokens import PromptCounter

    try:
        return prompt_counter(recipe)
    except Exception as exc:  # noqa: BLE001 - the cap must still hold: bound by bytes
        return PromptCounter(approx_tokens, f"approx ({type(exc).__name__})", False)


def _execute(recipe: Recipe, jobs: list[Job], cache: ResponseCache, budget: Budget, progress: bool,
             timings: list[float] | None = None) -> RunStats:
    """`timings`, when given, gets each answered request's latency in seconds (a local batch's wall
    time for every request in it; stepwise.evals.teacher_compare reports them)."""
    import time

    from tqdm import tqdm

    t = recipe.teacher
    bar = tqdm(total=len(jobs), desc=f"teacher {t.model}", unit="req", disable=not progress, dynamic_ncols=True)

    def on_progress(s: RunStats) -> None:
        bar.n = s.completed + s.failed
        bar.set_postfix(done=s.completed, failed=s.failed, retries=s.retried,
                        tokens=s.input_tokens + s.output_tokens, cost=f"${s.cost:.4f}", refresh=False)
        bar.refresh()

    try:
        if t.provider == "transformers":
            grammars = row_grammars(recipe, jobs)  # before the model loads: a too large schema stops here
            llm = build_local_llm(recipe)
            gen_kwargs = generation_kwargs(recipe.task, t)
            def generate(batch: list[Job]) -> list[dict[str, Any]]:
                seed = sample_seed(recipe, max(j.attempt for j in batch))
                sent = time.perf_counter()
                per_row_kwargs = {"grammars": [grammars[j.key] for j in batch]} if grammars else {}
                out = llm.generate(inputs=[j.messages for j in batch], seed=seed, **gen_kwargs, **per_row_kwargs)
                if timings is not None:
                    timings.extend([time.perf_counter() - sent] * len(batch))
                return out

            return run_sync_batches(generate, jobs, cache,
                                    model=t.model, batch_size=t.batch_size, price=price_fn(recipe), budget=budget,
                                    on_progress=on_progress)
        if t.provider == "llamacpp":
            from stepwise.pipelines.llamacpp_llm import LlamaCppError, run_llamacpp

            try:
                return run_llamacpp(recipe, jobs, cache, budget, price_fn(recipe), on_progress, timings=timings)
            except LlamaCppError as exc:  # bad GGUF, rejected grammar, missing extra: the recipe's to fix
                raise GenerateError(str(exc)) from None
        from stepwise.pipelines.openai_api import online_generate
        from stepwise.pipelines.ratelimit import RateLimiter

        # the openai client (not distilabel's agenerate): the rate-limit headers hold requests back
        kwargs = generation_kwargs(recipe.task, t)
        send = online_generate(recipe, lambda job: request_kwargs(recipe, kwargs, job.attempt),
                               RateLimiter(t.max_requests_per_minute, t.max_tokens_per_minute), _api_key(recipe))

        async def agenerate(job: Job) -> Any:
            sent = time.perf_counter()
            out = await send(job)
            if timings is not None:
                timings.append(time.perf_counter() - sent)
            return out

        async def run_all() -> RunStats:
            try:
                return await run_async_jobs(agenerate, jobs, cache, model=t.model, concurrency=t.concurrency,
                                            max_retries=t.max_retries, price=price_fn(recipe), budget=budget,
                                            on_progress=on_progress)
            finally:
                await send.aclose()  # inside the loop: the client's connections close cleanly

        try:
            return asyncio.run(run_all())
        except FatalTeacherError as exc:
            raise GenerateError(f"teacher {t.model} at {t.base_url or 'api.openai.com'}: {exc}") from None
    finally:
        bar.close()


def row_grammars(recipe: Recipe, jobs: list[Job]) -> dict[str, str]:
    """Job key -> its own Lark grammar when the local constraint depends on the row (field names
    from the row's index mapping); empty when one grammar serves every row."""
    t = recipe.teacher
    if not (t.constrained_decoding and per_row(recipe.task)):
        return {}
    try:
        grammars = {j.key: dss_lark(recipe.task, t.format, t.max_new_tokens, t.json_depth, j.row_input) for j in jobs}
    except SchemaTooLarge as exc:
        raise GenerateError(str(exc)) from None
    for text in set(grammars.values()):
        check_lark(recipe, text)
    return grammars


def check_lark(recipe: Recipe, grammar: str) -> None:
    """llguidance rejects the grammar (a schema it cannot compile): exit 2 with its message."""
    from stepwise.pipelines.local_llm import lark_error

    error = lark_error(grammar)
    if error:
        where = OPENSEARCH_SUBSET if recipe.task.validator == "opensearch_query_dsl" else "the answer JSON schema"
        raise GenerateError(f"{where}: llguidance cannot compile its grammar ({error}); fallback: lower "
                            "teacher.json_depth or set teacher.constrained_decoding: false")


def request_kwargs(recipe: Recipe, kwargs: dict[str, Any], attempt: int) -> dict[str, Any]:
    """A re-ask carries a fresh sample seed (OpenAI `seed`, passed through extra_body)."""
    if not attempt:
        return kwargs
    return {**kwargs, "extra_body": {**(kwargs.get("extra_body") or {}), "seed": sample_seed(recipe, attempt)}}


def _assemble(recipe: Recipe, row: InputRow, chains: list[list[str]], cached: dict[str, CacheEntry],
              not_run: set[str], parse, reask: bool) -> dict[str, Any]:
    fmt = recipe.teacher.format
    samples = []
    usage = {"input_tokens": 0, "output_tokens": 0}
    cost, attempts, last_error, reasks = 0.0, 0, None, 0
    for chain in chains:
        state = walk_chain(chain, cached, parse, recipe.teacher.max_attempts, reask)
        for entry in state.paid:  # every answer was paid for, also the ones a re-ask replaced
            usage["input_tokens"] += entry.input_tokens
            usage["output_tokens"] += entry.output_tokens
            cost += entry.cost
        reasks += max(0, len(state.paid) - 1)
        attempts = max(attempts, len(state.paid), state.error.attempts if state.error else 0)
        if state.answer is None:
            entry, key = state.error, state.next_key or chain[0]
            status = "not_run" if entry is None else "error"  # never tried vs. tried and failed
            err = entry.error if entry else ("not attempted: " + ("cost cap reached" if key in not_run else "pending"))
            last_error = err
            samples.append({"rationale": None, "label": None, "answer_text": None, "parse_status": status,
                            "raw": None, "cache_key": key, "error": err})
            continue
        parsed = state.parsed
        assert parsed is not None
        samples.append({"rationale": parsed.rationale, "label": parsed.label, "answer_text": parsed.answer_text,
                        "parse_status": parsed.parse_status, "parse_detail": parsed.detail, "raw": state.answer.text,
                        "cache_key": state.answer_key, "error": None, "answers": len(state.paid)})
    chosen, agreement = _self_consistency(samples)
    return {
        "id": row.id, "input": row.input, "gold": row.gold, "source": row.source, "format": fmt,
        "rationale": chosen["rationale"], "label": chosen["label"], "answer_text": chosen["answer_text"],
        "parse_status": chosen["parse_status"], "parse_detail": chosen.get("parse_detail"), "raw": chosen["raw"],
        "samples": samples, "agreement": agreement, "usage": usage, "cost": round(cost, 8),
        "error": chosen.get("error") or (last_error if chosen["parse_status"] in ("error", "not_run") else None),
        "attempts": attempts, "reasks": reasks,
    }


def _self_consistency(samples: list[dict[str, Any]]) -> tuple[dict[str, Any], float | None]:
    """Pick the sample to keep: majority label among parsed samples, best-formed sample of it."""
    labelled = [s for s in samples if s["label"] is not None]
    if not labelled:
        return min(samples, key=lambda s: status_rank(s["parse_status"])), None
    votes = Counter(canonical_json(s["label"]) for s in labelled)
    top, n = votes.most_common(1)[0]
    winners = [s for s in labelled if canonical_json(s["label"]) == top]
    best = min(winners, key=lambda s: status_rank(s["parse_status"]))
    return best, round(n / len(samples), 4)
