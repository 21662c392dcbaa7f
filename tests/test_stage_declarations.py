"""Each pipeline stage declares the recipe sections it reads and the run files it reads and writes
(stepwise.pipeline.PIPELINE, paths from stepwise.layout.RunLayout). Here the stages run with a
recipe view that records which sections they touch, and their manifest entries are compared with
the declared files: a section read but not declared would let `stepwise run` skip a stage whose
settings changed; a file written but not declared is a path the layout does not know."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stepwise.layout import RunLayout
from stepwise.pipeline import PIPELINE, RunOptions
from stepwise.recipe import Recipe
from stepwise.rundir import RunDir
from stepwise.testing.openai_stub import OpenAIStub
from tests.test_generate import make_rows, setup_recipe

SECTIONS = {name for name, f in Recipe.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
_WHOLE = {"model_dump", "model_dump_json", "model_copy", "__dict__"}  # reads every section at once


class RecipeView:
    """Stands in for a Recipe and records which top-level sections are read through it. The sections
    in `narrow` (a stage that declares single `fields` of them) record each setting read instead."""

    def __init__(self, recipe: Recipe, narrow: set[str] | frozenset[str] = frozenset()):
        object.__setattr__(self, "_recipe", recipe)
        object.__setattr__(self, "read", set())
        object.__setattr__(self, "_narrow", set(narrow))

    def __getattr__(self, name: str) -> Any:
        if name in self._narrow:
            return _SectionView(getattr(self._recipe, name), name, self.read)
        if name in SECTIONS:
            self.read.add(name)
        elif name in _WHOLE:
            self.read.update(SECTIONS)
        return getattr(self._recipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a stage set recipe.{name}")


class _SectionView:
    """One section of a RecipeView: records `section.field` per setting read, the section on a whole read."""

    def __init__(self, section: BaseModel, name: str, read: set[str]):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_read", read)

    def __getattr__(self, attr: str) -> Any:
        self._read.add(self._name if attr in _WHOLE or attr.startswith("_") else f"{self._name}.{attr}")
        return getattr(self._section, attr)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a stage set recipe.{self._name}.{name}")


def _covered(path: Path, declared: list[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in declared)


def _run_paths(entries: list[dict[str, Any]], run: RunDir) -> list[Path]:
    return [(run.path / e["path"]).resolve() for e in entries]


def test_view_records_sections_read_through_it(tmp_path):
    with OpenAIStub() as stub:
        recipe, _ = setup_recipe(tmp_path, stub, make_rows(3))
    view = RecipeView(recipe)
    assert view.training.lora_r == recipe.training.lora_r and view.name == recipe.name
    assert view.read == {"training"}
    view.model_dump()
    assert view.read == SECTIONS
    narrow = RecipeView(recipe, narrow={"curation"})
    assert narrow.curation.split.test == recipe.curation.split.test and narrow.curation.seed == recipe.curation.seed
    assert narrow.read == {"curation.split", "curation.seed"}
    narrow.curation.model_dump()
    assert "curation" in narrow.read


def test_stages_read_and_write_what_they_declare(tmp_path):
    ran = ["generate", "curate", "review", "export", "configs", "report"]  # train/eval: GPU-sized, see below
    with OpenAIStub() as stub:
        recipe, run = setup_recipe(tmp_path, stub, make_rows(30))
        opts = RunOptions(progress=False, offline=False)
        for stage in PIPELINE:
            if stage.name not in ran:
                continue
            view = RecipeView(recipe, narrow={f.split(".")[0] for f in stage.fields})
            stage.run(view, run, opts)
            stage.inputs(view, run)
            stage.owed(view, run, opts)
            if stage.name != "report":  # always re-run, so its sections never decide a skip
                undeclared = view.read - set(stage.sections) - set(stage.fields)
                assert not undeclared, f"{stage.name} reads recipe sections {sorted(undeclared)} it does not declare"
            declared_out = [p.resolve() for p in stage.outputs(run.layout)]
            assert declared_out, f"{stage.name} declares no outputs"
            for p in declared_out:
                assert p.exists(), f"{stage.name} declares {p} but did not write it"
            info = run.stage_info(stage.name) or {}
            for p in _run_paths(info.get("outputs", []), run):
                assert _covered(p, declared_out), f"{stage.name} wrote {p}, not among its declared outputs"
            declared_in = [p.resolve() for p in stage.inputs(recipe, run)]
            for p in _run_paths(info.get("inputs", []), run):
                if p.is_relative_to(run.path.resolve()):
                    assert _covered(p, declared_in), f"{stage.name} read {p}, not among its declared inputs"


def test_every_stage_declares_outputs_inside_its_own_folder():
    """train and eval are too slow for this box: their declared outputs are checked for shape here
    (and their manifest outputs by the training/eval tests through the same layout)."""
    lay = RunLayout(Path("/r"))
    for stage in PIPELINE:
        outs = stage.outputs(lay)
        assert outs, stage.name
        for p in outs:
            assert p.is_relative_to(lay.stage_dir(stage.name)) or p == lay.report_html, (stage.name, p)
