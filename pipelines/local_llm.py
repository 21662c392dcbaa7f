"""A local transformers teacher as a distilabel LLM, with outlines constrained decoding.

distilabel's own TransformersLLM has no working constraint path with outlines 1.x, so this class
implements distilabel's `LLM` interface (so it also runs inside distilabel pipelines) on top of
transformers `generate` and `outlines.Generator`. Token usage is counted with the model's tokenizer.

Two constraint kinds (library: outlines 1.3 and its backends; hand-written: choosing one, grouping
a batch by grammar, the per-grammar generator cache):
- classification: a regex (`constraints.dss_regex`) through outlines' default backend, outlines_core;
- structured answers: a Lark grammar (`constraints.dss_lark`: the DSS tags around `%json` of the
  answer's schema) through the **llguidance** backend (pinned in pyproject). Why llguidance: checked
  on this CPU-only box with SmolLM2-135M and nl2dsl's OpenSearch subset, outlines_core compiles the
  schema's regex into a token index eagerly: 4 s without bool nesting, 125 s with one level, and
  every row's mapping is a new schema. llguidance builds the token mask lazily at each step (under a
  second per new grammar, no GPU needed) and takes JSON schema and the surrounding tags in one
  grammar. xgrammar would also run on CPU but pulls in its own compiled kernels for the same job;
  llguidance is outlines' default CFG backend, a single small wheel.
"""

from __future__ import annotations

from typing import Any

from distilabel.models.llms.base import LLM
from distilabel.models.llms.utils import prepare_output
from pydantic import PrivateAttr


def lark_error(grammar: str) -> str | None:
    """llguidance's own verdict on a Lark grammar (its JSON-schema compiler included): None if usable."""
    import llguidance

    try:
        spec = llguidance.LLMatcher.grammar_from_lark(grammar)
    except ValueError as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(spec)
    return messages[0] if is_error and messages else None


class LocalTransformersLLM(LLM):
    model: str
    device: str = "cpu"
    seed: int = 0
    regex: str | None = None
    lark: str | None = None  # a Lark grammar for llguidance (structured answers); exclusive with regex
    n_threads: int | None = None  # torch intra-op threads while generating (None: torch's default)

    _tokenizer: Any = PrivateAttr(None)
    _model: Any = PrivateAttr(None)
    _generator: Any = PrivateAttr(None)
    _outlines_model: Any = PrivateAttr(None)
    _by_grammar: dict[str, Any] = PrivateAttr(default_factory=dict)  # per-row grammar -> generator

    def load(self) -> None:
        super().load()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from stepwise.models import resolve_model_dir

        path = resolve_model_dir(self.model)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(self.device)
        self._model.eval()
        if self.regex or self.lark:
            import outlines
            from outlines.types import Regex

            self._outlines_model = outlines.from_transformers(self._model, self._tokenizer)
            self._generator = (outlines.Generator(self._outlines_model, Regex(self.regex)) if self.regex
                               else self._lark_generator(self.lark))

    def _lark_generator(self, grammar: str) -> Any:
        import outlines
        from outlines.types import CFG

        if self._outlines_model is None:
            self._outlines_model = outlines.from_transformers(self._model, self._tokenizer)
        if grammar not in self._by_grammar:
            if len(self._by_grammar) >= 64:  # many mappings: keep memory bounded
                self._by_grammar.pop(next(iter(self._by_grammar)))
            self._by_grammar[grammar] = outlines.Generator(self._outlines_model, CFG(grammar), backend="llguidance")
        return self._by_grammar[grammar]

    @property
    def model_name(self) -> str:
        return self.model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: list[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(  # type: ignore[override]
        self, inputs: list[Any], num_generations: int = 1, max_new_tokens: int = 128,
        temperature: float = 0.7, top_p: float = 1.0, seed: int | None = None,
        grammars: list[str] | None = None, **_: Any,
    ) -> list[dict[str, Any]]:
        """`grammars`: one Lark grammar per input (a row's own constraint), replacing the LLM's own."""
        import torch

        # Set only around generation and restored after: torch's thread count is process-wide.
        before = torch.get_num_threads()
        if self.n_threads:
            torch.set_num_threads(self.n_threads)
        try:
            return self._generate(inputs, num_generations, max_new_tokens, temperature, top_p, seed, grammars)
        finally:
            torch.set_num_threads(before)

    def _generate(self, inputs: list[Any], num_generations: int, max_new_tokens: int, temperature: float,
                  top_p: float, seed: int | None, grammars: list[str] | None = None) -> list[dict[str, Any]]:
        import torch

        prompts = [self.render(list(messages)) for messages in inputs]
        torch.manual_seed(self.seed if seed is None else seed)  # re-asks of malformed answers pass a fresh seed
        outputs: list[list[str]] = [[] for _ in prompts]
        sampling = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
        if temperature > 0:
            sampling.update(temperature=temperature, top_p=top_p)
        for _ in range(num_generations):
            if grammars is not None:
                # One batch per distinct grammar (rows sharing a mapping share one), in input order.
                texts = [""] * len(prompts)
                groups: dict[str, list[int]] = {}
                for i, g in enumerate(grammars):
                    groups.setdefault(g, []).append(i)
                for g, idx in groups.items():
                    for i, text in zip(idx, self._lark_generator(g).batch([prompts[i] for i in idx], **sampling),
                                       strict=True):
                        texts[i] = text
            elif self._generator is not None:
                texts = self._generator.batch(prompts, **sampling)
            else:
                enc = self._tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
                with torch.no_grad():
                    out = self._model.generate(**enc, pad_token_id=self._tokenizer.pad_token_id, **sampling)
                texts = self._tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in enumerate(texts):
                outputs[i].append(text)
        results = []
        for prompt, gens in zip(prompts, outputs, strict=True):
            p_tokens = self.count_tokens(prompt)
            results.append(prepare_output(gens, input_tokens=[p_tokens] * len(gens),
                                          output_tokens=[self.count_tokens(g) for g in gens]))
        return results
