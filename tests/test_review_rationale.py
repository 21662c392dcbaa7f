"""No training example argues for a label it does not have: a reviewer's corrected answer never
trains with the teacher's rationale for the old answer (SFT export and DPO pairs), a reviewer's
rewritten rationale is checked like curation checks the teacher's, and lineage says whose it is.

No server: `decide` is fed response objects shaped like the SDK's record models."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from stepwise.argilla_embedded.testing import curated_row, make_run
from stepwise.curation.export import run_export
from stepwise.review.argilla import RATIONALE_Q
from stepwise.review.preferences import preference_pairs
from stepwise.review.stage import decide

from stepwise.io import DataFileError, atomic_write_jsonl, read_jsonl


def _resp(user: str, status: str, **values):
    return SimpleNamespace(user_id=user, status=status, values={k: {"value": v} for k, v in values.items()})


def _model(*responses):
    return SimpleNamespace(responses=list(responses))


def _count_tokens(messages) -> int:
    return sum(len(m["content"]) for m in messages)


def _set_dss(recipe, dss: str) -> None:
    recipe.training.dss_output = dss


# row-0000: billing ("... a charge, so it is billing."), row-0001: technical ("... a crash, so it is technical.")
REWRITE = "The customer only asks where the office is, which is a general question."


def _reviewed(tmp_path: Path, models: dict, n: int = 3, **kw):
    rows = [curated_row(i) for i in range(n)]
    recipe, run = make_run(tmp_path, rows=rows, **kw)
    out = decide(recipe, rows, models, pushed=set(models), users={})
    return recipe, run, out


def _write_review(run, out) -> None:
    with run.stage("review") as st:
        atomic_write_jsonl(run.stage_dir("review") / "reviewed.jsonl", out["reviewed"])
        st.outputs(run.path / "review" / "reviewed.jsonl")


def _export(recipe, run, dss: str) -> tuple[list[dict], list[dict]]:
    _set_dss(recipe, dss)
    run_export(recipe, run, counter=_count_tokens)
    chat = read_jsonl(run.path / "export" / "train.chat.jsonl")
    lineage = read_jsonl(run.path / "export" / "train.lineage.jsonl")
    return chat, lineage


@pytest.mark.parametrize("dss", ["multitask", "cot"])
def test_corrected_row_with_unedited_rationale_trains_label_only(tmp_path: Path, dss: str) -> None:
    teacher_rationale = curated_row(1)["rationale"]
    models = {
        # the UI pre-fills the rationale question with the teacher's text; submitted unchanged
        "row-0001": _model(_resp("u1", "submitted", label="general", **{RATIONALE_Q: teacher_rationale})),
        # an SDK/older client answers only the label
        "row-0002": _model(_resp("u1", "submitted", label="billing")),
        "row-0000": _model(_resp("u1", "submitted", label="billing", **{RATIONALE_Q: curated_row(0)["rationale"]})),
    }
    recipe, run, out = _reviewed(tmp_path, models)
    by_id = {r["id"]: r for r in out["reviewed"]}
    for rid in ("row-0001", "row-0002"):
        assert by_id[rid]["review"]["corrected"] and by_id[rid]["rationale"] is None
        assert by_id[rid]["rationale_source"] is None
        assert by_id[rid]["review"]["teacher_rationale"] == curated_row(int(rid[-1]))["rationale"]
    assert by_id["row-0000"]["rationale"] == curated_row(0)["rationale"]  # not corrected: the teacher's stays
    assert by_id["row-0000"]["rationale_source"] == "teacher"
    assert out["summary"]["counts"]["rationale_dropped_after_correction"] == 2

    _write_review(run, out)
    chat, lineage = _export(recipe, run, dss)
    for messages, lin in zip(chat, lineage, strict=True):
        answer = messages["messages"][-1]["content"]
        if lin["id"] in ("row-0001", "row-0002"):
            assert lin["kind"] == "label" and lin["rationale_source"] is None
            assert "<rationale>" not in answer
        else:
            assert lin["rationale_source"] == "teacher"
    assert sorted(lin["id"] for lin in lineage if lin["kind"] in ("rationale", "cot")) == ["row-0000"]
    # the corrected labels are what trains
    assert any("<answer>general</answer>" in m["messages"][-1]["content"] for m in chat)


@pytest.mark.parametrize("dss", ["multitask", "cot"])
def test_corrected_row_with_edited_rationale_trains_the_reviewers(tmp_path: Path, dss: str) -> None:
    models = {"row-0001": _model(_resp("u1", "submitted", label="general", **{RATIONALE_Q: "  " + REWRITE + "\n"}))}
    recipe, run, out = _reviewed(tmp_path, models, n=2)
    row = next(r for r in out["reviewed"] if r["id"] == "row-0001")
    assert row["rationale"] == REWRITE and row["rationale_source"] == "reviewer"
    assert row["review"]["rationale_by"] == "u1" and row["review"]["teacher_rationale"] == curated_row(1)["rationale"]
    assert out["summary"]["counts"]["rationale_edited"] == 1
    assert out["summary"]["counts"]["rationale_dropped_after_correction"] == 0

    _write_review(run, out)
    chat, lineage = _export(recipe, run, dss)
    texts = [m["messages"][-1]["content"] for m, lin in zip(chat, lineage, strict=True) if lin["id"] == "row-0001"]
    assert any(f"<rationale>{REWRITE}</rationale>" in t for t in texts)
    assert not any("a crash" in t for t in texts)  # the teacher's reasoning for `technical`
    assert {lin["rationale_source"] for lin in lineage if lin["id"] == "row-0001"} == {"reviewer"}


def test_rewrite_that_still_argues_for_another_label_is_dropped(tmp_path: Path) -> None:
    """The reviewer's text goes through curation's own rationale check against the new label."""
    still_wrong = "The app crashes at login, so this is clearly a technical problem."
    too_short = "general"
    models = {
        "row-0001": _model(_resp("u1", "submitted", label="general", **{RATIONALE_Q: still_wrong})),
        "row-0002": _model(_resp("u1", "submitted", label="billing", **{RATIONALE_Q: too_short})),
    }
    _, _, out = _reviewed(tmp_path, models)
    by_id = {r["id"]: r for r in out["reviewed"]}
    assert by_id["row-0001"]["rationale"] is None
    assert "rationale_inconsistent" in by_id["row-0001"]["review"]["rationale_edit_rejected"][0]
    assert "rationale_too_short" in by_id["row-0002"]["review"]["rationale_edit_rejected"][0]
    c = out["summary"]["counts"]
    assert (c["rationale_dropped_after_correction"], c["rationale_edit_rejected"]) == (2, 2)


def test_majority_answer_takes_the_rewrite_of_a_reviewer_who_gave_it(tmp_path: Path) -> None:
    models = {"row-0001": _model(
        _resp("a", "submitted", label="general", **{RATIONALE_Q: REWRITE}),
        _resp("b", "submitted", label="general"),
        _resp("c", "submitted", label="billing", **{RATIONALE_Q: "A charge appears on the card, so it is billing."}),
    )}
    _, _, out = _reviewed(tmp_path, models, n=2)
    row = next(r for r in out["reviewed"] if r["id"] == "row-0001")
    assert row["label"] == "general" and row["rationale"] == REWRITE and row["review"]["rationale_by"] == "a"


def test_uncorrected_row_with_a_rewrite_keeps_it_when_it_passes(tmp_path: Path) -> None:
    better = "The customer reports that the app crashes at login, a technical fault."
    models = {"row-0001": _model(_resp("u1", "submitted", label="technical", **{RATIONALE_Q: better}))}
    _, _, out = _reviewed(tmp_path, models, n=2)
    row = next(r for r in out["reviewed"] if r["id"] == "row-0001")
    assert not row["review"]["corrected"] and row["rationale"] == better and row["rationale_source"] == "reviewer"


def test_export_never_pairs_a_correction_with_the_teachers_rationale_from_older_pulls(tmp_path: Path) -> None:
    """reviewed.jsonl written before rationales were settled: corrected, teacher's rationale kept."""
    rows = [curated_row(0), curated_row(1, label="general", review={"status": "submitted", "corrected": True,
                                                                     "teacher_label": "technical", "responses": []})]
    recipe, run = make_run(tmp_path, rows=[curated_row(0), curated_row(1)])
    _write_review(run, {"reviewed": rows})
    chat, lineage = _export(recipe, run, "multitask")
    assert [(lin["id"], lin["kind"]) for lin in lineage] == [("row-0000", "label"), ("row-0000", "rationale"),
                                                            ("row-0001", "label")]
    assert not any("a crash" in m["messages"][-1]["content"] for m in chat)


