"""Forgetting evaluation: lm-eval on bundled benchmark subsets, before (base) vs after (student).

`evaluate_model` runs lm-eval 0.4's Python API (`simple_evaluate` with a `TaskManager` holding only
our task folder: `include_path` with `include_defaults=False`, so it skips indexing lm-eval's
thousands of built-in YAMLs, the bulk of the CLI's start-up) and keeps per-question scores, so the
before/after comparison is paired (same questions) with bootstrap CIs. Results are cached per
(model weights, rendered task + data, lm-eval version) in the run, so the base model's "before"
is computed once per run and a re-run redoes nothing.

`forgetting_report` compares before and after per benchmark and applies the gate: fail when any
benchmark drops by more than `max_drop` (absolute accuracy points by default, the seeds' 5% rule;
or relative to the base score); `not_measured` (never a pass) when a requested benchmark has no
before or after score.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from stepwise.evals.benchmarks import PreparedTask
from stepwise.evals.modelref import ModelRef
from stepwise.evals.stats import mean_ci, paired_diff

from stepwise.io import atomic_write_json, sha256_text

MITIGATIONS = [
    "Mix 5-10% general-domain examples into the training data (`curation.general_mix`, fraction 0.05-0.10).",
    "Lower the learning rate (e.g. 1e-5 instead of 5e-5 for full fine-tuning; the low end of 1e-4..5e-4 for "
    "LoRA) (`training.learning_rate`).",
    "Train fewer epochs and stop when task accuracy plateaus (`training.num_epochs`; 1-3 for < 1,000 examples).",
    "Use LoRA instead of full fine-tuning (`training.modality: lora`): it updates a tiny fraction of the "
    "weights and resists forgetting.",
]


def default_device() -> str:
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def _lm_eval_version() -> str:
    from importlib import metadata

    return metadata.version("lm_eval")


def cache_key(model: ModelRef, task: PreparedTask, batch_size: int, device: str) -> str:
    ident = {"model": model.identity(), "task": task.fingerprint, "lm_eval": _lm_eval_version(), "device": device}
    return sha256_text(json.dumps(ident, sort_keys=True))[:20]


class EndpointLogprobsError(RuntimeError):
    """The OpenAI-compatible endpoint cannot score prompts (no echo + logprobs on /v1/completions)."""


def endpoint_lm_eval_args(model: ModelRef, tokenizer: Path, *, concurrency: int = 1) -> str:
    """`model_args` for lm-eval's `local-completions` model: the endpoint's /v1/completions, prompts
    sent as token ids of the local tokenizer (lm-eval needs it to split context from continuation)."""
    url = (model.base_url or "").rstrip("/") + "/completions"
    return (f"model={model.model_name},base_url={url},tokenizer_backend=huggingface,tokenizer={tokenizer},"
            f"num_concurrent={concurrency},max_retries=3,tokenized_requests=True")


def probe_endpoint_logprobs(model: ModelRef, api_key: str | None = None, timeout: float = 30.0) -> None:
    """lm-eval's loglikelihood asks /v1/completions for the prompt's own token logprobs
    (`echo: true, logprobs: 1, max_tokens: 1`). Ask once for a short prompt and raise a clear error
    when the endpoint does not give them (hosted chat-only APIs; servers without echo support)."""
    import httpx

    url = (model.base_url or "").rstrip("/") + "/completions"
    body = {"model": model.model_name, "prompt": "The capital of France is Paris", "max_tokens": 1, "logprobs": 1,
            "echo": True, "temperature": 0}
    why = None
    try:
        resp = httpx.post(url, json=body, timeout=timeout,
                          headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
        if resp.status_code != 200:
            why = f"HTTP {resp.status_code} from {url}: {resp.text[:200]}"
        else:
            lp = ((resp.json().get("choices") or [{}])[0].get("logprobs") or {})
            toks = lp.get("token_logprobs")
            if not isinstance(toks, list) or len(toks) < 3 or not isinstance(lp.get("top_logprobs"), list):
                why = f"{url} answered without the prompt's token logprobs (echo + logprobs)"
    except (httpx.HTTPError, ValueError) as exc:
        why = f"{url}: {exc}"
    if why:
        raise EndpointLogprobsError(
            f"the endpoint {model.label} cannot give prompt logprobs, which lm-eval's loglikelihood "
            f"benchmarks need ({why}). Serve the student with vLLM (its /v1/completions supports "
            "`echo` + `logprobs`), or evaluate forgetting on the local weights: `--model <dir>`.")


def evaluate_model(
    model: ModelRef, tasks: list[PreparedTask], task_dir: Path, *, batch_size: int = 8, device: str | None = None,
    cache_dir: Path | None = None, log=print, tokenizer: Path | None = None, concurrency: int = 1,
    api_key: str | None = None, lm_eval_log: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Per benchmark: {metric, value, n, items: [score per question in file order], wall_s, cached}.
    An endpoint (`openai:` model) is scored through lm-eval's `local-completions` with `tokenizer`
    (the base model's), never cached: what it serves can change under the same name. `lm_eval_log`:
    where lm-eval's own console output (its progress bars) goes, appended, instead of the console."""
    device = device or default_device()
    if not model.is_local:
        cache_dir = None
        if tokenizer is None:
            raise ValueError("an endpoint's forgetting eval needs a local tokenizer (the base model's dir)")
    results: dict[str, dict[str, Any]] = {}
    todo: list[PreparedTask] = []
    for t in tasks:
        cached = _cache_get(cache_dir, cache_key(model, t, batch_size, device)) if cache_dir else None
        if cached is not None:
            cached["cached"] = True
            results[t.benchmark.name] = cached
        else:
            todo.append(t)
    if todo:
        log(f"lm-eval: {model.label} on {', '.join(f'{t.benchmark.name} ({t.n})' for t in todo)} [{device}]"
            + (f"; its progress: {lm_eval_log}" if lm_eval_log else ""))
        fresh = _run_lm_eval(model, todo, task_dir, batch_size=batch_size, device=device, tokenizer=tokenizer,
                             concurrency=concurrency, api_key=api_key, output=lm_eval_log)
        for t in todo:
            res = fresh.get(t.benchmark.name)
            if res is None:  # lm-eval gave no result for it: left out, the report calls it not measured
                continue
            res["cached"] = False
            if cache_dir:
                _cache_put(cache_dir, cache_key(model, t, batch_size, device), res)
            results[t.benchmark.name] = res
    return {t.benchmark.name: results[t.benchmark.name] for t in tasks if t.benchmark.name in results}


