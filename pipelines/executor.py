"""Run teacher requests through the cache with bounded concurrency, retries and a cost cap.

Why not distilabel's pipeline runner for the local path: it gathers a whole batch before writing
anything (a slow or retrying row stalls the batch, a failed batch becomes None rows, resume after a
kill can hang). Here each request is its own unit: a sliding window of `concurrency` workers pulls
jobs; a retriable failure (429, 5xx, timeout, dropped connection, malformed body) frees its slot
and is re-queued no earlier than its Retry-After; every outcome is committed to the cache at once.
The LLM calls themselves are the openai client's for servers (`pipelines.openai_api`, which reads
the rate-limit headers) and our distilabel `LLM` for local models.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stepwise.pipelines.cache import ResponseCache


@dataclass
class Job:
    key: str
    messages: list[dict[str, str]]
    worst_case_cost: float = 0.0
    tries: int = 0
    row_input: Any = None  # the source row's input fields (distilabel tasks render from these)
    base_key: str | None = None  # the row/sample's first-attempt key (the ledger sums spend by it)
    attempt: int = 0  # 0 = first answer; n = n-th re-ask of a malformed answer (fresh sample seed)


@dataclass
class RunStats:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the provider served from its prompt cache
    cached_saving: float = 0.0  # what those cost less than uncached input (USD)
    cost: float = 0.0
    not_run: list[str] = field(default_factory=list)
    stopped_reason: str | None = None
    errors: dict[str, int] = field(default_factory=dict)


class FatalTeacherError(RuntimeError):
    """A failure no retry can fix (bad credentials, unknown model): stop the run."""


@dataclass
class Budget:
    """The cost cap, kept as a ledger in the response cache (when one is given).

    `prior` is what earlier invocations spent on the same inputs (paid, plus requests a killed run
    left in flight). Each request books its worst-case cost in the ledger before it is sent (the
    check and the booking are one transaction, so Ray workers in other processes share the cap)
    and the booking is replaced by the real cost when the response is stored."""

    max_cost: float | None
    cache: ResponseCache | None = None
    session: str = ""
    prior: float = 0.0
    spent: float = 0.0  # this invocation, settled (in this process)
    reserved: float = 0.0  # this invocation, in flight (in this process)

    def try_reserve(self, amount: float, job: Job | None = None) -> bool:
        if self.cache is not None and job is not None:
            if not self.cache.reserve(job.key, job.base_key or job.key, amount, self.session,
                                      cap=self.max_cost, prior=self.prior):
                return False
        elif self.max_cost is not None and self.prior + self.spent + self.reserved + amount > self.max_cost:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float, job: Job | None = None, stored: bool = True) -> None:
        """`stored`: the response went into the cache (its put_ok replaced the booking)."""
        self.reserved -= reserved
        self.spent += actual
        if not stored and self.cache is not None and job is not None:
            self.cache.release(job.key, self.session)

    def total_spent(self) -> float:
        if self.cache is not None:  # the ledger also sees other processes of this session (Ray)
            return self.prior + self.cache.session_spend(self.session).paid
        return self.prior + self.spent

    def cap_message(self) -> str:
        return (f"cost cap reached: spent ${self.total_spent():.4f} of ${self.max_cost or 0:.4f} "
                f"(teacher.max_cost / --max-cost, over every run on these inputs)")


def classify_error(exc: BaseException) -> tuple[str, bool, float | None]:
    """(short code, retriable, retry_after seconds) for an exception from the LLM client."""
    try:
        import openai
    except ImportError:  # pragma: no cover
        openai = None  # type: ignore[assignment]
    if openai is not None:
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return "auth", False, None
        if isinstance(exc, openai.NotFoundError):
            return "not_found", False, None
        if isinstance(exc, openai.RateLimitError):
            return "rate_limited", True, _retry_after(exc)
        if isinstance(exc, openai.APITimeoutError):
            return "timeout", True, None
        if isinstance(exc, openai.APIConnectionError):
            return "connection", True, None
        if isinstance(exc, openai.InternalServerError):
            return f"http_{exc.status_code}", True, _retry_after(exc)
        if isinstance(exc, openai.APIResponseValidationError):
            return "malformed_response", True, None
        if isinstance(exc, openai.BadRequestError):
            return "bad_request", False, None
        if isinstance(exc, openai.APIStatusError):
            return f"http_{exc.status_code}", exc.status_code >= 500, _retry_after(exc)
    try:
        import pydantic
    except ImportError:  # pragma: no cover
        pydantic = None  # type: ignore[assignment]
    if pydantic is not None and isinstance(exc, pydantic.ValidationError):
        return "client_error", False, None  # our request was rejected locally: retrying cannot help
    if isinstance(exc, ValueError | KeyError | TypeError):  # e.g. JSON decode of a broken body
        return "malformed_response", True, None
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | ConnectionError):
        return "connection", True, None
    return type(exc).__name__, True, None


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def record_ok(cache: ResponseCache, job: Job, output: dict[str, Any], model: str,
              price: Callable[..., float], stats: RunStats, session: str | None = None) -> float:
    """Commit one completed response (a distilabel GenerateOutput) and count it; return its cost."""
    text = (output.get("generations") or [None])[0]
    if text is None:
        raise ValueError("empty generation")
    stat = output.get("statistics") or {}
    itok = int((stat.get("input_tokens") or [0])[0] or 0)
    otok = int((stat.get("output_tokens") or [0])[0] or 0)
    ctok = min(itok, int((stat.get("cached_tokens") or [0])[0] or 0))
    cost = price(itok, otok, ctok) if ctok else price(itok, otok)
    cache.put_ok(job.key, text, itok, otok, cost, model, {"cached_tokens": ctok} if ctok else None,
                 base_key=job.base_key, session=session)
    if ctok:
        stats.cached_tokens += ctok
        stats.cached_saving += price(itok, otok) - cost
    stats.completed += 1
    stats.input_tokens += itok
    stats.output_tokens += otok
    stats.cost += cost
    return cost


def _backoff(tries: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return retry_after
    return min(8.0, 0.25 * (2 ** (tries - 1))) * (0.5 + random.random() / 2)


async def run_async_jobs(
    agenerate: Callable[[Job], Any],
    jobs: list[Job],
    cache: ResponseCache,
    *,
    model: str,
    concurrency: int,
    max_retries: int,
    price: Callable[[int, int], float],
    budget: Budget,
    on_progress: Callable[[RunStats], None] | None = None,
    stats: RunStats | None = None,
) -> RunStats:
    """Send jobs through `agenerate(job) -> GenerateOutput`; every outcome lands in the cache."""
    stats = stats or RunStats()
    counter = itertools.count()
    queue: list[tuple[float, int, Job]] = [(0.0, next(counter), j) for j in jobs]
    heapq.heapify(queue)
    in_flight = 0
    fatal: list[BaseException] = []
    stop_dispatch = False
    wake = asyncio.Event()

    async def attempt(job: Job, reserved: float) -> None:
        nonlocal in_flight
        job.tries += 1
        stats.sent += 1
        try:
            output = await agenerate(job)
            cost = record_ok(cache, job, output, model, price, stats, budget.session)
            budget.settle(reserved, cost, job)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded row state
            budget.settle(reserved, 0.0, job, stored=False)
            code, retriable, retry_after = classify_error(exc)
            if retriable and job.tries <= max_retries:
                stats.retried += 1
                heapq.heappush(queue, (time.monotonic() + _backoff(job.tries, retry_after), next(counter), job))
            else:
                cache.put_error(job.key, f"{code}: {str(exc)[:500]}", model)
                stats.failed += 1
                stats.errors[code] = stats.errors.get(code, 0) + 1
                if code in ("auth", "not_found", "client_error"):
                    fatal.append(FatalTeacherError(f"{code}: {exc}"))
        finally:
            in_flight -= 1
            if on_progress:
                on_progress(stats)
            wake.set()

    tasks: set[asyncio.Task] = set()
    while (queue and not stop_dispatch) or in_flight:
        if fatal:
            stop_dispatch = True
        if queue and not stop_dispatch and in_flight < concurrency:
            not_before, _, job = queue[0]
            delay = not_before - time.monotonic()
            if delay <= 0:
                heapq.heappop(queue)
                if not budget.try_reserve(job.worst_case_cost, job):
                    stop_dispatch = True
                    stats.stopped_reason = "cap"  # worded below, once the requests in flight settled
                    heapq.heappush(queue, (not_before, next(counter), job))
                    continue
                in_flight += 1
                task = asyncio.create_task(attempt(job, job.worst_case_cost))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                continue
            wake.clear()
            with _suppress_timeout():
                await asyncio.wait_for(wake.wait(), timeout=delay)
            continue
        wake.clear()
        if in_flight:
            await wake.wait()
    stats.not_run = [job.key for _, _, job in queue]
    if stats.stopped_reason == "cap":
        stats.stopped_reason = budget.cap_message()
    if fatal:
        raise fatal[0]
    return stats


class _suppress_timeout:  # noqa: N801 - tiny context manager
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, *_: Any) -> bool:
        return exc_type is asyncio.TimeoutError or exc_type is TimeoutError


def run_sync_batches(
    generate: Callable[[list[Job]], list[dict[str, Any]]],
    jobs: list[Job],
    cache: ResponseCache,
    *,
    model: str,
    batch_size: int,
    price: Callable[[int, int], float],
    budget: Budget,
    on_progress: Callable[[RunStats], None] | None = None,
) -> RunStats:
    """Local models: generate in batches; a failing batch is retried row by row, never dropped."""
    stats = RunStats()
    pending = list(jobs)
    while pending:
        batch, pending = pending[:batch_size], pending[batch_size:]
        booked: list[Job] = []
        for job in batch:
            if not budget.try_reserve(job.worst_case_cost, job):
                break
            booked.append(job)
        if len(booked) < len(batch):
            for job in booked:
                budget.settle(job.worst_case_cost, 0.0, job, stored=False)
            stats.stopped_reason = budget.cap_message()
            stats.not_run = [j.key for j in batch + pending]
            break
        try:
            outputs = generate(batch)
            pairs = list(zip(batch, outputs, strict=True))
        except Exception:  # noqa: BLE001 - isolate the bad row instead of losing the batch
            pairs = []
            for job in batch:
                try:
                    pairs.append((job, generate([job])[0]))
                except Exception as exc:  # noqa: BLE001
                    budget.settle(job.worst_case_cost, 0.0, job, stored=False)
                    cache.put_error(job.key, f"{type(exc).__name__}: {str(exc)[:500]}", model)
                    stats.failed += 1
                    stats.errors[type(exc).__name__] = stats.errors.get(type(exc).__name__, 0) + 1
        for job, output in pairs:
            stats.sent += 1
            try:
                budget.settle(job.worst_case_cost, record_ok(cache, job, output, model, price, stats, budget.session), job)
            except ValueError as exc:  # an empty generation is that row's error, not the run's
                budget.settle(job.worst_case_cost, 0.0, job, stored=False)
                cache.put_error(job.key, f"empty_generation: {exc}", model)
                stats.failed += 1
                stats.errors["empty_generation"] = stats.errors.get("empty_generation", 0) + 1
        if on_progress:
            on_progress(stats)
    return stats
