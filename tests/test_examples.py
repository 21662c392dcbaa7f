"""The bundled examples: recipes validate, the label-only twin differs only where it should, each
example documents itself and carries its data licence, and the recorded teacher caches answer every
input the example reads (so `make demo` and the examples replay offline)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stepwise.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RECIPES = sorted(EXAMPLES.glob("*/recipe*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_example_documents_itself_and_its_data(example):
    folder = EXAMPLES / example
    readme = (folder / "README.md").read_text()
    for topic in ("What it shows", "real teacher", "GPU"):
        assert topic.lower() in readme.lower(), f"{example}/README.md lacks a section on {topic!r}"
    assert (folder / "data" / "LICENSE").stat().st_size > 0
    assert "licen" in (folder / "data" / "ATTRIBUTION.md").read_text().lower()


def test_label_only_twin_differs_only_in_target():
    dss = load_recipe(EXAMPLES / "nl2dsl" / "recipe.yaml").model_dump()
    twin = load_recipe(EXAMPLES / "nl2dsl" / "recipe.label-only.yaml").model_dump()
    assert (dss["training"]["dss_output"], twin["training"]["dss_output"]) == ("multitask", "label_only")
    assert twin["name"] != dss["name"]
    for d in (dss, twin):
        d.pop("name"), d.pop("description"), d["training"].pop("dss_output")
    assert twin == dss


@pytest.mark.parametrize(("example", "recipe_file"), [
    ("support-tickets", "recipe.yaml"), ("nl2dsl", "recipe.yaml"),
    ("nl2dsl", "recipe.label-only.yaml"),  # the ablation twin reads the same recorded responses
])
def test_recorded_teacher_cache_covers_every_input(tmp_path, example, recipe_file):
    """Replays the committed cache with `--offline` (a miss is an error) on a copy of the example."""
    src = EXAMPLES / example
    recipe = load_recipe(src / recipe_file)
    assert recipe.teacher.cache, "the example should ship a recorded teacher cache"
    dst = tmp_path / example
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("runs", "*.sqlite-*"))
    proc = subprocess.run(
        [sys.executable, "-m", "stepwise", "generate", str(dst / recipe_file), "--new-run", "--offline",
         "--no-progress"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    manifest = json.loads(next((dst / "runs" / recipe.name).glob("2*/manifest.json")).read_text())
    gen = manifest["stages"]["generate"]
    assert gen["cache"]["requests_sent"] == 0
    n_inputs = sum(1 for _ in (dst / "data" / Path(recipe.data.inputs).name).open())
    expected = min(n_inputs, recipe.data.limit or n_inputs)
    # the gold test split is held out before generation (nl2dsl: 17 of 85), the rest replayed
    assert gen["counts"]["rows"] + gen["counts"]["held_out"] == expected


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_test_file_ids_are_its_own(path):
    """A bundled example's test file does not reuse ids of its inputs, so curating it raises no
    "data.test_file reuses N ids" warning on the user's console."""
    import json

    recipe = load_recipe(path)
    if not recipe.data.test_file or not recipe.data.id_field:
        pytest.skip("no test file with ids")

    def ids(rel: str) -> set[str]:
        lines = (path.parent / rel).read_text(encoding="utf-8").splitlines()
        return {str(json.loads(line)[recipe.data.id_field]) for line in lines if line.strip()}

    shared = ids(recipe.data.inputs) & ids(recipe.data.test_file)
    assert not shared, f"{path}: test_file reuses {len(shared)} input ids, e.g. {sorted(shared)[:3]}"
