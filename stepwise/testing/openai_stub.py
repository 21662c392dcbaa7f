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

Rate limits: `ratelimit_requests` / `ratelimit_tokens` per `ratelimit_window_s` (a fixed window)
answer every request with OpenAI's `x-ratelimit-*` headers and a 429 past the limit (tokens are
booked as prompt words + max_tokens, like OpenAI books max_tokens up front).

Batch API (`batch_api=True`): `POST /files` (multipart, purpose=batch), `GET /files/{id}/content`,
`POST /batches`, `GET /batches[/{id}]`, `POST /batches/{id}/cancel`. A batch's requests complete
one by one over `batch_complete_s` (simulated time, so tests take seconds); each goes through the
same fault script / fault rate as an online request (a fault becomes a non-200 line in the error
file). `batch_expire_s` expires a batch before it is done: unanswered requests go to the error
file as `batch_expired`. A line containing a `batch_reject` substring fails the whole input file's
validation (status `failed`, `errors` naming the line). `batch_unknown_ids` adds result rows with
custom_ids nobody sent. `batch_log` records every upload and batch creation with its custom_ids,
which is what the submit-once tests count.
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
    ratelimit_requests: int | None = None
    ratelimit_tokens: int | None = None
    ratelimit_window_s: float = 1.0
    batch_api: bool = True
    batch_complete_s: float = 0.2
    batch_expire_s: float | None = None
    batch_reject: tuple[str, ...] = ()
    batch_unknown_ids: int = 0
    cached_prompt_tokens: int = 0  # report this many prompt tokens as served from a prompt cache


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
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_log: list[dict[str, Any]] = []
        self._ids = 0
        self._rl_start = time.monotonic()
        self._rl_used = {"requests": 0, "tokens": 0}
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
                elif stub.config.batch_api and ("/files" in self.path or "/batches" in self.path):
                    stub._batch_route(self, "GET", b"")
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                raw_body = self.rfile.read(length)
                if "/files" in self.path or "/batches" in self.path:
                    if stub.config.batch_api:
                        stub._batch_route(self, "POST", raw_body)
                    else:
                        self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                body = json.loads(raw_body or b"{}")
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

    def _rate_limit(self, body: dict[str, Any]) -> tuple[bool, dict[str, str]]:
        """(over the limit?, x-ratelimit-* headers) for one arriving request (fixed window)."""
        c = self.config
        if c.ratelimit_requests is None and c.ratelimit_tokens is None:
            return False, {}
        tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", [])) + int(
            body.get("max_tokens") or 0)
        with self._lock:
            now = time.monotonic()
            if now - self._rl_start >= c.ratelimit_window_s:
                self._rl_start, self._rl_used = now, {"requests": 0, "tokens": 0}
            left_s = max(0.0, self._rl_start + c.ratelimit_window_s - now)
            over = ((c.ratelimit_requests is not None and self._rl_used["requests"] + 1 > c.ratelimit_requests)
                    or (c.ratelimit_tokens is not None and self._rl_used["tokens"] + tokens > c.ratelimit_tokens))
            if not over:
                self._rl_used["requests"] += 1
                self._rl_used["tokens"] += tokens
            headers = {}
            for name, limit in (("requests", c.ratelimit_requests), ("tokens", c.ratelimit_tokens)):
                if limit is not None:
                    headers[f"x-ratelimit-limit-{name}"] = str(limit)
                    headers[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - self._rl_used[name]))
                    headers[f"x-ratelimit-reset-{name}"] = f"{left_s * 1000:.0f}ms"
            if over:
                headers["Retry-After"] = f"{left_s:.3f}"
        return over, headers

    def _handle(self, handler: Any, body: dict[str, Any]) -> None:
        messages = body.get("messages", [])
        user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        over, rl_headers = self._rate_limit(body)
        if over:
            self._record(user, "429", key, rate_limited=True)
            handler._send(429, {"error": {"message": "rate limit reached", "type": "requests"}}, headers=rl_headers)
            return
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
            self._record(user, outcome, key, seed=body.get("seed"), usage=payload["usage"],
                         response_format=body.get("response_format"))
            handler._send(200, payload, headers=rl_headers)

    # -- Batch API ------------------------------------------------------------------------------
    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}-{self._ids:06d}"

    def _batch_route(self, handler: Any, method: str, raw: bytes) -> None:
        path = handler.path.split("?", 1)[0].rstrip("/")
        parts = path.split("/")
        i = max(j for j, p in enumerate(parts) if p in ("files", "batches"))
        kind, rest = parts[i], parts[i + 1:]
        if kind == "files" and method == "POST" and not rest:
            fields = _multipart(handler.headers.get("Content-Type", ""), raw)
            data = fields.get("file", b"")
            fid = self._new_id("file")
            with self._lock:
                self.files[fid] = {"data": data, "purpose": (fields.get("purpose") or b"").decode(),
                                   "created_at": int(time.time())}
                self.batch_log.append({"event": "file_upload", "file_id": fid,
                                       "custom_ids": [json.loads(x)["custom_id"] for x in data.splitlines()
                                                      if x.strip() and _json_or_none(x) is not None]})
            handler._send(200, self._file_obj(fid))
        elif kind == "files" and method == "GET" and len(rest) == 2 and rest[1] == "content" and rest[0] in self.files:
            handler._send(200, None, raw=self.files[rest[0]]["data"])
        elif kind == "files" and method == "GET" and len(rest) == 1 and rest[0] in self.files:
            handler._send(200, self._file_obj(rest[0]))
        elif kind == "batches" and method == "POST" and not rest:
            body = json.loads(raw or b"{}")
            fid = body.get("input_file_id")
            if fid not in self.files:
                handler._send(404, {"error": {"message": f"no file {fid}"}})
                return
            handler._send(200, self._create_batch(fid, body))
        elif kind == "batches" and method == "GET" and not rest:
            with self._lock:
                ids = list(self.batches)
            handler._send(200, {"object": "list", "data": [self._batch_obj(b) for b in reversed(ids)],
                                "has_more": False})
        elif kind == "batches" and rest and rest[0] in self.batches:
            if method == "POST" and rest[1:] == ["cancel"]:
                with self._lock:
                    b = self.batches[rest[0]]
                    if b["status"] not in ("completed", "failed", "expired", "cancelled"):
                        b["cancel_at"] = time.monotonic()
            handler._send(200, self._batch_obj(rest[0]))
        else:
            handler._send(404, {"error": {"message": f"no route {handler.path}"}})

    def _file_obj(self, fid: str) -> dict[str, Any]:
        f = self.files[fid]
        return {"id": fid, "object": "file", "bytes": len(f["data"]), "created_at": f["created_at"],
                "filename": f"{fid}.jsonl", "purpose": f["purpose"] or "batch", "status": "processed"}

    def _create_batch(self, fid: str, body: dict[str, Any]) -> dict[str, Any]:
        lines = [x for x in self.files[fid]["data"].decode().splitlines() if x.strip()]
        errors = []
        for n, line in enumerate(lines, 1):
            parsed = _json_or_none(line.encode())
            if parsed is None or "custom_id" not in parsed or "body" not in parsed:
                errors.append({"code": "invalid_json_line", "line": n, "message": "not a valid batch request line"})
            elif any(needle in line for needle in self.config.batch_reject):
                errors.append({"code": "invalid_request", "line": n, "message": "request body rejected"})
        bid = self._new_id("batch")
        with self._lock:
            self.batches[bid] = {"id": bid, "input_file_id": fid, "endpoint": body.get("endpoint"),
                                 "completion_window": body.get("completion_window", "24h"),
                                 "metadata": body.get("metadata"), "created_at": int(time.time()),
                                 "t0": time.monotonic(), "lines": [json.loads(x) for x in lines] if not errors else [],
                                 "errors": errors, "status": "failed" if errors else "in_progress",
                                 "output_file_id": None, "error_file_id": None, "cancel_at": None, "done": 0}
            self.batch_log.append({"event": "batch_create", "batch_id": bid, "input_file_id": fid,
                                   "custom_ids": [json.loads(x).get("custom_id") for x in lines
                                                  if _json_or_none(x.encode()) is not None]})
        return self._batch_obj(bid)

    def _batch_obj(self, bid: str) -> dict[str, Any]:
        self._advance(bid)
        with self._lock:
            b = self.batches[bid]
            n = len(b["lines"])
            failed = b.get("failed", 0)
            return {"id": bid, "object": "batch", "endpoint": b["endpoint"] or "/v1/chat/completions",
                    "completion_window": b["completion_window"], "created_at": b["created_at"],
                    "input_file_id": b["input_file_id"], "status": b["status"],
                    "output_file_id": b["output_file_id"], "error_file_id": b["error_file_id"],
                    "errors": {"object": "list", "data": b["errors"]} if b["errors"] else None,
                    "request_counts": {"total": n, "completed": b["done"] - failed, "failed": failed},
                    "metadata": b["metadata"]}

    def _advance(self, bid: str) -> None:
        """Move a batch along its simulated clock; finished batches get their output/error files."""
        c = self.config
        with self._lock:
            b = self.batches[bid]
            if b["status"] not in ("in_progress",):
                return
            now = time.monotonic()
            end = now if b["cancel_at"] is None else b["cancel_at"]
            elapsed = end - b["t0"]
            n = len(b["lines"])
            done = n if elapsed >= c.batch_complete_s else int(n * elapsed / c.batch_complete_s)
            status = "in_progress"
            if done >= n:
                status = "completed"
            elif c.batch_expire_s is not None and elapsed >= c.batch_expire_s:
                done, status = min(done, int(n * c.batch_expire_s / c.batch_complete_s)), "expired"
            elif b["cancel_at"] is not None:
                status = "cancelled"
            todo = b["lines"][b["done"]:done]
            b["done"] = done
        results = [self._batch_answer(bid, line) for line in todo]  # outside the lock: _decide locks
        with self._lock:
            b.setdefault("results", []).extend(results)
            b["failed"] = sum(1 for r in b["results"] if r["response"]["status_code"] != 200)
            if status == "in_progress":
                return
            out = [r for r in b["results"] if r["response"]["status_code"] == 200]
            err = [r for r in b["results"] if r["response"]["status_code"] != 200]
            if status == "expired":
                err += [{"id": f"req-{bid}-x{i}", "custom_id": line["custom_id"], "response": None,
                         "error": {"code": "batch_expired",
                                   "message": "This request could not be executed before the completion window expired."}}
                        for i, line in enumerate(b["lines"][done:])]
            for k in range(c.batch_unknown_ids):
                fake = dict(out[0]) if out else {"response": {"status_code": 200, "body": {}}, "error": None}
                out.append({**fake, "id": f"req-unknown-{k}", "custom_id": f"unknown-{bid}-{k}"})
            b["status"] = status
            for name, rows in (("output_file_id", out), ("error_file_id", err)):
                if rows:
                    fid = f"file-{bid}-{name[:3]}"
                    self.files[fid] = {"data": "".join(json.dumps(r) + "\n" for r in rows).encode(),
                                       "purpose": "batch_output", "created_at": int(time.time())}
                    b[name] = fid

    def _batch_answer(self, bid: str, line: dict[str, Any]) -> dict[str, Any]:
        body = line.get("body") or {}
        messages = body.get("messages", [])
        user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        outcome = self._decide(user, body.get("seed"))
        rid = f"req-{bid}-{line['custom_id'][:12]}"
        if outcome in ("ok", "garbage", "wrong_label", "length"):
            payload = self._completion(body, user, outcome)
            self._record(user, outcome, line["custom_id"], seed=body.get("seed"), usage=payload["usage"], batch=bid)
            return {"id": rid, "custom_id": line["custom_id"], "response": {"status_code": 200, "body": payload},
                    "error": None}
        self._record(user, outcome, line["custom_id"], batch=bid)
        status = 429 if outcome == "429" else 500
        return {"id": rid, "custom_id": line["custom_id"],
                "response": {"status_code": status, "body": {"error": {"message": f"server error ({outcome})"}}},
                "error": None}

    def submitted_ids(self) -> list[str]:
        """Every custom_id in every batch created, in order (a request submitted twice shows twice)."""
        with self._lock:
            return [cid for e in self.batch_log if e["event"] == "batch_create" for cid in e["custom_ids"]]

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
                      "total_tokens": prompt_tokens + completion_tokens,
                      **({"prompt_tokens_details": {"cached_tokens": min(prompt_tokens, self.config.cached_prompt_tokens)}}
                         if self.config.cached_prompt_tokens else {})},
        }


