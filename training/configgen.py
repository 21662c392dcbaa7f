"""Axolotl configs from a recipe's `training` section: full / LoRA / QLoRA, sweeps, multi-GPU.

Defaults follow the seeds: LoRA r=16 with `lora_alpha` = 4 x r (the DSS paper's best ratio),
dropout 0.05, all linear layers (or the attention projections), LR 2e-5 full / 2e-4 LoRA-QLoRA,
cosine schedule with 10% warmup, epochs by data size (3 under 1,000 examples, 2 under 10,000,
else 1), QLoRA as NF4 with double quantisation, gradient checkpointing, sample packing when the
examples are much shorter than `sequence_len`, a checkpoint every `training.save_every_steps`
steps (the last `save_total_limit` kept; `stepwise train` resumes from them). Modality `auto`
writes every modality and the planner (`stepwise.training.vram`) marks the one the paper's rule picks:
full if it fits the GPU, else LoRA, else QLoRA.

Data: the run's `export/train.chat.jsonl` and `val.chat.jsonl` (OpenAI chat rows) as Axolotl
`type: chat_template` datasets. With `use_data=False` (the committed example configs) nothing is
read: paths point at the recipe's latest run (`<runs_dir>/<recipe>/latest/export/...`), the
header says the data is not yet generated, and data-dependent values come from the recipe or
documented defaults, so the output is the same on every machine. Paths are written relative to
`relative_to` (the directory Axolotl is launched from) when they lie under it.

The configs keep GPU settings (bf16, tf32, flash attention, sample packing, paged 8-bit AdamW for
QLoRA); the CPU profile (`apply_cpu_profile`) is applied by `training.profile: cpu` or
`stepwise train --cpu`.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepwise.training.common import dump_yaml
from stepwise.training.shapes import ModelShape, resolve_shape
from stepwise.training.tracking import axolotl_keys
from stepwise.training.vram import MODALITIES, Estimate, PlanInput, choose_modality, estimate

from stepwise.io import iter_jsonl, sha256_file
from stepwise.layout import RunLayout
from stepwise.models import KNOWN_MODELS, known_name
from stepwise.recipe import Recipe, TrainingSpec

DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
DEFAULT_WEIGHT_DECAY = {"full": 0.01, "lora": 0.0, "qlora": 0.0}
DEFAULT_OPTIMIZER = {"full": "adamw_torch_fused", "lora": "adamw_torch_fused", "qlora": "paged_adamw_8bit"}
DEFAULT_SEQUENCE_LEN = 1024  # when the data is not read
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Special tokens of known models whose local (GGUF-converted) tokenizer may disagree with the hub's.
KNOWN_SPECIAL_TOKENS = {"smollm2-135m-instruct": {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}}

CPU_OVERRIDES: dict[str, Any] = {
    "bf16": False, "fp16": False, "tf32": False, "attn_implementation": "sdpa",
    "sample_packing": False, "eval_sample_packing": False, "pad_to_sequence_len": False,
    # all four: Axolotl auto-enables any it finds unset (the embedding one is plain autograd, but
    # off is what the CPU profile promises, and it silences Axolotl's "Auto-enabling" warning)
    "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False, "lora_embedding_kernel": False,
    # Worker processes re-import torch/axolotl (tens of seconds each on a small CPU box) for a few rows.
    "dataloader_num_workers": 0, "dataloader_pin_memory": False, "dataset_num_proc": 1,
}


# `training.unsloth`: Axolotl 0.19 removed the `unsloth_*` keys (its schema rejects them: "use
# lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel instead"); its Unsloth integration is now the
# Unsloth-derived fused LoRA kernels below plus `activation_offloading: legacy`, Axolotl's copy of
# Unsloth's CPU-offloaded gradient checkpointing (monkeypatch/gradient_checkpointing/offload_cpu.py).
UNSLOTH_KEYS: dict[str, Any] = {"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True}


def epochs_for(n_examples: int | None) -> int:
    """The seeds' rule: 1-3 epochs under 1,000 examples (small data needs the passes)."""
    if n_examples is None or n_examples < 1000:
        return 3
    return 2 if n_examples < 10000 else 1


