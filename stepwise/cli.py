"""The `stepwise` command line.

Core commands live here; each stage package adds its own by exposing `register(app)` in its
`cli` module (pipelines, curation, training, evals, argilla_embedded), so packages stay
independent. Heavy libraries are imported inside commands to keep `stepwise --help` fast.

Exit codes: 0 ok, 1 a stage failed, 2 bad input (recipe, config, data), 3 stopped early by a
limit (cost cap) with a resumable run, 4 a quality gate failed (forgetting).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stepwise import quiet

# shared with the stage packages' command modules (re-exported here for callers of stepwise.cli)
from stepwise.cli_support import (  # noqa: F401
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_STAGE_FAILED,
    EXIT_STOPPED,
    console,
    load_or_exit,
)

app = typer.Typer(
    name="stepwise",
    help="Distilling Step-by-Step, declaratively: teacher rationales -> curated data -> student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Known-harmless dependency noise (import-time warnings and log lines) is not the user's business.
quiet.install()


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML")) -> None:
    """Check a recipe: every error at once, each with its file, line and field; and the gold labels
    of its data files against task.classes."""
    from stepwise.curation.labels import data_file_gold_labels
    from stepwise.io import DataFileError

    r = load_or_exit(recipe)
    try:
        problems = data_file_gold_labels(r)
    except DataFileError as exc:  # a malformed data file is bad input too
        problems = [str(exc)]
    for problem in problems:
        console.print(f"[red]error[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(EXIT_BAD_INPUT)
    kind = f"{len(r.task.label_set)} classes" if r.task.is_classification else f"structured ({r.task.validator})"
    console.print(f"[green]ok[/green] {recipe}: recipe '{r.name}', task '{r.task.name}' ({kind}), "
                  f"teacher {r.teacher.provider}:{r.teacher.model}", highlight=False, soft_wrap=True)


@app.command()
def runs(
    root: Path = typer.Option(Path("runs"), "--root", help="Runs directory"),
) -> None:
    """List runs with the status of each stage."""
    from stepwise.rundir import STAGES, effective_status, list_runs

    found = list_runs(root)
    if not found:
        console.print(f"no runs under {root}")
        return
    table = Table("run", *STAGES)
    for path, manifest in found:
        stages = manifest.get("stages", {})
        cells = []
        for s in STAGES:
            status = effective_status(stages.get(s))
            color = {"done": "green", "failed": "red", "interrupted": "red", "running": "yellow",
                     "incomplete": "yellow"}.get(status, "dim")
            cells.append(f"[{color}]{status}[/{color}]")
        table.add_row(str(path.relative_to(root)), *cells)
    Console(width=max(Console().width, 140)).print(table)


@app.command("schema")
def schema_cmd() -> None:
    """Print the recipe's JSON schema."""
    import json

    from stepwise.recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))


_PLUGINS = [
    "stepwise.pipelines.cli", "stepwise.curation.cli", "stepwise.training.cli", "stepwise.evals.cli", "stepwise.review.cli",
    "stepwise.run_cli", "stepwise.experiment_cli",
]


def _register_plugins() -> None:
    for module_name in _PLUGINS:
        if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) is None:
            continue
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        importlib.import_module(module_name).register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: completed work is saved; run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    # `python -m stepwise.cli`: run the canonical module, so plugins that import `stepwise.cli`
    # register on the same app instead of loading a second copy.
    from stepwise.cli import main as _canonical_main

    _canonical_main()
else:
    _register_plugins()
