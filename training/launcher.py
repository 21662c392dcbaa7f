"""`stepwise train`: run Axolotl's preprocess and train on a config, inside a run directory.

The config is checked (training.checks), then a resolved copy is written to
`<run>/train/<config-name>/axolotl.yaml`: dataset paths made absolute, `output_dir` and
`dataset_prepared_path` inside the run, the CPU profile applied with `--cpu`, `max_steps` with
`--max-steps`. Axolotl runs its own entry points, preprocess then train (`axolotl_cmd`), or
`accelerate launch --num_processes N -m axolotl.cli.train` when several GPUs are visible, with
the offline environment. Output goes to `preprocess.log` / `train.log`; the loss lines Axolotl's
trainer prints are parsed into `loss.csv` as they arrive, and the stage is recorded in the run's
manifest (`train`, inputs: data + config; outputs: loss.csv, the model/adapter files).
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stepwise.io import atomic_write_text
from stepwise.rundir import RunDir
from training.configgen import apply_cpu_profile, dump_yaml

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
}
LOSS_FIELDS = ["step", "epoch", "loss", "eval_loss", "grad_norm", "learning_rate", "kind"]
_DICT_LINE = re.compile(r"\{'(?:loss|eval_loss|train_runtime)'[^{}]*\}")


class TrainError(RuntimeError):
    pass


@dataclass
class TrainResult:
    name: str
    out_dir: Path
    config_path: Path
    losses: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.losses if r["kind"] == "train"]


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
    """One process, or `accelerate launch` with one process per visible GPU (DeepSpeed/FSDP come
    from the config's own `deepspeed` / `fsdp_config` keys, which Axolotl hands to accelerate)."""
    if gpus > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "-m",
                "axolotl.cli.train", str(config)]
    return axolotl_cmd("train", config)


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
        from training.checks import local_model_config_dir

        out = apply_cpu_profile(out, local_model_config_dir(str(out.get("base_model", ""))))
    if max_steps:
        out["max_steps"] = max_steps
        out["save_strategy"] = "no"  # a few smoke steps: save the final model only
        out.pop("saves_per_epoch", None)
        out.pop("evals_per_epoch", None)
        out["eval_strategy"] = "no"
    return out


def parse_log_line(line: str, state: dict[str, Any]) -> dict[str, Any] | None:
    """A loss row from one of the dicts HF's trainer prints, or None."""
    m = _DICT_LINE.search(line)
    if not m:
        return None
    try:
        d = ast.literal_eval(m.group(0))
    except (ValueError, SyntaxError):
        return None

    def num(key: str) -> float | None:
        v = d.get(key)
        try:
            return float(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    if "train_runtime" in d:
        state["summary"] = {k: num(k) for k in d}
        return None
    if "loss" in d:
        state["step"] = state.get("step", 0) + 1
        return {"step": state["step"], "epoch": num("epoch"), "loss": num("loss"), "eval_loss": None,
                "grad_norm": num("grad_norm"), "learning_rate": num("learning_rate"), "kind": "train"}
    return {"step": state.get("step", 0), "epoch": num("epoch"), "loss": None, "eval_loss": num("eval_loss"),
            "grad_norm": None, "learning_rate": None, "kind": "eval"}


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
    on_event: Callable[[str, Any], None] | None = None,
) -> TrainResult:
    base_dir = base_dir or Path.cwd()
    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if isinstance(cfg, dict) and cfg.get("backend") == "trl":  # training.backend: trl (IA3, prefix/prompt tuning)
        from training import trl_backend

        return trl_backend.train(config_path, run_dir=run_dir, cpu=cpu, max_steps=max_steps, base_dir=base_dir,
                                 on_event=on_event)
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
    out_dir = run.stage_dir("train") / name
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolve_config(cfg, base_dir=base_dir, out_dir=out_dir, prepared=run.path / "train" / "prepared",
                              cpu=cpu, max_steps=max_steps)
    resolved_path = out_dir / "axolotl.yaml"
    header = f"# Resolved by `stepwise train` from {config_path}{' (cpu profile)' if cpu else ''}\n"
    atomic_write_text(resolved_path, header + dump_yaml(resolved))

    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    gpus = 0 if cpu else visible_gpus()
    train_cmd = train_command(resolved_path, gpus)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""

    data_files = [Path(ds["path"]) for s in ("datasets", "test_datasets") for ds in resolved.get(s) or []
                  if Path(str(ds.get("path"))).exists()]
    result = TrainResult(name=name, out_dir=out_dir, config_path=resolved_path)
    loss_csv = out_dir / "loss.csv"
    state: dict[str, Any] = {}
    emit = on_event or (lambda kind, payload: None)
    started = time.time()
    with run.stage(stage_name, inputs=[*data_files, config_path], params={"config": name, "cpu": cpu,
                                                                       "max_steps": max_steps}) as st:
        emit("phase", "preprocess")
        rc = _run(axolotl_cmd("preprocess", resolved_path), out_dir / "preprocess.log", env,
                  lambda line: emit("log", line))
        if rc != 0:
            raise TrainError(f"axolotl preprocess failed (exit {rc}); see {out_dir / 'preprocess.log'}")
        emit("phase", "train")
        with loss_csv.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOSS_FIELDS)
            writer.writeheader()

            def on_line(line: str) -> None:
                row = parse_log_line(line, state)
                if row:
                    writer.writerow(row)
                    fh.flush()
                    result.losses.append(row)
                    emit("loss", row)
                emit("log", line)

            rc = _run(train_cmd, out_dir / "train.log", env, on_line)
        if rc != 0:
            raise TrainError(f"axolotl train failed (exit {rc}); see {out_dir / 'train.log'}")
        result.wall_s = round(time.time() - started, 2)
        result.summary = state.get("summary", {})
        produced = [p for p in sorted(out_dir.iterdir()) if p.suffix in {".safetensors", ".json"} and p.is_file()]
        st.outputs(loss_csv, resolved_path, *produced)
        losses = result.train_losses
        st.counts(steps=len(losses))
        st.extra(config=name, final_loss=losses[-1] if losses else None, first_loss=losses[0] if losses else None,
                 gpus=gpus, cpu=cpu)
        atomic_write_text(out_dir / "summary.json", json.dumps(
            {"config": name, "wall_s": result.wall_s, "steps": len(losses), "first_loss": losses[0] if losses else None,
             "final_loss": losses[-1] if losses else None, "trainer": result.summary}, indent=2) + "\n")
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
