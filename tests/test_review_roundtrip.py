"""Review round-trip through the real server: push, annotators answer over HTTP, pull."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path

import httpx
import pytest
from stepwise.argilla_embedded.testing import curated_row, make_run

from stepwise.io import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def argilla_srv():
    from stepwise.argilla_embedded.testing import shared_server

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
    assert {q.name for q in ds.settings.questions} == {"label", "rationale_edit", "rationale_quality", "note"}
    assert {f.name for f in ds.settings.fields} == {"input", "rationale", "teacher_answer"}
    assert {m.name for m in ds.settings.metadata} >= {"validator_status", "dedup_cluster_size", "self_consistency"}
    models = client.api.records.list(dataset_id=ds.id, limit=100, with_responses=False)
    first = next(m for m in models if m.external_id == "row-0000")
    sugg = {s.question_id: s for s in first.suggestions}
    qid = {q.name: q.id for q in ds.settings.questions}
    label_s, rationale_s = sugg[qid["label"]], sugg[qid["rationale_edit"]]
    assert (label_s.value, label_s.score, label_s.agent) == ("billing", 0.4, "teacher")
    assert (rationale_s.value, rationale_s.agent) == (rows[0]["rationale"], "teacher")  # editable, pre-filled
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
    assert res.exit_code == 3, res.output  # 8 rows still pending: nothing goes to training yet
    assert "4 of 12 reviewed; re-run when done, or `--accept-pending`" in " ".join(res.output.split())
    assert not (run.path / "review" / "reviewed.jsonl").exists() and run.stage_status("review") == "waiting"
    res = runner.invoke(app, ["review", "pull", str(recipe.source_path), "--run-dir", str(run.path),
                              "--accept-pending"])
    assert res.exit_code == 0, res.output
    reviewed = {r["id"]: r for r in read_jsonl(run.path / "review" / "reviewed.jsonl")}
    rejected = {r["id"]: r for r in read_jsonl(run.path / "review" / "rejected.jsonl")}
    pending = {k for k, r in reviewed.items() if r["review"]["status"] == "pending"}
    assert pending == {"row-0003", *(f"row-{i:04d}" for i in range(5, 12))}  # accepted with the teacher's answer
    assert all(reviewed[k]["review"]["accepted_pending"] for k in pending)
    assert set(reviewed) - pending == {"row-0000", "row-0001", "row-0004"}
    assert reviewed["row-0000"]["review"]["status"] == "submitted" and not reviewed["row-0000"]["review"]["corrected"]
    assert reviewed["row-0000"]["review"]["rationale_quality"] == 4.5
    assert reviewed["row-0001"]["label"] == "general" and reviewed["row-0001"]["review"]["corrected"]
    assert reviewed["row-0001"]["review"]["teacher_label"] == "technical"
    assert reviewed["row-0004"]["label"] == "technical" and not reviewed["row-0004"]["review"]["corrected"]  # 2 vs 1
    users = {r["user"] for r in reviewed["row-0004"]["review"]["responses"]}
    assert users == {a["username"], b["username"], c["username"]}
    assert rejected["row-0002"]["reason"] == "discarded_by_reviewer" and rejected["row-0002"]["detail"] == "duplicate ticket"
    assert {rejected[k]["reason"] for k in ("row-0050", "row-0051", "row-0052")} == {"invalid_for_review"}
    assert reviewed["row-0003"]["label"] == rows[3]["label"]  # one submit of the two needed: still the teacher's
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
    from stepwise.review.stage import ReviewPending, pull, push

    name = f"rt-sample-{uuid.uuid4().hex[:6]}"
    recipe, run = make_run(tmp_path, n_train=30, n_val=0, dataset=name, send="sample", sample_size=6)
    rep = push(recipe, run, log=lambda *_: None)
    assert rep.sent == 6 and rep.created == 6 and not rep.errors
    pushed = json.loads((run.path / "review" / "push.json").read_text())["pushed_ids"]
    assert len(pushed) == 6
    with pytest.raises(ReviewPending, match="0 of 6 reviewed"):
        pull(recipe, run, log=lambda *_: None)
    summary = pull(recipe, run, accept_pending=True, log=lambda *_: None)
    assert summary["counts"]["auto_accepted"] == 24 and summary["counts"]["pending"] == 6
    reviewed = read_jsonl(run.path / "review" / "reviewed.jsonl")
    assert len(reviewed) == 30 and sum(r["review"].get("sampled") is False for r in reviewed) == 24
    assert {r["id"] for r in reviewed if r["review"]["status"] == "pending"} == set(pushed)


def test_pull_without_push_explains(env, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stepwise.cli import app

    recipe, run = make_run(tmp_path, dataset=f"never-{uuid.uuid4().hex[:6]}")
    res = CliRunner().invoke(app, ["review", "pull", str(recipe.source_path), "--run-dir", str(run.path)])
    assert res.exit_code == 2 and "review push" in res.output


# -- what was pushed decides the pull; pending rows stop the run ----------------------------------


def sdk_answer(ann_client, record, user_id: str, status: str, **values) -> None:
    """One annotator's response through the SDK (their own client and API key)."""
    import argilla as rg

    responses = [rg.Response(q, v, user_id=user_id, status=status) for q, v in values.items()]
    ann_client.api.records.create_record_response(record._server_id, rg.UserResponse(responses, _record=record).api_model())


