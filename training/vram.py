"""VRAM planner: peak training memory per GPU before anyone rents one.

Axolotl has no memory planner, so this module is ours. The estimate is a sum of parts, each from
the model's shape (`stepwise.training.shapes`):

- weights: every parameter in the compute dtype (full, LoRA); for QLoRA the decoder's linear
  layers in NF4 (4 bits + block constants: 0.5 bit per weight for fp32 absmax per 64-block, or
  0.127 bit with double quantisation), embeddings / lm_head / norms stay in the compute dtype.
- gradients: one per trainable parameter, in the trainable parameter's dtype.
- optimizer states: AdamW keeps two moments per trainable parameter in the parameter's dtype
  (torch AdamW on bf16 weights: 2 x 2 bytes), 8-bit AdamW 2 x 1 byte; SGD none. `master_fp32`
  adds an fp32 copy of bf16 weights (mixed precision with master weights).
- activations: what autograd saves per decoder layer for a (micro batch x sequence) of bf16
  tokens (norm inputs, q/k/v, attention output, MLP gate/up/act outputs; LoRA dropout copies; the
  s^2 attention matrix unless flash/SDPA attention is used). With gradient checkpointing only
  every layer's input is kept plus one layer's recomputed activations.
- logits: bf16 logits, their fp32 upcast for the loss and its fp32 gradient (s x b x vocab).
- overhead: CUDA context, cuBLAS workspaces and allocator fragmentation (1 GB by default).
- Unsloth (`unsloth`, LoRA/QLoRA): Axolotl 0.19's Unsloth integration is Unsloth's offloaded
  gradient checkpointing (`activation_offloading: legacy`, Axolotl's copy of Unsloth's
  `CPU_Offloaded_Gradient_Checkpointer`) plus the Unsloth-derived fused LoRA kernels
  (`lora_mlp_kernel` / `lora_qkv_kernel` / `lora_o_kernel`). We count what that moves, rather than
  applying a flat factor: each checkpointed layer input goes to CPU RAM as soon as the layer has
  run, so the GPU keeps about two (one in transit, one recomputing) instead of one per layer; the
  fused MLP saves gate and up only and recomputes the activation in backward. Unsloth's published
  figure for its gradient checkpointing is "30% less VRAM" at ~1% extra time ("Unsloth Gradient
  Checkpointing - 4x longer context windows", unsloth.ai blog, April 2024), measured on long
  sequences; our saving grows with sequence length x layers the same way and is small for short
  sequences, where the weights dominate.
- ZeRO stage / GPUs: stage 1 shards optimizer states, 2 also gradients, 3 (and FSDP full shard)
  also weights, each across `num_gpus`.

GB means 10^9 bytes, as in the seeds' table (7B x 2 bytes = "14 GB"). `SEED_TABLE` is the seeds'
VRAM table and `compare_with_seed_table` reproduces it under the assumptions the table states, and
says which assumption differs where it disagrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from stepwise.training.shapes import ModelShape, resolve_shape

from stepwise.recipe import TrainingSpec

# the recipe's training settings are the one source of their defaults and bounds
_SPEC = TrainingSpec.model_fields

GB = 1e9
Modality = Literal["full", "lora", "qlora"]
MODALITIES: tuple[Modality, ...] = ("full", "lora", "qlora")
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class PlanInput(BaseModel):
    """Everything the estimate depends on besides the model shape."""

    model_config = ConfigDict(extra="forbid")

    modality: Modality = "lora"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    master_fp32: bool = Field(False, description="Full FT keeps an fp32 master copy of the weights.")
    double_quant: bool = Field(True, description="QLoRA: quantise the quantisation constants too.")
    lora_r: int = _SPEC["lora_r"]
    lora_target: str | list[str] = Field(_SPEC["lora_target"].default,
                                         description="linear, attention, qv, or module names.")
    lora_dropout: float = _SPEC["lora_dropout"]
    adapter_dtype: Literal["fp32", "bf16"] = "fp32"
    optimizer: str = "adamw_torch"
    sequence_len: int = Field(2048, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    gradient_checkpointing: bool = _SPEC["gradient_checkpointing"]
    flash_attention: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 0
    num_gpus: int = _SPEC["num_gpus"]
    overhead_gb: float = Field(1.0, ge=0.0)
    count_activations: bool = True
    unsloth: bool = Field(False, description="LoRA/QLoRA: Unsloth's offloaded checkpointing + fused LoRA kernels.")


@dataclass
class Estimate:
    shape: ModelShape
    plan: PlanInput
    parts: dict[str, float]  # bytes per GPU
    trainable_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total_gb <= gpu_memory_gb

    def breakdown(self) -> str:
        return ", ".join(f"{k} {v / GB:.1f}" for k, v in self.parts.items() if v > 0)


def optimizer_state_bytes(optimizer: str, param_bytes: int) -> tuple[float, str | None]:
    """Bytes of optimizer state per trainable parameter, and a note."""
    name = optimizer.lower()
    if "8bit" in name or "bnb_8bit" in name:
        return 2.0, "paged: state pages can spill to CPU RAM under pressure" if "paged" in name else None
    if name.startswith("sgd") and "momentum" not in name:
        return 0.0, None
    if "adafactor" in name:
        return 0.1 * param_bytes, "adafactor: factored second moments (approximate)"
    if "lion" in name:
        return float(param_bytes), None
    return 2.0 * param_bytes, "paged: state pages can spill to CPU RAM under pressure" if "paged" in name else None


def unsloth_applies(plan: PlanInput) -> bool:
    return plan.unsloth and plan.modality in ("lora", "qlora")


def offloaded_bytes(shape: ModelShape, plan: PlanInput) -> float:
    """Pinned CPU RAM that Unsloth's checkpointing holds instead of the GPU (every layer's input)."""
    if not (unsloth_applies(plan) and plan.gradient_checkpointing):
        return 0.0
    act = 4 if plan.dtype == "fp32" else 2
    return shape.num_layers * plan.sequence_len * plan.micro_batch_size * shape.hidden_size * act


def activation_bytes(shape: ModelShape, plan: PlanInput) -> tuple[float, float]:
    """(activations kept for backward, logits + loss buffers) in bytes per GPU."""
    s, b, h = plan.sequence_len, plan.micro_batch_size, shape.hidden_size
    act = 2  # bf16/fp16 activations
    if plan.dtype == "fp32":
        act = 4
    q_dim = shape.num_heads * shape.hd
    kv_dim = shape.num_kv_heads * shape.hd
    inter = shape.intermediate_size
    # attention block: norm input, q/k/v input, q, k, v, attention output
    attn = h + h + q_dim + 2 * kv_dim + q_dim
    # MLP block: norm input, gate/up input, gate, up, act(gate), act*up (down_proj input)
    mlp = (2 * h + 4 * inter) if shape.gated_mlp else (2 * h + 2 * inter)
    if unsloth_applies(plan):  # fused LoRA MLP: saves gate and up, recomputes the activation in backward
        mlp = (2 * h + 2 * inter) if shape.gated_mlp else (2 * h + inter)
    per_layer = s * b * (attn + mlp) * act
    if not plan.flash_attention:
        per_layer += 2 * shape.num_heads * s * s * b * act  # scores + softmax probabilities
    if plan.modality in ("lora", "qlora") and plan.lora_dropout > 0:
        from stepwise.training.shapes import _target_names

        names = _target_names(plan.lora_target, shape)
        per_layer += s * b * act * sum(i for n, (i, _o) in shape.linear_shapes().items() if n in names)
    if plan.gradient_checkpointing and unsloth_applies(plan):
        # Unsloth's checkpointing: layer inputs live in CPU RAM; ~2 on the GPU (in transit + recomputing)
        kept = min(2, shape.num_layers) * s * b * h * act + per_layer
    elif plan.gradient_checkpointing:
        kept = shape.num_layers * s * b * h * act + per_layer
    else:
        kept = shape.num_layers * per_layer
    logits = s * b * shape.vocab_size * (act + 4 + 4)
    return kept, logits


def estimate(shape: ModelShape, plan: PlanInput) -> Estimate:
    notes: list[str] = []
    wbytes = _DTYPE_BYTES[plan.dtype]
    n = plan.num_gpus
    shard_opt = plan.zero_stage >= 1 and n > 1
    shard_grad = plan.zero_stage >= 2 and n > 1
    shard_w = plan.zero_stage >= 3 and n > 1

    if plan.modality == "full":
        trainable = shape.total_params
        weights = shape.total_params * wbytes
        grads = trainable * wbytes
        opt_bytes, note = optimizer_state_bytes(plan.optimizer, 4 if plan.master_fp32 else wbytes)
        opt = trainable * opt_bytes
        if plan.master_fp32 and wbytes < 4:
            opt += trainable * 4
            notes.append("fp32 master weights counted with the optimizer states")
        adapters = 0.0
    else:
        trainable = shape.lora_params(plan.lora_r, plan.lora_target)
        if plan.modality == "qlora":
            bits = 4 + (0.127 if plan.double_quant else 0.5)
            weights = shape.linear_params * bits / 8 + (shape.total_params - shape.linear_params) * wbytes
            # one linear layer dequantised to the compute dtype at a time
            biggest = max(i * o for i, o in shape.linear_shapes().values())
            weights += biggest * wbytes
        else:
            weights = shape.total_params * wbytes
        abytes = _DTYPE_BYTES[plan.adapter_dtype]
        adapters = trainable * abytes
        grads = trainable * abytes
        opt_bytes, note = optimizer_state_bytes(plan.optimizer, abytes)
        opt = trainable * opt_bytes
    if note:
        notes.append(note)

    if shard_w:
        weights /= n
        adapters /= n
    if shard_grad:
        grads /= n
    if shard_opt:
        opt /= n
    if plan.num_gpus > 1 and plan.zero_stage == 0:
        notes.append(f"{n} GPUs without ZeRO/FSDP: data parallel, every GPU holds everything")

    kept, logits = activation_bytes(shape, plan) if plan.count_activations else (0.0, 0.0)
    if unsloth_applies(plan):
        off = offloaded_bytes(shape, plan) if plan.count_activations else 0.0
        notes.append(f"unsloth: fused LoRA kernels + offloaded checkpointing; {off / GB:.2f} GB of layer inputs in CPU "
                     "RAM instead of the GPU (Unsloth publishes ~30% less VRAM for long sequences)")
    elif plan.unsloth and plan.modality == "full":
        notes.append("unsloth applies to LoRA/QLoRA only; full fine-tuning is estimated without it")
    parts = {
        "weights": float(weights),
        "adapters": float(adapters),
        "gradients": float(grads),
        "optimizer": float(opt),
        "activations": float(kept),
        "logits": float(logits),
        "overhead": plan.overhead_gb * GB,
    }
    return Estimate(shape=shape, plan=plan, parts=parts, trainable_params=trainable, notes=notes)


def plan_all(shape: ModelShape, base: PlanInput) -> dict[str, Estimate]:
    """One estimate per modality with otherwise equal settings (optimizer as given)."""
    return {m: estimate(shape, base.model_copy(update={"modality": m})) for m in MODALITIES}


def choose_modality(estimates: dict[str, Estimate], gpu_memory_gb: float) -> tuple[Modality, str]:
    """The paper's rule: full precision when it fits, else LoRA, else QLoRA."""
    for m in MODALITIES:
        if estimates[m].fits(gpu_memory_gb):
            why = f"{m}: {estimates[m].total_gb:.1f} GB fits {gpu_memory_gb:g} GB"
            if m != "full":
                bigger = [f"{x} needs {estimates[x].total_gb:.1f} GB" for x in MODALITIES[: MODALITIES.index(m)]]
                why += " (" + ", ".join(bigger) + ")"
            return m, why
    return "qlora", (f"nothing fits {gpu_memory_gb:g} GB (QLoRA needs {estimates['qlora'].total_gb:.1f} GB): "
                     "use more GPUs with ZeRO-3/FSDP, a shorter sequence_len or a smaller micro batch")


