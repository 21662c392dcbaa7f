"""`stepwise configs`, `stepwise plan`, `stepwise train` (registered by stepwise.cli)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from stepwise.recipe import TrainingSpec

console = Console(stderr=True)
_SPEC = TrainingSpec.model_fields  # `stepwise plan`'s defaults are the recipe's
EXIT_STAGE_FAILED = 1
EXIT_BAD_INPUT = 2


def _print_report(report, quiet_ok: bool = False) -> None:
    for p in report.problems:
        color = "red" if p.level == "error" else "yellow"
        console.print(f"[{color}]{p.level}[/{color}] {p.format(report.label)}", highlight=False, soft_wrap=True)
    if report.ok and not quiet_ok:
        how = "Axolotl schema + normalize" if report.axolotl_normalized else (
            "Axolotl schema" if report.axolotl_validated else "our checks")
        console.print(f"[green]ok[/green] {report.label} ({how})", highlight=False)


def configs_cmd(
    recipe: Path | None = typer.Argument(None, help="Recipe YAML"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run whose export/ data the configs train on"),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: <run>/configs/ with --run-dir, "
                                    "else axolotl_configs/<recipe>/)"),
    check: list[Path] = typer.Option([], "--check", help="Check a (hand-edited) Axolotl config instead"),
    cpu: bool = typer.Option(False, "--cpu", help="With --check: check against the CPU profile"),
    no_data: bool = typer.Option(False, "--no-data", help="Do not read the exported data (stable templates)"),
    allow_missing_data: bool = typer.Option(False, "--allow-missing-data", help="Missing data files warn only"),
    num_gpus: int | None = typer.Option(None, "--num-gpus", help="With --check: GPUs the config runs on"),
) -> None:
    """Write ready-to-launch Axolotl configs from the recipe's `training` section, each checked by
    Axolotl's own schema and our strict checks; or `--check` existing configs."""
    from stepwise.training.backends import check_config

    if check:
        failed = False
        for path in check:
            report = check_config(path, profile="cpu" if cpu else None, num_gpus=num_gpus,
                                  allow_missing_data=allow_missing_data)
            _print_report(report)
            failed |= not report.ok
        raise typer.Exit(EXIT_BAD_INPUT if failed else 0)
    if recipe is None:
        console.print("[red]error[/red] give a recipe, or --check <config.yaml>")
        raise typer.Exit(EXIT_BAD_INPUT)

    from stepwise.training.configs_stage import OPENAI_NOTE, ConfigsFailed, write_checked_configs

    from stepwise.cli_support import load_or_exit

    r = load_or_exit(recipe)
    run = None
    if run_dir is not None:
        from stepwise.rundir import resolve_run

        try:
            run = resolve_run(r, run_dir, create=False)
        except FileNotFoundError as exc:
            console.print(f"[red]error[/red] {exc}", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
    # the same function as `stepwise run`'s configs stage: inside a run it writes <run>/configs/ and
    # records the stage (train_config) only when every config passed its checks
    try:
        outcome = write_checked_configs(r, run=run, out_dir=out, use_data=not no_data,
                                        allow_missing_data=allow_missing_data, relative_to=Path.cwd())
        failed = False
    except ConfigsFailed as exc:
        outcome, failed = exc.outcome, True
    except ValueError as exc:
        console.print(f"[red]error[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if outcome.backend == "openai":
        console.print(OPENAI_NOTE, highlight=False)
        return
    table = Table("config", "modality", "peak GB", "fits", "checks")
    for gc, path, report in zip(outcome.configs, outcome.paths, outcome.reports, strict=True):
        _print_report(report, quiet_ok=True)
        est = gc.estimate
        pick = " (auto)" if gc.auto_pick == gc.modality else ""
        table.add_row(str(path), gc.modality + pick, f"{est.total_gb:.2f}" if est else "?",
                      ("yes" if est.fits(r.training.gpu_memory_gb) else "no") if est else "?",
                      "[green]ok[/green]" if report.ok else "[red]failed[/red]")
    Console(stderr=True).print(table)
    if failed:
        if run is not None:
            console.print(f"[red]configs stage failed[/red] in {run.path}: fix the recipe's `training` section and "
                          "run this again", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    if run is not None:
        console.print(f"configs stage done in {run.path}; `stepwise run` trains {outcome.train_config}",
                      highlight=False)


def plan_cmd(
    model: str | None = typer.Option(None, "--model", help="Known name, HF dir, config.json, or llama-7b/13b/34b/70b..."),
    gpu_memory: float = typer.Option(_SPEC["gpu_memory_gb"].default, "--gpu-memory", help="GB per GPU"),
    num_gpus: int = typer.Option(_SPEC["num_gpus"].default, "--num-gpus"),
    zero: int = typer.Option(0, "--zero", help="DeepSpeed ZeRO stage (3 = also FSDP full shard)"),
    seq: int = typer.Option(2048, "--seq", help="Sequence length"),
    micro_batch: int = typer.Option(1, "--micro-batch"),
    lora_r: int = typer.Option(_SPEC["lora_r"].default, "--lora-r"),
    target: str = typer.Option(_SPEC["lora_target"].default, "--target", help="linear, attention, qv"),
    optimizer: str | None = typer.Option(None, "--optimizer", help="Default: adamw_torch (full/LoRA), paged_adamw_8bit (QLoRA)"),
    no_checkpointing: bool = typer.Option(False, "--no-gradient-checkpointing"),
    seeds_table: bool = typer.Option(False, "--seeds-table", help="Reproduce the seeds' VRAM table"),
    unsloth: bool = typer.Option(False, "--unsloth", help="LoRA/QLoRA with Unsloth's offloaded checkpointing + kernels"),
) -> None:
    """Which modality fits the GPU, and how much memory each needs (before renting one)."""
    from stepwise.training.shapes import resolve_shape
    from stepwise.training.vram import (
        SEED_TOLERANCE,
        PlanInput,
        choose_modality,
        compare_with_seed_table,
        estimate,
    )

    out = Console()
    if seeds_table:
        table = Table("model", "modality", "seeds GB", "planner GB", "diff", "agrees", "#")
        rows = compare_with_seed_table()
        for i, row in enumerate(rows, start=1):
            table.add_row(row.model, row.modality, f"{row.table_gb:g}", f"{row.planner_gb:.1f}", f"{row.rel_diff:+.1%}",
                          f"yes (±{SEED_TOLERANCE[row.modality]:.0%})" if row.within else "[yellow]no[/yellow]", str(i))
        out.print(table)
        for i, row in enumerate(rows, start=1):
            out.print(f"{i:>2}. {row.model} {row.modality}: {row.note}", highlight=False, soft_wrap=True)
        return
    if model is None:
        console.print("[red]error[/red] --model is required (or --seeds-table)")
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        shape = resolve_shape(model)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    out.print(shape.describe())
    default_opt = {"full": "adamw_torch", "lora": "adamw_torch", "qlora": "paged_adamw_8bit"}
    estimates = {}
    table = Table("modality", "peak GB/GPU", "fits", "trainable", "weights", "grads+optim", "activations+logits")
    for m in ("full", "lora", "qlora"):
        plan = PlanInput(modality=m, lora_r=lora_r, lora_target=target, optimizer=optimizer or default_opt[m],
                         sequence_len=seq, micro_batch_size=micro_batch, gradient_checkpointing=not no_checkpointing,
                         zero_stage=zero, num_gpus=num_gpus, unsloth=unsloth)  # type: ignore[arg-type]
        est = estimate(shape, plan)
        estimates[m] = est
        p = est.parts
        table.add_row(m, f"{est.total_gb:.2f}", "[green]yes[/green]" if est.fits(gpu_memory) else "[red]no[/red]",
                      f"{est.trainable_params / 1e6:,.1f}M", f"{(p['weights'] + p['adapters']) / 1e9:.2f}",
                      f"{(p['gradients'] + p['optimizer']) / 1e9:.2f}", f"{(p['activations'] + p['logits']) / 1e9:.2f}")
    out.print(table)
    for m, est in estimates.items():
        for note in est.notes:
            out.print(f"{m}: {note}", highlight=False, soft_wrap=True)
    pick, why = choose_modality(estimates, gpu_memory)
    gpus = f"{num_gpus} x {gpu_memory:g} GB" if num_gpus > 1 else f"{gpu_memory:g} GB"
    out.print(f"On {gpus} (seq {seq}, micro batch {micro_batch}): [bold]{pick}[/bold] ({why})")


def train_cmd(
    config: Path = typer.Argument(..., help="Axolotl config (from `stepwise configs`), or the recipe for --backend openai"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: from the data paths)"),
    backend: str | None = typer.Option(None, "--backend", help="openai: hosted fine-tuning job from the recipe "
                                       "(default: the recipe's training.backend)"),
    detach: bool = typer.Option(False, "--detach", help="openai: create/resume the job and return without polling"),
    cpu: bool = typer.Option(False, "--cpu", help="Apply the CPU profile (no bf16/flash/packing, local model)"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps"),
    num_gpus: int | None = typer.Option(None, "--num-gpus", min=1, help="GPU processes (accelerate launch); default: "
                                        "the recipe's training.num_gpus in `stepwise run`, every visible GPU here"),
    merge: bool = typer.Option(False, "--merge", help="LoRA/QLoRA: merge the adapter into the base afterwards"),
    skip_checks: bool = typer.Option(False, "--skip-checks", help="Launch even if our checks fail"),
) -> None:
    """Run Axolotl preprocess + train with progress; logs and loss.csv land in <run>/train/<config>/.
    With a recipe whose training.backend is openai (or --backend openai): the hosted fine-tuning job."""
    from stepwise.training.openai_ft import is_openai_recipe, train_openai_cli

    if backend == "openai" or (backend is None and is_openai_recipe(config)):
        raise typer.Exit(train_openai_cli(config, run_dir, detach=detach))
    from stepwise.training.backends import check_config, config_backend, read_config, train
    from stepwise.training.common import TrainError
    from stepwise.training.launcher import merge_lora

    try:
        backend = config_backend(read_config(config))
    except ValueError as exc:
        console.print(f"[red]error[/red] {config}: {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    axolotl = backend.name == "axolotl"  # trl: our own config, no Axolotl CPU profile or merge
    if cpu and axolotl:  # check what will run: the config with the CPU profile applied
        import yaml
        from stepwise.training.checks import local_model_config_dir
        from stepwise.training.configgen import apply_cpu_profile

        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) if config.exists() else None
        if not isinstance(cfg, dict):
            report = check_config(config)
        else:
            cfg = apply_cpu_profile(cfg, local_model_config_dir(str(cfg.get("base_model", ""))))
            if max_steps:
                cfg["max_steps"] = max_steps
            report = check_config(cfg, profile="cpu")
            report.label = f"{config} (cpu profile)"
    else:
        report = check_config(config)
    _print_report(report, quiet_ok=True)
    if not report.ok and not skip_checks:
        raise typer.Exit(EXIT_BAD_INPUT)

    def on_event(kind: str, payload) -> None:
        if kind == "phase":
            console.print(f"[bold]{payload}[/bold] ...", highlight=False)
        elif kind == "note":  # resuming, or an earlier model moved aside
            console.print(f"[yellow]note[/yellow] {payload}", highlight=False, soft_wrap=True)
        elif kind == "loss":
            if payload["kind"] == "train":
                console.print(f"  step {payload['step']:>5}  loss {payload['loss']:.4f}  lr {payload['learning_rate']}"
                              f"  epoch {payload['epoch']}", highlight=False)
            else:
                console.print(f"  eval       eval_loss {payload['eval_loss']}", highlight=False)

    try:
        result = train(config, run_dir=run_dir, cpu=cpu, max_steps=max_steps, num_gpus=num_gpus, on_event=on_event)
        if merge and axolotl:
            merged = merge_lora(result.config_path)
            console.print(f"merged model: {merged}")
    except TrainError as exc:
        console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(EXIT_STAGE_FAILED) from None
    resumed = f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step is not None else ""
    console.print(f"[green]done[/green] {result.name}: {len(result.train_losses)} steps{resumed} in "
                  f"{result.wall_s:.0f}s; logs and loss.csv in {result.out_dir}", highlight=False)


def package_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the recipe's latest run)"),
    gguf: list[str] | None = typer.Option(
        None, "--gguf", help="GGUF types to write (f16, q8_0, bf16, f32; repeat the option); default the recipe's "
        "package.gguf"),
    no_gguf: bool = typer.Option(False, "--no-gguf", help="Merged weights and cards only (overrides package.gguf)"),
) -> None:
    """Ship the student: merged weights + tokenizer + model card in <run>/package/model, GGUF files,
    an Ollama Modelfile and the vLLM / Ollama commands (SERVE.md)."""
    from stepwise.training.gguf import OUTTYPES, ConversionError
    from stepwise.training.package import NoTrainedModel, run_package

    from stepwise.cli_support import load_or_exit
    from stepwise.rundir import resolve_run

    r = load_or_exit(recipe)
    bad = [g for g in gguf or [] if g not in OUTTYPES]
    if bad:
        console.print(f"[red]error[/red] --gguf {', '.join(bad)}: use {', '.join(OUTTYPES)}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        run = resolve_run(r, run_dir, create=False)
        # the command line overrides the recipe's package.gguf; neither option: the recipe's
        res = run_package(r, run, gguf=[] if no_gguf else list(dict.fromkeys(gguf)) if gguf else None,
                          log=lambda m: console.print(m, highlight=False))
    except (FileNotFoundError, NoTrainedModel) as exc:
        console.print(f"[red]error[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except ConversionError as exc:
        console.print(f"[red]error[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None
    console.print(f"[green]done[/green] {res.merged_from}; model card {res.model_dir / 'README.md'}", highlight=False)
    for kind, path in res.gguf.items():
        console.print(f"  GGUF {kind}: {path}", highlight=False)
    if not res.gguf:
        console.print("  no GGUF (package.gguf: [] or --no-gguf), so no Ollama Modelfile", highlight=False)
    console.print(f"  timings: {res.timings}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("configs")(configs_cmd)
    app.command("plan")(plan_cmd)
    app.command("train")(train_cmd)
    app.command("package")(package_cmd)