def test_run_pushes_stops_while_pending_and_trains_on_the_reviews(env, tmp_path: Path) -> None:
    """Issue 20.1: a recipe with `review.mode: auto` is run with `--review argilla`: push, 6 of 10
    answered by a second user (2 corrections, 1 discard), `stepwise run --from review` stops with
    exit 3 until the other 4 are in, then exports the corrected labels without the discarded row."""
    import argilla as rg
    from typer.testing import CliRunner

    from stepwise.cli import app

    name = f"e2e-{uuid.uuid4().hex[:6]}"
    rows = [curated_row(i) for i in range(10)]
    recipe, run = make_run(tmp_path, rows=rows, mode="auto", dataset=name)
    runner = CliRunner()
    run_cmd = ["run", str(recipe.source_path), "--run-dir", str(run.path), "--from", "review", "--until", "export",
               "--no-progress"]

    res = runner.invoke(app, [*run_cmd, "--review", "argilla"])
    assert res.exit_code == 3, res.output
    assert "pushed 10 records" in res.output
    push_info = json.loads((run.path / "review" / "push.json").read_text())
    assert (push_info["mode"], push_info["dataset"], len(push_info["pushed_ids"])) == ("argilla", name, 10)
    assert push_info["rationale_question"] is True

    (ann,) = make_annotators(env, 1, recipe.review.workspace)
    ann_client = rg.Argilla(api_url=env.url, api_key=ann["api_key"], timeout=120)
    # the record objects (server ids, the dataset's questions) as the owner sees them; annotators
    # may not list a dataset's records, only answer them
    ds = env.client().datasets(name, workspace=recipe.review.workspace)
    records = {r.id: r for r in ds.records(with_responses=False)}
    assert len(records) == 10
    rewrite = "The customer cannot find our office, a general question about where we are."
    first_six = {
        # row 1 (teacher: technical) -> general, rationale rewritten; row 4 (teacher: technical) -> billing,
        # rationale left as the teacher wrote it; row 2 discarded; rows 0, 3, 5 accepted as they are
        "row-0000": ("submitted", {"label": "billing"}),
        "row-0001": ("submitted", {"label": "general", "rationale_edit": rewrite}),
        "row-0002": ("discarded", {"note": "not a real ticket"}),
        "row-0003": ("submitted", {"label": "billing"}),
        "row-0004": ("submitted", {"label": "billing", "rationale_edit": rows[4]["rationale"]}),
        "row-0005": ("submitted", {"label": "general"}),
    }
    for rid, (status, values) in first_six.items():
        sdk_answer(ann_client, records[rid], ann["id"], status, **values)

    for extra in (["--review", "argilla"], []):  # the recipe says auto: the push still decides
        res = runner.invoke(app, [*run_cmd, *extra])
        assert res.exit_code == 3, res.output
        assert "6 of 10 reviewed; re-run when done, or `--accept-pending`" in " ".join(res.output.split())
        assert run.stage_status("review") == "waiting" and run.stage_status("export") != "done"
    assert not (run.path / "export" / "train.chat.jsonl").exists()

    res = runner.invoke(app, ["review", "status", str(recipe.source_path), "--run-dir", str(run.path)])
    assert res.exit_code == 0, res.output
    assert "6 of 10 reviewed" in res.output and "4 pending" in res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith(ann["username"]))
    assert line.split()[1:] == ["5", "1", "0"]  # submitted, discarded, draft

    res = runner.invoke(app, ["review", "pull", str(recipe.source_path), "--run-dir", str(run.path)])
    assert res.exit_code == 3 and "6 of 10 reviewed" in res.output

    for rid in ("row-0006", "row-0007", "row-0008", "row-0009"):
        sdk_answer(ann_client, records[rid], ann["id"], "submitted", label=rows[int(rid[-1])]["label"])
    res = runner.invoke(app, [*run_cmd, "--review", "argilla"])
    assert res.exit_code == 0, res.output
    assert run.stage_status("review") == "done" and run.stage_status("export") == "done"

    chat = read_jsonl(run.path / "export" / "train.chat.jsonl")
    lineage = read_jsonl(run.path / "export" / "train.lineage.jsonl")
    answers = {(lin["id"], lin["kind"]): m["messages"][-1]["content"] for m, lin in zip(chat, lineage, strict=True)}
    assert answers[("row-0001", "label")] == "<answer>general</answer>"
    assert answers[("row-0004", "label")] == "<answer>billing</answer>"
    assert not any(rid == "row-0002" for rid, _ in answers)  # discarded
    assert {rid for rid, _ in answers} == {f"row-{i:04d}" for i in range(10)} - {"row-0002"}
    # the rewritten rationale trains with its label; the unedited one (for `technical`) does not train at all
    assert answers[("row-0001", "rationale")] == f"<rationale>{rewrite}</rationale>"
    assert ("row-0004", "rationale") not in answers
    sources = {lin["id"]: lin["rationale_source"] for lin in lineage}
    assert (sources["row-0001"], sources["row-0004"], sources["row-0000"]) == ("reviewer", None, "teacher")
    agreement = json.loads((run.path / "review" / "agreement.json").read_text())
    c = agreement["counts"]
    assert (c["submitted"], c["corrected"], c["discarded"], c["pending"]) == (9, 2, 1, 0)
    assert (c["rationale_edited"], c["rationale_dropped_after_correction"]) == (1, 1)


