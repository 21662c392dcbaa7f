"""`training.backend: trl`: IA3, prefix tuning, prompt tuning (and LoRA) with TRL's SFTTrainer + peft.

Seed 002's table names PEFT methods Axolotl does not offer (its `adapter:` is lora/qlora/llama-
adapter). TRL and peft have them, but nothing turns our exported chat data into a run with the same
outputs as the Axolotl launcher, so this module does:

- Config: `stepwise configs` writes one YAML per method (`backend: trl`, checked strictly by
  `TRLRunConfig`, extra keys are errors) from the recipe's `training` section; `stepwise train`
  (and `stepwise run`) dispatch on its `backend` key.
- Data: the same `export/{train,val}.chat.jsonl`. Each row becomes TRL's conversational
  prompt-completion form (prompt = every message before the last, completion = the last,
  assistant, message), so SFTTrainer's `completion_only_loss` puts the loss on the assistant
  tokens only. TRL's `assistant_only_loss` is not used: it needs `{% generation %}` markers in the
  chat template, which SmolLM2's template (like most) lacks.
- Methods (peft 0.20): `IA3Config` (peft's per-architecture defaults: keys, values and the FFN
  down projection for llama), `PromptTuningConfig` (initialised from the task's instructions
  text, peft's TEXT init), `PrefixTuningConfig`, `LoraConfig` (r, 4 x r alpha, linear or attention
  targets, as the Axolotl configs). `num_virtual_tokens` from the recipe.
- Prefix tuning needs `gradient_checkpointing: false`: peft passes the prefix as
  `past_key_values`, and transformers 5's `GradientCheckpointingLayer` drops `past_key_values`
  while training under checkpointing, so attention then sees the prefix in the mask but not in
  the keys: `RuntimeError: The size of tensor a (39) must match the size of tensor b (47) at
  non-singleton dimension 3` (39 tokens + 8 virtual). The generator turns checkpointing off for
  prefix tuning and the check rejects it on.
- Outputs, as the Axolotl launcher's: `<run>/train/<config>/` with the resolved `trl.yaml`,
  `train.log`, `loss.csv` (same columns, read from the trainer's `trainer_state.json`, which the
  child saves with `Trainer.save_state`), the peft adapter, `summary.json` (wall time, trainable
  and total parameters, peak memory: CUDA max allocated on a GPU, the process's peak RSS on CPU),
  and the manifest's `train` stage. Training runs in a child process, so peak memory is that run's
  alone and a crash cannot take the CLI with it.
- Checkpoints every `save_steps` (the recipe's `training.save_every_steps`), `save_total_limit`
  kept; the same config resumes from its last complete checkpoint after a kill (TRL's
  `resume_from_checkpoint`), a changed one moves the earlier output aside (stepwise.training.checkpoints).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from stepwise.training.checkpoints import config_identity, prepare_output_dir
from stepwise.training.checks import check_chat_rows, local_model_config_dir
from stepwise.training.common import (
    CheckReport,
    Problem,
    TrainError,
    TrainResult,
    dump_yaml,
    finish,
    trainer_env,
)
from stepwise.training.configgen import (
    DEFAULT_SEQUENCE_LEN,
    GeneratedConfig,
    _rel,
    epochs_for,
    fit_batch_to_data,
    inspect_data,
    sequence_len_for,
)
from stepwise.training.shapes import resolve_shape
from stepwise.training.tracking import trl_env, trl_report_to

from stepwise.io import atomic_write_text, iter_jsonl
from stepwise.layout import RunLayout
from stepwise.recipe import TrainingSpec, _line_for
from stepwise.rundir import RunDir

TRL_MODALITIES = ("lora", "ia3", "prefix_tuning", "prompt_tuning")
# Soft prompts and scaling vectors have few parameters and need larger steps than LoRA's 2e-4.
DEFAULT_TRL_LR = {"lora": 2e-4, "ia3": 3e-3, "prefix_tuning": 1e-2, "prompt_tuning": 3e-2}
RESULT_FILE = "trl_result.json"


class TRLRunConfig(BaseModel):
    """A TRL/peft training run; `stepwise configs` writes it, `stepwise train` runs it."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["trl"] = "trl"
    base_model: str = Field(description="Known name or local HF model dir.")
    modality: Literal["lora", "ia3", "prefix_tuning", "prompt_tuning"]
    num_virtual_tokens: int = Field(20, ge=1, le=1024)
    prompt_tuning_init_text: str | None = Field(None, description="Prompt tuning: initialise from this text.")
    # defaults and bounds are the recipe's (TrainingSpec), the one source of them
    lora_r: int = TrainingSpec.model_fields["lora_r"]
    lora_alpha: int = Field(TrainingSpec().effective_lora_alpha, ge=1)
    lora_dropout: float = TrainingSpec.model_fields["lora_dropout"]
    lora_target: Literal["linear", "attention"] = TrainingSpec.model_fields["lora_target"].default
    learning_rate: float = Field(gt=0, le=1.0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0.0, le=0.5)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    num_epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    sequence_len: int = Field(1024, ge=32)
    gradient_checkpointing: bool = True
    bf16: bool | Literal["auto"] = "auto"
    seed: int = 42
    save_steps: int = Field(200, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    resume_from_checkpoint: str | None = Field(None, description="Set by `stepwise train`: the checkpoint it resumes.")
    # training.tracking (stepwise.training.tracking): transformers' `report_to` and the environment its callback reads
    report_to: list[Literal["mlflow", "wandb"]] | None = None
    tracking_env: dict[str, str] | None = None
    run_name: str | None = None
    train_file: str
    val_file: str | None = None
    output_dir: str

    @model_validator(mode="after")
    def _prefix_without_checkpointing(self) -> TRLRunConfig:
        if self.modality == "prefix_tuning" and self.gradient_checkpointing:
            raise ValueError("prefix_tuning needs gradient_checkpointing: false (transformers drops the prefix's "
                             "past_key_values under checkpointing)")
        return self


# --------------------------------------------------------------------------------------------
# Config generation (stepwise configs)


def generate_trl_configs(recipe: Any, *, run_dir: Path | None, use_data: bool, relative_to: Path) -> list[Any]:
    """GeneratedConfig(s) for `backend: trl`: the recipe's modality (`auto` = lora)."""
    spec = recipe.training
    modality = "lora" if spec.modality == "auto" else spec.modality
    if modality not in TRL_MODALITIES:
        raise ValueError(f"training.backend trl trains {', '.join(TRL_MODALITIES)}; `{modality}` is Axolotl's "
                         "(set `backend: axolotl`)")
    base = Path(relative_to)
    run_path = Path(run_dir) if run_dir else recipe.resolve(recipe.runs_dir) / recipe.name / "latest"
    train_path, val_path = RunLayout(run_path).chat("train"), RunLayout(run_path).chat("val")
    data = inspect_data(train_path, val_path, spec.base_model, use_data)
    recipe, batch_why = fit_batch_to_data(recipe, data)
    spec = recipe.training
    try:
        shape = resolve_shape(spec.base_model)
    except (ValueError, FileNotFoundError):
        shape = None
    seq, seq_why = sequence_len_for(spec, data, shape)
    if modality in ("prefix_tuning", "prompt_tuning") and seq == DEFAULT_SEQUENCE_LEN:
        seq_why += "; virtual tokens come on top"
    name = f"{recipe.name}-{modality}"
    cfg = TRLRunConfig(
        base_model=spec.base_model, modality=modality, num_virtual_tokens=spec.num_virtual_tokens,
        prompt_tuning_init_text=recipe.task.instructions.strip() if modality == "prompt_tuning" else None,
        lora_r=spec.lora_r, lora_alpha=spec.effective_lora_alpha, lora_dropout=spec.lora_dropout,
        lora_target=spec.lora_target, learning_rate=spec.learning_rate or DEFAULT_TRL_LR[modality],
        weight_decay=spec.weight_decay or 0.0, num_epochs=spec.num_epochs or epochs_for(data.train_rows),
        max_steps=spec.max_steps, micro_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, sequence_len=seq,
        gradient_checkpointing=spec.gradient_checkpointing and modality != "prefix_tuning",
        bf16=False if spec.profile == "cpu" else "auto", save_steps=spec.save_every_steps,
        save_total_limit=spec.save_total_limit, report_to=trl_report_to(spec.tracking) or None,
        tracking_env=trl_env(spec.tracking) or None, run_name=name if spec.tracking.mlflow or spec.tracking.wandb else None,
        train_file=_rel(train_path, base), val_file=None if data.val_empty else _rel(val_path, base),
        output_dir=_rel(RunLayout(run_path).train_output(name), base),
    ).model_dump(exclude_none=True)
    if modality != "lora":
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target"):
            cfg.pop(key)
    if modality not in ("prefix_tuning", "prompt_tuning"):
        cfg.pop("num_virtual_tokens")
    header = [
        f"{name}.yaml: TRL + peft config generated by stepwise from the recipe ({modality}; backend: trl).",
        "Do not edit by hand: change the recipe's `training` section and run `stepwise configs` again.",
        f"Launch: stepwise train <this file> --run-dir {_rel(run_path, base)}   (add --cpu without a GPU)",
        f"Checkpoints every {spec.save_every_steps} steps (training.save_every_steps), the last "
        f"{spec.save_total_limit} kept; `stepwise train` resumes a killed run from the last complete one",
        "Loss on the assistant turn only (prompt-completion rows, TRL completion_only_loss).",
        f"sequence_len: {seq_why}; learning_rate: "
        + ("recipe" if spec.learning_rate else f"default for {modality}"),
    ]
    if batch_why:
        header.append(f"Batch: {batch_why}")
    if data.val_empty:
        header.append(data.val_note)
    if spec.dpo.enabled:
        header.append("training.dpo: DPO configs are written for backend axolotl only (Axolotl's rl: dpo)")
    if spec.modality == "prefix_tuning" and spec.gradient_checkpointing:
        header.append("gradient_checkpointing off: prefix tuning's past_key_values do not survive it in transformers 5")
    return [GeneratedConfig(name=name, modality=modality, config=cfg, header=header, estimate=None)]


# --------------------------------------------------------------------------------------------
# Checks (stepwise configs / --check / train)


def check_trl_config(cfg: dict[str, Any], label: str, index: dict[tuple[Any, ...], int], base_dir: Path,
                     allow_missing_data: bool = False) -> Any:
    """Schema (strict), data files and rows, batch vs rows, sequence length vs the model."""
    report = CheckReport(label)

    def line(loc: tuple[Any, ...]) -> int | None:
        return _line_for(index, loc) if index else None

    try:
        spec = TRLRunConfig.model_validate(cfg)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc) or "<config>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            report.problems.append(Problem("error", key, msg, line(loc[:1]) if loc else None))
        return report
    for key, value in (("train_file", spec.train_file), ("val_file", spec.val_file)):
        if value is None:
            continue
        p = Path(value).expanduser()
        p = p if p.is_absolute() else base_dir / p
        if not p.exists():
            level = "warning" if allow_missing_data else "error"
            report.problems.append(Problem(level, key, f"file not found: {value}", line((key,))))
            continue
        found, rows = check_chat_rows(p, {}, key, line((key,)))
        report.problems += found
        if key == "train_file":
            report.train_rows = rows
            bad = [i for i, (_, r) in enumerate(iter_jsonl(p), start=1)
                   if not r.get("messages") or r["messages"][-1].get("role") != "assistant"]
            if bad:
                report.problems.append(Problem("error", key, f"{p}:{bad[0]}: the last message must be the assistant's "
                                               f"(the completion the loss is on); {len(bad)} rows", line((key,))))
            per_step = spec.micro_batch_size * spec.gradient_accumulation_steps
            if rows and per_step > rows:
                report.problems.append(Problem("error", "gradient_accumulation_steps",
                                               f"{per_step} examples per optimizer step but {rows} training rows",
                                               line(("gradient_accumulation_steps",))))
    local = local_model_config_dir(spec.base_model)
    if local is None:
        report.problems.append(Problem("warning", "base_model", "model not available offline: not checked",
                                       line(("base_model",))))
    else:
        conf = json.loads((Path(local) / "config.json").read_text(encoding="utf-8"))
        max_pos = (conf.get("text_config") or conf).get("max_position_embeddings")
        extra = spec.num_virtual_tokens if spec.modality in ("prefix_tuning", "prompt_tuning") else 0
        if max_pos and spec.sequence_len + extra > max_pos:
            report.problems.append(Problem("error", "sequence_len", f"{spec.sequence_len} + {extra} virtual tokens "
                                           f"exceeds the model's {max_pos} positions", line(("sequence_len",))))
    return report


