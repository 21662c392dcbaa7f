"""One teacher request as an OpenAI chat-completions body, sent online or written into a Batch API file.

Hand-written on the `openai` client: the online path calls
`client.chat.completions.with_raw_response.create` (not distilabel's `OpenAILLM.agenerate`) because
rate limiting needs the response headers, and the Batch API needs the very same body as a JSONL
line. `chat_body` is the one place that body is built, so an online request and a batch line for
the same cache key are byte-for-byte the same request (same constraint, same sample seed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stepwise.pipelines.executor import Job
from stepwise.pipelines.ratelimit import RateLimiter, estimate_tokens

from stepwise.recipe import Recipe

KwargsFor = Callable[[Job], dict[str, Any]]


def chat_body(recipe: Recipe, kwargs_for: KwargsFor, job: Job) -> dict[str, Any]:
    """The JSON body of `POST /v1/chat/completions` for one job. `kwargs_for(job)` gives the run's
    generation kwargs (constraints.generation_kwargs) for it, a re-ask's fresh sample seed included
    (generate.request_kwargs)."""
    kw = kwargs_for(job)
    body: dict[str, Any] = {"model": recipe.teacher.model, "messages": job.messages,
                            "max_tokens": kw["max_new_tokens"], "temperature": kw["temperature"],
                            "top_p": kw["top_p"], "n": 1}
    body.update(kw.get("extra_body") or {})  # the server constraint (response_format / guided_regex), seed
    return body


def output_from_completion(completion: dict[str, Any]) -> dict[str, Any]:
    """A chat completion (dict) -> the executor's GenerateOutput shape, with the cached prompt tokens."""
    choices = completion.get("choices") or []
    text = ((choices[0].get("message") or {}).get("content")) if choices else None
    usage = completion.get("usage") or {}
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    return {"generations": [text],
            "statistics": {"input_tokens": [int(usage.get("prompt_tokens") or 0)],
                           "output_tokens": [int(usage.get("completion_tokens") or 0)],
                           "cached_tokens": [int(cached)]}}


def sync_client(recipe: Recipe, api_key: str, max_retries: int = 2):
    """The openai client for Files / Batches calls (small, idempotent reads get the SDK's retries)."""
    import openai

    t = recipe.teacher
    return openai.OpenAI(base_url=t.base_url or "https://api.openai.com/v1", api_key=api_key,
                         max_retries=max_retries, timeout=max(1.0, t.timeout_s))


class online_generate:  # noqa: N801 - used as a function: `await online_generate(...)(job)`
    """`agenerate(job)` for the executor: rate-limited, headers read from every response (and 429).
    The async client is made inside the running loop and closed by `aclose()` before it ends."""

    def __init__(self, recipe: Recipe, kwargs_for: KwargsFor, limiter: RateLimiter, api_key: str):
        self.recipe, self.kwargs_for, self.limiter = recipe, kwargs_for, limiter
        self.key = api_key
        self._client: Any = None

    def _get_client(self) -> Any:
        import openai

        if self._client is None:
            t = self.recipe.teacher
            self._client = openai.AsyncOpenAI(base_url=t.base_url or "https://api.openai.com/v1", api_key=self.key,
                                              max_retries=0, timeout=max(1.0, t.timeout_s))  # retries: the executor's
        return self._client

    async def __call__(self, job: Job) -> dict[str, Any]:
        import openai

        body = chat_body(self.recipe, self.kwargs_for, job)
        client = self._get_client()
        ticket = await self.limiter.acquire(estimate_tokens(job.messages, self.recipe.teacher.max_new_tokens))
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=body["model"], messages=body["messages"],
                extra_body={k: v for k, v in body.items() if k not in ("model", "messages")})
        except openai.APIStatusError as exc:
            self.limiter.observe(exc.response.headers, ticket)
            raise
        finally:
            self.limiter.done(ticket)
        self.limiter.observe(raw.headers, ticket)
        return output_from_completion(raw.parse().model_dump())

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
