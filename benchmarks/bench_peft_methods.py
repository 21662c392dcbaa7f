"""Benchmark: LoRA vs IA3 vs prompt tuning (vs prefix tuning) on the support-tickets example.

Each method trains with the TRL backend (`training.backend: trl`, the same SFTTrainer, data,
batch size and number of optimizer steps, so only the PEFT method differs) on the exported data
of a demo run, then is evaluated on the same test items by the eval code (`stepwise.evals.task_eval`,
generation through the peft adapter), and `stepwise compare`'s table is built from the results
(trainable parameters, peak memory, wall time, accuracy with CIs, paired difference vs the first).
The untrained base model is scored too, as the floor.

Setup (once; replays the example's recorded teacher cache, no training):
  .venv/bin/stepwise run examples/support-tickets/recipe.yaml --run-dir runs/peft-bench --offline --until export
Usage:
  .venv/bin/python benchmarks/bench_peft_methods.py --run-dir runs/peft-bench --steps 30 --micro-batch 2 --eval-limit 48
  (methods one at a time; `--methods prompt_tuning --out DIR` runs one, `--compare-only DIR...` rebuilds the table)
Not a test: minutes on CPU. Results go into BENCHMARKS.md (## PEFT methods) and --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "AXOLOTL_DO_NOT_TRACK"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# LoRA at the top of the seeds' range (as the example recipe); the others at the TRL backend's defaults.
DEFAULT_LR = {"lora": 5e-4, "ia3": 3e-3, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=REPO / "examples" / "support-tickets" / "recipe.yaml")
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "peft-bench")
    ap.add_argument("--methods", default="lora,ia3,prompt_tuning", help="Also: prefix_tuning")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--eval-limit", type=int, default=48)
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--no-base", action="store_true", help="Skip scoring the untrained base model")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "peft-bench-results")
    ap.add_argument("--compare-only", type=Path, nargs="+", default=None,
                    help="Only build the compare table from result dirs of earlier runs (<out>/<method>)")
    args = ap.parse_args()
    if args.compare_only:
        from stepwise.evals.compare import compare_runs, markdown

        print(markdown(compare_runs(list(args.compare_only))))
        return

    from stepwise.evals.compare import compare_runs, markdown
    from stepwise.evals.modelref import count_parameters, resolve_model
    from stepwise.evals.task_eval import evaluate_task, load_test_rows, predictions_path
    from stepwise.training.configgen import write_configs
    from stepwise.training.trl_backend import generate_trl_configs, train

    from stepwise.io import atomic_write_json, atomic_write_jsonl
    from stepwise.recipe import load_recipe

    base_recipe = load_recipe(args.recipe)
    run_dir = args.run_dir.resolve()
    if not (run_dir / "export" / "train.chat.jsonl").exists():
        raise SystemExit(f"{run_dir}/export/train.chat.jsonl missing: run the setup command in this file's docstring")
    test_rows = load_test_rows(run_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    entries: list[Path] = []

    def evaluate(label: str, model_spec: str, recipe) -> Path:
        recipe.eval.task.limit = args.eval_limit
        ref = resolve_model(model_spec)
        t0 = time.time()
        report, preds = evaluate_task(recipe, ref, test_rows, device="cpu")
        eval_s = round(time.time() - t0, 1)
        entry = args.out / label
        report["model_info"] = {"label": label, "kind": ref.kind, "path": str(ref.path), **ref.info,
                                "parameters": count_parameters(ref)}
        atomic_write_json(entry / "eval" / "task.json", report)
        atomic_write_jsonl(predictions_path(entry / "eval"), preds)
        atomic_write_json(entry / "manifest.json", {"stages": {"eval": {"wall_s": eval_s}}})
        results.setdefault(label, {}).update(accuracy=report["metrics"]["accuracy"]["value"],
                                             macro_f1=report["metrics"]["macro_f1"]["value"],
                                             parse_status=report["parse_status"], eval_s=eval_s, n=report["n"])
        return entry

    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        training = base_recipe.training.model_copy(update={
            "backend": "trl", "modality": method, "max_steps": args.steps, "micro_batch_size": args.micro_batch,
            "gradient_accumulation_steps": 1, "learning_rate": DEFAULT_LR[method], "profile": "cpu",
            "num_virtual_tokens": args.num_virtual_tokens, "gradient_checkpointing": False})
        recipe = base_recipe.model_copy(update={"training": training}, deep=True)
        recipe.source_path = base_recipe.source_path
        [gc] = generate_trl_configs(recipe, run_dir=run_dir, use_data=True, relative_to=REPO)
        gc.name = f"bench-{method}"
        gc.config["output_dir"] = str(run_dir / "train" / gc.name)
        [path] = write_configs([gc], args.out / "configs")
        print(f"== {method}: training {args.steps} steps", flush=True)
        res = train(path, run_dir=run_dir, cpu=True, base_dir=REPO)
        summary = json.loads((res.out_dir / "summary.json").read_text())
        results[method] = {k: summary[k] for k in ("trainable_params", "total_params", "peak_memory_mb", "wall_s",
                                                    "train_runtime_s", "first_loss", "final_loss", "learning_rate")}
        print(f"   trained in {summary['wall_s']}s, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; "
              f"evaluating on {args.eval_limit} test items", flush=True)
        entries.append(evaluate(method, str(res.out_dir), recipe))
        print(f"   accuracy {results[method]['accuracy']:.3f}", flush=True)
        atomic_write_json(args.out / "results.partial.json", results)  # a killed run keeps what it measured
    if not args.no_base:
        print("== base (untrained)", flush=True)
        entries.append(evaluate("base", base_recipe.training.base_model, base_recipe))

    cmp = compare_runs(entries)
    md = markdown(cmp)
    env = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "load_avg_1m": round(os.getloadavg()[0], 2), "steps": args.steps, "micro_batch": args.micro_batch,
           "eval_limit": args.eval_limit, "num_virtual_tokens": args.num_virtual_tokens}
    atomic_write_json(args.out / "results.json", {"env": env, "methods": results, "compare": cmp["table"],
                                                   "columns": cmp["columns"]})
    (args.out / "compare.md").write_text(md, encoding="utf-8")
    print(md)
    print(json.dumps({"env": env, "methods": results}, indent=2))


if __name__ == "__main__":
    main()
