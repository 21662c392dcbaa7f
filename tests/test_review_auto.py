"""Review stage without a server: auto mode, the decision rules, sampling, agreement statistics."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from stepwise.argilla_embedded.testing import curated_row, make_run
from stepwise.review.agreement import (
    cohen_kappa,
    fleiss_kappa,
    majority,
    percent_agreement,
    question_agreement,
)
from stepwise.review.argilla import MAX_RECORD_BYTES, validate_row
from stepwise.review.stage import decide, review_auto, select_rows

from stepwise.io import read_jsonl


def test_auto_accepts_every_train_and_val_row(tmp_path: Path) -> None:
    recipe, run = make_run(tmp_path, n_train=5, n_val=2, mode="auto")
    summary = review_auto(recipe, run)
    rows = read_jsonl(run.path / "review" / "reviewed.jsonl")
    assert len(rows) == 7 and {r["split"] for r in rows} == {"train", "val"}
    assert all(r["review"] == {"status": "auto_accepted", "responses": [], "corrected": False} for r in rows)
    assert read_jsonl(run.path / "review" / "rejected.jsonl") == []
    assert summary["counts"]["auto_accepted"] == 7
    stage = run.stage_info("review")
    assert stage["status"] == "done" and stage["counts"]["auto_accepted"] == 7
    assert {o["path"] for o in stage["outputs"]} == {"review/reviewed.jsonl", "review/rejected.jsonl", "review/agreement.json"}
    assert json.loads((run.path / "review" / "agreement.json").read_text())["mode"] == "auto"


def test_auto_names_the_missing_curate_output(tmp_path: Path) -> None:
    recipe, run = make_run(tmp_path, mode="auto")
    (run.path / "curate" / "val.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="val.jsonl"):
        review_auto(recipe, run)


def test_pull_in_auto_mode_is_auto(tmp_path: Path) -> None:
    from stepwise.review.stage import pull

    recipe, run = make_run(tmp_path, n_train=3, n_val=1, mode="auto")
    assert pull(recipe, run, log=lambda *_: None)["mode"] == "auto"


# -- decisions ------------------------------------------------------------------------------------


def _resp(user: str, status: str, **values):
    return SimpleNamespace(user_id=user, status=status, values={k: {"value": v} for k, v in values.items()})


def _model(*responses):
    return SimpleNamespace(responses=list(responses))


def test_decide_applies_corrections_discards_and_pending(tmp_path: Path) -> None:
    rows = [curated_row(i) for i in range(6)]
    recipe, _ = make_run(tmp_path, rows=rows, min_submitted=1)
    models = {
        "row-0000": _model(_resp("u1", "submitted", label="billing", rationale_quality=5)),  # accept as is
        "row-0001": _model(_resp("u1", "submitted", label="general", note="not technical")),  # correction
        "row-0002": _model(_resp("u1", "discarded", note="spam")),  # discard
        "row-0003": _model(_resp("u1", "draft", label="general")),  # pending (draft only)
        "row-0004": _model(),  # pending (nobody)
    }
    out = decide(recipe, rows, models, pushed={r["id"] for r in rows[:5]}, users={"u1": "alice"})
    by_id = {r["id"]: r for r in out["reviewed"]}
    assert set(by_id) == {"row-0000", "row-0001", "row-0005"}
    assert by_id["row-0000"]["review"]["status"] == "submitted" and not by_id["row-0000"]["review"]["corrected"]
    assert by_id["row-0000"]["review"]["rationale_quality"] == 5
    fixed = by_id["row-0001"]
    assert fixed["label"] == "general" and fixed["review"]["corrected"] and fixed["review"]["teacher_label"] == "technical"
    assert fixed["review"]["notes"] == ["not technical"] and fixed["review"]["responses"][0]["user"] == "alice"
    assert by_id["row-0005"]["review"]["status"] == "auto_accepted"  # not sent (sample)
    assert [(r["id"], r["reason"], r["detail"]) for r in out["rejected"]] == [("row-0002", "discarded_by_reviewer", "spam")]
    c = out["summary"]["counts"]
    assert (c["submitted"], c["corrected"], c["discarded"], c["pending"], c["auto_accepted"]) == (2, 1, 1, 2, 1)
    assert out["summary"]["teacher_accuracy"]["accuracy"] == 0.5


def test_decide_min_submitted_majority_and_policy(tmp_path: Path) -> None:
    rows = [curated_row(i) for i in range(4)]
    recipe, _ = make_run(tmp_path, rows=rows, min_submitted=2, accept_policy="submitted_or_pending")
    models = {
        "row-0000": _model(_resp("a", "submitted", label="general"), _resp("b", "submitted", label="general"),
                           _resp("c", "submitted", label="billing")),
        "row-0001": _model(_resp("a", "submitted", label="general")),  # only 1 of 2 needed -> pending
        "row-0002": _model(_resp("a", "submitted", label="technical"), _resp("b", "discarded"), _resp("c", "discarded")),
        "row-0003": _model(_resp("a", "submitted", label="billing"), _resp("b", "submitted", label="general")),
    }
    out = decide(recipe, rows, models, pushed=set(models), users={})
    by_id = {r["id"]: r for r in out["reviewed"]}
    assert by_id["row-0000"]["label"] == "general" and by_id["row-0000"]["review"]["corrected"]
    assert by_id["row-0001"]["review"]["status"] == "pending"  # kept, by policy, with the teacher's label
    assert by_id["row-0001"]["label"] == "technical"
    assert [r["id"] for r in out["rejected"]] == ["row-0002"]
    # 1-1 tie between reviewers: the teacher's answer (billing for row 3) wins the tie
    assert by_id["row-0003"]["label"] == rows[3]["label"] == "billing"
    q = out["summary"]["questions"]["label"]
    assert q["items_with_2plus"] == 2 and q["annotators"] == 3 and "fleiss_kappa" in q and "cohen_kappa" in q


def test_decide_structured_answers(tmp_path: Path) -> None:
    rows = [curated_row(i, label={"q": i}) for i in range(3)]
    recipe, _ = make_run(tmp_path, rows=rows)
    recipe.task.classes, recipe.task.structured = None, "json"
    models = {
        "row-0000": _model(_resp("a", "submitted", answer='{"q": 0}')),
        "row-0001": _model(_resp("a", "submitted", answer='```json\n{"q": 42}\n```')),
        "row-0002": _model(_resp("a", "submitted", answer="{not json")),
    }
    out = decide(recipe, rows, models, pushed=set(models), users={})
    by_id = {r["id"]: r for r in out["reviewed"]}
    assert not by_id["row-0000"]["review"]["corrected"]
    assert by_id["row-0001"]["label"] == {"q": 42} and by_id["row-0001"]["review"]["corrected"]
    assert [(r["id"], r["reason"]) for r in out["rejected"]] == [("row-0002", "invalid_correction")]


def test_decide_rejects_rows_that_could_not_be_sent(tmp_path: Path) -> None:
    rows = [curated_row(0), curated_row(1, label="nonsense")]
    recipe, _ = make_run(tmp_path, rows=rows)
    out = decide(recipe, rows, {}, pushed={"row-0000"}, users={}, failed={"row-0001": "label 'nonsense' is not ..."})
    assert [(r["id"], r["reason"]) for r in out["rejected"]] == [("row-0001", "invalid_for_review")]
    assert [r["review"]["status"] for r in out["reviewed"]] == []  # row 0 pending, policy submitted_only
    assert out["summary"]["counts"]["pending"] == 1


# -- validation and sampling -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ({"label": "nonsense"}, "not one of the task's classes"),
        ({"rationale": None}, "missing field `rationale`"),
        ({"input": None}, "missing field `input`"),
        ({"label": None}, "missing field `label`"),
        ({"input": {"text": "x" * (MAX_RECORD_BYTES + 1)}}, "record too large"),
    ],
)
def test_validate_row_names_the_problem(tmp_path: Path, override: dict, message: str) -> None:
    recipe, _ = make_run(tmp_path)
    assert message in (validate_row(recipe, curated_row(1, **override)) or "")
    assert validate_row(recipe, curated_row(1)) is None


def test_sample_is_stratified_and_low_confidence_first(tmp_path: Path) -> None:
    rows = [curated_row(i) for i in range(60)]
    recipe, _ = make_run(tmp_path, rows=rows, send="sample", sample_size=12)
    picked = select_rows(recipe, rows)
    assert len(picked) == 12 and len({r["id"] for r in picked}) == 12
    per_label = {c: sum(r["label"] == c for r in picked) for c in ("billing", "technical", "general")}
    assert per_label == {"billing": 4, "technical": 4, "general": 4}
    conf = [r["agreement"] for r in picked]
    assert conf == sorted(conf)
    # within each label the lowest-confidence rows were taken
    for c in per_label:
        taken = sorted(r["agreement"] for r in picked if r["label"] == c)
        pool = sorted(r["agreement"] for r in rows if r["label"] == c)
        assert taken == pool[: len(taken)]
    assert select_rows(recipe, rows) == picked  # deterministic


def test_sample_keeps_small_strata(tmp_path: Path) -> None:
    rows = [curated_row(i, label="billing") for i in range(40)] + [curated_row(100, label="general")]
    recipe, _ = make_run(tmp_path, rows=rows, send="sample", sample_size=5)
    picked = select_rows(recipe, rows)
    assert len(picked) == 5 and any(r["label"] == "general" for r in picked)


# -- statistics -------------------------------------------------------------------------------------


def test_cohen_kappa_textbook_value() -> None:
    # 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15 -> po 0.7, pe 0.5, kappa 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0


def test_fleiss_kappa_textbook_value() -> None:
    # Fleiss (1971) style table from Wikipedia's worked example: 10 items, 14 raters, 5 categories.
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    ratings = []
    for counts in table:
        item, k = {}, 0
        for cat, n in enumerate(counts):
            for _ in range(n):
                item[f"r{k}"] = cat
                k += 1
        ratings.append(item)
    assert fleiss_kappa(ratings) == pytest.approx(0.210, abs=1e-3)


def test_percent_agreement_majority_and_summary() -> None:
    ratings = [{"a": 1, "b": 1}, {"a": 1, "b": 2, "c": 1}, {"a": 3}]
    assert percent_agreement(ratings) == pytest.approx((1 + 1 / 3) / 2)
    assert majority(["x", "y", "y"]) == "y" and majority(["x", "y"], prefer="y") == "y"
    summary = question_agreement(ratings)
    assert summary["items"] == 3 and summary["items_with_2plus"] == 2 and summary["annotators"] == 3


def test_credentials_file_is_private(tmp_path: Path) -> None:
    from stepwise.argilla_embedded.server import EmbeddedServer

    srv = EmbeddedServer(tmp_path / "state")
    creds = srv._new_credentials("stepwise")
    mode = stat.S_IMODE(os.stat(srv.credentials_path).st_mode)
    assert mode == 0o600
    assert len(creds.password) >= 12 and len(creds.api_key) >= 32 and creds.password != "12345678"
    assert srv.credentials() == creds
    assert EmbeddedServer(tmp_path / "other")._new_credentials("x").api_key != creds.api_key


def _fake_sdk_client(handler):
    """What `bulk_upsert` touches of an `rg.Argilla` client, over an in-memory transport."""
    import httpx
    from argilla._api._records import RecordsAPI

    http = httpx.Client(base_url="http://argilla.test", transport=httpx.MockTransport(handler))
    return SimpleNamespace(api=SimpleNamespace(http_client=http, records=RecordsAPI(http_client=http)))


def _record_models(n: int):
    import uuid

    from argilla._models import RecordModel, SuggestionModel, VectorModel
    from argilla._models._record._metadata import MetadataModel

    return [RecordModel(
        id=uuid.uuid4(), external_id=f"row-{i}", fields={"input": f"ticket {i} é ✓", "rationale": "r"},
        metadata=[MetadataModel(name="cluster_size", value=i), MetadataModel(name="agreement", value=0.1 * i)],
        vectors=[VectorModel(name="emb", vector_values=[0.1 * i, -1e-7, 3.0, 1 / 3])],
        suggestions=[SuggestionModel(question_name="label", question_id=uuid.uuid4(), value="billing",
                                     score=0.9, agent="teacher")],
    ) for i in range(n)]


def test_bulk_upsert_sends_what_the_sdk_sends() -> None:
    """Same URL, method and JSON values as the SDK's `RecordsAPI.bulk_upsert` (stdlib json, via
    httpx), and the updated count from the reply."""
    from stepwise.review.argilla import bulk_upsert

    models = _record_models(3)
    seen: list = []

    def handler(request):
        import httpx

        seen.append((request.method, request.url.path, request.headers["content-type"], json.loads(request.content)))
        return httpx.Response(200, json={"items": [], "updated_item_ids": [str(models[0].id)]})

    client = _fake_sdk_client(handler)
    dataset_id = "2f6a9c6e-0000-4000-8000-000000000001"
    assert bulk_upsert(client, dataset_id, models) == 1
    client.api.records.bulk_upsert(dataset_id=dataset_id, records=models)  # the SDK's own request
    ours, sdks = seen
    assert ours == sdks
    assert ours[1] == f"/api/v1/datasets/{dataset_id}/records/bulk" and ours[0] == "PUT"
    assert ours[3]["items"][2]["vectors"]["emb"] == [0.2, -1e-7, 3.0, 1 / 3]


def test_bulk_upsert_raises_the_sdks_errors() -> None:
    import httpx
    from argilla._exceptions import UnprocessableEntityError
    from stepwise.review.argilla import bulk_upsert

    client = _fake_sdk_client(lambda request: httpx.Response(422, json={"detail": "Record at position 1 is not valid"}))
    with pytest.raises(UnprocessableEntityError, match="position 1 is not valid"):
        bulk_upsert(client, "d", _record_models(2))
    with pytest.raises(ValueError, match="more than 500"):
        bulk_upsert(client, "d", _record_models(501))


# -- what was pushed decides the pull (the server-side round trip is in test_review_roundtrip) ------


def test_explicit_review_auto_after_a_push_says_the_reviews_are_not_used(tmp_path: Path) -> None:
    from stepwise.pipeline import RunOptions, run_pipeline

    recipe, run = make_run(tmp_path, n_train=3, n_val=0, mode="argilla")
    (run.stage_dir("review") / "push.json").write_text(json.dumps({"mode": "argilla", "dataset": "d", "workspace": "w",
                                                               "pushed_ids": ["row-0000"]}))
    out = run_pipeline(recipe, run, RunOptions(review="auto", from_stage="review", until_stage="review"))
    review = next(o for o in out.outcomes if o.stage == "review")
    assert review.status == "done" and "NOT used" in review.detail and "push.json" in review.detail


@pytest.mark.slow  # 3-16 s each (CLI subprocesses, imports): keeps make test-fast under 2 min
def test_recipe_auto_after_a_push_pulls_instead_of_auto_accepting(tmp_path: Path, monkeypatch) -> None:
    """No server here: the stage must try to reach Argilla (and fail saying so), never auto-accept."""
    from stepwise.pipeline import RunOptions, run_pipeline

    monkeypatch.setenv("ARGILLA_API_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("ARGILLA_API_KEY", "k")
    recipe, run = make_run(tmp_path, n_train=3, n_val=0, mode="auto")
    (run.stage_dir("review") / "push.json").write_text(json.dumps({"mode": "argilla", "dataset": "d", "workspace": "w",
                                                               "pushed_ids": ["row-0000"]}))
    out = run_pipeline(recipe, run, RunOptions(from_stage="review", until_stage="review"))
    review = next(o for o in out.outcomes if o.stage == "review")
    assert review.status == "failed" and out.exit_code == 13
    assert "cannot reach Argilla at http://127.0.0.1:1" in review.detail and "'d'" in review.detail
    assert not (run.path / "review" / "reviewed.jsonl").exists()
