"""Task-eval generation for a GGUF student (e.g. `package/student-f16.gguf`) through llama.cpp in process.

Library: llama-cpp-python, loaded, rendered and tokenized through stepwise.pipelines.llamacpp_llm
(the teacher's backend: GGUF checks, the GGUF's own chat template, the thread default). Hand-written
here: greedy decoding with the same stop rule as the transformers path (stepwise.evals.generate):
generation ends with EOS or after the token that completes `</answer>`, which stays in the text
(a stopping criterion, not llama.cpp's stop strings, which would cut it off), so identical greedy
tokens give identical text and identical scores. Prompts are the same messages the transformers
path renders with the HF tokenizer's chat template; the converter copies that template into the
GGUF. Rows go shortest-prompt first in prompt order so consecutive requests share the KV prefix
(system prompt, instructions, label list).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from stepwise.evals.generate import STOP, GenerationResult, Messages
from stepwise.evals.modelref import ModelRef


def _answer_stop(llm: Any, n_prompt: int) -> Callable[[Any, Any], bool]:
    """True once the generated text (tokens after the prompt) contains `</answer>`."""
    stop = STOP.encode()

    def criterion(input_ids: Any, logits: Any) -> bool:
        return stop in llm.detokenize([int(t) for t in input_ids[n_prompt:]])

    return criterion


def generate_gguf(
    model: ModelRef, prompts: Sequence[Messages], *, max_new_tokens: int = 256, n_threads: int | None = None,
    n_ctx: int = 4096, progress: Callable[[int], None] | None = None,
) -> GenerationResult:
    from stepwise.pipelines.llamacpp_llm import LlamaCppTeacher

    backend = LlamaCppTeacher(str(model.path), n_ctx=n_ctx, n_threads=n_threads)
    backend.load()  # a missing or non-GGUF file is named here (LlamaCppError); imports llama_cpp with its env
    from llama_cpp import StoppingCriteriaList

    llm = backend._llm  # noqa: SLF001 - the completion call; the rest goes through the backend's helpers
    outs: list[str | None] = [None] * len(prompts)
    errs: list[str | None] = [None] * len(prompts)
    tokens = [backend.prompt_tokens(m) for m in prompts]
    order = sorted(range(len(prompts)), key=lambda i: tokens[i])  # shared prefixes stay hot in the KV cache
    n_out = 0
    latencies: list[float | None] = [None] * len(prompts)
    started = time.time()
    try:
        for i in order:
            if len(tokens[i]) + max_new_tokens > n_ctx:
                errs[i] = f"prompt of {len(tokens[i])} tokens + max_new_tokens {max_new_tokens} exceeds n_ctx {n_ctx}"
                continue
            sent = time.perf_counter()
            out = llm.create_completion(
                tokens[i], max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                repeat_penalty=1.0, stopping_criteria=StoppingCriteriaList([_answer_stop(llm, len(tokens[i]))]))
            latencies[i] = round(time.perf_counter() - sent, 4)
            outs[i] = out["choices"][0]["text"]
            n_out += int(out["usage"]["completion_tokens"])
            if progress:
                progress(1)
    finally:
        backend.close()
    return GenerationResult(outs, errs, time.time() - started, n_out, None,
                            {"backend": "llama.cpp", "gguf": str(model.path), "n_threads": backend.n_threads,
                             "batch_size": 1,  # one completion per call: never eval.task.batch_size
                             "latencies": latencies})
