"""A local teacher through llama.cpp in process (llama-cpp-python), grammar-constrained.

Library: llama-cpp-python's `Llama` (model load, tokenizer, sampling, KV cache, the GBNF sampler)
and its Jinja2 chat formatter. Hand-written here: locating and checking the GGUF, rendering the
GGUF's own chat template the way the transformers teacher renders the HF one, validating the
grammar with llama.cpp's parser before any request (an invalid grammar makes
`create_completion` crash the process), the thread default, and the per-request timings.

Prefix reuse: one `Llama` object serves the whole run. llama-cpp-python keeps the KV cache of the
previous prompt and evaluates only the tokens after the longest common prefix, and
`build_messages` puts the row input last, so the system prompt, few-shot turns, instructions and
label list are evaluated once (the caller orders rows so consecutive prompts share most).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'stepwise[llamacpp]'"


class LlamaCppError(ValueError):
    """Bad input for the llama.cpp teacher (missing package, bad GGUF, rejected grammar, context too small)."""


def physical_cores() -> int:
    """Physical cores this process may use (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores: set[str] = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def default_threads() -> int:
    """One thread per free physical core: busy cores (1-minute load) are left to whoever uses them,
    because ggml's OpenMP threads spin and collapse when a core they wait on is taken."""
    try:
        busy = int(round(os.getloadavg()[0]))
    except OSError:
        busy = 0
    return max(1, physical_cores() - busy)


def import_llama_cpp() -> Any:
    # OpenMP reads its wait policy when the library loads: passive threads sleep instead of
    # spinning, so a core shared with another process does not stall every decode step.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppError(f"teacher.provider: llamacpp needs llama-cpp-python ({INSTALL_HINT}): {exc}") from None
    return llama_cpp


def resolve_gguf(model: str) -> Path:
    """A known model name (its packaged GGUF) or a path to a GGUF file; anything else is named."""
    from stepwise.models import gguf_path, known_name

    key = known_name(model)
    if key is not None:
        try:
            return gguf_path(key)
        except FileNotFoundError as exc:
            raise LlamaCppError(f"teacher.model: {exc}") from None
    path = Path(model).expanduser()
    if not path.is_file():
        raise LlamaCppError(f"teacher.model: GGUF file {path} does not exist")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise LlamaCppError(f"teacher.model: {path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return path


# Content identity of a GGUF: files up to this size are hashed whole; larger ones by their first and
# last chunk (header, metadata, tokenizer and the last tensors) plus the size, so a 4 GB model costs
# a fraction of a second, not a full read.
_HASH_WHOLE = 256 * 1024 * 1024
_HASH_CHUNK = 16 * 1024 * 1024
_identities: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> identity: one read per process


def gguf_identity(model: str) -> str:
    """What the response cache names a llamacpp teacher by: the GGUF's content, not its path, so the
    same file elsewhere (another checkout, a renamed copy) hits the cache and a changed file misses."""
    import hashlib

    path = resolve_gguf(model)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)  # mtime only invalidates the memo
    if memo not in _identities:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            if st.st_size <= _HASH_WHOLE:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(fh.read(_HASH_CHUNK))
                fh.seek(st.st_size - _HASH_CHUNK)
                h.update(fh.read(_HASH_CHUNK))
        _identities[memo] = f"gguf:{st.st_size}:{h.hexdigest()}"
    return _identities[memo]


def _capture_fd2(fn):
    """Run fn() with fd 2 redirected to a temp file (llama.cpp prints parse errors with fprintf);
    a file, not a pipe, so a long message cannot block the writer."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode(errors="replace").strip()


class LlamaCppTeacher:
    """One GGUF model in process; `generate` answers chat requests under an optional GBNF grammar."""

    def __init__(self, model: str, *, grammar: str | None = None, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int = 0, vocab_only: bool = False):
        self.model, self.grammar_text, self.n_ctx, self.seed = model, grammar, n_ctx, seed
        self.vocab_only = vocab_only  # tokenizer and chat template only: for counting prompt tokens
        self.n_threads = n_threads or default_threads()
        self.path: Path | None = None
        self.timings: list[dict[str, Any]] = []  # one per request, in order (prompt tokens evaluated, ms)
        self._llm: Any = None
        self._grammar: Any = None
        self._grammars: dict[str, Any] = {}  # per-row grammars (a row's own index mapping), by text
        self._formatter: Any = None

    def load(self) -> None:
        llama_cpp = import_llama_cpp()
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.path = resolve_gguf(self.model)
        try:
            self._llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                                        n_threads_batch=self.n_threads, n_batch=512, seed=self.seed, verbose=False,
                                        vocab_only=self.vocab_only)
        except ValueError as exc:
            raise LlamaCppError(f"teacher.model: llama.cpp cannot load {self.path}: {exc}") from None
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise LlamaCppError(f"teacher.model: {self.path} carries no chat template (tokenizer.chat_template)")
        m = self._llm._model  # noqa: SLF001 - the token texts the template needs
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=m.token_get_text(self._llm.token_eos()),
                                              bos_token=m.token_get_text(self._llm.token_bos()),
                                              add_generation_prompt=True)
        if self.grammar_text is not None:
            self.check_grammar(self.grammar_text)
            self._grammar = llama_cpp.LlamaGrammar.from_string(self.grammar_text, verbose=False)

    def check_grammar(self, text: str) -> None:
        """Parse the grammar with llama.cpp itself; its message (and the rule it failed on) on rejection."""
        import llama_cpp

        vocab = self._llm._model.vocab  # noqa: SLF001
        sampler, msg = _capture_fd2(lambda: llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root"))
        if not sampler:
            raise LlamaCppError(f"llama.cpp rejected the grammar: {msg or 'failed to parse grammar'}\n"
                                f"grammar:\n{text[:2000]}")
        llama_cpp.llama_sampler_free(sampler)

    def grammar_for(self, text: str) -> Any:
        """A per-request grammar, checked by llama.cpp's parser and compiled once per distinct text."""
        import llama_cpp

        if text not in self._grammars:
            self.check_grammar(text)
            if len(self._grammars) >= 64:  # a run over many mappings: keep memory bounded
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[text] = llama_cpp.LlamaGrammar.from_string(text, verbose=False)
        return self._grammars[text]

    def render(self, messages: list[dict[str, str]]) -> str:
        return self._formatter(messages=messages).prompt

    def tokenize(self, text: str) -> list[int]:
        # special=True: <|im_start|> etc. in the rendered template become their special ids (as in HF)
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize(self.render(messages))

    def generate(self, inputs: list[list[dict[str, str]]], *, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, seed: int | None = None, grammar: str | None = None) -> list[dict[str, Any]]:
        """One distilabel-style output per conversation: generations + token statistics; `grammar`
        (GBNF text) replaces the teacher's own for these requests."""
        import llama_cpp
        from distilabel.models.llms.utils import prepare_output

        results = []
        for messages in inputs:
            tokens = self.prompt_tokens(messages)
            if len(tokens) + max_new_tokens > self.n_ctx:
                raise LlamaCppError(f"prompt of {len(tokens)} tokens + max_new_tokens {max_new_tokens} exceeds "
                                    f"teacher.n_ctx {self.n_ctx}")
            ctx = self._llm._ctx.ctx  # noqa: SLF001
            llama_cpp.llama_perf_context_reset(ctx)
            t0 = time.perf_counter()
            # HF generate's sampling (top_k 50, no min_p, no repeat penalty), not llama.cpp's defaults;
            # the seed is set per request so an answer does not depend on the requests before it.
            out = self._llm.create_completion(
                tokens, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=50, min_p=0.0,
                repeat_penalty=1.0, grammar=self._grammar if grammar is None else self.grammar_for(grammar),
                seed=self.seed if seed is None else seed)
            wall = time.perf_counter() - t0
            perf = llama_cpp.llama_perf_context(ctx)
            usage = out["usage"]
            self.timings.append({"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                                 "n_p_eval": int(perf.n_p_eval), "n_eval": int(perf.n_eval),
                                 "t_p_eval_ms": float(perf.t_p_eval_ms), "t_eval_ms": float(perf.t_eval_ms),
                                 "wall_s": wall, "finish_reason": out["choices"][0]["finish_reason"]})
            text = out["choices"][0]["text"]
            # usage.prompt_tokens is the whole prompt, the reused prefix included: that is what is billed
            results.append(prepare_output([text], input_tokens=[usage["prompt_tokens"]],
                                          output_tokens=[usage["completion_tokens"]]))
        return results

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


def build_llamacpp_teacher(recipe: Any) -> LlamaCppTeacher:
    """The recipe's teacher, loaded, its grammar validated (the same constraint the cache key names)."""
    from stepwise.pipelines.grammar import GrammarError, dss_gbnf

    t = recipe.teacher
    teacher = LlamaCppTeacher(t.model, n_ctx=t.n_ctx, n_threads=t.n_threads, seed=t.seed)
    import_llama_cpp()  # a missing extra is named before any grammar work
    try:
        teacher.grammar_text = (dss_gbnf(recipe.task, t.format, t.max_new_tokens, depth=t.json_depth)
                                if t.constrained_decoding else None)
    except GrammarError as exc:
        raise LlamaCppError(str(exc)) from None
    teacher.load()
    return teacher


def run_llamacpp(recipe: Any, jobs: list[Any], cache: Any, budget: Any, price: Any, on_progress: Any = None,
                 timings: list[float] | None = None) -> Any:
    """Answer the jobs one at a time through the shared executor (cache, budget, per-row errors).

    Jobs go in prompt order, so consecutive prompts share the longest prefix and its KV state stays
    hot; each request carries its own seed (from teacher.seed, the attempt and the request key, so the
    samples of one row differ and a re-ask samples afresh), so the order does not change answers.
    `timings`, when given, gets each answered request's latency in seconds (as `_execute`'s other
    backends; the student-vs-teacher table reports them)."""
    from stepwise.pipelines.constraints import per_row, sampling_params
    from stepwise.pipelines.executor import run_sync_batches
    from stepwise.pipelines.grammar import GrammarError, dss_gbnf

    from stepwise.io import sha256_text

    t = recipe.teacher
    # Per-row grammars (field names from the row's own mapping) are all built before the model
    # loads, so a schema too large to compile stops the run before any request (exit 2).
    grammars: dict[str, str] = {}
    if t.constrained_decoding and per_row(recipe.task):
        try:
            grammars = {j.key: dss_gbnf(recipe.task, t.format, t.max_new_tokens, depth=t.json_depth,
                                        row_input=j.row_input) for j in jobs}
        except GrammarError as exc:
            raise LlamaCppError(str(exc)) from None
    teacher = build_llamacpp_teacher(recipe)
    try:
        tokens = {j.key: teacher.prompt_tokens(j.messages) for j in jobs}
        longest = max(jobs, key=lambda j: len(tokens[j.key]))
        if len(tokens[longest.key]) + t.max_new_tokens > t.n_ctx:
            raise LlamaCppError(f"teacher.n_ctx: {t.n_ctx} tokens cannot hold the longest prompt "
                                f"({len(tokens[longest.key])} tokens) + max_new_tokens {t.max_new_tokens}; "
                                "raise teacher.n_ctx")
        ordered = sorted(jobs, key=lambda j: tokens[j.key])
        sampling = sampling_params(t)  # the same settings the cache key names

        def generate(batch: list[Any]) -> list[dict[str, Any]]:
            out = []
            for j in batch:
                sent = time.perf_counter()
                out.append(teacher.generate([j.messages], **sampling, seed=request_seed(t.seed, j),
                                            grammar=grammars.get(j.key))[0])
                if timings is not None:
                    timings.append(time.perf_counter() - sent)
            return out

        def request_seed(seed: int, job: Any) -> int:
            return int(sha256_text(f"{seed}:{job.attempt}:{job.key}")[:8], 16)

        return run_sync_batches(generate, ordered, cache, model=t.model, batch_size=1, price=price, budget=budget,
                                on_progress=on_progress)
    finally:
        teacher.close()
