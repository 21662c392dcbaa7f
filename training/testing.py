"""Test helpers: a small recipe, an exported run (chat JSONL written with the student format), and
a stand-in trainer process for fast launcher tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

from stepwise.pipelines.student import training_examples

from stepwise.io import atomic_write_jsonl
from stepwise.layout import RunLayout
from stepwise.recipe import Recipe, load_recipe

TRAINING_RECIPE = """\
name: tiny-train
task:
  name: tickets
  classes: [billing, technical, general]
  system_prompt: You route customer messages.
  instructions: Classify the ticket.
data:
  inputs: inputs.jsonl
  label_field: label
teacher:
  provider: openai
  model: stub-teacher
  base_url: http://127.0.0.1:1/v1
training:
  base_model: smollm2-135m-instruct
  modality: auto
  gpu_memory_gb: 24
{extra}
"""

TICKETS = [
    ("My card was charged twice for one coffee", "billing", "A duplicate charge is a billing problem."),
    ("The app crashes every time I log in", "technical", "A crash on login is a technical fault."),
    ("What are your opening hours?", "general", "Opening hours are a general question."),
    ("I was billed after cancelling my plan", "billing", "An unexpected charge after cancelling is billing."),
    ("The page shows error 500 when I pay", "technical", "A server error is a technical issue."),
    ("Do you have a branch in Lisbon?", "general", "Branch locations are general information."),
]


def write_recipe(tmp: Path, extra: str = "") -> Path:
    (tmp / "inputs.jsonl").write_text('{"text": "x", "label": "billing"}\n', encoding="utf-8")
    body = TRAINING_RECIPE.format(extra=textwrap.indent(textwrap.dedent(extra), "  ") if extra else "")
    path = tmp / "recipe.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def write_export(recipe: Recipe, run_dir: Path, n_train: int = 12, n_val: int = 4) -> tuple[Path, Path]:
    """export/train.chat.jsonl and val.chat.jsonl in the contract's format (multitask DSS)."""
    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(n):
            text, label, why = TICKETS[(i + offset) % len(TICKETS)]
            for _kind, messages in training_examples(recipe.task, {"text": f"{text} (#{i + offset})"}, why, label,
                                                     recipe.training.dss_output):
                out.append({"messages": messages})
        return out[: n]

    lay = RunLayout(run_dir)
    lay.stage_dir("export").mkdir(parents=True, exist_ok=True)
    train, val = lay.chat("train"), lay.chat("val")
    atomic_write_jsonl(train, rows(n_train, 0))
    atomic_write_jsonl(val, rows(n_val, 100))
    return train, val


def make_run(tmp: Path, extra: str = "", n_train: int = 12, n_val: int = 4) -> tuple[Recipe, Path]:
    recipe = load_recipe(write_recipe(tmp, extra))
    run_dir = tmp / "runs" / recipe.name / "r1"
    write_export(recipe, run_dir, n_train, n_val)
    return recipe, run_dir


# A stand-in for Axolotl's train process: writes what HF's Trainer writes (checkpoint-<step>/ with
# weights and trainer_state.json every 2 steps, the final weights), prints nothing, resumes from
# the config's resume_from_checkpoint. FAKE_TRAIN_MODE=stdout_only prints a loss line and records
# no state; no_loss records steps without a loss; FAKE_DIE_AFTER=<step> dies like a kill.
FAKE_TRAINER = r'''
import json, os, pathlib, sys
import yaml

cfg = yaml.safe_load(open(sys.argv[1]))
out = pathlib.Path(cfg["output_dir"])
out.mkdir(parents=True, exist_ok=True)
mode = os.environ.get("FAKE_TRAIN_MODE", "state")
lr = float(cfg["learning_rate"])
with (out / "fake_calls.jsonl").open("a") as fh:
    fh.write(json.dumps({"resume": cfg.get("resume_from_checkpoint"), "lr": lr}) + "\n")
if mode == "stdout_only":
    print("{'loss': '1.5', 'grad_norm': '1.0', 'learning_rate': '0.0002', 'epoch': '1.0'}", flush=True)
    sys.exit(0)
start, history = 0, []
if cfg.get("resume_from_checkpoint"):
    state = json.loads((pathlib.Path(cfg["resume_from_checkpoint"]) / "trainer_state.json").read_text())
    start, history = state["global_step"], state["log_history"]
total = 4
for step in range(start + 1, total + 1):
    entry = {"step": step, "epoch": step / total, "learning_rate": lr, "grad_norm": 1.0}
    if mode != "no_loss":
        entry["loss"] = 2.0 / step + lr
    history.append(entry)
    if step % 2 == 0:
        ck = out / f"checkpoint-{step}"
        ck.mkdir(exist_ok=True)
        (ck / "adapter_model.safetensors").write_text(f"weights lr={lr} step={step}")
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))
    if os.environ.get("FAKE_DIE_AFTER") == str(step):
        os._exit(137)
(out / "adapter_model.safetensors").write_text(f"weights lr={lr} final")
(out / "adapter_config.json").write_text("{}")
'''


def use_fake_trainer(monkeypatch, tmp: Path) -> Path:
    """Point the Axolotl launcher's preprocess and train commands at the stand-in (pytest monkeypatch)."""
    import sys

    from stepwise.training import launcher

    script = tmp / "fake_trainer.py"
    script.write_text(FAKE_TRAINER, encoding="utf-8")
    monkeypatch.setattr(launcher, "axolotl_cmd", lambda command, config, *a: [sys.executable, "-c", "pass"])
    monkeypatch.setattr(launcher, "train_command", lambda config, gpus: [sys.executable, str(script), str(config)])
    return script
