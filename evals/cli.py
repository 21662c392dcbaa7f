"""`stepwise eval` and `stepwise compare` (registered by stepwise.cli's plugin loader).

stepwise.cli is imported inside the commands, not at module level: `python -m stepwise.cli` runs
it as `__main__`, and a module-level import would load a second copy that re-registers plugins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
out = Console()
if not out.is_terminal:  # logs and pipes: don't squeeze tables into 80 columns
    out = Console(width=200)


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3g}"


def _ci(m: dict[str, Any]) -> str:
    if m.get("ci_low") is None:
        return _fmt(m.get("value"))
    return f"{_fmt(m['value'])} [{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"


class _Bar:
    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="row", file=console.file, leave=False)

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def print_task(report: dict[str, Any]) -> None:
    table = Table(title=f"task: {report['model']} on {report['n']} test rows ({report['task_type']})")
    table.add_column("metric")
    table.add_column("value % [95% CI]")
    for name, m in report["metrics"].items():
        table.add_row(name, _ci(m))
    out.print(table)
    if report["task_type"] == "classification":
        pc = Table(title="per class")
        for col in ("class", "precision", "recall", "f1", "support"):
            pc.add_column(col)
        for c, v in report["per_class"].items():
            pc.add_row(c, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"]))
        out.print(pc)
    out.print(f"parse status: {report['parse_status']}", highlight=False)
    for fix, n in (report.get("repairs") or {}).items():
        if n:  # answers scored after curation's repair (e.g. a bare query clause wrapped as {"query": ...})
            out.print(f"repaired: {fix} on {n} of {report['n']} answers", highlight=False)
    comp = report.get("base_comparison")
    if comp:
        print_base_comparison(comp, report["model"])


def print_base_comparison(comp: dict[str, Any], student: str) -> None:
    table = Table(title=f"student vs base: {student} vs {comp['base']} on the same {comp['n_paired']} test rows"
                        + (" (base cached)" if comp.get("cached") else ""))
    for col in ("metric", "base %", "student %", "student - base (pts) [95% CI]", "p", "verdict"):
        table.add_column(col)
    for name, m in comp["metrics"].items():
        lo, hi = m["delta_ci"]
        change = f"{100 * m['delta']:+.1f}" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None else "")
        p = m.get("mcnemar_p") if m.get("mcnemar_p") is not None else m.get("p_value")
        table.add_row(name, _fmt(m["base"]), _fmt(m["student"]), change, "-" if p is None else f"{p:.3f}",
                      m["verdict"])
    out.print(table)
    color = "green" if comp.get("learned") else "yellow"
    out.print(f"[{color}]{comp['summary']}[/{color}]", highlight=False)


def print_student_vs_teacher(table: dict[str, Any]) -> None:
    from stepwise.evals.teacher_compare import table_rows

    columns, rows = table_rows(table)
    t = Table(title=f"student vs teacher on the same {table.get('n')} test items "
                    f"(student at ${table['student_cost_per_hour']:g}/h)")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    out.print(t)
    out.print(f"break-even: {table['break_even']['text']}", highlight=False)


def print_forgetting(rep: dict[str, Any]) -> None:
    gate = rep["gate"]
    table = Table(title=f"forgetting: {rep['base']} -> {rep['model']} "
                        f"(max drop {100 * gate['max_drop']:.1f} {'points' if gate['drop_kind'] == 'absolute' else '% rel.'})")
    for col in ("benchmark", "n", "before %", "after %", "change (pts) [95% CI]", "relative", "p", "status"):
        table.add_column(col)
    for name, r in rep["benchmarks"].items():
        status = "[red]DROP[/red]" if r["exceeds_max_drop"] else "[green]ok[/green]"
        if r["in_domain"]:
            status += " [yellow](in-domain)[/yellow]"
        lo, hi = r["delta_ci"]
        change = f"{100 * r['delta']:+.1f}" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None else "")
        rel = f"{100 * r['relative']:+.1f}%" if r["relative"] is not None else "-"
        p = f"{r['p_value']:.3f}" if r["p_value"] is not None else "-"
        table.add_row(name, str(r["n"]), _ci(r["before"]), _ci(r["after"]), change, rel, p, status)
    out.print(table)
    if rep.get("in_domain"):
        out.print(f"[yellow]in-domain[/yellow]: {', '.join(rep['in_domain'])} was mixed into training as general "
                  "data; its score is not a clean forgetting signal.")
    verdict = gate.get("verdict", "passed" if gate["passed"] else "failed")
    for name, why in (gate.get("not_measured") or {}).items():
        out.print(f"[red]{name}: NOT measured[/red] ({why})", highlight=False)
    if verdict == "passed":
        out.print("[green]gate passed[/green]: no benchmark dropped more than the recipe's max_drop")
    elif verdict == "not_measured" and not gate.get("failed"):
        out.print("[red]gate NOT MEASURED[/red]: a configured benchmark has no before/after score, so the gate "
                  "cannot pass")
    else:
        out.print(f"[red]gate FAILED[/red]: {', '.join(gate['failed'])} dropped more than "
                  f"{100 * gate['max_drop']:.1f} {'points' if gate['drop_kind'] == 'absolute' else '%'}. Mitigations:")
        for m in gate["mitigations"]:
            out.print(f"  - {m}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        recipe: Path = typer.Argument(..., help="Recipe YAML"),
        run_dir: Path = typer.Option(None, "--run-dir", help="Run directory (default: the recipe's latest run)"),
        model: str = typer.Option(None, "--model", help="Student: known name, HF dir, adapter dir, run train dir, "
                                                         "a GGUF file (through llama.cpp, e.g. <run>/package/student-f16.gguf), "
                                                         "or openai:<model>@<base_url> (default: newest in <run>/train/)"),
        base: str = typer.Option(None, "--base", help="Base model to compare against (default: training.base_model)"),
        skip_task: bool = typer.Option(False, "--skip-task", help="Only the forgetting eval"),
        skip_forgetting: bool = typer.Option(False, "--skip-forgetting", help="Only the task eval"),
        compare_base: bool = typer.Option(None, "--compare-base/--no-compare-base",
                                          help="Run the base model on the test items too and report student vs "
                                               "base (default: eval.task.compare_base)"),
        teacher: bool = typer.Option(None, "--teacher/--no-teacher",
                                     help="Score the teacher on the test items too (cached answers, the rest asked "
                                          "under the cost cap) and write eval/student_vs_teacher.json "
                                          "(default: eval.task.compare_teacher)"),
        offline: bool = typer.Option(False, "--offline", help="Teacher answers from the cache only; missing ones: "
                                                              "the teacher is not scored (a note)"),
        max_cost: float = typer.Option(None, "--max-cost", help="Cost cap for teacher requests (default: "
                                                                "teacher.max_cost)"),
    ) -> None:
        """Did the student learn the task, and did it forget what it knew? Writes eval/task.json and
        eval/forgetting.json; exits 4 when forgetting exceeds eval.forgetting.max_drop, or when a
        configured forgetting benchmark could not be measured (the gate's `not_measured` verdict)."""
        from stepwise.evals.runner import gate_summary, run_eval
        from stepwise.evals.task_eval import ContaminationError

        from stepwise.cli_support import EXIT_BAD_INPUT, EXIT_GATE_FAILED, load_or_exit
        from stepwise.rundir import resolve_run

        r = load_or_exit(recipe)
        try:
            run = resolve_run(r, run_dir, create=False)
            outcome = run_eval(r, run, model=model, base=base, skip_task=skip_task, skip_forgetting=skip_forgetting,
                               compare_base=compare_base, compare_teacher=teacher, offline=offline,
                               max_cost=max_cost, log=lambda m: console.print(m, highlight=False, markup=False), progress_factory=_Bar)
        except ContaminationError as exc:
            console.print(f"[red]contamination[/red]: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except (FileNotFoundError, ValueError) as exc:
            console.print(f"[red]error[/red]: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        for note in outcome.notes:
            console.print(f"[yellow]note[/yellow]: {note}", highlight=False, soft_wrap=True)
        if outcome.task:
            print_task(outcome.task)
        if outcome.student_vs_teacher:
            print_student_vs_teacher(outcome.student_vs_teacher)
        if outcome.forgetting:
            print_forgetting(outcome.forgetting)
        console.print(f"wrote {', '.join(str(p) for p in outcome.outputs)}", highlight=False, soft_wrap=True)
        color = {"passed": "green", "failed": "red", "not_measured": "red"}.get(outcome.gate_verdict, "yellow")
        console.print(f"[{color}]{gate_summary(outcome.gate)}[/{color}]", highlight=False, soft_wrap=True)
        if outcome.gate_blocks:  # failed, or configured but not measured: never a silent pass
            raise typer.Exit(EXIT_GATE_FAILED)

    @app.command("compare")
    def compare_cmd(
        runs: list[Path] = typer.Argument(..., help="Run directories (each with eval/task.json and/or forgetting.json), "
                                          "or an experiment directory (`stepwise experiment`: all its points)"),
        out_dir: Path = typer.Option(None, "--out", help="Where compare.json/.md/.svg go (default: the first run's eval/)"),
    ) -> None:
        """Side by side: task metrics, forgetting deltas, trainable parameters, peak memory and wall
        time per run, with paired significance tests against the first run."""
        from stepwise.evals.compare import compare_runs, write_compare

        from stepwise.cli_support import EXIT_BAD_INPUT

        try:
            result = compare_runs(runs)
        except FileNotFoundError as exc:
            console.print(f"[red]error[/red]: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        first = Path(runs[0])  # an experiment directory keeps its comparison beside experiment.html
        paths = write_compare(result, out_dir or (first if (first / "experiment.json").exists() else first / "eval"))
        out.print(rich_table(result))
        console.print(f"wrote {', '.join(str(p) for p in paths)}", highlight=False, soft_wrap=True)


def rich_table(result: dict[str, Any]) -> Table:
    table = Table(title="stepwise compare")
    for col in result["columns"]:
        table.add_column(col)
    for row in result["table"]:
        table.add_row(*[str(c) for c in row])
    return table
