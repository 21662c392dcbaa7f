"""Benchmark: the forgetting eval on SmolLM2-135M-Instruct, `stepwise eval` vs lm-eval's own CLI.

For each MMLU subset size (default 100 and 500 questions, the bundled deterministic subset), runs
  (a) `lm_eval --model hf --include_path <rendered tasks> --tasks stepwise_mmlu ...` (the harness CLI),
  (b) `stepwise eval <recipe> --run-dir <run> --model smollm2-135m-instruct --skip-task` (ours;
      the base model is both "before" and "after", so the second pass is served from the cache),
each in a fresh process with the same model, task YAML, batch size and device, alternating the
order across repeats (or, with `--concurrent`, both at the same time, so that on a shared machine
both see the same load); reports wall time, CPU time, load average and accuracy of both (they
must agree: same harness).
Extra `--accuracy-benchmarks` are run once through stepwise for SmolLM2-135M's measured scores.

Usage: .venv/bin/python benchmarks/bench_eval.py [--sizes 100 500] [--repeats 1] [--out bench_eval.json]
Not a test: it takes minutes on CPU. Results go into BENCHMARKS.md (## Evaluation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
PY = sys.executable


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_pair(cmds: dict[str, list[str]]) -> dict[str, tuple[int, str, float, float]]:
    """Start the commands at the same moment and wait for all: {name: (returncode, stderr tail,
    wall s, CPU s)}. Run side by side, both see the same machine load for the same minutes."""
    with contextlib.ExitStack() as stack:  # log files: a pipe left unread would block the child
        logs = {name: stack.enter_context(tempfile.TemporaryFile("w+")) for name in cmds}
        return _wait_pair(cmds, logs)


def _wait_pair(cmds: dict[str, list[str]], logs: dict) -> dict[str, tuple[int, str, float, float]]:
    started = time.time()
    procs = {name: subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=logs[name])
             for name, cmd in cmds.items()}
    by_pid = {p.pid: name for name, p in procs.items()}
    out: dict[str, tuple[int, str, float, float]] = {}
    while len(out) < len(procs):
        pid, status, usage = os.wait4(-1, 0)
        if pid not in by_pid:
            continue
        name = by_pid[pid]
        procs[name].returncode = os.waitstatus_to_exitcode(status)
        logs[name].seek(0)
        err = logs[name].read()[-3000:]
        out[name] = (procs[name].returncode, err, time.time() - started, usage.ru_utime + usage.ru_stime)
    return out


def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; (result, wall seconds, CPU seconds of the child). CPU time is the fairer
    measure on a machine shared with other jobs."""
    cpu0, started = _children_cpu(), time.time()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    return proc, time.time() - started, _children_cpu() - cpu0


def _load() -> float:
    return round(os.getloadavg()[0], 2)
BIN = Path(PY).parent


def _recipe(root: Path, benchmarks: list[str], n: int, batch_size: int, device: str) -> Path:
    raw = yaml.safe_load((REPO / "examples" / "support-tickets" / "recipe.yaml").read_text())
    raw["data"]["inputs"] = str(REPO / "examples" / "support-tickets" / "data" / "tickets.jsonl")
    raw["data"]["test_file"] = str(REPO / "examples" / "support-tickets" / "data" / "test.jsonl")
    raw["task"]["classes"] = str(REPO / "examples" / "support-tickets" / "data" / "labels.json")
    raw["eval"] = {"forgetting": {"benchmarks": benchmarks, "subset_size": n, "batch_size": batch_size,
                                  "device": device}}
    path = root / f"recipe-{'-'.join(benchmarks)}-{n}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_stepwise(root: Path, benchmarks: list[str], n: int, batch_size: int, device: str, tag: str) -> dict:
    recipe = _recipe(root, benchmarks, n, batch_size, device)
    run_dir = root / "runs" / f"{tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    load0 = _load()
    proc, wall, cpu = timed([str(BIN / "stepwise"), "eval", str(recipe), "--run-dir", str(run_dir), "--model",
                             "smollm2-135m-instruct", "--skip-task"])
    if proc.returncode != 0:
        raise RuntimeError(f"stepwise eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rep = json.loads((run_dir / "eval" / "forgetting.json").read_text())
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load": [load0, _load()],
            "accuracy": {b: r["before"]["value"] for b, r in rep["benchmarks"].items()},
            "ci": {b: [r["before"]["ci_low"], r["before"]["ci_high"]] for b, r in rep["benchmarks"].items()},
            "lm_eval_wall_s": {b: r["before_wall_s"] for b, r in rep["lm_eval"]["runs"].items()},
            "task_dir": rep["lm_eval"]["task_dir"]}


def run_cli(task_dir: str, n: int, batch_size: int, device: str, out: Path) -> dict:
    from stepwise.models import resolve_model_dir

    model = resolve_model_dir("smollm2-135m-instruct")
    cmd = [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model},dtype=auto",
           "--tasks", "stepwise_mmlu", "--include_path", task_dir, "--batch_size", str(batch_size),
           "--device", device, "--output_path", str(out)]
    load0 = _load()
    proc, wall, cpu = timed(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = sorted(out.rglob("results_*.json"))[-1]
    acc = json.loads(results.read_text())["results"]["stepwise_mmlu"]["acc,none"]
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load": [load0, _load()], "accuracy": {"mmlu": acc},
            "cmd": " ".join(cmd)}


def stepwise_cmd(root: Path, n: int, batch_size: int, device: str, tag: str) -> tuple[list[str], Path]:
    recipe = _recipe(root, ["mmlu"], n, batch_size, device)
    run_dir = root / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    return [str(BIN / "stepwise"), "eval", str(recipe), "--run-dir", str(run_dir), "--model",
            "smollm2-135m-instruct", "--skip-task"], run_dir


