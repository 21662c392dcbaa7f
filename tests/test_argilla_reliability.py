"""Reliability of the embedded server under concurrent annotators and crashes.

- 20 simulated annotators submit 2,000 responses concurrently through the HTTP API (the UI's
  endpoint); every one is stored exactly once, in the database and in the search index.
- Annotators keep submitting while the server and Redis are killed (SIGKILL) and restarted: no
  acknowledged response is lost, and the index agrees with the database after the restart.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow

LABELS = ["billing", "technical", "general"]


@pytest.fixture(scope="session")
def argilla_srv():
    from stepwise.argilla_embedded.testing import shared_server

    return shared_server()


def _dataset(srv, n_records: int):
    import argilla as rg

    client = srv.client()
    settings = rg.Settings(
        fields=[rg.TextField(name="text")],
        questions=[rg.LabelQuestion(name="label", labels=LABELS)],
        distribution=rg.TaskDistribution(min_submitted=1),
    )
    ds = rg.Dataset(name=f"rel-{uuid.uuid4().hex[:6]}", workspace=srv.creds.workspace, settings=settings,
                    client=client).create()
    models = []
    for i in range(n_records):
        rec = rg.Record(id=f"r{i}", fields={"text": f"ticket {i}"})
        rec.dataset = ds
        models.append(rec.api_model())
    for i in range(0, len(models), 500):
        client.api.records.bulk_upsert(dataset_id=ds.id, records=models[i : i + 500])
    ids = [str(m.id) for m in client.api.records.list(dataset_id=ds.id, limit=1000, with_responses=False)]
    assert len(ids) == n_records
    return client, ds, sorted(ids)


def _annotators(srv, client, n: int) -> list[dict]:
    import argilla as rg

    ws = client.workspaces(srv.creds.workspace)
    http = client.api.http_client
    out = []
    for _ in range(n):
        user = rg.User(username=f"sim-{uuid.uuid4().hex[:8]}", password=secrets.token_urlsafe(12), role="annotator",
                       client=client).create()
        user.add_to_workspace(ws)
        out.append({"id": str(user.id), "api_key": http.get(f"/api/v1/users/{user.id}").json()["api_key"]})
    return out


def _session(url: str, api_key: str) -> httpx.Client:
    """One keep-alive connection per annotator, like a browser tab (a new client costs ~0.1 s here)."""
    return httpx.Client(base_url=url, headers={"X-Argilla-Api-Key": api_key}, timeout=30)


def _submit(http: httpx.Client, record_id: str, label: str, deadline: float) -> str:
    """POST one response, retrying through outages; 201 or 409 (already stored by an earlier try)."""
    while True:
        try:
            r = http.post(f"/api/v1/records/{record_id}/responses",
                          json={"status": "submitted", "values": {"label": {"value": label}}})
            if r.status_code in (201, 409):
                return "created" if r.status_code == 201 else "already"
            if r.status_code < 500:
                raise AssertionError(f"{r.status_code}: {r.text}")
        except (httpx.TransportError, httpx.TimeoutException):
            pass
        if time.time() > deadline:
            raise TimeoutError(f"response for {record_id} not stored before the deadline")
        time.sleep(0.2)


def _stored(client, ds) -> Counter:
    pairs: Counter = Counter()
    offset = 0
    while True:
        page = client.api.records.list(dataset_id=ds.id, offset=offset, limit=1000, with_responses=True,
                                       with_suggestions=False)
        for m in page:
            for resp in m.responses or []:
                pairs[(str(m.id), str(resp.user_id), resp.values["label"]["value"])] += 1
        if len(page) < 1000:
            return pairs
        offset += 1000


def _user_metrics(url: str, api_key: str, dataset_id) -> dict:
    r = httpx.get(f"{url}/api/v1/me/datasets/{dataset_id}/metrics", headers={"X-Argilla-Api-Key": api_key}, timeout=30)
    r.raise_for_status()
    return r.json()


def test_20_annotators_2000_responses_stored_exactly_once(argilla_srv) -> None:
    client, ds, ids = _dataset(argilla_srv, 500)
    annotators = _annotators(argilla_srv, client, 20)
    jobs = []
    for k, ann in enumerate(annotators):
        for j in range(100):
            rid = ids[(k * 25 + j) % len(ids)]
            jobs.append((ann, rid, LABELS[(k + j) % 3]))
    assert len(jobs) == 2000
    deadline = time.time() + 300
    started = time.time()

    def worker(ann_jobs):
        with _session(argilla_srv.url, ann_jobs[0][0]["api_key"]) as http:
            return [(a["id"], rid, label, _submit(http, rid, label, deadline)) for a, rid, label in ann_jobs]

    per_annotator = [[j for j in jobs if j[0] is ann] for ann in annotators]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = [r for chunk in pool.map(worker, per_annotator) for r in chunk]
    elapsed = time.time() - started
    print(f"2000 responses from 20 annotators in {elapsed:.1f}s ({2000 / elapsed:.0f}/s)")

    assert len(results) == 2000
    stored = _stored(client, ds)
    expected = Counter((rid, uid, label) for uid, rid, label, _ in results)
    assert stored == expected  # every response stored exactly once, with its value
    assert sum(stored.values()) == 2000 and max(stored.values()) == 1
    # The search index agrees: per-user progress, record status and the UI's response filters.
    for ann in annotators[:5]:
        assert _user_metrics(argilla_srv.url, ann["api_key"], ds.id)["responses"]["submitted"] == 100
    answered = {rid for _, rid, _, _ in results}
    progress = ds.progress()
    assert progress["completed"] == len(answered) and progress["total"] == 500
    body = {"filters": {"and": [{"type": "terms", "scope": {"entity": "response", "property": "status"},
                                 "values": ["submitted"]}]}}
    found = client.api.http_client.post(f"/api/v1/datasets/{ds.id}/records/search", params={"limit": 1}, json=body).json()
    assert found["total"] == len(answered)


def test_kill_and_restart_server_and_redis_mid_session(argilla_srv) -> None:
    client, ds, ids = _dataset(argilla_srv, 150)
    annotators = _annotators(argilla_srv, client, 4)
    acked: list[tuple[str, str, str]] = []
    lock = threading.Lock()
    deadline = time.time() + 240
    stop_at = {"n": None}

    def annotate(k: int, ann: dict) -> None:
        with _session(argilla_srv.url, ann["api_key"]) as http:
            for j in range(35):
                rid = ids[(k * 30 + j) % len(ids)]
                label = LABELS[(k + j) % 3]
                _submit(http, rid, label, deadline)
                with lock:
                    acked.append((rid, ann["id"], label))
                time.sleep(0.02)

    threads = [threading.Thread(target=annotate, args=(k, a)) for k, a in enumerate(annotators)]
    for t in threads:
        t.start()
    while len(acked) < 25:
        time.sleep(0.05)
    before = len(acked)
    argilla_srv.server.kill("server")
    argilla_srv.server.kill("redis")
    assert not argilla_srv.server.alive()["server"]
    time.sleep(1.0)  # annotators hit a dead server and retry
    argilla_srv.restart()
    for t in threads:
        t.join(timeout=300)
    stop_at["n"] = len(acked)
    assert before < len(acked) == 4 * 35, "annotators did not resume after the restart"

    stored = _stored(client, ds)
    assert stored == Counter(acked)  # nothing acknowledged was lost, nothing duplicated
    for ann in annotators:
        assert _user_metrics(argilla_srv.url, ann["api_key"], ds.id)["responses"]["submitted"] == 35
    assert all(argilla_srv.server.alive().values())