def hub_or_path(base_model: str) -> str:
    key = known_name(base_model)
    return KNOWN_MODELS[key]["hf_name"] if key else base_model


def zero_stage(spec: TrainingSpec) -> int:
    if spec.fsdp or spec.deepspeed == "zero3":
        return 3
    return 2 if spec.deepspeed == "zero2" else 0


def deepspeed_config(stage: int) -> dict[str, Any]:
    """Inline DeepSpeed config (Axolotl accepts a dict), as Axolotl's own zero2/zero3 JSONs."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({"sub_group_size": 0, "stage3_prefetch_bucket_size": "auto",
                     "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 0,
                     "stage3_max_reuse_distance": 0, "stage3_gather_16bit_weights_on_model_save": True})
    else:
        zero.update({"allgather_partitions": True, "allgather_bucket_size": 5e8, "reduce_scatter": True})
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "auto_cast": False, "loss_scale": 0, "initial_scale_power": 32,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


def fsdp_settings(shape: ModelShape | None) -> dict[str, Any]:
    layer_cls = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}
    cls = layer_cls.get(shape.model_type if shape else "llama", "LlamaDecoderLayer")
    return {
        "fsdp_version": 2,
        "fsdp_config": {
            "offload_params": False,
            "cpu_ram_efficient_loading": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": cls,
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True,
        },
    }


def apply_cpu_profile(cfg: dict[str, Any], local_model_dir: str | None = None) -> dict[str, Any]:
    """The CPU overrides: no bf16/fp16/tf32, no flash attention or packing, no fused LoRA kernels,
    no paged/8-bit optimizers (they need CUDA), no DeepSpeed/FSDP, no dataloader/dataset worker
    processes, the local model dir (offline)."""
    out = dict(cfg)
    out.update(CPU_OVERRIDES)
    out.pop("flash_attention", None)
    if "paged" in str(out.get("optimizer", "")) or "8bit" in str(out.get("optimizer", "")) or \
            "fused" in str(out.get("optimizer", "")):
        out["optimizer"] = "adamw_torch"
    for key in ("deepspeed", "fsdp", "fsdp_config", "fsdp_version", "activation_offloading"):
        out.pop(key, None)
    if local_model_dir:
        out["base_model"] = local_model_dir
    return out


# --------------------------------------------------------------------------------------------


@dataclass
class DataInfo:
    train: Path
    val: Path
    train_rows: int | None = None
    val_rows: int | None = None
    train_sha256: str | None = None
    val_sha256: str | None = None
    max_tokens: int | None = None
    mean_tokens: float | None = None

    @property
    def present(self) -> bool:
        return self.train_rows is not None

    @property
    def val_empty(self) -> bool:
        """The export ran and left no validation rows (tiny data): train without an eval set, since
        Axolotl and TRL both stop on an empty dataset."""
        return self.present and not self.val_rows

    @property
    def val_note(self) -> str:
        return (f"No validation rows in {self.val.name} (the val split is empty): no eval set, no eval loss; "
                "add rows or raise curation's val fraction to get one")


@dataclass
class GeneratedConfig:
    name: str
    modality: str
    config: dict[str, Any]
    header: list[str]
    estimate: Estimate | None
    auto_pick: str | None = None
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        body = dump_yaml(self.config)
        return "".join(f"# {line}".rstrip() + "\n" for line in self.header) + "\n" + body


def _token_lengths(model_dir: Path, paths: list[Path]) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    lengths = []
    for p in paths:
        for _, row in iter_jsonl(p):
            ids = tok.apply_chat_template(row["messages"], tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            lengths.append(len(ids))
    return lengths


def inspect_data(train: Path, val: Path, base_model: str, use_data: bool) -> DataInfo:
    info = DataInfo(train=train, val=val)
    if not use_data or not train.exists():
        return info
    info.train_rows = sum(1 for _ in iter_jsonl(train))
    info.train_sha256 = sha256_file(train)
    if val.exists():
        info.val_rows = sum(1 for _ in iter_jsonl(val))
        info.val_sha256 = sha256_file(val)
    try:
        from stepwise.models import resolve_model_dir

        model_dir = resolve_model_dir(base_model)
        lengths = _token_lengths(model_dir, [p for p in (train, val) if p.exists()])
    except (FileNotFoundError, OSError, ValueError):
        lengths = []
    if lengths:
        info.max_tokens = max(lengths)
        info.mean_tokens = sum(lengths) / len(lengths)
    return info


def fit_batch_to_data(recipe: Recipe, data: DataInfo) -> tuple[Recipe, str | None]:
    """Lower the default batch when the training file has fewer examples than one optimizer step
    takes (tiny data: a weak teacher, a first try), so the generated config trains instead of
    failing our check. A value the recipe sets is kept (the check then says what to change)."""
    spec = recipe.training
    rows, gpus = data.train_rows, max(1, spec.num_gpus)
    micro, accum = spec.micro_batch_size, spec.gradient_accumulation_steps
    if not rows or micro * accum * gpus <= rows:
        return recipe, None
    pinned = spec.model_fields_set
    if "gradient_accumulation_steps" not in pinned:
        accum = max(1, rows // (micro * gpus))
    if micro * accum * gpus > rows and "micro_batch_size" not in pinned:
        micro = max(1, rows // (accum * gpus))  # accum is 1 here unless the recipe set it
    if (micro, accum) == (spec.micro_batch_size, spec.gradient_accumulation_steps):
        return recipe, None
    why = (f"micro_batch_size x gradient_accumulation_steps {spec.micro_batch_size} x "
           f"{spec.gradient_accumulation_steps} -> {micro} x {accum}: the training file has only {rows} examples "
           "(set both in the recipe to pin them)")
    fitted = spec.model_copy(update={"micro_batch_size": micro, "gradient_accumulation_steps": accum})
    return recipe.model_copy(update={"training": fitted}), why


def sequence_len_for(spec: TrainingSpec, data: DataInfo, shape: ModelShape | None) -> tuple[int, str]:
    if spec.sequence_len:
        return spec.sequence_len, "recipe"
    if data.max_tokens:
        n = max(256, int(math.ceil(data.max_tokens / 256.0)) * 256)
        if shape:
            n = min(n, shape.max_position_embeddings)
        return n, f"longest example {data.max_tokens} tokens, rounded up to a multiple of 256"
    return DEFAULT_SEQUENCE_LEN, f"default {DEFAULT_SEQUENCE_LEN} (data not read; set training.sequence_len)"


def _rel(path: Path, base: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path(os.path.abspath(base))))
    except ValueError:
        return str(path)


def _fmt_lr(lr: float) -> str:
    mant, exp = f"{lr:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def _fmt_num(x: float) -> str:
    return f"{x:g}"


@dataclass
class Point:
    modality: str
    lora_r: int
    alpha_ratio: float
    learning_rate: float
    tags: list[str]


def sweep_points(spec: TrainingSpec) -> list[Point]:
    """The grid: one point per combination; full-precision points ignore rank and alpha."""
    sw = spec.sweep
    if sw.modality:
        modalities = list(sw.modality)
    elif spec.modality != "auto":
        modalities = [spec.modality]
    else:
        modalities = list(MODALITIES)
    ranks = sw.lora_r or [spec.lora_r]
    ratios = sw.alpha_ratio or [spec.effective_lora_alpha / spec.lora_r]
    points: list[Point] = []
    seen: set[tuple] = set()
    for m in modalities:
        lrs = sw.learning_rate or [spec.learning_rate or DEFAULT_LR[m]]
        for r, ratio, lr in itertools.product(ranks, ratios, lrs):
            if m == "full":
                r, ratio = spec.lora_r, ratios[0]
            key = (m, r, ratio, lr)
            if key in seen:
                continue
            seen.add(key)
            tags = [m]
            if m != "full" and sw.lora_r:
                tags.append(f"r{r}")
            if m != "full" and sw.alpha_ratio:
                tags.append(f"a{_fmt_num(ratio)}")
            if sw.learning_rate:
                tags.append(f"lr{_fmt_lr(lr)}")
            points.append(Point(m, r, ratio, lr, tags))
    return points


def plan_input(spec: TrainingSpec, modality: str, r: int, seq: int, optimizer: str) -> PlanInput:
    return PlanInput(
        modality=modality, dtype="bf16", lora_r=r, lora_target=spec.lora_target, lora_dropout=spec.lora_dropout,
        optimizer=optimizer, sequence_len=seq, micro_batch_size=spec.micro_batch_size,
        gradient_checkpointing=spec.gradient_checkpointing, flash_attention=True,
        zero_stage=zero_stage(spec), num_gpus=spec.num_gpus, unsloth=spec.unsloth,  # type: ignore[arg-type]
    )


def run_path_for(recipe: Recipe, run_dir: Path | None) -> Path:
    """The run whose export the configs train on: `run_dir`, else the recipe's latest run."""
    return Path(run_dir) if run_dir else recipe.resolve(recipe.runs_dir) / recipe.name / "latest"  # type: ignore[operator]


