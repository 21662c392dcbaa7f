"""Benchmark the embedded Argilla server (SQLite search engine) at review scale.

    .venv/bin/python benchmarks/bench_review.py [--records 100000] [--dim 384] [--queries 40]

Starts its own embedded server in a temporary state dir (free loopback ports), logs N records
with metadata, a suggestion and a `dim`-d vector through the bulk API the way `stepwise review push`
sends them (SDK record models, `stepwise.review.argilla.bulk_upsert`), then times the calls
the web UI makes, through the server:
- list:        the annotator's queue (POST /me/datasets/{id}/records/search, pending for me)
- filter:      metadata terms + range filters and a suggestion-score filter
- text-search: a full-text query
- similarity:  nearest records to a vector
and prints p50/p95 per call and records/s for logging, as JSON and as a Markdown table. Logging
also reports the CPU seconds each side used per 1,000 records (server = uvicorn and its web
workers, worker = rq worker + Redis, client = this process), which, unlike records/s, does not move
with other jobs' load on a shared machine.
Not a test: the goal is p95 < 200 ms for list and filter at 100k records, logging >= 1,000/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepwise.argilla_embedded.server import EmbeddedServer, free_port  # noqa: E402
from stepwise.review.argilla import Connection, bulk_upsert, client_for  # noqa: E402

WORDS = ["refund", "charge", "card", "invoice", "crash", "login", "password", "error", "shipping", "delay", "parcel", "office", "hours", "account", "upgrade", "plan", "cancel", "subscription", "screen", "mobile", "browser", "payment", "bank", "transfer"]
LABELS = ["billing", "technical", "shipping", "account", "general"]


def _record(i: int, dim: int, rnd: random.Random):
    import argilla as rg

    words = rnd.choices(WORDS, k=12)
    center = i % 16
    vec = [rnd.gauss(0, 0.1) for _ in range(dim)]
    if dim:
        vec[center % dim] += 1.0
    return rg.Record(
        id=f"b{i}",
        fields={"text": f"ticket {i}: " + " ".join(words), "rationale": "The customer mentions " + words[0] + "."},
        metadata={"split": "val" if i % 10 == 0 else "train", "cluster_size": 1 + i % 7,
                  "agreement": round(rnd.random(), 3)},
        suggestions=[rg.Suggestion("label", LABELS[i % 5], score=round(rnd.random(), 3), agent="teacher")],
        vectors={"emb": vec} if dim else {},
    )


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(q * (len(values) - 1)))))
    return values[k]


def _cpu_seconds(pids: list[int], children: bool = True) -> float:
    """user+sys CPU seconds of these processes and (unless told not to) their live children."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *(proc.children(recursive=True) if children else [])]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384, help="vector size (0: no vectors)")
    ap.add_argument("--queries", type=int, default=40, help="timed calls per kind")
    ap.add_argument("--batch", type=int, default=500, help="records per bulk request (server max 500)")
    ap.add_argument("--senders", type=int, default=2, help="concurrent bulk senders")
    ap.add_argument("--state-dir", type=Path, default=None, help="keep the server state here (default: temp)")
    ap.add_argument("--keep", action="store_true", help="leave the server running")
    ap.add_argument("--sdk-upsert", action="store_true",
                    help="send with the SDK's own RecordsAPI.bulk_upsert (stdlib json, re-parses the echo) for A/B")
    ap.add_argument("--log-only", action="store_true", help="time logging only (no query timings)")
    args = ap.parse_args()

    import argilla as rg
    import httpx

    state = args.state_dir or Path(tempfile.mkdtemp(prefix="bench-review-"))
    srv = EmbeddedServer(state)
    t0 = time.time()
    info, _ = srv.serve(port=free_port())
    startup_s = time.time() - t0
    creds = srv.credentials()
    assert creds is not None
    client = rg.Argilla(api_url=info.url, api_key=creds.api_key, timeout=600)
    try:
        settings = rg.Settings(
            fields=[rg.TextField(name="text"), rg.TextField(name="rationale")],
            questions=[rg.LabelQuestion(name="label", labels=LABELS)],
            metadata=[rg.TermsMetadataProperty(name="split"), rg.IntegerMetadataProperty(name="cluster_size"),
                      rg.FloatMetadataProperty(name="agreement")],
            vectors=[rg.VectorField(name="emb", dimensions=args.dim)] if args.dim else [],
        )
        ds = rg.Dataset(name=f"bench-{uuid.uuid4().hex[:6]}", workspace=creds.workspace, settings=settings,
                        client=client).create()

        # -- logging ------------------------------------------------------------------------------
        local = threading.local()

        def _client():
            if not hasattr(local, "client"):  # the client `stepwise review push` uses (no gzip on loopback)
                local.client = client_for(Connection(info.url, creds.api_key, "bench"))
            return local.client

        batches = [range(s, min(s + args.batch, args.records)) for s in range(0, args.records, args.batch)]

        def send(batch: range) -> int:
            rnd = random.Random(batch.start)
            models = []
            for i in batch:
                rec = _record(i, args.dim, rnd)
                rec.dataset = ds
                models.append(rec.api_model())
            c = _client()
            if args.sdk_upsert:
                c.api.records.bulk_upsert(dataset_id=ds.id, records=models)
            else:
                bulk_upsert(c, ds.id, models)  # what `stepwise review push` sends with
            return len(models)

        pids = srv.read_info().pids  # type: ignore[union-attr]
        cpu0 = {"server": _cpu_seconds([pids["server"]]), "worker": _cpu_seconds([pids["worker"], pids["redis"]]),
                "client": _cpu_seconds([os.getpid()], children=False)}
        load0 = os.getloadavg()[0]
        t0 = time.time()
        done = 0
        with ThreadPoolExecutor(args.senders) as pool:
            for n in pool.map(send, batches):
                done += n
                if done % 10_000 < args.batch:
                    print(f"  logged {done}/{args.records} ({done / (time.time() - t0):.0f}/s)", file=sys.stderr)
        log_s = time.time() - t0
        rate = args.records / log_s
        cpu1 = {"server": _cpu_seconds([pids["server"]]), "worker": _cpu_seconds([pids["worker"], pids["redis"]]),
                "client": _cpu_seconds([os.getpid()], children=False)}
        cpu_per_1k = {k: round((cpu1[k] - cpu0[k]) * 1000 / args.records, 2) for k in cpu0}
        load = f"{load0:.1f} -> {os.getloadavg()[0]:.1f}"
        print(f"logging: {args.records} records in {log_s:.1f}s = {rate:.0f} records/s; CPU s per 1k records "
              f"{cpu_per_1k}; load {load}", file=sys.stderr)
        if args.log_only:
            print(json.dumps({"records": args.records, "dim": args.dim, "logging_s": round(log_s, 1),
                              "logging_records_per_s": round(rate), "cpu_s_per_1k_records": cpu_per_1k,
                              "load_average": load, "senders": args.senders, "batch": args.batch,
                              "upsert": "sdk" if args.sdk_upsert else "stepwise"}, indent=2))
            return

        # -- the UI's calls -----------------------------------------------------------------------
        http = httpx.Client(base_url=info.url, headers={"X-Argilla-Api-Key": creds.api_key}, timeout=120)
        search = f"/api/v1/me/datasets/{ds.id}/records/search"
        include = {"include": ["responses", "suggestions"]}  # what the annotation page asks for
        rnd = random.Random(7)

        def pending(extra=None):  # the annotation page's default query (captured from the UI)
            flt = [{"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
                   {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]}]
            return {"filters": {"and": flt + (extra or [])}}

        kinds = {
            "list": lambda: (pending(), {"limit": 10, "offset": rnd.randrange(0, 500)}),
            "filter": lambda: (pending([
                {"type": "terms", "scope": {"entity": "metadata", "metadata_property": "split"}, "values": ["val"]},
                {"type": "range", "scope": {"entity": "metadata", "metadata_property": "agreement"},
                 "ge": round(rnd.random() * 0.5, 2), "le": 0.9},
                {"type": "range", "scope": {"entity": "suggestion", "question": "label", "property": "score"}, "ge": 0.3},
            ]), {"limit": 10}),
            "text-search": lambda: ({**pending(), "query": {"text": {"q": rnd.choice(WORDS) + " " + rnd.choice(WORDS)}}},
                                    {"limit": 10}),
            "similarity": lambda: ({"query": {"vector": {"name": "emb", "value": _record(rnd.randrange(args.records), args.dim,
                                                                                      rnd).vectors["emb"]}}},
                                   {"limit": 10}),
        }
        if not args.dim:
            kinds.pop("similarity")
        results = {}
        for kind, make in kinds.items():
            body, params = make()
            http.post(search, json=body, params={**params, **include}).raise_for_status()  # warm-up (caches)
            times, totals = [], []
            for _ in range(args.queries):
                body, params = make()
                t = time.perf_counter()
                r = http.post(search, json=body, params={**params, **include})
                times.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
                totals.append(r.json()["total"])
            results[kind] = {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(_pct(times, 0.95), 1),
                             "mean_total_hits": round(statistics.mean(totals))}
        out = {
            "records": args.records, "dim": args.dim, "queries_per_kind": args.queries,
            "server_startup_s": round(startup_s, 1), "logging_s": round(log_s, 1),
            "logging_records_per_s": round(rate), "cpu_s_per_1k_records": cpu_per_1k, "load_average_logging": load,
            "senders": args.senders, "batch": args.batch, "calls": results,
            "index_bytes": (state / "home" / "search-index.sqlite").stat().st_size,
            "db_bytes": (state / "home" / "argilla.db").stat().st_size,
            "machine": f"{platform.machine()} {os.cpu_count()} cpu, load {os.getloadavg()[0]:.1f}",
        }
        print(json.dumps(out, indent=2))
        print("\n| call | p50 ms | p95 ms | hits |\n|---|---|---|---|")
        for kind, r in results.items():
            print(f"| {kind} | {r['p50_ms']} | {r['p95_ms']} | {r['mean_total_hits']} |")
        print(f"\nlogging: {args.records} records in {log_s:.1f}s = {rate:.0f} records/s")
    finally:
        if not args.keep:
            srv.stop()
            if args.state_dir is None:
                shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