def _json_or_none(line: bytes) -> Any:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _multipart(content_type: str, raw: bytes) -> dict[str, bytes]:
    """Fields of a multipart/form-data body (the openai client's file upload)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    out: dict[str, bytes] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            out[str(name)] = part.get_payload(decode=True) or b""
    return out


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
    fmt = body.get("response_format") or {}
    if m:
        labels = [x.strip() for x in m.group(1).split(",") if x.strip()]
        # a JSON-schema enum on the answer restricts it, as a constrained server does
        enum = (((fmt.get("json_schema") or {}).get("schema") or {}).get("properties") or {}).get("answer", {}).get("enum")
        if enum:
            labels = [lab for lab in labels if lab in enum] or list(enum)
        words = set(re.findall(r"[a-z]+", text.lower()))
        scored = sorted(labels, key=lambda lab: (-len(words & set(lab.lower().split("_"))), labels.index(lab)))
        answer = "not_a_label" if outcome == "wrong_label" else scored[0]
        rationale = f"The message says '{text[:60]}', which is about {answer.replace('_', ' ')}."
    else:
        answer = json.dumps({"query": {"match_all": {}}})
        rationale = "The question asks for all documents, so a match_all query is enough."
    if outcome == "length":
        return f"<rationale>{rationale[: len(rationale) // 2]}"
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
    ap.add_argument("--batch-complete", type=float, default=0.2, help="seconds a batch takes to complete (simulated)")
    ap.add_argument("--ratelimit-requests", type=int, default=None, help="requests per --ratelimit-window")
    ap.add_argument("--ratelimit-window", type=float, default=1.0)
    args = ap.parse_args()
    stub = OpenAIStub(StubConfig(latency_s=args.latency, fault_rate=args.fault_rate, seed=args.seed,
                                 malformed_rate=args.malformed_rate, log_path=args.log,
                                 batch_complete_s=args.batch_complete, ratelimit_requests=args.ratelimit_requests,
                                 ratelimit_window_s=args.ratelimit_window), port=args.port).start()
    print(f"stub listening on {stub.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stub.stop()


if __name__ == "__main__":
    main()
