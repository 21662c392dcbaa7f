"""Real CPU training through Axolotl: SmolLM2-135M-Instruct, a few steps of full, LoRA and QLoRA
(bitsandbytes 4-bit on CPU), loss recorded, LoRA merge, the adapter loaded with peft to generate."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from stepwise.training.backends import generate_configs, train
from stepwise.training.configgen import write_configs
from stepwise.training.launcher import merge_lora, train_command, visible_gpus
from stepwise.training.testing import make_run

pytestmark = pytest.mark.slow

EXTRA = """\
sequence_len: 128
micro_batch_size: 1
gradient_accumulation_steps: 1
gradient_checkpointing: false
lora_r: 8
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu-train")
    recipe, run_dir = make_run(tmp, EXTRA, n_train=8, n_val=2)
    configs = generate_configs(recipe, run_dir=run_dir, relative_to=tmp)
    paths = {c.modality: p for c, p in zip(configs, write_configs(configs, tmp / "configs"), strict=True)}
    return recipe, run_dir, paths, tmp


def _losses(out_dir: Path) -> list[dict]:
    with (out_dir / "loss.csv").open() as fh:
        return list(csv.DictReader(fh))


def _check_trained(result, run_dir: Path) -> None:
    rows = [r for r in _losses(result.out_dir) if r["kind"] == "train"]
    assert len(rows) == 2
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stage = manifest["stages"]["train"]
    assert stage["status"] == "done" and stage["config"] == result.name
    assert any(o["path"].endswith("loss.csv") for o in stage["outputs"])
    assert (result.out_dir / "train.log").exists() and (result.out_dir / "preprocess.log").exists()
    # the loss record is the trainer's own state: the checkpoint HF saves at the end of training
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert summary["trainer_state"] == "checkpoint-2/trainer_state.json" and summary["global_step"] == 2


def test_full_finetune_on_cpu(tiny_run):
    _, run_dir, paths, tmp = tiny_run
    result = train(paths["full"], run_dir=run_dir, cpu=True, max_steps=2, base_dir=tmp)
    _check_trained(result, run_dir)
    assert (result.out_dir / "model.safetensors").exists()


def test_qlora_4bit_on_cpu(tiny_run):
    _, run_dir, paths, tmp = tiny_run
    result = train(paths["qlora"], run_dir=run_dir, cpu=True, max_steps=2, base_dir=tmp)
    _check_trained(result, run_dir)
    log = (result.out_dir / "train.log").read_text()
    # Axolotl loads the base with BitsAndBytesConfig(load_in_4bit, nf4, double quant) and prepares it for k-bit
    assert "prepare_model_for_kbit_training" in log
    assert (result.out_dir / "adapter_model.safetensors").exists()


def test_lora_cli_merge_and_peft_generate(tiny_run):
    recipe, run_dir, paths, tmp = tiny_run
    cmd = [sys.executable, "-c", "from stepwise.cli import app; app()", "train", str(paths["lora"]),
           "--run-dir", str(run_dir), "--cpu", "--max-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step     2" in proc.stderr and "done" in proc.stderr
    out_dir = run_dir / "train" / paths["lora"].stem
    assert len([r for r in _losses(out_dir) if r["kind"] == "train"]) == 2

    merged = merge_lora(out_dir / "axolotl.yaml")
    assert (merged / "config.json").exists()

    import torch
    from peft import PeftModel
    from stepwise.pipelines.student import inference_messages
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepwise.models import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("smollm2-135m-instruct")), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out_dir)).eval()
    msgs = inference_messages(recipe.task, {"text": "I was charged twice for my order"}, "multitask")
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        peft_logits = model(**enc).logits
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert tok.decode(out[0, enc["input_ids"].shape[1]:]).strip() != ""
    merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged_model(**enc).logits
    assert torch.allclose(peft_logits, merged_logits, atol=5e-2), (peft_logits - merged_logits).abs().max()


def test_launch_commands(monkeypatch, tmp_path):
    cfg = tmp_path / "c.yaml"
    one = train_command(cfg, 1)
    assert one[1] == "-c" and "axolotl.cli.train import do_cli" in one[2] and one[3] == str(cfg)
    many = train_command(cfg, 4)
    assert many[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "4"]
    # issue 15: the `axolotl train` entry point under accelerate (was `-m axolotl.cli.train`)
    assert many[-5:] == [str(Path(sys.executable).parent / "axolotl"), "train", str(cfg), "--launcher", "python"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert visible_gpus() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0
