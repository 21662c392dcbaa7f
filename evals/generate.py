"""Batched generation for task evaluation: local transformers (base, base + LoRA/QLoRA adapter,
merged or full weights) or an OpenAI-compatible endpoint (vLLM serving the student).

Greedy decoding; generation stops at `</answer>` (the end of the student's answer in every
`dss_output` format) or EOS. Local batches are length-sorted with left padding. A QLoRA adapter
is applied to the base in full precision here (bitsandbytes 4-bit needs a GPU); pass
`load_in_4bit=True` on a GPU to evaluate it over the quantised base as trained.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from stepwise.evals.modelref import ModelRef

STOP = "</answer>"
Messages = list[dict[str, str]]


@dataclass
class GenerationResult:
    texts: list[str | None]
    errors: list[str | None]
    wall_s: float
    output_tokens: int = 0
    peak_memory_mb: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        return self.output_tokens / self.wall_s if self.wall_s and self.output_tokens else None


def load_local(model: ModelRef, device: str = "cpu", load_in_4bit: bool = False):
    """(model, tokenizer) for an HF dir or base + adapter; adapters are merged in memory for speed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = model.base if model.kind == "adapter" else model.path
    tok_src = model.path if model.kind == "adapter" and (model.path / "tokenizer_config.json").exists() else src
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    kwargs: dict[str, Any] = {"dtype": torch.float32 if device == "cpu" else torch.bfloat16}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    lm = AutoModelForCausalLM.from_pretrained(str(src), **kwargs)
    if model.kind == "adapter":
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(model.path))
        # prompt/prefix tuning (virtual tokens) cannot be merged: generate through the PeftModel
        if not load_in_4bit and not lm.peft_config[lm.active_adapter].is_prompt_learning:
            lm = lm.merge_and_unload()
    if not load_in_4bit:
        lm = lm.to(device)
    lm.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return lm, tokenizer


def generate_local(
    model: ModelRef, prompts: Sequence[Messages], *, max_new_tokens: int = 256, batch_size: int = 8,
    device: str = "cpu", load_in_4bit: bool = False, progress: Callable[[int], None] | None = None,
    n_threads: int | None = None,
) -> GenerationResult:
    import torch

    if n_threads and not device.startswith("cuda"):
        previous = torch.get_num_threads()
        torch.set_num_threads(n_threads)  # process-wide: restored below, so training or lm-eval keep theirs
        try:
            return generate_local(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  device=device, load_in_4bit=load_in_4bit, progress=progress)
        finally:
            torch.set_num_threads(previous)
    lm, tok = load_local(model, device, load_in_4bit)
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    outs: list[str | None] = [None] * len(texts)
    n_out = 0
    batch_walls: list[list[float]] = []  # [seconds, requests] per batch: the latency of each request in it
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch_started = time.perf_counter()
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            gen = lm.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=[STOP], tokenizer=tok,
                pad_token_id=tok.pad_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            ids = new[row]
            ids = ids[ids != tok.pad_token_id] if tok.pad_token_id is not None else ids
            n_out += int(ids.numel())
            outs[i] = tok.decode(ids, skip_special_tokens=True)
        batch_walls.append([round(time.perf_counter() - batch_started, 4), len(idx)])
        if progress:
            progress(len(idx))
    wall = time.time() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _rss_mb()
    return GenerationResult(outs, [None] * len(outs), wall, n_out, peak,
                            {"backend": "transformers", "device": device, "batch_size": batch_size,
                             "n_threads": None if device.startswith("cuda") else torch.get_num_threads(),
                             "batch_walls": batch_walls})


def _rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        return None


def generate_openai(
    model: ModelRef, prompts: Sequence[Messages], *, max_new_tokens: int = 256, concurrency: int = 8,
    api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0, progress: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Chat completions against any OpenAI-compatible server (temperature 0, stop at </answer>)."""
    from openai import OpenAI

    client = OpenAI(base_url=model.base_url, api_key=os.environ.get(api_key_env) or "EMPTY", timeout=timeout_s,
                    max_retries=3)
    outs: list[str | None] = [None] * len(prompts)
    errs: list[str | None] = [None] * len(prompts)
    tokens = 0
    latencies: list[float | None] = [None] * len(prompts)  # per request, seconds (errors: None)

    def one(i: int) -> tuple[int, str | None, str | None, int]:
        sent = time.perf_counter()
        try:
            resp = client.chat.completions.create(
                model=model.model_name, messages=prompts[i], max_tokens=max_new_tokens, temperature=0.0, stop=[STOP],
            )
            text = resp.choices[0].message.content or ""
            if resp.choices[0].finish_reason == "stop" and "<answer>" in text and STOP not in text:
                text += STOP  # the server strips the stop string
            used = resp.usage.completion_tokens if resp.usage else 0
            latencies[i] = round(time.perf_counter() - sent, 4)
            return i, text, None, used
        except Exception as exc:  # noqa: BLE001 - recorded per row
            return i, None, f"{type(exc).__name__}: {exc}"[:500], 0

    started = time.time()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for i, text, err, used in pool.map(one, range(len(prompts))):
            outs[i], errs[i] = text, err
            tokens += used
            if progress:
                progress(1)
    return GenerationResult(outs, errs, time.time() - started, tokens, None,
                            {"backend": "openai", "base_url": model.base_url, "model": model.model_name,
                             "concurrency": concurrency, "latencies": latencies})
