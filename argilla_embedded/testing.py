"""Test support: one embedded server per test process, curated-run fixtures from the contract.

The server is started once per process (several test modules share it) in a temporary state dir
on free loopback ports, and stopped at exit.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwise.argilla_embedded.server import Credentials, EmbeddedServer, ServerInfo, free_port

_LOCK = threading.Lock()
_SHARED: SharedServer | None = None


@dataclass
class SharedServer:
    server: EmbeddedServer
    info: ServerInfo
    creds: Credentials

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def api_key(self) -> str:
        return self.creds.api_key

    def client(self):
        import argilla as rg

        return rg.Argilla(api_url=self.url, api_key=self.api_key, timeout=120)

    def restart(self) -> None:
        self.info, _ = self.server.serve(port=self.info.port)


def shared_server() -> SharedServer:
    global _SHARED
    with _LOCK:
        if _SHARED is not None:
            if not all(_SHARED.server.alive().values()):
                _SHARED.restart()
            return _SHARED
        state = Path(tempfile.mkdtemp(prefix="stepwise-argilla-test-"))
        srv = EmbeddedServer(state)
        info, _ = srv.serve(port=free_port())
        creds = srv.credentials()
        assert creds is not None

        def _cleanup() -> None:
            srv.stop()
            shutil.rmtree(state, ignore_errors=True)

        atexit.register(_cleanup)
        _SHARED = SharedServer(srv, info, creds)
        return _SHARED


CLASSES = ["billing", "technical", "general"]

RECIPE = """\
name: {name}
task:
  name: tickets
  classes: [billing, technical, general]
  instructions: Classify the support ticket.
data:
  inputs: inputs.jsonl
teacher:
  provider: openai
  model: stub-teacher
  base_url: http://127.0.0.1:1/v1
review:
  mode: {mode}
  dataset: {dataset}
  min_submitted: {min_submitted}
  send: {send}
  sample_size: {sample_size}
  accept_policy: {accept_policy}
"""


def curated_row(i: int, split: str = "train", **over: Any) -> dict[str, Any]:
    """A curated row as docs/contracts.md describes it (responses row + curation fields)."""
    label = CLASSES[i % 3]
    row = {
        "id": f"row-{i:04d}",
        "input": {"text": f"Ticket {i}: " + ["I was charged twice", "The app crashes on login", "Where is your office"][i % 3]},
        "gold": None,
        "source": {"file": "inputs.jsonl", "line": i + 1},
        "format": "dss",
        "rationale": f"The ticket mentions {['a charge', 'a crash', 'a general question'][i % 3]}, so it is {label}.",
        "label": label,
        "answer_text": label,
        "parse_status": "ok",
        "parse_detail": None,
        "raw": None,
        "samples": [],
        "agreement": round(0.4 + (i % 7) / 10, 2),
        "usage": {"input_tokens": 10, "output_tokens": 20},
        "cost": 0.0,
        "error": None,
        "attempts": 1,
        "split": split,
        "dedup_cluster": f"row-{i:04d}",
        "dedup_cluster_size": 1 + i % 3,
        "checks": {"rationale_consistent": True},
    }
    row.update(over)
    return row


def make_run(
    tmp: Path, *, n_train: int = 12, n_val: int = 3, name: str = "tickets", mode: str = "argilla",
    dataset: str = "tickets-review", min_submitted: int = 1, send: str = "all", sample_size: int = 100,
    accept_policy: str = "submitted_only", rows: list[dict[str, Any]] | None = None,
):
    """A recipe + run dir with curate/train.jsonl and val.jsonl; returns (recipe, run)."""
    from stepwise.recipe import load_recipe
    from stepwise.rundir import create_run

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "inputs.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    path = tmp / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(
        name=name, mode=mode, dataset=dataset, min_submitted=min_submitted, send=send, sample_size=sample_size,
        accept_policy=accept_policy,
    )), encoding="utf-8")
    recipe = load_recipe(path)
    run = create_run(recipe, tmp / "runs" / name / "r1")
    if rows is None:
        rows = [curated_row(i, "train") for i in range(n_train)] + [curated_row(n_train + i, "val") for i in range(n_val)]
    cur = run.stage_dir("curate")
    for split in ("train", "val"):
        with open(cur / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                if r.get("split", "train") == split:
                    fh.write(json.dumps(r) + "\n")
    return recipe, run
