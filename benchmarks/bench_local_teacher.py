"""Local teachers side by side: transformers + outlines vs llama.cpp, same prompts, same model.

Both answer the same DSS chat prompts (built by the project's `plan_requests` from the recipe) with
SmolLM2-135M-Instruct: transformers loads the HF copy of the packaged GGUF under outlines with
`constraints.dss_regex`; llama.cpp loads the packaged GGUF itself (Q4_1) under `grammar.dss_gbnf`,
the same constraint as a grammar. One request at a time on `--threads` threads each, the rows in
the same order. Printed per backend and task: seconds per row (all rows, and rows 2+ where the
shared prefix is warm), output tokens/s (output tokens over wall time), time to first token, and
the share of answers that parse with the project's parser.

Time to first token: llama.cpp's own counters (prompt evaluation + one decode step, per row);
transformers: a 1-token generation of the same prompt (the prefill), timed on the first rows.

Tasks: `tickets` (examples/support-tickets, 6 labels) and `banking77` (all 77 intents from
../shared/data/banking77, so each prompt carries the whole label list).

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bench_local_teacher.py --task tickets --rows 8 --threads 1
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bench_local_teacher.py --task banking77 --rows 6 --tf-rows 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch / llama_cpp load OpenMP
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stepwise.pipelines.constraints import dss_regex  # noqa: E402
from stepwise.pipelines.generate import _parser, load_inputs, plan_requests  # noqa: E402
from stepwise.pipelines.grammar import dss_gbnf  # noqa: E402

from stepwise.recipe import load_recipe  # noqa: E402

B77 = REPO.parent / "shared" / "data" / "banking77"


def task_recipe(task: str, rows: int, workdir: Path):
    recipe = load_recipe(REPO / "examples" / "support-tickets" / "recipe.yaml")
    if task == "banking77":
        labels = json.loads((B77 / "labels.json").read_text())
        lines = (B77 / "test.jsonl").read_text().splitlines()
        random.Random(7).shuffle(lines)
        inputs = workdir / "b77.jsonl"
        inputs.write_text("".join(json.dumps({"id": f"b{i}", **json.loads(line)}) + "\n"
                                  for i, line in enumerate(lines[:rows])))
        recipe.task.classes = labels
        recipe.task.label_aliases = {}
        recipe.data.inputs = str(inputs)
        recipe.data.limit = None
    else:
        recipe.data.limit = rows
    return recipe


def summarize(name: str, recs: list[dict], parse) -> dict:
    walls = [r["wall_s"] for r in recs]
    out_tok = sum(r["output_tokens"] for r in recs)
    ok = sum(1 for r in recs if parse(r["text"]).parse_status == "ok")
    ttfts = [r["ttft_s"] for r in recs if r.get("ttft_s") is not None]
    return {
        "backend": name, "rows": len(recs), "s_per_row": round(sum(walls) / len(walls), 2),
        "s_per_row_2plus": round(sum(walls[1:]) / max(1, len(walls) - 1), 2) if len(walls) > 1 else None,
        "out_tok_per_s": round(out_tok / sum(walls), 1),
        "ttft_row1_s": round(ttfts[0], 2) if ttfts else None,
        "ttft_2plus_s": round(sum(ttfts[1:]) / (len(ttfts) - 1), 2) if len(ttfts) > 1 else None,
        "parse_ok": f"{ok}/{len(recs)}",
        "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in recs) / len(recs)),
    }


def run_llamacpp(recipe, messages: list, threads: int) -> tuple[list[dict], float]:
    from stepwise.pipelines.llamacpp_llm import LlamaCppTeacher

    t = recipe.teacher
    t0 = time.perf_counter()
    teacher = LlamaCppTeacher("smollm2-135m-instruct", grammar=dss_gbnf(recipe.task, t.format, t.max_new_tokens),
                              n_ctx=4096, n_threads=threads, seed=t.seed)
    teacher.load()
    load_s = time.perf_counter() - t0
    recs = []
    for i, msgs in enumerate(messages):
        out = teacher.generate([msgs], max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p,
                               seed=t.seed + i)[0]
        tm = teacher.timings[-1]
        first_decode = tm["t_eval_ms"] / max(1, tm["n_eval"])
        recs.append({"text": out["generations"][0], "wall_s": tm["wall_s"], "prompt_tokens": tm["prompt_tokens"],
                     "output_tokens": tm["completion_tokens"], "n_p_eval": tm["n_p_eval"],
                     "ttft_s": (tm["t_p_eval_ms"] + first_decode) / 1000})
    teacher.close()
    return recs, load_s


def run_transformers(recipe, messages: list, threads: int, batch: int, ttft_rows: int) -> tuple[list[dict], float]:
    import torch
    from stepwise.pipelines.local_llm import LocalTransformersLLM

    torch.set_num_threads(threads)
    t = recipe.teacher
    t0 = time.perf_counter()
    llm = LocalTransformersLLM(model="smollm2-135m-instruct", regex=dss_regex(recipe.task, t.format, t.max_new_tokens),
                               seed=t.seed)
    llm.load()
    load_s = time.perf_counter() - t0
    recs = []
    for i in range(0, len(messages), batch):
        chunk = messages[i:i + batch]
        s = time.perf_counter()
        outs = llm.generate(chunk, max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p,
                            seed=t.seed + i)
        wall = (time.perf_counter() - s) / len(chunk)
        for o in outs:
            st = o["statistics"]
            recs.append({"text": o["generations"][0], "wall_s": wall, "prompt_tokens": st["input_tokens"][0],
                         "output_tokens": st["output_tokens"][0], "ttft_s": None})
    for i, msgs in enumerate(messages[:ttft_rows]):  # prefill + first token, outside the timed rows
        enc = llm.tokenizer(llm.render(msgs), return_tensors="pt")
        s = time.perf_counter()
        with torch.no_grad():
            llm._model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=llm.tokenizer.pad_token_id)
        recs[i]["ttft_s"] = time.perf_counter() - s
    return recs, load_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["tickets", "banking77"], default="tickets")
    ap.add_argument("--rows", type=int, default=8, help="rows through llama.cpp")
    ap.add_argument("--tf-rows", type=int, default=None, help="rows through transformers (default: --rows)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tf-batch", type=int, default=1)
    ap.add_argument("--backends", default="llamacpp,transformers")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON summaries here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = task_recipe(args.task, args.rows, Path(tmp))
        plan = plan_requests(recipe, load_inputs(recipe))
        parse = _parser(recipe)
        results = []
        for backend in args.backends.split(","):
            if backend == "llamacpp":
                recs, load_s = run_llamacpp(recipe, plan.messages[:args.rows], args.threads)
            else:
                n = args.tf_rows or args.rows
                recs, load_s = run_transformers(recipe, plan.messages[:n], args.threads, args.tf_batch, min(2, n))
            summary = {"task": args.task, "labels": len(recipe.task.label_set), "threads": args.threads,
                       "load_s": round(load_s, 1), **summarize(backend, recs, parse)}
            if backend == "transformers":
                summary["batch"] = args.tf_batch
            else:
                summary["n_p_eval_row1"] = recs[0]["n_p_eval"]
                summary["n_p_eval_2plus_mean"] = round(sum(r["n_p_eval"] for r in recs[1:]) / max(1, len(recs) - 1), 1)
            print(json.dumps(summary), flush=True)
            results.append(summary)
        if args.out:
            with args.out.open("a") as fh:
                for s in results:
                    fh.write(json.dumps(s) + "\n")


if __name__ == "__main__":
    main()
