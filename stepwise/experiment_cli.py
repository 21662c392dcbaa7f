"""CLI: `stepwise experiment RECIPE` (registered by stepwise.cli's plugin loader; the work is
stepwise.experiment's)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stepwise.cli_support import EXIT_BAD_INPUT, console, load_or_exit

_COLORS = {"done": "green", "skipped": "cyan", "failed": "red", "stopped": "yellow", "does_not_fit": "yellow",
           "not_selected": "dim"}


def register(app: typer.Typer) -> None:
    @app.command("experiment")
    def experiment_cmd(
        recipe: Path = typer.Argument(..., help="Recipe YAML with a `training.sweep` grid"),
        exp_dir: Path | None = typer.Option(None, "--dir", help="Experiment directory (default: <runs>/<name>/experiment)"),
        points: str | None = typer.Option(None, "--points", help="Run only these points: indices, ranges (0-3) or ids, "
                                          "comma-separated"),
        parallel: int = typer.Option(1, "--parallel", min=1, help="Points at once (capped by the VRAM planner; one "
                                     "process per point, pinned to a GPU when GPUs are visible)"),
        max_points: int = typer.Option(64, "--max-points", min=1, help="Ask before running a larger grid"),
        yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask (a grid larger than --max-points runs)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="List the points (and what fits) and stop"),
        review: str | None = typer.Option(None, "--review", help="Override review.mode: auto | argilla"),
        accept_pending: bool = typer.Option(False, "--accept-pending", help="Pull the review with rows pending"),
        offline: bool = typer.Option(False, "--offline", help="Teacher responses from the cache only"),
        cpu: bool = typer.Option(False, "--cpu", help="Train with the CPU profile (no GPU)"),
        max_steps: int | None = typer.Option(None, "--max-steps", help="Cap optimizer steps per point"),
        max_cost: float | None = typer.Option(None, "--max-cost", help="Teacher cost cap (USD)"),
        force: bool = typer.Option(False, "--force", help="Run finished points again"),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars"),
        worker: bool = typer.Option(False, "--worker", hidden=True, help="One point of a --parallel run"),
    ) -> None:
        """Run a DSS experiment grid (training.sweep): one shared generate/curate/review, then each point
        (target x data fraction x modality x rank x alpha:rank x LR x general mix) as a sub-run;
        writes results.json and experiment.html. Resumable: finished points are skipped."""
        from stepwise.experiment import (
            ExperimentError,
            default_dir,
            plan_points,
            run_experiment,
            select_points,
        )
        from stepwise.layout import ExperimentLayout
        from stepwise.pipeline import RunOptions

        if review not in (None, "auto", "argilla"):
            console.print(f"[red]error[/red] --review {review}: use auto or argilla")
            raise typer.Exit(EXIT_BAD_INPUT)
        r = load_or_exit(recipe)
        try:
            grid = plan_points(r)
            selected = select_points(grid, points)
        except ExperimentError as exc:
            console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        layout = ExperimentLayout((exp_dir or default_dir(r)).resolve())
        wide = Console(width=max(Console().width, 140))
        if dry_run or not worker:
            table = Table("#", "point", "values", "planner", title=f"stepwise experiment {r.name}: {len(grid)} points")
            for p in grid:
                fit = "-" if p.estimate_gb is None else (
                    f"{p.estimate_gb:.1f} GB" if p.fits else f"[yellow]does not fit (planner: {p.estimate_gb:.1f} GB)[/yellow]")
                table.add_row(str(p.index), p.id if p in selected else f"[dim]{p.id}[/dim]", escape(p.describe()), fit)
            wide.print(table)
        if dry_run:
            return
        if len(selected) > max_points and not yes and not typer.confirm(
                f"{len(selected)} points (more than --max-points {max_points}): run them all?", default=False):
            console.print("not started: pass --points to run a slice, or --yes")
            raise typer.Exit(EXIT_BAD_INPUT)
        flags = [f"--{k}={v}" if v is not True else f"--{k}" for k, v in (
            ("review", review), ("offline", offline or None), ("cpu", cpu or None), ("max-steps", max_steps),
            ("max-cost", max_cost), ("accept-pending", accept_pending or None)) if v is not None]
        opts = RunOptions(offline=offline, review=review, accept_pending=accept_pending, cpu=cpu, max_steps=max_steps,
                          max_cost=max_cost, progress=not no_progress and not worker)
        console.print(f"experiment directory: {layout.root}", highlight=False)

        def on_stage(o) -> None:
            color = {"done": "green", "skipped": "cyan", "failed": "red", "stopped": "yellow"}.get(o.status, "white")
            console.print(f"  [{color}]{o.status:>11}[/{color}] {o.stage:<9} {o.wall_s:7.1f}s  {escape(o.detail)}",
                          highlight=False, soft_wrap=True)

        try:
            summary = run_experiment(r, layout, grid, selected, opts, parallel=parallel, force=force, worker=worker,
                                     worker_flags=flags, log=lambda m: console.print(m, highlight=False, soft_wrap=True),
                                     on_stage=on_stage)
        except ExperimentError as exc:  # e.g. the shared data changed under finished points
            console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        if summary.shared is not None and summary.shared.exit_code not in (0, 4):
            console.print(f"[red]the shared stages stopped[/red] (exit {summary.shared.exit_code}): "
                          f"{escape(summary.shared.outcomes[-1].detail if summary.shared.outcomes else '')}",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(summary.exit_code)
        if worker:
            raise typer.Exit(summary.exit_code)
        out = Table("point", "status", "seconds", "detail", title=f"stepwise experiment {r.name}")
        for o in summary.outcomes:
            color = _COLORS.get(o.status, "white")
            out.add_row(o.point.id, f"[{color}]{o.status}[/{color}]", f"{o.wall_s:.1f}", escape(o.detail))
        wide.print(out)
        for note in summary.notes:
            console.print(f"[yellow]note[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
        if layout.report_html.exists():
            console.print(f"report: {layout.report_html}", highlight=False)
        raise typer.Exit(summary.exit_code)
