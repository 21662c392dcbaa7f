"""CLI: `stepwise generate` and `stepwise estimate`."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.table import Table

from stepwise.cli_support import EXIT_BAD_INPUT, EXIT_STAGE_FAILED, EXIT_STOPPED, console, load_or_exit
from stepwise.io import DataFileError

EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


def resume_command(command: str, recipe: Path, run_dir: Path, *flags: str) -> str:
    """The exact command that resumes an interrupted run in the same run directory."""
    return " ".join(shlex.quote(x) for x in ["stepwise", command, str(recipe), "--run-dir", str(run_dir), *flags])


def print_interrupted(exc: KeyboardInterrupt, command: str) -> None:
    """What Ctrl-C left behind, and how to go on (the message comes from GenerateInterrupted)."""
    detail = str(exc) or "interrupted"
    console.print(f"[yellow]{detail}[/yellow]", highlight=False, soft_wrap=True)
    console.print(f"resume with: {command}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        recipe: Path = typer.Argument(..., help="Recipe YAML"),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the recipe's latest run, or a new one)"),
        new_run: bool = typer.Option(False, "--new-run", help="Start a new run directory"),
        offline: bool = typer.Option(False, "--offline", help="Replay the response cache only; fail on a miss"),
        max_cost: float | None = typer.Option(None, "--max-cost", help="Stop before spending more than this (USD)"),
        ray: bool = typer.Option(False, "--ray", help="Run through distilabel's Ray integration"),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar"),
        no_retry_unparsed: bool = typer.Option(False, "--no-retry-unparsed",
                                               help="Keep malformed answers; do not ask those rows again"),
        batch: bool = typer.Option(False, "--batch", help="Send pending requests through the Batch API "
                                   "(teacher.batch: about half the price, results within the batch window)"),
        cancel_batches: bool = typer.Option(False, "--cancel-batches",
                                            help="Cancel this run's unfinished Batch API batches (answers so far are kept)"),
    ) -> None:
        """Ask the teacher for a rationale and label per input (cached, resumable, cost-capped)."""
        from stepwise.pipelines.generate import GenerateError, run_generate

        from stepwise.rundir import create_run, resolve_run

        r = load_or_exit(recipe)
        run = create_run(r) if new_run else resolve_run(r, run_dir, create=True)
        try:
            result = run_generate(r, run, offline=offline, max_cost=max_cost, progress=not no_progress, ray=ray,
                                  retry_unparsed=not no_retry_unparsed, batch=True if batch else None,
                                  cancel_batches=cancel_batches)
        except KeyboardInterrupt as exc:
            flags = [*(["--batch"] if batch else []), *(["--offline"] if offline else []), *(["--max-cost", f"{max_cost:g}"] if max_cost is not None else []),
                     *(["--ray"] if ray else []), *(["--no-retry-unparsed"] if no_retry_unparsed else [])]
            print_interrupted(exc, resume_command("generate", recipe, run.path, *flags))
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (GenerateError, DataFileError) as exc:
            console.print(f"[red]error[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        table = Table("parse status", "rows", title=f"generate -> {result.path}")
        for status, n in sorted(result.status_counts.items()):
            table.add_row(status, str(n))
        console.print(table)
        if result.extra.get("held_out"):
            console.print(f"held out for test before generation (never sent): {result.extra['held_out']} gold rows, "
                          f"in {run.layout.held_out_test}", highlight=False)
        s = result.stats
        console.print(f"cache hits {result.cache_hits}, requests sent {s.sent} (retried {s.retried}, failed {s.failed}), "
                      f"tokens {s.input_tokens}+{s.output_tokens}, cost this run ${s.cost:.4f}", highlight=False)
        if result.extra.get("batch"):
            b = result.extra["batch"]
            done = sum(1 for x in b["batches"] if x["processed"])
            console.print(f"batches {len(b['batches'])} ({done} finished), submitted this run {b['submitted_this_run']} "
                          f"(re-submitted {b['resubmitted']}), cost ${b['batch_cost_usd']:.4f} vs "
                          f"${b['online_cost_usd']:.4f} online", highlight=False)
        if result.stopped_reason:
            console.print(f"[yellow]stopped[/yellow]: {result.stopped_reason}; raise the cap to go on (what is cached "
                          "is kept and not paid again)", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_STOPPED)
        if result.status_counts.get("error"):
            console.print(f"[yellow]{result.status_counts['error']} rows failed[/yellow]; they are retried on the next run "
                          f"(up to teacher.max_attempts={r.teacher.max_attempts})")
            raise typer.Exit(EXIT_STAGE_FAILED)

    @app.command()
    def estimate(
        recipe: Path = typer.Argument(..., help="Recipe YAML"),
        sample: int = typer.Option(0, "--sample", help="Send N real requests (cached, not wasted) to measure output length"),
        max_cost: float | None = typer.Option(None, "--max-cost", help="Cap for the sampled requests (default teacher.max_cost)"),
    ) -> None:
        """Price a generation run before it starts."""
        from stepwise.pipelines.estimate import estimate_run

        r = load_or_exit(recipe)
        try:
            est = estimate_run(r, sample=sample, max_cost=max_cost)
        except DataFileError as exc:
            console.print(f"[red]error[/red] {exc}", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        table = Table("", "value", title=f"estimate: {r.name} ({r.teacher.model})")
        for k, v in est.items():
            table.add_row(k, str(v))
        console.print(table)
        if est.get("sample stopped"):
            console.print(f"[yellow]stopped[/yellow]: {est['sample stopped']}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_STOPPED)
