"""Browser test: Debian's chromium, headless, driven by Playwright through the real Argilla UI.

An annotator logs in, opens the review dataset pushed from a curated run, corrects the teacher's
label on the first record, rates the rationale, writes a note and submits. The test reads the
response back through the SDK and through `pull`. Screenshots go to `test-artifacts/`.
"""

from __future__ import annotations

import re
import secrets
import shutil
import time
import uuid
from pathlib import Path

import pytest
from stepwise.argilla_embedded.testing import make_run

from stepwise.io import read_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
LABELS = ["billing", "technical", "general"]


@pytest.fixture(scope="session")
def argilla_srv():
    from stepwise.argilla_embedded.testing import shared_server

    return shared_server()


def _wait_for_responses(client, ds, n: int, timeout: float = 60.0) -> list:
    deadline = time.time() + timeout
    while True:
        models = client.api.records.list(dataset_id=ds.id, limit=100, with_responses=True)
        answered = [m for m in models if m.responses]
        if len(answered) >= n or time.time() > deadline:
            return answered
        time.sleep(0.5)


def test_annotator_corrects_a_label_in_the_real_ui(argilla_srv, tmp_path: Path, monkeypatch) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make setup installs it)")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: make setup (scripts/setup_argilla.sh) installs Debian's chromium")
    import argilla as rg
    from stepwise.review.stage import ReviewPending, pull, push

    monkeypatch.setenv("ARGILLA_API_URL", argilla_srv.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_srv.api_key)
    name = f"ui-{uuid.uuid4().hex[:6]}"
    recipe, run = make_run(tmp_path, n_train=6, n_val=0, dataset=name)
    assert push(recipe, run, log=lambda *_: None).sent == 6

    client = argilla_srv.client()
    ws = client.workspaces(recipe.review.workspace)
    username, password = f"annotator-{uuid.uuid4().hex[:6]}", secrets.token_urlsafe(12)
    user = rg.User(username=username, password=password, role="annotator", client=client).create()
    user.add_to_workspace(ws)
    ds = client.datasets(name, workspace=recipe.review.workspace)

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{argilla_srv.url}/sign-in")
            page.get_by_label("Username").fill(username)
            page.get_by_label("Password").fill(password)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(re.compile(r".*/(\?.*)?$"))
            page.get_by_text(name).first.click()  # the dataset card on the home page
            page.wait_for_url(re.compile(r".*/dataset/.*"))
            page.get_by_role("button", name="Submit").wait_for()
            text = page.get_by_text(re.compile(r"^Ticket \d+:")).first.inner_text()
            row_number = int(re.match(r"Ticket (\d+):", text).group(1))
            teacher = LABELS[row_number % 3]
            correction = LABELS[(row_number + 1) % 3]
            page.screenshot(path=str(ARTIFACTS / "argilla_review_before.png"))
            # the editable rationale question starts from the teacher's rationale (its suggestion)
            boxes = page.get_by_role("textbox")
            box_values = [boxes.nth(i).inner_text().strip() for i in range(boxes.count())]
            page.locator("label", has_text=re.compile(rf"^\s*\d?\s*{correction}\s*$")).first.click()
            page.get_by_role("button", name="4", exact=True).click()
            page.get_by_role("textbox").last.click()
            page.keyboard.type("corrected in the browser test")
            page.screenshot(path=str(ARTIFACTS / "argilla_review.png"))
            page.get_by_role("button", name="Submit").click()
            answered = _wait_for_responses(client, ds, 1)
            page.get_by_text(re.compile(r"^Ticket \d+:")).first.wait_for()  # the next record is shown
            page.screenshot(path=str(ARTIFACTS / "argilla_review_after.png"))
        finally:
            browser.close()

    # Read it back through the SDK's API layer: exactly one submitted response, by the annotator.
    assert len(answered) == 1
    model = answered[0]
    assert model.external_id == f"row-{row_number:04d}"
    [resp] = model.responses
    assert str(resp.user_id) == str(user.id) and resp.status.value == "submitted"
    assert resp.values["label"]["value"] == correction != teacher
    assert resp.values["rationale_quality"]["value"] == 4
    assert resp.values["note"]["value"] == "corrected in the browser test"

    kinds = ["a charge", "a crash", "a general question"]
    assert f"The ticket mentions {kinds[row_number % 3]}, so it is {teacher}." in box_values, box_values

    # 5 rows are still pending: a pull stops unless told to accept them
    with pytest.raises(ReviewPending, match="1 of 6 reviewed"):
        pull(recipe, run, log=lambda *_: None)
    summary = pull(recipe, run, accept_pending=True, log=lambda *_: None)
    reviewed = {r["id"]: r for r in read_jsonl(run.path / "review" / "reviewed.jsonl")}
    row = reviewed[f"row-{row_number:04d}"]
    assert row["label"] == correction and row["review"]["corrected"] and row["review"]["teacher_label"] == teacher
    assert row["review"]["responses"][0]["user"] == username
    assert summary["counts"]["submitted"] == 1 and summary["counts"]["pending"] == 5
    # the annotator changed the label but left the pre-filled teacher rationale as it was: the
    # teacher's reasoning (for the old label) must not train with the new label
    assert row["rationale"] is None and row["review"]["teacher_rationale"].endswith(f"so it is {teacher}.")
    assert summary["counts"]["rationale_dropped_after_correction"] == 1