def _run_lm_eval(model: ModelRef, tasks: list[PreparedTask], task_dir: Path, *, batch_size: int, device: str,
                 tokenizer: Path | None = None, concurrency: int = 1, api_key: str | None = None,
                 output: Path | None = None):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False, verbosity="WARNING")
    started = time.time()
    if model.is_local:
        lm, args = "hf", model.lm_eval_args()
    else:
        assert tokenizer is not None
        lm, args = "local-completions", endpoint_lm_eval_args(model, tokenizer, concurrency=concurrency)
    # lm-eval's API models read the key from OPENAI_API_KEY only: set it for this call when the
    # recipe names another variable
    saved = os.environ.get("OPENAI_API_KEY")
    if api_key and not model.is_local:
        os.environ["OPENAI_API_KEY"] = api_key
    try:
        with contextlib.ExitStack() as stack:
            if output is not None:  # lm-eval's tqdm bars write to sys.stderr as it is when a bar starts
                output.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(contextlib.redirect_stderr(stack.enter_context(output.open("a", encoding="utf-8"))))
            out = lm_eval.simple_evaluate(
                model=lm, model_args=args, tasks=[t.benchmark.task for t in tasks],
                batch_size=batch_size, device=device, task_manager=manager, log_samples=True,
                bootstrap_iters=0, verbosity="WARNING",
            )
    finally:
        if saved is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = saved
    wall = time.time() - started
    results: dict[str, dict[str, Any]] = {}
    for t in tasks:
        b = t.benchmark
        key = f"{b.metric},{b.filter}"
        agg = (out.get("results") or {}).get(b.task)
        if agg is None or key not in agg:
            continue
        samples = [s for s in (out.get("samples") or {}).get(b.task, []) if s.get("filter", "none") == b.filter]
        samples.sort(key=lambda s: s["doc_id"])
        items = [float(s[b.metric]) for s in samples]
        results[b.name] = {
            "benchmark": b.name, "task": b.task, "metric": b.metric, "filter": b.filter,
            "value": float(agg[key]), "n": len(items), "items": items,
            "wall_s": round(wall, 3), "model": model.label, "lm_eval": _lm_eval_version(),
            "other_metrics": {k: v for k, v in agg.items() if isinstance(v, int | float) and "stderr" not in k},
        }
    return results


