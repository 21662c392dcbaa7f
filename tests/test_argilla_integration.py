"""Integration: the real argilla-server 2.8 (embedded SQLite engine) driven by the real SDK.

One server per test process (`stepwise.argilla_embedded.testing.shared_server`), on free loopback ports
in a temporary state dir; stopped at exit.
"""

from __future__ import annotations

import json
import random
import uuid

import pytest

pytestmark = pytest.mark.slow

DIM = 8
LABELS = ["billing", "technical", "general"]


@pytest.fixture(scope="session")
def argilla_srv():
    from stepwise.argilla_embedded.testing import shared_server

    return shared_server()


def _vec(i: int) -> list[float]:
    rnd = random.Random(i)
    v = [rnd.random() * 0.1 for _ in range(DIM)]
    v[i % 3] += 1.0
    return v


@pytest.fixture(scope="module")
def sdk_dataset(argilla_srv):
    import argilla as rg

    client = argilla_srv.client()
    settings = rg.Settings(
        fields=[rg.TextField(name="text"), rg.TextField(name="rationale", required=False)],
        questions=[
            rg.LabelQuestion(name="label", labels=LABELS),
            rg.RatingQuestion(name="quality", values=[1, 2, 3, 4, 5], required=False),
            rg.TextQuestion(name="note", required=False),
        ],
        metadata=[
            rg.TermsMetadataProperty(name="split"),
            rg.IntegerMetadataProperty(name="cluster_size"),
            rg.FloatMetadataProperty(name="agreement"),
        ],
        vectors=[rg.VectorField(name="emb", dimensions=DIM)],
        distribution=rg.TaskDistribution(min_submitted=1),
    )
    ds = rg.Dataset(name=f"integ-{uuid.uuid4().hex[:6]}", workspace=argilla_srv.creds.workspace, settings=settings,
                    client=client).create()
    records = [
        rg.Record(
            id=f"r{i}",
            fields={"text": f"ticket {i} " + ["refund my double charge", "app crashes at login", "office hours"][i % 3],
                    "rationale": "because"},
            metadata={"split": "val" if i % 4 == 0 else "train", "cluster_size": i % 5 + 1, "agreement": round(i / 120, 4)},
            vectors={"emb": _vec(i)},
            suggestions=[rg.Suggestion("label", LABELS[i % 3], score=round(0.3 + (i % 7) / 10, 2), agent="teacher")],
        )
        for i in range(120)
    ]
    ds.records.log(records)
    return client, ds


def _count(ds, **query) -> int:
    import argilla as rg

    # with_responses=False: the 2.8 SDK cannot parse a discarded response that has no values.
    return sum(1 for _ in ds.records(query=rg.Query(**query), batch_size=100, with_responses=False))


def test_second_serve_reuses_the_running_server(argilla_srv) -> None:
    info, started = argilla_srv.server.serve(port=argilla_srv.info.port)
    assert started is False and info.url == argilla_srv.url
    st = argilla_srv.server.status()
    assert st["running"] and st["search_engine"].startswith("embedded")
    assert all(p["alive"] for p in st["processes"].values())


def test_status_reports_the_plugin_and_binds_loopback(argilla_srv) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{argilla_srv.url}/api/v1/status", timeout=10) as resp:
        body = json.load(resp)
    assert body["search_engine"]["distribution"] == "stepwise-sqlite"
    assert argilla_srv.info.host == "127.0.0.1"