# --------------------------------------------------------------------------------------------
# Training (parent: stepwise train)


def _load(config: Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    return yaml.safe_load(Path(config).read_text(encoding="utf-8"))


def train(
    config_path: Path,
    *,
    run_dir: Path | None = None,
    cpu: bool = False,
    max_steps: int | None = None,
    base_dir: Path | None = None,
    num_gpus: int | None = None,
    on_event: Callable[[str, Any], None] | None = None,
) -> TrainResult:
    """Train one TRL config inside its run (one process: `num_gpus` above 1 is refused, not ignored)."""
    if num_gpus is not None and num_gpus > 1 and not cpu:
        raise TrainError(f"{config_path}: the trl backend trains in one process; training.num_gpus {num_gpus} "
                         "needs `backend: axolotl` (accelerate launch)")
    base_dir = base_dir or Path.cwd()
    cfg = _load(config_path)
    try:
        spec = TRLRunConfig.model_validate(cfg)
    except ValidationError as exc:
        raise TrainError(f"{config_path}: {exc}") from None
    name = Path(config_path).stem
    train_file = _abs(spec.train_file, base_dir)
    val_file = _abs(spec.val_file, base_dir) if spec.val_file else None
    run_path = Path(run_dir) if run_dir else (train_file.parent.parent if train_file.parent.name == "export" else None)
    if run_path is None:
        raise TrainError(f"{config_path}: cannot tell which run this config belongs to; pass --run-dir")
    run = RunDir(run_path)
    out_dir = run.layout.train_output(name)
    resolved = spec.model_dump(exclude_none=True)
    resolved.update(train_file=str(train_file), output_dir=str(out_dir.resolve()),
                    base_model=local_model_config_dir(spec.base_model) or spec.base_model)
    if val_file is not None:
        resolved["val_file"] = str(val_file)
    if cpu:
        resolved["bf16"] = False
    if max_steps:
        resolved["max_steps"] = max_steps
    data_files = [p for p in (train_file, val_file) if p is not None and p.exists()]
    identity, payload = config_identity(resolved, data_files)
    plan = prepare_output_dir(run, name, identity, payload, stage="train", source=Path(config_path))
    resolved.pop("resume_from_checkpoint", None)
    if plan.resume_from is not None:
        resolved["resume_from_checkpoint"] = str(plan.resume_from.resolve())
    resolved_path = out_dir / "trl.yaml"
    atomic_write_text(resolved_path, f"# Resolved by `stepwise train` from {config_path}{' (cpu)' if cpu else ''}\n"
                      + dump_yaml(resolved))
    for stale in (out_dir / RESULT_FILE, out_dir / "loss.csv"):
        stale.unlink(missing_ok=True)

    env = trainer_env(wandb="wandb" in (spec.report_to or []))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-c", "import sys; from stepwise.training.trl_backend import child_main; child_main(sys.argv[1])",
           str(resolved_path)]
    # No PYTHONPATH: the child is this interpreter, where `stepwise` is installed (its folders are
    # mapped into the package, so the repository root on the path would add nothing but stray names).
    emit = on_event or (lambda kind, payload: None)
    for line in plan.describe():
        emit("note", line)
    result = TrainResult(name=name, out_dir=out_dir, config_path=resolved_path, resumed_from_step=plan.resume_step,
                         moved_aside=plan.moved_aside)
    started = time.time()
    with run.stage("train", inputs=[*data_files, Path(config_path)],
                   params={"config": name, "cpu": cpu, "max_steps": max_steps, "backend": "trl"}) as st:
        emit("phase", f"train (trl, {spec.modality}; log: {out_dir / 'train.log'})")
        with (out_dir / "train.log").open("w", encoding="utf-8") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                    bufsize=1, errors="replace")
            assert proc.stdout is not None
            for raw in proc.stdout:
                for text in raw.replace("\r", "\n").splitlines():
                    if text.strip():
                        log.write(text + "\n")
                        log.flush()
                        emit("log", text)
            rc = proc.wait()
        if rc != 0:
            raise TrainError(f"trl train failed (exit {rc}); see {out_dir / 'train.log'}")
        res = json.loads((out_dir / RESULT_FILE).read_text(encoding="utf-8"))
        result.wall_s = round(time.time() - started, 2)
        facts = {"backend": "trl", "modality": spec.modality, "trainable_params": res["trainable_params"],
                 "total_params": res["total_params"], "peak_memory_mb": res["peak_memory_mb"],
                 "peak_memory_kind": res["peak_memory_kind"], "learning_rate": spec.learning_rate,
                 "lora_r": spec.lora_r if spec.modality == "lora" else None,
                 "num_virtual_tokens": spec.num_virtual_tokens if spec.modality in ("prefix_tuning", "prompt_tuning")
                 else None}
        finish(result, st, extra={**facts, "cpu": cpu}, emit=emit, skip_outputs=(RESULT_FILE,), summary_extra=facts)
    return result


