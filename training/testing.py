"""Test helpers: a small recipe and an exported run (chat JSONL written with the student format)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from pipelines.student import training_examples
from stepwise.io import atomic_write_jsonl
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

    export = run_dir / "export"
    export.mkdir(parents=True, exist_ok=True)
    train, val = export / "train.chat.jsonl", export / "val.chat.jsonl"
    atomic_write_jsonl(train, rows(n_train, 0))
    atomic_write_jsonl(val, rows(n_val, 100))
    return train, val


def make_run(tmp: Path, extra: str = "", n_train: int = 12, n_val: int = 4) -> tuple[Recipe, Path]:
    recipe = load_recipe(write_recipe(tmp, extra))
    run_dir = tmp / "runs" / recipe.name / "r1"
    write_export(recipe, run_dir, n_train, n_val)
    return recipe, run_dir