def test_export_refuses_a_review_that_is_waiting(tmp_path: Path) -> None:
    recipe, run = make_run(tmp_path)
    with run.stage("review") as st:
        st.mark("waiting")
    with pytest.raises(DataFileError, match="waiting for reviewers"):
        run_export(recipe, run, counter=_count_tokens)


# -- DPO --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dss", ["multitask", "cot", "label_only"])
def test_dpo_chosen_never_carries_the_rejected_labels_reasoning(tmp_path: Path, dss: str) -> None:
    teacher_rationale = curated_row(1)["rationale"]
    models = {
        "row-0001": _model(_resp("u1", "submitted", label="general", **{RATIONALE_Q: teacher_rationale})),
        "row-0002": _model(_resp("u1", "submitted", label="technical", **{RATIONALE_Q: REWRITE.replace(
            "where the office is, which is a general question", "why the app crashes, a technical fault")})),
    }
    recipe, _, out = _reviewed(tmp_path, models)
    _set_dss(recipe, dss)
    by_id = {r["id"]: r for r in out["reviewed"]}

    unedited = preference_pairs(by_id["row-0001"], recipe)
    assert unedited, "a corrected row still gives a pair"
    for _, pair in unedited:
        assert "a crash" not in pair["chosen"]["content"] and "<rationale>" not in pair["chosen"]["content"]
        assert pair["chosen"]["content"].endswith("<answer>general</answer>")
        assert pair["rejected"]["content"].endswith("<answer>technical</answer>")

    edited = dict(preference_pairs(by_id["row-0002"], recipe))
    teacher_2 = curated_row(2)["rationale"]  # "... a general question, so it is general."
    for pair in edited.values():
        assert teacher_2 not in pair["chosen"]["content"]
    if dss == "multitask":
        assert set(edited) == {"label", "rationale"}
        assert "why the app crashes" in edited["rationale"]["chosen"]["content"]
        assert teacher_2 in edited["rationale"]["rejected"]["content"]
    elif dss == "cot":
        assert set(edited) == {"cot"}
        assert "why the app crashes" in edited["cot"]["chosen"]["content"]
        assert edited["cot"]["rejected"]["content"] == f"<rationale>{teacher_2}</rationale><answer>general</answer>"
