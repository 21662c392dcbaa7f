"""Model shapes for the VRAM planner: parameter counts by layer type from a model's config.

A shape is read from an HF `config.json` (a file, a model directory, or a known stepwise model
name) or taken from the built-in table below, so the planner works offline for the sizes in the
seeds' VRAM table (LLaMA 7B/13B/34B/70B) without downloading anything. Axolotl has no planner,
so all of this is ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    tie_embeddings: bool = False
    gated_mlp: bool = True
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    model_type: str = "llama"

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    # -- parameter counts by layer type ---------------------------------------------------------
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block, by module name."""
        h, hd = self.hidden_size, self.hd
        shapes = {
            "q_proj": (h, self.num_heads * hd),
            "k_proj": (h, self.num_kv_heads * hd),
            "v_proj": (h, self.num_kv_heads * hd),
            "o_proj": (self.num_heads * hd, h),
            "up_proj": (h, self.intermediate_size),
            "down_proj": (self.intermediate_size, h),
        }
        if self.gated_mlp:
            shapes["gate_proj"] = (h, self.intermediate_size)
        return shapes

    @property
    def attention_params(self) -> int:
        per = sum(i * o for n, (i, o) in self.linear_shapes().items() if n in ATTENTION_MODULES)
        if self.attention_bias:
            per += (self.num_heads + 2 * self.num_kv_heads) * self.hd
        return per * self.num_layers

    @property
    def mlp_params(self) -> int:
        return sum(i * o for n, (i, o) in self.linear_shapes().items() if n not in ATTENTION_MODULES) * self.num_layers

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder's linear layers: what bitsandbytes quantises (not the lm_head)."""
        return self.attention_params + self.mlp_params

    @property
    def total_params(self) -> int:
        return self.linear_params + self.norm_params + self.embedding_params + self.lm_head_params

    def lora_params(self, r: int, targets: str | list[str]) -> int:
        """Trainable LoRA parameters: r x (in + out) per targeted linear layer."""
        names = _target_names(targets, self)
        return sum(r * (i + o) for n, (i, o) in self.linear_shapes().items() if n in names) * self.num_layers

    def describe(self) -> str:
        return (f"{self.name}: {self.total_params / 1e9:.2f}B params ({self.num_layers} layers, hidden {self.hidden_size}, "
                f"{self.num_heads} heads / {self.num_kv_heads} kv, mlp {self.intermediate_size}, vocab {self.vocab_size})")


ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _target_names(targets: str | list[str], shape: ModelShape) -> set[str]:
    if isinstance(targets, list):
        return set(targets)
    if targets == "linear":
        return set(shape.linear_shapes())
    if targets == "attention":
        return set(ATTENTION_MODULES)
    if targets == "qv":
        return {"q_proj", "v_proj"}
    raise ValueError(f"unknown LoRA targets '{targets}' (linear, attention, qv or a list of module names)")


def _llama(name: str, h: int, layers: int, heads: int, kv: int, inter: int, vocab: int = 32000,
           tie: bool = False, max_pos: int = 4096) -> ModelShape:
    return ModelShape(name=name, vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv, intermediate_size=inter, tie_embeddings=tie, max_position_embeddings=max_pos)


# Published architectures (their config.json values). The seeds' table says "LLaMA 3 7B/13B/34B/70B";
# LLaMA 3 has no 7B, 13B or 34B, so these are the LLaMA 2 / Code Llama shapes of those sizes.
BUILTIN_SHAPES: dict[str, ModelShape] = {
    "llama-7b": _llama("llama-7b", 4096, 32, 32, 32, 11008),
    "llama-13b": _llama("llama-13b", 5120, 40, 40, 40, 13824),
    "llama-34b": _llama("llama-34b", 8192, 48, 64, 8, 22016, max_pos=16384),  # Code Llama 34B
    "llama-70b": _llama("llama-70b", 8192, 80, 64, 8, 28672),  # Llama 2 70B
    "llama3-8b": _llama("llama3-8b", 4096, 32, 32, 8, 14336, vocab=128256, max_pos=8192),
    "llama3-70b": _llama("llama3-70b", 8192, 80, 64, 8, 28672, vocab=128256, max_pos=8192),
    "llama3.2-1b": _llama("llama3.2-1b", 2048, 16, 32, 8, 8192, vocab=128256, tie=True, max_pos=131072),
    "llama3.2-3b": _llama("llama3.2-3b", 3072, 28, 24, 8, 8192, vocab=128256, tie=True, max_pos=131072),
    "smollm2-135m": ModelShape("smollm2-135m", 49152, 576, 30, 9, 3, 1536, head_dim=64, tie_embeddings=True,
                               max_position_embeddings=8192),
}
_SHAPE_ALIASES = {
    "7b": "llama-7b", "13b": "llama-13b", "34b": "llama-34b", "70b": "llama-70b",
    "llama2-7b": "llama-7b", "llama2-13b": "llama-13b", "llama2-70b": "llama-70b", "codellama-34b": "llama-34b",
    "llama3-7b": "llama-7b", "llama3-13b": "llama-13b", "llama3-34b": "llama-34b",
    "8b": "llama3-8b", "llama3.1-8b": "llama3-8b", "1b": "llama3.2-1b", "3b": "llama3.2-3b",
    "llama-1b": "llama3.2-1b", "llama-3b": "llama3.2-3b",
    "smollm2-135m-instruct": "smollm2-135m", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
}


def shape_from_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """A shape from an HF config dict (text config of multimodal wrappers included)."""
    cfg = config.get("text_config") or config
    try:
        h = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            name=name,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=h,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate_size=int(cfg.get("intermediate_size") or 4 * h),
            head_dim=cfg.get("head_dim"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
            gated_mlp=cfg.get("hidden_act", "silu") in {"silu", "swish", "gelu_pytorch_tanh"},
            attention_bias=bool(cfg.get("attention_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            model_type=str(cfg.get("model_type", "llama")),
        )
    except KeyError as exc:
        raise ValueError(f"{name}: config.json lacks {exc.args[0]!r}; not a decoder-only transformer config?") from None


def resolve_shape(model: str) -> ModelShape:
    """A built-in shape name, a config.json path, an HF model dir, or a known stepwise model name."""
    key = model.strip().lower()
    key = _SHAPE_ALIASES.get(key, key)
    if key in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[key]
    p = Path(model).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return shape_from_config(json.loads(p.read_text(encoding="utf-8")), name=str(model))
    from stepwise.models import known_name, resolve_model_dir

    if known_name(model):
        d = resolve_model_dir(model)
        return shape_from_config(json.loads((d / "config.json").read_text(encoding="utf-8")), name=known_name(model) or model)
    raise ValueError(
        f"model '{model}': not a built-in shape ({', '.join(BUILTIN_SHAPES)}), a known model name, "
        "a model directory or a config.json"
    )
