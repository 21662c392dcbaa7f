"""`stepwise train --backend openai`: seed 004's hosted fine-tuning flow, inside a run directory.

The `openai` SDK gives the calls (`files.create`, `fine_tuning.jobs.create/retrieve/list_events/
cancel/list`); what it does not give, and this module adds:

- Validation of the exported chat JSONL against the API's documented rules before anything is
  uploaded, every problem with file and line (`train.chat.jsonl:17 messages[2].role: ...`): a JSON
  object per line with `messages`; roles system/user/assistant; string content; at least one
  assistant message and the last message from the assistant; at most the model's tokens per
  example; at least 10 training examples. Tokens are counted as OpenAI's cookbook counts them
  (3 per message + the content's tokens + 3 for the reply), with tiktoken when its encoding is
  available and otherwise ~4 characters per token (OpenAI's rule of thumb), which the output says.
- A cost estimate before paying: billed tokens (each example capped at the limit) x epochs x
  `training_price_per_1m_tokens`; `n_epochs: auto` follows the cookbook's rule for the API's
  default (3 epochs, raised toward 100 examples-passes for small files, lowered toward 25,000).
- Nothing paid for is lost: `train/openai_job.json` records every uploaded file by content hash
  (a restart re-uses it instead of uploading again), a create token sent as job metadata *before*
  the create call (a process killed between the API creating the job and our write finds the job
  again with `jobs.list(metadata=...)`), and the job id the moment it exists. A restarted
  `stepwise train` polls the recorded job instead of creating a second one; Ctrl-C cancels the
  job through the API and records it (`--detach` leaves it running and only stops polling).
- Job id, status, events, trained tokens, cost and the fine-tuned model's name in the manifest
  (stage `train`), for `stepwise eval` to find.

The API key is read from the environment variable the recipe names and never written anywhere;
error texts are scrubbed of it before they are printed or recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stepwise.pipelines.tokens import guess_tokens

from stepwise.io import atomic_write_json, sha256_file
from stepwise.layout import RunLayout
from stepwise.recipe import OpenAIFineTuneSpec, Recipe
from stepwise.rundir import RunDir

MIN_EXAMPLES = 10
CHAT_ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "name", "weight"}
EXAMPLE_KEYS = {"messages", "tools", "functions", "parallel_tool_calls"}
# Tokens per training example (OpenAI's fine-tuning guide); others default to DEFAULT_EXAMPLE_TOKENS.
EXAMPLE_TOKEN_LIMITS = {
    "gpt-4o-mini-2024-07-18": 65536,
    "gpt-4o-2024-08-06": 65536,
    "gpt-3.5-turbo-0125": 16385,
    "gpt-3.5-turbo-1106": 16385,
    "gpt-3.5-turbo-0613": 4096,
}
DEFAULT_EXAMPLE_TOKENS = 65536
# The cookbook's default-epochs rule (Chat_finetuning_data_prep: "n_epochs auto").
TARGET_EPOCHS, MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES, MIN_EPOCHS, MAX_EPOCHS = 3, 100, 25000, 1, 25
TERMINAL = ("succeeded", "failed", "cancelled")
STATE_FILE = "openai_job.json"


class FineTuneInputError(ValueError):
    """Bad data or settings: nothing was uploaded (exit 2)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


class FineTuneJobError(RuntimeError):
    """The job failed (the API's message) or could not be run (exit 1)."""


# --------------------------------------------------------------------------------------------
# Tokens