def cli_cmd(task_dir: str, batch_size: int, device: str, out: Path) -> list[str]:
    from stepwise.models import resolve_model_dir

    model = resolve_model_dir("smollm2-135m-instruct")
    return [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model},dtype=auto",
            "--tasks", "stepwise_mmlu", "--include_path", task_dir, "--batch_size", str(batch_size),
            "--device", device, "--output_path", str(out)]


def run_concurrent(root: Path, n: int, rep: int, batch_size: int, device: str) -> dict:
    """Both tools at the same time on the same task (the stepwise stderr is kept for errors)."""
    from stepwise.evals.benchmarks import prepare_tasks

    prep = root / f"prep-{n}-{rep}"
    prepare_tasks(["mmlu"], n, 0, prep)
    scmd, run_dir = stepwise_cmd(root, n, batch_size, device, f"conc-{n}-{rep}")
    ccmd = cli_cmd(str(prep / "tasks"), batch_size, device, root / f"conc-cli-{n}-{rep}")
    load0 = _load()
    res = timed_pair({"stepwise": scmd, "cli": ccmd})
    for name, (rc, err, _, _) in res.items():
        if rc != 0:
            raise RuntimeError(f"{name} failed ({rc}):\n{err}")
    rep_json = json.loads((run_dir / "eval" / "forgetting.json").read_text())
    cli_json = json.loads(sorted((root / f"conc-cli-{n}-{rep}").rglob("results_*.json"))[-1].read_text())
    row = {"n": n, "repeat": rep, "order": "concurrent", "load": [load0, _load()],
           "stepwise": {"wall_s": round(res["stepwise"][2], 2), "cpu_s": round(res["stepwise"][3], 2),
                        "accuracy": {"mmlu": rep_json["benchmarks"]["mmlu"]["before"]["value"]},
                        "lm_eval_wall_s": rep_json["lm_eval"]["runs"]["mmlu"]["before_wall_s"]},
           "cli": {"wall_s": round(res["cli"][2], 2), "cpu_s": round(res["cli"][3], 2),
                   "accuracy": {"mmlu": cli_json["results"]["stepwise_mmlu"]["acc,none"]}, "cmd": " ".join(ccmd)}}
    row["ratio_stepwise_over_cli"] = {k: round(row["stepwise"][k] / row["cli"][k], 3) for k in ("wall_s", "cpu_s")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--accuracy-benchmarks", nargs="*", default=["arc_easy", "arc_challenge", "hellaswag",
                                                                  "truthfulqa_mc1"])
    ap.add_argument("--accuracy-size", type=int, default=100)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "bench_eval.json")
    ap.add_argument("--concurrent", action="store_true",
                    help="run the two tools at the same time (same load on a shared machine) instead of in turn")
    args = ap.parse_args()
    import torch

    meta = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": os.getloadavg(), "device": args.device, "batch_size": args.batch_size}
    results: dict = {"meta": meta, "mmlu": [], "accuracy": {}}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = Path(tmp)
        pair = 0  # the order alternates from one pair of runs to the next, across sizes too
        for n in args.sizes:
            for rep in range(args.repeats):
                if args.concurrent:
                    row = run_concurrent(root, n, rep, args.batch_size, args.device)
                    print(json.dumps(row), flush=True)
                    print(f"n={n} repeat {rep} (concurrent): stepwise/cli wall {row['ratio_stepwise_over_cli']['wall_s']}, "
                          f"CPU {row['ratio_stepwise_over_cli']['cpu_s']}", flush=True)
                    results["mmlu"].append(row)
                    args.out.write_text(json.dumps(results, indent=2))
                    continue
                order = ["stepwise", "cli"] if pair % 2 == 0 else ["cli", "stepwise"]
                pair += 1
                row: dict = {"n": n, "repeat": rep, "order": order}
                task_dir = None
                for who in order:
                    if who == "stepwise":
                        row["stepwise"] = run_stepwise(root, ["mmlu"], n, args.batch_size, args.device, f"mmlu-{n}-{rep}")
                        task_dir = row["stepwise"]["task_dir"]
                    else:
                        if task_dir is None:  # render the same task YAML + subset without running a model
                            from stepwise.evals.benchmarks import prepare_tasks

                            prep_dir = root / f"prep-{n}-{rep}"
                            prepare_tasks(["mmlu"], n, 0, prep_dir)
                            task_dir = str(prep_dir / "tasks")
                        row["cli"] = run_cli(task_dir, n, args.batch_size, args.device, root / f"cli-{n}-{rep}")
                    print(json.dumps({who: row[who]}), flush=True)
                row["loadavg"] = os.getloadavg()
                row["ratio_stepwise_over_cli"] = {k: round(row["stepwise"][k] / row["cli"][k], 3)
                                                  for k in ("wall_s", "cpu_s")}
                print(json.dumps(row), flush=True)
                print(f"n={n} repeat {rep} ({' then '.join(order)}): stepwise/cli wall "
                      f"{row['ratio_stepwise_over_cli']['wall_s']}, CPU {row['ratio_stepwise_over_cli']['cpu_s']}",
                      flush=True)
                results["mmlu"].append(row)
                args.out.write_text(json.dumps(results, indent=2))
        if args.accuracy_benchmarks:
            acc = run_stepwise(root, args.accuracy_benchmarks, args.accuracy_size, args.batch_size, args.device, "acc")
            results["accuracy"] = {"n": args.accuracy_size, **acc}
            print(json.dumps(results["accuracy"]), flush=True)
    meta["loadavg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
