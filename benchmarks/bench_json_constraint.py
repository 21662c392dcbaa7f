"""Schema-constrained JSON from local teachers: parse and schema-valid rates, tokens/s, with and without.

The same nl2dsl prompts (examples/nl2dsl/recipe.yaml, built by the project's `plan_requests`) with
SmolLM2-135M-Instruct, one request at a time on `--threads` threads, under each constraint mode:

- `none`: unconstrained decoding;
- `braces` (transformers only): the constraint before issue 16, `constraints.dss_regex` (DSS tags,
  the answer any `{...}` without `<`) through outlines_core;
- `schema`: the DSS tags around the answer's JSON schema (`constraints.answer_schema`: the bounded
  OpenSearch subset, field names from each row's mapping): llama.cpp's JSON-schema-to-grammar
  (`grammar.dss_gbnf`) and, for transformers, llguidance through outlines (`constraints.dss_lark`).

Printed per backend and mode: answers that parse (the project's parser, status ok), answers whose
JSON validates against the vendored OpenSearch search-body schema (curation's validator, bare
queries wrapped as curation does), output tokens/s (output tokens over generation wall time) and
decode tokens/s (output tokens over wall time minus the prompt's prefill: llama.cpp's own counter;
for transformers a separate 1-token generation of the same prompt), output tokens per row and
seconds per row. The rows are the first `--rows` of the data file (all 85 by default).

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bench_json_constraint.py --backends llamacpp --threads 1
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bench_json_constraint.py --backends transformers \
        --modes braces,schema,none --rows 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch / llama_cpp load OpenMP
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stepwise.curation.validate import SCHEMA_VALIDATORS  # noqa: E402
from stepwise.pipelines.constraints import dss_lark, dss_regex  # noqa: E402
from stepwise.pipelines.generate import _parser, load_inputs, plan_requests  # noqa: E402
from stepwise.pipelines.grammar import dss_gbnf  # noqa: E402

from stepwise.recipe import load_recipe  # noqa: E402


def summarize(backend: str, mode: str, recs: list[dict], recipe) -> dict:
    parse = _parser(recipe)
    check = SCHEMA_VALIDATORS[recipe.task.validator]
    parsed = [parse(r["text"]) for r in recs]
    ok = [p for p in parsed if p.parse_status == "ok"]
    valid = sum(1 for p in ok if check(p.label) is None)
    gen_s = sum(r["wall_s"] for r in recs)
    out_tok = sum(r["output_tokens"] for r in recs)
    decode_s = sum(r["wall_s"] - r["prefill_s"] for r in recs)
    return {"backend": backend, "mode": mode, "rows": len(recs), "parse_ok": f"{len(ok)}/{len(recs)}",
            "schema_valid": f"{valid}/{len(recs)}", "out_tok_per_s": round(out_tok / gen_s, 1),
            "decode_tok_per_s": round(out_tok / decode_s, 1), "out_tokens_per_row": round(out_tok / len(recs), 1),
            "s_per_row": round(gen_s / len(recs), 2)}


def run_llamacpp(recipe, rows, messages, mode: str, threads: int) -> list[dict]:
    from stepwise.pipelines.llamacpp_llm import LlamaCppTeacher

    t = recipe.teacher
    teacher = LlamaCppTeacher("smollm2-135m-instruct", n_ctx=4096, n_threads=threads, seed=t.seed)
    teacher.load()
    recs = []
    for i, (row, msgs) in enumerate(zip(rows, messages, strict=True)):
        grammar = (dss_gbnf(recipe.task, t.format, t.max_new_tokens, depth=t.json_depth, row_input=row.input)
                   if mode == "schema" else None)
        out = teacher.generate([msgs], max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p,
                               seed=t.seed + i, grammar=grammar)[0]
        tm = teacher.timings[-1]
        recs.append({"text": out["generations"][0], "wall_s": tm["wall_s"], "output_tokens": tm["completion_tokens"],
                     "prefill_s": tm["t_p_eval_ms"] / 1000})  # llama.cpp's own prompt-evaluation time
    teacher.close()
    return recs


def run_transformers(recipe, rows, messages, mode: str, threads: int) -> list[dict]:
    import torch
    from stepwise.pipelines.local_llm import LocalTransformersLLM

    torch.set_num_threads(threads)
    t = recipe.teacher
    regex = dss_regex(recipe.task, t.format, t.max_new_tokens) if mode == "braces" else None
    llm = LocalTransformersLLM(model="smollm2-135m-instruct", regex=regex, seed=t.seed)
    llm.load()
    recs = []
    for i, (row, msgs) in enumerate(zip(rows, messages, strict=True)):
        grammars = ([dss_lark(recipe.task, t.format, t.max_new_tokens, t.json_depth, row.input)]
                    if mode == "schema" else None)
        s = time.perf_counter()
        o = llm.generate([msgs], max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p,
                         seed=t.seed + i, grammars=grammars)[0]
        wall = time.perf_counter() - s
        enc = llm.tokenizer(llm.render(msgs), return_tensors="pt")  # the prefill alone: a 1-token generation
        s = time.perf_counter()
        with torch.no_grad():
            llm._model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=llm.tokenizer.pad_token_id)
        recs.append({"text": o["generations"][0], "wall_s": wall, "output_tokens": o["statistics"]["output_tokens"][0],
                     "prefill_s": time.perf_counter() - s})
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=85)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", default="llamacpp,transformers")
    ap.add_argument("--modes", default="schema,none", help="comma list of none, braces (transformers), schema")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON summaries (and answers) here")
    args = ap.parse_args()

    recipe = load_recipe(REPO / "examples" / "nl2dsl" / "recipe.yaml")
    rows = load_inputs(recipe)[: args.rows]
    messages = plan_requests(recipe, rows).messages
    for backend in args.backends.split(","):
        for mode in args.modes.split(","):
            if backend == "llamacpp" and mode == "braces":
                continue
            run = run_llamacpp if backend == "llamacpp" else run_transformers
            recs = run(recipe, rows, messages, mode, args.threads)
            summary = summarize(backend, mode, recs, recipe)
            print(json.dumps(summary), flush=True)
            if args.out:
                with args.out.open("a") as fh:
                    fh.write(json.dumps({**summary, "answers": [r["text"] for r in recs]}) + "\n")


if __name__ == "__main__":
    main()
