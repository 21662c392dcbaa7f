"""Count a teacher prompt's tokens the way the teacher will: estimate and cost-cap reservations.

Which counter (hand-written choice; the tokenizers are the libraries'):
- `teacher.tokenizer` when set: a local Hugging Face tokenizer (known name or path), or
  `tiktoken:<encoding>`;
- a local transformers teacher: its own tokenizer with its chat template applied;
- an OpenAI model name (gpt-*, o1/o3/o4*, chatgpt-*) on api.openai.com: tiktoken's encoding for it,
  plus OpenAI's documented chat overhead (3 tokens per message, 3 to prime the reply), when
  tiktoken is installed and its encoding file is at hand (it downloads it once, so offline it
  may not be);
- otherwise a guess of ~4 characters per token, and the method says so.
`exact` tells the cost cap whether a count can be trusted as a bound: a guess is replaced there by
the UTF-8 byte count, which no byte-level BPE tokenizer exceeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from stepwise.recipe import Recipe

Messages = list[dict[str, str]]
_OPENAI_NAME = re.compile(r"^(gpt-|o[1-9]|chatgpt-|text-embedding-|davinci|babbage)", re.IGNORECASE)


@dataclass
class PromptCounter:
    count: Callable[[Messages], int]
    method: str
    exact: bool

    def upper_bound(self, messages: Messages) -> int:
        """A count the real one will not exceed (for booking a request's worst case against the cap)."""
        if self.exact:
            return self.count(messages) + 8  # slack for a server's own framing tokens
        return sum(len(m["content"].encode("utf-8")) + 4 for m in messages) + 3


# The one guess where no tokenizer is at hand (teacher prompts, the student's sequence_len check,
# OpenAI fine-tuning files): ~4 characters per token, the usual figure for English under BPE.
CHARS_PER_TOKEN = 4


def guess_tokens(text: str) -> int:
    """Tokens of `text` by the character guess, rounded up."""
    return -(-len(text) // CHARS_PER_TOKEN)


def approx_tokens(messages: Messages) -> int:
    """The character guess plus per-message overhead (used where no tokenizer is known)."""
    return sum(guess_tokens(m["content"]) + 4 for m in messages) + 3


def hf_chat_counter(name_or_path: str) -> Callable[[Messages], int]:
    """Tokens of the chat-templated prompt, as a transformers teacher or a vLLM server counts them."""
    from transformers import AutoTokenizer

    from stepwise.models import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))

    def count(messages: Messages) -> int:
        # render then encode without special tokens: exactly what LocalTransformersLLM feeds the model
        # (apply_chat_template(tokenize=True) returns a dict in transformers 5: len() of it is 2)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count


def tiktoken_counter(model: str | None = None, encoding: str | None = None) -> Callable[[Messages], int]:
    import tiktoken

    enc = tiktoken.get_encoding(encoding) if encoding else tiktoken.encoding_for_model(model or "")

    def count(messages: Messages) -> int:
        return sum(3 + len(enc.encode(m["content"])) + len(enc.encode(m["role"])) for m in messages) + 3

    return count


def prompt_counter(recipe: Recipe) -> PromptCounter:
    t = recipe.teacher
    if t.tokenizer:
        if t.tokenizer.startswith("tiktoken:"):
            name = t.tokenizer.split(":", 1)[1]
            return PromptCounter(tiktoken_counter(encoding=name), f"tiktoken {name} (teacher.tokenizer)", True)
        return PromptCounter(hf_chat_counter(t.tokenizer), f"tokenizer {t.tokenizer} + chat template (teacher.tokenizer)",
                             True)
    if t.provider == "transformers":
        return PromptCounter(hf_chat_counter(t.model), f"teacher tokenizer {t.model} + chat template", True)
    if t.provider == "llamacpp":  # the GGUF's own vocabulary and chat template, as the teacher bills them
        from stepwise.pipelines.llamacpp_llm import LlamaCppTeacher

        gguf = LlamaCppTeacher(t.model, n_ctx=t.n_ctx, n_threads=1, vocab_only=True)
        gguf.load()
        return PromptCounter(lambda msgs: len(gguf.prompt_tokens(msgs)), f"llama.cpp tokenizer of {t.model} + chat "
                             "template", True)
    is_openai = (t.base_url is None or "api.openai.com" in t.base_url) and _OPENAI_NAME.match(t.model)
    if is_openai:
        try:
            counter = tiktoken_counter(model=t.model)
        except ImportError:
            why = "tiktoken is not installed (pip install tiktoken)"
        except Exception as exc:  # noqa: BLE001 - unknown model, or the encoding file cannot be fetched offline
            why = f"tiktoken has no encoding at hand for {t.model}: {type(exc).__name__}"
        else:
            return PromptCounter(counter, f"tiktoken for {t.model}", True)
        return PromptCounter(approx_tokens, f"approx (4 chars/token; {why})", False)
    return PromptCounter(approx_tokens, "approx (4 chars/token; unknown server: set teacher.tokenizer to count exactly)",
                         False)
