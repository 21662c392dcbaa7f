"""Shared fixtures: small recipes written into a temp dir, the repo root, offline env."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

for _k, _v in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)


CLASSIFICATION_RECIPE = """\
name: tiny
task:
  name: tickets
  classes: [billing, technical, general]
  instructions: Classify the ticket.
data:
  inputs: inputs.jsonl
  label_field: label
teacher:
  provider: openai
  model: stub-teacher
  base_url: http://127.0.0.1:1/v1
  api_key_env: STUB_KEY
  concurrency: 4
  max_retries: 2
  timeout_s: 5
"""


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a recipe (YAML text, dedented) and an inputs file; return the recipe path."""

    def _write(text: str = CLASSIFICATION_RECIPE, rows: list[dict] | None = None, name: str = "recipe.yaml") -> Path:
        import json

        rows = rows if rows is not None else [
            {"text": "My card was charged twice", "label": "billing"},
            {"text": "The app crashes on login", "label": "technical"},
        ]
        (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write
