"""Types and pieces every training backend shares (hand-written).

The backends (stepwise.training.backends: `axolotl`, `trl`, `openai`) import from here, never from
one another: a check's `Problem` / `CheckReport`, a local run's `TrainResult` / `TrainError`, the
offline environment of the training subprocesses, `finish` (the trainer state's losses ->
`loss.csv`, `summary.json` and the manifest's stage) and the YAML dumper of the written configs.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from stepwise.training.checkpoints import LOSS_FIELDS, NoLossRecorded, recorded_losses

from stepwise.io import YamlSyntaxError, atomic_write_text, load_yaml_with_lines

Level = Literal["error", "warning"]


@dataclass
class Problem:
    level: Level
    key: str
    message: str
    line: int | None = None

    def format(self, label: str) -> str:
        where = f"{label}:{self.line}" if self.line else label
        return f"{where} {self.key}: {self.message}"


@dataclass
class CheckReport:
    label: str
    problems: list[Problem] = field(default_factory=list)
    axolotl_validated: bool = False
    axolotl_normalized: bool = False
    train_rows: int | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def messages(self, level: Level | None = None) -> list[str]:
        return [p.format(self.label) for p in self.problems if level is None or p.level == level]


OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
}


def trainer_env(*, wandb: bool) -> dict[str, str]:
    """The trainer process's environment: this one with OFFLINE_ENV over it, except that a run
    reporting to W&B (training.tracking.wandb) keeps the caller's WANDB_MODE (online, offline;
    unset: W&B's default) instead of having the tracker the recipe asked for disabled.

    The trainer never inherits this process's W&B service (WANDB_SERVICE, set once stepwise has
    logged a point): through it, the trainer's run outlives the trainer, still open when stepwise
    logs the point's metrics to the same run id ("run ID is in use"); its own service closes and
    writes the run when the trainer exits."""
    env = {k: v for k, v in {**os.environ, **OFFLINE_ENV}.items() if k != "WANDB_SERVICE"}
    if wandb:
        env.pop("WANDB_MODE")
        if "WANDB_MODE" in os.environ:
            env["WANDB_MODE"] = os.environ["WANDB_MODE"]
    return env


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
    resumed_from_step: int | None = None
    global_step: int | None = None
    moved_aside: Path | None = None

    @property
    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.losses if r["kind"] == "train"]


def finish(result: TrainResult, st: Any, *, extra: dict[str, Any], emit: Callable[[str, Any], None],
           summary_extra: dict[str, Any] | None = None, skip_outputs: tuple[str, ...] = ()) -> None:
    """Both backends: losses from the trainer state -> loss.csv, summary.json and the manifest's stage."""
    out_dir = result.out_dir
    try:
        rows, trainer_summary, state, state_path = recorded_losses(out_dir)
    except NoLossRecorded as exc:
        raise TrainError(f"{exc}; see {out_dir / 'train.log'}") from None
    result.losses, result.summary = rows, trainer_summary
    result.global_step = state.get("global_step")
    loss_csv = out_dir / "loss.csv"
    with loss_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOSS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        emit("loss", row)
    losses = result.train_losses
    facts = {"config": result.name, "wall_s": result.wall_s, "steps": len(losses), "global_step": result.global_step,
             "resumed_from_step": result.resumed_from_step, "first_loss": losses[0], "final_loss": losses[-1],
             "train_runtime_s": trainer_summary.get("train_runtime"), "trainer_state": str(state_path.relative_to(out_dir)),
             **(summary_extra or {})}
    atomic_write_text(out_dir / "summary.json", json.dumps({**facts, "trainer": trainer_summary}, indent=2) + "\n")
    produced = [p for p in sorted(out_dir.iterdir()) if p.suffix in {".safetensors", ".json"} and p.is_file()
                and p.name not in skip_outputs]
    st.outputs(loss_csv, result.config_path, *produced)
    st.counts(steps=len(losses))
    st.extra(**{**{k: v for k, v in facts.items() if k not in ("wall_s", "steps")}, **extra})


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.dump(cfg, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False, width=110)


def load_config(config: dict[str, Any] | str | Path) -> tuple[Any, str, dict[tuple[Any, ...], int]] | CheckReport:
    """A written config as (data, label, YAML line index), or the report of why it cannot be read."""
    if not isinstance(config, str | Path):
        return config, "<config>", {}
    label, path = str(config), Path(config)
    if not path.exists():
        return CheckReport(label, [Problem("error", "<file>", "file not found")])
    try:
        cfg, index = load_yaml_with_lines(path.read_text(encoding="utf-8"))
    except YamlSyntaxError as exc:
        return CheckReport(label, [Problem("error", "<yaml>", exc.problem, exc.line)])
    return cfg, label, index
