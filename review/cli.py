"""`stepwise review ...`: the embedded Argilla server and the review round-trip.

    stepwise review serve [--port N] [--host H]        start (or reuse) the embedded server
    stepwise review status [RECIPE [--run-dir DIR]]    the server; with a recipe, the review's progress
    stepwise review stop
    stepwise review push RECIPE [--run-dir DIR]         send curated rows to Argilla
    stepwise review pull RECIPE [--run-dir DIR] [--accept-pending]
                                                        reviewed.jsonl + rejected.jsonl + agreement.json;
                                                        exit 3 while pushed rows are still pending
    stepwise review auto RECIPE [--run-dir DIR]         accept every curated row (review.mode: auto)
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

review_app = typer.Typer(help="Human review in Argilla (embedded server by default).", no_args_is_help=True)

EXIT_STAGE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_WAITING = 3  # reviewers are not done: resumable, like `stepwise run`'s exit 3


def _server(state_dir: Path | None):
    from stepwise.argilla_embedded.server import EmbeddedServer

    return EmbeddedServer(state_dir)


@review_app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1 unless you mean to share it)."),
    port: int | None = typer.Option(None, help="Port (default 6900, or a free one)."),
    search_engine: str = typer.Option(
        "embedded", help="embedded (SQLite, no Elasticsearch) | elasticsearch | opensearch"
    ),
    search_url: str | None = typer.Option(None, help="Elasticsearch/OpenSearch URL for those engines."),
    state_dir: Path | None = typer.Option(None, help="State dir (default .state/argilla or $STEPWISE_ARGILLA_STATE)."),
    workspace: str = typer.Option("stepwise", help="Workspace created for the owner on first start."),
) -> None:
    """Start the Argilla server (Redis + worker + web UI) or reuse the running one."""
    from stepwise.argilla_embedded.server import ServerError, login_help

    if search_engine not in ("embedded", "elasticsearch", "opensearch"):
        typer.echo(f"error: --search-engine must be embedded, elasticsearch or opensearch, not {search_engine!r}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    srv = _server(state_dir)
    try:
        info, started = srv.serve(host=host, port=port, search_engine=search_engine,  # type: ignore[arg-type]
                                  search_url=search_url, workspace=workspace)
    except ServerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None
    creds = srv.credentials()
    typer.echo("started" if started else "already running (reused)")
    if creds is not None:
        typer.echo(login_help(info, creds, srv.credentials_path))


@review_app.command()
def status(
    recipe: Path | None = typer.Argument(None, help="Recipe YAML: show how far the reviewers are with its run"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the latest run)"),
    state_dir: Path | None = typer.Option(None, help="State dir of the server."),
) -> None:
    """Show whether the embedded server runs; with RECIPE, the review's progress per annotator."""
    if recipe is not None:
        _progress(recipe, run_dir)
        return
    st = _server(state_dir).status()
    typer.echo(json.dumps(st, indent=2))
    if not st.get("running"):
        raise typer.Exit(1)


def _progress(recipe: Path, run_dir: Path | None) -> None:
    from stepwise.review.argilla import ReviewError
    from stepwise.review.stage import review_progress

    r, run = _recipe_and_run(recipe, run_dir)
    try:
        p = review_progress(r, run)
    except (ReviewError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    typer.echo(f"run {run.path}: dataset '{p['dataset']}' in workspace '{p['workspace']}' at {p['url']}")
    typer.echo(f"{p['reviewed']} of {p['pushed']} reviewed ({p['submitted']} submitted, {p['corrected']} corrected, "
               f"{p['discarded']} discarded), {p['pending']} pending; a row needs {p['min_submitted']} submitted "
               "response(s)" + (f"; {p['missing_in_argilla']} pushed rows missing from the dataset"
                                if p["missing_in_argilla"] else ""))
    if not p["annotators"]:
        typer.echo("no responses yet")
        return
    width = max(9, *(len(u) for u in p["annotators"]))
    typer.echo(f"{'annotator':<{width}}  submitted  discarded  draft")
    for user, n in p["annotators"].items():
        typer.echo(f"{user:<{width}}  {n['submitted']:>9}  {n['discarded']:>9}  {n['draft']:>5}")


@review_app.command()
def stop(state_dir: Path | None = typer.Option(None, help="State dir of the server.")) -> None:
    """Stop the embedded server, its worker and Redis (data is kept)."""
    typer.echo("stopped" if _server(state_dir).stop() else "not running")


def _recipe_and_run(recipe: Path, run_dir: Path | None):
    from stepwise.cli_support import load_or_exit
    from stepwise.rundir import resolve_run

    r = load_or_exit(recipe)
    try:
        run = resolve_run(r, run_dir, create=False)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    return r, run


@review_app.command()
def push(
    recipe: Path = typer.Argument(..., help="Recipe YAML"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the latest run)"),
) -> None:
    """Send curated train/val rows (all, or a sample) to Argilla for review."""
    from stepwise.review.argilla import ReviewError
    from stepwise.review.stage import push as do_push

    r, run = _recipe_and_run(recipe, run_dir)
    try:
        rep = do_push(r, run, log=typer.echo)
    except (ReviewError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    typer.echo(
        f"pushed {rep.sent}/{rep.selected} rows to '{rep.dataset}' ({rep.created} new, {rep.updated} updated, "
        f"{len(rep.errors)} errors) at {rep.url} in {rep.wall_s:.1f}s"
    )
    if rep.errors and rep.sent == 0:
        raise typer.Exit(EXIT_BAD_INPUT)


@review_app.command()
def pull(
    recipe: Path = typer.Argument(..., help="Recipe YAML"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the latest run)"),
    accept_pending: bool = typer.Option(
        False, "--accept-pending", help="Pull although rows are still pending: they train with the teacher's answer"),
) -> None:
    """Write review/reviewed.jsonl, rejected.jsonl and agreement.json from the reviewers' work
    (exit 3 while pushed rows are still pending, unless --accept-pending)."""
    from stepwise.review.argilla import ReviewError
    from stepwise.review.stage import ReviewPending
    from stepwise.review.stage import pull as do_pull

    r, run = _recipe_and_run(recipe, run_dir)
    try:
        summary = do_pull(r, run, accept_pending=accept_pending, log=typer.echo)
    except ReviewPending as exc:
        typer.echo(f"waiting: {exc}", err=True)
        raise typer.Exit(EXIT_WAITING) from None
    except (ReviewError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    typer.echo(json.dumps({"counts": summary["counts"], "teacher_accuracy": summary.get("teacher_accuracy")}, indent=2))


@review_app.command()
def auto(
    recipe: Path = typer.Argument(..., help="Recipe YAML"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the latest run)"),
) -> None:
    """Accept every curated train/val row without human review (review.mode: auto)."""
    from stepwise.review.stage import review_auto

    r, run = _recipe_and_run(recipe, run_dir)
    try:
        summary = review_auto(r, run)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    typer.echo(f"review (auto): {summary['counts']['auto_accepted']} rows accepted -> {run.layout.stage_dir('review')}")
    pushed = run.layout.review_push
    if pushed.exists():  # asked for explicitly, but the reviews made in Argilla must not vanish unsaid
        typer.echo(f"warning: {pushed} records rows pushed to Argilla; their reviews are NOT used. "
                   "`stepwise review pull` applies them.", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(review_app, name="review")
