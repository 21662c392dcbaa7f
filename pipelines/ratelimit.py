"""Hold online teacher requests back before a rate limit is hit, instead of learning it from a 429.

Two sources, both hand-written here (neither distilabel nor the openai client throttles ahead of
time; the client only retries after a 429):
- the server's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers (OpenAI, Azure,
  vLLM behind a gateway...), read from every response and every 429: while the remaining count is
  spent, requests wait until its reset time;
- `teacher.max_requests_per_minute` / `max_tokens_per_minute` for servers that send no headers: a
  sliding 60-second window of what this process sent.

A response's `remaining` was counted when that request reached the server; requests sent after it,
and earlier ones still in flight (separate connections arrive out of order), may not be counted yet,
so they are subtracted (conservative: never more requests than remain); answers read out of the
order the server counted them never raise the count within a window.
Tokens of a request are estimated as prompt characters / 4 + max_new_tokens (what OpenAI books
against a token limit before generating).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """Seconds until a limit resets: OpenAI writes `1s`, `6m0s`, `20ms`, `1h2m3.5s`; a bare number is seconds."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


@dataclass
class _Bucket:
    """One server-side limit as the headers last described it."""

    limit: int | None = None
    remaining: int | None = None  # None: unknown (no header yet), do not hold back
    reset_at: float | None = None
    reset_guessed: bool = False  # reset_at is the one-second guess, not a server's word
    first_ticket: int = 0  # the first request sent in the window the bucket now describes


def estimate_tokens(messages: list[dict[str, Any]], max_new_tokens: int) -> int:
    return sum(len(str(m.get("content", ""))) for m in messages) // 4 + max_new_tokens


class RateLimiter:
    def __init__(self, max_requests_per_minute: int | None = None, max_tokens_per_minute: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm = max_requests_per_minute, max_tokens_per_minute
        self.clock = clock
        self._window: deque[tuple[float, int]] = deque()  # (sent at, tokens) over the last 60 s
        self._buckets = {"requests": _Bucket(), "tokens": _Bucket()}
        self._sent = 0  # tickets handed out so far
        self._tokens: dict[int, int] = {}  # ticket -> tokens, of the requests in flight
        self._lock: asyncio.Lock | None = None
        self.waits = 0  # how often a request was held back (reported, and asserted by tests)
        self.waited_s = 0.0
        self.headers_seen = False

    # -- before a request ---------------------------------------------------------------------
    def _delay(self, tokens: int, now: float) -> float:
        while self._window and self._window[0][0] <= now - 60.0:
            self._window.popleft()
        waits = []
        if self._window:
            oldest = self._window[0][0] + 60.0 - now
            if self.rpm is not None and len(self._window) >= self.rpm:
                waits.append(oldest)
            if self.tpm is not None and sum(t for _, t in self._window) + tokens > self.tpm:
                waits.append(oldest)  # (a single request over the whole limit still goes alone)
        for name, need in (("requests", 1), ("tokens", tokens)):
            b = self._buckets[name]
            if b.reset_at is not None and now >= b.reset_at:  # the window reset: full again, less what is
                # in flight (a request sent before the reset may reach the server after it)
                in_flight = self.in_flight if name == "requests" else self.in_flight_tokens
                b.remaining = None if b.limit is None else b.limit - in_flight
                b.reset_at, b.reset_guessed = None, False
                b.first_ticket = self._sent
            if b.limit is not None and need > b.limit:
                continue  # a single request over the whole limit: the server decides
            if b.remaining is not None and b.remaining < need:
                if b.reset_at is None:  # spent, reset time unknown: assume a one-second window
                    b.reset_at, b.reset_guessed = now + 1.0, True
                waits.append(b.reset_at - now)
        return max(waits, default=0.0)

    async def acquire(self, tokens: int = 0) -> int:
        """Wait until a request of `tokens` fits every known limit, book it; returns its ticket."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one waiter at a time: requests go out in order
            waited = 0.0
            while (delay := self._delay(tokens, self.clock())) > 0:
                if waited == 0.0:
                    self.waits += 1
                waited += delay
                await asyncio.sleep(delay)
            self.waited_s += waited
            now = self.clock()
            self._window.append((now, tokens))
            for name, need in (("requests", 1), ("tokens", tokens)):
                b = self._buckets[name]
                if b.remaining is not None:
                    b.remaining -= need
            ticket = self._sent
            self._sent += 1
            self._tokens[ticket] = tokens
            return ticket

    def done(self, ticket: int) -> None:
        """The request settled (answered, refused or failed): no longer in flight."""
        self._tokens.pop(ticket, None)

    @property
    def in_flight(self) -> int:
        return len(self._tokens)

    @property
    def in_flight_tokens(self) -> int:
        return sum(self._tokens.values())

    # -- after a response (or a 429) ----------------------------------------------------------
    def observe(self, headers: Mapping[str, str] | None, ticket: int | None = None) -> None:
        if not headers:
            return
        now = self.clock()
        later = max(0, self._sent - (ticket + 1)) if ticket is not None else 0
        for name in ("requests", "tokens"):
            remaining = _int(headers.get(f"x-ratelimit-remaining-{name}"))
            if remaining is None:
                continue
            self.headers_seen = True
            b = self._buckets[name]
            if ticket is not None and ticket < b.first_ticket:
                # an answer to a request sent before the window reset describes the old window: its
                # remaining/reset would restart the new one early and let too many requests out
                continue
            b.limit = _int(headers.get(f"x-ratelimit-limit-{name}")) or b.limit
            reset = parse_reset(headers.get(f"x-ratelimit-reset-{name}"))
            if reset is not None:  # the latest end any answer names: waiting for it is always enough
                b.reset_at = now + reset if b.reset_at is None or b.reset_guessed else max(b.reset_at, now + reset)
                b.reset_guessed = False
            # requests sent after this one may not be counted in `remaining` yet, and neither may earlier
            # ones still in flight (requests on separate connections can reach the server out of order)
            recent = list(self._window)[-later:] if later else []
            earlier = [t for k, t in self._tokens.items() if k < ticket] if ticket is not None else []
            left = remaining - (len(recent) + len(earlier) if name == "requests"
                                else sum(t for _, t in recent) + sum(earlier))
            # answers are read in another order than the server counted them: a late one carries an
            # older, higher count, so what remains only goes down until the window resets (in _delay)
            b.remaining = left if b.remaining is None else min(b.remaining, left)
        retry_after = parse_reset(headers.get("retry-after"))
        if retry_after:  # a 429 anyway (another client shares the key): nothing goes out before it
            b = self._buckets["requests"]
            b.remaining, b.reset_at = 0, max(b.reset_at or 0.0, now + retry_after)

    def summary(self) -> dict[str, Any]:
        return {"held_back": self.waits, "held_back_s": round(self.waited_s, 3), "server_headers": self.headers_seen,
                "max_requests_per_minute": self.rpm, "max_tokens_per_minute": self.tpm}