class TokenCounter:
    """OpenAI's chat token count; tiktoken's encoding for the model when it can be loaded."""

    def __init__(self, model: str):
        self._enc = None
        self.name = "approx: 4 characters per token (tiktoken encoding not available offline)"
        try:
            import tiktoken

            base = model.split(":")[1] if model.startswith("ft:") else model
            try:
                enc_name = tiktoken.encoding_name_for_model(base)
            except KeyError:
                enc_name = "o200k_base"
            self._enc = tiktoken.get_encoding(enc_name)
            self.name = f"tiktoken {enc_name}"
        except Exception:  # noqa: BLE001 - not installed, or the BPE file cannot be downloaded
            self._enc = None

    @property
    def exact(self) -> bool:
        return self._enc is not None

    def text(self, text: str) -> int:
        if self._enc is not None:
            return len(self._enc.encode(text, disallowed_special=()))
        return guess_tokens(text)

    def messages(self, messages: list[dict[str, Any]]) -> int:
        n = 3  # every reply is primed with <|start|>assistant<|message|>
        for m in messages:
            n += 3
            for key, value in m.items():
                if isinstance(value, str):
                    n += self.text(value)
                if key == "name":
                    n += 1
        return n


# --------------------------------------------------------------------------------------------
# Validation


@dataclass
class FileCheck:
    path: Path
    examples: int = 0
    tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def example_token_limit(spec: OpenAIFineTuneSpec) -> tuple[int, str]:
    if spec.max_example_tokens:
        return spec.max_example_tokens, "recipe"
    if spec.model in EXAMPLE_TOKEN_LIMITS:
        return EXAMPLE_TOKEN_LIMITS[spec.model], f"{spec.model}'s documented limit"
    return DEFAULT_EXAMPLE_TOKENS, (f"{spec.model} is not in our table: assumed {DEFAULT_EXAMPLE_TOKENS:,} "
                                    "(set training.openai.max_example_tokens)")


def validate_chat_file(path: Path, counter: TokenCounter, max_tokens: int, *, min_examples: int | None = MIN_EXAMPLES,
                       max_errors: int = 200) -> FileCheck:
    """Every line checked against the fine-tuning API's chat format; errors as `file:line field: why`."""
    check = FileCheck(path)
    name = path.name

    def err(line: int, where: str, why: str) -> None:
        if len(check.errors) < max_errors:
            check.errors.append(f"{name}:{line}{' ' + where if where else ''}: {why}")

    with path.open(encoding="utf-8") as fh:
        for line_no, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            check.examples += 1
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                err(line_no, "", f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(row, dict):
                err(line_no, "", f"each line must be a JSON object, got {type(row).__name__}")
                continue
            extra = sorted(set(row) - EXAMPLE_KEYS)
            if extra:
                err(line_no, extra[0], f"unknown key (a chat example has {', '.join(sorted(EXAMPLE_KEYS))})")
            msgs = row.get("messages")
            if not isinstance(msgs, list) or not msgs:
                err(line_no, "messages", "missing or empty: a list of {role, content} messages is required")
                continue
            bad = False
            for i, m in enumerate(msgs):
                where = f"messages[{i}]"
                if not isinstance(m, dict):
                    err(line_no, where, "each message must be an object with role and content")
                    bad = True
                    continue
                role = m.get("role")
                if role not in CHAT_ROLES:
                    why = ("tool/function messages are not supported by stepwise's hosted fine-tuning"
                           if role in ("tool", "function") else f"{role!r} is not one of {', '.join(CHAT_ROLES)}")
                    err(line_no, f"{where}.role", why)
                    bad = True
                content = m.get("content")
                if not isinstance(content, str):
                    err(line_no, f"{where}.content", f"must be a string, got {type(content).__name__}")
                    bad = True
                elif not content.strip():
                    err(line_no, f"{where}.content", "empty")
                    bad = True
                unknown = sorted(set(m) - MESSAGE_KEYS)
                if unknown:
                    err(line_no, f"{where}.{unknown[0]}", f"unknown message key (allowed: {', '.join(sorted(MESSAGE_KEYS))})")
                    bad = True
                if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1)):
                    err(line_no, f"{where}.weight", "only assistant messages may have a weight, and it is 0 or 1")
                    bad = True
            roles = [m.get("role") for m in msgs if isinstance(m, dict)]
            if "assistant" not in roles:
                err(line_no, "messages", "no assistant message: nothing to learn")
                bad = True
            elif roles and roles[-1] != "assistant":
                err(line_no, f"messages[{len(msgs) - 1}].role",
                    f"the last message must be the assistant's (the answer to learn), got {roles[-1]!r}")
                bad = True
            if bad:
                continue
            n = counter.messages(msgs)
            check.tokens.append(n)
            if n > max_tokens:
                approx = "" if counter.exact else " (approximate count)"
                err(line_no, "messages", f"{n:,} tokens{approx} exceeds the {max_tokens:,}-token limit per "
                    "training example")
    if min_examples and check.examples < min_examples:
        check.errors.append(f"{name}: {check.examples} examples; the fine-tuning API needs at least {min_examples}")
    if len(check.errors) >= max_errors:
        check.errors.append(f"{name}: more errors not shown (first {max_errors})")
    return check


