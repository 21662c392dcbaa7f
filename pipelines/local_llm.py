"""A local transformers teacher as a distilabel LLM, with outlines constrained decoding.

distilabel's own TransformersLLM has no working constraint path with outlines 1.x, so this class
implements distilabel's `LLM` interface (so it also runs inside distilabel pipelines) on top of
transformers `generate` and `outlines.Generator(..., Regex(...))`. Token usage is counted with the
model's tokenizer.
"""

from __future__ import annotations

from typing import Any

from distilabel.models.llms.base import LLM
from distilabel.models.llms.utils import prepare_output
from pydantic import PrivateAttr


class LocalTransformersLLM(LLM):
    model: str
    device: str = "cpu"
    seed: int = 0
    regex: str | None = None
    n_threads: int | None = None  # torch intra-op threads while generating (None: torch's default)

    _tokenizer: Any = PrivateAttr(None)
    _model: Any = PrivateAttr(None)
    _generator: Any = PrivateAttr(None)

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
        if self.regex:
            import outlines
            from outlines.types import Regex

            self._generator = outlines.Generator(outlines.from_transformers(self._model, self._tokenizer), Regex(self.regex))

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
        temperature: float = 0.7, top_p: float = 1.0, seed: int | None = None, **_: Any,
    ) -> list[dict[str, Any]]:
        import torch

        # Set only around generation and restored after: torch's thread count is process-wide.
        before = torch.get_num_threads()
        if self.n_threads:
            torch.set_num_threads(self.n_threads)
        try:
            return self._generate(inputs, num_generations, max_new_tokens, temperature, top_p, seed)
        finally:
            torch.set_num_threads(before)

    def _generate(self, inputs: list[Any], num_generations: int, max_new_tokens: int, temperature: float,
                  top_p: float, seed: int | None) -> list[dict[str, Any]]:
        import torch

        prompts = [self.render(list(messages)) for messages in inputs]
        torch.manual_seed(self.seed if seed is None else seed)  # re-asks of malformed answers pass a fresh seed
        outputs: list[list[str]] = [[] for _ in prompts]
        sampling = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
        if temperature > 0:
            sampling.update(temperature=temperature, top_p=top_p)
        for _ in range(num_generations):
            if self._generator is not None:
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
