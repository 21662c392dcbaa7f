"""An OpenAI-compatible chat-completions server for tests and benchmarks, on 127.0.0.1 only.

It answers in the DSS format (picking a label from the prompt's `Labels:` line by keyword overlap,
or a JSON query for structured tasks) and can inject faults per request: 429 with Retry-After,
500/503, timeouts, dropped connections, truncated bodies, malformed JSON, wrong format and labels
outside the set. Faults come from a seeded rate or from a per-input script, so end states are
exact. `malformed_rate` makes a share of answers malformed (no <answer>, or a label outside the set)
decided by a hash of the input and the request's `seed`, like a sampling teacher: the same request
gets the same answer, a re-ask with a fresh seed gets a fresh draw. `tokenizer` (a local HF
tokenizer, known name or path) makes the reported prompt usage that of a real server (the
chat-templated prompt, as vLLM counts it) instead of a word count. Every request is logged (input,
outcome, seed, usage), which is what the no-double-pay and cost tests assert on.
`hold_after=N` parks every request after the N-th completion until `release()`, so a test can
kill the client at a known point with requests in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from stepwise.testing.loopback import LoopbackServer

FAULTS = ("429", "500", "503", "timeout", "drop", "truncated", "malformed", "garbage", "wrong_label", "length")


@dataclass
class StubConfig:
    latency_s: float = 0.0
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = ("429", "500", "503", "drop")
    seed: int = 0
    script: dict[str, list[str]] = field(default_factory=dict)  # input substring -> outcomes by attempt
    retry_after_s: float = 0.05
    timeout_sleep_s: float = 30.0
    hold_after: int | None = None
    log_path: Path | None = None
    malformed_rate: float = 0.0
    tokenizer: str | None = None


class OpenAIStub(LoopbackServer):
    def __init__(self, config: StubConfig | None = None, port: int = 0):
        self.config = config or StubConfig()
        self._rng = random.Random(self.config.seed)
        self._lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self._attempts: dict[str, int] = {}
        self._completed = 0
        self.parked = 0  # requests waiting at the hold gate
        self._release = threading.Event()
        self._stopping = threading.Event()
        self._count_prompt = None
        if self.config.tokenizer:
            from stepwise.pipelines.tokens import hf_chat_counter

            self._count_prompt = hf_chat_counter(self.config.tokenizer)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "stub-teacher", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                stub._handle(self, body)

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
                      raw: bytes | None = None, truncate: bool = False) -> None:
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if truncate:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self._listen(Handler, port)

    # -- lifecycle (start/stop/context manager: LoopbackServer) -------------------------------
    def _before_stop(self) -> None:
        self._stopping.set()
        self._release.set()

    def release(self) -> None:
        self._release.set()

    # -- queries for tests ----------------------------------------------------------------------
    def completed(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.log if e["outcome"] in ("ok", "garbage", "wrong_label", "length")]

    def completed_count(self) -> int:
        with self._lock:
            return self._completed

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for e in self.log:
                counts[e["outcome"]] = counts.get(e["outcome"], 0) + 1
        return counts

    # -- request handling -----------------------------------------------------------------------
    def _decide(self, user: str, seed: Any = None) -> str:
        with self._lock:
            attempt = self._attempts.get(user, 0)
            self._attempts[user] = attempt + 1
            for needle, outcomes in self.config.script.items():
                if needle in user:
                    return outcomes[attempt] if attempt < len(outcomes) else "ok"
            if self.config.fault_rate and self._rng.random() < self.config.fault_rate:
                return self._rng.choice(self.config.fault_kinds)
        if self.config.malformed_rate:
            draw = hashlib.sha256(f"{self.config.seed}|{seed}|{user}".encode()).digest()
            if int.from_bytes(draw[:8], "big") / 2**64 < self.config.malformed_rate:
                return ("garbage", "wrong_label")[draw[8] % 2]
        return "ok"

    def _record(self, user: str, outcome: str, key: str, **extra: Any) -> None:
        entry = {"t": time.time(), "key": key, "input": user, "outcome": outcome, **extra}
        with self._lock:
            self.log.append(entry)
            if outcome in ("ok", "garbage", "wrong_label", "length"):
                self._completed += 1
            if self.config.log_path is not None:
                with open(self.config.log_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry) + "\n")

    def _handle(self, handler: Any, body: dict[str, Any]) -> None:
        messages = body.get("messages", [])
        user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        hold = self.config.hold_after
        if hold is not None and self.completed_count() >= hold:
            with self._lock:
                self.parked += 1
            self._release.wait()
            with self._lock:
                self.parked -= 1
            if self._stopping.is_set():
                return
            if _client_gone(handler.connection):
                # like vLLM, abandon work for a client that disconnected (it was killed)
                self._record(user, "aborted", key)
                handler.close_connection = True
                return
        outcome = self._decide(user, body.get("seed"))
        if self.config.latency_s:
            time.sleep(self.config.latency_s)
            if _client_gone(handler.connection):  # the client died while we "generated"
                self._record(user, "aborted", key)
                handler.close_connection = True
                return
        if outcome == "429":
            self._record(user, outcome, key)
            handler._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                          headers={"Retry-After": f"{self.config.retry_after_s:g}"})
        elif outcome in ("500", "503"):
            self._record(user, outcome, key)
            handler._send(int(outcome), {"error": {"message": "server error"}})
        elif outcome == "timeout":
            self._record(user, outcome, key)
            self._stopping.wait(self.config.timeout_sleep_s)
            handler.close_connection = True
        elif outcome == "drop":
            self._record(user, outcome, key)
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
        elif outcome == "truncated":
            self._record(user, outcome, key)
            handler._send(200, self._completion(body, user, "ok"), truncate=True)
        elif outcome == "malformed":
            self._record(user, outcome, key)
            handler._send(200, None, raw=b'{"id": "x", "choices": [{"message": ')
        else:
            payload = self._completion(body, user, outcome)
            self._record(user, outcome, key, seed=body.get("seed"), usage=payload["usage"])
            handler._send(200, payload)

    def _completion(self, body: dict[str, Any], user: str, outcome: str) -> dict[str, Any]:
        text = answer_for(user, body, outcome)
        messages = body.get("messages", [])
        if self._count_prompt is not None:
            prompt_tokens = self._count_prompt([{"role": m["role"], "content": str(m.get("content", ""))} for m in messages])
        else:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = max(1, len(text.split()))
        finish = "length" if outcome == "length" else "stop"
        return {
            "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "stub-teacher"),
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                        for i in range(int(body.get("n") or 1))],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


def _client_gone(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


_LABELS = re.compile(r"Labels:\s*(.+)")


def answer_for(user: str, body: dict[str, Any], outcome: str = "ok") -> str:
    """A deterministic DSS answer: the label sharing most words with the input."""
    m = _LABELS.search(user)
    text = user.split("Input:", 1)[-1].strip()
    if outcome == "garbage":
        return "I think this is probably fine."
    if m:
        labels = [x.strip() for x in m.group(1).split(",") if x.strip()]
        words = set(re.findall(r"[a-z]+", text.lower()))
        scored = sorted(labels, key=lambda lab: (-len(words & set(lab.lower().split("_"))), labels.index(lab)))
        answer = "not_a_label" if outcome == "wrong_label" else scored[0]
        rationale = f"The message says '{text[:60]}', which is about {answer.replace('_', ' ')}."
    else:
        answer = json.dumps({"query": {"match_all": {}}})
        rationale = "The question asks for all documents, so a match_all query is enough."
    if outcome == "length":
        return f"<rationale>{rationale[: len(rationale) // 2]}"
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return json.dumps({"rationale": rationale, "answer": answer if m else json.loads(answer)})
    return f"<rationale>{rationale}</rationale><answer>{answer}</answer>"


def main() -> None:  # `python -m stepwise.testing.openai_stub --port 8011 --latency 0.1`
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--malformed-rate", type=float, default=0.0, help="share of answers malformed (seeded by request)")
    ap.add_argument("--log", type=Path)
    args = ap.parse_args()
    stub = OpenAIStub(StubConfig(latency_s=args.latency, fault_rate=args.fault_rate, seed=args.seed,
                                 malformed_rate=args.malformed_rate, log_path=args.log), port=args.port).start()
    print(f"stub listening on {stub.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stub.stop()


if __name__ == "__main__":
    main()