# --------------------------------------------------------------------------------------------
# The seeds' table


SEED_TABLE: dict[str, dict[str, float]] = {
    # seed 002, "VRAM comparison for fine-tuning", GB
    "llama-7b": {"full": 56, "lora": 17, "qlora": 9},
    "llama-13b": {"full": 104, "lora": 28, "qlora": 14},
    "llama-34b": {"full": 272, "lora": 60, "qlora": 24},
    "llama-70b": {"full": 560, "lora": 120, "qlora": 40},
}

# What the table states: "Full FT (BF16)": 14 GB weights + 14 GB gradients + 28 GB optimizer
# states (Adam) for 7B, i.e. bf16 weights, bf16 grads, two bf16 Adam moments, nothing else.
# "LoRA (BF16)", "QLoRA (4-bit, r=16)": adapters "into attention layers", r = 16. The table does
# not state sequence length, batch or overheads; we assume a modest single-sequence setting.
SEED_ASSUMPTIONS: dict[str, PlanInput] = {
    "full": PlanInput(modality="full", dtype="bf16", optimizer="adamw_torch", count_activations=False, overhead_gb=0.0),
    "lora": PlanInput(modality="lora", dtype="bf16", lora_r=16, lora_target="attention", optimizer="adamw_torch",
                      sequence_len=2048, micro_batch_size=1, gradient_checkpointing=True, flash_attention=True,
                      overhead_gb=1.0),
    "qlora": PlanInput(modality="qlora", dtype="bf16", lora_r=16, lora_target="attention", optimizer="adamw_torch",
                       sequence_len=2048, micro_batch_size=1, gradient_checkpointing=True, flash_attention=True,
                       overhead_gb=1.0),
}
# Tolerances (relative): the full-FT column is an explicit formula over the nominal size
# (7B x 8 bytes), so only the nominal-vs-real parameter count differs (6.74B for "7B": 4%).
# The PEFT columns are "~" values rounded to 1-2 significant figures whose activation settings
# are not stated; activations are 10-40% of a PEFT total, so 20% is what the table can promise.
SEED_TOLERANCE = {"full": 0.05, "lora": 0.20, "qlora": 0.20}