# --------------------------------------------------------------------------------------------
# Cost


@dataclass
class CostEstimate:
    examples: int
    billed_tokens: int
    n_epochs: int
    n_epochs_source: str
    price_per_1m_tokens: float
    usd: float
    tokenizer: str
    example_token_limit: int

    def line(self) -> str:
        return (f"estimated training cost: {self.billed_tokens:,} tokens x {self.n_epochs} epochs "
                f"({self.n_epochs_source}) x ${self.price_per_1m_tokens:g}/1M = ${self.usd:.4f} "
                f"[{self.tokenizer}; validation tokens not included]")


def auto_epochs(n_examples: int) -> int:
    n = TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        n = min(MAX_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    elif n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        n = max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return n


def estimate_cost(train: FileCheck, spec: OpenAIFineTuneSpec, counter: TokenCounter, limit: int) -> CostEstimate:
    billed = sum(min(limit, t) for t in train.tokens)
    if spec.n_epochs == "auto":
        epochs = auto_epochs(max(1, train.examples))
        source = f"auto: the API's default for {train.examples} examples"
    else:
        epochs, source = int(spec.n_epochs), "recipe"
    usd = billed * epochs * spec.training_price_per_1m_tokens / 1e6
    return CostEstimate(train.examples, billed, epochs, source, spec.training_price_per_1m_tokens, round(usd, 6),
                        counter.name, limit)


# --------------------------------------------------------------------------------------------
# The job


def hyperparameters(spec: OpenAIFineTuneSpec) -> dict[str, Any]:
    """The recipe's hyperparameters the API should get; `auto` is left to the API's default."""
    out: dict[str, Any] = {}
    for key in ("n_epochs", "batch_size", "learning_rate_multiplier"):
        value = getattr(spec, key)
        if value != "auto":
            out[key] = value
    return out


def resolve_base_url(spec: OpenAIFineTuneSpec) -> str | None:
    return spec.base_url or os.environ.get("OPENAI_BASE_URL") or None


def make_client(spec: OpenAIFineTuneSpec):
    from openai import OpenAI

    key = os.environ.get(spec.api_key_env)
    if not key:
        raise FineTuneInputError(f"${spec.api_key_env} is not set: export the API key (training.openai.api_key_env "
                                 "names the variable; keys never go in a recipe)")
    return OpenAI(api_key=key, base_url=resolve_base_url(spec), max_retries=4, timeout=120.0)


def _plain(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", exclude_none=False)
    return obj


@dataclass
class Outcome:
    status: str  # succeeded | failed | cancelled | detached
    job_id: str | None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: str | None = None
    estimate: CostEstimate | None = None
    state_path: Path | None = None


class FineTuneRun:
    """One run directory's hosted fine-tuning: its state file, the client, and the poll loop."""

    def __init__(self, recipe: Recipe, run: RunDir, client: Any = None, *, log: Callable[[str], None] = print,
                 progress: Callable[[dict[str, Any]], None] | None = None, sleep: Callable[[float], None] = time.sleep):
        self.recipe = recipe
        self.spec = recipe.training.openai
        self.run = run
        self.client = client
        self.log = log
        self.progress = progress
        self.sleep = sleep
        run.stage_dir("train")
        self.state_path = run.layout.train_dir / STATE_FILE
        self.state: dict[str, Any] = self._load()

    # -- state -----------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        return {"backend": "openai", "files": {}, "history": []}

    def save(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.spec.api_key_env)
        return text.replace(key, "***") if key else text

    # -- steps -----------------------------------------------------------------------------------
    def upload(self, path: Path, role: str) -> str:
        """The file's id, uploading only when no file with this content was uploaded for this run."""
        digest = sha256_file(path)
        known = self.state["files"].get(digest)
        if known:
            try:
                self.client.files.retrieve(known["id"])
                self.log(f"{role} file already uploaded: {known['id']} (sha256 {digest[:12]})")
                return known["id"]
            except Exception as exc:  # noqa: BLE001 - gone (deleted, expired): upload again
                if getattr(exc, "status_code", None) != 404:
                    raise
        with path.open("rb") as fh:
            obj = self.client.files.create(file=(path.name, fh), purpose="fine-tune")
        self.state["files"][digest] = {"id": obj.id, "filename": path.name, "bytes": obj.bytes, "role": role,
                                       "uploaded": int(time.time())}
        self.save()
        self.log(f"uploaded {role} file {path.name} -> {obj.id} ({obj.bytes:,} bytes)")
        return obj.id

    def _adopt_pending(self) -> Any | None:
        """A job created by a process killed before it wrote the id: found by its create token."""
        token = self.state.get("pending_create")
        if not token:
            return None
        page = self.client.fine_tuning.jobs.list(limit=20, metadata={"stepwise_create": token})
        for job in page.data:
            if (job.metadata or {}).get("stepwise_create") == token:
                self.log(f"found job {job.id} created before the last run stopped")
                return job
        return None

    def create(self, train_id: str, val_id: str | None) -> Any:
        token = self.state.get("pending_create") or secrets.token_hex(8)
        self.state["pending_create"] = token
        self.save()  # before the call: a kill in between is recovered by _adopt_pending
        kwargs: dict[str, Any] = {"model": self.spec.model, "training_file": train_id,
                                  "metadata": {"stepwise_create": token, "stepwise_run": self.run.path.name}}
        if val_id:
            kwargs["validation_file"] = val_id
        if self.spec.suffix:
            kwargs["suffix"] = self.spec.suffix
        hp = hyperparameters(self.spec)
        if hp:
            kwargs["method"] = {"type": "supervised", "supervised": {"hyperparameters": hp}}
        job = self.client.fine_tuning.jobs.create(**kwargs)
        self.log(f"created fine-tuning job {job.id} ({self.spec.model}"
                 f"{', ' + ', '.join(f'{k}={v}' for k, v in hp.items()) if hp else ', hyperparameters auto'})")
        return job

    def record_job(self, job: Any) -> None:
        d = _plain(job)
        self.state.update(
            job_id=d["id"], status=d["status"], model=d.get("model"), fine_tuned_model=d.get("fine_tuned_model"),
            trained_tokens=d.get("trained_tokens"), hyperparameters=d.get("hyperparameters"),
            error=self._redact(json.dumps(d["error"])) if d.get("error") else None,
            result_files=d.get("result_files"), created_at=d.get("created_at"), finished_at=d.get("finished_at"),
        )
        self.state.pop("pending_create", None)
        self.save()

    def new_events(self, job_id: str) -> list[dict[str, Any]]:
        """Events not seen yet, oldest first (the API lists newest first)."""
        seen = {e["id"] for e in self.state.get("events", [])}
        fresh: list[dict[str, Any]] = []
        after = None
        for _ in range(20):  # pages of 100 until we reach events we have
            kw: dict[str, Any] = {"limit": 100}
            if after:
                kw["after"] = after
            page = self.client.fine_tuning.jobs.list_events(job_id, **kw)
            data = [_plain(e) for e in page.data]
            new = [e for e in data if e["id"] not in seen]
            fresh.extend(new)
            if len(new) < len(data) or not getattr(page, "has_more", False) or not data:
                break
            after = data[-1]["id"]
        fresh.reverse()
        keep = [{k: e.get(k) for k in ("id", "created_at", "level", "message", "type", "data")} for e in fresh]
        self.state.setdefault("events", []).extend(keep)
        return keep

    def poll(self, job_id: str) -> Any:
        """Until the job ends; new events are logged as they come."""
        last_status = None
        while True:
            job = self.client.fine_tuning.jobs.retrieve(job_id)
            events = self.new_events(job_id)
            self.record_job(job)
            for e in events:
                self.log(f"  [{time.strftime('%H:%M:%S', time.localtime(e['created_at'] or 0))}] {e['message']}")
            if job.status != last_status:
                self.log(f"job {job_id}: {job.status}")
                last_status = job.status
            if self.progress:
                metrics = [e for e in self.state.get("events", []) if e.get("type") == "metrics" and e.get("data")]
                last = metrics[-1]["data"] if metrics else {}
                self.progress({"status": job.status, "step": last.get("step"), "total_steps": last.get("total_steps"),
                               "train_loss": last.get("train_loss")})
            if job.status in TERMINAL:
                return job
            self.sleep(self.spec.poll_interval_s)

    def cancel(self, job_id: str) -> Any:
        self.log(f"Ctrl-C: cancelling fine-tuning job {job_id} through the API "
                 "(use --detach to leave a job running and only stop polling)")
        try:
            job = self.client.fine_tuning.jobs.cancel(job_id)
        except Exception as exc:  # noqa: BLE001 - it may have finished meanwhile
            self.log(self._redact(f"cancel failed: {exc}"))
            job = self.client.fine_tuning.jobs.retrieve(job_id)
        self.new_events(job_id)
        self.record_job(job)
        return job

    # -- the whole flow --------------------------------------------------------------------------
    def prepare(self) -> tuple[Path, Path | None, CostEstimate, list[str]]:
        """Validate the export and estimate the cost (no network)."""
        train, val = self.run.layout.chat("train"), self.run.layout.chat("val")
        if not train.exists():
            raise FineTuneInputError(f"{train}: not found; run `stepwise export` first")
        counter = TokenCounter(self.spec.model)
        limit, limit_why = example_token_limit(self.spec)
        checks = [validate_chat_file(train, counter, limit)]
        if val.exists() and val.stat().st_size > 0:
            checks.append(validate_chat_file(val, counter, limit, min_examples=None))
        problems = [e for c in checks for e in c.errors]
        if problems:
            raise FineTuneInputError(f"{len(problems)} problem(s) in the exported chat data; nothing was uploaded",
                                     problems)
        notes = [f"per-example limit {limit:,} tokens ({limit_why}); tokens counted with {counter.name}"]
        est = estimate_cost(checks[0], self.spec, counter, limit)
        return train, (val if len(checks) > 1 else None), est, notes

    def execute(self, *, detach: bool = False) -> Outcome:
        train, val, est, notes = self.prepare()
        for n in notes:
            self.log(n)
        self.log(est.line())
        if self.client is None:
            self.client = make_client(self.spec)
        digests = {"train": sha256_file(train), "val": sha256_file(val) if val else None}
        params = {"backend": "openai", "model": self.spec.model, "hyperparameters": hyperparameters(self.spec),
                  "suffix": self.spec.suffix}
        outcome = Outcome(status="running", job_id=None, estimate=est, state_path=self.state_path)
        with self.run.stage("train", inputs=[p for p in (train, val) if p], params=params) as st:
            st.counts(examples=est.examples)
            st.extra(backend="openai", cost_estimate_usd=est.usd, estimate=asdict(est))
            job = self._existing_job(digests)
            if job is None:
                job = self._adopt_pending()
            if job is None:
                train_id = self.upload(train, "train")
                val_id = self.upload(val, "validation") if val else None
                job = self.create(train_id, val_id)
            self.state.update(data_sha256=digests, base_url=resolve_base_url(self.spec), estimate=asdict(est))
            self.record_job(job)  # the id is on disk before any polling
            self._manifest_progress()
            outcome.job_id = job.id
            if detach and job.status not in TERMINAL:
                self.log(f"detached: job {job.id} keeps running; `stepwise train` with this --run-dir resumes polling")
                st.mark("detached")
                outcome.status = "detached"
                self._finish(st, outcome)
                return outcome
            previous = signal.getsignal(signal.SIGINT)
            try:
                job = self.poll(job.id)
            except KeyboardInterrupt:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cancel
                try:
                    job = self.cancel(job.id)
                finally:
                    signal.signal(signal.SIGINT, previous)
            outcome.status = job.status if job.status in TERMINAL else "detached"
            outcome.fine_tuned_model = job.fine_tuned_model
            outcome.trained_tokens = job.trained_tokens
            if job.status == "failed":
                msg = (job.error.message if job.error else None) or "no error message"
                outcome.error = self._redact(msg)
                self._finish(st, outcome)
                raise FineTuneJobError(f"fine-tuning job {job.id} failed: {outcome.error}")
            if job.status != "succeeded":
                st.mark(outcome.status)
            self._finish(st, outcome)
        return outcome

    def _existing_job(self, digests: dict[str, str | None]) -> Any | None:
        """The recorded job to resume, or None to create one (a failed/cancelled job is kept in history)."""
        job_id = self.state.get("job_id")
        if not job_id:
            return None
        job = self.client.fine_tuning.jobs.retrieve(job_id)
        same = self.state.get("data_sha256") == digests
        if job.status not in TERMINAL and not same:
            raise FineTuneInputError(
                f"job {job_id} is still {job.status} on other data; the export changed since it was created. "
                f"Cancel it (Ctrl-C while `stepwise train` polls it) or use another --run-dir")
        if job.status in ("failed", "cancelled") or not same:
            self.log(f"previous job {job_id} is {job.status}{'' if same else ' on other data'}: creating a new one")
            self.state["history"].append({k: self.state.get(k) for k in (
                "job_id", "status", "fine_tuned_model", "trained_tokens", "error", "data_sha256")})
            for k in ("job_id", "status", "fine_tuned_model", "trained_tokens", "error", "events", "pending_create"):
                self.state.pop(k, None)
            self.save()
            return None
        self.log(f"resuming job {job_id} ({job.status}) recorded in {self.state_path}")
        return job

    def _manifest_progress(self) -> None:
        """The job id in the manifest now, not only when the stage ends."""
        summary = self._summary()

        def put(m: dict[str, Any]) -> None:
            m.setdefault("stages", {}).setdefault("train", {})["openai"] = summary

        self.run.update_manifest(put)

    def _summary(self) -> dict[str, Any]:
        s = self.state
        return {"job_id": s.get("job_id"), "status": s.get("status"), "model": s.get("model"),
                "fine_tuned_model": s.get("fine_tuned_model"), "trained_tokens": s.get("trained_tokens"),
                "hyperparameters": s.get("hyperparameters"), "error": s.get("error"), "base_url": s.get("base_url"),
                "files": s.get("files"), "events": s.get("events", []), "history": s.get("history", [])}

    def _finish(self, st: Any, outcome: Outcome) -> None:
        summary = self._summary()
        cost = None
        if outcome.trained_tokens:
            cost = round(outcome.trained_tokens * self.spec.training_price_per_1m_tokens / 1e6, 6)
        st.extra(openai=summary, job_id=outcome.job_id, fine_tuned_model=outcome.fine_tuned_model,
                 cost_usd=cost)
        if outcome.trained_tokens:
            st.counts(trained_tokens=outcome.trained_tokens)
        st.outputs(self.state_path)


def fine_tuned_model_of(run_path: Path) -> dict[str, Any] | None:
    """The run's succeeded hosted job: {fine_tuned_model, base_url, api_key_env?} or None."""
    state = RunLayout(Path(run_path)).train_dir / STATE_FILE
    if not state.exists():
        return None
    s = json.loads(state.read_text(encoding="utf-8"))
    if s.get("status") != "succeeded" or not s.get("fine_tuned_model"):
        return None
    return {"fine_tuned_model": s["fine_tuned_model"], "base_url": s.get("base_url"), "job_id": s.get("job_id")}


# --------------------------------------------------------------------------------------------
# CLI (called by stepwise.training.cli's `stepwise train` when the backend is openai)


def train_openai_cli(recipe_path: Path, run_dir: Path | None, *, detach: bool = False) -> int:
    """`stepwise train RECIPE --backend openai`: returns the exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

    from stepwise.cli_support import EXIT_BAD_INPUT, EXIT_STAGE_FAILED, EXIT_STOPPED, load_or_exit
    from stepwise.rundir import resolve_run

    console = Console(stderr=True)
    recipe = load_or_exit(recipe_path)
    try:
        run = resolve_run(recipe, run_dir, create=False)
    except FileNotFoundError as exc:
        console.print(f"[red]error[/red] {exc}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    prog = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=True, disable=not console.is_terminal)
    task = prog.add_task("fine-tuning", total=None, info="")

    def on_progress(p: dict[str, Any]) -> None:
        loss = f"loss {p['train_loss']}" if p.get("train_loss") is not None else ""
        prog.update(task, description=f"job {p['status']}", total=p.get("total_steps"), completed=p.get("step") or 0,
                    info=f"step {p.get('step') or 0}/{p.get('total_steps') or '?'} {loss}")

    ft = FineTuneRun(recipe, run, log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True),
                     progress=on_progress)
    try:
        with prog:
            out = ft.execute(detach=detach)
    except FineTuneInputError as exc:
        for p in exc.problems:
            console.print(f"[red]error[/red] {p}", highlight=False, soft_wrap=True, markup=False)
        console.print(f"[red]error[/red] {exc}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except FineTuneJobError as exc:
        console.print(f"[red]error[/red] {exc}", highlight=False, soft_wrap=True)
        return EXIT_STAGE_FAILED
    except Exception as exc:  # noqa: BLE001 - API errors: say which, scrubbed of the key
        console.print(f"[red]error[/red] {ft._redact(f'{type(exc).__name__}: {exc}')}", highlight=False,
                      soft_wrap=True, markup=False)
        return EXIT_STAGE_FAILED
    if out.status == "succeeded":
        cost = f"{out.trained_tokens:,} trained tokens" if out.trained_tokens else "trained tokens not reported"
        console.print(f"[green]done[/green] fine-tuned model: {out.fine_tuned_model} ({cost}); job record in "
                      f"{out.state_path}\n  evaluate it: stepwise eval {recipe_path} --run-dir {run.path}",
                      highlight=False, soft_wrap=True)
        return 0
    with contextlib.suppress(Exception):
        console.print(f"[yellow]{out.status}[/yellow] job {out.job_id}; recorded in {out.state_path}",
                      highlight=False, soft_wrap=True)
    return EXIT_STOPPED


def is_openai_recipe(path: Path) -> bool:
    """A recipe (not an Axolotl config) whose `training.backend` is openai."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(data, dict) or "task" not in data or not isinstance(data.get("training"), dict):
        return False
    return data["training"].get("backend") == "openai"
