"""Review round-trip through the real server: push, annotators answer over HTTP, pull."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path

import httpx
import pytest

from argilla_embedded.testing import curated_row, make_run
from stepwise.io import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def argilla_srv():
    from argilla_embedded.testing import shared_server

    return shared_server()


@pytest.fixture
def env(argilla_srv, monkeypatch):
    monkeypatch.setenv("ARGILLA_API_URL", argilla_srv.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_srv.api_key)
    return argilla_srv


def make_annotators(srv, n: int, workspace: str) -> list[dict]:
    import argilla as rg

    client = srv.client()
    ws = client.workspaces(workspace) or rg.Workspace(name=workspace, client=client).create()
    out = []
    for _ in range(n):
        name = f"ann-{uuid.uuid4().hex[:8]}"
        user = rg.User(username=name, password=secrets.token_urlsafe(12), role="annotator", client=client).create()
        user.add_to_workspace(ws)
        api_key = client.api.http_client.get(f"/api/v1/users/{user.id}").json()["api_key"]  # the SDK model drops it
        out.append({"username": name, "id": str(user.id), "api_key": api_key})
    return out


def answer(srv, api_key: str, record_id: str, status: str, **values) -> None:
    body: dict = {"status": status}
    if values:
        body["values"] = {k: {"value": v} for k, v in values.items()}
    r = httpx.post(f"{srv.url}/api/v1/records/{record_id}/responses", json=body,
                   headers={"X-Argilla-Api-Key": api_key}, timeout=60)
    assert r.status_code == 201, r.text


def record_ids(srv, dataset: str, workspace: str) -> dict[str, str]:
    client = srv.client()
    ds = client.datasets(dataset, workspace=workspace)
    return {m.external_id: str(m.id) for m in client.api.records.list(dataset_id=ds.id, limit=1000, with_responses=False)}


def test_push_annotate_pull_with_cli(env, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stepwise.cli import app

    name = f"rt-{uuid.uuid4().hex[:6]}"
    rows = [curated_row(i) for i in range(10)] + [curated_row(10 + i, "val") for i in range(2)]
    rows += [curated_row(50, label="nonsense"), curated_row(51, rationale=None),
             curated_row(52, input={"text": "y" * 600_000})]
    recipe, run = make_run(tmp_path, rows=rows, dataset=name, min_submitted=2)
    runner = CliRunner()
    res = runner.invoke(app, ["review", "push", str(recipe.source_path), "--run-dir", str(run.path)])
    assert res.exit_code == 0, res.output
    assert "pushed 12/15" in res.output and "3 errors" in res.output
    assert "not one of the task's classes" in res.output and "missing field `rationale`" in res.output
    assert "record too large" in res.output
    errors = read_jsonl(run.path / "review" / "push_errors.jsonl")
    assert {e["id"] for e in errors} == {"row-0050", "row-0051", "row-0052"}

    ws = recipe.review.workspace
    client = env.client()
    ds = client.datasets(name, workspace=ws)
    assert ds.settings.distribution.min_submitted == 2
    assert {q.name for q in ds.settings.questions} == {"label", "rationale_quality", "note"}
    assert {f.name for f in ds.settings.fields} == {"input", "rationale", "teacher_answer"}
    assert {m.name for m in ds.settings.metadata} >= {"validator_status", "dedup_cluster_size", "self_consistency"}
    models = client.api.records.list(dataset_id=ds.id, limit=100, with_responses=False)
    first = next(m for m in models if m.external_id == "row-0000")
    sugg = first.suggestions[0]
    assert (sugg.value, sugg.score, sugg.agent) == ("billing", 0.4, "teacher")
    meta = {m.name: m.value for m in first.metadata}
    assert meta["dedup_cluster_size"] == 1 and meta["validator_status"] == "ok" and meta["self_consistency"] == 0.4

    a, b, c = make_annotators(env, 3, ws)
    ids = record_ids(env, name, ws)
    # row 0: two agree with the teacher; row 1: two correct it; row 2: discarded by two;
    # row 3: one submit only (min_submitted 2 -> pending); row 4: 2 vs 1 split
    answer(env, a["api_key"], ids["row-0000"], "submitted", label="billing", rationale_quality=5)
    answer(env, b["api_key"], ids["row-0000"], "submitted", label="billing", rationale_quality=4)
    answer(env, a["api_key"], ids["row-0001"], "submitted", label="general", note="asks for office hours")
    answer(env, b["api_key"], ids["row-0001"], "submitted", label="general")
    answer(env, a["api_key"], ids["row-0002"], "discarded", note="duplicate ticket")
    answer(env, c["api_key"], ids["row-0002"], "discarded")
    answer(env, a["api_key"], ids["row-0003"], "submitted", label="billing")
    answer(env, a["api_key"], ids["row-0004"], "submitted", label="technical")
    answer(env, b["api_key"], ids["row-0004"], "submitted", label="technical")
    answer(env, c["api_key"], ids["row-0004"], "submitted", label="billing")

    # Re-push is idempotent: same records updated in place, responses kept.
    res = runner.invoke(app, ["review", "push", str(recipe.source_path), "--run-dir", str(run.path)])
    assert res.exit_code == 0 and "(0 new, 12 updated" in res.output, res.output
    assert len(record_ids(env, name, ws)) == 12

    res = runner.invoke(app, ["review", "pull", str(recipe.source_path), "--run-dir", str(run.path)])
    assert res.exit_code == 0, res.output
    reviewed = {r["id"]: r for r in read_jsonl(run.path / "review" / "reviewed.jsonl")}
    rejected = {r["id"]: r for r in read_jsonl(run.path / "review" / "rejected.jsonl")}
    assert set(reviewed) == {"row-0000", "row-0001", "row-0004"}
    assert reviewed["row-0000"]["review"]["status"] == "submitted" and not reviewed["row-0000"]["review"]["corrected"]
    assert reviewed["row-0000"]["review"]["rationale_quality"] == 4.5
    assert reviewed["row-0001"]["label"] == "general" and reviewed["row-0001"]["review"]["corrected"]
    assert reviewed["row-0001"]["review"]["teacher_label"] == "technical"
    assert reviewed["row-0004"]["label"] == "technical" and not reviewed["row-0004"]["review"]["corrected"]  # 2 vs 1
    users = {r["user"] for r in reviewed["row-0004"]["review"]["responses"]}
    assert users == {a["username"], b["username"], c["username"]}
    assert rejected["row-0002"]["reason"] == "discarded_by_reviewer" and rejected["row-0002"]["detail"] == "duplicate ticket"
    assert {rejected[k]["reason"] for k in ("row-0050", "row-0051", "row-0052")} == {"invalid_for_review"}
    assert "row-0003" not in reviewed and "row-0003" not in rejected  # pending: kept out of training
    agreement = json.loads((run.path / "review" / "agreement.json").read_text())
    c_ = agreement["counts"]
    assert (c_["submitted"], c_["corrected"], c_["discarded"], c_["pending"]) == (3, 1, 1, 8)
    label_q = agreement["questions"]["label"]
    assert label_q["items_with_2plus"] == 3 and label_q["annotators"] == 3
    assert label_q["fleiss_kappa"] is not None and label_q["cohen_kappa"]["pairs"]
    assert agreement["teacher_accuracy"]["n"] == 3 and agreement["teacher_accuracy"]["accuracy"] == pytest.approx(2 / 3, abs=1e-3)
    stage = run.stage_info("review")
    assert stage["status"] == "done" and stage["counts"]["submitted"] == 3


def test_sample_push_sends_low_confidence_first(env, tmp_path: Path) -> None:
    from curation.review import pull, push

    name = f"rt-sample-{uuid.uuid4().hex[:6]}"
    recipe, run = make_run(tmp_path, n_train=30, n_val=0, dataset=name, send="sample", sample_size=6)
    rep = push(recipe, run, log=lambda *_: None)
    assert rep.sent == 6 and rep.created == 6 and not rep.errors
    pushed = json.loads((run.path / "review" / "push.json").read_text())["pushed_ids"]
    assert len(pushed) == 6
    summary = pull(recipe, run, log=lambda *_: None)
    assert summary["counts"]["auto_accepted"] == 24 and summary["counts"]["pending"] == 6
    reviewed = read_jsonl(run.path / "review" / "reviewed.jsonl")
    assert len(reviewed) == 24 and all(r["review"]["sampled"] is False for r in reviewed)


def test_pull_without_push_explains(env, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stepwise.cli import app

    recipe, run = make_run(tmp_path, dataset=f"never-{uuid.uuid4().hex[:6]}")
    res = CliRunner().invoke(app, ["review", "pull", str(recipe.source_path), "--run-dir", str(run.path)])
    assert res.exit_code == 2 and "review push" in res.output