def _abs(value: str, base_dir: Path) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base_dir / p).resolve()


# --------------------------------------------------------------------------------------------
# Training (child process)


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """A chat row as TRL's conversational prompt-completion pair (loss on the completion only)."""
    msgs = row["messages"]
    if not msgs or msgs[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's")
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]],
            "completion": [{"role": "assistant", "content": msgs[-1]["content"]}]}


def peft_config(spec: TRLRunConfig, model_dir: str) -> Any:
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    if spec.modality == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM)
    if spec.modality == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens)
    if spec.modality == "prompt_tuning":
        if spec.prompt_tuning_init_text:
            return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens,
                                      prompt_tuning_init="TEXT", prompt_tuning_init_text=spec.prompt_tuning_init_text,
                                      tokenizer_name_or_path=model_dir)
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens)
    targets: Any = "all-linear" if spec.lora_target == "linear" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=spec.lora_r, lora_alpha=spec.lora_alpha,
                      lora_dropout=spec.lora_dropout, target_modules=targets)


def build_trainer(spec: TRLRunConfig) -> Any:
    """The SFTTrainer for a resolved config (also used by tests to inspect the collated batches)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stepwise.models import resolve_model_dir

    model_dir = str(resolve_model_dir(spec.base_model))
    from transformers import set_seed

    set_seed(spec.seed)  # SFTTrainer builds the PEFT adapter before Trainer seeds: seed its init too
    os.environ.update(spec.tracking_env or {})  # the tracker callback reads its settings from the environment
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported()) if spec.bf16 == "auto" else bool(spec.bf16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    train_rows = [to_prompt_completion(r) for _, r in iter_jsonl(Path(spec.train_file))]
    val_rows = [to_prompt_completion(r) for _, r in iter_jsonl(Path(spec.val_file))] \
        if spec.val_file and Path(spec.val_file).exists() else []
    args = SFTConfig(
        output_dir=spec.output_dir, learning_rate=spec.learning_rate, lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio, weight_decay=spec.weight_decay, num_train_epochs=spec.num_epochs,
        max_steps=spec.max_steps or -1, per_device_train_batch_size=spec.micro_batch_size,
        per_device_eval_batch_size=spec.micro_batch_size, gradient_accumulation_steps=spec.gradient_accumulation_steps,
        max_length=spec.sequence_len, gradient_checkpointing=spec.gradient_checkpointing, bf16=bf16,
        use_cpu=not cuda, seed=spec.seed, logging_steps=1, save_strategy="steps", save_steps=spec.save_steps,
        save_total_limit=spec.save_total_limit, eval_strategy="no", report_to=list(spec.report_to or []),
        run_name=spec.run_name,
        dataloader_num_workers=0, dataset_num_proc=None, completion_only_loss=True, packing=False,
        disable_tqdm=True,
    )

    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(val_rows) if val_rows else None, processing_class=tok,
                      peft_config=peft_config(spec, model_dir))


def _peak_memory_mb() -> tuple[float | None, str]:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1), "cuda_max_allocated"
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "cpu_peak_rss"


def child_main(config_path: str) -> None:
    """Run one resolved TRL config (resuming from `resume_from_checkpoint` when set); saves the
    trainer state (the loss record the parent reads), the adapter and the result file."""
    import torch

    cfg = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    spec = TRLRunConfig.model_validate(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(spec)
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%) [{spec.modality}]", flush=True)
    if spec.resume_from_checkpoint:
        print(f"resuming from {spec.resume_from_checkpoint}", flush=True)
    trainer.train(resume_from_checkpoint=spec.resume_from_checkpoint)
    if trainer.eval_dataset is not None:
        trainer.evaluate()
    trainer.save_state()  # <output_dir>/trainer_state.json: log history incl. the final eval and summary
    trainer.save_model(spec.output_dir)
    peak, kind = _peak_memory_mb()
    result = {"trainable_params": trainable, "total_params": total, "peak_memory_mb": peak, "peak_memory_kind": kind}
    Path(spec.output_dir, RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