def generate_axolotl_configs(
    recipe: Recipe,
    *,
    run_dir: Path | None = None,
    use_data: bool = True,
    relative_to: Path | None = None,
    recipe_label: str | None = None,
) -> list[GeneratedConfig]:
    """The SFT configs of `training.backend: axolotl` (the DPO ones: stepwise.training.dpo; both
    through stepwise.training.backends.generate_configs)."""
    spec = recipe.training
    base = Path(relative_to or Path.cwd())
    run_path = run_path_for(recipe, run_dir)
    train_path, val_path = RunLayout(run_path).chat("train"), RunLayout(run_path).chat("val")
    data = inspect_data(train_path, val_path, spec.base_model, use_data)
    recipe, batch_why = fit_batch_to_data(recipe, data)
    spec = recipe.training
    try:
        shape: ModelShape | None = resolve_shape(spec.base_model)
    except (ValueError, FileNotFoundError):
        shape = None
    seq, seq_why = sequence_len_for(spec, data, shape)
    epochs = spec.num_epochs or epochs_for(data.train_rows)
    epochs_why = "recipe" if spec.num_epochs else (
        f"{data.train_rows} training examples" if data.present else "data not read: the small-data default")
    if spec.sample_packing is not None:
        packing, packing_why = spec.sample_packing, "recipe"
    elif data.mean_tokens:
        packing = data.mean_tokens < 0.5 * seq
        packing_why = f"mean example {data.mean_tokens:.0f} tokens vs sequence_len {seq}"
    else:
        packing, packing_why = True, "chat examples are usually much shorter than sequence_len"

    estimates = {}
    auto_pick, auto_why = None, ""
    if shape is not None:
        estimates = {m: estimate(shape, plan_input(spec, m, spec.lora_r, seq, spec.optimizer or DEFAULT_OPTIMIZER[m]))
                     for m in MODALITIES}
        auto_pick, auto_why = choose_modality(estimates, spec.gpu_memory_gb)

    recipe_label = recipe_label or (_rel(recipe.source_path, base) if recipe.source_path else recipe.name)
    out: list[GeneratedConfig] = []
    for pt in sweep_points(spec):
        name = "-".join([recipe.name, *pt.tags])
        optimizer = spec.optimizer or DEFAULT_OPTIMIZER[pt.modality]
        cfg = _config_dict(recipe, pt, name, seq, epochs, packing, optimizer, shape, _rel(train_path, base),
                           None if data.val_empty else _rel(val_path, base), _rel(run_path / "train", base))
        est = estimate(shape, plan_input(spec, pt.modality, pt.lora_r, seq, optimizer)) if shape else None
        header = _header(recipe_label, name, pt.modality, data, base, est, spec, auto_pick, auto_why,
                         seq_why, epochs_why, packing_why, _rel(run_path, base), batch_why)
        gc = GeneratedConfig(name=name, modality=pt.modality, config=cfg, header=header, estimate=est, auto_pick=auto_pick)
        if spec.unsloth and pt.modality != "full":
            gc.header.append(_unsloth_header(shape, est))
        if spec.profile == "cpu":
            from stepwise.models import resolve_model_dir

            local = str(resolve_model_dir(spec.base_model)) if known_name(spec.base_model) else None
            gc.config = apply_cpu_profile(cfg, local)
            gc.header.append("Profile: cpu (bf16/tf32/flash attention/packing/fused kernels off; local model dir)")
        out.append(gc)
    return out


