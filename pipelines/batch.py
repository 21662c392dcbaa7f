"""`teacher.batch: true`: the pending teacher requests through the OpenAI Batch API (about half the price).

Hand-written on the `openai` client's Files and Batches API (distilabel's `offline_batch_generate`
blocks until every batch is done and keeps its state in memory, so a killed run would re-submit
and pay again). Here:
- the requests are exactly the online ones (`openai_api.chat_body`, the same cache keys, constraints
  and sample seeds); a request's `custom_id` is its cache key, so a result can only ever land on
  the request that asked for it (an unknown custom_id is logged and ignored);
- they are written to `generate/batches/<name>.jsonl`, split under `teacher.batch_max_requests`
  and `batch_max_bytes`, uploaded and submitted; each file's and batch's id goes into the run's
  manifest (`teacher_batches`) the moment the server returns it, before any polling;
- each request's worst-case cost (at `price.batch_discount`) is booked in the cache's ledger
  under the batch's own session before submission, so the cost cap counts submitted batches at
  their worst case, also across kills (the booking becomes the real cost as results arrive);
- re-running polls the manifest's batches (never re-uploads or re-submits them), commits every
  downloaded answer to the response cache at once, and re-submits only failed or expired requests
  while the cache's attempt count is under `teacher.max_attempts`.
Ctrl-C leaves the batches running on the server; `stepwise generate --cancel-batches` cancels them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwise.pipelines.cache import ResponseCache
from stepwise.pipelines.executor import Job, RunStats, record_ok
from stepwise.pipelines.openai_api import KwargsFor, chat_body, output_from_completion, sync_client

from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

log = logging.getLogger("stepwise.batch")

MANIFEST_KEY = "teacher_batches"
TERMINAL = ("completed", "failed", "expired", "cancelled")
NO_BATCH_API = "this server has no Batch API; set teacher.batch: false"


class BatchAPIError(RuntimeError):
    """The Batch API cannot be used as configured (no such API on the server); exit 2."""


class BatchesRunning(KeyboardInterrupt):
    """Ctrl-C while batches run on the server: they keep running; the message says how to go on."""

    batches_running = True

    def __init__(self, running: list[str], answered: int, total: int):
        self.running = running
        super().__init__(
            f"interrupted: {len(running)} batch(es) still running on the server ({', '.join(running[:5])}"
            f"{', ...' if len(running) > 5 else ''}); {answered} of {total} requests answered and cached. "
            "Re-run the same command to resume polling them (nothing is submitted twice), or cancel them "
            "with `stepwise generate --cancel-batches` (same recipe and --run-dir)")


@dataclass
class BatchOutcome:
    stats: RunStats
    summary: dict[str, Any]


def batch_line(custom_id: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body},
                      ensure_ascii=False, separators=(",", ":")) + "\n"


def split_lines(lines: list[tuple[str, str]], max_requests: int, max_bytes: int) -> list[list[tuple[str, str]]]:
    """(key, line) pairs -> files of at most `max_requests` lines and `max_bytes` bytes each
    (a single line over `max_bytes` goes alone; the server names it if it rejects it)."""
    files: list[list[tuple[str, str]]] = []
    cur: list[tuple[str, str]] = []
    size = 0
    for key, line in lines:
        n = len(line.encode())
        if cur and (len(cur) >= max_requests or size + n > max_bytes):
            files.append(cur)
            cur, size = [], 0
        cur.append((key, line))
        size += n
    if cur:
        files.append(cur)
    return files


def _is_not_found(exc: BaseException) -> bool:
    import openai

    return isinstance(exc, openai.NotFoundError)


class BatchRunner:
    def __init__(self, recipe: Recipe, run: RunDir, cache: ResponseCache, *, base_keys: list[str],
                 cap: float | None, progress: bool, kwargs_for: KwargsFor, price: Callable[..., float],
                 online_price: Callable[..., float], api_key: str, client: Any = None,
                 on_poll: Callable[[BatchRunner], None] | None = None):
        """`kwargs_for`, `price` (batch), `online_price`: generate's, so a batch line is the online request."""
        self.recipe, self.run, self.cache = recipe, run, cache
        self.t = recipe.teacher
        self.base_keys, self.cap, self.progress = base_keys, cap, progress
        self.client = client or sync_client(recipe, api_key)
        self.kwargs_for = kwargs_for
        self.price = price
        self.online_price = online_price
        self.stats = RunStats()
        self.on_poll = on_poll
        self.base_of: dict[str, str] = {}
        self.online_cost = 0.0  # what the same answers would have cost online
        self.unknown_ids = 0
        self.submitted_now = 0
        self.resubmitted = 0

    # -- the manifest's record of batches ------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        return list(self.run.read_manifest().get(MANIFEST_KEY, []))

    def _save(self, entry: dict[str, Any]) -> None:
        def upd(m: dict[str, Any]) -> None:
            items = m.setdefault(MANIFEST_KEY, [])
            for i, e in enumerate(items):
                if e["name"] == entry["name"]:
                    items[i] = dict(entry)
                    return
            items.append(dict(entry))

        self.run.update_manifest(upd)

    def _keys_of(self, entry: dict[str, Any]) -> list[str]:
        path = self.run.path / entry["path"]
        return [json.loads(line)["custom_id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    # -- submission ----------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> list[Job]:
        """Write, book, upload and submit `jobs`; returns those the cost cap left unsent."""
        lines = []
        for job in jobs:
            self.base_of[job.key] = job.base_key or job.key
            lines.append((job.key, batch_line(job.key, chat_body(self.recipe, self.kwargs_for, job))))
        by_key = {j.key: j for j in jobs}
        left: list[Job] = []
        for chunk in split_lines(lines, self.t.batch_max_requests, self.t.batch_max_bytes):
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            session = f"batch-{name}"
            prior = self.cache.spend(self.base_keys, exclude_session=session).total
            amounts = [(key, by_key[key].base_key or key, by_key[key].worst_case_cost * self.t.price.batch_discount)
                       for key, _ in chunk]
            n = self.cache.reserve_many(amounts, session, cap=self.cap, prior=prior)  # in order, while they fit
            booked = chunk[:n]
            left.extend(by_key[key] for key, _ in chunk[n:])
            worst = sum(a for _, _, a in amounts[:n])
            if len(booked) < len(chunk):
                self.stats.stopped_reason = (
                    f"cost cap reached: submitted batches are booked at their worst case; spent or booked "
                    f"${prior + worst:.4f} of ${self.cap or 0:.4f} (teacher.max_cost / --max-cost)")
            if not booked:
                continue
            rel = self.run.layout.batch_input(name).relative_to(self.run.path)
            path = self.run.path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            data = "".join(line for _, line in booked)
            path.write_text(data, encoding="utf-8")
            entry = {"name": name, "path": str(rel), "session": session, "requests": len(booked),
                     "bytes": len(data.encode()), "worst_case_usd": round(worst, 6), "file_id": None,
                     "batch_id": None, "status": "writing", "processed": False, "submitted_at": time.time()}
            self._save(entry)
            self._upload_and_create(entry, data.encode())
            self.submitted_now += len(booked)
            self.stats.sent += len(booked)
        return left

    def _upload_and_create(self, entry: dict[str, Any], data: bytes | None = None) -> None:
        try:
            if entry["file_id"] is None:
                if data is None:
                    data = (self.run.path / entry["path"]).read_bytes()
                f = self.client.files.create(file=(Path(entry["path"]).name, data, "application/jsonl"), purpose="batch")
                entry["file_id"] = f.id
                entry["status"] = "uploaded"
                self._save(entry)  # before the batch exists: a resume never uploads this file again
            if entry["batch_id"] is None:
                found = self._find_batch(entry["file_id"])
                if found is None:
                    b = self.client.batches.create(input_file_id=entry["file_id"], endpoint="/v1/chat/completions",
                                                   completion_window=self.t.batch_completion_window,
                                                   metadata={"stepwise_batch": entry["name"]})
                else:
                    b = found
                entry["batch_id"], entry["status"] = b.id, b.status
                self._save(entry)  # before polling starts
        except Exception as exc:
            if _is_not_found(exc):
                raise BatchAPIError(f"{NO_BATCH_API} (teacher.base_url {self.t.base_url or 'api.openai.com'}: "
                                    f"{exc})") from None
            raise

    def _find_batch(self, file_id: str) -> Any:
        """A batch a killed run created but did not get to record (it is not created again)."""
        try:
            page = self.client.batches.list(limit=100)
        except Exception as exc:  # noqa: BLE001 - no listing: create it (nothing else can be done)
            if _is_not_found(exc):
                raise
            return None
        for b in page.data:
            if b.input_file_id == file_id:
                return b
        return None

    # -- results -------------------------------------------------------------------------------
    def _download(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        text = self.client.files.content(file_id).text
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("batch result file %s line %d is not JSON; ignored", file_id, n)
        return out

    def process(self, entry: dict[str, Any], batch: Any) -> list[str]:
        """Commit a finished batch's answers and failures; return the keys to submit again."""
        keys = self._keys_of(entry)
        known = set(keys)
        session = entry["session"]
        model = self.t.model
        answered: set[str] = set()
        retry: list[str] = []
        rows = self._download(getattr(batch, "output_file_id", None)) + self._download(getattr(batch, "error_file_id", None))
        for row in rows:
            cid = row.get("custom_id")
            if cid not in known:  # never attach a result to a request that did not ask for it
                self.unknown_ids += 1
                log.warning("batch %s: result with unknown custom_id %r ignored", entry["batch_id"], cid)
                continue
            if cid in answered:
                continue
            answered.add(cid)
            resp = row.get("response") or {}
            body = resp.get("body") or {}
            job = Job(key=cid, messages=[], base_key=self.base_of.get(cid, cid))
            if resp.get("status_code") == 200 and body.get("choices"):
                output = output_from_completion(body)
                try:
                    record_ok(self.cache, job, output, model, self.price, self.stats, session)
                    st = output["statistics"]
                    self.online_cost += self.online_price(st["input_tokens"][0], st["output_tokens"][0],
                                                          st["cached_tokens"][0])
                    continue
                except ValueError as exc:
                    err = f"empty_generation: {exc}"
            else:
                e = row.get("error") or body.get("error") or {}
                code = e.get("code") or f"http_{resp.get('status_code')}"
                err = f"batch {code}: {str(e.get('message') or '')[:400]}"
            self._failed(cid, session, err, retry)
        status = getattr(batch, "status", "")
        line_errors = {}
        errs = getattr(batch, "errors", None)
        for e in (getattr(errs, "data", None) or []):
            if getattr(e, "line", None):
                line_errors[int(e.line)] = f"batch input line {e.line} rejected ({e.code}): {e.message}"
        for i, cid in enumerate(keys, 1):
            if cid in answered:
                continue
            if status == "cancelled":  # the user's choice: free the booking, no attempt counted
                self.cache.release(cid, session)
            elif status == "failed" and line_errors and i not in line_errors:
                self.cache.release(cid, session)  # never run: its file held another, bad line
                retry.append(cid)
            elif i in line_errors:
                self.cache.release(cid, session)
                self.cache.put_error(cid, f"{line_errors[i]} (file {entry['path']})", model)
                self.stats.failed += 1
                self.stats.errors["batch_rejected_line"] = self.stats.errors.get("batch_rejected_line", 0) + 1
            else:
                self._failed(cid, session, f"batch_{status or 'unanswered'}: no result before the batch ended", retry)
        return retry

    def _failed(self, cid: str, session: str, err: str, retry: list[str]) -> None:
        self.cache.release(cid, session)
        attempts = self.cache.put_error(cid, err, self.t.model)
        self.stats.failed += 1
        code = err.split(":", 1)[0]
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        if attempts < self.t.max_attempts:
            retry.append(cid)

    # -- the loop ------------------------------------------------------------------------------
    def execute(self, jobs: list[Job]) -> BatchOutcome:
        by_key = {j.key: j for j in jobs}
        for j in jobs:
            self.base_of[j.key] = j.base_key or j.key
        entries = [e for e in self.entries() if not e.get("processed")]
        in_batches: set[str] = set()
        for e in entries:
            in_batches.update(self._keys_of(e))
            if e["batch_id"] is None:  # killed between upload and submission
                self._upload_and_create(e)
        pending = [j for j in jobs if j.key not in in_batches]
        bar = _Progress(self) if self.progress else None
        started, done0 = time.time(), self.stats.completed
        try:
            while True:
                if pending:
                    left = self.submit(pending)
                    self.stats.not_run.extend(j.key for j in left)
                    pending = []
                active = [e for e in self.entries() if not e.get("processed")]
                if not active:
                    break
                for e in active:
                    b = self.client.batches.retrieve(e["batch_id"])
                    e["status"] = b.status
                    e["request_counts"] = _counts(b)
                    if b.status in TERMINAL:
                        again = self.process(e, b)
                        e["processed"] = True
                        e["finished_at"] = time.time()
                        pending.extend(by_key[k] for k in again if k in by_key)
                        self.resubmitted += len([k for k in again if k in by_key])
                    self._save(e)
                if bar:
                    bar.update(started, done0)
                if self.on_poll:
                    self.on_poll(self)
                if not pending and any(not e.get("processed") for e in self.entries()):
                    time.sleep(self.t.batch_poll_s)
        except KeyboardInterrupt:
            running = [e["batch_id"] for e in self.entries() if not e.get("processed") and e.get("batch_id")]
            if running:
                raise BatchesRunning(running, self.stats.completed, len(jobs)) from None
            raise
        finally:
            if bar:
                bar.close()
        return BatchOutcome(self.stats, self.summary())

    def cancel(self) -> BatchOutcome:
        """`--cancel-batches`: cancel every unfinished batch, keep what they answered before."""
        for e in self.entries():
            if e.get("processed") or not e.get("batch_id"):
                continue
            b = self.client.batches.cancel(e["batch_id"])
            for _ in range(600):  # cancelling -> cancelled (the server finishes what is in flight)
                if b.status in TERMINAL:
                    break
                time.sleep(min(self.t.batch_poll_s, 1.0))
                b = self.client.batches.retrieve(e["batch_id"])
            e["status"] = b.status
            if b.status in TERMINAL:
                self.process(e, b)
                e["processed"] = True
            self._save(e)
        return BatchOutcome(self.stats, self.summary())

    def summary(self) -> dict[str, Any]:
        entries = self.entries()
        return {
            "batches": [{k: e.get(k) for k in ("name", "batch_id", "file_id", "status", "requests", "processed")}
                        for e in entries],
            "submitted_this_run": self.submitted_now, "resubmitted": self.resubmitted,
            "unknown_custom_ids_ignored": self.unknown_ids,
            "batch_cost_usd": round(self.stats.cost, 6), "online_cost_usd": round(self.online_cost, 6),
            "batch_saving_usd": round(self.online_cost - self.stats.cost, 6),
        }


def _counts(b: Any) -> dict[str, int]:
    rc = getattr(b, "request_counts", None)
    return {"total": getattr(rc, "total", 0) or 0, "completed": getattr(rc, "completed", 0) or 0,
            "failed": getattr(rc, "failed", 0) or 0}


class _Progress:
    """Batches submitted / in progress / completed, requests done, cost so far, ETA from the rate."""

    def __init__(self, runner: BatchRunner):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        self.runner = runner
        self.prog = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                             TextColumn("{task.fields[info]}"), transient=True)
        self.task = self.prog.add_task("batches", total=None, info="")
        self.prog.start()

    def update(self, started: float, done0: int) -> None:
        entries = self.runner.entries()
        total = sum(e.get("requests", 0) for e in entries if not e.get("processed")) + self.runner.stats.completed
        server_done = sum((e.get("request_counts") or {}).get("completed", 0) for e in entries if not e.get("processed"))
        done = self.runner.stats.completed + server_done
        n_prog = sum(1 for e in entries if not e.get("processed"))
        rate = (done - done0) / max(1e-6, time.time() - started)
        eta = f"ETA {max(0.0, (total - done) / rate):.0f}s" if rate > 0 and total > done else "ETA ?"
        self.prog.update(self.task, total=total or None, completed=done,
                         description=f"batches {len(entries)} ({n_prog} running, {len(entries) - n_prog} done)",
                         info=f"{done}/{total} req, ${self.runner.stats.cost:.4f}, {eta}")

    def close(self) -> None:
        self.prog.stop()
