from __future__ import annotations

import subprocess
import sys

import pytest

from stepwise.recipe import RecipeError, load_recipe
from tests.conftest import CLASSIFICATION_RECIPE, REPO


def test_examples_validate():
    for name in ["support-tickets", "nl2dsl"]:
        recipe = load_recipe(REPO / "examples" / name / "recipe.yaml")
        assert recipe.name == name


def test_classes_file_is_loaded():
    recipe = load_recipe(REPO / "examples" / "support-tickets" / "recipe.yaml")
    assert "card_arrival" in recipe.task.label_set
    assert recipe.training.effective_lora_alpha == 4 * recipe.training.lora_r


BAD = [
    # (replace this, with this, expected message fragment, expected line)
    ("  concurrency: 4\n", "  concurrency: 0\n", "teacher.concurrency: must be >= 1", 14),
    ("  max_retries: 2\n", "  max_retries: 2\n  temperature: 3\n", "teacher.temperature: must be <= 2", 16),
    ("  concurrency: 4\n", "  concurrncy: 4\n", "teacher.concurrncy: unknown key (did you mean 'concurrency'?)", 14),
    ("  api_key_env: STUB_KEY\n", "  api_key: sk-abc\n", "teacher.api_key: unknown key (secrets never go in a recipe", 13),
    ("  inputs: inputs.jsonl\n", "  inputs: missing.jsonl\n", "data.inputs: file not found: missing.jsonl", 7),
    ("  classes: [billing, technical, general]\n", "  classes: [billing]\n", "task: `classes` needs at least two labels", 2),
    ("  classes: [billing, technical, general]\n", "  classes: [a, b]\n  structured: json\n",
     "task: set exactly one of `classes`", 2),
    ("  instructions: Classify the ticket.\n", "", "task.instructions: required field is missing", 2),
    ("name: tiny\n", "name: bad name!\n", "name: must match", 1),
    ("  provider: openai\n", "  provider: anthropic\n", "teacher.provider: must be one of 'openai', 'transformers' or 'llamacpp'", 10),
]


@pytest.mark.parametrize("old,new,message,line", BAD)
def test_bad_recipes_name_line_and_field(write_recipe, old, new, message, line):
    assert old in CLASSIFICATION_RECIPE
    path = write_recipe(CLASSIFICATION_RECIPE.replace(old, new, 1))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    problems = exc.value.problems
    assert any(message in p and f"recipe.yaml:{line} " in p for p in problems), problems


def test_all_errors_reported_at_once(write_recipe):
    text = CLASSIFICATION_RECIPE.replace("  concurrency: 4\n", "  concurrency: 0\n  temprature: 1\n").replace(
        "inputs.jsonl", "nope.jsonl"
    )
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(text))
    joined = "\n".join(exc.value.problems)
    assert "concurrency: must be >= 1" in joined
    assert "temprature: unknown key (did you mean 'temperature'?)" in joined
    assert "file not found: nope.jsonl" in joined


def test_yaml_syntax_error_has_line(write_recipe):
    path = write_recipe(CLASSIFICATION_RECIPE + "teacher: [unclosed\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert "recipe.yaml:" in exc.value.problems[0]


def test_alias_target_must_be_a_class(write_recipe):
    text = CLASSIFICATION_RECIPE.replace("  instructions:", "  label_aliases: {money: finance}\n  instructions:")
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(text))
    assert "task.label_aliases.money: 'finance' is not one of task.classes" in exc.value.problems[0]


def test_cli_validate_exit_code(write_recipe):
    path = write_recipe(CLASSIFICATION_RECIPE.replace("concurrency: 4", "concurrency: -1"))
    proc = subprocess.run([sys.executable, "-m", "stepwise.cli", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "teacher.concurrency: must be >= 1" in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "stepwise.cli", "validate", str(write_recipe())],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_package_gguf_formats_are_checked(write_recipe):
    """package.gguf: default f16 + q8_0, `[]` allowed; a format the converter (training/gguf.py) cannot write,
    or one given twice, is a recipe error naming the line and field (`stepwise validate` exits 2)."""
    from stepwise.training.gguf import OUTTYPES

    assert load_recipe(write_recipe()).package.gguf == ["f16", "q8_0"]
    assert load_recipe(write_recipe(CLASSIFICATION_RECIPE + "package:\n  gguf: []\n")).package.gguf == []
    assert load_recipe(write_recipe(CLASSIFICATION_RECIPE + "package:\n  gguf: [bf16]\n")).package.gguf == ["bf16"]
    bad = write_recipe(CLASSIFICATION_RECIPE + "package:\n  gguf: [f16, q4_k_m]\n", name="bad.yaml")
    with pytest.raises(RecipeError) as exc:
        load_recipe(bad)
    [problem] = exc.value.problems
    assert "bad.yaml:18 package.gguf[1]: must be one of" in problem
    assert all(f"'{t}'" in problem for t in OUTTYPES)
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(CLASSIFICATION_RECIPE + "package:\n  gguf: [q8_0, f16, q8_0]\n"))
    [problem] = exc.value.problems
    assert "recipe.yaml:18 package.gguf: repeated values" in problem
    proc = subprocess.run([sys.executable, "-m", "stepwise.cli", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "package.gguf[1]: must be one of" in proc.stderr
