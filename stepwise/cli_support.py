"""What every command module shares (hand-written): exit codes, the stderr console, `load_or_exit`.

`stepwise.cli` builds the app and registers each stage package's `cli` module on it; those modules
import these pieces from here, not from `stepwise.cli`, so no import runs in a circle (the
import contracts in pyproject check it).

Exit codes: 0 ok, 1 a stage failed, 2 bad input (recipe, config, data), 3 stopped early by a
limit (cost cap) with a resumable run, 4 a quality gate failed (forgetting).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from stepwise.recipe import Recipe, RecipeError, load_recipe

EXIT_STAGE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_GATE_FAILED = 4

console = Console(stderr=True)


def load_or_exit(path: Path, *, check_files: bool = True) -> Recipe:
    """Load a recipe or print every problem and exit 2."""
    try:
        return load_recipe(path, check_files=check_files)
    except RecipeError as exc:
        for problem in exc.problems:
            console.print(f"[red]error[/red] {escape(problem)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