def _config_dict(recipe: Recipe, pt: Point, name: str, seq: int, epochs: float, packing: bool, optimizer: str,
                 shape: ModelShape | None, train: str, val: str | None, train_root: str) -> dict[str, Any]:
    spec = recipe.training
    ds = {"path": train, "ds_type": "json", "type": "chat_template", "field_messages": "messages",
          "message_property_mappings": {"role": "role", "content": "content"},
          "roles_to_train": ["assistant"], "train_on_eos": "turn"}
    cfg: dict[str, Any] = {"base_model": hub_or_path(spec.base_model)}
    cfg["chat_template"] = "tokenizer_default_fallback_chatml"
    key = known_name(spec.base_model)
    if key in KNOWN_SPECIAL_TOKENS:
        cfg["special_tokens"] = dict(KNOWN_SPECIAL_TOKENS[key])
    cfg["datasets"] = [ds]
    if val is not None:
        cfg["test_datasets"] = [{**ds, "path": val, "split": "train"}]
    cfg["val_set_size"] = 0.0
    cfg["dataset_prepared_path"] = f"{train_root}/prepared"
    cfg["output_dir"] = f"{train_root}/{name}"
    if pt.modality != "full":
        cfg["adapter"] = "qlora" if pt.modality == "qlora" else "lora"
        if pt.modality == "qlora":
            cfg["load_in_4bit"] = True
            cfg["bnb_config_kwargs"] = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
        cfg["lora_r"] = pt.lora_r
        alpha = pt.alpha_ratio * pt.lora_r
        cfg["lora_alpha"] = int(alpha) if float(alpha).is_integer() else alpha
        cfg["lora_dropout"] = spec.lora_dropout
        if spec.lora_target == "linear":
            cfg["lora_target_linear"] = True
        else:
            cfg["lora_target_modules"] = list(ATTENTION_TARGETS)
    cfg["sequence_len"] = seq
    cfg["sample_packing"] = packing
    if val is not None:
        cfg["eval_sample_packing"] = packing
    cfg["pad_to_sequence_len"] = packing
    cfg["micro_batch_size"] = spec.micro_batch_size
    cfg["gradient_accumulation_steps"] = spec.gradient_accumulation_steps
    cfg["num_epochs"] = int(epochs) if float(epochs).is_integer() else epochs
    if spec.max_steps:
        cfg["max_steps"] = spec.max_steps
    cfg["learning_rate"] = pt.learning_rate
    cfg["lr_scheduler"] = "cosine"
    cfg["warmup_ratio"] = 0.1
    wd = spec.weight_decay if spec.weight_decay is not None else DEFAULT_WEIGHT_DECAY[pt.modality]
    cfg["weight_decay"] = wd
    cfg["optimizer"] = optimizer
    cfg["bf16"] = "auto"
    cfg["tf32"] = True
    cfg["attn_implementation"] = "flash_attention_2"
    cfg["gradient_checkpointing"] = spec.gradient_checkpointing
    if spec.unsloth and pt.modality != "full":
        cfg.update(UNSLOTH_KEYS)
        if spec.gradient_checkpointing:  # Unsloth's offloaded checkpointing needs checkpointing on
            cfg["activation_offloading"] = "legacy"
    cfg["logging_steps"] = 1
    cfg.update(axolotl_keys(spec.tracking, name))  # training.tracking: Axolotl's own mlflow_*/wandb_* keys
    if val is not None:
        cfg["evals_per_epoch"] = 4
    # A bounded interval, not once per epoch: a killed run loses at most save_every_steps steps
    # (`stepwise train` resumes from the last complete checkpoint); HF also saves at the end, and
    # that checkpoint's trainer_state.json is the run's loss record.
    cfg["save_strategy"] = "steps"
    cfg["save_steps"] = spec.save_every_steps
    cfg["save_total_limit"] = spec.save_total_limit
    if spec.deepspeed:
        cfg["deepspeed"] = deepspeed_config(3 if spec.deepspeed == "zero3" else 2)
    elif spec.fsdp:
        cfg.update(fsdp_settings(shape))
    return cfg


