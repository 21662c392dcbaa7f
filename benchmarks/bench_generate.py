"""Generation throughput and loss under faults: plain distilabel pipeline vs `stepwise generate`.

Both sides send the same DSS chat messages to the same OpenAI-compatible stub (own process,
127.0.0.1, fixed latency, seeded fault injection) with the same concurrency, retries and timeout.
Printed side by side: throughput (rows/s) against the ideal concurrency/latency, requests sent,
rows lost or None, and, after a SIGKILL at 50% of completions and a restart, how many already
completed rows were requested (and paid) again.

    .venv/bin/python benchmarks/bench_generate.py --rows 2000 --concurrency 32 --latency 0.1 --fault-rate 0.05

`--malformed-rate R --runs N` measures re-asks instead: the stub answers a share R of requests
malformed (seeded by the request, so a re-ask with a fresh seed draws again), `stepwise generate`
runs N times, and the rows still unparsed after each run are printed. `--cap C --kill-after K`
measures the cost cap across resumes: the first run is SIGKILLed after K answers, then resumed
until it stops on the cap; the teacher's bill after each run is printed.

`--batch` runs the prompts through the stub's Batch API (Files + Batches endpoints, simulated
completion over `--batch-complete` seconds, `--fault-rate` of the requests failing with a 500):
`stepwise generate --batch` is SIGKILLed once every batch is submitted and polling, then re-run to
resume. Printed: requests submitted (each once; only the failed ones again, from the stub's log),
answers paid twice, the bill at the batch discount vs the same answers online, and wall time.

    .venv/bin/python benchmarks/bench_generate.py --batch --rows 20000 --fault-rate 0.02

`--local` compares the two local teachers instead (transformers + outlines vs llama.cpp, same model,
same prompts, same grammar strength): every argument after it goes to bench_local_teacher.py, e.g.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bench_generate.py --local --task banking77 --rows 10 --tf-rows 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

RECIPE = """\
name: bench
task:
  name: tickets
  classes: data/labels.json
  instructions: Classify the customer's message into one intent.
data:
  inputs: inputs.jsonl
  id_field: id
teacher:
  provider: openai
  model: stub-teacher
  base_url: {base_url}
  concurrency: {concurrency}
  max_retries: {retries}
  timeout_s: 10
  constrained_decoding: false
  max_new_tokens: 128
  price: {{input_per_1k: {price_in}, output_per_1k: {price_out}}}
runs_dir: runs
"""

DISTILABEL_SCRIPT = """
import json, sys
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from distilabel.steps.tasks import ChatGeneration
from distilabel.models.llms import OpenAILLM
rows = [json.loads(l) for l in open(sys.argv[1])]
base_url, conc, retries, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with Pipeline(name="bench-plain", cache_dir=sys.argv[6]) as p:
    load = LoadDataFromDicts(data=rows, batch_size=conc)
    gen = ChatGeneration(llm=OpenAILLM(model="stub-teacher", base_url=base_url, api_key="x", max_retries=retries,
                                       timeout=10, generation_kwargs={"max_new_tokens": 128}),
                         input_batch_size=conc)
    load >> gen
ds = p.run(use_cache=sys.argv[7] == "1")
data = ds["default"]["train"]
with open(out, "w") as fh:
    for r in data:
        fh.write(json.dumps({"id": r["id"], "generation": r["generation"]}) + "\\n")
