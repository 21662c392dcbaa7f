"""`stepwise train`: run Axolotl's preprocess and train on a config, inside a run directory.

The config is checked (stepwise.training.checks), then a resolved copy is written to
`<run>/train/<config-name>/axolotl.yaml`: dataset paths made absolute, `output_dir` and
`dataset_prepared_path` inside the run, the CPU profile applied with `--cpu`, `max_steps` with
`--max-steps`. Axolotl runs its own entry points, preprocess then train (`axolotl_cmd`), or
`accelerate launch --num_processes N <venv>/bin/axolotl train --launcher python` with N =
`training.num_gpus` (`train_command`), with the offline environment. Output goes to `preprocess.log` / `train.log`.

Checkpoints and resuming (stepwise.training.checkpoints): the same config (same resolved content and data)
resumes from its last complete checkpoint after a kill, passed to Axolotl as
`resume_from_checkpoint`; a changed config moves the earlier output aside first, so a trained
model is never overwritten. The loss curve (`loss.csv`, the manifest's `train` stage) is read
from the trainer's own `trainer_state.json` log history when training ends; a run that recorded
no loss fails the stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from stepwise.training.checkpoints import LOSS_FIELDS, config_identity, prepare_output_dir
from stepwise.training.checks import local_model_config_dir
from stepwise.training.common import OFFLINE_ENV, TrainError, TrainResult, dump_yaml, finish, trainer_env
from stepwise.training.configgen import apply_cpu_profile

from stepwise.io import atomic_write_text
from stepwise.rundir import RunDir

# The shared types are re-exported: callers name the Axolotl launcher's results as they always have.
__all__ = ["LOSS_FIELDS", "OFFLINE_ENV", "TrainError", "TrainResult", "merge_lora", "train"]


def axolotl_cmd(command: str, config: Path, *args: str) -> list[str]:
    """`python -m axolotl.cli.<command> <config>`, run as `python -c` with the same entry point.

    Why not `-m`: datasets 4.x saves every prepared split through a `spawn` multiprocessing pool
    (even with num_proc=1), and a spawned child re-imports the parent's `__main__` module; under
    `-m axolotl.cli.preprocess` that is all of torch + axolotl again, tens of seconds per split on a
    small CPU box. A `-c` main has no module to re-import, so the children start in about a second.
    """
    module = {"merge-lora": "merge_lora"}.get(command, command)
    code = f"import fire; from axolotl.cli.{module} import do_cli; fire.Fire(do_cli)"
    return [sys.executable, "-c", code, str(config), *args]


def train_command(config: Path, gpus: int) -> list[str]:
    """One process, or `accelerate launch --num_processes <gpus>` of the `axolotl train` entry point
    (the console script beside this interpreter) with `--launcher python`, so each of the processes
    accelerate starts trains in place instead of launching accelerate again. Not `-m
    axolotl.cli.train`: see `axolotl_cmd` for why a `-m` main costs every spawned worker a full
    re-import. DeepSpeed/FSDP come from the config's own `deepspeed` / `fsdp_config` keys, which
    Axolotl hands to accelerate."""
    if gpus > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
                str(Path(sys.executable).parent / "axolotl"), "train", str(config), "--launcher", "python"]
    return axolotl_cmd("train", config)


def processes_for(num_gpus: int | None, visible: int, config_path: Path) -> int:
    """GPU processes to launch: `num_gpus` as asked (None: all visible), never more than are visible."""
    if num_gpus is None:
        return visible
    if num_gpus > 1 and num_gpus > visible:
        raise TrainError(f"{config_path}: training.num_gpus is {num_gpus} but {visible} GPU(s) are visible "
                         "(CUDA_VISIBLE_DEVICES); lower num_gpus or make the GPUs visible")
    return min(num_gpus, visible)  # one asked on a machine without a GPU: one CPU process, as ever


def visible_gpus() -> int:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch / no driver
        return 0


def infer_run_dir(cfg: dict[str, Any], base_dir: Path) -> Path | None:
    """The run a config's data belongs to: <run>/export/train.chat.jsonl -> <run>."""
    for ds in cfg.get("datasets") or []:
        p = Path(str(ds.get("path", "")))
        p = p if p.is_absolute() else base_dir / p
        if p.parent.name == "export":
            return p.parent.parent
    return None


def resolve_config(cfg: dict[str, Any], *, base_dir: Path, out_dir: Path, prepared: Path, cpu: bool,
                   max_steps: int | None) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg))  # deep copy of plain YAML data
    for section in ("datasets", "test_datasets"):
        for ds in out.get(section) or []:
            p = Path(str(ds.get("path", ""))).expanduser()
            if not p.is_absolute() and (base_dir / p).exists():
                ds["path"] = str((base_dir / p).resolve())
    for key in ("base_model", "lora_model_dir"):  # a local checkpoint (DPO's SFT model) named relative to base_dir
        value = out.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (base_dir / value).exists():
            out[key] = str((base_dir / value).resolve())
    out["output_dir"] = str(out_dir.resolve())
    out["dataset_prepared_path"] = str(prepared.resolve())
    if cpu:
        out = apply_cpu_profile(out, local_model_config_dir(str(out.get("base_model", ""))))
    if max_steps:
        out["max_steps"] = max_steps
        out.pop("evals_per_epoch", None)  # a few smoke steps: no evals (checkpoints stay: the last holds the losses)
        out["eval_strategy"] = "no"
    return out


def _run(cmd: list[str], log_path: Path, env: dict[str, str], on_line: Callable[[str], None] | None) -> int:
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1, errors="replace")
        assert proc.stdout is not None
        for raw in proc.stdout:
            # tqdm redraws with \r; keep each state as its own line in the log
            for line in raw.replace("\r", "\n").splitlines():
                if line.strip():
                    log.write(line + "\n")
                    if on_line:
                        on_line(line)
        return proc.wait()