@dataclass
class SeedRow:
    model: str
    modality: str
    table_gb: float
    planner_gb: float
    within: bool
    note: str

    @property
    def rel_diff(self) -> float:
        return (self.planner_gb - self.table_gb) / self.table_gb


def compare_with_seed_table() -> list[SeedRow]:
    rows: list[SeedRow] = []
    for model, cols in SEED_TABLE.items():
        shape = resolve_shape(model)
        for modality, table_gb in cols.items():
            est = estimate(shape, SEED_ASSUMPTIONS[modality])
            rel = (est.total_gb - table_gb) / table_gb
            within = abs(rel) <= SEED_TOLERANCE[modality]
            note = ""
            nominal = float(model.split("-")[1].rstrip("b"))
            if modality == "full":
                note = (f"table uses the nominal {nominal:g}B x 8 bytes; the architecture has "
                        f"{shape.total_params / 1e9:.2f}B parameters")
            elif not within:
                weights_gb = est.parts["weights"] / GB
                if modality == "lora" and weights_gb > table_gb:
                    note = (f"differs: the table's {table_gb:g} GB is less than the bf16 base weights alone "
                            f"({weights_gb:.1f} GB for {shape.total_params / 1e9:.1f}B params), so it cannot hold "
                            "under its stated BF16 assumption")
                else:
                    def fixed(e: Estimate) -> float:
                        return sum(e.parts[k] for k in ("weights", "adapters", "gradients", "optimizer")) / GB

                    room = table_gb - fixed(est)
                    big = max(SEED_TABLE, key=lambda m: SEED_TABLE[m][modality])
                    big_est = estimate(resolve_shape(big), SEED_ASSUMPTIONS[modality])
                    big_room = SEED_TABLE[big][modality] - fixed(big_est)
                    note = (f"differs: table {table_gb:g} GB vs {est.total_gb:.1f} GB ({est.breakdown()}). The table "
                            f"leaves {room:.1f} GB beyond weights and adapter state here but {big_room:.1f} GB for "
                            f"{big}, whose activations are larger; no one sequence length / batch (unstated in the "
                            f"table) fits both; we assume {SEED_ASSUMPTIONS[modality].sequence_len} tokens x "
                            f"{SEED_ASSUMPTIONS[modality].micro_batch_size}")
            else:
                note = f"{est.breakdown()}"
            rows.append(SeedRow(model, modality, table_gb, round(est.total_gb, 2), within, note))
    return rows