"""


def start_stub(latency: float, fault_rate: float, log: Path, seed: int,
               malformed_rate: float = 0.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [PY, "-m", "stepwise.testing.openai_stub", "--latency", str(latency), "--fault-rate", str(fault_rate),
         "--seed", str(seed), "--log", str(log), "--malformed-rate", str(malformed_rate)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    line = proc.stdout.readline()
    return proc, line.strip().rsplit(" ", 1)[-1]


def completed_log(log: Path) -> list[dict]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e["outcome"] in ("ok", "garbage", "wrong_label", "length"):
            out.append(e)
    return out


def wait_for(log: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(completed_log(log)) >= n:
            return
        time.sleep(0.05)


def setup_workdir(work: Path, rows: int, base_url: str, concurrency: int, retries: int,
                  price: tuple[float, float] = (0.0, 0.0)) -> tuple[Path, list[dict]]:
    sys.path.insert(0, str(REPO))
    from stepwise.pipelines.prompts import build_messages

    from stepwise.recipe import load_recipe

    src = REPO.parent / "shared" / "data" / "banking77" / "train.jsonl"
    if not src.exists():
        src = REPO / "examples" / "support-tickets" / "data" / "tickets.jsonl"
    texts = [json.loads(x)["text"] for x in src.read_text().splitlines()]
    (work / "data").mkdir(parents=True, exist_ok=True)
    labels = json.loads((REPO / "examples/support-tickets/data/labels.json").read_text())
    (work / "data" / "labels.json").write_text(json.dumps(labels))
    inputs = [{"id": f"q{i:05d}", "text": f"[{i}] {texts[i % len(texts)]}"} for i in range(rows)]
    (work / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs))
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(RECIPE.format(base_url=base_url, concurrency=concurrency, retries=retries,
                                         price_in=price[0], price_out=price[1]))
    recipe = load_recipe(recipe_path)
    chat_rows = [{"id": r["id"], "messages": build_messages(recipe.task, {"text": r["text"]}, "dss")} for r in inputs]
    return recipe_path, chat_rows


def run_stepwise(recipe: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "stepwise", "generate", str(recipe), "--run-dir", str(run_dir), "--no-progress"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_distilabel(work: Path, rows_file: Path, base_url: str, conc: int, retries: int, out: Path,
                   use_cache: bool) -> subprocess.Popen:
    script = work / "plain_distilabel.py"
    script.write_text(DISTILABEL_SCRIPT)
    return subprocess.Popen([PY, str(script), str(rows_file), base_url, str(conc), str(retries), str(out),
                             str(work / "distilabel-cache"), "1" if use_cache else "0"],
                            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def scenario(name: str, args, kill: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-gen-{name}-"))
    log = work / "stub.log"
    stub, base_url = start_stub(args.latency, args.fault_rate, log, args.seed)
    try:
        recipe, chat_rows = setup_workdir(work, args.rows, base_url, args.concurrency, args.retries)
        rows_file = work / "chat_rows.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in chat_rows))
        out = work / "out.jsonl"

        def launch(use_cache: bool = False) -> subprocess.Popen:
            if name == "stepwise":
                return run_stepwise(recipe, work / "run")
            return run_distilabel(work, rows_file, base_url, args.concurrency, args.retries, out, use_cache)

        result: dict = {"side": name, "kill_at_50%": kill}
        t0 = time.time()
        proc = launch()
        if kill:
            wait_for(log, args.rows // 2, proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            first = Counter(e["input"] for e in completed_log(log))
            t1 = time.time()
            proc = launch(use_cache=True)
            try:
                proc.wait(timeout=args.resume_timeout)
                result["resume"] = f"finished in {time.time() - t1:.1f}s"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                result["resume"] = f"HUNG (killed after {args.resume_timeout}s)"
            after = Counter(e["input"] for e in completed_log(log))
            result["re-requested completed rows"] = sum(1 for k in first if after[k] > first[k])
        else:
            proc.wait()
            wall = time.time() - t0
            entries = [json.loads(x) for x in log.read_text().splitlines()]
            served = entries[-1]["t"] - entries[0]["t"]  # first request to last response: no start-up
            result["wall_s (incl. start-up)"] = round(wall, 2)
            result["rows/s"] = round(args.rows / served, 1)
        entries = [json.loads(x) for x in log.read_text().splitlines()]
        result["requests sent"] = len(entries)
        done = Counter(e["input"] for e in completed_log(log))
        result["completed rows"] = len(done)
        result["aborted in flight (client killed)"] = sum(1 for e in entries if e["outcome"] == "aborted")
        result["rows completed twice"] = sum(1 for v in done.values() if v > 1)
        if name == "stepwise":
            rows = [json.loads(x) for x in (work / "run" / "generate" / "responses.jsonl").read_text().splitlines()]
            result["rows lost or None"] = args.rows - sum(1 for r in rows if r["parse_status"] not in ("error", "not_run"))
        else:
            got = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
            result["rows lost or None"] = args.rows - sum(1 for r in got if r.get("generation"))
        return result
    finally:
        stub.send_signal(signal.SIGINT)
        stub.wait(timeout=10)


def billed(log: Path, price: tuple[float, float]) -> float:
    """The teacher's bill: usage of every answer it sent, at the recipe's prices."""
    total = 0.0
    for line in log.read_text().splitlines() if log.exists() else []:
        e = json.loads(line)
        if "usage" in e:
            total += (e["usage"]["prompt_tokens"] * price[0] + e["usage"]["completion_tokens"] * price[1]) / 1000
    return total


def malformed_scenario(args) -> None:
    """Rows still unparsed after each of `--runs` runs at `--malformed-rate`."""
    work = Path(tempfile.mkdtemp(prefix="bench-gen-malformed-"))
    log = work / "stub.log"
    stub, base_url = start_stub(args.latency, 0.0, log, args.seed, args.malformed_rate)
    try:
        recipe, _ = setup_workdir(work, args.rows, base_url, args.concurrency, args.retries)
        for i in range(1, args.runs + 1):
            t0 = time.time()
            subprocess.run([PY, "-m", "stepwise", "generate", str(recipe), "--run-dir", str(work / "run"),
                            "--no-progress", *(["--no-retry-unparsed"] if args.no_retry_unparsed else [])],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = [json.loads(x) for x in (work / "run" / "generate" / "responses.jsonl").read_text().splitlines()]
            unparsed = Counter(r["parse_status"] for r in rows if r["parse_status"] != "ok")
            answers = sum(1 for _ in completed_log(log))
            print(json.dumps({"run": i, "rows": len(rows), "unparsed": sum(unparsed.values()),
                              "unparsed %": round(100 * sum(unparsed.values()) / len(rows), 2),
                              "by status": dict(unparsed), "answers paid so far": answers,
                              "wall_s": round(time.time() - t0, 1)}), flush=True)
    finally:
        stub.send_signal(signal.SIGINT)
        stub.wait(timeout=10)


def cap_scenario(args) -> None:
    """Spend after a SIGKILL and each resume under one `--cap` (USD): it must never pass the cap."""
    price = (args.price_in, args.price_out)
    work = Path(tempfile.mkdtemp(prefix="bench-gen-cap-"))
    log = work / "stub.log"
    stub, base_url = start_stub(args.latency, 0.0, log, args.seed)
    try:
        recipe, _ = setup_workdir(work, args.rows, base_url, args.concurrency, args.retries, price)
        cmd = [PY, "-m", "stepwise", "generate", str(recipe), "--run-dir", str(work / "run"), "--no-progress",
               "--max-cost", str(args.cap)]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(log, args.kill_after, proc)
        first = "first (SIGKILL)" if proc.poll() is None else f"first (ended before the kill, exit {proc.poll()})"
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        print(json.dumps({"invocation": first, "answers": len(completed_log(log)),
                          "billed_usd": round(billed(log, price), 6), "cap_usd": args.cap}), flush=True)
        for i in range(1, args.runs + 1):
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            said = next((ln for ln in p.stderr.splitlines() if "spent $" in ln), "")
            print(json.dumps({"invocation": f"resume {i}", "exit": p.returncode, "answers": len(completed_log(log)),
                              "billed_usd": round(billed(log, price), 6), "cap_usd": args.cap,
                              "said": said.split("stopped: ")[-1].split(";")[0]}), flush=True)
    finally:
        stub.send_signal(signal.SIGINT)
        stub.wait(timeout=10)


def batch_scenario(args) -> None:
    sys.path.insert(0, str(REPO))
    from stepwise.rundir import RunDir
    from stepwise.testing.openai_stub import OpenAIStub, StubConfig

    price = (args.price_in, args.price_out)
    cfg = StubConfig(batch_complete_s=args.batch_complete, fault_rate=args.fault_rate, fault_kinds=("500",),
                     seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp, OpenAIStub(cfg) as stub:
        work = Path(tmp)
        recipe, _ = setup_workdir(work, args.rows, stub.base_url, 8, args.retries, price)
        text = recipe.read_text().replace("  max_retries:", f"  batch: true\n  batch_poll_s: 0.5\n"
                                          f"  batch_max_requests: {args.batch_per_file}\n  max_retries:")
        recipe.write_text(text)
        run_dir = work / "run"
        cmd = [PY, "-m", "stepwise", "generate", str(recipe), "--run-dir", str(run_dir), "--no-progress"]
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        expected = -(-args.rows // args.batch_per_file)
        while proc.poll() is None:  # SIGKILL once every batch is submitted and being polled
            entries = RunDir(run_dir).read_manifest().get("teacher_batches", []) if (run_dir / "manifest.json").exists() else []
            if len(entries) >= expected and all(e.get("batch_id") for e in entries):
                time.sleep(0.5)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.1)
        proc.wait()
        killed_at = round(time.time() - t0, 1)
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.time() - t0
        ids = stub.submitted_ids()
        per_id = Counter(ids)
        failed = Counter(e["key"] for e in stub.log if e["outcome"] == "500")
        answered = Counter(e["key"] for e in stub.completed())
        stage = RunDir(run_dir).read_manifest()["stages"]["generate"]
        b = stage.get("batch", {})
        online = billed_usage(stub.completed(), price)
        batch_cost = stage["cost"]["total_usd"]
        print(json.dumps({
            "rows": args.rows, "exit": done.returncode, "rows_ok": stage["counts"].get("status_ok"),
            "batches": len(stub.batches), "killed_after_s": killed_at,
            "submitted": len(ids), "distinct_requests": len(per_id),
            "submitted_again": sum(n - 1 for n in per_id.values()),
            "failed_by_server": sum(failed.values()),
            "resubmitted_without_failure": sum(1 for k, n in per_id.items() if n - 1 > failed.get(k, 0)),
            "answered_twice": sum(1 for n in answered.values() if n > 1),
            "cost_batch_usd": round(batch_cost, 4), "cost_online_same_answers_usd": round(online, 4),
            "batch/online": round(batch_cost / online, 3) if online else None,
            "manifest_saving_usd": b.get("batch_saving_usd"), "wall_s": round(wall, 1),
            "stub_completion_s": args.batch_complete}), flush=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:])


def billed_usage(entries: list[dict], price: tuple[float, float]) -> float:
    return sum(e["usage"]["prompt_tokens"] * price[0] + e["usage"]["completion_tokens"] * price[1]
               for e in entries) / 1000


def main() -> None:
    if "--local" in sys.argv[1:]:  # the local-teacher comparison has its own arguments (module docstring)
        import runpy

        sys.argv = [str(Path(__file__).with_name("bench_local_teacher.py"))] + [a for a in sys.argv[1:] if a != "--local"]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--local", action="store_true", help="local teachers: transformers vs llama.cpp (docstring)")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--fault-rate", type=float, default=0.05)
    ap.add_argument("--retries", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--resume-timeout", type=float, default=180)
    ap.add_argument("--malformed-rate", type=float, default=None, help="re-ask benchmark: share of malformed answers")
    ap.add_argument("--no-retry-unparsed", action="store_true", help="re-ask benchmark: the old behaviour")
    ap.add_argument("--runs", type=int, default=3, help="generate runs (re-ask) or resumes (cap)")
    ap.add_argument("--cap", type=float, default=None, help="cap benchmark: max_cost in USD")
    ap.add_argument("--kill-after", type=int, default=100, help="cap benchmark: SIGKILL after this many answers")
    ap.add_argument("--price-in", type=float, default=0.00015, help="cap benchmark: USD per 1K prompt tokens")
    ap.add_argument("--price-out", type=float, default=0.0006, help="cap benchmark: USD per 1K output tokens")
    ap.add_argument("--batch", action="store_true", help="Batch API benchmark (stub Files + Batches endpoints)")
    ap.add_argument("--batch-complete", type=float, default=20.0, help="batch benchmark: simulated completion (s)")
    ap.add_argument("--batch-per-file", type=int, default=5000, help="batch benchmark: teacher.batch_max_requests")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.batch:
        batch_scenario(args)
        return
    if args.malformed_rate is not None:
        malformed_scenario(args)
        return
    if args.cap is not None:
        cap_scenario(args)
        return
    ideal = args.concurrency / args.latency
    print(f"# {args.rows} prompts, concurrency {args.concurrency}, latency {args.latency}s, "
          f"{args.fault_rate:.0%} faults (429/500/503/drop); ideal = {ideal:.0f} rows/s; goal >= {0.9 * ideal:.0f}")
    results = []
    for name in ("distilabel", "stepwise"):
        for kill in (False, True):
            r = scenario(name, args, kill)
            results.append(r)
            print(json.dumps(r), flush=True)
    full = {r["side"]: r for r in results if not r["kill_at_50%"]}
    if "rows/s" in full.get("stepwise", {}) and "rows/s" in full.get("distilabel", {}):
        s, d = full["stepwise"]["rows/s"], full["distilabel"]["rows/s"]
        print(f"throughput: stepwise {s} rows/s = {s / ideal:.2f} x ideal; distilabel {d} rows/s = {d / ideal:.2f} x ideal; "
              f"stepwise/distilabel = {s / d:.2f}")


if __name__ == "__main__":
    main()