def test_pull_from_a_dataset_made_before_the_rationale_question(env, tmp_path: Path) -> None:
    """A dataset created by an older stepwise (no `rationale_edit` question) still pushes (with a
    warning) and pulls; a corrected row from it trains label-only."""
    from stepwise.review.argilla import RATIONALE_Q, build_settings
    from stepwise.review.stage import pull, push

    name = f"old-{uuid.uuid4().hex[:6]}"
    recipe, run = make_run(tmp_path, rows=[curated_row(i) for i in range(3)], dataset=name)
    import argilla as rg

    settings = build_settings(recipe)
    settings.questions = [q for q in settings.questions if q.name != RATIONALE_Q]
    client = env.client()
    ws = recipe.review.workspace
    if client.workspaces(ws) is None:
        rg.Workspace(name=ws, client=client).create()
    rg.Dataset(name=name, workspace=ws, settings=settings, client=client).create()

    logged: list[str] = []
    rep = push(recipe, run, log=logged.append)
    assert rep.sent == 3 and not rep.errors
    assert any("without the editable rationale question" in m for m in logged), logged
    assert json.loads((run.path / "review" / "push.json").read_text())["rationale_question"] is False

    (ann,) = make_annotators(env, 1, ws)
    ids = record_ids(env, name, ws)
    answer(env, ann["api_key"], ids["row-0000"], "submitted", label="billing")
    answer(env, ann["api_key"], ids["row-0001"], "submitted", label="general")
    answer(env, ann["api_key"], ids["row-0002"], "submitted", label="general")
    summary = pull(recipe, run, log=lambda *_: None)
    assert summary["counts"]["corrected"] == 1 and summary["counts"]["rationale_dropped_after_correction"] == 1
    fixed = next(r for r in read_jsonl(run.path / "review" / "reviewed.jsonl") if r["id"] == "row-0001")
    assert fixed["label"] == "general" and fixed["rationale"] is None


def test_rows_curated_after_the_push_go_to_reviewers_not_straight_to_training(env, tmp_path: Path) -> None:
    """`send: all` pushed 4 rows, all reviewed; curation then ran again and made 2 more. A pull
    must not auto-accept those 2 as "not sampled": `review pull` stops naming them, and
    `stepwise run --from review` pushes them and stops (exit 3) until they are reviewed."""
    import argilla as rg
    from typer.testing import CliRunner

    from stepwise.cli import app

    name = f"late-{uuid.uuid4().hex[:6]}"
    rows = [curated_row(i) for i in range(6)]
    recipe, run = make_run(tmp_path, rows=rows[:4], dataset=name)
    runner = CliRunner()
    run_cmd = ["run", str(recipe.source_path), "--run-dir", str(run.path), "--from", "review", "--until", "review",
               "--no-progress"]
    assert runner.invoke(app, run_cmd).exit_code == 3  # pushed 4
    (ann,) = make_annotators(env, 1, recipe.review.workspace)
    ann_client = rg.Argilla(api_url=env.url, api_key=ann["api_key"], timeout=120)
    ds = env.client().datasets(name, workspace=recipe.review.workspace)
    for rec in ds.records(with_responses=False):
        sdk_answer(ann_client, rec, ann["id"], "submitted", label="billing")
    # curation runs again: two rows Argilla has never seen
    with open(run.path / "curate" / "train.jsonl", "a", encoding="utf-8") as fh:
        for r in rows[4:]:
            fh.write(json.dumps(r) + "\n")

    res = runner.invoke(app, ["review", "pull", str(recipe.source_path), "--run-dir", str(run.path)])
    assert res.exit_code == 3, res.output
    assert "2 curated rows" in res.output and "never sent to Argilla" in " ".join(res.output.split())
    assert not (run.path / "review" / "reviewed.jsonl").exists()

    res = runner.invoke(app, run_cmd)
    assert res.exit_code == 3 and "pushed 2 curated rows" in " ".join(res.output.split()), res.output
    assert len(list(ds.records(with_responses=False))) == 6
    # the 4 earlier reviews survive the re-push; now the 2 new rows are what is pending
    res = runner.invoke(app, run_cmd)
    assert res.exit_code == 3 and "4 of 6 reviewed" in " ".join(res.output.split()), res.output
