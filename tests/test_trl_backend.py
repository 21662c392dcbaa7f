"""`training.backend: trl`: configs, checks, the assistant-only loss mask, and real CPU runs of IA3,
prompt tuning and prefix tuning on SmolLM2-135M with the same run outputs as the Axolotl launcher,
evaluated by the eval code path (generation through the peft adapter) and described by compare."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stepwise.training.backends import check_config, generate_configs
from stepwise.training.configgen import write_configs
from stepwise.training.testing import make_run
from stepwise.training.trl_backend import TRLRunConfig, build_trainer, to_prompt_completion

TINY = """\
backend: trl
modality: {modality}
num_virtual_tokens: 8
sequence_len: 128
micro_batch_size: 2
gradient_accumulation_steps: 1
gradient_checkpointing: {gc}
lora_r: 8
"""


def _configs(tmp: Path, modality: str, gc: str = "false", n_train: int = 8):
    recipe, run_dir = make_run(tmp, TINY.format(modality=modality, gc=gc), n_train=n_train, n_val=2)
    configs = generate_configs(recipe, run_dir=run_dir, relative_to=tmp)
    paths = write_configs(configs, tmp / "configs")
    return recipe, run_dir, configs, paths


@pytest.mark.parametrize("modality", ["ia3", "prefix_tuning", "prompt_tuning", "lora"])
def test_trl_configs_generate_and_check(tmp_path, modality):
    recipe, run_dir, configs, paths = _configs(tmp_path, modality)
    [gc], [path] = configs, paths
    assert gc.name == f"tiny-train-{modality}" and gc.config["backend"] == "trl"
    cfg = gc.config
    assert cfg["modality"] == modality and cfg["train_file"] == "runs/tiny-train/r1/export/train.chat.jsonl"
    assert cfg["output_dir"] == f"runs/tiny-train/r1/train/tiny-train-{modality}"
    assert ("num_virtual_tokens" in cfg) == (modality in ("prefix_tuning", "prompt_tuning"))
    assert ("lora_r" in cfg) == (modality == "lora")
    if modality == "prompt_tuning":
        assert cfg["prompt_tuning_init_text"] == recipe.task.instructions
    report = check_config(path, base_dir=tmp_path)
    assert report.ok, report.messages()
    assert report.train_rows == 8
    TRLRunConfig.model_validate(yaml.safe_load(path.read_text()))


def test_trl_checks_are_strict(tmp_path):
    _, _, configs, _ = _configs(tmp_path, "prefix_tuning", gc="true")
    cfg = configs[0].config
    assert cfg["gradient_checkpointing"] is False  # turned off for prefix tuning
    msgs = " ".join(check_config({**cfg, "gradient_checkpointing": True}, base_dir=tmp_path).messages("error"))
    assert "past_key_values" in msgs
    msgs = " ".join(check_config({**cfg, "lora_rank": 8}, base_dir=tmp_path).messages("error"))
    assert "lora_rank: unknown key" in msgs
    msgs = " ".join(check_config({**cfg, "train_file": "nope.jsonl"}, base_dir=tmp_path).messages("error"))
    assert "file not found: nope.jsonl" in msgs
    msgs = " ".join(check_config({**cfg, "micro_batch_size": 8, "gradient_accumulation_steps": 4},
                                 base_dir=tmp_path).messages("error"))
    assert "32 examples per optimizer step but 8 training rows" in msgs
    msgs = " ".join(check_config({**cfg, "sequence_len": 8190}, base_dir=tmp_path).messages("error"))
    assert "virtual tokens exceeds the model's 8192 positions" in msgs


def test_full_and_qlora_are_axolotls(tmp_path):
    recipe, run_dir = make_run(tmp_path, "backend: trl\nmodality: qlora\n")
    with pytest.raises(ValueError, match="set `backend: axolotl`"):
        generate_configs(recipe, run_dir=run_dir, relative_to=tmp_path)


def test_loss_is_on_the_assistant_turn_only(tmp_path):
    _, run_dir, configs, _ = _configs(tmp_path, "ia3")
    cfg = {**configs[0].config, "train_file": str(tmp_path / configs[0].config["train_file"]), "val_file": None,
           "output_dir": str(tmp_path / "out")}
    trainer = build_trainer(TRLRunConfig.model_validate(cfg))
    batch = next(iter(trainer.get_train_dataloader()))
    tok = trainer.processing_class
    rows = [json.loads(x) for x in (run_dir / "export" / "train.chat.jsonl").read_text().splitlines()]
    for i in range(batch["input_ids"].shape[0]):
        labels = batch["labels"][i]
        trained = tok.decode(labels[labels != -100])
        assistant = [r["messages"][-1]["content"] for r in rows]
        assert trained.strip().removesuffix("<|im_end|>").strip() in assistant, trained
        assert "<|im_start|>user" not in trained and "[label]" not in trained and "[rationale]" not in trained
        assert (labels != -100).sum() < (batch["attention_mask"][i]).sum() / 2  # the prompt is most tokens
    assert to_prompt_completion(rows[0])["completion"] == [rows[0]["messages"][-1]]
    with pytest.raises(ValueError, match="assistant"):
        to_prompt_completion({"messages": rows[0]["messages"][:-1]})


def _loss_rows(out_dir: Path) -> list[dict]:
    with (out_dir / "loss.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.parametrize("modality,peft_type,via_cli", [("ia3", "IA3", False), ("prompt_tuning", "PROMPT_TUNING", True),
                                                        ("prefix_tuning", "PREFIX_TUNING", False)])
def test_trl_method_trains_on_cpu_and_generates(tmp_path, modality, peft_type, via_cli):
    recipe, run_dir, configs, [path] = _configs(tmp_path, modality)
    if via_cli:  # `stepwise train` dispatches on the config's backend
        cmd = [sys.executable, "-c", "from stepwise.cli import app; app()", "train", str(path), "--run-dir",
               str(run_dir), "--cpu", "--max-steps", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
        assert "step     2" in proc.stderr and "done" in proc.stderr
    else:  # the launcher's train() (what `stepwise run` calls) dispatches too
        from stepwise.training.backends import train

        result = train(path, run_dir=run_dir, cpu=True, max_steps=2, base_dir=tmp_path)
        assert result.train_losses and len(result.train_losses) == 2
    out_dir = run_dir / "train" / path.stem
    rows = _loss_rows(out_dir)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [int(r["step"]) for r in train_rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in train_rows)
    assert any(r["kind"] == "eval" and float(r["eval_loss"]) > 0 for r in rows)  # val file evaluated at the end
    adapter = json.loads((out_dir / "adapter_config.json").read_text())
    assert adapter["peft_type"] == peft_type
    if modality != "ia3":
        assert adapter["num_virtual_tokens"] == 8

    summary = json.loads((out_dir / "summary.json").read_text())
    from stepwise.evals.modelref import count_parameters, resolve_model

    ref = resolve_model(str(out_dir))
    assert ref.kind == "adapter" and ref.info["peft_type"] == peft_type
    # the trainable count the trainer reports is exactly what the saved adapter holds
    assert summary["trainable_params"] == count_parameters(ref)["trainable"] > 0
    assert summary["trainable_params"] < summary["total_params"] / 100
    assert summary["peak_memory_mb"] > 100 and summary["wall_s"] > 0 and summary["steps"] == 2
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]
    assert stage["status"] == "done" and stage["backend"] == "trl" and stage["modality"] == modality
    assert stage["trainable_params"] == summary["trainable_params"]

    # the eval code path: generation through the (unmerged, for virtual tokens) peft adapter
    from stepwise.evals.generate import generate_local
    from stepwise.pipelines.student import inference_messages

    prompts = [inference_messages(recipe.task, {"text": t}, "multitask")
               for t in ("I was charged twice for my order", "The app crashes when I open it")]
    gen = generate_local(ref, prompts, max_new_tokens=6, batch_size=2)
    assert len(gen.texts) == 2 and all(isinstance(t, str) for t in gen.texts) and gen.errors == [None, None]
    # two steps leave a prefix-tuned model close to its EOS/first-token tie: under a loaded CPU's
    # thread count it may end at once (seen once in a full run); the other methods must generate
    assert gen.output_tokens > 0 or peft_type == "PREFIX_TUNING", gen

    from stepwise.evals.compare import describe

    facts = describe({"path": str(run_dir), "manifest": {}, "recipe": {}, "forgetting": None,
                      "task": {"model_info": {"path": str(out_dir), "kind": "adapter", "peft_type": peft_type}}})
    assert facts["modality"] == modality and facts["trainable_params"] == summary["trainable_params"]
    assert facts["peak_memory_mb"] == summary["peak_memory_mb"] and facts["train_wall_s"] == summary["wall_s"]