def _cache_get(cache_dir: Path, key: str) -> dict[str, Any] | None:
    p = cache_dir / f"{key}.json"
    if not p.exists():
        return None
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(p.read_text(encoding="utf-8"))
    return None


def _cache_put(cache_dir: Path, key: str, value: dict[str, Any]) -> None:
    atomic_write_json(cache_dir / f"{key}.json", value)


# The gate's verdicts. `not_measured` is its own verdict, never a pass: a gate that measured
# nothing (or not every benchmark it was asked for) cannot say the student forgot nothing.
PASSED, FAILED, NOT_MEASURED = "passed", "failed", "not_measured"


def forgetting_report(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], *, max_drop: float = 0.05,
    relative: bool = False, in_domain: set[str] | None = None, n_boot: int = 1000, seed: int | None = None,
    requested: list[str] | None = None,
) -> dict[str, Any]:
    """Before/after per benchmark with CIs, and the gate.

    `requested` names the benchmarks the gate was asked to measure (default: those in `before`).
    One that is missing from either side, or scored on no question, is listed under
    `gate.not_measured`; the verdict is `failed` when a measured benchmark dropped too far, else
    `not_measured` when any requested benchmark (or every one) went unmeasured, else `passed`.
    """
    in_domain = in_domain or set()
    names = list(dict.fromkeys([*(requested if requested is not None else before), *before]))
    rows: dict[str, Any] = {}
    failed: list[str] = []
    not_measured: dict[str, str] = {}
    for name in names:
        b, a = before.get(name), after.get(name)
        if b is None or a is None:
            side = "before (base model) and after (student)" if b is None and a is None else (
                "before (base model)" if b is None else "after (student)")
            not_measured[name] = f"no {side} result"
            continue
        if len(a["items"]) != len(b["items"]):
            raise ValueError(f"{name}: before and after scored different questions ({len(b['items'])} vs {len(a['items'])})")
        if not b["items"]:
            not_measured[name] = "scored on 0 questions"
            continue
        diff = paired_diff(b["items"], a["items"], n_boot=n_boot, seed=seed)
        drop = -(diff["relative"] if relative else diff["delta"]) if diff["delta"] is not None else 0.0
        drop = drop if drop is not None else 0.0
        exceeds = drop > max_drop + 1e-12
        if exceeds:
            failed.append(name)
        rows[name] = {
            "metric": b["metric"], "n": diff["n"],
            "before": mean_ci(b["items"], n_boot, seed), "after": mean_ci(a["items"], n_boot, seed),
            "delta": diff["delta"], "delta_ci": diff["delta_ci"],
            "relative": diff["relative"], "relative_ci": diff["relative_ci"],
            "p_value": diff["p_value"], "mcnemar_p": diff.get("mcnemar_p"),
            "lost": diff.get("lost"), "gained": diff.get("gained"),
            "significant": bool(diff["delta_ci"][0] is not None and (diff["delta_ci"][0] > 0 or diff["delta_ci"][1] < 0)),
            "drop": drop, "exceeds_max_drop": exceeds, "in_domain": name in in_domain,
            # aliases read by stepwise.report
            "abs_change": diff["delta"], "rel_change": diff["relative"], "failed": exceeds,
            "lm_eval_value": {"before": b["value"], "after": a["value"]},
        }
    verdict = FAILED if failed else (NOT_MEASURED if not_measured or not rows else PASSED)
    return {
        "benchmarks": rows,
        "gate": {
            "verdict": verdict, "passed": verdict == PASSED, "max_drop": max_drop,
            "drop_kind": "relative" if relative else "absolute", "failed": failed,
            "not_measured": not_measured, "measured": sorted(rows),
            "mitigations": MITIGATIONS if failed else [],
        },
        "in_domain": sorted(in_domain),
    }
