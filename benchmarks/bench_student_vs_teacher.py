"""Student vs teacher on this machine: per-request latency (p50/p95) and output tokens/s, side by side.

The teacher is the recipe's local transformers teacher, prompted as in generation (the DSS prompt
from `plan_requests`, its sampling settings and `max_new_tokens`, `teacher.batch_size` per call),
asked directly (no response cache, so every request really runs). The student is a trained model
of a run (newest under `<run>/train/`, or `--model`), prompted as in eval (`inference_messages`,
greedy, `eval.task.max_new_tokens`), at batch 1 and at `eval.task.batch_size`. Same test prompts
for both. Printed: p50/p95 seconds per request, output tokens/s, and teacher/student ratios.

    .venv/bin/python benchmarks/bench_student_vs_teacher.py examples/support-tickets/recipe.yaml \
        --run-dir <a demo run> --rows 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stepwise.evals.generate import generate_local  # noqa: E402
from stepwise.evals.modelref import newest_trained_model, resolve_model  # noqa: E402
from stepwise.evals.task_eval import load_test_rows  # noqa: E402
from stepwise.evals.teacher_compare import batch_latencies, latency_stats  # noqa: E402
from stepwise.pipelines.constraints import generation_kwargs  # noqa: E402
from stepwise.pipelines.generate import InputRow, build_local_llm, plan_requests  # noqa: E402
from stepwise.pipelines.student import inference_messages  # noqa: E402

from stepwise.recipe import load_recipe  # noqa: E402


def teacher_latency(recipe, rows) -> dict:
    t = recipe.teacher
    if t.provider != "transformers":
        raise SystemExit(f"teacher.provider {t.provider}: this benchmark runs a local transformers teacher")
    plan = plan_requests(recipe, [InputRow(str(r["id"]), r["input"], r.get("gold"), {}) for r in rows])
    llm = build_local_llm(recipe)
    kwargs = generation_kwargs(recipe.task, t)
    per_request, out_tokens = [], 0
    started = time.perf_counter()
    for i in range(0, len(plan.messages), t.batch_size):
        batch = plan.messages[i:i + t.batch_size]
        sent = time.perf_counter()
        outs = llm.generate(inputs=batch, seed=t.seed, **kwargs)
        per_request += [time.perf_counter() - sent] * len(batch)
        out_tokens += sum(int(o["statistics"]["output_tokens"][0]) for o in outs)
    return latency_stats(per_request, batch_size=t.batch_size, output_tokens=out_tokens,
                         wall_s=time.perf_counter() - started)


def student_latency(recipe, model, rows, batch_size: int, device: str) -> dict:
    prompts = [inference_messages(recipe.task, r["input"], recipe.training.dss_output) for r in rows]
    gen = generate_local(model, prompts, max_new_tokens=recipe.eval.task.max_new_tokens, batch_size=batch_size,
                         device=device)
    return latency_stats(batch_latencies(gen.info), batch_size=batch_size, output_tokens=gen.output_tokens,
                         wall_s=gen.wall_s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--run-dir", required=True, help="a run with curate/test.jsonl and a trained student")
    ap.add_argument("--model", help="student (default: newest under <run>/train/)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    run = Path(args.run_dir)
    rows = load_test_rows(run)[: args.rows]
    student = resolve_model(args.model or str(newest_trained_model(run)))
    results = {
        "teacher": teacher_latency(recipe, rows),
        "student batch 1": student_latency(recipe, student, rows, 1, args.device),
        f"student batch {recipe.eval.task.batch_size}": student_latency(recipe, student, rows,
                                                                        recipe.eval.task.batch_size, args.device),
    }
    t = results["teacher"]
    print(f"{len(rows)} test prompts; teacher {recipe.teacher.model} (max_new_tokens {recipe.teacher.max_new_tokens}, "
          f"batch {recipe.teacher.batch_size}), student {student.label} (max_new_tokens "
          f"{recipe.eval.task.max_new_tokens})")
    print(f"{'':24} {'p50 s':>8} {'p95 s':>8} {'s/request':>10} {'out tok/s':>10} {'teacher/this s/req':>19}")
    for name, r in results.items():
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-"
        print(f"{name:24} {r['p50_s']:8.3f} {r['p95_s']:8.3f} {r['s_per_request']:10.3f} {tps:>10} "
              f"{t['s_per_request'] / r['s_per_request']:19.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
