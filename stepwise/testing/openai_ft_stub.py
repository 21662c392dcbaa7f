"""A stub of OpenAI's files and fine-tuning endpoints, on 127.0.0.1 only, for tests.

It speaks the wire format the `openai` SDK expects: `POST /v1/files` (multipart upload),
`GET /v1/files/{id}`, `POST /v1/fine_tuning/jobs`, `GET /v1/fine_tuning/jobs[?metadata[k]=v]`,
`GET /v1/fine_tuning/jobs/{id}`, `GET /v1/fine_tuning/jobs/{id}/events` (newest first, like the
API), `POST /v1/fine_tuning/jobs/{id}/cancel`, and `POST /v1/chat/completions` for the models a
job produced (and, as the plain chat stub answers, for the base models), so the eval path can be
tested against the same server.

A job moves validating_files -> queued -> running -> succeeded on the wall clock (`validate_s`,
`queue_s`, `run_s`), writing the events the API writes (created, validated, started, one metrics
event per step, done), or fails where `StubFTConfig.fail_at` says with `fail_message`, or is
cancelled. `hold_running` keeps every job running until `release()`, so a test can interrupt or
kill the client at a known point. The "fine-tuned model" answers a chat request with the assistant
turn of the training example whose prompt shares most words with it (nearest neighbour), so its
outputs are task answers in the trained format. Every upload, create and cancel is counted, which
is what the pay-once tests assert on. `api_key` makes every request need that bearer token.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

from stepwise.testing.loopback import LoopbackServer

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class StubFTConfig:
    validate_s: float = 0.1
    queue_s: float = 0.1
    run_s: float = 0.4
    steps: int = 4
    fail_at: str | None = None  # "validating_files" | "running"
    fail_message: str = "Training file has 3 examples with an invalid role; see the docs."
    hold_running: bool = False
    api_key: str | None = None
    base_models: tuple[str, ...] = ("gpt-4o-mini-2024-07-18", "gpt-4.1-mini-2025-04-14", "gpt-3.5-turbo-0125")


class OpenAIFineTuneStub(LoopbackServer):
    def __init__(self, config: StubFTConfig | None = None, port: int = 0):
        self.config = config or StubFTConfig()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.files: dict[str, dict[str, Any]] = {}
        self.file_bytes: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._t0: dict[str, float] = {}
        self.counts = {"upload": 0, "create": 0, "cancel": 0, "retrieve": 0, "events": 0, "chat": 0, "list": 0}
        self.auth_failures = 0
        self.chat_models: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                want = stub.config.api_key
                if want is None or self.headers.get("Authorization") == f"Bearer {want}":
                    return True
                stub.auth_failures += 1
                self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}})
                return False

            def do_GET(self) -> None:  # noqa: N802
                if self._authorised():
                    status, payload = stub._route("GET", self.path, b"", self.headers)
                    self._send(status, payload)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self._authorised():
                    status, payload = stub._route("POST", self.path, body, self.headers)
                    self._send(status, payload)

        self._listen(Handler, port)

    # -- lifecycle (start/stop/context manager: LoopbackServer) -------------------------------
    def _before_stop(self) -> None:
        self._release.set()

    def release(self) -> None:
        """Let held jobs finish (their remaining run time counts from now)."""
        with self._lock:
            for job_id, job in self.jobs.items():
                if job["status"] == "running":
                    self._t0[job_id] = time.time() - self.config.validate_s - self.config.queue_s
        self._release.set()

    def job_status(self) -> list[str]:
        with self._lock:
            return [j["status"] for j in self.jobs.values()]

    # -- routing --------------------------------------------------------------------------------
    def _route(self, method: str, raw_path: str, body: bytes, headers: Any) -> tuple[int, Any]:
        url = urlparse(raw_path)
        path = url.path.rstrip("/")
        query = parse_qs(url.query)
        parts = path.split("/")[2:] if path.startswith("/v1/") else []
        if method == "POST" and parts == ["files"]:
            return self._upload(body, headers.get("Content-Type", ""))
        if method == "GET" and len(parts) == 2 and parts[0] == "files":
            f = self.files.get(parts[1])
            return (200, f) if f else (404, _err(f"No such File object: {parts[1]}", "file_not_found"))
        if parts[:2] == ["fine_tuning", "jobs"]:
            rest = parts[2:]
            if method == "POST" and not rest:
                return self._create(json.loads(body or b"{}"))
            if method == "GET" and not rest:
                return self._list(query)
            job_id = rest[0] if rest else ""
            if job_id not in self.jobs:
                return 404, _err(f"Could not find fine-tuning job {job_id}.", "fine_tune_not_found")
            if method == "GET" and len(rest) == 1:
                with self._lock:
                    self.counts["retrieve"] += 1
                return 200, self._advance(job_id)
            if method == "GET" and rest[1:] == ["events"]:
                return 200, self._list_events(job_id, query)
            if method == "POST" and rest[1:] == ["cancel"]:
                return self._cancel(job_id)
        if method == "POST" and parts == ["chat", "completions"]:
            return self._chat(json.loads(body or b"{}"))
        if method == "GET" and parts == ["models"]:
            return 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self._models()]}
        return 404, _err(f"no route {method} {raw_path}", "not_found")

    # -- files ----------------------------------------------------------------------------------
    def _upload(self, body: bytes, content_type: str) -> tuple[int, Any]:
        msg = BytesParser(policy=email_policy).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
        fields: dict[str, Any] = {}
        filename = "upload.jsonl"
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True) or b""
            if name == "file":
                filename = part.get_filename() or filename
            fields[name] = data
        if "file" not in fields or fields.get("purpose", b"").decode() != "fine-tune":
            return 400, _err("expected multipart fields `file` and `purpose=fine-tune`", "invalid_request")
        file_id = "file-" + secrets.token_hex(8)
        obj = {"id": file_id, "object": "file", "bytes": len(fields["file"]), "created_at": int(time.time()),
               "filename": filename, "purpose": "fine-tune", "status": "processed"}
        with self._lock:
            self.counts["upload"] += 1
            self.files[file_id] = obj
            self.file_bytes[file_id] = fields["file"]
        return 200, obj

    # -- jobs -----------------------------------------------------------------------------------
    def _create(self, body: dict[str, Any]) -> tuple[int, Any]:
        model = body.get("model")
        if model not in self.config.base_models:
            return 400, _err(f"Model {model} is not available for fine-tuning or does not exist.", "model_not_available")
        for key in ("training_file", "validation_file"):
            fid = body.get(key)
            if (key == "training_file" or fid) and fid not in self.files:
                return 400, _err(f"invalid {key}: {fid}", "invalid_file")
        job_id = "ftjob-" + secrets.token_hex(8)
        method = body.get("method") or {"type": "supervised", "supervised": {"hyperparameters": {}}}
        hp = dict((method.get("supervised") or {}).get("hyperparameters") or body.get("hyperparameters") or {})
        resolved = {"n_epochs": hp.get("n_epochs", "auto"), "batch_size": hp.get("batch_size", "auto"),
                    "learning_rate_multiplier": hp.get("learning_rate_multiplier", "auto")}
        job = {"id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "error": None,
               "fine_tuned_model": None, "finished_at": None, "hyperparameters": resolved, "model": model,
               "organization_id": "org-stub", "result_files": [], "seed": int(body.get("seed") or 42),
               "status": "validating_files", "trained_tokens": None, "training_file": body["training_file"],
               "validation_file": body.get("validation_file"), "suffix": body.get("suffix"),
               "metadata": body.get("metadata"), "method": {"type": "supervised",
                                                             "supervised": {"hyperparameters": resolved}}}
        with self._lock:
            self.counts["create"] += 1
            self.jobs[job_id] = job
            self._events[job_id] = []
            self._t0[job_id] = time.time()
            self._event(job_id, f"Created fine-tuning job: {job_id}")
            self._event(job_id, "Validating training file: " + body["training_file"])
        return 200, dict(job)

    def _list(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        wanted = {k[len("metadata["):-1]: v[0] for k, v in query.items() if k.startswith("metadata[")}
        with self._lock:
            self.counts["list"] += 1
            jobs = [dict(j) for j in reversed(list(self.jobs.values()))
                    if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
        limit = int(query.get("limit", ["20"])[0])
        return 200, {"object": "list", "data": jobs[:limit], "has_more": len(jobs) > limit}

    def _event(self, job_id: str, message: str, *, kind: str = "message", data: dict | None = None,
               level: str = "info") -> None:
        evs = self._events[job_id]
        evs.append({"id": f"ftevent-{job_id[-6:]}-{len(evs):04d}", "object": "fine_tuning.job.event",
                    "created_at": int(time.time()), "level": level, "message": message, "type": kind,
                    "data": data or {}})

    def _advance(self, job_id: str) -> dict[str, Any]:
        """Move the job along the wall clock (called on every retrieve)."""
        cfg = self.config
        with self._lock:
            job = self.jobs[job_id]
            elapsed = time.time() - self._t0[job_id]
            if job["status"] == "validating_files" and elapsed >= cfg.validate_s:
                if cfg.fail_at == "validating_files":
                    self._fail(job)
                else:
                    job["status"] = "queued"
                    self._event(job_id, "Files validated, moving job to queued state")
            if job["status"] == "queued" and elapsed >= cfg.validate_s + cfg.queue_s:
                job["status"] = "running"
                self._event(job_id, "Fine-tuning job started")
            if job["status"] == "running":
                run_elapsed = elapsed - cfg.validate_s - cfg.queue_s
                held = cfg.hold_running and not self._release.is_set()
                done_steps = sum(1 for e in self._events[job_id] if e["type"] == "metrics")
                due = cfg.steps if not held and run_elapsed >= cfg.run_s else min(
                    cfg.steps - 1, int(cfg.steps * run_elapsed / max(cfg.run_s, 1e-9)))
                for step in range(done_steps + 1, due + 1):
                    loss = round(2.0 / step, 4)
                    self._event(job_id, f"Step {step}/{cfg.steps}: training loss={loss}", kind="metrics",
                                data={"step": step, "total_steps": cfg.steps, "train_loss": loss})
                if cfg.fail_at == "running" and due >= cfg.steps // 2:
                    self._fail(job)
                elif due >= cfg.steps and not held:
                    job["status"] = "succeeded"
                    job["finished_at"] = int(time.time())
                    job["trained_tokens"] = self._tokens(job)
                    suffix = f":{job['suffix']}" if job.get("suffix") else ""
                    job["fine_tuned_model"] = f"ft:{job['model']}:stub-org{suffix}:{job_id[-8:]}"
                    job["result_files"] = ["file-result-" + job_id[-8:]]
                    self._event(job_id, f"New fine-tuned model created: {job['fine_tuned_model']}")
                    self._event(job_id, "The job has successfully completed")
            return dict(job)

    def _fail(self, job: dict[str, Any]) -> None:
        job["status"] = "failed"
        job["finished_at"] = int(time.time())
        job["error"] = {"code": "invalid_training_file", "message": self.config.fail_message, "param": "training_file"}
        self._event(job["id"], f"Fine-tuning job failed: {self.config.fail_message}", level="error")

    def _tokens(self, job: dict[str, Any]) -> int:
        words = len(self.file_bytes.get(job["training_file"], b"").split())
        epochs = job["hyperparameters"]["n_epochs"]
        return words * (epochs if isinstance(epochs, int) else 3)

    def _list_events(self, job_id: str, query: dict[str, list[str]]) -> dict[str, Any]:
        limit = int(query.get("limit", ["20"])[0])
        after = query.get("after", [None])[0]
        with self._lock:
            self.counts["events"] += 1
            evs = list(reversed(self._events[job_id]))  # newest first, like the API
        if after:
            ids = [e["id"] for e in evs]
            evs = evs[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": evs[:limit], "has_more": len(evs) > limit}

    def _cancel(self, job_id: str) -> tuple[int, Any]:
        with self._lock:
            job = self.jobs[job_id]
            if job["status"] in TERMINAL:
                return 400, _err(f"Job {job_id} is already {job['status']}", "invalid_request")
            self.counts["cancel"] += 1
            job["status"] = "cancelled"
            job["finished_at"] = int(time.time())
            self._event(job_id, "Fine-tuning job cancelled")
            return 200, dict(job)

    # -- chat with the fine-tuned model --------------------------------------------------------
    def _models(self) -> list[str]:
        with self._lock:
            return list(self.config.base_models) + [j["fine_tuned_model"] for j in self.jobs.values()
                                                    if j["fine_tuned_model"]]

    def _chat(self, body: dict[str, Any]) -> tuple[int, Any]:
        model = body.get("model")
        with self._lock:
            job = next((j for j in self.jobs.values() if j["fine_tuned_model"] == model), None)
            self.counts["chat"] += 1
            self.chat_models.append(str(model))
        if job is not None:
            text = self._nearest_answer(job["training_file"], body.get("messages") or [])
        elif model in self.config.base_models:  # an untuned model: the plain chat stub's answer
            from stepwise.testing.openai_stub import answer_for

            msgs = body.get("messages") or []
            text = answer_for(next((str(m.get("content", "")) for m in reversed(msgs) if m.get("role") == "user"), ""),
                              body)
        else:
            return 404, _err(f"The model `{model}` does not exist or you do not have access to it.",
                             "model_not_found")
        stops = body.get("stop") or []
        for s in [stops] if isinstance(stops, str) else stops:
            if s in text:
                text = text[: text.index(s)]  # the API strips the stop string
        return 200, {"id": "chatcmpl-" + secrets.token_hex(6), "object": "chat.completion",
                     "created": int(time.time()), "model": model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(text.split())),
                               "total_tokens": 10 + max(1, len(text.split()))}}

    def _nearest_answer(self, file_id: str, messages: list[dict[str, Any]]) -> str:
        prompt = _words(" ".join(str(m.get("content", "")) for m in messages))
        best, best_score = "", -1.0
        for line in self.file_bytes.get(file_id, b"").decode("utf-8", "replace").splitlines():
            if not line.strip():
                continue
            msgs = json.loads(line)["messages"]
            words = _words(" ".join(str(m.get("content", "")) for m in msgs[:-1]))
            score = len(prompt & words) / max(1, len(prompt | words))
            if score > best_score:
                best, best_score = str(msgs[-1].get("content", "")), score
        return best


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w\[\]]+", text.lower()))


def _err(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}}


def main() -> None:  # `python -m stepwise.testing.openai_ft_stub --port 8012 --run-s 5`
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--run-s", type=float, default=2.0)
    ap.add_argument("--fail-at", choices=["validating_files", "running"])
    args = ap.parse_args()
    stub = OpenAIFineTuneStub(StubFTConfig(run_s=args.run_s, fail_at=args.fail_at), port=args.port).start()
    print(f"fine-tuning stub listening on {stub.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stub.stop()


if __name__ == "__main__":
    main()