def _header(recipe_label: str, name: str, modality: str, data: DataInfo, base: Path, est: Estimate | None,
            spec: TrainingSpec, auto_pick: str | None, auto_why: str, seq_why: str, epochs_why: str,
            packing_why: str, run_label: str, batch_why: str | None = None) -> list[str]:
    from stepwise.training import __version__

    lines = [
        f"{name}.yaml: Axolotl config generated by stepwise {__version__} from {recipe_label} ({modality}).",
        "Do not edit by hand: change the recipe's `training` section and run `stepwise configs` again.",
        "Launch (from the directory these paths are relative to, the repository root for the bundled examples):",
        f"  stepwise train <this file> --run-dir {run_label}        (preprocess + train, logs and loss.csv in the run)",
        "  or: axolotl preprocess <this file> && axolotl train <this file>",
        "  several GPUs: stepwise train <this file> --num-gpus N   (accelerate launch of `axolotl train`)",
        f"Checkpoints every {spec.save_every_steps} steps (training.save_every_steps), the last "
        f"{spec.save_total_limit} kept; `stepwise train` resumes a killed run from the last complete one",
        "Data (OpenAI chat JSONL written by `stepwise export`):",
    ]
    for label, path, rows, digest in (("train", data.train, data.train_rows, data.train_sha256),
                                      ("val", data.val, data.val_rows, data.val_sha256)):
        if digest:
            lines.append(f"  {label}: {_rel(path, base)}  rows {rows}  sha256 {digest}")
        else:
            lines.append(f"  {label}: {_rel(path, base)}  sha256 not yet generated "
                         "(`stepwise train` hashes it into the run manifest)")
    if data.val_empty:
        lines.append(data.val_note)
    lines.append(f"sequence_len: {seq_why}; num_epochs: {epochs_why}; sample_packing: {packing_why}")
    if batch_why:
        lines.append(f"Batch: {batch_why}")
    if est is not None:
        gpus = f"{spec.num_gpus} x {spec.gpu_memory_gb:g} GB" if spec.num_gpus > 1 else f"{spec.gpu_memory_gb:g} GB"
        verdict = "fits" if est.fits(spec.gpu_memory_gb) else "DOES NOT FIT"
        lines.append(f"Planner: peak ~{est.total_gb:.2f} GB per GPU ({est.breakdown()} GB); {verdict} {gpus}")
        if auto_pick:
            mark = "this config" if auto_pick == modality else f"not this one ({modality})"
            lines.append(f"modality auto picks {auto_pick} for {gpus}: {auto_why} -> {mark}")
    else:
        lines.append("Planner: model config not available offline; no memory estimate")
    return lines


def _unsloth_header(shape: ModelShape | None, est: Estimate | None) -> str:
    line = ("Unsloth (training.unsloth): fused LoRA kernels (lora_mlp/qkv/o_kernel) + Unsloth's offloaded gradient "
            "checkpointing (activation_offloading: legacy); GPU only")
    if shape is not None and est is not None:
        from stepwise.training.vram import offloaded_bytes

        line += f"; planner: {offloaded_bytes(shape, est.plan) / 1e9:.2f} GB of layer inputs held in CPU RAM"
    return line


def write_configs(configs: list[GeneratedConfig], out_dir: Path) -> list[Path]:
    from stepwise.io import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for gc in configs:
        p = out_dir / f"{gc.name}.yaml"
        atomic_write_text(p, gc.text())
        paths.append(p)
    return paths