def test_cli_status_serve_reuse(argilla_srv) -> None:
    from typer.testing import CliRunner

    from stepwise.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["review", "status", "--state-dir", str(argilla_srv.server.state)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["running"] is True
    res = runner.invoke(app, ["review", "serve", "--state-dir", str(argilla_srv.server.state)])
    assert res.exit_code == 0 and "already running" in res.output and "password:" in res.output


def test_sdk_text_search_filters_and_sort(sdk_dataset) -> None:
    import argilla as rg

    _, ds = sdk_dataset
    assert _count(ds) == 120
    assert _count(ds, query="refund") == 40
    assert _count(ds, query="crashes login") == 40
    assert _count(ds, filter=rg.Filter(("metadata.split", "==", "val"))) == 30
    assert _count(ds, filter=rg.Filter([("metadata.cluster_size", ">=", 4), ("metadata.split", "==", "train")])) == \
        sum(1 for i in range(120) if i % 5 + 1 >= 4 and i % 4 != 0)
    assert _count(ds, filter=rg.Filter(("label.suggestion", "in", ["billing", "general"]))) == 80
    assert _count(ds, filter=rg.Filter(("label.score", ">=", 0.8))) == sum(1 for i in range(120) if 0.3 + (i % 7) / 10 >= 0.8 - 1e-9)
    assert _count(ds, query="refund", filter=rg.Filter(("metadata.split", "==", "val"))) == \
        sum(1 for i in range(120) if i % 3 == 0 and i % 4 == 0)


def test_ui_search_endpoint_sort_and_pagination(argilla_srv, sdk_dataset) -> None:
    client, ds = sdk_dataset
    http = client.api.http_client
    body = {"sort": [{"scope": {"entity": "metadata", "metadata_property": "agreement"}, "order": "desc"}]}
    page1 = http.post(f"/api/v1/me/datasets/{ds.id}/records/search", params={"limit": 10, "offset": 0}, json=body).json()
    page2 = http.post(f"/api/v1/me/datasets/{ds.id}/records/search", params={"limit": 10, "offset": 10}, json=body).json()
    assert page1["total"] == 120
    values = [it["record"]["metadata"]["agreement"] for it in page1["items"] + page2["items"]]
    assert values == sorted(values, reverse=True) and len(set(values)) == 20


def test_similarity_search(sdk_dataset) -> None:
    import argilla as rg

    _, ds = sdk_dataset
    scored = list(ds.records(query=rg.Query(similar=rg.Similar(name="emb", value=_vec(0))), limit=10))
    hits = [rec for rec, _ in scored]
    scores = [score for _, score in scored]
    assert len(hits) == 10 and scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert all(int(h.id[1:]) % 3 == 0 for h in hits)  # same cluster as record 0
    assert hits[0].id == "r0"
    far = list(ds.records(query=rg.Query(similar=rg.Similar(name="emb", value=_vec(0), most_similar=False)), limit=5))
    assert all(int(rec.id[1:]) % 3 != 0 for rec, _ in far)


def test_metadata_metrics_endpoint(sdk_dataset) -> None:
    client, ds = sdk_dataset
    http = client.api.http_client
    props = {p["name"]: p["id"] for p in http.get(f"/api/v1/me/datasets/{ds.id}/metadata-properties").json()["items"]}
    terms = http.get(f"/api/v1/metadata-properties/{props['split']}/metrics").json()
    assert terms["type"] == "terms" and {v["term"]: v["count"] for v in terms["values"]} == {"train": 90, "val": 30}
    ints = http.get(f"/api/v1/metadata-properties/{props['cluster_size']}/metrics").json()
    assert (ints["min"], ints["max"]) == (1, 5)
    floats = http.get(f"/api/v1/metadata-properties/{props['agreement']}/metrics").json()
    assert floats["min"] == 0 and floats["max"] == pytest.approx(119 / 120, abs=1e-4)


def test_responses_progress_and_status_filters(argilla_srv, sdk_dataset) -> None:
    import argilla as rg

    client, ds = sdk_dataset
    http = client.api.http_client
    models = {m.external_id: m for m in client.api.records.list(dataset_id=ds.id, limit=200, with_responses=False)}
    for i in range(10):
        status = "discarded" if i % 5 == 4 else "submitted"
        payload = {"status": status}
        if status == "submitted":
            payload["values"] = {"label": {"value": LABELS[(i + 1) % 3]}, "quality": {"value": 4}}
        r = http.post(f"/api/v1/records/{models[f'r{i}'].id}/responses", json=payload)
        assert r.status_code == 201, r.text
    progress = ds.progress(with_users_distribution=True)
    assert progress["total"] == 120 and progress["completed"] == 8 and progress["pending"] == 112
    me = progress["users"][argilla_srv.creds.username]
    assert me["completed"]["submitted"] == 8 and me["pending"]["discarded"] == 2  # discards leave records pending
    assert _count(ds, filter=rg.Filter(("response.status", "==", "submitted"))) == 8
    assert _count(ds, filter=rg.Filter(("status", "==", "completed"))) == 8
    assert _count(ds, filter=rg.Filter(("label.response", "==", "technical"))) == \
        sum(1 for i in range(10) if i % 5 != 4 and LABELS[(i + 1) % 3] == "technical")
    # The UI's queue: records with no response from me
    body = {"filters": {"and": [{"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]}]}}
    pending = http.post(f"/api/v1/me/datasets/{ds.id}/records/search", params={"limit": 5}, json=body).json()
    assert pending["total"] == 110
    metrics = http.get(f"/api/v1/me/datasets/{ds.id}/metrics").json()
    assert metrics["responses"]["submitted"] == 8 and metrics["responses"]["discarded"] == 2
    # SDK read-back of the responses
    got = next(iter(ds.records(query=rg.Query(filter=rg.Filter(("id", "==", "r1"))), with_responses=True)))
    assert got.id == "r1" and [resp.value for resp in got.responses["label"]] == [LABELS[2]]


def test_record_update_and_delete_reach_the_index(sdk_dataset) -> None:
    import argilla as rg

    client, ds = sdk_dataset
    rec = rg.Record(id="r119", fields={"text": "completely different words zebra", "rationale": "x"},
                    metadata={"split": "test"})
    ds.records.log([rec])
    assert _count(ds, query="zebra") == 1
    assert _count(ds, filter=rg.Filter(("metadata.split", "==", "test"))) == 1
    stored = next(iter(ds.records(query=rg.Query(filter=rg.Filter(("id", "==", "r119"))), with_responses=False)))
    ds.records.delete([stored])
    assert _count(ds, query="zebra") == 0 and _count(ds) == 119


def test_bulk_requests_end_their_connection_so_workers_share_the_load(argilla_srv, sdk_dataset) -> None:
    """A bulk records reply says `Connection: close` (the next bulk goes to whichever web worker is
    free); other replies keep the connection alive. The bulk itself is stored as usual."""
    import httpx

    _, ds = sdk_dataset
    with httpx.Client(base_url=argilla_srv.url, headers={"X-Argilla-Api-Key": argilla_srv.api_key}) as http:
        me = http.get("/api/v1/me")
        assert me.status_code == 200 and me.headers.get("connection", "").lower() != "close"
        item = {"external_id": "conn-1", "fields": {"text": "keep-alive probe"}, "metadata": {"split": "train"}}
        bulk = http.put(f"/api/v1/datasets/{ds.id}/records/bulk", json={"items": [item]})
        assert bulk.status_code == 200, bulk.text
        assert bulk.headers["connection"] == "close"
        assert [it["external_id"] for it in bulk.json()["items"]] == ["conn-1"]
        assert http.get("/api/v1/me").status_code == 200  # the client reconnects on its own
        # leave the module's dataset as the other tests expect it
        http.delete(f"/api/v1/datasets/{ds.id}/records", params={"ids": bulk.json()["items"][0]["id"]}).raise_for_status()