def train(
    config_path: Path,
    *,
    run_dir: Path | None = None,
    cpu: bool = False,
    max_steps: int | None = None,
    base_dir: Path | None = None,
    num_gpus: int | None = None,
    on_event: Callable[[str, Any], None] | None = None,
) -> TrainResult:
    """Preprocess + train one Axolotl config inside its run. `num_gpus` (the recipe's
    `training.num_gpus`; None: every visible GPU, for a config trained without its recipe) sets the
    process count; more than are visible is an error, not a silent smaller run. `cpu`: one process."""
    base_dir = base_dir or Path.cwd()
    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    name = config_path.stem
    run_path = Path(run_dir) if run_dir else infer_run_dir(cfg, base_dir)
    if run_path is None:
        raise TrainError(f"{config_path}: cannot tell which run this config belongs to; pass --run-dir")
    run = RunDir(run_path)
    stage_name = "train_dpo" if cfg.get("rl") else "train"  # DPO keeps the SFT run's record
    if cfg.get("rl"):
        start = Path(str(cfg.get("base_model", ""))).expanduser()
        start = start if start.is_absolute() else base_dir / start
        if not (start / "config.json").exists():
            raise TrainError(f"{config_path}: DPO starts from the SFT checkpoint {cfg.get('base_model')}, which is not a "
                             "model directory yet: train the SFT config (LoRA/QLoRA: with --merge) first")
        for ds in cfg.get("datasets") or []:
            p = Path(str(ds.get("path", ""))).expanduser()
            if not (p if p.is_absolute() else base_dir / p).exists():
                raise TrainError(f"{config_path}: {ds.get('path')} not found: run `stepwise export --preferences` first")
    if str(cfg.get("save_strategy", "")).lower() == "no":
        raise TrainError(f"{config_path}: save_strategy: no leaves no checkpoint and no trainer state (the loss record "
                         "and the point a killed run resumes from); remove it (training.save_every_steps sets the "
                         "interval)")
    out_dir = run.layout.train_output(name)
    resolved = resolve_config(cfg, base_dir=base_dir, out_dir=out_dir, prepared=run.layout.prepared,
                              cpu=cpu, max_steps=max_steps)
    data_files = [Path(ds["path"]) for s in ("datasets", "test_datasets") for ds in resolved.get(s) or []
                  if Path(str(ds.get("path"))).exists()]
    identity, payload = config_identity(resolved, data_files)
    plan = prepare_output_dir(run, name, identity, payload, stage=stage_name, source=config_path)
    # Resume explicitly from the last complete checkpoint (or not at all): Axolotl's auto-resume would
    # take the highest-numbered folder even when a kill left it half-written.
    resolved["resume_from_checkpoint"] = str(plan.resume_from.resolve()) if plan.resume_from else None
    resolved["auto_resume_from_checkpoints"] = False
    if resolved["resume_from_checkpoint"] is None:
        resolved.pop("resume_from_checkpoint")
    resolved_path = out_dir / "axolotl.yaml"
    header = f"# Resolved by `stepwise train` from {config_path}{' (cpu profile)' if cpu else ''}\n"
    atomic_write_text(resolved_path, header + dump_yaml(resolved))

    env = trainer_env(wandb=bool(resolved.get("wandb_project")))  # training.tracking.wandb: W&B stays on
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    gpus = 0 if cpu else processes_for(num_gpus, visible_gpus(), config_path)
    train_cmd = train_command(resolved_path, gpus)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""

    result = TrainResult(name=name, out_dir=out_dir, config_path=resolved_path, resumed_from_step=plan.resume_step,
                         moved_aside=plan.moved_aside)
    emit = on_event or (lambda kind, payload: None)
    for line in plan.describe():
        emit("note", line)
    started = time.time()
    with run.stage(stage_name, inputs=[*data_files, config_path], params={"config": name, "cpu": cpu,
                                                                       "max_steps": max_steps}) as st:
        emit("phase", "preprocess")
        rc = _run(axolotl_cmd("preprocess", resolved_path), out_dir / "preprocess.log", env,
                  lambda line: emit("log", line))
        if rc != 0:
            raise TrainError(f"axolotl preprocess failed (exit {rc}); see {out_dir / 'preprocess.log'}")
        emit("phase", f"train (log: {out_dir / 'train.log'})")
        rc = _run(train_cmd, out_dir / "train.log", env, lambda line: emit("log", line))
        if rc != 0:
            raise TrainError(f"axolotl train failed (exit {rc}); see {out_dir / 'train.log'}")
        result.wall_s = round(time.time() - started, 2)
        finish(result, st, extra={"gpus": gpus, "cpu": cpu}, emit=emit)
    return result


def merge_lora(resolved_config: Path, *, adapter_dir: Path | None = None, log_path: Path | None = None) -> Path:
    """Axolotl's merge-lora on a trained adapter; returns `<output_dir>/merged`."""
    cfg = yaml.safe_load(resolved_config.read_text(encoding="utf-8"))
    out_dir = Path(cfg["output_dir"])
    adapter_dir = adapter_dir or out_dir
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    cmd = axolotl_cmd("merge-lora", resolved_config, f"--lora-model-dir={adapter_dir}")
    rc = _run(cmd, log_path or out_dir / "merge.log", env, None)
    merged = out_dir / "merged"
    if rc != 0 or not (merged / "config.json").exists():
        raise TrainError(f"axolotl merge-lora failed (exit {rc}); see {log_path or out_dir / 'merge.log'}")
    return merged
