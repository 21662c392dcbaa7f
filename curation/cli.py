"""`stepwise curate` and `stepwise export` (registered by `stepwise.cli`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)


def _run(recipe_path: Path, run_dir: Path | None):
    from stepwise.cli_support import EXIT_BAD_INPUT, load_or_exit
    from stepwise.rundir import resolve_run

    recipe = load_or_exit(recipe_path)
    try:
        run = resolve_run(recipe, run_dir, create=False)
    except FileNotFoundError as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    return recipe, run


def _bad_input(exc: Exception) -> typer.Exit:
    from stepwise.cli_support import EXIT_BAD_INPUT

    console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _call_reporting(stage, *args):
    """Run a stage function: bad data files (and recipe settings this install cannot honour, such as
    semantic dedup without its model) exit 2 with the message, warnings are printed after."""
    from stepwise.io import DataFileError
    from stepwise.recipe import RecipeError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = stage(*args)
        except (DataFileError, RecipeError) as exc:
            raise _bad_input(exc) from None
    for w in caught:
        console.print(f"[yellow]warning[/yellow] {w.message}", highlight=False, soft_wrap=True)
    return result


def print_funnel(report: dict) -> None:
    table = Table("step", "in", "out", "removed / moved", title="curation funnel")
    for s in report["steps"]:
        why = ", ".join(f"{k} {v}" for k, v in s["removed"].items())
        extra = [f"-> {k} {v}" for k, v in s.get("moved", {}).items()]
        if s.get("added"):
            extra.append(f"+ {s['added']} general")
        table.add_row(s["step"], str(s["in"]), str(s["out"]), "; ".join(x for x in [why, *extra] if x))
    Console().print(table)
    kept = report["kept"]
    acc = report.get("teacher_accuracy") or {}
    line = (f"train {kept['train']}, val {kept['val']}, test {kept['test']} ({report['test_source']}), "
            f"rejected {report['rejected']}")
    if acc.get("accuracy") is not None:
        line += f"; teacher {acc['metric']} vs gold: {acc['accuracy']:.1%} of {acc['rows_with_gold']}"
    Console().print(line, highlight=False)
    mix = report.get("general_mix")
    if mix and mix.get("in_domain_benchmarks"):
        Console().print(f"general mix from {mix['file']}: {', '.join(mix['in_domain_benchmarks'])} is in-domain now",
                        highlight=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def curate(
        recipe: Path = typer.Argument(..., help="Recipe YAML"),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the recipe's latest run)"),
        offline: bool = typer.Option(False, "--offline", help="Rationalizations (on_gold_mismatch: rationalize) "
                                     "from the teacher cache only"),
        max_cost: float | None = typer.Option(None, "--max-cost", help="Teacher cost cap for this run (USD)"),
    ) -> None:
        """Validate, filter, dedup, decontaminate, balance and split teacher responses (with
        `curation.on_gold_mismatch: rationalize`, ask the teacher to explain gold answers first)."""
        import json
        from functools import partial

        from stepwise.curation.curate import TooFewTrainRows, run_curate
        from stepwise.curation.rationalization import RationalizeStopped
        from stepwise.pipelines.rationalize import RationalizeError

        from stepwise.cli_support import EXIT_STOPPED

        r, run = _run(recipe, run_dir)
        try:
            report = _call_reporting(partial(run_curate, offline=offline, max_cost=max_cost, progress=True), r, run)
        except RationalizeError as exc:  # offline cache miss, teacher unreachable: the message says which
            raise _bad_input(exc) from None
        except (TooFewTrainRows, RationalizeStopped) as exc:  # the files are written: show the funnel, then why it stopped
            print_funnel(json.loads((run.layout.funnel).read_text(encoding="utf-8")))
            console.print(f"[yellow]stopped[/yellow] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_STOPPED) from None
        print_funnel(report)
        console.print(f"[green]ok[/green] wrote {run.path / 'curate'}", highlight=False)

    @app.command()
    def export(
        recipe: Path = typer.Argument(..., help="Recipe YAML"),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the recipe's latest run)"),
        preferences: bool = typer.Option(False, "--preferences",
                                         help="Write DPO pairs from reviewers' corrections (export/preferences.jsonl)"),
    ) -> None:
        """Write the training files: OpenAI chat JSONL (+ line-aligned lineage); with --preferences, the
        DPO preference pairs from rows reviewers corrected."""
        from stepwise.curation.export import run_export

        r, run = _run(recipe, run_dir)
        if preferences:
            _export_preferences(r, run)
            return
        summary = _call_reporting(run_export, r, run)
        console.print(
            f"[green]ok[/green] {run.path / 'export'}: train {summary['train']['examples']} examples, "
            f"val {summary['val']['examples']} ({summary['dss_output']}); longest {summary['max_tokens']} tokens "
            f"({summary['tokenizer']}), suggested sequence_len {summary['suggested_sequence_len']}"
            + (f"; {summary['overlong']} over sequence_len listed in export/overlong.jsonl" if summary["overlong"] else ""),
            highlight=False, soft_wrap=True,
        )


def _export_preferences(recipe, run) -> None:
    from stepwise.review.preferences import NoCorrections, run_export_preferences

    from stepwise.io import DataFileError

    try:
        summary = run_export_preferences(recipe, run)
    except DataFileError as exc:
        raise _bad_input(exc) from None
    except NoCorrections as exc:
        console.print(f"[yellow]no pairs[/yellow] {exc}", highlight=False, soft_wrap=True)
        return
    console.print(f"[green]ok[/green] {run.path / 'export' / 'preferences.jsonl'}: {summary['train']} pairs "
                  f"({summary['val']} val) from {summary['corrected_rows']} corrected of {summary['reviewed_rows']} "
                  f"reviewed rows ({summary['dss_output']}, Axolotl `{summary['format']}`)", highlight=False,
                  soft_wrap=True)
