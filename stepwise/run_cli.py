"""CLI: `stepwise run` (all stages) and `stepwise report`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stepwise.cli_support import EXIT_BAD_INPUT, console, load_or_exit
from stepwise.rundir import STAGES

_COLORS = {"done": "green", "skipped": "cyan", "failed": "red", "stopped": "yellow", "gate_failed": "red",
           "not_measured": "red", "not_run": "dim"}


def stage_notes(run) -> list[tuple[str, str]]:
    """(stage, note) for every note a stage recorded in the manifest (`stages.<stage>.notes`):
    the run summary prints them all, the same list the report shows."""
    stages = run.read_manifest().get("stages", {})
    return [(name, str(note)) for name in STAGES for note in (stages.get(name) or {}).get("notes") or []]


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        recipe: Path = typer.Argument(..., help="Recipe YAML"),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the recipe's latest run)"),
        new_run: bool = typer.Option(False, "--new-run", help="Start a new run directory"),
        from_stage: str | None = typer.Option(None, "--from", help=f"Start at this stage ({', '.join(STAGES)})"),
        until_stage: str | None = typer.Option(None, "--until", help="Stop after this stage"),
        review: str | None = typer.Option(None, "--review", help="Override review.mode: auto | argilla"),
        accept_pending: bool = typer.Option(
            False, "--accept-pending",
            help="Pull the review although rows are still pending: they train with the teacher's answer"),
        offline: bool = typer.Option(False, "--offline", help="Teacher responses from the cache only"),
        cpu: bool = typer.Option(False, "--cpu", help="Train with the CPU profile (no GPU)"),
        max_steps: int | None = typer.Option(None, "--max-steps", help="Cap optimizer steps (short demo runs)"),
        max_cost: float | None = typer.Option(None, "--max-cost", help="Teacher cost cap for this run (USD)"),
        no_retry_unparsed: bool = typer.Option(False, "--no-retry-unparsed",
                                               help="Keep malformed teacher answers; do not ask those rows again"),
        force: bool = typer.Option(False, "--force", help="Re-run stages even when their inputs did not change"),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars"),
    ) -> None:
        """Run the whole distillation: generate, curate, review, export, configs, train, eval, report."""
        from stepwise.pipeline import RunOptions, run_pipeline
        from stepwise.rundir import create_run, resolve_run

        for name, value in (("--from", from_stage), ("--until", until_stage)):
            if value is not None and value not in STAGES:
                console.print(f"[red]error[/red] {name} {value}: not a stage ({', '.join(STAGES)})")
                raise typer.Exit(EXIT_BAD_INPUT)
        if review not in (None, "auto", "argilla"):
            console.print(f"[red]error[/red] --review {review}: use auto or argilla")
            raise typer.Exit(EXIT_BAD_INPUT)
        r = load_or_exit(recipe)
        run = create_run(r) if new_run else resolve_run(r, run_dir, create=True)
        console.print(f"run directory: {run.path}", highlight=False)
        opts = RunOptions(offline=offline, review=review, accept_pending=accept_pending, cpu=cpu,
                          max_steps=max_steps, from_stage=from_stage,
                          until_stage=until_stage, force=force, progress=not no_progress, max_cost=max_cost,
                          retry_unparsed=not no_retry_unparsed)

        def on_stage(o) -> None:
            color = _COLORS.get(o.status, "white")
            console.print(f"[{color}]{o.status:>11}[/{color}] {o.stage:<9} {o.wall_s:7.1f}s  {o.detail}",
                          highlight=False, soft_wrap=True)

        try:
            summary = run_pipeline(r, run, opts, on_stage=on_stage)
        except KeyboardInterrupt as exc:  # Ctrl-C: say what is kept and how to go on
            from stepwise.pipelines.cli import EXIT_INTERRUPTED, print_interrupted, resume_command

            flags = [f"--{k}={v}" if v is not True else f"--{k}" for k, v in (
                ("review", review), ("offline", offline or None),
                ("cpu", cpu or None), ("max-steps", max_steps), ("max-cost", max_cost),
                ("no-retry-unparsed", no_retry_unparsed or None), ("until", until_stage)) if v is not None]
            print_interrupted(exc, resume_command("run", recipe, run.path, *flags))
            raise typer.Exit(EXIT_INTERRUPTED) from None
        table = Table("stage", "status", "seconds", "detail", title=f"stepwise run {r.name}")
        for o in summary.outcomes:
            color = _COLORS.get(o.status, "white")
            # the whole detail, wrapped: it carries the gate's verdict and why
            table.add_row(o.stage, f"[{color}]{o.status}[/{color}]", f"{o.wall_s:.1f}", escape(o.detail))
        wide = Console(width=max(Console().width, 140))
        wide.print(table)
        ran = {o.stage for o in summary.outcomes if o.status != "not_run"}
        for stage, note in stage_notes(run):
            if stage in ran:
                wide.print(f"[yellow]note[/yellow] ({stage}): {escape(note)}", highlight=False, soft_wrap=True)
        if "eval" in ran and run.layout.student_vs_teacher.exists():  # the business case closes the run
            import json

            from stepwise.evals.cli import print_student_vs_teacher

            print_student_vs_teacher(json.loads(run.layout.student_vs_teacher.read_text(encoding="utf-8")))
        report = run.layout.report_html
        if report.exists():
            console.print(f"report: {report}", highlight=False)
        raise typer.Exit(summary.exit_code)

    @app.command("report")
    def report_cmd(
        recipe: Path = typer.Argument(..., help="Recipe YAML"),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the latest run)"),
    ) -> None:
        """Write the run's self-contained report.html."""
        from stepwise.report import write_report
        from stepwise.rundir import resolve_run

        r = load_or_exit(recipe)
        try:
            run = resolve_run(r, run_dir, create=False)
        except FileNotFoundError as exc:
            console.print(f"[red]error[/red] {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        console.print(f"report: {write_report(r, run)}", highlight=False)
